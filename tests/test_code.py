"""The code task: program extraction, test reading and output matching, hand-written programs scored
through grading.score_completions with hand-computed rewards, and the sandbox against hostile programs.

No test here depends on the machine's speed: budgets are checked on a fake clock; a real program that
must finish gets 60 s (LONG), one that must time out 1-2 s, and a batch where both meet 15 s (MIXED); a
sandboxed "print" takes 0.1-0.25 s on 2 idle cores, over 3 s on 2 cores shared with 16 busy processes.
The only upper bounds on wall time are bounds a limit that did not act would miss by minutes."""

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sandbox
from grading import extract_answer, format_ok, last_code_block, score_completions
from sandbox import (CodeLimits, blank_output_tests, code_test_cases, output_matches, run_program, run_tests,
                     sandbox_unavailable, tokens_match, values_match)
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import code_sandbox  # noqa: E402  the attack suite, shared with the benchmark

LONG = CodeLimits(time_seconds=60.0, program_seconds=300.0, workers=2)  # for runs that must finish
MIXED = replace(LONG, time_seconds=15.0)  # a batch where a program times out and its neighbor must pass


@pytest.fixture(autouse=True)
def long_limits(monkeypatch):
    """score_completions grades with the scripts' limits: here LONG, unless a test sets others."""
    monkeypatch.setitem(sandbox._code_setup, "limits", LONG)


@pytest.fixture(scope="module")
def bwrap():
    """Tests that need the bubblewrap sandbox itself fail (not skip) where it cannot start."""
    why = sandbox_unavailable()
    assert why is None, f"the code sandbox cannot start here ({why}); CI installs bubblewrap with install.sh as root"


# --- extraction -------------------------------------------------------------------------------
def test_last_fenced_python_block_is_the_program():
    text = "Idea:\n```python\nprint(1)\n```\nBetter:\n```Python3\nprint(2)\n```\nDone."
    assert last_code_block(text) == "print(2)\n" and extract_answer(text, "code") == "print(2)\n"
    assert format_ok(text, "code")
    cut = "```python\nprint(1)\n```\n```py\nx = 1\nprint(x"  # cut at max tokens: runs to the end
    assert extract_answer(cut, "code") == "x = 1\nprint(x" and not format_ok(cut, "code")
    bare = "print(3)"  # no fence: the completion is the program (PRIME's verifier), but not the format
    assert extract_answer(bare, "code") == "print(3)" and not format_ok(bare, "code")
    assert extract_answer("```\nprint(4)\n```", "code") == "```\nprint(4)\n```"  # no language: not Python
    assert not format_ok("```python\n   \n```", "code")  # an empty block
    assert last_code_block("```python\nx = 1\n``` then ``` again") == "x = 1\n"  # to its first closing fence
    assert last_code_block("```python\n```") == ""  # closed at once
    assert last_code_block("no fence ```") is None
    # the last block decides: closed blocks before an unclosed one do not count
    assert not format_ok("```python\na = 1\n```\n```python\nb = 2\n```\n```python\nc = 3", "code")


def test_tests_of_both_styles_are_read():
    cases, fn = code_test_cases({"inputs": ["1 2\n", ["3", "4"]], "outputs": ["3\n", ["7"]]})
    assert fn is None and cases == [(b"1 2\n", "3\n"), (b"3\n4", "7")]  # a list of lines is joined
    cases, fn = code_test_cases({"fn_name": "f", "inputs": [[1, [2]], "s"], "outputs": [[3], "t"]})
    assert fn == "f" and cases == [(b"[1, [2]]", [3]), (b'["s"]', "t")]  # a bare argument is one argument
    for bad in ({"inputs": ["1"], "outputs": []}, {"inputs": [], "outputs": []}, {"inputs": "1", "outputs": "1"}):
        with pytest.raises(ValueError):
            code_test_cases(bad)


