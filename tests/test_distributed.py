"""Two CPU processes (gloo) under torchrun, as `torchrun --nproc_per_node 2 script.py` runs them."""

import shutil

from conftest import read_jsonl, run_script, torchrun


def test_ddp_gradients_and_checkpoint(toy, tmp_path):
    out = run_script(["tests/dist_check.py", str(toy / "model"), str(tmp_path)], launcher=torchrun(), timeout=300)
    assert "checkpoint: every rank's state written" in out.stdout
    assert "DIST_CHECK_OK" in out.stdout


def test_grpo_runs_on_two_processes(toy, tmp_path):
    run_script(["grpo_logprob.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
                "--test_file", str(toy / "test.jsonl"), "--output_dir", str(tmp_path), "--run_name", "ddp",
                "--sampler", "hf", "--total_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
                "--max_completion_length", "48", "--eval_limit", "9"], launcher=torchrun(), timeout=600)
    metrics = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # an odd count: the ranks' shares differ in size (5 and 4), and all are gathered
    assert metrics[0]["eval/num_problems"] == 9
    assert len(read_jsonl(tmp_path / "ddp" / "eval" / "step_000002.jsonl")) == 9
    assert metrics[0]["eval/gold_logprob"] < 0
    # 4 prompts x 4 samples over the two ranks, all counted in the logged metrics
    assert all(m["num_tokens"] > 0 for m in metrics[1:])
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "ddp")
