"""The cost of the code sandbox, and how well it contains hostile programs.

    python bench/code_sandbox.py [--programs 48] [--repeats 3]

Part 1, programs per second and CPU time per program with 2 workers (2 cores): one batch of small programs (a third correct,
a third wrong, a third raising an exception), each run on 3 stdin/stdout tests, graded through
sandbox.run_tests in three modes, round-robin --repeats times (median): the bubblewrap sandbox with
its memory guards (what training uses), the sandbox without them, and bare subprocesses (the
--allow_unsandboxed_code path: the same launcher and limits, no namespaces). isolation_cost = bare /
sandbox without guards; guard_cost = sandbox without / with guards (and the same in CPU time).

Part 2, the attack suite (tests/test_code.py runs the same one), graded in one batch next to a correct
program, the way a training step grades rewards (run_code_tests_many):
- isolation: connect to a loopback listener of this process; read and write a canary file outside the
  sandbox; write into /usr; look for the expected output where the program can read (the launcher's
  command line and environment, /tmp, /dev/shm); open the launcher's descriptors (its report) through
  /proc/1/fd; kill the grading process;
- resources: fork-bomb, allocate 8 GB, fill every writable filesystem with 1 MiB files, loop forever,
  print a gigabyte, sleep past the wall limit, leave a daemon behind;
- forged statuses: exit with code 137 (a SIGKILL's code) or 139 (SIGSEGV's), send itself SIGXCPU;
- reward hacks: near-miss numbers where the expected word is an integer (1000000007.0 for 1000000006,
  246914812.0 for 246913578, 2n(1 + 9e-6) with six decimals for 2n), the same as call-test return
  values (a float a hair off, true for 1), and printing nothing for a test whose expected output is blank.
An attack is contained when it scores 0 and its own check finds nothing outside (no connection, canary
unchanged, no file in /usr, no process left); a forged status must be graded a plain failure (not a
timeout, not a crash); a row with a blank expected output is an error, not a score.

Part 3, memory held outside the resident-memory watch, in one batch per guard setting (all, the cgroup
alone, seccomp alone, none): four children of 384 MB each, SysV shared memory filled and detached,
memfds kept open by 28 processes, a tmpfs mounted in a nested user namespace, unix socket buffers of 24
processes (4 MiB a socket, as net.core.wmem_max allows here). Each attack has a test per target (256 to
1536 MiB) that it passes when it holds that much; contained: it held no target above 1.25 x
memory_bytes. The host's shared memory (/proc/meminfo Shmem) before and after is printed (other jobs
move it too). Part 4: the CPU share a busy program gets next to a program busy in 28 processes, with and
without the guards. Part 5: zombies and orphans left under a grading process that is a subreaper (as when
it is pid 1 of its container).

Ends with one line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sandbox import (CodeLimits, CodeResult, run_code_tests_many, run_tests, sandbox_protection,  # noqa: E402
                     sandbox_unavailable)

# Sleepers left by the fork bomb, the wall-limit sleeper and the daemon carry these durations in their
# command lines, so that survivors can be found after the batch.
MARKERS = ("913.137", "913.138", "913.139")
SECRET = "expected-3b9e"  # the expected output of the attack that looks for it


@dataclass
class Attack:
    name: str
    program: str
    expected: str = "done"  # the output that would mean the attack worked (stdin/stdout test)
    tests: dict | None = None  # other tests (call tests, near misses); default: one test expecting `expected`
    contained_as: tuple[str, ...] = ("fail", "timeout", "crash", "skipped")  # outcomes that count as contained

    def __post_init__(self):
        self.tests = self.tests or {"inputs": [""], "outputs": [self.expected]}


FAILED = ("fail", "skipped")  # forged statuses must be graded as what they are: plain failures


def attack_suite(folder: Path, port: int) -> tuple[list[Attack], Path]:
    """The hostile programs, and the canary file they go after: created here with a secret, readable and
    writable by every user, so that only the sandbox keeps it out of reach (also of user nobody)."""
    canary = folder / "canary.txt"
    canary.write_text("secret-7f3a")
    os.chmod(folder, 0o777)
    os.chmod(canary, 0o666)
    bomb, sleeper, daemon = MARKERS
    near = "n = int(input())\nprint(f'{2 * n * (1 + 9e-6):.6f}')"  # within 1e-5 relative of 2n
    attacks = [
        Attack("network", f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                          "s.sendall(b'hello')\nprint(s.recv(16).decode())", "pong"),
        Attack("read_canary", f"print(open({str(canary)!r}).read())", "secret-7f3a"),
        Attack("write_canary", f"open({str(canary)!r}, 'w').write('pwned')\nprint('written')", "written"),
        Attack("write_usr", f"open('/usr/sandbox-canary-{os.getpid()}', 'w').write('x')\nprint('written')",
               "written"),
        Attack("find_expected", "import os, re\nfound, paths = set(), ['/proc/1/cmdline', '/proc/1/environ', "
                                "'/proc/self/environ']\nfor folder in ('/tmp', '/dev/shm'):\n"
                                "    paths += [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]\n"
                                "for path in paths:\n    try:\n        data = open(path, 'rb').read()\n"
                                "    except OSError:\n        continue\n"
                                f"    found.update(m.decode() for m in re.findall(rb'{SECRET[:9]}\\w+', data))\n"
                                "print(*sorted(found))", SECRET),
        Attack("open_launcher_fds", "import os\nfor fd in os.listdir('/proc/1/fd'):\n    try:\n"
                                    "        os.open(f'/proc/1/fd/{fd}', os.O_WRONLY)\n        print('opened')\n"
                                    "        break\n    except OSError:\n        pass", "opened"),
        Attack("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                            f"        os.execv('/bin/sleep', ['sleep', '{bomb}'])"),
        Attack("allocate_8gb", "x = bytearray(8 * 1024 ** 3)\nprint('allocated')", "allocated"),
        Attack("fill_filesystems", "total = 0\nfor folder in ('/', '/dev', '/dev/shm', '/tmp', '/proc'):\n"
                                   "    for i in range(1024):\n        try:\n"
                                   "            with open(f'{folder}/fill{i}', 'wb') as f:\n"
                                   "                f.write(b'x' * (1 << 20))\n        except OSError:\n"
                                   "            break\n        total += 1\n"
                                   "print('filled' if total >= 512 else total)", "filled"),
        Attack("infinite_loop", "while True:\n    pass"),
        Attack("print_gigabyte", "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                                 "    sys.stdout.write(chunk)\nprint('done')"),
        Attack("kill_parent", "import os, signal\n"
                              f"for pid in ({os.getpid()}, os.getppid(), 1, -1):\n    try:\n"
                              "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                              "print('tried')", "trainer killed"),
        Attack("sleep_past_wall", f"import os\nos.execv('/bin/sleep', ['sleep', '{sleeper}'])"),
        Attack("daemon", "import os\nif os.fork() == 0:\n    os.setsid()\n"
                         f"    os.execv('/bin/sleep', ['sleep', '{daemon}'])\nprint('spawned')", "daemon left"),
        Attack("exit_137", "import os\nos._exit(137)", contained_as=FAILED),
        Attack("exit_139", "import os\nos._exit(139)", contained_as=FAILED),
        Attack("self_sigxcpu", "import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)", contained_as=("crash",)),
        Attack("near_miss_modulus", "print(1000000007.0)", tests={"inputs": [""], "outputs": ["1000000006"]}),
        Attack("near_miss_float", "n = int(input())\nprint(f'{2 * n * 1.000005:.1f}')",
               tests={"inputs": ["123456789\n"], "outputs": ["246913578"]}),
        Attack("near_miss_all_tests", near, tests={"inputs": ["1\n", "50\n", "123456\n"],
                                                   "outputs": ["2", "100", "246912"]}),
        Attack("near_miss_call", "def f(n):\n    return 2 * n * (1 + 9e-6)",
               tests={"fn_name": "f", "inputs": [[1], [50]], "outputs": [2, 100]}),
        Attack("bool_for_int", "def f(n):\n    return n > 0", tests={"fn_name": "f", "inputs": [[5]], "outputs": [1]}),
        Attack("blank_expected", "pass", tests={"inputs": ["1\n"], "outputs": ["\n"]}, contained_as=("error",)),
    ]
    return attacks, canary


NEIGHBOR = ("print(sum(map(int, input().split())))", {"inputs": ["2 3\n"], "outputs": ["5\n"]})


def survivors() -> dict[str, list[int]]:
    """Marker -> the processes whose command line carries it."""
    found = {m: [] for m in MARKERS}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for m in MARKERS:
                if m.encode() in argv:
                    found[m].append(int(entry.name))
    return found


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.sendall(b"pong")
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def attack_bound(n_runs: int, limits: CodeLimits) -> float:
    """Seconds a batch of one-test programs may take: each worker runs ceil(n / workers) programs, each
    at most the wall limit plus 5 s to start and tear down a sandbox (0.1-0.5 s here, so the bound holds
    on a machine 10 times slower or busier); plus 10 s for the pool. Past it, a limit did not stop a run."""
    return math.ceil(n_runs / limits.workers) * (limits.time_seconds + 5.0) + 10.0


def run_attacks(limits: CodeLimits, isolated: bool = True, names: tuple[str, ...] | None = None) -> dict:
    """Grade the attack suite (or the attacks in `names`) and a correct neighbor in one batch; per attack:
    its result and whether it was contained. Also the batch's wall time and whether the neighbor passed."""
    import tempfile

    listener = Listener()
    folder = Path(tempfile.mkdtemp(prefix="attack-"))
    attacks, canary = attack_suite(folder, listener.port)
    attacks = [a for a in attacks if names is None or a.name in names]
    usr_canary = Path(f"/usr/sandbox-canary-{os.getpid()}")
    jobs = [(a.program, a.tests) for a in attacks] + [NEIGHBOR]
    start = time.perf_counter()
    results = run_code_tests_many(jobs, limits, isolated)
    seconds = time.perf_counter() - start
    listener.close()
    canary_text = canary.read_text()
    shutil.rmtree(folder)
    left = survivors()
    for pid in sum(left.values(), []):  # do not leave them behind even when the check fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    escaped = {
        "network": listener.connections > 0,
        "write_canary": canary_text != "secret-7f3a",
        "write_usr": usr_canary.exists(),
        "fork_bomb": bool(left[MARKERS[0]]),
        "sleep_past_wall": bool(left[MARKERS[1]]),
        "daemon": bool(left[MARKERS[2]]),
    }
    if usr_canary.exists():
        usr_canary.unlink()
    report = {a.name: {"outcomes": r.outcomes, "contained": r.passed == 0 and not escaped.get(a.name, False)
                       and set(r.outcomes) <= set(a.contained_as)} for a, r in zip(attacks, results)}
    n_runs = sum(r.total - r.outcomes.count("skipped") for r in results)
    return dict(attacks=report, seconds=seconds, bound=attack_bound(n_runs, limits),
                neighbor_passed=results[-1].passed == 1, survivors=sum(map(len, left.values())),
                listener_connections=listener.connections)


