"""Kill a GRPO run at any moment (SIGKILL), resume it with --resume until it ends, and compare what it
wrote with an uninterrupted run's: metrics.jsonl (timings and memory aside), rollouts.jsonl and eval/.

    python bench/chaos.py                       # 20 trials on a tiny toy task built in a temporary folder
    python bench/chaos.py --trials 4 --toy data/toy

The run is grpo_logprob.py on the toy task with --sampler hf, a checkpoint after every step and small
batches (run_command). Trials alternate two kinds of kill, each a SIGKILL of the run's process group:
- time: at a moment drawn uniformly from the uninterrupted run's wall time, counted from the launch, so
  a kill lands while Python starts, while the model loads, in a step, in a checkpoint write or at the end
  (a run that ends before its moment is started over with a new draw: late_draws counts those);
- checkpoint: while the checkpoint of a random step is being written, i.e. while its temporary folder
  checkpoints/.tmp_step_N exists (polled every 0.2 ms; writing the toy model's takes tens of ms). After
  the kill, the half-written folder is there and step_N is not: --resume must pass over it.
Then the same command with --resume runs until it exits 0. When the kill came before the run folder
existed there is nothing to resume (and --resume refuses a folder that does not exist): the command
runs again without it. A trial is identical when metrics.jsonl (TIMING_KEYS aside), rollouts.jsonl and
every eval/ file equal the uninterrupted run's, and each step is logged exactly once.

Prints one line per trial and ends with
    RESULT trials=20 identical=20 in_checkpoint_write=.. before_run_folder=.. before_first_checkpoint=.. ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import read_jsonl  # noqa: E402
TIMING_KEYS = ("time/", "tokens_per_second", "memory/")  # wall-clock and memory: differ between any two runs
TOY_FLAGS = ["--train_size", "1500", "--test_size", "48", "--sft_steps", "150", "--hidden_size", "64",
             "--num_layers", "2", "--vocab_size", "320", "--sft_batch_size", "32"]


def run_command(toy: Path, out: Path, name: str, total_steps: int = 6, train_file: Path | None = None) -> list[str]:
    """The GRPO run every trial kills and resumes: hf sampler, a checkpoint every step, rollouts logged
    every step, an evaluation every 3 steps."""
    return [sys.executable, "grpo_logprob.py", "--model", str(toy / "model"),
            "--train_file", str(train_file or toy / "train.jsonl"), "--test_file", str(toy / "test.jsonl"),
            "--output_dir", str(out), "--run_name", name, "--sampler", "hf", "--total_steps", str(total_steps),
            "--prompts_per_step", "4", "--num_generations", "4", "--max_completion_length", "32",
            "--eval_limit", "8", "--eval_every", "3", "--save_every", "1", "--log_rollouts_every", "1"]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a run in a process group of its own (a kill reaches its children too), output to `log`."""
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group, as a scheduler's pre-emption does, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_at_time(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL `seconds` after now unless the run ended before; True if it was killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        sigkill(proc)
        return True


def kill_in_checkpoint(proc: subprocess.Popen, run: Path, step: int, poll: float = 0.0002) -> bool:
    """SIGKILL while the checkpoint of `step` is being written (its temporary folder exists). True if the
    kill landed inside the write: the temporary folder is left and the checkpoint was never completed."""
    tmp, final = run / "checkpoints" / f".tmp_step_{step}", run / "checkpoints" / f"step_{step}"
    while proc.poll() is None:
        if tmp.is_dir() or final.is_dir():  # final: the whole write fell between two polls
            sigkill(proc)
            break
        time.sleep(poll)
    return tmp.is_dir() and not (final / "trainer_state.json").exists()


def kill_after_step(proc: subprocess.Popen, run: Path, step: int, delay: float) -> bool:
    """SIGKILL `delay` seconds after the run logged `step`; True if it was still running then."""
    while proc.poll() is None and step not in logged_steps(run):
        time.sleep(0.05)
    return proc.poll() is None and kill_at_time(proc, delay)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def where_killed(run: Path) -> str:
    """What the kill interrupted, from what it left behind."""
    ckpts = run / "checkpoints"
    if not run.exists():
        return "before_run_folder"
    if list(ckpts.glob(".tmp_step_*")):
        return "in_checkpoint_write"
    if not list(ckpts.glob("step_*/trainer_state.json")):
        return "before_first_checkpoint"
    if (run / "final").exists():
        return "after_final"
    return "in_a_step"