def test_output_matching():
    assert output_matches(b"1  2 \n\n3\n", "1 2\n3", None)  # whitespace-normalized lines
    assert not output_matches(b"1 2 3\n", "1 2\n3", None)  # line structure still counts
    assert not output_matches(b"", "0\n", None)
    assert output_matches(b"[0, 1]", [[0, 1]], "f") and output_matches(b"[0, 1]", [0, 1], "f")  # [v] stores v
    assert not output_matches(b"0", [0, 1], "f")  # only a one-element list is unwrapped
    assert not output_matches(b"not json", "x", "f") and output_matches(b'"x"', "x", "f")


def test_an_expected_integer_must_be_equal_in_value():
    """Near misses of an expected integer fail, whatever their spelling; equal values in another spelling pass."""
    for got, want in (("1000000007.0", "1000000006"), ("246914812.0", "246913578"),  # within 1e-5 relative
                      ("2.000018", "2"), ("100.000900", "100"),  # 2n(1 + 9e-6) with six decimals, n = 1 and 50
                      ("100000.9", "100000"), ("6.0000001", "6"), ("1e999999999999999999999", "1"),
                      ("0x10", "16"), ("1_000", "1000"), ("\u0661\u0660", "10"), ("inf", "1"), ("nan", "0")):
        assert not tokens_match(got, want), (got, want)
    for got, want in (("2.0", "2"), ("+6", "6"), ("6.", "6"), ("1e3", "1000"), ("-0", "0"), ("007", "7"),
                      ("1000000006.000", "1000000006"), ("12345678901234567891.0", "12345678901234567891")):
        assert tokens_match(got, want), (got, want)


def test_other_expected_numbers_match_within_the_apps_tolerance():
    """|got - want| <= 1e-8 + 1e-5 |want| where the expected word is not an integer (the APPS/TACO checkers)."""
    assert output_matches(b"0.3333333333\n", "0.333333333333", None)  # difference 3.3e-13
    assert output_matches(b"YES 100000.9\n", "YES 100000.0", None)  # 0.9 <= 1e-8 + 1e-5 * 100000 = 1.00000001
    assert not output_matches(b"100001.1\n", "100000.0", None)  # 1.1 > 1.00000001
    assert not output_matches(b"0.33\n", "0.333", None)  # 0.003 > 1e-8 + 3.33e-6
    assert not output_matches(b"2.0 3\n", "2", None) and not output_matches(b"YES\n", "NO", None)
    assert not output_matches(b"inf\n", "1e308", None) and not output_matches(b"1e400\n", "1e308", None)


def test_call_test_return_values_match_as_numbers():
    assert values_match(2.0, 2) and values_match([1, 2.0], [1, 2]) and values_match({"a": 1.0}, {"a": 1})
    assert values_match(0.30000000000000004, 0.3) and values_match(None, None) and values_match(True, True)
    assert not values_match(1000000007.0, 1000000006) and not values_match(2 * (1 + 9e-6), 2)
    assert not values_match(True, 1) and not values_match(0, False)  # true and false are not numbers
    assert not values_match("2", 2) and not values_match(10 ** 400, 1.5) and not values_match([1], [1, 2])
    assert not output_matches(b"1000000007.0", 1000000006, "f") and output_matches(b"2.0", [2], "f")


def test_a_test_that_expects_blank_output_is_an_error_not_a_free_pass():
    tests = {"inputs": ["1\n", "2\n"], "outputs": ["1\n", " \n"]}
    assert blank_output_tests(tests) == [1]
    assert blank_output_tests({"fn_name": "f", "inputs": [1], "outputs": [""]}) == []  # a call test returns ""
    assert run_tests("pass", tests, LONG, isolated=False).outcomes == ["error"]
    scores, errors = score_completions([code_row(tests)], [fenced("print(input())\n")])
    assert scores[0].correct == 0.0 and errors == 1


def test_a_return_value_nested_too_deep_to_read_fails_without_stopping_the_batch(bwrap):
    """The program replaces json.dumps, so that the launcher writes 100,000 nested brackets: reading them
    raises RecursionError in the grading process; the test fails, the batch goes on."""
    deep = "import json\njson.dumps = lambda v: '[' * 100000 + ']' * 100000\ndef f(x):\n    return x\n"
    calls = {"fn_name": "f", "inputs": [[1]], "outputs": [1]}
    scores, errors = score_completions([code_row(calls)] * 2, [fenced(deep), fenced("def f(x):\n    return x\n")])
    assert [s.correct for s in scores] == [0.0, 1.0] and errors == 0


