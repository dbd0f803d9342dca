"""A real pretrained instruct model learns on a real benchmark on this CPU: SmolLM2-135M-Instruct on GSM8K.

    python data_prep.py smollm2                                                     # the model, once
    python data_prep.py gsm8k --template gsm8k --out data/gsm8k/train.jsonl         # hub openai/gsm8k
    python data_prep.py gsm8k --template gsm8k --split test --out data/gsm8k/test.jsonl
    .venv/bin/pip install --target .bench-deps trl==1.16.0 --no-deps                # TRL, this bench only
    python bench/real_model.py                                                      # ~2 h on 2 CPU cores

Without data/gsm8k/ it stops with the commands above (a local GSM8K copy: add --source FILE to them).

Runs, each a fresh subprocess of the real script with the README's real-model settings (STEP below):
  grpo_logprob    grpo_logprob.py with the log-prob reward and reasoning-only loss, --steps steps
  grpo            grpo_logprob.py with rule rewards (correctness and the #### answer line), --other_steps steps
  raft++, reinforce_rej, prime: --other_steps steps each
  trl             TRL 1.16's GRPOTrainer on the same model, prompts, group, completion length, loss, learning
                  rate and micro-batches (transformers generation, its default without a vLLM server)
  matrix          one step of 2 prompts x 4 samples x 48 tokens of every script with each sampler (vllm, hf)
                  and dtype (float32, bfloat16), on easy sums of the bench's own (EASY) where the model is right
                  in some samples: does every combination take a finite step that moves the weights (grad norm
                  above 0) on the real model; not in the default
  two_process     one step of grpo_logprob.py as the main run (log-prob reward, reasoning-only loss) under
                  `torchrun --nproc_per_node 2`, each process with its own vLLM engine, 4 prompts x 4 samples x
                  192 tokens: the step's grad norm (non-zero: it trained), the log-prob gap after the weight
                  push, seconds and peak memory of both processes together
  gap_fp32, gap_bf16  one step of grpo_logprob.py with rule rewards, 4 prompts x 2 samples x 96 tokens, vLLM
                  and the trainer both in float32 / bf16: the sampler/trainer log-prob gap per token
Each of ours evaluates the first test problems greedily (held out: the test split) before its first step and
after its last: --eval_problems for grpo_logprob, --other_eval_problems for the others. Reported per run: accuracy and format rate with 95% bootstrap intervals over
problems (eval.py's); the mean log-prob of the reference answer after the model's own reasoning (the greedy
completion up to its last '####', or all of it and a line break when it has none, then '#### '), under the
model that wrote it, with its interval; the mean completion length; seconds per step by phase (median over
the steps after the first: sample, score, logprobs = the no-gradient passes inside the update, update =
the rest of it, push); the peak resident memory of the run's processes together (sampled every 0.2 s).
Ends with one line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / ".bench-deps"))
os.environ.setdefault("WANDB_MODE", "disabled")

from common import read_jsonl, write_jsonl  # noqa: E402
from trl_compare import PeakMemory, trl  # noqa: E402  the TRL worker and the memory watch, shared

# One step of the README's real-model command: prompts x completions per prompt, completion tokens, micro-batch.
STEP = dict(prompts=8, generations=4, tokens=256, micro=2, lr=2e-5)
MAIN = "grpo_logprob"  # the run of --steps steps; the others run --other_steps
RUNS = {  # name: script and its own flags
    "grpo_logprob": ("grpo_logprob.py", ["--reward", "logprob=1", "--reasoning_only_loss", "on"]),
    "grpo": ("grpo_logprob.py", ["--reward", "correct=1,format=0.2"]),
    "raft++": ("raft_pp.py", ["--algo", "raft++"]),
    "reinforce_rej": ("reinforce_rej.py", ["--algo", "reinforce_rej"]),
    "prime": ("prime.py", ["--filter_low", "0", "--filter_high", "1"]),  # its [0.2, 0.8] filter keeps nothing at 1%
}
PHASES = ("sample", "score", "logprobs", "update", "push")
# The log-prob gap runs: one small step each (bf16 is emulated on CPUs without AVX512-BF16 or AMX: slow).
GAP_RUNS = {"gap_fp32": "float32", "gap_bf16": "bfloat16"}
GAP_STEP = dict(STEP, prompts=4, generations=2, tokens=96)
TWO_STEP = dict(STEP, prompts=4, generations=4, tokens=192)  # long enough that most samples close their reasoning
MATRIX_STEP = dict(STEP, prompts=2, generations=4, tokens=48)  # the "matrix" run: does every combination train
# The matrix run's problems, ours: one-step sums that the small model gets right in some samples and wrong in others
# within 48 tokens, so that every algorithm has a learning signal in one step (GSM8K's rarely does: 1.5% right).
EASY = "{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


def gsm8k_files(data: Path) -> tuple[Path, Path]:
    train, test = data / "train.jsonl", data / "test.jsonl"
    if not (train.is_file() and test.is_file()):
        raise SystemExit(f"{data}: no GSM8K files; write them with `python data_prep.py gsm8k --template gsm8k --out "
                         f"{train}` and `... --split test --out {test}` (hub openai/gsm8k, or --source FILE).")
    return train, test


def launch(name: str, script: str, flags: list[str], args, train: Path, test: Path, work: Path, steps: int,
           problems: int, step: dict = STEP, dtype: str | None = None, sampler: str | None = None,
           processes: int = 1, keep_weights: bool = True) -> tuple[list[dict], float]:
    """Run a script as a user would (under torchrun given processes > 1); its metrics lines and the peak
    memory of its processes together. keep_weights=False: drop_weights once it has ended (a one-step run)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    cmd = [sys.executable, *launcher, script, "--model", args.model, "--train_file", str(train), "--test_file", str(test),
           "--run_name", name, "--output_dir", str(work), "--sampler", sampler or args.sampler,
           "--dtype", dtype or args.dtype, "--total_steps", str(steps), "--prompts_per_step", str(step["prompts"]),
           "--num_generations", str(step["generations"]), "--max_completion_length", str(step["tokens"]),
           "--micro_batch_size", str(step["micro"]), "--learning_rate", str(step["lr"]), "--gradient_checkpointing",
           "--eval_temperature", "0", "--eval_every", "0", "--eval_limit", str(problems),
           "--save_every", "0", "--log_rollouts_every", "0", "--vllm_cpu_kv_cache_gb", "0.5", *flags]
    log = work / f"{name}.log"
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)

        memory = PeakMemory(proc.pid)
        code = proc.wait()
        peak = memory.stop()
    if not keep_weights:
        drop_weights(work / name)
    if code:
        raise SystemExit(f"{name} exited {code}; see {log}")
    return read_jsonl(work / name / "metrics.jsonl"), peak