def finish(cmd: list[str], run: Path, log: Path, attempts: int = 3) -> int:
    """Run the command with --resume (without it if the run folder does not exist) until it exits 0;
    returns how many launches that took."""
    for attempt in range(1, attempts + 1):
        with open(log, "a") as f:
            code = subprocess.call(cmd + (["--resume"] if run.exists() else []), cwd=REPO, stdout=f,
                                   stderr=subprocess.STDOUT)
        if code == 0:
            return attempt
    raise SystemExit(f"{run}: the resumed run failed {attempts} times (exit {code}); see {log}.")


def differences(straight: Path, run: Path, total_steps: int) -> list[str]:
    """What `run` wrote differently from the uninterrupted `straight` (empty: identical)."""
    def metrics(folder):
        return [{k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)} for m in read_jsonl(folder / "metrics.jsonl")]

    out = []
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl")]
    if steps != list(range(total_steps + 1)):
        out.append(f"metrics.jsonl steps {steps}, expected 0..{total_steps} once each")
    elif metrics(run) != metrics(straight):
        diff = [m["step"] for m, s in zip(metrics(run), metrics(straight)) if m != s]
        out.append(f"metrics.jsonl differs at steps {diff}")
    if read_jsonl(run / "rollouts.jsonl") != read_jsonl(straight / "rollouts.jsonl"):
        out.append("rollouts.jsonl differs")
    names = sorted(p.name for p in (straight / "eval").glob("*.jsonl"))
    if sorted(p.name for p in (run / "eval").glob("*.jsonl")) != names:
        out.append(f"eval/ holds {sorted(p.name for p in (run / 'eval').glob('*.jsonl'))}, expected {names}")
    out += [f"eval/{n} differs" for n in names
            if (run / "eval" / n).exists() and read_jsonl(run / "eval" / n) != read_jsonl(straight / "eval" / n)]
    if not (run / "final" / "model.safetensors").exists():
        out.append("no final/ model")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20, help="runs killed once each, then resumed until done")
    p.add_argument("--total_steps", type=int, default=6, help="steps of each run")
    p.add_argument("--toy", default="data/toy", help="toy task folder (train.jsonl, test.jsonl, model/); built "
                                                      "in a temporary folder when absent")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos_"))
    toy = REPO / args.toy
    if not (toy / "model").exists():
        toy = work / "toy"
        print(f"{args.toy} has no model: building a tiny toy task in {toy}", flush=True)
        subprocess.run([sys.executable, "data_prep.py", "toy", "--out", str(toy), *TOY_FLAGS], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    t0 = time.time()
    subprocess.run(run_command(toy, work, "straight", args.total_steps), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    straight_seconds = time.time() - t0
    print(f"uninterrupted run: {straight_seconds:.1f} s, {args.total_steps} steps", flush=True)

    counts, identical, launches, kills, late_draws = {}, 0, 0, 0, 0
    for trial in range(args.trials):
        name = f"trial_{trial:02d}"
        run, log = work / name, work / f"{name}.log"
        cmd = run_command(toy, work, name, args.total_steps)
        if trial % 2:
            step = rng.randint(1, args.total_steps)
            killed = kill_in_checkpoint(launch(cmd, log), run, step)
            how = f"in the write of checkpoint {step}" + ("" if killed else " (missed: the write ended first)")
        else:
            for _ in range(3):  # a run a little faster than the uninterrupted one may end first: draw again
                moment = rng.uniform(0, straight_seconds)
                killed = kill_at_time(launch(cmd, log), moment)
                if killed:
                    break
                late_draws += 1
                shutil.rmtree(run)
            how = f"at {moment:.1f} s" + ("" if killed else " (the run had ended, three times)")
        place = where_killed(run) if killed else "not_killed"
        counts[place] = counts.get(place, 0) + 1
        kills += killed
        launches += finish(cmd, run, log)
        diffs = differences(work / "straight", run, args.total_steps)
        identical += not diffs
        print(f"trial {trial:2d}: killed {how} [{place}]; resumed -> {'identical' if not diffs else '; '.join(diffs)}",
              flush=True)
        if not diffs:
            shutil.rmtree(run)
            log.unlink()
    seconds = time.time() - t0
    places = " ".join(f"{k}={counts.get(k, 0)}" for k in ("before_run_folder", "before_first_checkpoint", "in_a_step",
                                                          "in_checkpoint_write", "after_final", "not_killed"))
    print(f"RESULT trials={args.trials} identical={identical} kills={kills} {places} late_draws={late_draws} "
          f"resume_launches={launches} straight_seconds={straight_seconds:.1f} seconds={seconds:.0f}")
    if identical == args.trials:
        shutil.rmtree(work)
    else:
        print(f"the differing runs and their logs are in {work}")


if __name__ == "__main__":
    main()
