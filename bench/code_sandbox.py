"""The cost of the code sandbox, and how well it contains hostile programs.

    python bench/code_sandbox.py [--programs 48] [--repeats 3]

Part 1, programs per second with 2 workers (2 cores): one batch of small programs (a third correct,
a third wrong, a third raising an exception), each run on 3 stdin/stdout tests, graded by
sandbox.run_code_tests_many through the bubblewrap sandbox, and the same batch as bare subprocesses
(the --allow_unsandboxed_code path: the same launcher and limits, no namespaces). Median of
--repeats batches each; the ratio is the cost of isolation.

Part 2, the attack suite (tests/test_code.py runs the same one): programs that connect to a loopback
listener of this process, read and write a canary file outside their folder, write into /usr,
fork-bomb, allocate 8 GB, hold 3.6 GB in four child processes (each under the per-process limit),
fill every writable filesystem with 1 MiB files, loop forever, print a gigabyte, try to kill the
grading process, sleep past the wall limit and leave a daemon behind, graded in one batch next to a
correct program. An attack is
contained when it scores 0 and its own check finds nothing outside (no connection, canary unchanged,
no file in /usr, no process left; the memory and filesystem attacks print their expected output only
when they got what they wanted). The batch must return within attack_bound(...) seconds.

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
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox import CodeLimits, CodeResult, run_code_tests_many, run_tests, sandbox_unavailable  # noqa: E402

# Sleepers left by the fork bomb, the wall-limit sleeper and the daemon carry these durations in their
# command lines, so that survivors can be found after the batch.
MARKERS = ("913.137", "913.138", "913.139")


@dataclass
class Attack:
    name: str
    program: str
    expected: str  # the output that would mean the attack worked


def attack_suite(folder: Path, port: int) -> tuple[list[Attack], Path]:
    """The hostile programs, and the canary file they go after: created here with a secret, readable and
    writable by every user, so that only the sandbox keeps it out of reach (also of user nobody)."""
    canary = folder / "canary.txt"
    canary.write_text("secret-7f3a")
    os.chmod(folder, 0o777)
    os.chmod(canary, 0o666)
    bomb, sleeper, daemon = MARKERS
    attacks = [
        Attack("network", f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                          "s.sendall(b'hello')\nprint(s.recv(16).decode())", "pong"),
        Attack("read_canary", f"print(open({str(canary)!r}).read())", "secret-7f3a"),
        Attack("write_canary", f"open({str(canary)!r}, 'w').write('pwned')\nprint('written')", "written"),
        Attack("write_usr", f"open('/usr/sandbox-canary-{os.getpid()}', 'w').write('x')\nprint('written')",
               "written"),
        Attack("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                            f"        os.execv('/bin/sleep', ['sleep', '{bomb}'])", "done"),
        Attack("allocate_8gb", "x = bytearray(8 * 1024 ** 3)\nprint('allocated')", "allocated"),
        Attack("memory_in_children", "import os, time\nreads = []\nfor _ in range(4):\n    r, w = os.pipe()\n"
                                     "    if os.fork() == 0:\n        block = b'x' * (900 << 20)\n"
                                     "        os.write(w, b'k')\n        time.sleep(3)\n        os._exit(0)\n"
                                     "    reads.append(r)\nif all(os.read(r, 1) == b'k' for r in reads):\n"
                                     "    print('held')", "held"),
        Attack("fill_filesystems", "total = 0\nfor folder in ('/', '/dev', '/dev/shm', '/tmp', '/proc'):\n"
                                   "    for i in range(1024):\n        try:\n"
                                   "            with open(f'{folder}/fill{i}', 'wb') as f:\n"
                                   "                f.write(b'x' * (1 << 20))\n        except OSError:\n"
                                   "            break\n        total += 1\n"
                                   "print('filled' if total >= 512 else total)", "filled"),
        Attack("infinite_loop", "while True:\n    pass", "done"),
        Attack("print_gigabyte", "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                                 "    sys.stdout.write(chunk)\nprint('done')", "done"),
        Attack("kill_parent", "import os, signal\n"
                              f"for pid in ({os.getpid()}, os.getppid(), 1, -1):\n    try:\n"
                              "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                              "print('tried')", "trainer killed"),
        Attack("sleep_past_wall", f"import os\nos.execv('/bin/sleep', ['sleep', '{sleeper}'])", "done"),
        Attack("daemon", "import os\nif os.fork() == 0:\n    os.setsid()\n"
                         f"    os.execv('/bin/sleep', ['sleep', '{daemon}'])\nprint('spawned')", "daemon left"),
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


def attack_bound(n_programs: int, limits: CodeLimits) -> float:
    """Seconds a batch of one-test programs may take: each worker runs ceil(n / workers) programs, each
    at most the wall limit plus 0.5 s to start and tear down a sandbox; plus 2 s for the pool."""
    return math.ceil(n_programs / limits.workers) * (limits.time_seconds + 0.5) + 2.0


def run_attacks(limits: CodeLimits, isolated: bool = True, names: tuple[str, ...] | None = None) -> dict:
    """Grade the attack suite (or the attacks in `names`) and a correct neighbor in one batch; per attack:
    its result and whether it was contained. Also the batch's wall time and whether the neighbor passed."""
    import tempfile

    listener = Listener()
    folder = Path(tempfile.mkdtemp(prefix="attack-"))
    attacks, canary = attack_suite(folder, listener.port)
    attacks = [a for a in attacks if names is None or a.name in names]
    usr_canary = Path(f"/usr/sandbox-canary-{os.getpid()}")
    jobs = [(a.program, {"inputs": [""], "outputs": [a.expected]}) for a in attacks] + [NEIGHBOR]
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
        "read_canary": False,
        "write_canary": canary_text != "secret-7f3a",
        "write_usr": usr_canary.exists(),
        "fork_bomb": bool(left[MARKERS[0]]),
        "sleep_past_wall": bool(left[MARKERS[1]]),
        "daemon": bool(left[MARKERS[2]]),
    }
    if usr_canary.exists():
        usr_canary.unlink()
    report = {a.name: {"outcomes": r.outcomes, "contained": r.passed == 0 and not escaped.get(a.name, False)}
              for a, r in zip(attacks, results)}
    return dict(attacks=report, seconds=seconds, bound=attack_bound(len(jobs), limits),
                neighbor_passed=results[-1].passed == 1, survivors=sum(map(len, left.values())),
                listener_connections=listener.connections)


