"""PRIME against outcome-only RLOO on the toy task: same script, warm start, seeds and sample budget.

    python bench/prime_compare.py                      # 3 seeds x 2 variants x 100 toy steps, 2 runs at a time (~20 min, 2 cores)
    python bench/prime_compare.py --total_steps 3 --runs_dir /tmp/pc --extra "--eval_limit 20"   # plumbing check

Runs `prime.py` (defaults = the toy settings) for each seed, once as PRIME and once with
`--process_reward_coef 0` (outcome-only RLOO: no PRM; the prompt filter, buffer, PPO mini-batches
and whitening stay the same), as subprocesses. A finished run folder is reused; one with checkpoints but
unfinished is continued with --resume (bench/comparisons.py). Then writes
bench/results/prime.md (table) and bench/results/prime.png (test accuracy and PRM accuracy against
the step) and ends with one line: RESULT key=value ...
"""

import argparse
import shlex
import statistics

from comparisons import REPO, mean_sd, train_all

VARIANTS = {"prime": [], "rloo": ["--process_reward_coef", "0"]}


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one run per seed and variant")
    ap.add_argument("--total_steps", type=int, default=100, help="update steps of every run")
    ap.add_argument("--runs_dir", default="runs/prime_compare", help="where the run folders go (reused when finished)")
    ap.add_argument("--extra", default="--sampler hf", help="more prime.py flags for every run (hf: no engine start-up per run)")
    ap.add_argument("--out", default="bench/results", help="folder of prime.md and prime.png")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one thread when > 1)")
    args = ap.parse_args()

    done = train_all(args.jobs, {
        (variant, seed): dict(command=["prime.py", *VARIANTS[variant], *shlex.split(args.extra)],
                              runs_dir=args.runs_dir, name=f"{variant}_s{seed}",
                              settings=dict(seed=seed, total_steps=args.total_steps))
        for variant in VARIANTS for seed in args.seeds})
    runs = {v: {s: done[v, s] for s in args.seeds} for v in VARIANTS}
    eval_steps = sorted({m["step"] for ms in runs["prime"].values() for m in ms if "eval/accuracy" in m})

    def evals(variant, step):
        return [next((m["eval/accuracy"] for m in ms if m["step"] == step and "eval/accuracy" in m), None)
                for ms in runs[variant].values()]

    def per_step(variant, key):  # {seed: [(step, value)]}
        return {s: [(m["step"], m[key]) for m in ms if m.get(key) is not None] for s, ms in runs[variant].items()}

    def late_mean(variant, key, last=20):
        vals = [v for pts in per_step(variant, key).values() for _, v in pts[-last:]]
        return statistics.mean(vals) if vals else None

    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# PRIME vs outcome-only RLOO on the toy task ({len(args.seeds)} seeds, {args.total_steps} steps)", "",
             f"Test accuracy ({runs['prime'][args.seeds[0]][0]['eval/num_problems']} test problems, temperature 1, "
             "mean ± std over seeds) at each evaluation:", "",
             "| variant | " + " | ".join(f"step {s}" for s in eval_steps) + " | PRM accuracy (last 20 steps) "
             "| kept-prompt fraction | sampled groups |",
             "|---|" + "---|" * (len(eval_steps) + 3)]
    for v in VARIANTS:
        sampled = [sum(m.get("filter/sampled_groups", 0) for m in ms) for ms in runs[v].values()]
        prm_acc = late_mean(v, "prm/accuracy")
        kept = late_mean(v, "filter/kept_frac", last=10**9)
        lines.append(f"| {v} | " + " | ".join(mean_sd(evals(v, s)) for s in eval_steps)
                     + f" | {'-' if prm_acc is None else f'{prm_acc:.3f}'} | {kept:.3f} | {statistics.mean(sampled):.0f} |")
    extra = f' --extra "{args.extra}"' if args.extra else ""
    lines += ["", "PRM accuracy: within groups holding correct and incorrect samples, the fraction of (correct, "
              "incorrect) pairs whose implicit sequence reward ranks the correct one higher (ties 1/2), on the "
              "step's training batch, scored before that step's PRM update. RLOO trains no PRM.", "",
              f"Regenerate: `python bench/prime_compare.py --seeds {' '.join(map(str, args.seeds))} "
              f"--total_steps {args.total_steps} --runs_dir {args.runs_dir}{extra}`", ""]
    (out / "prime.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for v, color in zip(VARIANTS, ("tab:red", "tab:blue")):
        accs = [evals(v, s) for s in eval_steps]
        means = [statistics.mean([a for a in acc if a is not None]) for acc in accs]
        ax1.plot(eval_steps, means, "o-", color=color, label=f"{v} (mean of {len(args.seeds)} seeds)")
        ax1.fill_between(eval_steps, [min(a for a in acc if a is not None) for acc in accs],
                         [max(a for a in acc if a is not None) for acc in accs], color=color, alpha=0.15)
        for s, pts in per_step(v, "prm/accuracy").items():
            if pts:
                ax2.plot([p for p, _ in pts], smooth([a for _, a in pts], 10), color=color, alpha=0.7,
                         label=f"{v} seed {s}")
    ax1.set(xlabel="step", ylabel="test accuracy (T=1)", title="test accuracy")
    ax2.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax2.set(xlabel="step", ylabel="PRM pair accuracy (10-step mean)", title="implicit PRM accuracy (PRIME)")
    ax1.legend(), ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "prime.png", dpi=120)
    print("\n".join(lines))

    final = {v: statistics.mean([a for a in evals(v, eval_steps[-1]) if a is not None]) for v in VARIANTS}
    prm_acc = late_mean("prime", "prm/accuracy")
    print(f"RESULT prime_final_acc={final['prime']:.3f} rloo_final_acc={final['rloo']:.3f} "
          f"delta={final['prime'] - final['rloo']:+.3f} prime_prm_acc={prm_acc if prm_acc is not None else float('nan'):.3f} "
          f"start_acc={statistics.mean([a for a in evals('prime', eval_steps[0]) if a is not None]):.3f} "
          f"seeds={len(args.seeds)} steps={args.total_steps}")


if __name__ == "__main__":
    main()
