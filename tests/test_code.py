"""The code task: program extraction, test reading and output matching, hand-written programs scored
through grading.score_completions with hand-computed rewards, and the sandbox against hostile programs."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import sandbox
from grading import extract_answer, format_ok, last_code_block, score_completions
from sandbox import CodeLimits, code_test_cases, output_matches, run_program, run_tests, sandbox_unavailable
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import code_sandbox  # noqa: E402  the attack suite, shared with the benchmark

FAST = CodeLimits(time_seconds=1.5, workers=2)  # small wall limits keep the attack tests short


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


def test_close_numbers_match_and_integers_must_be_equal():
    """|got - want| <= 1e-8 + 1e-5 |want| for words that are not both integers (the APPS/TACO checkers)."""
    assert output_matches(b"0.3333333333\n", "0.333333333333", None)  # difference 3.3e-13
    assert output_matches(b"2.0\n", "2\n", None) and output_matches(b"1e3\n", "1000", None)
    assert output_matches(b"YES 100000.9\n", "YES 100000", None)  # 0.9 <= 1e-8 + 1e-5 * 100000 = 1.00000001
    assert not output_matches(b"100001.1\n", "100000", None)  # 1.1 > 1.00000001
    assert not output_matches(b"0.33\n", "0.333", None)  # 0.003 > 1e-8 + 3.33e-6
    assert not output_matches(b"1000000006\n", "1000000007", None)  # integers: equal or wrong
    assert not output_matches(b"2.0 3\n", "2", None) and not output_matches(b"nan\n", "0", None)
    assert not output_matches(b"inf\n", "1e308", None) and not output_matches(b"YES\n", "NO", None)


def test_a_return_value_nested_too_deep_to_read_fails_without_stopping_the_batch(bwrap):
    """The program replaces json.dumps, so that the launcher writes 100,000 nested brackets: reading them
    raises RecursionError in the grading process; the test fails, the batch goes on."""
    deep = "import json\njson.dumps = lambda v: '[' * 100000 + ']' * 100000\ndef f(x):\n    return x\n"
    calls = {"fn_name": "f", "inputs": [[1]], "outputs": [1]}
    scores, errors = score_completions([code_row(calls)] * 2, [fenced(deep), fenced("def f(x):\n    return x\n")])
    assert [s.correct for s in scores] == [0.0, 1.0] and errors == 0


def test_a_programs_tests_share_one_time_budget(bwrap):
    """8 tests of 0.9 s against a 1.5 s limit per test and 3 s per program: 3 pass, the 4th is cut at the
    budget (a timeout), the rest are skipped; the whole takes the budget, not 8 x 0.9 s."""
    slow = "import time\ntime.sleep(0.9)\nprint(1)"
    start = time.perf_counter()
    result = run_tests(slow, {"inputs": [""] * 8, "outputs": ["1"] * 8}, CodeLimits(time_seconds=1.5,
                                                                                    program_seconds=3.0), True)
    assert result.outcomes == ["pass"] * 3 + ["timeout"] + ["skipped"] * 4
    assert time.perf_counter() - start < 3.0 + 1.0


def test_a_program_that_writes_like_bwrap_is_not_a_sandbox_error(bwrap):
    fake = "import sys\nsys.stderr.write('bwrap: Can not mount tmpfs')\nsys.exit(1)"
    assert run_program(fake, b"", None, FAST, True)[0] == "exit"


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
    assert run_tests("def f(:", SUM_TESTS, FAST, isolated=False).outcomes == ["fail", "skipped", "skipped"]


def test_a_timeout_scores_zero_is_counted_and_ends_the_program(bwrap, monkeypatch):
    monkeypatch.setitem(sandbox._code_setup, "limits", FAST)
    start = time.perf_counter()
    scores, errors = score_completions([code_row(SUM_TESTS)] * 2,
                                       [fenced("while True:\n    pass\n"), fenced(READ + "print(a + b)\n")])
    assert time.perf_counter() - start < 2 * FAST.time_seconds + 2  # one time limit, not one per test
    assert [s.timed_out for s in scores] == [True, False] and [s.correct for s in scores] == [0.0, 1.0]
    assert scores[0].tests_passed == 0.0 and errors == 0
    assert run_tests("while True:\n    pass", SUM_TESTS, FAST, True).outcomes == ["timeout", "skipped", "skipped"]


def test_a_program_killed_by_a_signal_is_an_error(bwrap):
    crash = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"
    assert run_tests(crash, SUM_TESTS, FAST, True).outcomes[0] == "crash"
    scores, errors = score_completions([code_row(SUM_TESTS)], [fenced(crash + "\n")])
    assert scores[0].correct == 0.0 and errors == 1


def test_malformed_tests_are_an_error_not_a_score():
    scores, errors = score_completions([code_row({"inputs": ["1"]})], [fenced("print(1)\n")])
    assert scores[0].correct == 0.0 and errors == 1


# --- the sandbox against hostile programs -----------------------------------------------------
def test_attacks_score_zero_and_nothing_escapes(bwrap):
    """Each attack runs next to a correct program in one batch (2 workers, 1.5 s wall limit)."""
    report = code_sandbox.run_attacks(FAST)
    failed = {name: a["outcomes"] for name, a in report["attacks"].items() if not a["contained"]}
    assert not failed, f"escaped or scored: {failed}"
    assert report["listener_connections"] == 0 and report["survivors"] == 0 and report["neighbor_passed"]
    outcomes = {name: a["outcomes"][0] for name, a in report["attacks"].items()}
    for name in ("fork_bomb", "infinite_loop", "sleep_past_wall"):
        assert outcomes[name] == "timeout", name
    # bound: ceil(14 programs / 2 workers) x (1.5 s + 0.5 s) + 2 s = 16 s
    assert report["seconds"] < report["bound"] == 16.0


def test_the_memory_attack_holds_its_memory_where_the_limit_allows_it(bwrap, tmp_path):
    """The check of memory_in_children can fail: under an 8 GiB limit its four children hold 3.6 GB."""
    attack = next(a for a in code_sandbox.attack_suite(tmp_path, 0)[0] if a.name == "memory_in_children")
    status, stdout, _ = run_program(attack.program, b"", None, CodeLimits(memory_bytes=8 << 30), True)
    assert (status, stdout) == ("ok", b"held\n")
    status, stdout, _ = run_program(attack.program, b"", None, FAST, True)
    assert (status, stdout) == ("memory", b"")


def test_output_is_capped_by_the_parent(bwrap):
    gigabyte = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    status, stdout, _ = run_program(gigabyte, b"", None, FAST, isolated=True)
    assert status == "exit" and len(stdout) == FAST.output_bytes  # the write beyond the cap fails


def test_without_bubblewrap_the_checks_see_the_escapes():
    """The attack checks can fail: as bare subprocesses, these attacks reach the listener and the
    canary file (readable and writable by anyone) and leave a daemon behind."""
    report = code_sandbox.run_attacks(FAST, isolated=False, names=("network", "read_canary", "write_canary", "daemon"))
    assert not any(a["contained"] for a in report["attacks"].values()), report["attacks"]
    assert report["listener_connections"] == 1 and report["survivors"] == 1


def test_without_bubblewrap_the_resource_limits_still_hold():
    names = ("allocate_8gb", "memory_in_children", "infinite_loop", "print_gigabyte", "sleep_past_wall")
    report = code_sandbox.run_attacks(FAST, isolated=False, names=names)
    assert all(a["contained"] for a in report["attacks"].values()), report["attacks"]
    assert report["neighbor_passed"] and report["seconds"] < report["bound"]


def test_scripts_refuse_code_rows_without_the_sandbox_unless_allowed(tmp_path):
    """eval.py re-scoring a code record with no bwrap on PATH: one sentence; with the flag it runs."""
    record = {**code_row(SUM_TESTS), "completions": [fenced(READ + "print(a + b)\n")]}
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(record) + "\n")
    env = {**os.environ, "PATH": str(tmp_path)}  # no bwrap there
    cmd = [sys.executable, "eval.py", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bubblewrap (bwrap) is not installed: install it" in proc.stderr and "--allow_unsandboxed_code" in proc.stderr
    proc = subprocess.run(cmd + ["--allow_unsandboxed_code"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT isolation" in proc.stderr
    summary = json.loads((tmp_path / "scored" / "out.summary.json").read_text())
    assert summary["metrics"]["avg@1"] == 1.0 and summary["metrics"]["code_tests_passed"] == 1.0
