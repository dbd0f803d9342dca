"""The one place where model-written programs run: each test of a program in a bubblewrap sandbox.

Each run gets a sandbox of its own: bubblewrap (`bwrap`) with new user, pid, network, ipc, uts, cgroup and mount
namespaces (a loopback of its own, no network), a read-only view of /usr and the library folders, size-capped tmpfs /tmp
and /dev/shm as the only writable places, and the system python (-I: nothing of the project). Its pid 1 is a trusted
launcher (bwrap --as-pid-1, _LAUNCHER) whose report of the program's status the program cannot forge (exit code 137 is
an exit, not a kill), and which reaps every orphan, as bwrap reaps it and the parent bwrap: no zombie is left, also
under a trainer that is pid 1 or a subreaper. At the wall limit or past the memory limit the parent kills pid 1, and
with it everything inside. Memory held by any means counts against memory_bytes, by the guards the machine allows
(sandbox_protection()): a cgroup of its own (_cgroup_parents), charged every page, where the kernel kills past the
limit; a seccomp filter (_REFUSED_CALLS) and bwrap --disable-userns; without a cgroup, resident memory and tmpfs summed
every 20 ms. A root parent starts the sandbox as user nobody: the kernel does not apply the process limit to root.
Without bubblewrap the user can accept running the launcher as a bare subprocess (--allow_unsandboxed_code): the same
limits and cgroup, a fresh temporary folder, and no isolation.

Standard library only: a security review reads this file alone. Nothing else in the repository starts a
model-written program (tests/test_layout.py checks it); grading.py calls run_code_tests_many.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
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
from decimal import Decimal, InvalidOperation
from pathlib import Path

SANDBOX_PYTHON = "/usr/bin/python3"
_NOBODY = 65534
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CHILD_PID = re.compile(rb'"child-pid":\s*(\d+)\s*[,}]')
_PID_NS = os.stat("/proc/self/ns/pid").st_ino  # in cgroup names: only this namespace's pids can be checked


@dataclass(frozen=True)
class CodeLimits:
    time_seconds: float = 5.0  # per test: wall time, and CPU time (RLIMIT_CPU, rounded up)
    program_seconds: float = 20.0  # all tests of one program together; the tests left then are skipped
    memory_bytes: int = 1 << 30  # all memory the sandbox holds (see the guards); also RLIMIT_AS of each process
    processes: int = 32  # processes and threads inside one sandbox (RLIMIT_NPROC; pids.max with a cgroup)
    open_files: int = 64  # RLIMIT_NOFILE of each process
    output_bytes: int = 1 << 20  # RLIMIT_FSIZE: stdout beyond this fails the write; also caps files
    tmp_bytes: int = 64 << 20  # size of the sandbox's /tmp, and of its /dev/shm
    workers: int = 0  # programs graded in parallel by each process (0: its share of the usable cores)
    guard: str = "auto"  # memory guards: every one available; "cgroup", "seccomp" or "none" alone (tests, bench)


# The sandbox's pid 1: reads the program from an inherited descriptor, waits until the parent has put it
# into the sandbox's cgroup, sets the limits, forks the program and reports what the kernel's wait status
# of it says (timeout: SIGXCPU or SIGKILL with the CPU time used up) on a descriptor the program cannot
# reach: it is not dumpable (no /proc/1/fd, no ptrace), and pid 1 gets no signal the program sends.
_LAUNCHER = r"""
import contextlib, ctypes, json, os, resource, signal, sys
config = json.loads(sys.argv[1])
libc = ctypes.CDLL(None)
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the program can neither trace this process nor open its /proc files
if os.getpid() != 1:
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (bare runs): what the program leaves behind comes back here
with open(config["program_fd"], "rb") as f:
    source = f.read()
if os.read(config["go_fd"], 1) != b"g":  # the parent has put this process into the sandbox's cgroup
    os._exit(1)