def test_a_programs_tests_share_one_time_budget(monkeypatch):
    """On a fake clock, each run takes 0.9 s: with 1.5 s per test and 3 s per program, runs 1-3 pass (the
    third gets the 1.2 s left), the 4th gets 0.3 s and times out, the other 4 are skipped."""
    now, given = [0.0], []

    def run_program(program, stdin, fn_name, limits, isolated):
        given.append(limits.time_seconds)
        now[0] += min(0.9, limits.time_seconds)
        return ("ok", b"1\n", b"") if limits.time_seconds >= 0.9 else ("timeout", b"", b"")

    monkeypatch.setattr(sandbox, "run_program", run_program)
    result = run_tests("print(1)", {"inputs": [""] * 8, "outputs": ["1"] * 8},
                       CodeLimits(time_seconds=1.5, program_seconds=3.0), True, clock=lambda: now[0])
    assert result.outcomes == ["pass"] * 3 + ["timeout"] + ["skipped"] * 4
    assert given == pytest.approx([1.5, 1.5, 1.2, 0.3])


def test_the_program_budget_cuts_a_real_run(bwrap):
    """A program sleeping 300 s under a 600 s test limit and a 1 s program budget is cut at the budget:
    were the budget not applied, the call would take 300 s, not the 60 s bound."""
    start = time.monotonic()
    result = run_tests("import time\ntime.sleep(300)", {"inputs": [""] * 3, "outputs": ["1"] * 3},
                       CodeLimits(time_seconds=600, program_seconds=1.0), True)
    assert result.outcomes == ["timeout", "skipped", "skipped"]
    assert 1.0 <= time.monotonic() - start < 60


def test_a_program_that_writes_like_bwrap_is_not_a_sandbox_error(bwrap):
    fake = "import sys\nsys.stderr.write('bwrap: Can not mount tmpfs')\nsys.exit(1)"
    assert run_program(fake, b"", None, LONG, True)[0] == "exit"


# --- scoring hand-written programs, as completions --------------------------------------------
SUM_TESTS = {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]}
TWO_SUM_TESTS = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[3, 3], 6]],
                 "outputs": [[[0, 1]], [[1, 2]], [[0, 1]]]}
READ = "a, b = map(int, input().split())\n"


def code_row(tests):
    return {"id": "c", "task": "code", "prompt": [], "answer": "", "metadata": {"tests": tests, "answer_style": "code"}}


def fenced(program):
    return f"Reasoning first.\n```python\n{program}```\n"


COMPLETIONS = [  # (tests, completion, correct, tests passed, format)
    (SUM_TESTS, fenced(READ + "print(a + b)\n"), 1.0, 1.0, 1.0),
    (SUM_TESTS, fenced(READ + "print(a + b, end='  \\n\\n')\n"), 1.0, 1.0, 1.0),  # spacing does not count
    (SUM_TESTS, fenced(READ + "print(a - b - 1)\n"), 0.0, 0.0, 1.0),  # -2, 12, -1: all wrong
    (SUM_TESTS, fenced(READ + "print(a + b if a > 0 else 1)\n"), 0.0, 2 / 3, 1.0),  # "0 0" -> 1
    (SUM_TESTS, fenced(READ + "assert a, 'zero'\nprint(a + b)\n"), 0.0, 2 / 3, 1.0),  # raises on "0 0"
    (SUM_TESTS, READ + "print(a + b)", 1.0, 1.0, 0.0),  # no fence: the whole completion runs
    (SUM_TESTS, fenced("def f(:\n"), 0.0, 0.0, 1.0),  # does not compile
    (TWO_SUM_TESTS, fenced("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                           "        for i in range(len(nums)):\n            for j in range(i + 1, len(nums)):\n"
                           "                if nums[i] + nums[j] == target:\n"
                           "                    print('found')\n                    return (i, j)\n"),
     1.0, 1.0, 1.0),  # a tuple is compared as a list; its prints are not the return value
    (TWO_SUM_TESTS, fenced("class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n"),
     0.0, 2 / 3, 1.0),
    (TWO_SUM_TESTS, fenced("def twoSum(nums, target):\n    return [1, 0]\n"), 0.0, 0.0, 1.0),
    ({"fn_name": "rev", "inputs": [["a b"], ["x"]], "outputs": ["b a", "x"]},
     fenced("def rev(s):\n    return ' '.join(reversed(s.split()))\n"), 1.0, 1.0, 1.0),  # a top-level function
]