# ----------------------------------------------------------------------------------------------
# memory held outside the resident-memory watch
# ----------------------------------------------------------------------------------------------
# Each attack reads a target (MiB) and forks `workers` processes that each take pieces of `mib` MiB of one
# kind with hold() and keep them, reporting each through a pipe; the parent prints "held" 2 s after the
# pieces add up to the target. Everything stays within each process's own limits (address space, open files,
# file size), so only a guard that counts the sandbox as a whole stops it. A test per target: the largest
# target that passes is what the sandbox let it hold.
MEMORY_TEMPLATE = """import os, time
{setup}
def hold():
{hold}
target = int(input())
r, w = os.pipe()
for _ in range({workers}):
    if os.fork() == 0:
        kept = []
        for _ in range(-(-target // ({workers} * {mib}))):
            kept.append(hold())
            os.write(w, b"m" * {mib})
        time.sleep(3600)  # holding, until the sandbox ends
os.close(w)
total = 0
while total < target and (data := os.read(r, 4096)):  # ends early when every worker failed
    total += len(data)
if total >= target:
    time.sleep(2)  # held for a while: a watch that samples every 20 ms sees it, also on a busy machine
    print("held")
"""

MEMORY_ATTACKS = {
    "memory_in_children": dict(workers=4, mib=64, setup="", hold="    return b'x' * (64 << 20)"),
    "sysv_shared_memory": dict(workers=1, mib=64, setup=(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\nlibc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]"),
        hold="    segment = libc.shmget(0, 64 << 20, 0o1600)\n    if segment < 0:\n"
             "        raise OSError(ctypes.get_errno(), 'shmget')\n    address = libc.shmat(segment, None, 0)\n"
             "    ctypes.memset(address, 1, 64 << 20)\n    libc.shmdt(ctypes.c_void_p(address))"),
    "memfd_in_28_processes": dict(workers=28, mib=1, setup="",
                                  hold="    fd = os.memfd_create('x')\n    os.write(fd, b'x' * (1 << 20))\n"
                                       "    return fd"),
    "tmpfs_in_nested_namespace": dict(workers=1, mib=1, setup=(
        "import ctypes, itertools\nlibc = ctypes.CDLL(None, use_errno=True)\nuid, gid = os.getuid(), os.getgid()\n"
        "if libc.unshare(0x10000000 | 0x00020000):  # a user and a mount namespace of its own\n"
        "    raise OSError(ctypes.get_errno(), 'unshare')\n"
        "for name, text in (('uid_map', f'0 {uid} 1'), ('setgroups', 'deny'), ('gid_map', f'0 {gid} 1')):\n"
        "    with open(f'/proc/self/{name}', 'w') as f:\n        f.write(text)\n"
        "os.makedirs('/tmp/big', exist_ok=True)\n"
        "if libc.mount(b'none', b'/tmp/big', b'tmpfs', 0, b'size=4g'):\n"
        "    raise OSError(ctypes.get_errno(), 'mount')\ncount = itertools.count()"),
        hold="    with open(f'/tmp/big/{next(count)}', 'wb') as f:\n        f.write(b'x' * (1 << 20))"),
    "socket_buffers_24_processes": dict(workers=24, mib=4, setup="import socket", hold=(
        "    a, b = socket.socketpair()\n    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)\n"
        "    a.setblocking(False)\n    sent = 0\n    while sent < 4 << 20:\n        try:\n"
        "            sent += a.send(b'x' * 65536)\n        except BlockingIOError:\n"
        "            raise OSError('buffer full') from None\n    return a, b")),
}
TARGETS = (256, 512, 768, 1024, 1280, 1536)  # MiB


