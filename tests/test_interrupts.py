"""Nothing lost, nothing left behind: a run killed at any moment (SIGKILL, inside a checkpoint write too)
and resumed equals an uninterrupted run; Ctrl-C (SIGINT) and SIGTERM end a run with one line and exit
code 130 / 143, and no child process outlives it, as after an exception in a reward; --resume on a
folder without a checkpoint starts over."""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

import common
import grading
from common import read_jsonl
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402

STEPS = 6  # every launch below adds a step or two: the fourth still has one left when stopped


@pytest.fixture(scope="module")
def graded_by_math_verify(toy, tmp_path_factory):
    """The toy training rows with the gold answer N written `N+0`: the fast path cannot decide it, so
    every answer goes to Math-Verify's worker processes (children of the run to count), graded right."""
    path = tmp_path_factory.mktemp("mv") / "train.jsonl"
    rows = [json.loads(line) for line in (toy / "train.jsonl").read_text().splitlines()[:200]]
    path.write_text("".join(json.dumps({**r, "answer": f"{r['answer']}+0"}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def straight(toy, graded_by_math_verify, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("straight")
    run_script(chaos.run_command(toy, out, "straight", STEPS, graded_by_math_verify)[1:])
    return out / "straight"


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (is_running also checks the creation time: a reused pid is not them)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def interrupt(proc: subprocess.Popen, run, before: int, signum: int, delay: float = 0.0):
    """Send `signum` (SIGKILL: to the whole process group, as a scheduler does) `delay` seconds after the run
    logged a step beyond `before`. Returns its stdout, its stderr, the children it had then, and how many of
    them were Math-Verify's grader workers."""
    while proc.poll() is None and max(chaos.logged_steps(run), default=-1) <= before:
        time.sleep(0.05)
    time.sleep(delay)
    children = descendants(proc.pid)
    workers = sum("spawn_main" in " ".join(p.cmdline()) for p in alive(children))
    if signum == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return stdout, stderr, children, workers


def test_a_run_killed_twice_and_interrupted_twice_resumes_to_the_straight_run(toy, graded_by_math_verify, straight,
                                                                               tmp_path):
    """One run, five launches of the same command:
    1. SIGKILL while the first checkpoint is being written: the temporary folder is left half-written,
       no checkpoint is complete (and steps 0 and 1 were logged);
    2. --resume starts over from step 0 and says so in one line; Ctrl-C (SIGINT) after a new step;
    3. --resume; SIGKILL at a random moment after a new step;
    4. --resume; SIGTERM after a new step;
    5. --resume runs to the end.
    SIGINT and SIGTERM end the run with one line (the step reached, --resume), exit code 130 / 143 and no
    traceback, and none of the child processes it had (Math-Verify's grader workers) is left. At the end,
    metrics (timings aside), rollouts and evaluations equal the uninterrupted run's, each step once."""
    cmd = chaos.run_command(toy, tmp_path, "chaos", STEPS, graded_by_math_verify)
    run, log = tmp_path / "chaos", tmp_path / "chaos.log"
    proc = chaos.launch(cmd, log)
    assert chaos.kill_in_checkpoint(proc, run, step=1), log.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp_step_1").is_dir() and common.complete_checkpoints(run) == []
    assert chaos.logged_steps(run) == [0, 1]  # step 1 is logged before its checkpoint is written

    for launch, (signum, code) in enumerate([(signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL),
                                             (signal.SIGTERM, 143)], 2):
        before = max(chaos.logged_steps(run))
        proc = subprocess.Popen(cmd + ["--resume"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        delay = random.Random(launch).uniform(0, 0.5) if signum == signal.SIGKILL else 0.0
        stdout, stderr, children, workers = interrupt(proc, run, before, signum, delay)
        assert proc.returncode == code, stderr[-3000:]
        if launch == 2:
            assert ("--resume: " + str(run) + " has no checkpoint yet; starting from step 0 (discarding the 2 logged "
                    "step(s)).") in stdout.splitlines()
        if signum == signal.SIGKILL:
            continue
        assert workers >= grading._MV_WORKERS, stderr[-3000:]  # Math-Verify's pool was running
        assert alive(children) == [], alive(children)
        name = signal.Signals(signum).name
        last = stderr.strip().splitlines()[-1]
        step = max(chaos.logged_steps(run))
        assert re.fullmatch(rf"{name}: stopped after step {step}(; run the same command with --resume to continue "
                            rf"from the checkpoint of step \d in {re.escape(str(run))}|, before the first checkpoint; "
                            r"the same command with --resume starts over from step 0)\.", last), last
        assert "Traceback" not in stderr

    assert chaos.finish(cmd, run, log) == 1
    assert chaos.differences(straight, run, STEPS) == []
    assert not list((run / "checkpoints").glob(".tmp_*"))  # the half-written folder was cleaned up


def still_there(pid: int, created: float) -> bool:
    """The process `pid` created at `created` is running (not a later process that got the same pid)."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


HARNESS = """
import sys
import psutil
import common, grpo_logprob

real = grpo_logprob.score_completions

def crashing(rows, texts, *args, **kwargs):
    real(rows, texts)  # the answers went to Math-Verify: its workers are running now
    print("CHILDREN", *[f"{p.pid}:{p.create_time()}" for p in psutil.Process().children(recursive=True)], flush=True)
    raise RuntimeError("a reward function crashed")

grpo_logprob.score_completions = crashing
sys.argv = ["grpo_logprob.py", *sys.argv[1:]]
common.run_main(grpo_logprob.main)
"""


def test_an_exception_in_a_reward_leaves_no_child_behind(toy, graded_by_math_verify, tmp_path):
    """A reward that raises during a step: the traceback is shown (a bug, not a user's mistake), the exit
    code is 1, and every child process the run had (the grader workers) is gone when it has exited."""
    cmd = chaos.run_command(toy, tmp_path, "crash", STEPS, graded_by_math_verify)
    proc = subprocess.run([sys.executable, "-c", HARNESS, *cmd[2:]], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "RuntimeError: a reward function crashed" in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("CHILDREN"))
    children = [tuple(map(float, child.split(":"))) for child in line.split()[1:]]  # (pid, creation time)
    assert len(children) >= grading._MV_WORKERS
    assert [pid for pid, created in children if still_there(int(pid), created)] == []


# --- the run folder on resume ------------------------------------------------------------------
def test_a_folder_without_checkpoint_is_started_over(tmp_path, capsys):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    args = common.RunArgs(output_dir=str(tmp_path), run_name="r")
    folder = tmp_path / "r"
    run = common.Run(args, acc)  # a start that failed before logging anything ...
    assert common.Run(args, acc).dir == folder  # ... does not block the next start
    run.log(0, {"eval/accuracy": 0.5})
    run.log(1, {"loss": 1.0})
    run.log_rollouts(1, [{"completion": "x"}])
    run.save_eval(0, [{"id": "a"}])
    with pytest.raises(SystemExit) as stop:  # a logged step: a new start needs --resume
        common.Run(args, acc)
    assert str(stop.value) == (f"{folder} already holds a run (logged up to step 1, no checkpoint yet); pass --resume "
                               "to start it over from step 0, or another --run_name.")
    capsys.readouterr()
    resumed = common.Run(dataclasses.replace(args, resume=True), acc, resume=True)
    assert resumed.load_latest_checkpoint() == {"step": 0}
    assert capsys.readouterr().out == (f"--resume: {folder} has no checkpoint yet; starting from step 0 (discarding "
                                       "the 2 logged step(s)).\n")
    assert not (folder / "metrics.jsonl").exists() and not (folder / "rollouts.jsonl").exists()
    assert list((folder / "eval").iterdir()) == []


def test_resume_trims_a_line_cut_short_by_a_kill(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    import torch

    model = torch.nn.Linear(2, 2)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run = common.Run(common.RunArgs(output_dir=str(tmp_path), run_name="r"), acc)
    run.log(0, {"a": 1})
    run.log_rollouts(1, [{"completion": "x"}])
    run.log(1, {"a": 2})
    run.save_checkpoint(1)
    run.log_rollouts(2, [{"completion": "y"}])
    with open(run.dir / "rollouts.jsonl", "a") as f:
        f.write('{"step": 2, "compl')  # the kill came in the middle of this line
    (run.dir / "checkpoints" / ".tmp_step_2").mkdir()  # and a checkpoint write it cut short
    assert common.Run(common.RunArgs(output_dir=str(tmp_path), run_name="r", resume=True), acc, resume=True).load_latest_checkpoint()["step"] == 1
    assert [r["step"] for r in read_jsonl(run.dir / "rollouts.jsonl")] == [1]
    assert [m["step"] for m in read_jsonl(run.dir / "metrics.jsonl")] == [0, 1]
