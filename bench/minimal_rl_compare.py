"""RAFT, RAFT++, Reinforce, Reinforce-rej and GRPO on the toy task: same warm start, same seeds, same
sample budget (Minimal-RL, arXiv 2504.11343, at toy scale).

    python bench/minimal_rl_compare.py                          # 5 algorithms x seeds 0 1 2, 100 steps x 8 prompts x 8 samples (~30 min, 2 cores)
    python bench/minimal_rl_compare.py --total_steps 2 --seeds 0 --eval_limit 20 --runs_dir /tmp/mrl  # smoke test

Each run is a subprocess of the real script with the toy defaults and the shared budget flags below
(prompts per step x samples per prompt x steps, completion length, evaluation) and the same update
schedule: --num_iterations optimizer steps on each rollout batch, old log-probs recomputed after
sampling (with a single on-policy step RAFT++'s ratio is 1 and it is exactly RAFT). GRPO runs with
`--reward correct=1` (the same signal as the others), `--loss_type seq-mean-token-mean` (the others'
aggregation) and `--beta 1e-9`: grpo_logprob.py measures the KL to the starting model only when it
loads it, and a weight of 1e-9 leaves the update unchanged. Runs go to --runs_dir/ALGO_sSEED; a finished
run is reused, an unfinished one is resumed from its checkpoint (or restarted without one), so the
script can be stopped and started again (bench/comparisons.py).

Writes --results_dir/minimal_rl.md (table) and minimal_rl.png (train reward and entropy against step,
one line per algorithm, mean over seeds). The "reward" compared is the fraction of correct samples:
the rewards themselves differ in scale (+-1 for RAFT/Reinforce, 0/1 for GRPO; +-1 reward = 2 acc - 1).
Ends with one line: RESULT key=value ...
"""

import argparse
import statistics
from pathlib import Path

from comparisons import REPO, mean_sd, train_all

ALGOS = {  # name -> (run folder prefix, command after the interpreter)
    "RAFT": ("raft", ["raft_pp.py", "--algo", "raft"]),
    "RAFT++": ("raftpp", ["raft_pp.py", "--algo", "raft++"]),
    "Reinforce": ("reinforce", ["reinforce_rej.py", "--algo", "reinforce"]),
    "Reinforce-rej": ("reinforce_rej", ["reinforce_rej.py", "--algo", "reinforce_rej"]),
    "GRPO": ("grpo", ["grpo_logprob.py", "--reward", "correct=1", "--loss_type", "seq-mean-token-mean",
                      "--beta", "1e-9"]),
}
BUDGET = ("total_steps", "prompts_per_step", "num_generations", "max_completion_length", "num_iterations",
          "eval_every", "eval_limit")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one run per algorithm each")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS), help="algorithms to run")
    p.add_argument("--total_steps", type=int, default=100, help="rollout steps per run")
    p.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step")
    p.add_argument("--num_generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--max_completion_length", type=int, default=64, help="completion tokens")
    p.add_argument("--num_iterations", type=int, default=2,
                   help="optimizer steps per rollout batch, the same for all (1: RAFT and RAFT++ coincide)")
    p.add_argument("--eval_every", type=int, default=50, help="evaluate every k steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one thread when > 1)")
    p.add_argument("--eval_limit", type=int, default=500, help="test problems per evaluation (0: all)")
    p.add_argument("--sampler", default="hf", help="vllm, hf or auto, for every run (hf: no engine start-up per run)")
    p.add_argument("--window", type=int, default=20, help="last steps averaged for the train metrics")
    p.add_argument("--runs_dir", default="runs/minimal_rl", help="run folders (reused when complete)")
    p.add_argument("--results_dir", default="bench/results", help="where minimal_rl.md and minimal_rl.png go")
    return p


def summarize(metrics: list[dict], window: int) -> dict:
    """One run's numbers: test accuracy at step 0 and at the end, and train metrics over the last steps."""
    evals = {m["step"]: m["eval/accuracy"] for m in metrics if "eval/accuracy" in m}
    train = [m for m in metrics if m["step"] > 0]
    last = train[-window:]
    mean = lambda key: statistics.fmean(m[key] for m in last if m.get(key) is not None)  # noqa: E731
    kl = mean("kl")
    start, final = evals[0], evals[max(evals)]
    return {"acc0": start, "acc": final, "train_acc": mean("train/accuracy"), "entropy": mean("entropy"), "kl": kl,
            "kl_eff": (final - start) / kl if kl > 0 else float("nan"), "evals": evals}


