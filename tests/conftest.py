"""Shared fixtures: one tiny toy task + model per test session, built by the real data_prep CLI."""

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Keep child processes (scripts under test, vLLM) on the CPU threads we have, deterministic.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")

TINY_TOY = ["--train_size", "1500", "--test_size", "48", "--sft_steps", "150", "--hidden_size", "64",
            "--num_layers", "2", "--vocab_size", "320", "--sft_batch_size", "32"]


HANG = 1800  # seconds: a bound against hangs only, ten times what the slowest script run here takes


def run_script(args: list[str], timeout: int = HANG, env: dict | None = None, launcher: list[str] | None = None):
    """Run a repo script as a user would; fail the test with its output on a non-zero exit."""
    cmd = (launcher or [sys.executable]) + args
    # Own process group: on a timeout, kill the launcher *and* its workers (torchrun's ranks).
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s\n--- stdout ---\n{stdout[-4000:]}"
                                 f"\n--- stderr ---\n{stderr[-8000:]}") from None
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    """`torchrun --nproc_per_node 2` on a port free right now (a fixed port can meet a leftover process)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def answers_match(pred: str | None, gold: str, timeout: float = 60.0) -> bool:
    """One (pred, gold) pair through the grader's entry point, grading.answers_match_many. The timeout bounds a
    hang, not the speed: Math-Verify needs under 0.5 s of CPU for any case here, so 60 s hold on a machine ten
    times slower and busy."""
    import grading

    return grading.answers_match_many([(pred, gold)], timeout)[0][0]


def parse_number(s: str) -> float | None:
    """The value the grader's fast path reads from a plain number (int, decimal, a/b, \\frac{a}{b},
    4.5e33, 4.5\\times10^{33}, 50\\% -> 50.0) as a finite float, or None."""
    import grading

    value = grading._parse_fraction(grading.normalize_answer(s))
    if value is None:
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """A tiny toy task (train.jsonl, test.jsonl) and warm-started model (model/)."""
    out = tmp_path_factory.mktemp("toy")
    run_script(["data_prep.py", "toy", "--out", str(out), *TINY_TOY])
    return out


class Hang(BaseException):
    """A call ran past its time limit. A BaseException, so that no `except Exception` in the code under test
    swallows it and waits on."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread after `seconds` (SIGALRM: Python loops, regexes and waits see it)."""
    def on_alarm(signum, frame):
        raise Hang(f"the call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def grader_workers() -> list[psutil.Process]:
    """This process's Math-Verify workers (not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def settled_workers(wait: float = 600.0) -> int:
    """The number of grader workers once the pool is full again and every worker is idle, i.e. asleep waiting
    for work in five looks 0.1 s apart: pebble replaces a killed worker a moment later, and a replacement imports
    sympy first. Idle is read from the process state, not from CPU time per second: a busy worker on a loaded
    machine stays runnable ('R') however little CPU it gets. `wait` bounds only a worker that never settles
    (a stuck one), which gives -1."""
    import grading

    deadline = time.monotonic() + wait
    asleep = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers = grader_workers()
            if len(workers) >= grading._MV_WORKERS and all(w.status() == psutil.STATUS_SLEEPING for w in workers):
                asleep += 1
                if asleep == 5:
                    return len(workers)
            else:
                asleep = 0
        time.sleep(0.1)
    return -1


if os.environ.get("TOY_DIR"):  # a toy task and model built once with TINY_TOY (bench/mutation.py): reuse it
    @pytest.fixture(scope="session")
    def toy() -> Path:  # noqa: F811
        return Path(os.environ["TOY_DIR"])