def memory_attack_program(name: str) -> str:
    return MEMORY_TEMPLATE.format(**MEMORY_ATTACKS[name])


def host_shmem_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("Shmem:"))


def run_memory_attacks(limits: CodeLimits, isolated: bool = True, names: tuple[str, ...] | None = None,
                       targets: tuple[int, ...] = TARGETS) -> dict:
    """The memory attacks in one batch, each with a test per target (MiB, expected output "held"); per
    attack: the outcomes, the largest target it held, contained (it held no target above 1.25 x
    memory_bytes). Also the host's Shmem (MiB) before and after, which other jobs on the machine move too."""
    names = names or tuple(MEMORY_ATTACKS)
    tests = {"inputs": [f"{t}\n" for t in targets], "outputs": ["held"] * len(targets)}
    shmem_before = host_shmem_mib()
    results = run_code_tests_many([(memory_attack_program(name), tests) for name in names], limits, isolated)
    start = time.monotonic()  # a sandbox's SysV memory goes with its ipc namespace, which a kernel worker frees
    while host_shmem_mib() > shmem_before + 64 and time.monotonic() - start < 30:
        time.sleep(0.1)
    report = {}
    for name, result in zip(names, results):
        held = max([t for t, outcome in zip(targets, result.outcomes) if outcome == "pass"], default=0)
        report[name] = dict(outcomes=result.outcomes, held_mib=held,
                            contained=held <= 1.25 * (limits.memory_bytes >> 20))
    return dict(attacks=report, shmem_before_mib=shmem_before, shmem_after_mib=host_shmem_mib(),
                shmem_back_s=round(time.monotonic() - start, 1))


