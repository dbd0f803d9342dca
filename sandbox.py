"""The one place where model-written programs run: each test of a program in a bubblewrap sandbox.

Every test of every program runs in a sandbox of its own: bubblewrap (`bwrap`) with new user, pid,
network, ipc, uts and mount namespaces (no network but a loopback of its own), a read-only view of
/usr and the library folders, size-capped tmpfs /tmp and /dev/shm as the only writable places (the
sandbox's own / and /dev are remounted read-only), and the system python (/usr/bin/python3 -I:
nothing of the project). A trusted launcher reads the program from an inherited file descriptor,
sets the resource limits on itself (CPU time, address space, processes, open files, file size =
the output cap, no core files) and only then runs the program. While it runs, the parent adds up
the resident memory of all its processes every 20 ms. At the wall limit, or when that sum passes
the memory limit, the parent kills the sandbox's pid 1, and the kernel kills everything left
inside with it; the call returns once they are gone. A root parent starts the sandbox as user
nobody, because the kernel does not apply the process limit to root. Without bubblewrap the user
can accept running the launcher as a bare subprocess (--allow_unsandboxed_code): same limits, a
fresh temporary folder, but no isolation from the network or the user's files (README: "Code rows").

Standard library only: a security review reads this file alone. Nothing else in the repository starts a
model-written program (tests/test_layout.py checks it); grading.py calls run_code_tests_many.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

SANDBOX_PYTHON = "/usr/bin/python3"
_NOBODY = 65534
_NOT_COMPILED = 98  # the launcher's exit status for a program that does not compile
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CHILD_PID = re.compile(rb'"child-pid":\s*(\d+)\s*[,}]')


@dataclass(frozen=True)
class CodeLimits:
    time_seconds: float = 5.0  # per test: wall time, and CPU time (RLIMIT_CPU, rounded up)
    program_seconds: float = 20.0  # all tests of one program together; the tests left then are skipped
    memory_bytes: int = 1 << 30  # resident memory of all processes of a sandbox; also RLIMIT_AS of each
    processes: int = 32  # RLIMIT_NPROC: processes and threads inside one sandbox
    open_files: int = 64  # RLIMIT_NOFILE of each process
    output_bytes: int = 1 << 20  # RLIMIT_FSIZE: stdout beyond this fails the write; also caps files
    tmp_bytes: int = 64 << 20  # size of the sandbox's /tmp, and of its /dev/shm
    workers: int = 0  # programs graded in parallel by each process (0: its share of the usable cores)


_LAUNCHER = r"""
import json, os, resource, sys
config = json.loads(sys.argv[1])
with open(config["program_fd"], "rb") as f:
    source = f.read()