def test_hand_written_programs_through_score_completions(bwrap):
    scores, errors = score_completions([code_row(t) for t, *_ in COMPLETIONS], [c for _, c, *_ in COMPLETIONS])
    assert errors == 0 and not any(s.timed_out for s in scores)
    for s, (_, completion, correct, passed, fmt) in zip(scores, COMPLETIONS):
        assert (s.correct, s.format) == (correct, fmt), completion
        assert s.tests_passed == pytest.approx(passed), completion
    assert scores[0].pred == READ + "print(a + b)\n"  # the program that ran


def test_grpo_code_term_is_the_share_of_tests_passed(bwrap):
    from grpo_logprob import reward_terms

    picked = [COMPLETIONS[i] for i in (0, 3, 2, 8)]
    scores, _ = score_completions([code_row(t) for t, *_ in picked], [c for _, c, *_ in picked])
    terms = reward_terms({"code": 1.0, "correct": 1.0}, scores, torch.ones(4, dtype=torch.bool),
                         None, None, None, None, None, group_size=4)
    assert torch.allclose(terms["code"], torch.tensor([1.0, 2 / 3, 0.0, 2 / 3]))
    assert terms["correct"].tolist() == [1.0, 0.0, 0.0, 0.0]  # what RAFT, Reinforce and PRIME filter on


def test_a_program_that_does_not_compile_runs_once():
    assert run_tests("def f(:", SUM_TESTS, LONG, isolated=False).outcomes == ["fail", "skipped", "skipped"]


def test_a_timeout_scores_zero_is_counted(bwrap, monkeypatch):
    """(That a timeout ends the program's tests: test_the_program_budget_cuts_a_real_run.)"""
    monkeypatch.setitem(sandbox._code_setup, "limits", MIXED)
    scores, errors = score_completions([code_row(SUM_TESTS)] * 2,
                                       [fenced("while True:\n    pass\n"), fenced(READ + "print(a + b)\n")])
    assert [s.timed_out for s in scores] == [True, False] and [s.correct for s in scores] == [0.0, 1.0]
    assert scores[0].tests_passed == 0.0 and errors == 0


def test_a_program_killed_by_a_signal_is_an_error(bwrap):
    crash = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    assert run_tests(crash, SUM_TESTS, LONG, True).outcomes[0] == "crash"
    scores, errors = score_completions([code_row(SUM_TESTS)], [fenced(crash + "\n")])
    assert scores[0].correct == 0.0 and errors == 1


@pytest.mark.parametrize("isolated", [True, False], ids=["sandbox", "bare"])
def test_a_program_cannot_forge_its_status(bwrap, isolated):
    """Exit codes 137 and 139 (what a shell reports for SIGKILL and SIGSEGV) are exits; a SIGXCPU the
    program sends itself is a crash, not the CPU limit; the real limits are timeouts."""
    exits = {"import os\nos._exit(137)": "exit", "import os\nos._exit(139)": "exit",
             "import os\nos._exit(98)": "exit", "import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)": "crash"}
    assert {p: run_program(p, b"", None, LONG, isolated)[0] for p in exits} == exits
    limits = replace(LONG, time_seconds=2.0)  # the wall limit, or the CPU limit that 4 busy threads reach first
    spin = "import threading\ndef spin():\n    while True:\n        pass\n"
    for busy in ("while True:\n    pass", spin + "for _ in range(4):\n    threading.Thread(target=spin).start()"):
        assert run_program(busy, b"", None, limits, isolated)[0] == "timeout"
    scores, errors = score_completions([code_row(SUM_TESTS)] * 2, [fenced("import os\nos._exit(137)\n"),
                                                                    fenced("import os\nos._exit(139)\n")])
    assert [s.timed_out for s in scores] == [False, False] and errors == 0


