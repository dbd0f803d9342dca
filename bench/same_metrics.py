"""Do two git revisions log the same metrics? Each algorithm script, run with its defaults.

    python bench/same_metrics.py --before main [--after HEAD] [--steps 20] [--toy data/toy]

Checks each revision out into a temporary worktree (`git worktree add --detach`) and runs
grpo_logprob.py, raft_pp.py, reinforce_rej.py and prime.py there with their defaults, except for
a short budget that is the same on both sides: --total_steps STEPS --eval_every 10 --eval_limit 50
--sampler hf (vLLM is not needed, and the hf sampler is deterministic on CPU), all on one toy task
(--toy; built once with this checkout's data_prep.py if it is missing). Then compares the two
metrics.jsonl files line by line, wall-clock timings and memory aside (keys starting with time/,
memory/ and tokens_per_second), and prints per script whether they are identical and, if not, the
first differing line and key.

Ends with one line: RESULT scripts=4 identical=N
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import read_jsonl  # noqa: E402

SCRIPTS = ("grpo_logprob.py", "raft_pp.py", "reinforce_rej.py", "prime.py")
NOT_COMPARED = ("time/", "memory/", "tokens_per_second")


def git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def read_metrics(path: Path) -> list[dict]:
    lines = read_jsonl(path)
    return [{k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)} for m in lines]


def first_difference(before: list[dict], after: list[dict]) -> str | None:
    """None if the metrics are identical, else where they first differ."""
    for line, (b, a) in enumerate(zip(before, after), 1):
        for key in sorted(set(b) | set(a)):
            if key not in a or key not in b or a[key] != b[key]:
                return f"line {line} (step {b.get('step')}) key {key}: {b.get(key, '<absent>')} -> {a.get(key, '<absent>')}"
    if len(before) != len(after):
        return f"{len(before)} lines before, {len(after)} after"
    return None


def run_script(checkout: Path, script: str, toy: Path, out: Path, steps: int) -> Path:
    cmd = [sys.executable, script, "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
           "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", Path(script).stem,
           "--total_steps", str(steps), "--eval_every", "10", "--eval_limit", "50", "--sampler", "hf"]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{script} at {checkout.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return out / Path(script).stem / "metrics.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare from (branch, tag or commit)")
    ap.add_argument("--after", default="HEAD", help="git revision to compare with")
    ap.add_argument("--steps", type=int, default=20, help="--total_steps of every run")
    ap.add_argument("--toy", default=str(REPO / "data" / "toy"), help="toy task folder (built here if missing)")
    args = ap.parse_args()
    toy = Path(args.toy).resolve()
    if not (toy / "model").is_dir():
        print(f"building the toy task in {toy} ...", flush=True)
        subprocess.run([sys.executable, "data_prep.py", "toy", "--out", str(toy)], cwd=REPO, check=True)
    revs = {side: git("rev-parse", "--verify", f"{rev}^{{commit}}") for side, rev in
            (("before", args.before), ("after", args.after))}
    print(f"before: {args.before} = {revs['before'][:12]}   after: {args.after} = {revs['after'][:12]}", flush=True)

    identical = 0
    with tempfile.TemporaryDirectory(prefix="same_metrics_") as tmp:
        tmp = Path(tmp)
        checkouts = {}
        try:
            for side, commit in revs.items():
                checkouts[side] = tmp / side
                git("worktree", "add", "--detach", str(checkouts[side]), commit)
            for script in SCRIPTS:
                metrics = {side: read_metrics(run_script(checkout, script, toy, tmp / f"runs_{side}", args.steps))
                           for side, checkout in checkouts.items()}
                where = first_difference(metrics["before"], metrics["after"])
                identical += where is None
                print(f"{script:18s} identical: {'yes' if where is None else 'no'}  "
                      f"({len(metrics['after'])} lines){'' if where is None else '  first difference: ' + where}",
                      flush=True)
        finally:
            for checkout in checkouts.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=REPO, capture_output=True)
    print(f"RESULT scripts={len(SCRIPTS)} identical={identical}")


if __name__ == "__main__":
    main()
