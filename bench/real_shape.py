"""Real model shapes on CPU: every algorithm script on a Qwen2.5-0.5B-shaped model with colocated vLLM.

    python bench/real_shape.py [--work runs/real_shape] [--threads 2]

Builds, once, a model with Qwen2.5-0.5B's configuration (24 layers, hidden 896, 14 heads, 2 KV heads,
intermediate 4864, tied embeddings, vocabulary 151,936; random weights) and a byte-level BPE tokenizer
of that vocabulary size with Qwen's 22 special tokens at Qwen's ids and the ChatML chat template, plus
toy-task prompts. Then runs the real scripts as a user would, with vLLM, 8 prompts x 4 samples x 128
completion tokens per step:
  grpo_logprob.py  2 steps in float32 and 2 in bf16 (bf16 weights, bf16 vLLM engine)
  raft_pp.py, reinforce_rej.py, prime.py  1 step each in bf16
Random weights never answer correctly, so the runs use the flags that still exercise a full update:
raft_pp.py --normalizer batch (|D| = every sample: the loss is zero but the forward/backward and the
optimizer step all run), reinforce_rej.py --algo reinforce (no filter), prime.py --filter_low 0
--filter_high 1 (every group kept).

Per step it prints seconds per phase (sample, score, update, push), the step's peak resident memory,
the vLLM-vs-trainer log-prob gap, and the update phase's achieved FLOP/s as a fraction of this
machine's matmul FLOP/s, measured here in the same run (a 2048^3 matmul in the step's dtype with the
same thread count: the physical limit on this CPU). Update FLOPs are counted as 6 N T for each
forward+backward pass and 2 N T for each no-gradient pass (old, reference and PRM log-probs), with N
the body's parameters (embeddings excluded) and T the step's prompt + completion tokens, plus the LM
head on completion tokens only (2 H V per token forward, 4 H V backward; our chunked head recomputes
its logits in the backward, 2 H V more, not counted); attention's quadratic term is left out (~10% at
these lengths). Ends with one line: RESULT key=value ...
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
FIRST_SPECIAL = 151643  # Qwen2.5: <|endoftext|> = 151643, <|im_start|> = 151644, <|im_end|> = 151645
STEP = dict(prompts=8, generations=4, tokens=128)


def build(work: Path) -> Path:
    """Model folder (config, random weights, tokenizer) and train/test files, made once."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from common import write_jsonl
    from data_prep import QWEN_CHAT_TEMPLATE, toy_problem, toy_row, toy_solution

    model_dir = work / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    rng = random.Random(0)
    problems = [toy_problem(rng, 12, 2, 4) for _ in range(200)]
    rows = [toy_row("train", i, *p) for i, p in enumerate(problems)]
    write_jsonl(rows[:160], work / "train.jsonl")
    write_jsonl([{**r, "id": r["id"].replace("train", "test")} for r in rows[160:]], work / "test.jsonl")
    # byte-level BPE merges learned on the task's text, the rest of the vocabulary filled up to Qwen's size
    corpus = [m["content"] for r in rows for m in r["prompt"]] + [toy_solution(*p)[0] for p in problems]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    filler = iter(f"\u0100filler{i}" for i in range(FIRST_SPECIAL))
    while len(vocab) < FIRST_SPECIAL:
        vocab[next(filler)] = len(vocab)
    vocab.update({t: FIRST_SPECIAL + i for i, t in enumerate(QWEN_SPECIAL)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_CHAT_TEMPLATE  # ChatML, as Qwen's
    fast.save_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    assert loaded.convert_tokens_to_ids("<|im_end|>") == 151645 and len(loaded) == FIRST_SPECIAL + len(QWEN_SPECIAL)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_05B, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"built {model_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"tokenizer of {len(loaded)} tokens (vocabulary {config.vocab_size})", flush=True)
    return model_dir


def matmul_flops(dtype_name: str, threads: int) -> float:
    """Best FLOP/s of a 2048^3 matmul in this dtype with `threads` threads (the CPU's practical peak)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def passes(script: str, flags: list[str]) -> tuple[int, int]:
    """(forward+backward passes, no-gradient passes) over the step's sequences, from the script's
    defaults and flags: old log-probs, reference (KL metric, frozen reference) and PRM passes."""
    if script == "grpo_logprob.py":
        return 1, 0  # one iteration, no IS correction, beta 0: the on-policy pass only
    if script in ("raft_pp.py", "reinforce_rej.py"):
        return 2, 2  # num_iterations 2 (old log-probs once), the frozen copy for the logged KL
    return 2, 3  # prime.py: PRM update and policy pass; old, reference and PRM-scoring passes


def model_flops(script, flags, prompt_tokens, completion_tokens) -> float:
    c = QWEN25_05B
    h, v, layers, inter = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    body = layers * (h * h * 2 + h * kv * 2 + 3 * h * inter)  # q, o, k, v projections and the MLP
    train, frozen = passes(script, flags)
    tokens = prompt_tokens + completion_tokens
    forward = 2 * body * tokens + 2 * h * v * completion_tokens
    return train * 3 * forward + frozen * forward


def prompt_tokens_of_step(model_dir, train_file, step, seed=0) -> int:
    from transformers import AutoTokenizer

    from common import encode_prompts, load_tasks, prompts_for_step

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = prompts_for_step(load_tasks(train_file), step, STEP["prompts"], seed)
    return sum(len(p) for p in encode_prompts(tok, rows)) * STEP["generations"]


def run(script, name, flags, work, model_dir, threads) -> list[dict]:
    run_dir = work / "runs" / name
    if not (run_dir / "final").exists():
        cmd = [sys.executable, script, "--model", str(model_dir), "--train_file", str(work / "train.jsonl"),
               "--test_file", str(work / "test.jsonl"), "--output_dir", str(work / "runs"), "--run_name", name,
               "--sampler", "vllm", "--prompts_per_step", str(STEP["prompts"]), "--num_generations",
               str(STEP["generations"]), "--max_completion_length", str(STEP["tokens"]), "--max_model_len", "512",
               "--eval_limit", "2", "--eval_every", "0", "--save_every", "0", "--micro_batch_size", "8",
               "--learning_rate", "1e-6", *flags]
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name}: {time.perf_counter() - t0:.0f} s in all", flush=True)
    from common import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/real_shape", help="folder for the model, data and run folders")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_dir = build(work)
    peak = {d: matmul_flops(d, args.threads) for d in ("float32", "bfloat16")}
    print(f"matmul limit on this machine ({args.threads} threads): float32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
          f"bfloat16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s", flush=True)
    bf16 = ["--dtype", "bfloat16", "--vllm_dtype", "bfloat16"]
    plan = [("grpo_logprob.py", "grpo_fp32", ["--total_steps", "2", "--dtype", "float32"], "float32"),
            ("grpo_logprob.py", "grpo_bf16", ["--total_steps", "2", *bf16], "bfloat16"),
            ("raft_pp.py", "raft_pp_bf16", ["--total_steps", "1", "--normalizer", "batch", *bf16], "bfloat16"),
            ("reinforce_rej.py", "reinforce_bf16", ["--total_steps", "1", "--algo", "reinforce", *bf16], "bfloat16"),
            ("prime.py", "prime_bf16", ["--total_steps", "1", "--filter_low", "0", "--filter_high", "1", *bf16],
             "bfloat16")]
    result = {}
    print("\n| run | step | sample s | score s | update s | push s | peak RSS GB | log-prob gap mean / max | "
          "update GFLOP/s | of matmul limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for script, name, flags, dtype in plan:
        for m in run(script, name, flags, work, model_dir, args.threads):
            flops = model_flops(script, flags, prompt_tokens_of_step(model_dir, work / "train.jsonl", m["step"]),
                                m["num_tokens"])
            achieved = flops / m["time/update"]
            frac = achieved / peak[dtype]
            # prime.py scores inside its sampling rounds, so its sample time includes scoring
            score = f"{m['time/score']:.1f}" if "time/score" in m else "in sample"
            print(f"| {name} | {m['step']} | {m['time/sample']:.1f} | {score} | {m['time/update']:.1f} | "
                  f"{m.get('time/push', 0):.1f} | {m['memory/peak_rss_gb']:.1f} | "
                  f"{m['sampler/logprob_gap_mean']:.2e} / {m['sampler/logprob_gap_max']:.2e} | "
                  f"{achieved / 1e9:.0f} | {frac:.2f} |", flush=True)
            key = f"{name}_s{m['step']}"
            result.update({f"{key}_sample_s": m["time/sample"], f"{key}_update_s": m["time/update"],
                           f"{key}_push_s": m.get("time/push", 0), f"{key}_rss_gb": m["memory/peak_rss_gb"],
                           f"{key}_gap_mean": m["sampler/logprob_gap_mean"], f"{key}_gap_max": m["sampler/logprob_gap_max"],
                           f"{key}_update_frac_of_matmul": frac})
    result["matmul_fp32_gflops"] = peak["float32"] / 1e9
    result["matmul_bf16_gflops"] = peak["bfloat16"] / 1e9
    result["total_min"] = (time.perf_counter() - t_all) / 60
    print(f"\ntotal: {result['total_min']:.1f} min")
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