def test_malformed_tests_are_an_error_not_a_score():
    scores, errors = score_completions([code_row({"inputs": ["1"]})], [fenced("print(1)\n")])
    assert scores[0].correct == 0.0 and errors == 1


# --- the sandbox against hostile programs -----------------------------------------------------
def test_attacks_score_zero_and_nothing_escapes(bwrap):
    """Each attack runs next to a correct program in one batch (2 workers, 15 s wall limit)."""
    report = code_sandbox.run_attacks(MIXED)
    failed = {name: a["outcomes"] for name, a in report["attacks"].items() if not a["contained"]}
    assert not failed, f"escaped, scored or mislabeled: {failed}"
    assert report["listener_connections"] == 0 and report["survivors"] == 0 and report["neighbor_passed"]
    outcomes = {name: a["outcomes"][0] for name, a in report["attacks"].items()}
    for name in ("fork_bomb", "infinite_loop", "sleep_past_wall"):
        assert outcomes[name] == "timeout", name
    assert report["seconds"] < report["bound"]  # a sleeper left running would take 913 s


@pytest.mark.parametrize("guard", ["auto", "cgroup", "seccomp"])
def test_memory_held_outside_processes_counts_against_the_limit(bwrap, guard):
    """Shared memory, memfds, a tmpfs of its own, socket buffers, children: each guard alone keeps every
    attack from holding 1.5 GiB under a 1 GiB limit (the cgroup stops it at the limit; seccomp refuses
    the calls; without a cgroup the children's resident memory is summed)."""
    limits = replace(LONG, guard=guard)
    protection = sandbox.sandbox_protection(limits)
    assert ("cgroup v" in protection) == (guard != "seccomp") and ("seccomp" in protection) == (guard != "cgroup")
    report = code_sandbox.run_memory_attacks(limits, targets=(1536,))
    assert all(a["outcomes"] == ["fail"] for a in report["attacks"].values()), report


def test_without_guards_the_memory_attacks_hold_their_memory(bwrap):
    """The memory checks can fail: with no guard, these attacks hold 1.5 GiB under a 1 GiB limit."""
    names = ("sysv_shared_memory", "memfd_in_28_processes", "tmpfs_in_nested_namespace")
    report = code_sandbox.run_memory_attacks(replace(LONG, time_seconds=600.0, guard="none"), names=names,
                                             targets=(1536,))
    assert all(a["outcomes"] == ["pass"] and not a["contained"] for a in report["attacks"].values()), report


def test_the_memory_attack_holds_its_memory_where_the_limit_allows_it(bwrap):
    """The check of memory_in_children can fail: under an 8 GiB limit its four children hold 1.5 GiB."""
    program = code_sandbox.memory_attack_program("memory_in_children")
    assert run_program(program, b"1536\n", None, CodeLimits(memory_bytes=8 << 30, time_seconds=120), True)[:2] == (
        "ok", b"held\n")
    for guard in ("auto", "seccomp"):  # the cgroup, or the watch of the resident memory
        assert run_program(program, b"1536\n", None, replace(LONG, guard=guard), True)[:2] == (
            "memory", b"")


def test_without_a_cgroup_what_tmp_holds_counts(bwrap):
    """With the resident-memory watch alone, 120 MiB in /tmp and /dev/shm pass a 100 MiB limit."""
    fill = ("import time\nfor folder in ('/tmp', '/dev/shm'):\n    for i in range(60):\n"
            "        with open(f'{folder}/{i}', 'wb') as f:\n            f.write(b'x' * (1 << 20))\n"
            "print('held', flush=True)\ntime.sleep(30)")
    limits = replace(LONG, memory_bytes=100 << 20, guard="seccomp")
    assert run_program(fill, b"", None, limits, True)[:2] == ("memory", b"")


