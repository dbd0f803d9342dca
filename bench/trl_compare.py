"""One GRPO step, ours against TRL's GRPOTrainer: completion tokens per second of a whole step
(sample, score, update), same model, batch, group size, lengths and loss, measured in one run.

    .venv/bin/pip install --target .bench-deps trl==1.16.0 --no-deps   # TRL only for this benchmark
    python bench/trl_compare.py                                        # about 15 min on 2 CPU cores

Set-ups, each a fresh subprocess, each --steps optimizer steps; the figure is the median over the
steps after the first (warm-up) of completion tokens / wall time of the step:
  - ours/vllm: grpo_logprob.py --sampler vllm (in-process vLLM, weights pushed after the update)
  - ours/hf:   grpo_logprob.py --sampler hf (our transformers KV-cache sampler)
  - trl:       trl.GRPOTrainer (transformers generate; TRL's default without a vLLM server)
Identical: 16 prompts x 8 completions per step, temperature 1, micro-batches of 64 completions (TRL:
per_device_train_batch_size 64, gradient_accumulation_steps 2, one generation per optimizer step),
token-mean loss (TRL "dapo"), group std, beta 0, one iteration, AdamW lr 5e-5, grad clip 1.0 (on
the 25M model micro-batches of 32: TRL's [64, 129, 151936] float32 logits would not fit in 24 GB),
the same correctness reward function. Models: the toy model (natural lengths up to 64 tokens) and
the random-weight Qwen2-shaped 25M-parameter model of bench/sampler_throughput.py (vocabulary
151,936) with 128-token completions (random weights almost never stop early).

Ends with one line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / ".bench-deps"))
from common import read_jsonl  # noqa: E402

PROMPTS, GROUP, LR = 16, 8, 5e-5


def ours(model: str, train: str, max_len: int, micro: int, sampler: str, steps: int, out: Path) -> list[float]:
    """Per-step tokens/s of grpo_logprob.py (its `tokens_per_second`: sample + score + update + push)."""
    cmd = [sys.executable, "grpo_logprob.py", "--model", model, "--train_file", train, "--test_file", train,
           "--sampler", sampler, "--total_steps", str(steps), "--prompts_per_step", str(PROMPTS),
           "--num_generations", str(GROUP), "--max_completion_length", str(max_len), "--micro_batch_size",
           str(micro), "--learning_rate", str(LR), "--reward", "correct=1", "--eval_limit", "4",
           "--eval_every", "0", "--save_every", "0", "--log_rollouts_every", "0", "--output_dir", str(out),
           "--run_name", sampler]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return [m["tokens_per_second"] for m in read_jsonl(out / sampler / "metrics.jsonl") if m["step"] >= 1]


def trl_worker(model: str, train: str, max_len: int, micro: int, steps: int, out: str, prompts: int = PROMPTS,
               group: int = GROUP, lr: float = LR, format_weight: float = 0.0, gradient_checkpointing: bool = False):
    """Runs in its own process: TRL GRPOTrainer for `steps` steps, reward correct + format_weight * format;
    prints per-step tokens/s, then per-step seconds, as JSON lines."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common import load_tasks, render_prompt
    from grading import score_completions

    tok = AutoTokenizer.from_pretrained(model)
    rows = load_tasks(train)[: prompts * steps]
    # Prompts already rendered with the chat template (the assistant turn prefilled, as ours).
    data = Dataset.from_list([{"prompt": render_prompt(tok, r["prompt"]), "row": json.dumps(r)} for r in rows])
    tokens_per_call: list[int] = []

    def correctness(prompts, completions, completion_ids, row, **_):
        tokens_per_call.append(sum(len(c) for c in completion_ids))
        scores, _ = score_completions([json.loads(r) for r in row], completions)
        return [float(s.correct or 0.0) + format_weight * s.format for s in scores]

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = GRPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=micro,
                        gradient_accumulation_steps=prompts * group // micro, num_generations=group,
                        gradient_checkpointing=gradient_checkpointing,
                        max_completion_length=max_len, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                        scale_rewards="group", temperature=1.0, top_p=1.0, num_iterations=1, epsilon=0.2,
                        logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False, seed=0,
                        dataloader_num_workers=0, disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                          reward_funcs=correctness, args=config, train_dataset=data, processing_class=tok,
                          callbacks=[StepClock()])
    trainer.train()
    rates = [n / (b - a) for n, a, b in zip(tokens_per_call, ends, ends[1:])]
    print("TRL_RATES " + json.dumps(rates))
    print("TRL_SECONDS " + json.dumps([b - a for a, b in zip(ends, ends[1:])]))