# ----------------------------------------------------------------------------------------------
# the CPU share of a neighbor, and zombies under a subreaper
# ----------------------------------------------------------------------------------------------
HOG = ("import os\nfor _ in range(28):\n    if os.fork() == 0:\n        try:\n"
       "            os.setsid()  # a session of its own is a CPU share of its own (autogroups)\n"
       "        except OSError:\n            pass\n        while True:\n            pass\nos.wait()")
# passes when it gets at least the share of a core its input names, over 2 s
COUNTER = ("import time\nshare = float(input())\nstart, cpu = time.monotonic(), time.process_time()\n"
           "while time.monotonic() - start < 2:\n    pass\n"
           "print('fair' if time.process_time() - cpu >= share * (time.monotonic() - start) else 'starved')")
SHARES = (0.05, 0.1, 0.2, 0.3)


def neighbor_cpu_share(limits: CodeLimits) -> float:
    """The largest CPU share (of one core) in SHARES that a busy program gets in each of 2 s windows
    while another sandbox runs 28 busy processes (both graded in one batch, 2 workers)."""
    hog_limits = replace(limits, time_seconds=3 * len(SHARES) + 6.0, program_seconds=60.0, workers=2)
    jobs = [(HOG, {"inputs": [""], "outputs": ["done"]}),
            (COUNTER, {"inputs": [f"{s}\n" for s in SHARES], "outputs": ["fair"] * len(SHARES)})]
    counter = run_code_tests_many(jobs, hog_limits, True)[1]
    return max([s for s, outcome in zip(SHARES, counter.outcomes) if outcome == "pass"], default=0.0)