def test_the_seccomp_filter_refuses_what_it_names_and_threads_still_run(bwrap):
    """Each refused call fails with EPERM under the filter and works without it (so the check can fail);
    threads start (glibc's clone3 gets ENOSYS and falls back to clone)."""
    probe = ("import ctypes, os, socket, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "def errno(call):\n    try:\n        result = call()\n"
             "        return 0 if result is None or result >= 0 else ctypes.get_errno()\n"
             "    except OSError as e:\n        return e.errno\n"
             "calls = {'shmget': lambda: libc.shmget(0, 4096, 0o1600), 'memfd': lambda: os.memfd_create('x'),\n"
             "         'socketpair': lambda: socket.socketpair()[0].fileno(), 'setsid': os.setsid,\n"
             "         'unshare': lambda: libc.unshare(0x10020000), 'msgget': lambda: libc.msgget(0, 0o1600)}\n"
             "thread = threading.Thread(target=print, args=('thread',))\nthread.start()\nthread.join()\n"
             "print(*(f'{name}={errno(call)}' for name, call in calls.items()))")
    guarded = run_program(probe, b"", None, replace(LONG, guard="seccomp"), True)
    assert guarded[:2] == ("ok", b"thread\nshmget=1 memfd=1 socketpair=1 setsid=1 unshare=1 msgget=1\n"), guarded
    bare = run_program(probe, b"", None, replace(LONG, guard="none"), True)
    assert bare[:2] == ("ok", b"thread\nshmget=0 memfd=0 socketpair=0 setsid=0 unshare=0 msgget=0\n"), bare


def test_no_zombie_and_no_orphan_under_a_subreaper(bwrap):
    """A grading process that is a subreaper (as pid 1 of a container is) inherits what its sandboxes
    leave: after 40 programs (plain ones, daemons, fork trees, exit codes) none is left, not even a zombie."""
    left = code_sandbox.processes_left_under_subreaper(40, time_seconds=1.0)
    assert len(left["outcomes"]) == 40 and left["zombies"] == 0 and left["children"] == 0, left


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_where_sandbox_cgroups_go(tmp_path, monkeypatch, layout):
    """On a fake cgroup tree (this machine has no cgroup v2 controllers): v2 takes the nearest cgroup at or
    above this process's that hands memory and pids to its children; v1 this process's own cgroups, found
    under a mount of a part of the hierarchy (as in a container). The limits land in their files."""
    root, scope = tmp_path / "cgroup", "user.slice/user-0.slice/session-1.scope"
    if layout == "v2":
        mountinfo, own = f"30 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n", f"0::/{scope}\n"
        for folder, enabled in ((root, "cpu memory pids"), (root / "user.slice", "memory pids"),
                                (root / "user.slice/user-0.slice", "cpu"), (root / scope, "")):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cgroup.subtree_control").write_text(enabled)
        expected = ("v2", [str(root / "user.slice")])
    else:
        mountinfo = "".join(f"3{i} 25 0:3{i} /docker/abc {root}/{name} rw - cgroup cgroup rw,{name}\n"
                            for i, name in enumerate(("memory", "pids", "cpu,cpuacct")))
        own = "5:memory:/docker/abc/job\n4:pids:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
        for name in ("memory/job", "pids", "cpu,cpuacct"):
            (root / name).mkdir(parents=True)
        expected = ("v1", [str(root / "memory/job"), str(root / "pids"), str(root / "cpu,cpuacct")])
    fake = {"/proc/self/mountinfo": mountinfo, "/proc/self/cgroup": own}
    real_open = open
    monkeypatch.setattr(sandbox, "open", lambda path, *a, **k: io.StringIO(fake[path]) if path in fake
                        else real_open(path, *a, **k), raising=False)
    assert sandbox._cgroup_parents() == expected
    gone, alive = (Path(expected[1][0], f"code-sandbox-{sandbox._PID_NS}-{pid}-0") for pid in (9999999, os.getpid()))
    gone.mkdir(), alive.mkdir()
    sandbox._Cgroup.remove_stale(expected[1])  # those of processes killed before they could remove theirs
    assert not gone.exists() and alive.exists()
    monkeypatch.setattr(sandbox._Cgroup, "pool", [])  # not one of the real ones
    cgroup = sandbox._Cgroup.take(expected, replace(LONG, memory_bytes=123 << 20, processes=7))
    memory = Path(cgroup.dirs[0])
    limits = {f.name: f.read_text() for f in [*memory.iterdir(), Path(cgroup.pids, "pids.max")] if f.is_file()}
    assert limits == ({"memory.max": str(123 << 20), "pids.max": "7"} if layout == "v2"
                      else {"memory.limit_in_bytes": str(123 << 20), "pids.max": "7"})
    cgroup.remove()