def run_ours(name: str, args, train: Path, test: Path, work: Path) -> dict:
    script, flags = RUNS[name]
    steps = args.steps if name == MAIN else args.other_steps
    problems = args.eval_problems if name == MAIN else args.other_eval_problems
    metrics, peak = launch(name, script, flags, args, train, test, work, steps, problems)
    run = work / name
    steps_ = [m for m in metrics if m["step"] >= 1]
    evals = sorted((run / "eval").glob("step_*.jsonl"))
    out = {"peak_rss_gb": peak, "steps": len(steps_)}
    for when, path, model in (("before", evals[0], args.model), ("after", evals[-1], str(run / "final"))):
        out.update({f"{when}_{k}": v for k, v in eval_figures(read_jsonl(path), model).items()})
    timed = steps_[1:] or steps_
    for phase in PHASES:
        values = [m.get(f"time/{phase}", 0.0) - (m.get("time/logprobs", 0.0) if phase == "update" else 0.0)
                  for m in timed]
        out[f"s_{phase}"] = statistics.median(values)
    out["s_step"] = statistics.median([m["num_tokens"] / m["tokens_per_second"] for m in timed])
    out["gap_max"] = max(m.get("sampler/logprob_gap_max", 0.0) or 0.0 for m in steps_)
    out["gap_mean"] = statistics.mean(m.get("sampler/logprob_gap_mean", 0.0) or 0.0 for m in steps_)
    return out


