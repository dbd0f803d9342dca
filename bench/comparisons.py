"""What the learning comparisons in bench/ share: train each (set-up, seed) with the real script as a
subprocess, reuse a finished run, continue an interrupted one, and write mean ± sd over seeds.

A run folder RUNS_DIR/NAME is
- reused when it is finished: metrics.jsonl has the last step with an evaluation, and final/ exists;
- continued with --resume when it holds a checkpoint (a comparison stopped midway loses little);
- started over otherwise.
A folder made with other settings (its config.json disagrees with `settings`) stops the comparison
with one sentence instead of mixing budgets in one table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import read_jsonl  # noqa: E402


def finished(run: Path, total_steps: int) -> bool:
    return (run / "final").exists() and (run / "metrics.jsonl").exists() and any(
        m["step"] == total_steps and "eval/accuracy" in m for m in read_jsonl(run / "metrics.jsonl"))


def train(command: list[str], runs_dir: str, name: str, settings: dict, jobs: int) -> list[dict]:
    """`python COMMAND --output_dir RUNS_DIR --run_name NAME` unless that run is finished; its metrics.

    settings: flag -> value passed to the script and checked against an existing folder's config.json
    (it must hold total_steps)."""
    runs = REPO / runs_dir
    run = runs / name
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    differ = {k: (config[k], v) for k, v in settings.items() if k in config and config[k] != v}
    if differ:
        raise SystemExit(f"{run} was run with other settings (flag: (was, now) {differ}); "
                         "pass another --runs_dir or delete that folder.")
    if finished(run, settings["total_steps"]):
        print(f"{name}: reusing the finished run", flush=True)
        return read_jsonl(run / "metrics.jsonl")
    resume = any((run / "checkpoints").glob("step_*/trainer_state.json"))
    if run.exists() and not resume:
        shutil.rmtree(run)
    cmd = [sys.executable, *command, *[f"--{k}={v}" for k, v in settings.items()],
           "--output_dir", str(runs), "--run_name", name, *(["--resume"] if resume else [])]
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / f"{name}.log"
    print(f"{name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    t0 = time.time()
    # one thread per run and `jobs` runs at a time: tiny models use the cores better side by side
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else None
    with open(log, "a") as f:
        code = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not finished(run, settings["total_steps"]):
        raise SystemExit(f"{name} failed (exit {code}); end of {log}:\n{log.read_text()[-3000:]}")
    print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    return read_jsonl(run / "metrics.jsonl")


def train_all(jobs: int, runs: dict) -> dict:
    """runs: key -> train()'s keyword arguments but jobs; `jobs` at a time. Returns key -> metrics."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = {key: pool.submit(train, jobs=jobs, **kwargs) for key, kwargs in runs.items()}
    return {key: future.result() for key, future in futures.items()}


def mean_sd(values: list, digits: int = 3) -> str:
    """'mean ± sd' over seeds ('mean' for one seed, '-' for none); None values (not measured) are left out."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")
