"""Nothing lost, nothing left behind: a run killed (SIGKILL) inside a checkpoint write or in the middle of a step,
interrupted (SIGINT, SIGTERM) and resumed equals an uninterrupted run; Ctrl-C (SIGINT) and SIGTERM end each
script's run with one line and exit code 130 / 143, and no child process outlives it (Math-Verify's grader
workers, code sandboxes; vLLM's engine runs inside the script's process), as after an exception in a reward;
--resume on a folder without a checkpoint starts over.

Every signal arrives at a known point: the run is started through tests/harness.py --pause POINT, which prints
`PAUSED POINT` there and waits; the test reads that line, then sends the signal. No test races the run or
assumes how fast the machine is; every run is graded without Math-Verify's time limits (--patient_grading), which
a busy machine could reach, changing a reward."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

import common
import grading
import sandbox
from common import read_jsonl
from conftest import HANG, REPO, run_script, time_limit

sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402

STEPS = 4  # the fifth launch of the chaos test still has steps 3 and 4 to run


@pytest.fixture(scope="module")
def graded_by_math_verify(toy, tmp_path_factory):
    """The toy training rows with the gold answer N written `N+0`: the fast path cannot decide it, so
    every answer goes to Math-Verify's worker processes (children of the run to count), graded right."""
    path = tmp_path_factory.mktemp("mv") / "train.jsonl"
    rows = [json.loads(line) for line in (toy / "train.jsonl").read_text().splitlines()[:200]]
    path.write_text("".join(json.dumps({**r, "answer": f"{r['answer']}+0"}) + "\n" for r in rows))
    return path


def patient(cmd: list[str]) -> list[str]:
    """[python, SCRIPT.py, ARGS...] through tests/harness.py --patient_grading."""
    return [cmd[0], "tests/harness.py", "--patient_grading", *cmd[1:]]