def drop_weights(run: Path) -> None:
    """Remove a run's final model and checkpoints (about 2 GB of float32 weights and optimizer state per run of
    the real model) once its metrics are read: the matrix alone would otherwise fill 40 GB of disk."""
    for sub in ("final", "checkpoints"):
        subprocess.run(["rm", "-rf", str(run / sub)], check=True)


def only_step(metrics: list[dict]) -> dict:
    """The metrics line of a one-step run's step."""
    (step,) = [m for m in metrics if m["step"] == 1]
    return step


def step_figures(step: dict) -> dict:
    """A one-step run's step: finite and not empty, its grad norm (0: nothing moved), its seconds."""
    return {"ok": step["train/skipped_nonfinite"] == 0 and step["num_tokens"] > 0, "grad_norm": step["grad_norm"],
            "s_step": step["num_tokens"] / step["tokens_per_second"]}


def run_two_process(args, train: Path, test: Path, work: Path) -> dict:
    """One step of the main run's script and flags on two processes (torchrun), each sampling with its own engine."""
    script, flags = RUNS[MAIN]
    metrics, peak = launch("two_process", script, flags, args, train, test, work, 1, 16, TWO_STEP, processes=2,
                           keep_weights=False)
    step = only_step(metrics)
    return {**step_figures(step), "gap_mean": step["sampler/logprob_gap_mean"],
            "gap_max": step["sampler/logprob_gap_max"], "tokens": step["num_tokens"],
            "no_marker": step.get("rewards/no_marker", float("nan")), "peak_rss_gb": peak}


def run_gap(name: str, args, train: Path, work: Path) -> dict:
    """The sampler/trainer log-prob gap per completion token of one small grpo_logprob.py step, vLLM and the
    trainer both in GAP_RUNS[name]'s dtype: a float32 and a bf16 step sample the same prompts."""
    metrics, peak = launch(name, "grpo_logprob.py", ["--reward", "correct=1,format=0.2"], args, train, train, work,
                           1, 1, GAP_STEP, GAP_RUNS[name], "vllm", keep_weights=False)
    step = only_step(metrics)
    return {"gap_mean": step["sampler/logprob_gap_mean"], "gap_max": step["sampler/logprob_gap_max"],
            "tokens": step["num_tokens"], "peak_rss_gb": peak}


def easy_rows(n: int = 16) -> list[dict]:
    """n problems of EASY in the gsm8k template (the same worked example as the GSM8K rows)."""
    from grading import build_prompt

    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = EASY.format(name=rng.choice(["Tom", "Ana", "Lee", "Mia"]), thing=rng.choice(["apples", "stamps", "books"]),
                        a=a, b=b)
        rows.append({"id": f"easy-{i:03d}", "task": "gsm8k", "prompt": build_prompt("gsm8k", q), "answer": str(a + b),
                     "metadata": {"template": "gsm8k", "answer_style": "gsm8k"}})
    return rows


def run_matrix(args, work: Path) -> dict:
    """One small step of every script with each sampler and dtype on easy_rows: {"script sampler dtype": result}."""
    train = work / "easy.jsonl"
    write_jsonl(easy_rows(), train)
    out = {}
    for name in args.matrix_scripts.split(","):
        script, flags = RUNS[name]
        for sampler in ("vllm", "hf"):
            for dtype in ("float32", "bfloat16"):
                run = f"{name}-{sampler}-{dtype}".replace("+", "p")
                try:
                    metrics, peak = launch(run, script, flags, args, train, train, work, 1, 2, MATRIX_STEP, dtype,
                                           sampler, keep_weights=False)
                except SystemExit as e:  # a failed run is a result here
                    out[f"{name} {sampler} {dtype}"] = {"ok": False, "error": str(e)}
                    continue
                out[f"{name} {sampler} {dtype}"] = {**step_figures(only_step(metrics)), "peak_rss_gb": peak}
    return out