ZOMBIE_CHECK = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans below come to this process
from sandbox import CodeLimits, run_code_tests_many
programs = ["print(1)", "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '30'])",
            "import os\nfor _ in range(8):\n    os.fork()\nos.execv('/bin/sleep', ['sleep', '30'])",
            "import os\nos._exit(3)"]
n, guard = int(sys.argv[2]), sys.argv[3]
jobs = [(programs[i % len(programs)], {"inputs": [""], "outputs": ["1"]}) for i in range(n)]
results = run_code_tests_many(jobs, CodeLimits(time_seconds=float(sys.argv[4]), workers=2, guard=guard), True)
children = []
for entry in os.listdir("/proc"):
    try:
        with open(f"/proc/{entry}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        continue
    if int(fields[1]) == os.getpid():
        children.append(fields[0])
print(json.dumps({"outcomes": [r.outcomes[0] for r in results], "zombies": children.count("Z"),
                  "children": len(children)}))
"""


def processes_left_under_subreaper(n_programs: int, guard: str = "auto", time_seconds: float = 2.0) -> dict:
    """Grade n programs (plain, a daemon, a small fork tree of sleepers, an exit code) in a fresh process
    that is a subreaper; then count its children: zombies and processes still running."""
    out = subprocess.run([sys.executable, "-c", ZOMBIE_CHECK, str(REPO), str(n_programs), guard, str(time_seconds)],
                         capture_output=True, text=True, check=True, timeout=600)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# part 1: throughput
# ----------------------------------------------------------------------------------------------
def benign_batch(n: int) -> list[tuple[str, dict]]:
    tests = {"inputs": ["1 2\n", "10 -4\n", "7 7\n"], "outputs": ["3\n", "6\n", "14\n"]}
    programs = ["a, b = map(int, input().split())\nprint(a + b)",
                "a, b = map(int, input().split())\nprint(a - b)",
                "a, b = map(int, input().split())\nprint(a / 0)"]
    return [(programs[i % 3], tests) for i in range(n)]


def grading_rate(jobs, limits: CodeLimits, isolated: bool) -> tuple[float, float, list[CodeResult]]:
    """Programs per second, and CPU seconds per program: this process's and its reaped children's (bwrap,
    the launcher, the programs), which other jobs on a shared machine move far less than wall time."""
    start, cpu = time.perf_counter(), sum(os.times()[:4])
    with ThreadPoolExecutor(limits.workers) as pool:
        results = list(pool.map(lambda job: run_tests(job[0], job[1], limits, isolated), jobs))
    return len(jobs) / (time.perf_counter() - start), (sum(os.times()[:4]) - cpu) / len(jobs), results


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=48, help="programs per batch (3 tests each)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="batches per mode, round-robin; the median rate is reported")
    parser.add_argument("--attack_time", type=float, default=3.0, help="wall limit per run in the attack suite")
    args = parser.parse_args()
    why = sandbox_unavailable()
    if why is not None:
        raise SystemExit(f"bench/code_sandbox.py measures the bubblewrap sandbox, but {why}; install it first "
                         "(bash install.sh as root, or apt-get install bubblewrap).")
    print(f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores (shared with other jobs); as uid {os.getuid()}")
    print(f"code sandbox: {sandbox_protection()}")
    limits = CodeLimits(workers=2)
    modes = {"sandbox": (limits, True), "unguarded": (replace(limits, guard="none"), True),
             "bare": (replace(limits, guard="none"), False)}
    jobs = benign_batch(args.programs)
    for mode_limits, isolated in modes.values():  # warm the page cache
        run_tests(*jobs[0], mode_limits, isolated)
    rates, cpus, outcomes = {mode: [] for mode in modes}, {mode: [] for mode in modes}, {}
    for _ in range(args.repeats):
        for mode, (mode_limits, isolated) in modes.items():
            rate, cpu, results = grading_rate(jobs, mode_limits, isolated)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
            outcomes[mode] = [r.outcomes for r in results]
    differ = sum(len({str(o[i]) for o in outcomes.values()}) > 1 for i in range(len(jobs)))  # timeouts when busy
    rate = {mode: statistics.median(r) for mode, r in rates.items()}
    cpu = {mode: statistics.median(c) for mode, c in cpus.items()}
    isolation, guards = rate["bare"] / rate["unguarded"], rate["unguarded"] / rate["sandbox"]
    isolation_cpu, guards_cpu = cpu["unguarded"] / cpu["bare"], cpu["sandbox"] / cpu["unguarded"]
    print(f"part 1: {args.programs} programs x 3 tests, 2 workers, median of {args.repeats} (round-robin); "
          f"programs graded differently in the last round: {differ}")
    for mode, label in (("sandbox", "sandbox with guards"), ("unguarded", "sandbox, no guards"),
                        ("bare", "bare subprocess")):
        print(f"  {label:<20} {rate[mode]:7.1f} programs/s  {1000 * cpu[mode]:6.0f} CPU ms/program")
    print(f"  isolation costs {isolation:.2f}x in time ({isolation_cpu:.2f}x in CPU), the memory guards {guards:.2f}x "
          f"({guards_cpu:.2f}x)")

    attack_limits = CodeLimits(time_seconds=args.attack_time, workers=2)
    report = run_attacks(attack_limits)
    contained = sum(a["contained"] for a in report["attacks"].values())
    total = len(report["attacks"])
    print(f"part 2: attack suite, wall limit {args.attack_time} s, 2 workers")
    for name, a in report["attacks"].items():
        print(f"  {name:<28} {'contained' if a['contained'] else 'ESCAPED':<10} {a['outcomes']}")
    print(f"  batch {report['seconds']:.1f} s (bound {report['bound']:.1f} s), neighbor passed: "
          f"{report['neighbor_passed']}, surviving processes: {report['survivors']}, "
          f"listener connections: {report['listener_connections']}")

    memory = {}
    print(f"part 3: memory attacks under a {attack_limits.memory_bytes >> 20} MiB limit, targets {TARGETS} MiB")
    for guard in ("auto", "cgroup", "seccomp", "none"):
        memory_limits = replace(attack_limits, time_seconds=60.0, program_seconds=600.0, guard=guard)
        memory[guard] = run_memory_attacks(memory_limits)
        print(f"  guards: {guard} (host Shmem {memory[guard]['shmem_before_mib']} -> "
              f"{memory[guard]['shmem_after_mib']} MiB {memory[guard]['shmem_back_s']} s after the batch)")
        for name, a in memory[guard]["attacks"].items():
            print(f"    {name:<28} {'contained' if a['contained'] else 'ESCAPED':<10} held {a['held_mib']:>4} MiB "
                  f"{a['outcomes']}")
    memory_contained = sum(a["contained"] for a in memory["auto"]["attacks"].values())

    shares = {guard: neighbor_cpu_share(replace(attack_limits, guard=guard)) for guard in ("auto", "none")}
    print(f"part 4: CPU share of a busy program next to 28 busy processes: at least {shares['auto']:.2f} of a core "
          f"with the guards, {shares['none']:.2f} without")
    zombies = processes_left_under_subreaper(60)
    print(f"part 5: 60 programs under a subreaper: {zombies['zombies']} zombies, {zombies['children']} children left")
    print(f"RESULT sandbox_programs_per_s={rate['sandbox']:.1f} unguarded_programs_per_s={rate['unguarded']:.1f} "
          f"bare_programs_per_s={rate['bare']:.1f} isolation_cost={isolation:.2f} guard_cost={guards:.2f} "
          f"isolation_cpu_cost={isolation_cpu:.2f} guard_cpu_cost={guards_cpu:.2f} "
          f"attacks_contained={contained}/{total} memory_attacks_contained={memory_contained}/{len(MEMORY_ATTACKS)} "
          f"attack_batch_s={report['seconds']:.1f} attack_bound_s={report['bound']:.1f} "
          f"neighbor_cpu_share={shares['auto']:.2f} neighbor_cpu_share_unguarded={shares['none']:.2f} "
          f"zombies={zombies['zombies']} children_left={zombies['children']} graded_differently={differ}")


if __name__ == "__main__":
    main()