def trl(model: str, train: str, max_len: int, micro: int, steps: int, out: Path, **spec) -> dict:
    """TRL's run in a fresh process: {"rates": per-step tokens/s, "seconds": per-step seconds, "peak_rss_gb"}."""
    cmd = [sys.executable, __file__, "--trl_worker", model, train, str(max_len), str(micro), str(steps), str(out / "trl"),
           json.dumps(spec)]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        memory = PeakMemory(proc.pid)
        stdout, stderr = proc.communicate()
        peak = memory.stop()
    found = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in stdout.splitlines() if x.startswith("TRL_")}
    if proc.returncode or "TRL_RATES" not in found:
        raise SystemExit(f"TRL run failed:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return {"rates": found["TRL_RATES"], "seconds": found["TRL_SECONDS"], "peak_rss_gb": peak}


class PeakMemory:
    """Peak resident memory of a process and all its descendants together, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        import psutil

        while not self.done.wait(0.2):
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:  # the root process is gone
                return
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        """The peak so far, in GB (2^30 bytes); ends the sampling."""
        self.done.set()
        self.thread.join()
        return self.peak / 2**30


def big_model(folder: Path, toy_model: str) -> str:
    """The 25M model of bench/sampler_throughput.py, with the toy tokenizer's chat template."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "bench"))
    from sampler_throughput import make_big_model

    path = folder / "big"
    _, tok = make_big_model(path)
    tok.chat_template = AutoTokenizer.from_pretrained(toy_model).chat_template
    tok.save_pretrained(path)
    return str(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy_model", default="data/toy/model")
    p.add_argument("--train_file", default="data/toy/train.jsonl")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per set-up (the first is warm-up)")
    p.add_argument("--skip_big", action="store_true", help="only the toy model")
    p.add_argument("--trl_worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.trl_worker:
        model, train, max_len, micro, steps, out, *spec = args.trl_worker
        return trl_worker(model, train, int(max_len), int(micro), int(steps), out, **json.loads(spec[0] if spec else "{}"))

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("toy", args.toy_model, 64, 64)]  # label, model, completion tokens, micro-batch
        if not args.skip_big:  # micro-batches of 32: TRL's full [32, 129, 151936] logits fit in 24 GB
            cases.append(("big", big_model(tmp, args.toy_model), 128, 32))
        for label, model, max_len, micro in cases:
            out = tmp / label
            rates = {"ours_vllm": ours(model, args.train_file, max_len, micro, "vllm", args.steps, out),
                     "ours_hf": ours(model, args.train_file, max_len, micro, "hf", args.steps, out),
                     "trl": trl(model, args.train_file, max_len, micro, args.steps, out)["rates"]}
            for name, values in rates.items():
                result[f"{label}_{name}_tok_s"] = round(statistics.median(values[1:] or values), 1)
                print(f"{label} {name}: per-step tokens/s {[round(v, 1) for v in values]}", flush=True)
            for name in ("ours_vllm", "ours_hf"):
                result[f"{label}_{name}_vs_trl"] = round(result[f"{label}_{name}_tok_s"] / result[f"{label}_trl_tok_s"], 2)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