def test_a_sandbox_that_cannot_start_with_a_guard_runs_without_it(monkeypatch):
    """A seccomp program bwrap cannot load: the probe drops that guard and keeps the others."""
    sandbox._active_guards(LONG, True)
    for name, guard in sandbox._guards.items():
        monkeypatch.setitem(sandbox._guards, name, guard)
    monkeypatch.setitem(sandbox._guards, "seccomp", b"not a BPF program")
    assert sandbox._probe_sandbox() is None
    assert sandbox._guards["seccomp"] is None and sandbox._guards["userns"] is True


def test_output_is_capped_by_the_parent(bwrap):
    gigabyte = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    status, stdout, _ = run_program(gigabyte, b"", None, LONG, isolated=True)
    assert status == "exit" and len(stdout) == LONG.output_bytes  # the write beyond the cap fails


def test_without_bubblewrap_the_checks_see_the_escapes():
    """The attack checks can fail: as bare subprocesses, these attacks reach the listener and the canary
    file (readable and writable by anyone); a process carrying a marker is found."""
    report = code_sandbox.run_attacks(LONG, isolated=False, names=("network", "read_canary", "write_canary"))
    assert not any(a["contained"] for a in report["attacks"].values()), report["attacks"]
    assert report["listener_connections"] == 1
    marked, marker = subprocess.Popen(["sleep", code_sandbox.MARKERS[2]]), code_sandbox.MARKERS[2]
    try:
        for _ in range(1200):  # until it has exec'd sleep (at most a minute)
            if code_sandbox.survivors()[marker] == [marked.pid]:
                break
            time.sleep(0.05)
        assert code_sandbox.survivors()[marker] == [marked.pid]
    finally:
        marked.kill()
        marked.wait()


def test_without_bubblewrap_the_resource_limits_still_hold():
    """Bare runs keep the limits, the cgroup, and stop what a program leaves behind (the daemon)."""
    names = ("allocate_8gb", "infinite_loop", "print_gigabyte", "sleep_past_wall", "daemon", "exit_137")
    report = code_sandbox.run_attacks(MIXED, isolated=False, names=names)
    assert all(a["contained"] for a in report["attacks"].values()), report["attacks"]
    assert report["neighbor_passed"] and report["survivors"] == 0 and report["seconds"] < report["bound"]
    memory = code_sandbox.run_memory_attacks(LONG, False, names=("memory_in_children",), targets=(1536,))
    assert memory["attacks"]["memory_in_children"]["outcomes"] == ["fail"], memory


def test_scripts_refuse_code_rows_without_the_sandbox_unless_allowed(tmp_path):
    """eval.py re-scoring a code record with no bwrap on PATH: one sentence; with the flag it runs."""
    record = {**code_row(SUM_TESTS), "completions": [fenced(READ + "print(a + b)\n")]}
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(record) + "\n")
    env = {**os.environ, "PATH": str(tmp_path)}  # no bwrap there
    cmd = [sys.executable, "eval.py", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bubblewrap (bwrap) is not installed: install it" in proc.stderr and "--allow_unsandboxed_code" in proc.stderr
    proc = subprocess.run(cmd + ["--allow_unsandboxed_code"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT isolation" in proc.stderr
    summary = json.loads((tmp_path / "scored" / "out.summary.json").read_text())
    assert summary["metrics"]["avg@1"] == 1.0 and summary["metrics"]["code_tests_passed"] == 1.0