os.close(config["go_fd"])
for name, (soft, hard) in config["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
report = config["status_fd"]
try:
    code = compile(source, "solution.py", "exec")
except (SyntaxError, ValueError, RecursionError, MemoryError):
    os.write(report, b"not_compiled")
    os._exit(0)
signal.signal(signal.SIGINT, signal.SIG_DFL)  # as pid 1 it then gets no SIGINT from the program
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    libc.prctl(4, 1, 0, 0, 0)  # the program is an ordinary process
    os.close(report)
    sys.argv = ["solution.py"]
    import typing
    namespace = {name: getattr(typing, name) for name in typing.__all__}  # List, Optional, ... as LeetCode has them
    namespace["__name__"] = "__main__" if config["fn_name"] is None else "solution"
    if config["fn_name"] is None:
        exec(code, namespace)
    else:
        args = json.loads(sys.stdin.read())
        result_fd = os.dup(1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the program's own prints are not its return value
        exec(code, namespace)
        function = namespace.get(config["fn_name"])
        if function is None and isinstance(namespace.get("Solution"), type):
            function = getattr(namespace["Solution"](), config["fn_name"])
        with open(result_fd, "wb") as out:
            out.write(json.dumps(function(*args)).encode())
else:
    while True:  # reap every orphan until the program itself exits
        child, status, usage = os.wait4(-1, 0)
        if child == pid:
            break
    at_cpu_limit = usage.ru_utime + usage.ru_stime >= config["rlimits"]["RLIMIT_CPU"][0]  # not a signal it sent
    if os.WIFSIGNALED(status):
        verdict = "timeout" if os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL) and at_cpu_limit else "crash"
    else:
        verdict = "ok" if os.WEXITSTATUS(status) == 0 else "exit"
    os.write(report, verdict.encode())
    while os.getpid() != 1:  # bare runs: stop and reap what the program left (pid 1's exit does it in a sandbox)
        for task in os.listdir("/proc/self/task"):
            for orphan in open(f"/proc/self/task/{task}/children").read().split():
                with contextlib.suppress(OSError):
                    os.kill(int(orphan), signal.SIGKILL)
        try:
            os.wait()
        except ChildProcessError:
            break
    os._exit(0)
"""

# What the seccomp filter refuses (EPERM): memory no process maps (SysV shared memory and message queues,
# memfds, socket buffers of 4 MiB each; there is no network anyway), a session of its own (a CPU share of its
# own: autogroups), new namespaces and mounts (a tmpfs of its own), kernel interfaces a program has no use
# for, clone() with a namespace flag; clone3 gets ENOSYS, so that libc falls back to clone(), which it reads.
_REFUSED_CALLS = ("shmget shmat msgget memfd_create memfd_secret socket socketpair setsid unshare setns mount "
                  "umount2 pivot_root chroot open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr "
                  "io_uring_setup userfaultfd bpf perf_event_open add_key request_key keyctl ptrace "
                  "process_vm_readv process_vm_writev").split()
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

_code_setup = {"allow_unsandboxed": False, "limits": CodeLimits()}
_sandbox_probe: list = []  # [reason or None] once probed
_sandbox_probe_lock = threading.Lock()
_guards: dict = {}  # what this machine allows: cgroup (kind, parent folders), seccomp (BPF bytes), userns (bool)
_guards_lock = threading.Lock()


def _active_guards(limits: CodeLimits, isolated: bool) -> tuple:
    """(cgroup parents, seccomp program, --disable-userns) of one run, as far as the machine allows them."""
    with _guards_lock:
        if not _guards:
            _guards.update(cgroup=_cgroup_parents(), seccomp=_seccomp_program(), userns=True)
            _Cgroup.remove_stale(_guards["cgroup"][1] if _guards["cgroup"] else [])
    filtering = isolated and limits.guard in ("auto", "seccomp")
    return (_guards["cgroup"] if limits.guard in ("auto", "cgroup") else None,
            _guards["seccomp"] if filtering else None, filtering and _guards["userns"])


def sandbox_protection(limits: CodeLimits | None = None) -> str:
    """One line: the isolation and the memory guards of a sandboxed run on this machine."""
    cgroup, seccomp, userns = _active_guards(limits or _code_setup["limits"], True)
    names = ", ".join(("memory", "pids", "cpu")[:len(cgroup[1]) if cgroup[0] == "v1" else 2]) if cgroup else ""
    parts = ["bubblewrap", cgroup and f"cgroup {cgroup[0]} ({names})", userns and "no nested user namespaces",
             seccomp and "seccomp (no SysV shared memory, memfd, sockets, namespaces, mounts)",
             not cgroup and "resident memory and /tmp summed every 20 ms"]
    return " + ".join(part for part in parts if part)


def _seccomp_program() -> bytes | None:
    """The seccomp filter as the BPF program bwrap --seccomp reads, built by libseccomp (None without it)."""
    import ctypes

    class Comparison(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None
    pointer, number = ctypes.c_void_p, ctypes.c_uint32
    lib.seccomp_init.restype, lib.seccomp_init.argtypes, lib.seccomp_release.argtypes = pointer, [number], [pointer]
    lib.seccomp_rule_add_array.argtypes = [pointer, number, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Comparison)]
    lib.seccomp_syscall_resolve_name.argtypes = lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes, lib.seccomp_export_bpf.argtypes = [pointer, number], [pointer, ctypes.c_int]
    refuse, no_such_call, masked_eq = 0x00050000 | 1, 0x00050000 | 38, 7  # SCMP_ACT_ERRNO(EPERM), (ENOSYS)
    rules = [(refuse, name, None) for name in _REFUSED_CALLS] + [(no_such_call, "clone3", None)]
    rules += [(refuse, "clone", Comparison(0, masked_eq, flag, flag)) for flag in _CLONE_NAMESPACES]
    ctx = lib.seccomp_init(0x7FFF0000)  # allow the rest; calls of other architectures kill the process
    if not ctx:
        return None
    fd = os.memfd_create("seccomp")
    try:
        if x32 := lib.seccomp_arch_resolve_name(b"x32"):
            lib.seccomp_arch_add(ctx, x32)  # on x86-64 kernels that run x32 calls, they meet the same rules
        for action, name, comparison in rules:
            call = lib.seccomp_syscall_resolve_name(name.encode())
            args = (Comparison * 1)(comparison) if comparison else None
            if call >= 0 and lib.seccomp_rule_add_array(ctx, action, call, int(bool(comparison)), args) != 0:
                return None
        return _read_fd(fd, 1 << 20) if lib.seccomp_export_bpf(ctx, fd) == 0 else None
    finally:
        os.close(fd)
        lib.seccomp_release(ctx)


# --- cgroups ----------------------------------------------------------------------------------
def _cgroup_parents() -> tuple[str, list[str]] | None:
    """Where this process may create a sandbox's cgroup: ("v1", [memory, pids, (cpu)]) under its own v1
    cgroups, ("v2", [folder]) at the nearest cgroup at or above its own whose children get the memory and
    pids controllers and that it may write; else None."""
    mounts, own = {}, {}  # controller ("v2": the cgroup2 mount) -> (root, mount point); -> own cgroup
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, (kind, _, options) = line.split(" - ")[0].split(), line.split(" - ")[1].split()[:3]
            names = {"cgroup2": ["v2"], "cgroup": set(options.split(",")) & {"memory", "pids", "cpu"}}.get(kind, [])
            mounts.update((name, fields[3:5]) for name in names)
    with open("/proc/self/cgroup") as f:
        for _, names, path in (line.rstrip("\n").split(":", 2) for line in f):
            own.update((name, path) for name in (names.split(",") if names else ["v2"]))

    def folder(name: str) -> str | None:
        (root, point), path = mounts[name], own.get(name, "")
        if not (path + "/").startswith(root.rstrip("/") + "/"):
            return None  # this process's cgroup is not under the mounted part
        return os.path.normpath(point + "/" + path[len(root.rstrip("/")):])

    if {"memory", "pids"} <= mounts.keys():
        folders = [folder(name) for name in ("memory", "pids", "cpu") if name in mounts]
        usable = [f for f in folders if f and os.access(f, os.W_OK)]
        return ("v1", usable) if usable[:2] == folders[:2] else None  # cpu only where it can be had
    here = folder("v2") if "v2" in mounts else None
    while here and here.startswith(mounts["v2"][1]):
        with contextlib.suppress(OSError):
            with open(f"{here}/cgroup.subtree_control") as f:
                if {"memory", "pids"} <= set(f.read().split()) and os.access(here, os.W_OK):
                    return "v2", [here]
        here = None if here == mounts["v2"][1] else os.path.dirname(here)
    return None


class _Cgroup:
    """A sandbox's cgroup (a folder in each v1 hierarchy, one on v2), used by one sandbox at a time and
    kept for the next; removed when this process exits."""
    pool, lock, count = [], threading.Lock(), itertools.count()  # the idle ones

    def __init__(self, kind: str, parents: list[str]):
        self.v2, self.owner = kind == "v2", os.getpid()
        atexit.register(self.remove)
        self.dirs = [f"{parent}/code-sandbox-{_PID_NS}-{self.owner}-{next(self.count)}" for parent in parents]
        self.pids = self.dirs[0 if self.v2 else 1]
        self.events = self.dirs[0] + ("/memory.events" if self.v2 else "/memory.oom_control")

    @classmethod
    def take(cls, parents: tuple[str, list[str]], limits: CodeLimits) -> _Cgroup:
        with cls.lock:
            cgroup = cls.pool.pop() if cls.pool else None
        cgroup = cgroup or cls(*parents)
        for folder in cgroup.dirs:  # (again: nobody else may have removed it)
            os.makedirs(folder, exist_ok=True)
        memory = Path(cgroup.dirs[0])
        swap = memory / ("memory.swap.max" if cgroup.v2 else "memory.memsw.limit_in_bytes")
        if swap.exists() and not cgroup.v2:
            swap.write_text("-1")  # v1: memory+swap may not be below memory: lift it first
        (memory / ("memory.max" if cgroup.v2 else "memory.limit_in_bytes")).write_text(str(limits.memory_bytes))
        if swap.exists():
            swap.write_text(str(0 if cgroup.v2 else limits.memory_bytes))
        Path(cgroup.pids, "pids.max").write_text(str(limits.processes))
        return cgroup

    def give_back(self) -> None:
        self.kill()
        with self.lock:
            self.pool.append(self)

    def enter(self, pid: int) -> None:
        for folder in self.dirs:
            Path(folder, "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        """Processes the kernel has killed in this cgroup for its memory limit, ever."""
        with open(self.events) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), 0)

    def kill(self) -> None:
        """Kill what is left inside (bare runs: what left the process group; a sandbox dies with its pid 1)."""
        for _ in range(1000):
            with open(f"{self.pids}/cgroup.procs") as f:
                if not (pids := [int(p) for p in f.read().split()]):
                    return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)

    @staticmethod
    def remove_stale(parents: list[str]) -> None:
        """Remove the cgroups of this pid namespace's processes that are gone (killed before their exit)."""
        for parent in parents:
            for name in os.listdir(parent):
                m = re.fullmatch(rf"code-sandbox-{_PID_NS}-(\d+)-\d+", name)
                if m and not os.path.exists(f"/proc/{m[1]}"):
                    with contextlib.suppress(OSError):  # not empty: in use
                        os.rmdir(f"{parent}/{name}")

    def remove(self) -> None:
        for folder in self.dirs if self.owner == os.getpid() else ():  # not in a forked child
            with contextlib.suppress(OSError):
                os.rmdir(folder)


# --- one run ----------------------------------------------------------------------------------
def _bwrap_command(bwrap: str, limits: CodeLimits, info_fd: int, seccomp_fd: int | None,
                   disable_userns: bool) -> list[str]:
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--as-pid-1",
           "--info-fd", str(info_fd)]
    cmd += ["--disable-userns"] if disable_userns else []
    cmd += ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
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
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
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
    """Run one program once: (status, stdout, start of stderr). status (the launcher's or the parent's, never
    an exit code): ok, exit (another exit code), not_compiled, timeout (wall or CPU limit), memory, crash
    (another signal), error (no sandbox started). fn_name: call that function (or method of class Solution)
    with the JSON list of arguments in stdin and write its JSON return value to stdout."""
    cgroup_parents, seccomp, disable_userns = _active_guards(limits, isolated)
    cpu_limit = math.ceil(limits.time_seconds)
    rlimits = {"RLIMIT_CPU": [cpu_limit, cpu_limit + 1], "RLIMIT_AS": [limits.memory_bytes] * 2,
               "RLIMIT_NOFILE": [limits.open_files] * 2, "RLIMIT_FSIZE": [limits.output_bytes] * 2,
               "RLIMIT_CORE": [0, 0]}
    if isolated or not cgroup_parents:  # bare, it would count every process of nobody; pids.max counts this run's
        rlimits["RLIMIT_NPROC"] = [limits.processes] * 2
    fds = [_memfd("program", program.encode("utf-8", "replace")), _memfd("stdin", stdin), _memfd("stdout"),
           _memfd("stderr"), _memfd("status"), *os.pipe()]
    program_fd, stdin_fd, out_fd, err_fd, status_fd, go_r, go_w = fds
    config = {"program_fd": program_fd, "status_fd": status_fd, "go_fd": go_r, "rlimits": rlimits, "fn_name": fn_name}
    cmd = [SANDBOX_PYTHON, "-I", "-c", _LAUNCHER, json.dumps(config)]
    pass_fds, workdir, info_r = [program_fd, status_fd, go_r], None, None
    root = os.geteuid() == 0
    if isolated:
        info_r, info_w = os.pipe()
        seccomp_fd = _memfd("seccomp", seccomp) if seccomp else None
        fds += [info_r, info_w] + ([seccomp_fd] if seccomp else [])
        pass_fds += [info_w] + ([seccomp_fd] if seccomp else [])
        cmd = _bwrap_command(shutil.which("bwrap") or "bwrap", limits, info_w, seccomp_fd, disable_userns) + cmd
    else:
        workdir = tempfile.mkdtemp(prefix="code-")
        if root:
            os.chown(workdir, _NOBODY, _NOBODY)
    deadline = time.monotonic() + limits.time_seconds
    cgroup = launcher = None

    def release():
        for fd in fds + ([launcher] if launcher else []):
            os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if cgroup:
            cgroup.give_back()

    try:
        cgroup = _Cgroup.take(cgroup_parents, limits) if cgroup_parents else None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir or "/tmp"}
        proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=out_fd, stderr=err_fd, pass_fds=pass_fds,
                                cwd=workdir or "/", env=env, start_new_session=True, user=_NOBODY if root else None,
                                group=_NOBODY if root else None, extra_groups=[] if root else None)
    except OSError as e:
        release()
        return "error", b"", str(e).encode()
    try:
        launcher_pid, pidfd = proc.pid, os.pidfd_open(proc.pid)  # readable once it exits; it does not reap
        fds.append(pidfd)
        if isolated:  # bwrap writes the pid of the sandbox's pid 1 as it starts (maybe in pieces)
            os.close(info_w)
            fds.remove(info_w)
            info = b""  # until bwrap closes it (it does once it wrote), or fails
            while _readable(info_r, max(deadline - time.monotonic(), 0)) and (chunk := os.read(info_r, 4096)):
                info += chunk
            launcher_pid = int(found[1]) if (found := _CHILD_PID.search(info)) else None
        with contextlib.suppress(OSError):  # a pidfd: the launcher's id cannot be reused while it is open
            launcher = os.pidfd_open(launcher_pid) if launcher_pid else None
        oom_before = cgroup.oom_kills() if cgroup else 0
        try:
            if cgroup and launcher:
                cgroup.enter(launcher_pid)
            stopped = None if launcher else "timeout" if time.monotonic() >= deadline else "error"  # busy / failed
            os.write(go_w, b"g")
        except OSError:  # the cgroup cannot take it: the program does not run unguarded
            stopped = "error"
        stopped = stopped or _watch(pidfd, deadline, limits, cgroup, oom_before,
                                    None if cgroup else proc.pid, launcher_pid if isolated else None)
        if stopped and isolated and launcher:  # pid 1's death kills every process inside; bwrap reaps it
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(launcher, signal.SIGKILL)
        elif stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its not yet reaped leader
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if cgroup and cgroup.oom_kills() > oom_before:
            stopped = stopped or "memory"
        if isolated and launcher and _readable(launcher, 5):  # had bwrap died first, a subreaper parent
            with contextlib.suppress(ChildProcessError):       # would inherit pid 1: reap it here
                os.waitid(os.P_PIDFD, launcher, os.WEXITED | os.WNOHANG)
        stdout, stderr = _read_fd(out_fd, limits.output_bytes), _read_fd(err_fd, 4096)
        report = _read_fd(status_fd, 64).decode()
    finally:
        release()
    # no report: the launcher did not get to write one (a bare program can kill its launcher): a failure
    status = report if report in ("ok", "exit", "crash", "timeout", "not_compiled") else "exit"
    return stopped or status, stdout, stderr