for name, (soft, hard) in config["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
try:
    code = compile(source, "solution.py", "exec")
except (SyntaxError, ValueError):
    os._exit(config["not_compiled"])
sys.argv = ["solution.py"]
import typing
namespace = {name: getattr(typing, name) for name in typing.__all__}  # List, Optional, ... as LeetCode has them
if config["fn_name"] is None:
    namespace["__name__"] = "__main__"
    exec(code, namespace)
else:
    args = json.loads(sys.stdin.read())
    result_fd = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the program's own prints are not its return value
    namespace["__name__"] = "solution"
    exec(code, namespace)
    function = namespace.get(config["fn_name"])
    if function is None and isinstance(namespace.get("Solution"), type):
        function = getattr(namespace["Solution"](), config["fn_name"])
    with open(result_fd, "wb") as out:
        out.write(json.dumps(function(*args)).encode())
"""

_code_setup = {"allow_unsandboxed": False, "limits": CodeLimits()}
_sandbox_probe: list = []  # [reason or None] once probed
_sandbox_probe_lock = threading.Lock()


def _bwrap_command(bwrap: str, limits: CodeLimits, info_fd: int) -> list[str]:
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    size = str(limits.tmp_bytes)
    return cmd + ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                  "--size", size, "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp"]


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.pread(fd, min(1 << 20, limit - size), size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def run_program(program: str, stdin: bytes, fn_name: str | None, limits: CodeLimits,
                isolated: bool) -> tuple[str, bytes, bytes]:
    """Run one program once: (status, stdout, start of stderr). status: ok (exit 0), exit (another exit
    status: an exception), not_compiled, timeout (wall or CPU limit), memory (its processes together
    held more than memory_bytes), crash (killed by another signal), error (the sandbox did not start).
    fn_name: call that function with the JSON list of arguments in stdin (a method of class Solution
    also does) and write its JSON return value to stdout."""
    rlimits = {"RLIMIT_CPU": [math.ceil(limits.time_seconds), math.ceil(limits.time_seconds) + 1],
               "RLIMIT_AS": [limits.memory_bytes] * 2, "RLIMIT_NPROC": [limits.processes] * 2,
               "RLIMIT_NOFILE": [limits.open_files] * 2, "RLIMIT_FSIZE": [limits.output_bytes] * 2,
               "RLIMIT_CORE": [0, 0]}
    fds = [_memfd("program", program.encode("utf-8", "replace")), _memfd("stdin", stdin), _memfd("stdout"),
           _memfd("stderr")]
    program_fd, stdin_fd, out_fd, err_fd = fds
    config = {"program_fd": program_fd, "rlimits": rlimits, "fn_name": fn_name, "not_compiled": _NOT_COMPILED}
    cmd = [SANDBOX_PYTHON, "-I", "-c", _LAUNCHER, json.dumps(config)]
    pass_fds, workdir, info_r = [program_fd], None, None
    root = os.geteuid() == 0
    if isolated:
        info_r, info_w = os.pipe()
        fds += [info_r, info_w]
        pass_fds.append(info_w)
        cmd = _bwrap_command(shutil.which("bwrap") or "bwrap", limits, info_w) + cmd
    else:
        workdir = tempfile.mkdtemp(prefix="code-")
        if root:
            os.chown(workdir, _NOBODY, _NOBODY)
    home = "/tmp" if isolated else workdir
    deadline = time.monotonic() + limits.time_seconds
    try:
        proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=out_fd, stderr=err_fd, pass_fds=pass_fds,
                                cwd=workdir or "/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home},
                                start_new_session=True, user=_NOBODY if root else None,
                                group=_NOBODY if root else None, extra_groups=[] if root else None)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return "error", b"", str(e).encode()
    try:
        sandbox_pid = None
        if isolated:  # bwrap writes the pid of the sandbox's pid 1 as it starts (maybe in pieces)
            os.close(info_w)
            fds.remove(info_w)
            info = b""
            while not (found := _CHILD_PID.search(info)) and _readable(info_r, max(deadline - time.monotonic(), 0)):
                if not (chunk := os.read(info_r, 4096)):
                    break
                info += chunk
            sandbox_pid = int(found[1]) if found else None
        pidfd = os.pidfd_open(proc.pid)  # readable once it exits; unlike wait(), it does not reap
        stopped = _watch(pidfd, proc.pid, deadline, limits.memory_bytes)
        timed_out = stopped is not None
        os.close(pidfd)
        if isolated and sandbox_pid and timed_out:
            # bwrap exits when the sandbox's pid 1 is gone, and that is after every process inside it
            with contextlib.suppress(ProcessLookupError):
                os.kill(sandbox_pid, signal.SIGKILL)
        elif not isolated or timed_out:
            # the process group outlives the not yet reaped leader, so its id cannot be reused here
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stdout, stderr = _read_fd(out_fd, limits.output_bytes), _read_fd(err_fd, 4096)
    finally:
        for fd in fds:
            os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rc = proc.returncode
    if stopped:
        return stopped, stdout, stderr
    if isolated and sandbox_pid is None:  # bwrap failed before it started the sandbox
        return "error", stdout, stderr
    signum = -rc if rc < 0 else rc - 128 if isolated and rc > 128 else 0  # bwrap reports 128 + signal
    if signum in (signal.SIGXCPU, signal.SIGKILL):  # the CPU limit: SIGXCPU, then SIGKILL if caught
        return "timeout", stdout, stderr
    status = "crash" if signum else "ok" if rc == 0 else "not_compiled" if rc == _NOT_COMPILED else "exit"
    return status, stdout, stderr


def _watch(pidfd: int, pid: int, deadline: float, memory_bytes: int) -> str | None:
    """Wait until process pid exits (None), the deadline passes ("timeout"), or the resident memory of pid
    and all its descendants passes memory_bytes ("memory"; summed every 20 ms, shared pages counted in
    each process, so the sum errs on the high side)."""
    while (left := deadline - time.monotonic()) > 0:
        if _readable(pidfd, min(left, 0.02)):
            return None
        if _tree_memory(pid) > memory_bytes:
            return "memory"
    return None if _readable(pidfd, 0) else "timeout"


def _tree_memory(pid: int) -> int:
    """Resident bytes of a process and its descendants (/proc/PID/task/TID/children, which also finds
    processes re-parented to the sandbox's pid 1)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE_SIZE
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += map(int, f.read().split())
    return total


def _readable(fd: int, seconds: float) -> bool:
    poller = select.poll()  # not select(): file descriptor numbers of a big process may pass 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def code_test_cases(tests: dict) -> tuple[list[tuple[bytes, object]], str | None]:
    """(stdin, expected) pairs of a row's tests and the function name of call tests (else None).

    stdin/stdout tests: {"inputs": [text, ...], "outputs": [text, ...]} (a list of lines is joined);
    call tests: {"fn_name": name, "inputs": [[arg, ...], ...], "outputs": [value, ...]}, stdin = JSON args."""
    inputs, outputs, fn_name = tests["inputs"], tests["outputs"], tests.get("fn_name") or None
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("tests need equally long, non-empty lists 'inputs' and 'outputs'")

    def text(value) -> str:
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

    if fn_name is None:
        return [(text(i).encode(), text(o)) for i, o in zip(inputs, outputs)], None
    return [(json.dumps(i if isinstance(i, list) else [i]).encode(), o) for i, o in zip(inputs, outputs)], fn_name


def _output_lines(text: str) -> list[str]:
    """Whitespace-normalized output: each line's words joined by one space; blank lines dropped."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def output_matches(stdout: bytes, expected, fn_name: str | None) -> bool:
    """stdin/stdout tests: whitespace-normalized lines equal, word by word, where two words that are not
    both integers may also be close numbers (tokens_match). Call tests: the JSON return value equals the
    expected value, or its single element (datasets often store a return value v as [v])."""
    if fn_name is None:
        got, want = _output_lines(stdout.decode("utf-8", "replace")), _output_lines(expected)
        return got == want or (len(got) == len(want) and all(
            len(g) == len(w) and all(map(tokens_match, g, w)) for g, w in zip((l.split() for l in got),
                                                                              (l.split() for l in want))))
    try:
        value = json.loads(stdout)
        return value == expected or (isinstance(expected, list) and len(expected) == 1 and value == expected[0])
    except (ValueError, RecursionError):  # nothing written, not JSON, or nested too deep to read
        return False


_INTEGER = re.compile(r"[+-]?\d+")


def tokens_match(got: str, want: str) -> bool:
    """One output word against the expected one: equal, or both finite numbers, not both integers, with
    |got - want| <= 1e-8 + 1e-5 |want| (numpy's allclose, as the APPS/TACO checkers accept floats:
    0.3333333 = 0.333333333, 2.0 = 2). Integers must be equal: 1000000006 is not 1000000007."""
    if got == want:
        return True
    if _INTEGER.fullmatch(got) and _INTEGER.fullmatch(want):
        return False
    try:
        a, b = float(got), float(want)
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-8 + 1e-5 * abs(b)


@dataclass
class CodeResult:
    outcomes: list[str]  # per test: pass, fail, timeout, crash, error, skipped

    @property
    def passed(self) -> int:
        return self.outcomes.count("pass")

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def errors(self) -> int:
        """1 if a run crashed or the sandbox failed (counted once per program, as `rewards/errors`)."""
        return int("crash" in self.outcomes or "error" in self.outcomes)


def run_tests(program: str | None, tests: dict | None, limits: CodeLimits, isolated: bool) -> CodeResult:
    """A program against its tests, one sandbox per test, in order. After a timeout, when the program
    does not compile, or when its tests together have taken limits.program_seconds, its remaining tests
    are not run ("skipped", failed): one program's grading takes at most program_seconds (plus the start
    and end of its last sandbox)."""
    try:
        cases, fn_name = code_test_cases(tests)
    except (KeyError, TypeError, ValueError):
        return CodeResult(["error"])  # a malformed row, not the model's fault
    if not program or not program.strip():
        return CodeResult(["fail"] * len(cases))
    outcomes, end = [], time.monotonic() + limits.program_seconds
    for stdin, expected in cases:
        left = end - time.monotonic()
        if left <= 0 or outcomes and outcomes[-1] in ("timeout", "skipped"):
            outcomes.append("skipped")
            continue
        run_limits = limits if left >= limits.time_seconds else replace(limits, time_seconds=left)
        status, stdout, _ = run_program(program, stdin, fn_name, run_limits, isolated)
        if status == "ok":
            outcomes.append("pass" if output_matches(stdout, expected, fn_name) else "fail")
        elif status == "not_compiled":
            outcomes += ["fail"] + ["skipped"] * (len(cases) - len(outcomes) - 1)
            break
        else:
            outcomes.append("fail" if status in ("exit", "memory") else status)
    return CodeResult(outcomes)


def sandbox_unavailable() -> str | None:
    """None when a bubblewrap sandbox runs here, else why not (probed once per process)."""
    with _sandbox_probe_lock:
        if not _sandbox_probe:
            _sandbox_probe.append(_probe_sandbox())
        return _sandbox_probe[0]


def _probe_sandbox() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if not os.access(SANDBOX_PYTHON, os.X_OK):
        return f"{SANDBOX_PYTHON} does not exist"
    status, stdout, stderr = run_program("print('ok')", b"", None, CodeLimits(time_seconds=30), isolated=True)
    if status != "ok" or stdout != b"ok\n":
        reason = stderr.decode("utf-8", "replace").strip().splitlines()
        return f"bwrap could not start a sandbox ({reason[0] if reason else status})"
    return None


def check_code_sandbox(rows: list[dict], allow_unsandboxed: bool, flag: str = "--allow_unsandboxed_code") -> None:
    """Scripts call this once with their rows: code rows need the sandbox, or the user's explicit consent
    to run model-written programs without isolation (flag). Stops with one sentence otherwise."""
    _code_setup["allow_unsandboxed"] = allow_unsandboxed
    if any(row["task"] == "code" for row in rows) and not _code_isolation(flag):
        print(f"{flag}: model-written programs run WITHOUT isolation ({sandbox_unavailable()}); "
              "only resource limits apply.", file=sys.stderr)


def _code_isolation(flag: str = "--allow_unsandboxed_code") -> bool:
    """True: programs run under bubblewrap; False: bare, as the user allowed. SystemExit otherwise."""
    why = sandbox_unavailable()
    if why is None:
        return True
    if _code_setup["allow_unsandboxed"]:
        return False
    raise SystemExit(f"code rows run model-written programs, which need the bubblewrap sandbox, but {why}: "
                     f"install it (README, \"Code rows\") or pass {flag} to run them without isolation.")


def run_code_tests_many(jobs: list[tuple[str | None, dict | None]], limits: CodeLimits | None = None,
                        isolated: bool | None = None) -> list[CodeResult]:
    """(program, tests) pairs graded in parallel, a bounded pool of threads that each wait on their sandbox.
    isolated: None = bubblewrap, or bare where the user allowed it (check_code_sandbox)."""
    if not jobs:
        return []
    limits = limits or _code_setup["limits"]
    isolated = _code_isolation() if isolated is None else isolated
    # every training process on a node grades its own rollouts at the same time: split the cores among them
    share = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    workers = min(len(jobs), limits.workers or max(1, share))

    def grade(job) -> CodeResult:
        try:
            return run_tests(job[0], job[1], limits, isolated)
        except Exception as e:  # whatever one program does, the batch and the run go on
            print(f"warning: grading a program failed ({e!r}); it scores 0 and counts in rewards/errors",
                  file=sys.stderr, flush=True)
            return CodeResult(["error"])

    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(grade, jobs))
    finally:
        # not `with`: on an interrupt (common.run_main) it would wait for the programs still running,
        # up to program_seconds, before the handler could kill their sandboxes
        pool.shutdown(wait=False, cancel_futures=True)