@pytest.fixture(scope="module")
def straight(toy, graded_by_math_verify, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("straight")
    run_script(patient(chaos.run_command(toy, out, "straight", STEPS, graded_by_math_verify))[1:])
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


def command_lines(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return out


@dataclasses.dataclass
class Stopped:
    code: int  # the exit code (-9 for SIGKILL)
    stdout: str
    stderr: str
    children: list[psutil.Process]  # the run's descendants when it was paused
    commands: list[str]  # their command lines


def stop_at(cmd: list[str], point: str, signum: int, tmp_path, *harness_flags: str) -> Stopped:
    """Run `cmd` ([python, SCRIPT.py, ARGS...]) through tests/harness.py paused at `point`, then send `signum` (SIGKILL:
    to the whole process group, as a scheduler does) and wait for the end. stderr goes to a file: a pipe nobody
    reads while the run waits for its signal could fill up and block it."""
    err_path = tmp_path / f"stderr_{point}_{signum}.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(patient([cmd[0], "--pause", point, *harness_flags, *cmd[1:]]), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        lines = []
        try:
            with time_limit(HANG):  # only a hang waits this long
                for line in proc.stdout:
                    lines.append(line)
                    if line.strip() == f"PAUSED {point}":
                        break
                else:
                    proc.wait()
                    raise AssertionError(f"the run ended (exit {proc.returncode}) before {point}\n"
                                         f"{err_path.read_text()[-3000:]}")
            children = descendants(proc.pid)
            commands = command_lines(children)
            if signum == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signum)
            stdout, _ = proc.communicate(timeout=HANG)  # only a hang waits this long
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its sandboxes die with it (bwrap --die-with-parent)
            proc.wait()
            raise
    return Stopped(proc.returncode, "".join(lines) + stdout, err_path.read_text(), children, commands)


def assert_interrupted(stopped: Stopped, signum: int, message: str) -> None:
    """Exit code 128 + signal, the one line, no traceback, and none of the run's child processes left."""
    assert stopped.code == 128 + signum, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == message, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert alive(stopped.children) == [], command_lines(alive(stopped.children))


def math_verify_workers(stopped: Stopped) -> int:
    return sum("spawn_main" in c for c in stopped.commands)


def test_a_run_killed_twice_and_interrupted_twice_resumes_to_the_straight_run(toy, graded_by_math_verify, straight,
                                                                               tmp_path):
    """One GRPO run, five launches of the same command:
    1. SIGKILL inside the write of the first checkpoint (step 1): its temporary folder is left half-written,
       no checkpoint is complete, steps 0 and 1 were logged;
    2. --resume starts over from step 0 and says so in one line; Ctrl-C (SIGINT) once step 1 has ended;
    3. --resume; SIGKILL in the middle of step 2, once its answers are graded;
    4. --resume; SIGTERM once step 2 has ended;
    5. --resume runs to the end.
    SIGINT and SIGTERM end the run with one line (the step reached, --resume), exit code 130 / 143 and no
    traceback, and none of the child processes it had (Math-Verify's grader workers) is left. At the end,
    metrics (timings aside), rollouts and evaluations equal the uninterrupted run's, each step once."""
    cmd = chaos.run_command(toy, tmp_path, "chaos", STEPS, graded_by_math_verify)
    run = tmp_path / "chaos"

    killed = stop_at(cmd, "in_checkpoint", signal.SIGKILL, tmp_path)
    assert killed.code == -signal.SIGKILL
    half = run / "checkpoints" / ".tmp_step_1"
    assert list(half.iterdir()) and not (half / "trainer_state.json").exists()  # written in part, never renamed
    assert common.complete_checkpoints(run) == [] and chaos.logged_steps(run) == [0, 1]

    stopped = stop_at(cmd + ["--resume"], "after_step", signal.SIGINT, tmp_path)
    assert (f"--resume: {run} has no checkpoint yet; starting from step 0 (discarding the 2 logged step(s)).") \
        in stopped.stdout.splitlines()
    assert math_verify_workers(stopped) >= grading._MV_WORKERS, stopped.commands  # the pool was running
    assert_interrupted(stopped, signal.SIGINT, f"SIGINT: stopped after step 1; run the same command with --resume to "
                                               f"continue from the checkpoint of step 1 in {run}.")

    killed = stop_at(cmd + ["--resume"], "after_grading", signal.SIGKILL, tmp_path)
    assert killed.code == -signal.SIGKILL and chaos.logged_steps(run) == [0, 1]  # step 2 graded, never logged

    stopped = stop_at(cmd + ["--resume"], "after_step", signal.SIGTERM, tmp_path)
    assert math_verify_workers(stopped) >= grading._MV_WORKERS, stopped.commands
    assert_interrupted(stopped, signal.SIGTERM, f"SIGTERM: stopped after step 2; run the same command with --resume "
                                                f"to continue from the checkpoint of step 2 in {run}.")

    assert chaos.finish(patient(cmd), run, tmp_path / "chaos.log") == 1
    assert chaos.differences(straight, run, STEPS) == []
    assert not list((run / "checkpoints").glob(".tmp_*"))  # the half-written folder was cleaned up


def script_cmd(script: str, toy, out, name: str, *extra: str, train_file=None) -> list[str]:
    return [sys.executable, script, "--model", str(toy / "model"), "--train_file", str(train_file or toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--prompts_per_step", "4", "--num_generations", "4", "--max_completion_length", "32", "--eval_limit", "8",
            "--save_every", "1", "--log_rollouts_every", "1", *extra]


def test_reinforce_rej_interrupted_and_resumed_equals_the_straight_run(toy, graded_by_math_verify, tmp_path):
    """reinforce_rej.py (with a KL reference and an entropy bonus, two optimizer steps per batch): Ctrl-C once step 1
    has ended gives the one line and leaves no grader worker; --resume then runs to the end, and what the run
    wrote equals an uninterrupted run's."""
    def cmd(name):
        return script_cmd("reinforce_rej.py", toy, tmp_path, name, "--sampler", "hf", "--total_steps", "3",
                          "--eval_every", "2", "--num_iterations", "2", "--kl_coef", "0.01", "--entropy_coef", "0.01",
                          train_file=graded_by_math_verify)

    run_script(patient(cmd("straight"))[1:])
    run = tmp_path / "resumed"
    stopped = stop_at(cmd("resumed"), "after_step", signal.SIGINT, tmp_path)
    assert math_verify_workers(stopped) >= grading._MV_WORKERS, stopped.commands
    assert_interrupted(stopped, signal.SIGINT, f"SIGINT: stopped after step 1; run the same command with --resume to "
                                               f"continue from the checkpoint of step 1 in {run}.")
    run_script(patient(cmd("resumed"))[1:] + ["--resume"])
    assert chaos.differences(tmp_path / "straight", run, 3) == []
    assert any(m["kept_prompts_frac"] > 0 for m in read_jsonl(run / "metrics.jsonl")[1:])  # it trained


def test_raft_pp_with_vllm_stops_on_sigterm(toy, tmp_path):
    """raft_pp.py sampling with vLLM (its engine lives in the script's process): SIGTERM once step 1 has ended gives
    the one line and exit code 143, and none of the run's child processes is left."""
    run = tmp_path / "raft"
    stopped = stop_at(script_cmd("raft_pp.py", toy, tmp_path, "raft", "--sampler", "vllm", "--total_steps", "3"),
                      "after_step", signal.SIGTERM, tmp_path)
    assert "vllm" in stopped.stdout.lower() + stopped.stderr.lower()  # the engine was started
    assert_interrupted(stopped, signal.SIGTERM, f"SIGTERM: stopped after step 1; run the same command with --resume to "
                                                f"continue from the checkpoint of step 1 in {run}.")


def test_prime_stops_on_sigint_while_programs_run_in_their_sandboxes(toy, tmp_path):
    """prime.py on code rows whose programs sleep for an hour (tests/harness.py --hanging_programs): Ctrl-C while they
    run in their sandboxes ends the run at once with the one line and exit code 130, and no sandbox (bubblewrap,
    the program's python) is left."""
    assert sandbox.sandbox_unavailable() is None, "CI installs bubblewrap with install.sh as root"
    rows = [{"id": f"code-{i}", "task": "code", "prompt": [{"role": "user", "content": f"{i}+1"}], "answer": "",
             "metadata": {"tests": {"inputs": ["1\n"], "outputs": ["1\n"]}, "answer_style": "code"}} for i in range(8)]
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stopped = stop_at(script_cmd("prime.py", toy, tmp_path, "prime", "--sampler", "hf", "--total_steps", "2",
                                 train_file=code), "in_sandbox", signal.SIGINT, tmp_path, "--hanging_programs")
    sandboxes = [c for c in stopped.commands if c.startswith(("bwrap", shutil.which("bwrap") or "bwrap"))]
    programs = [c for c in stopped.commands if c.startswith(f"{sandbox.SANDBOX_PYTHON} -I -c")]
    assert sandboxes and programs, stopped.commands
    assert_interrupted(stopped, signal.SIGINT, "SIGINT: stopped after step 0, before the first checkpoint; the same "
                                               "command with --resume starts over from step 0.")


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
import common, grading, grpo_logprob

grading._MV_START_TIMEOUT = 3600.0  # its workers start however busy the machine is
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
                          timeout=HANG)
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