def _watch(pidfd: int, deadline: float, limits: CodeLimits, cgroup: _Cgroup | None, oom_before: int,
           tree: int | None, sandbox_pid: int | None) -> str | None:
    """Wait until the run's process exits (None), the deadline passes ("timeout"), or the sandbox holds
    more than memory_bytes ("memory"): the kernel killed inside its cgroup for its limit; else every 20 ms
    the resident memory of the process tree (shared pages in each process: the sum errs high) and tmpfs."""
    while (left := deadline - time.monotonic()) > 0:
        if _readable(pidfd, min(left, 0.02)):
            return None
        if (cgroup and cgroup.oom_kills() > oom_before or tree and  # the tree and tmpfs: without a cgroup
                _tree_memory(tree) + _tmpfs_bytes(sandbox_pid, limits.tmp_bytes) > limits.memory_bytes):
            return "memory"
    return None if _readable(pidfd, 0) else "timeout"


def _tree_memory(pid: int) -> int:
    """Resident bytes of a process and its descendants (/proc/PID/task/TID/children: also the orphans)."""
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


def _tmpfs_bytes(sandbox_pid: int | None, size: int) -> int:
    """Bytes in the sandbox's /tmp and /dev/shm, seen through its pid 1's root (once that is the sandbox's)."""
    total = 0
    for folder in ("tmp", "dev/shm") if sandbox_pid else ():
        with contextlib.suppress(OSError):
            usage = os.statvfs(f"/proc/{sandbox_pid}/root/{folder}")
            total += (usage.f_blocks - usage.f_bfree) * usage.f_frsize if usage.f_blocks * usage.f_frsize == size else 0
    return total