def gold_logprobs(model_dir: str, records: list[dict]) -> list[float]:
    """Per problem: the summed log-prob of the reference answer after the greedy completion's reasoning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import render_prompt
    from grading import answer_style
    from grpo_logprob import continuation_logprobs, reasoning_end

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefixes, answers = [], []
    for r in records:
        marker, cue, written = reasoning_end(answer_style(r))
        text = r["completions"][0]
        end = text.rfind(marker)
        reasoning = text[:end] if end >= 0 else text.rstrip() + "\n"
        prefixes.append(tok(render_prompt(tok, r["prompt"]) + reasoning + cue, add_special_tokens=False)["input_ids"])
        answers.append(tok(written.format(r["answer"]), add_special_tokens=False)["input_ids"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [lp.sum().item() for lp in continuation_logprobs(model, prefixes, answers, pad, batch_size=16)]


def eval_figures(records: list[dict], model_dir: str) -> dict:
    """Accuracy, format rate and gold-answer log-prob with 95% bootstrap intervals; mean length."""
    from eval import bootstrap_ci

    table = np.array([[r["correct"][0], r["format"][0], lp] for r, lp in zip(records, gold_logprobs(model_dir, records))])
    (acc_lo, acc_hi), (fmt_lo, fmt_hi), (lp_lo, lp_hi) = bootstrap_ci(table)
    acc, fmt, lp = table.mean(0)
    return {"acc": acc, "acc_lo": acc_lo, "acc_hi": acc_hi, "format": fmt, "format_lo": fmt_lo, "format_hi": fmt_hi,
            "gold_logprob": lp, "gold_logprob_lo": lp_lo, "gold_logprob_hi": lp_hi,
            "length": float(np.mean([r["lengths"][0] for r in records])), "problems": len(records)}


def run_trl(args, train: Path, work: Path) -> dict:
    """TRL's GRPOTrainer on the same step as ours (bench/trl_compare.py's worker), its first step not timed."""
    result = trl(args.model, str(train), STEP["tokens"], STEP["micro"], args.trl_steps, work,
                 prompts=STEP["prompts"], group=STEP["generations"], lr=STEP["lr"], format_weight=0.2,
                 gradient_checkpointing=True)
    return {"s_step": statistics.median(result["seconds"][1:] or result["seconds"]),
            "peak_rss_gb": result["peak_rss_gb"], "steps": len(result["seconds"])}


def table(results: dict) -> str:
    head = ("| run | steps | accuracy before -> after | format before -> after | gold log-prob before -> after | "
            "length | s/step (sample / score / logprobs / update / push) | peak RSS |")
    lines = [head, "|" + "---|" * 8]
    for name, r in results.items():
        if name == "trl":
            lines.append(f"| TRL GRPOTrainer | {r.get('steps', '')} | | | | | {r['s_step']:.1f} | {r['peak_rss_gb']:.1f} GB |")
            continue
        if name in GAP_RUNS or name in ("matrix", "two_process"):
            continue  # in their own tables

        def ci(key):
            return (f"{r[f'before_{key}']:.3f} [{r[f'before_{key}_lo']:.3f}, {r[f'before_{key}_hi']:.3f}] -> "
                    f"{r[f'after_{key}']:.3f} [{r[f'after_{key}_lo']:.3f}, {r[f'after_{key}_hi']:.3f}]")
        phases = " / ".join(f"{r[f's_{p}']:.1f}" for p in PHASES)
        lines.append(f"| {name} | {r['steps']} | {ci('acc')} | {ci('format')} | {ci('gold_logprob')} | "
                     f"{r['before_length']:.0f} -> {r['after_length']:.0f} | {r['s_step']:.1f} ({phases}) | "
                     f"{r['peak_rss_gb']:.1f} GB |")
    if len(lines) == 2:  # no run of the main table
        lines = []
    gaps = [f"| {GAP_RUNS[n]} | {r['tokens']} | {r['gap_mean']:.2e} | {r['gap_max']:.2e} |" for n, r in results.items()
            if n in GAP_RUNS]
    if gaps:
        lines += ["", "| dtype (vLLM and trainer) | completion tokens | gap mean | gap max |", "|---|---|---|---|", *gaps]
    if "two_process" in results:
        r = results["two_process"]
        lines += ["", "| 2 processes | finite step | grad norm | samples without '####' | gap mean | gap max | s/step | "
                  "peak RSS |", "|---|---|---|---|---|---|---|---|",
                  f"| {MAIN} | {'yes' if r['ok'] else 'NO'} | {r['grad_norm']:.3g} | {r['no_marker']:.2f} | "
                  f"{r['gap_mean']:.2e} | {r['gap_max']:.2e} | {r['s_step']:.0f} | {r['peak_rss_gb']:.1f} GB |"]
    if "matrix" in results:
        lines += ["", "| script, sampler, dtype | finite step | grad norm | s/step | peak RSS |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {'yes' if r['ok'] else 'NO: ' + r.get('error', 'non-finite or empty step')} | "
                  f"{r.get('grad_norm', float('nan')):.3g} | {r.get('s_step', float('nan')):.0f} | "
                  f"{r.get('peak_rss_gb', float('nan')):.1f} GB |"
                  for k, r in results["matrix"].items()]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/smollm2/model")
    p.add_argument("--data", default="data/gsm8k", help="folder of train.jsonl and test.jsonl (gsm8k template)")
    p.add_argument("--work", default="runs/real_model", help="run folders (replaced)")
    p.add_argument("--steps", type=int, default=12, help=f"steps of {MAIN}")
    p.add_argument("--other_steps", type=int, default=2, help="steps of each other run")
    p.add_argument("--trl_steps", type=int, default=2, help="TRL steps (the first is not timed)")
    p.add_argument("--eval_problems", type=int, default=200, help=f"held-out test problems of {MAIN}, greedy")
    p.add_argument("--other_eval_problems", type=int, default=16, help="those of the other runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--sampler", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--matrix_scripts", default=",".join(RUNS), help="the runs of RUNS the matrix steps, comma-separated")
    p.add_argument("--runs", default=",".join([*RUNS, "trl", *GAP_RUNS]), help="which runs, comma-separated")
    args = p.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no model folder; write it with `python data_prep.py smollm2`.")
    unknown = set(args.matrix_scripts.split(",")) - set(RUNS)
    if unknown:
        raise SystemExit(f"--matrix_scripts {args.matrix_scripts}: no run named {', '.join(sorted(unknown))}; "
                         f"choose among {', '.join(RUNS)}.")
    train, test = gsm8k_files(Path(args.data))
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, native bf16: {native_bf16()}", flush=True)
    results = {}
    for name in args.runs.split(","):
        if name == "trl":
            results[name] = run_trl(args, train, work)
        elif name in GAP_RUNS:
            results[name] = run_gap(name, args, train, work)
        elif name == "matrix":
            results[name] = run_matrix(args, work)
        elif name == "two_process":
            results[name] = run_two_process(args, train, test, work)
        else:
            results[name] = run_ours(name, args, train, test, work)
        print(json.dumps({name: results[name]}), flush=True)
    print(table(results))
    flat = {"cpu_native_bf16": int(native_bf16())}
    for name, r in results.items():
        for key in ("before_acc", "before_acc_lo", "before_acc_hi", "after_acc", "after_acc_lo", "after_acc_hi",
                    "before_format", "after_format", "before_format_lo", "after_format_lo", "before_format_hi",
                    "after_format_hi", "before_gold_logprob", "after_gold_logprob", "before_gold_logprob_lo",
                    "before_gold_logprob_hi", "after_gold_logprob_lo", "after_gold_logprob_hi", "s_step",
                    *[f"s_{ph}" for ph in PHASES], "peak_rss_gb", "gap_mean", "gap_max", "grad_norm"):
            if key in r:
                flat[f"{name.replace('+', 'p')}_{key}"] = f"{r[key]:.5g}"
    if "matrix" in results:
        flat["matrix_steps"] = sum(r["ok"] for r in results["matrix"].values())
        flat["matrix_moved"] = sum(r.get("grad_norm", 0.0) > 0 for r in results["matrix"].values())
        flat["matrix_total"] = len(results["matrix"])
    if "trl" in results and "grpo" in results:  # the same step: rule rewards
        flat["grpo_step_vs_trl"] = round(results["trl"]["s_step"] / results["grpo"]["s_step"], 2)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in flat.items()))


if __name__ == "__main__":
    main()
