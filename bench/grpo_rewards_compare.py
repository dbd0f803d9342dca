"""GRPO on the toy task with four reward set-ups, same warm start, seed and budget.

    python bench/grpo_rewards_compare.py                 # 4 set-ups x 3 seeds, 2 at a time (about 25 min on 2 cores)
    python bench/grpo_rewards_compare.py --seeds 0       # one seed

Runs grpo_logprob.py once per set-up and seed (runs/bench_rewards/<setup>_s<seed>; a finished run
is reused, see bench/comparisons.py), then writes bench/results/grpo_rewards.md and prints one
RESULT line. The log-prob set-ups never see a correctness check: their reward is
log p(reference answer | own reasoning).
"""

import argparse
import statistics

from comparisons import REPO, mean_sd, train_all

SETUPS = {  # name -> grpo_logprob.py flags
    "rule": ["--reward", "correct=1,format=0.1"],
    "logprob_masked": ["--reward", "logprob=1", "--reasoning_only_loss", "on"],
    "logprob_unmasked": ["--reward", "logprob=1", "--reasoning_only_loss", "off"],
    "hybrid": ["--reward", "correct=1,logprob=1", "--reward_norm", "zscore"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--total_steps", type=int, default=150)
    p.add_argument("--prompts_per_step", type=int, default=8, help="x 8 samples each")
    p.add_argument("--sampler", default="hf", help="hf: no engine start-up per run, one thread per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--output_dir", default="runs/bench_rewards")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more grpo_logprob.py flags for every run")
    args = p.parse_args()

    done = train_all(args.jobs, {
        (name, seed): dict(command=["grpo_logprob.py", *SETUPS[name], "--save_every", "0", *args.extra],
                           runs_dir=args.output_dir, name=f"{name}_s{seed}",
                           settings=dict(seed=seed, total_steps=args.total_steps, prompts_per_step=args.prompts_per_step,
                                         sampler=args.sampler))
        for name in args.setups for seed in args.seeds})
    rows, result = [], {}
    for name in args.setups:
        runs = [done[name, seed] for seed in args.seeds]
        evals = [[m for m in ms if "eval/accuracy" in m] for ms in runs]
        first, last = [e[0] for e in evals], [e[-1] for e in evals]
        acc0, acc = [m["eval/accuracy"] for m in first], [m["eval/accuracy"] for m in last]
        rows.append(f"| {name} | `{' '.join(SETUPS[name])}` | {mean_sd(acc0)} | {mean_sd(acc)} | "
                    f"{mean_sd([m['eval/format_rate'] for m in last])} | {mean_sd([m['eval/gold_logprob'] for m in first], 2)} | "
                    f"{mean_sd([m['eval/gold_logprob'] for m in last], 2)} |")
        result[f"{name}_acc"] = round(statistics.fmean(acc), 3)
        result[f"{name}_gain"] = round(statistics.fmean(a - b for a, b in zip(acc, acc0)), 3)
    table = "\n".join([
        f"Toy task, GRPO, {args.total_steps} steps x {args.prompts_per_step} prompts x 8 samples, seeds {args.seeds}, "
        "test accuracy at temperature 1 (500 test problems, one sample each); mean ± sd over seeds.",
        "",
        "| reward | flags | test acc. step 0 | test acc. final | format rate final | gold log-prob step 0 | gold log-prob final |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    out = REPO / "bench" / "results" / "grpo_rewards.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
