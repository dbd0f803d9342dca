"""Shared fixtures: one tiny toy task + model per test session, built by the real data_prep CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Keep child processes (scripts under test, vLLM) on the CPU threads we have, deterministic.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

TINY_TOY = ["--train_size", "1500", "--test_size", "48", "--sft_steps", "150", "--hidden_size", "64",
            "--num_layers", "2", "--vocab_size", "320", "--sft_batch_size", "32"]


def run_script(args: list[str], timeout: int = 600, env: dict | None = None, launcher: list[str] | None = None):
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


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """A tiny toy task (train.jsonl, test.jsonl) and warm-started model (model/)."""
    out = tmp_path_factory.mktemp("toy")
    run_script(["data_prep.py", "toy", "--out", str(out), *TINY_TOY])
    return out