def _readable(fd: int, seconds: float) -> bool:
    poller = select.poll()  # not select(): file descriptor numbers of a big process may pass 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


# --- tests and their outputs ------------------------------------------------------------------
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


def blank_output_tests(tests: dict) -> list[int]:
    """Stdin/stdout tests (indices) that expect a blank output, which any program printing nothing passes."""
    cases, fn_name = code_test_cases(tests)
    return [k for k, (_, want) in enumerate(cases) if fn_name is None and not want.strip()]


def _output_lines(text: str) -> list[str]:
    """Whitespace-normalized output: each line's words joined by one space; blank lines dropped."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def output_matches(stdout: bytes, expected, fn_name: str | None) -> bool:
    """stdin/stdout tests: whitespace-normalized lines equal, word by word (tokens_match). Call tests: the JSON return
    value matches the expected one (values_match), or its single element (datasets often store a value v as [v])."""
    if fn_name is None:
        got, want = _output_lines(stdout.decode("utf-8", "replace")), _output_lines(expected)
        return got == want or (len(got) == len(want) and all(
            len(g) == len(w) and all(map(tokens_match, g, w)) for g, w in zip((l.split() for l in got),
                                                                              (l.split() for l in want))))
    try:
        value = json.loads(stdout)
        return values_match(value, expected) or (isinstance(expected, list) and len(expected) == 1
                                                 and values_match(value, expected[0]))
    except (ValueError, RecursionError):  # nothing written, not JSON, or nested too deep to read
        return False


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)


def tokens_match(got: str, want: str) -> bool:
    """One output word against the expected one: equal, or both plain decimal numbers (no inf, nan, hex,
    separators) where an expected integer must be equal in value (2.0 = 2, +6 = 6; 1000000007.0 is not
    1000000006) and other expected numbers match within numbers_match's tolerance (0.3333333 = 1/3)."""
    if got == want:
        return True
    if not (_NUMBER.fullmatch(got) and _NUMBER.fullmatch(want)):
        return False
    if _INTEGER.fullmatch(want):
        with contextlib.suppress(InvalidOperation):  # an exponent past the decimal module's range
            return Decimal(got) == Decimal(want)  # exact, at any size
        return False
    return numbers_match(float(got), float(want))