def curve(runs: list[list[dict]], key: str, smooth: int):
    """Mean over seeds of a per-step metric, as a trailing moving average of `smooth` steps."""
    steps = sorted({m["step"] for r in runs for m in r if m["step"] > 0 and m.get(key) is not None})
    per_step = [statistics.fmean(m[key] for r in runs for m in r if m["step"] == s and m.get(key) is not None)
                for s in steps]
    return steps, [statistics.fmean(per_step[max(0, i - smooth + 1):i + 1]) for i in range(len(per_step))]


def plot(all_metrics: dict[str, list[list[dict]]], path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in all_metrics.items():
        line, = ax_r.plot(*curve(runs, "train/accuracy", smooth), label=name)
        ax_e.plot(*curve(runs, "entropy", smooth), label=name, color=line.get_color())
    ax_r.set(xlabel="step", ylabel="train reward (fraction correct)", title=f"reward ({smooth}-step moving average)")
    ax_e.set(xlabel="step", ylabel="entropy (nats/token)", title="policy entropy on its samples")
    ax_r.legend()
    seeds = len(next(iter(all_metrics.values())))
    fig.suptitle(f"toy task, mean over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parser().parse_args()
    done = train_all(args.jobs, {
        (name, seed): dict(command=[*ALGOS[name][1], "--log_rollouts_every", "0"], runs_dir=args.runs_dir,
                           name=f"{ALGOS[name][0]}_s{seed}",
                           settings=dict(seed=seed, sampler=args.sampler, **{k: getattr(args, k) for k in BUDGET}))
        for name in args.algos for seed in args.seeds})
    all_metrics = {name: [done[name, seed] for seed in args.seeds] for name in args.algos}

    results = REPO / args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    plot(all_metrics, results / "minimal_rl.png", smooth=max(1, min(10, args.total_steps // 10)))
    changed = {k: v for k, v in vars(args).items() if v != parser().get_default(k)}
    command = "python bench/minimal_rl_compare.py" + "".join(
        f" --{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in changed.items())
    lines = [
        "# Minimal-RL on the toy task",
        "",
        f"Same warm start (`data/toy/model`), seeds {args.seeds}, {args.total_steps} steps x {args.prompts_per_step} "
        f"prompts x {args.num_generations} samples (max {args.max_completion_length} tokens) and "
        f"{args.num_iterations} optimizer steps per rollout batch for every algorithm; "
        f"test accuracy on {args.eval_limit or 'all'} test problems at temperature 1, one sample each. "
        f"Train columns: mean over the last {args.window} steps. KL: mean k3 KL per token to the starting model on "
        "the step's samples. KL efficiency: (final test accuracy - step-0 test accuracy) / KL. Mean ± sd over seeds.",
        "",
        f"Regenerate: `{command}` (reuses finished runs in `{args.runs_dir}`).",
        "",
        "| algorithm | test acc step 0 | test acc final | train reward (frac. correct) | entropy | KL to start "
        "| KL efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    result = {"steps": args.total_steps, "seeds": len(args.seeds)}
    summaries = {}
    for name, runs in all_metrics.items():
        s = [summarize(r, args.window) for r in runs]
        summaries[name] = s
        digits = {"kl": 4, "kl_eff": 1}
        lines.append(f"| {name} | " + " | ".join(mean_sd([x[k] for x in s], digits.get(k, 3))
                                                 for k in ("acc0", "acc", "train_acc", "entropy", "kl", "kl_eff")) + " |")
        mean = lambda k: statistics.fmean(x[k] for x in s)  # noqa: E731
        slug = ALGOS[name][0]
        result.update({f"{slug}_acc": round(mean("acc"), 4),
                       f"{slug}_acc_sd": round(statistics.stdev([x["acc"] for x in s]) if len(s) > 1 else 0.0, 4),
                       f"{slug}_entropy": round(mean("entropy"), 4), f"{slug}_kl": round(mean("kl"), 5),
                       f"{slug}_kl_eff": round(mean("kl_eff"), 2)})
    eval_steps = sorted(set.intersection(*(set(x["evals"]) for s in summaries.values() for x in s)))
    lines += ["", "Test accuracy at each evaluation (mean over seeds):", "",
              "| algorithm | " + " | ".join(f"step {k}" for k in eval_steps) + " |",
              "|---|" + "---|" * len(eval_steps)]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(f"{statistics.fmean(x['evals'][k] for x in s):.3f}"
                                                 for k in eval_steps) + " |")
    lines += ["", "![reward and entropy against step](minimal_rl.png)", ""]
    (results / "minimal_rl.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