# ----------------------------------------------------------------------------------------------
# part 1: throughput
# ----------------------------------------------------------------------------------------------
def benign_batch(n: int) -> list[tuple[str, dict]]:
    tests = {"inputs": ["1 2\n", "10 -4\n", "7 7\n"], "outputs": ["3\n", "6\n", "14\n"]}
    programs = ["a, b = map(int, input().split())\nprint(a + b)",
                "a, b = map(int, input().split())\nprint(a - b)",
                "a, b = map(int, input().split())\nprint(a / 0)"]
    return [(programs[i % 3], tests) for i in range(n)]


def programs_per_second(jobs, limits: CodeLimits, isolated: bool, repeats: int) -> tuple[float, list[CodeResult]]:
    from concurrent.futures import ThreadPoolExecutor

    rates, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(limits.workers) as pool:
            results = list(pool.map(lambda job: run_tests(job[0], job[1], limits, isolated), jobs))
        rates.append(len(jobs) / (time.perf_counter() - start))
    return statistics.median(rates), results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=48, help="programs per batch (3 tests each)")
    parser.add_argument("--repeats", type=int, default=3, help="batches per mode; the median rate is reported")
    parser.add_argument("--attack_time", type=float, default=1.5, help="wall limit per run in the attack suite")
    args = parser.parse_args()
    why = sandbox_unavailable()
    if why is not None:
        raise SystemExit(f"bench/code_sandbox.py measures the bubblewrap sandbox, but {why}; install it first "
                         "(bash install.sh as root, or apt-get install bubblewrap).")
    limits = CodeLimits(workers=2)
    jobs = benign_batch(args.programs)
    run_tests(*jobs[0], limits, True), run_tests(*jobs[0], limits, False)  # warm the page cache
    sandboxed, res_s = programs_per_second(jobs, limits, True, args.repeats)
    bare, res_b = programs_per_second(jobs, limits, False, args.repeats)
    assert [r.outcomes for r in res_s] == [r.outcomes for r in res_b], "the two modes graded differently"
    print(f"part 1: {args.programs} programs x 3 tests, 2 workers, median of {args.repeats}")
    print(f"  sandboxed (bwrap)  {sandboxed:7.1f} programs/s  ({3 * sandboxed:7.1f} runs/s)")
    print(f"  bare subprocess    {bare:7.1f} programs/s  ({3 * bare:7.1f} runs/s)")
    print(f"  isolation costs    {bare / sandboxed:7.2f}x")

    report = run_attacks(CodeLimits(time_seconds=args.attack_time, workers=2))
    contained = sum(a["contained"] for a in report["attacks"].values())
    total = len(report["attacks"])
    print(f"part 2: attack suite, wall limit {args.attack_time} s, 2 workers")
    for name, a in report["attacks"].items():
        print(f"  {name:<16} {'contained' if a['contained'] else 'ESCAPED':<10} {a['outcomes']}")
    print(f"  batch {report['seconds']:.1f} s (bound {report['bound']:.1f} s), neighbor passed: "
          f"{report['neighbor_passed']}, surviving processes: {report['survivors']}, "
          f"listener connections: {report['listener_connections']}")
    print(f"RESULT sandbox_programs_per_s={sandboxed:.1f} bare_programs_per_s={bare:.1f} "
          f"isolation_cost={bare / sandboxed:.2f} attacks_contained={contained}/{total} "
          f"attack_batch_s={report['seconds']:.1f} attack_bound_s={report['bound']:.1f}")


if __name__ == "__main__":
    main()