def numbers_match(got: int | float, want: int | float) -> bool:
    """An expected integer exactly; any other expected number within 1e-8 + 1e-5 |want| (APPS/TACO's allclose)."""
    if isinstance(want, int):
        return got == want
    try:
        return math.isfinite(got) and math.isfinite(want) and abs(got - want) <= 1e-8 + 1e-5 * abs(want)
    except OverflowError:  # an integer too large for a float
        return False


def values_match(got, want) -> bool:
    """A call test's return value against the expected one, as JSON values: numbers as numbers_match has
    them (true and false are not numbers), lists item by item, objects key by key, the rest equal."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and numbers_match(got, want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(values_match, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(values_match(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


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


def run_tests(program: str | None, tests: dict | None, limits: CodeLimits, isolated: bool,
              clock=time.monotonic) -> CodeResult:
    """A program against its tests, one sandbox per test, in order. After a timeout, when the program
    does not compile, or when its tests together have taken limits.program_seconds (by clock), its
    remaining tests are not run ("skipped", failed): one program's grading takes at most program_seconds
    (plus the start and end of its last sandbox). A row with a blank expected output is an error."""
    try:
        cases, fn_name = code_test_cases(tests)
        if blank_output_tests(tests):
            raise ValueError("a test expects a blank output")
    except (KeyError, TypeError, ValueError):
        return CodeResult(["error"])  # a malformed row, not the model's fault
    if not program or not program.strip():
        return CodeResult(["fail"] * len(cases))
    outcomes, end = [], clock() + limits.program_seconds
    for stdin, expected in cases:
        left = end - clock()
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


# --- set-up -----------------------------------------------------------------------------------
def sandbox_unavailable() -> str | None:
    """None when a bubblewrap sandbox runs here, else why not (probed once per process)."""
    with _sandbox_probe_lock:
        if not _sandbox_probe:
            _sandbox_probe.append(_probe_sandbox())
        return _sandbox_probe[0]


def _probe_sandbox() -> str | None:
    """Start a sandbox with every guard the machine offers, else without the one it cannot start with
    (bwrap before 0.8 has no --disable-userns; a cgroup may refuse the process), else without any."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if not os.access(SANDBOX_PYTHON, os.X_OK):
        return f"{SANDBOX_PYTHON} does not exist"
    _active_guards(CodeLimits(), True)
    found = dict(_guards)
    for drop in ((), ("userns",), ("cgroup",), ("seccomp",), tuple(found)):
        _guards.update({name: None if name in drop else guard for name, guard in found.items()})
        status, stdout, stderr = run_program("print('ok')", b"", None, CodeLimits(time_seconds=30), isolated=True)
        if status == "ok" and stdout == b"ok\n":
            return None
    reason = stderr.decode("utf-8", "replace").strip().splitlines()
    return f"bwrap could not start a sandbox ({reason[0] if reason else status})"


def check_code_sandbox(rows: list[dict], allow_unsandboxed: bool, flag: str = "--allow_unsandboxed_code") -> None:
    """Scripts call this once with their rows: code rows need the sandbox (its protection printed in one
    line), or the user's consent to run model-written programs without isolation (flag); else one sentence."""
    _code_setup["allow_unsandboxed"] = allow_unsandboxed
    if not any(row["task"] == "code" for row in rows):
        return
    if _code_isolation(flag):
        print(f"code sandbox: {sandbox_protection()}", flush=True)
    else:
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
