import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from fractions import Fraction

import psutil
import pytest

import grading
from grading import (_MAX_EXPONENT, _exponent, _fast_match, _mv_verify, _numbers_equal, _scientific,
                     _strip_outer_braces, answer_style, answers_match_many, countdown_correct, countdown_value,
                     extract_answer, format_ok, gsm8k_gold, last_boxed, last_tag, normalize_answer,
                     shutdown_grader, strip_dollars)
from conftest import REPO, answers_match, grader_workers, parse_number, time_limit

# ---------------------------------------------------------------------------
# End-to-end grading table: (style, model output, reference, expected).
# Each case goes through extract_answer + answers_match.
#
# Borderline decisions (what Math-Verify 0.9 does, and we keep):
#   * percent: "50\%" matches both 50 and 0.5 (Math-Verify accepts either
#     reading of a percent; we do not second-guess it). "50\%" vs 60 is False.
#   * units: a unit inside \text{} (5\,\text{cm}, 5 \text{ cm}^2) or a degree
#     sign is dropped, so they match 5; a bare word ("5 dollars") is read as a
#     product of symbols and does NOT match 5.
#   * \text{...}: unwrapped; "\text{ 5 }" is 5, "\text{(B)}" matches "B".
#   * plain numbers: integers compare exactly (1000001 != 1000000); anything
#     with a fractional part uses rel. tol 1e-6, so 2.0000001 == 2 but
#     0.33 / 0.333 != 1/3 (rounded decimals are wrong answers) and pi != 3.14.
#   * "1,2" is a list of two numbers (unordered, as Math-Verify reads it),
#     "1,000" is one thousand (digit groups of exactly 3).
#   * scientific notation is a number only when it is the WHOLE answer (7.2e19,
#     7.2E+19, 7.2 \times 10^{19}, 7.2\cdot10^{19}, 10^{-8}); its value is exact, so
#     72 \times 10^{18} == 7.2e19 and integers still compare exactly (1e6 != 1000001).
#     An absolute tolerance applies only against 0: 1e-12 != 1e-15.
#   * "(042)", "\textbf{(042)}" and "042" are 42 (AIME's answer style); a whole-
#     answer brace group is its content: \boxed{{(1,5)}} is (1,5).
# ---------------------------------------------------------------------------
GSM8K_FIELD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 1,210 clips in total.\n#### 1,210"

CASES = [
    # nested braces
    ("boxed", r"The answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", True),
    ("boxed", r"so $\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt3}{2}", True),
    ("boxed", r"\boxed{\frac{1}{\frac{1}{2}}}", "2", True),
    # fractions vs decimals
    ("boxed", r"\boxed{0.5}", r"\frac{1}{2}", True),
    ("boxed", r"\boxed{\frac{1}{2}}", "0.5", True),
    ("boxed", r"\boxed{\dfrac{3}{4}}", "0.75", True),
    ("boxed", r"\boxed{0.75}", r"\tfrac34", True),
    ("boxed", r"\boxed{\frac{2}{6}}", r"\frac{1}{3}", True),
    ("boxed", r"\boxed{-\frac{1}{2}}", "-0.5", True),
    ("boxed", r"\boxed{7/2}", "3.5", True),
    ("boxed", r"\boxed{3.0}", "3", True),
    # similar-looking but wrong
    ("boxed", r"\boxed{0.33}", r"\frac{1}{3}", False),
    ("boxed", r"\boxed{0.333}", r"\frac{1}{3}", False),
    ("boxed", r"\boxed{\frac{1}{3}}", "0.33", False),
    ("boxed", r"\boxed{\frac{3}{4}}", r"\frac{4}{3}", False),
    ("boxed", r"\boxed{1000001}", "1000000", False),
    ("boxed", r"\boxed{2.0000001}", "2", True),  # within rel. tol 1e-6
    # LaTeX spacing, \text{}, units
    ("boxed", r"\boxed{\text{ 5 }}", "5", True),
    ("boxed", r"\boxed{5\,\text{cm}}", "5", True),
    ("boxed", r"\boxed{5 \text{ cm}^2}", "5", True),
    ("boxed", r"\boxed{10^\circ}", "10", True),
    ("boxed", r"\boxed{5 dollars}", "5", False),  # bare word: not a unit to Math-Verify
    ("boxed", r"\boxed{\$5.00}", "5", True),
    ("boxed", r"\boxed{\left(1, 2\right]}", "(1,2]", True),
    ("boxed", r"\boxed{\text{(B)}}", "B", True),
    ("boxed", r"\boxed{B}", r"\text{(C)}", False),
    ("boxed", r"\boxed{5.}", "5", True),
    # thousands separators
    ("boxed", r"\boxed{1,000}", "1000", True),
    ("boxed", r"\boxed{1000}", "1,000", True),
    ("boxed", r"\boxed{1,234,567}", "1234567", True),
    ("boxed", r"\boxed{1,234,567}", "1234568", False),
    # negative numbers
    ("boxed", r"\boxed{-3}", "-3", True),
    ("boxed", r"\boxed{- 3}", "-3", True),
    ("boxed", r"\boxed{-3}", "3", False),
    ("boxed", r"\boxed{3}", "-3", False),
    # several boxed answers: the last one counts
    ("boxed", r"First \boxed{2}, but wait, it is \boxed{3}.", "3", True),
    ("boxed", r"First \boxed{3}, but wait, it is \boxed{2}.", "3", False),
    # intervals and sets
    ("boxed", r"\boxed{(1, 2]}", "(1,2]", True),
    ("boxed", r"\boxed{(1,2]}", "[1,2]", False),
    ("boxed", r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    ("boxed", r"\boxed{\{1,2,3\}}", r"\{1,2\}", False),
    ("boxed", r"\boxed{2,1}", "1,2", True),
    ("boxed", r"\boxed{(-\infty, 3)}", r"(-\infty,3)", True),
    # percentages
    ("boxed", r"\boxed{50\%}", "50", True),
    ("boxed", r"\boxed{50\%}", "0.5", True),
    ("boxed", r"\boxed{50}", r"50\%", True),
    ("boxed", r"\boxed{50%}", r"50\%", True),
    ("boxed", r"\boxed{5\%}", "0.05", True),
    ("boxed", r"\boxed{50\%}", "60", False),
    # no answer at all
    ("boxed", "I am not sure, maybe 5.", "5", False),
    ("boxed", r"\boxed{}", "5", False),
    ("boxed", r"\boxed{\frac{1}{2}", r"\frac{1}{2}", False),  # unbalanced
    # sqrt and pi
    ("boxed", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    ("boxed", r"\boxed{\sqrt{27}}", r"3\sqrt{3}", True),
    ("boxed", r"\boxed{2\sqrt{3}}", r"\sqrt{8}", False),
    ("boxed", r"\boxed{\pi \cdot 2}", r"2\pi", True),
    ("boxed", r"\boxed{\frac{\pi}{4}}", r"\frac{\pi}{4}", True),
    ("boxed", r"\boxed{3.14}", r"\pi", False),
    # algebra written differently
    ("boxed", r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("boxed", r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("boxed", r"\boxed{x^2+1}", "(x+1)^2", False),
    ("boxed", r"\boxed{x = 3}", "3", True),
    ("boxed", r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    ("boxed", r"\boxed 5", "5", True),
    ("boxed", r"\fbox{7}", "7", True),
    # tag style
    ("tag", "Let me add.\n</think>\n<answer> 42 </answer>", "42", True),
    ("tag", "So 3+4.</think><answer>\\boxed{7}</answer>", "7", True),
    ("tag", "</think><answer>The answer is $\\boxed{7}$.</answer>", "7", True),
    ("tag", "</think><answer>41</answer>", "42", False),
    ("tag", "no tags, the answer is 42", "42", False),
    ("tag", "<answer>1</answer> hmm, no: <answer>2</answer>", "2", True),
    ("tag", "</think><answer>\\frac{1}{2}</answer>", "0.5", True),
    ("tag", "</think><answer></answer>", "5", False),
    ("tag", "</think><answer>x = 5 or x = -5</answer>", "5", False),
    ("tag", "</think><answer>$18</answer>", "18", True),
    ("tag", "</think><answer>1,000</answer>", "1000", True),
    # GSM8K references
    ("gsm8k", "She sold 1210 clips.\n#### 1210", gsm8k_gold(GSM8K_FIELD), True),
    ("gsm8k", "She sold 1,210 clips.\n#### 1,210\nDone.", gsm8k_gold(GSM8K_FIELD), True),
    ("gsm8k", "#### 1200", gsm8k_gold(GSM8K_FIELD), False),
    ("gsm8k", "The answer is 1210", gsm8k_gold(GSM8K_FIELD), False),
    ("boxed", r"In total $\boxed{1{,}210}$ clips.", gsm8k_gold(GSM8K_FIELD), True),
    ("tag", "</think><answer>1210</answer>", gsm8k_gold(GSM8K_FIELD), True),
    # scientific notation: every spelling of the same value ...
    ("boxed", r"\boxed{7.2 \times 10^{19}}", "7.2e19", True),
    ("boxed", r"\boxed{7.2\times10^{19}}", "7.2e19", True),
    ("boxed", r"\boxed{7.2\cdot 10^{19}}", "7.2e19", True),
    ("boxed", r"\boxed{7.2E+19}", "7.2e19", True),
    ("boxed", r"\boxed{72 \times 10^{18}}", "7.2e19", True),
    ("boxed", r"\boxed{72000000000000000000}", "7.2e19", True),
    ("boxed", r"\boxed{7.2e19}", r"7.2 \times 10^{19}", True),
    ("boxed", r"\boxed{0.00025}", "2.5e-4", True),
    ("boxed", r"\boxed{2.5 \times 10^{-4}}", "2.5e-4", True),
    ("boxed", r"\boxed{-2.5\cdot10^{-4}}", "-2.5e-4", True),
    ("boxed", r"\boxed{10^{-8}}", "1e-8", True),
    ("boxed", r"\boxed{7.2 \times 10^{19} \text{ J}}", "7.2e19", True),  # a unit: Math-Verify, e-notation respelled
    # ... and its wrong twins
    ("boxed", r"\boxed{7.2e18}", "7.2e19", False),
    ("boxed", r"\boxed{7.2 \times 10^{18}}", "7.2e19", False),
    ("boxed", r"\boxed{7.19e19}", "7.2e19", False),
    ("boxed", r"\boxed{2.5e-5}", "2.5e-4", False),
    ("boxed", r"\boxed{2.5e-4}", "-2.5e-4", False),
    ("boxed", r"\boxed{10^{-8}}", "10^{8}", False),
    ("boxed", r"\boxed{10^{8}}", "10^{-8}", False),
    ("boxed", r"\boxed{1e-12}", "1e-15", False),
    ("boxed", r"\boxed{0}", "1.6e-19", False),  # zero is only zero
    ("boxed", r"\boxed{0}", r"3.89 \times 10^{-10}", False),
    ("boxed", r"\boxed{1e-12}", "0", False),
    ("boxed", r"\boxed{0.0}", "0", True),
    ("boxed", r"\boxed{1e6}", "1000001", False),  # integers stay exact
    ("boxed", r"\boxed{7.2 \times 10^{18} \text{ J}}", "7.2e19", False),
    ("boxed", r"\boxed{73}", "730", False),
    ("boxed", r"\boxed{2, 500}", "2500", False),  # a list, not a thousands separator
    ("boxed", r"\boxed{0,100}", "100", False),
    # e alone is Euler's number or a variable, never an exponent
    ("boxed", r"\boxed{2e}", "2", False),
    ("boxed", r"\boxed{2e}", "2e", True),
    ("boxed", r"\boxed{3e^{-2t}}", "3e^{-2t}", True),
    # bracketed and zero-padded integers ...
    ("boxed", r"\boxed{\textbf{(042)}}", "42", True),
    ("boxed", r"\boxed{\textbf{(042) }}", "042", True),
    ("boxed", r"\boxed{(042)}", "42", True),
    ("boxed", r"\boxed{042}", "42", True),
    ("boxed", r"\boxed{42}", "(042)", True),
    # ... and their wrong twins
    ("boxed", r"\boxed{\textbf{(042)}}", "420", False),
    ("boxed", r"\boxed{(042)}", "24", False),
    ("boxed", r"\boxed{(42)}", "(4,2)", False),
    ("boxed", r"\boxed{042}", "4.2", False),
    # doubled braces ...
    ("boxed", r"\boxed{{(1,5)}}", "(1,5)", True),
    ("boxed", r"\boxed{{{(1, 5)}}}", "(1,5)", True),
    ("boxed", r"\boxed{{\frac{1}{2}}}", "0.5", True),
    ("boxed", r"\boxed{(1,5)}", "{(1,5)}", True),
    # ... and their wrong twins
    ("boxed", r"\boxed{{(1,5)}}", "(5,1)", False),
    ("boxed", r"\boxed{{(1,5)}}", "[1,5]", False),
    ("boxed", r"\boxed{{\frac{1}{2}}}", "0.25", False),
]


@pytest.mark.parametrize("style,output,reference,expected", CASES)
def test_grading_cases(style, output, reference, expected):
    assert answers_match(extract_answer(output, style), reference) is expected


def test_answers_match_many_batches_and_counts():
    pairs = [("2", "2"), (None, "2"), (r"2\sqrt{2}", r"\sqrt{8}"), ("3", "4"), (r"\frac{1}{3}", "0.33")]
    results, n_failed = answers_match_many(pairs)
    assert results == [True, False, True, False, False]
    assert n_failed == 0
    assert answers_match_many([]) == ([], 0)
    # an exponent of 5,000 digits (int() refuses it) is no answer, and costs the batch nothing
    assert answers_match_many([("5", "5"), ("1e" + "9" * 5000, "5"), (r"10^{" + "9" * 5000 + "}", "5")]) == (
        [True, False, False], 0)


# ---- robustness -------------------------------------------------------------


def test_answers_match_from_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(answers_match(r"2\sqrt{2}", r"\sqrt{8}")))
    thread.start()
    with time_limit(600):  # a hang guard only: it may have to start the pool
        thread.join()
    assert out == [True]


def test_timeout_cannot_hang():
    # 9^{9^{9^{9}}} makes sympy compute a gigantic power: it never finishes. The pool is started
    # first: its start-up has its own bound (_MV_START_TIMEOUT) and is not what is tested here.
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")
    workers = {p.pid for p in grader_workers()}
    start = time.monotonic()
    with time_limit(60):  # the tower alone would run for hours
        results, n_failed = answers_match_many([(r"9^{9^{9^{9}}}", "2")], timeout=0.5)
    assert results == [False] and n_failed == 1
    assert time.monotonic() - start >= 0.5  # it had its full time, and was then cut
    assert workers - {p.pid for p in grader_workers()}  # by killing the worker that ran it
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")  # which was replaced


def test_timeouts_in_a_batch_keep_the_other_results():
    # Two hanging pairs hold both workers; each is cut at its own timeout and its worker replaced,
    # so the pairs after them are still graded: their 5 s (training's default) count from when a worker
    # takes them, and are a hundred times what they need (ten times on a machine ten times slower).
    pairs = [(r"9^{9^{9^{9}}}", "2"), (r"10^{10^{10}}", "2"), ("(x+1)^2", "x^2+2x+1"), ("1", "1"),
             (r"2\sqrt{3}", r"\sqrt{8}")]
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")  # the pool is up
    pool = grading._pool
    with time_limit(600):  # a hang guard only
        results, n_failed = answers_match_many(pairs, timeout=5.0)
    assert results == [False, False, True, True, False] and n_failed == 2
    # the towers' own timeouts cut them, not the batch's deadline, which would have discarded the pool
    assert grading._pool is pool and len(grader_workers()) == grading._MV_WORKERS


def test_a_batch_past_its_deadline_gives_up_on_what_is_left(monkeypatch):
    """answers_match_many's backstop, on a fake clock: pairs with a timeout of their own longer than any test
    (1,000 s) can end only by the batch's deadline. The clock reads 0 when the deadline is set and an hour
    later afterwards: every pair still running or queued fails and is counted, and the pool with its stuck
    workers is killed; the next batch gets a new one."""
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")
    workers = grader_workers()
    readings = iter([0.0])
    monkeypatch.setattr(grading, "time", types.SimpleNamespace(monotonic=lambda: next(readings, 3600.0)))
    pairs = [(r"9^{9^{9^{9}}}", "2"), (r"10^{10^{10}}", "3"), ("x+1", "1+x")]  # the third waits behind the towers
    with time_limit(120):  # without the deadline the towers would hold both workers for 1,000 s
        assert answers_match_many(pairs, timeout=1000.0) == ([False, False, False], 3)
    assert grading._pool is None
    assert [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE] == []
    monkeypatch.undo()
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")


def test_a_worker_killed_from_outside_is_replaced():
    # e.g. by the out-of-memory killer while idle: the worker pool library then marks its pool
    # broken for good, and every later answer would fail
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")
    pool = grading._pool
    os.kill(grader_workers()[0].pid, signal.SIGKILL)  # not reaped here: the pool has to notice
    with time_limit(600):  # the pool's manager notices within 0.1 s; a hang guard only
        while pool.active:
            time.sleep(0.1)
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")
    assert len(grader_workers()) == grading._MV_WORKERS


def test_grader_workers_do_not_import_the_main_script(tmp_path):
    """A training script imports torch; its grader workers must not (about 190 MB each): they start
    while __main__ is hidden, and the script's own __main__ is back afterwards."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import psutil, torch, grading
        MARK = 1
        if __name__ == "__main__":
            grading._get_pool()
            workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            def maps_torch(p):
                return any("libtorch" in m.path for m in p.memory_maps())
            print(len(workers), sum(map(maps_torch, workers)), maps_torch(psutil.Process()),
                  sys.modules["__main__"].MARK)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(grading._MV_WORKERS), "0", "True", "1"]


def test_huge_exponents_are_decided_at_once(monkeypatch):
    # never handed to sympy, which would build the power: with no Math-Verify pool to be had, a pair
    # sent there would fail and be counted (answers_match_many's second value), whatever the machine's speed
    def no_pool():
        raise AssertionError("a huge exponent reached Math-Verify")

    monkeypatch.setattr(grading, "_get_pool", no_pool)
    pairs = [("1e999999999", "1"), (r"9 \times 10^{99999999999}", "9"), ("1e-999999999", "0"),
             ("1e999999999", "1e999999999"), ("2e10000", "2e10000")]
    assert answers_match_many(pairs) == ([False, False, False, True, True], 0)
    assert answers_match_many([("1e10000", r"10^{10000}"), ("1e10000", "1e9999")]) == ([True, False], 0)  # at the cap: exact
    assert answers_match_many([(r"2\sqrt{2}", r"\sqrt{8}")])[1] == 1  # what a pair sent to Math-Verify would give


def test_model_output_is_never_evaluated(tmp_path):
    target = tmp_path / "hacked"
    for pred in [
        f"__import__('os').system('echo hacked > {target}')",
        f"eval(\"__import__('os').system('touch {target}')\")",
        f"(lambda: open('{target}', 'w').write('x'))()",
    ]:
        assert answers_match(pred, "2") is False
        assert extract_answer(f"<answer>{pred}</answer>", "tag") == pred
        assert answers_match(extract_answer(f"<answer>{pred}</answer>", "tag"), "0") is False
    assert countdown_value(f"__import__('os').system('touch {target}')", [1]) is None
    assert not target.exists()


def test_mv_never_hands_model_text_to_parse_expr(monkeypatch):
    # Run the worker function in-process and record every string that reaches
    # sympy's eval-based parser: the LaTeX grammar only passes numeric literals.
    import math_verify.parser
    import sympy.parsing.sympy_parser

    seen = []
    real_parse_expr = sympy.parsing.sympy_parser.parse_expr

    def spy(s, *args, **kwargs):
        seen.append(s)
        return real_parse_expr(s, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("ExprExtractionConfig path used")

    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", spy)
    monkeypatch.setattr(math_verify.parser, "parse_expr", forbidden)
    assert _mv_verify("2", "__import__('os').system('echo hi')") is False
    assert _mv_verify("1", "1+1==2 and exec('x')") is False
    assert _mv_verify(r"\sqrt{8}", r"2\sqrt{2}") is True
    assert seen and all(s.replace(".", "").isdigit() for s in seen), seen


# ---- extraction ---------------------------------------------------------------


def test_last_boxed():
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"\boxed{a \} b}") == r"a \} b"  # an escaped brace does not close the box
    assert last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxed {5}") == "5"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{}") == ""
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced
    assert last_boxed(r"\boxed{1} and \boxed{2") is None  # the last one is unbalanced
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed") is None
    assert last_boxed(r"\fboxsep=1pt") is None


def test_last_tag():
    assert last_tag("<answer> 42 </answer>") == "42"
    assert last_tag("<answer>1</answer><answer>2</answer>") == "2"
    assert last_tag("<answer>a <answer>b</answer>") == "b"
    assert last_tag("<answer>\n x \n</answer>") == "x"
    assert last_tag("<answer>unclosed") is None
    assert last_tag("<answer>a</answer> then <answer>b") == "a"  # the last closed one
    assert last_tag("closed</answer>") is None
    assert last_tag("<think>hi</think>", "think") == "hi"


def test_gsm8k_gold():
    assert gsm8k_gold(GSM8K_FIELD) == "1210"
    assert gsm8k_gold("a #### b #### 1,234,567 ") == "1234567"
    assert gsm8k_gold("#### -5") == "-5"
    assert gsm8k_gold("72 in all.\n####72") == "72"  # no space after the marks


def test_answer_style_default_per_task_and_the_rows_own():
    assert [answer_style({"task": t}) for t in ("toy", "countdown", "poem", "code", "math")] == \
        ["tag", "tag", "tag", "code", "boxed"]
    assert answer_style({"task": "math", "metadata": {"answer_style": "gsm8k"}}) == "gsm8k"
    assert answer_style({"task": "code", "metadata": {"tests": []}}) == "code"  # metadata without a style


def test_strip_dollars():
    assert strip_dollars("$$ 5 $$") == "5"
    assert strip_dollars("$x$") == "x"
    assert strip_dollars("$$") == ""
    for kept in ("$", "$5", "5$", "a$b$", ""):
        assert strip_dollars(kept) == kept


def test_extract_answer_styles():
    assert extract_answer("<answer>\\boxed{7}</answer>", "tag") == "7"
    assert extract_answer("no tag", "tag") is None
    assert extract_answer(r"\boxed{7}", "boxed") == "7"
    assert extract_answer("#### 12\nmore text", "gsm8k") == "12"
    assert extract_answer("####   ", "gsm8k") is None
    assert extract_answer("#### 1, no: #### 2", "gsm8k") == "2"  # the last marker
    assert extract_answer("#### 12\nmore\ntext", "gsm8k") == "12"  # its line only
    with pytest.raises(ValueError, match="Unknown answer style"):
        extract_answer("x", "xml")


def test_strip_outer_braces():
    assert _strip_outer_braces("{{(2,3)}}") == "(2,3)"
    assert _strip_outer_braces("{   {(1,5)}   }") == "(1,5)"  # spaces between groups (Math-Verify's text)
    assert _strip_outer_braces(r"{1\}2}") == r"1\}2"  # an escaped brace pairs with nothing
    assert _strip_outer_braces(r"{\{x\}}") == r"\{x\}"
    assert _strip_outer_braces(r"\{x\}") == r"\{x\}"
    assert _strip_outer_braces("{1}+{2}") == "{1}+{2}"  # two groups, none around the whole


def test_fast_match_decides_what_it_can_and_leaves_the_rest():
    assert _fast_match("  ", "5") is False and _fast_match("5", " ") is False and _fast_match(None, "5") is False
    assert _fast_match("1e10001", "x") is False  # past the exponent cap: no answer, never sent to sympy
    assert _fast_match("1e10000", "x") is None  # at the cap: Math-Verify decides
    assert _fast_match("0.5", r"50\%") is None and _fast_match(r"50\%", "0.5") is None  # percent: Math-Verify
    assert _fast_match("0.5", "0.6") is False


def test_normalize_answer():
    assert normalize_answer(" $5$ ") == "5"
    assert normalize_answer(r"\text{ 5 }") == "5"
    assert normalize_answer(r"\left( 1,\! 2 \right]") == "(1,2]"
    assert normalize_answer(r"\dfrac{1}{2}.") == r"\frac{1}{2}"
    assert normalize_answer(r"\tfrac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer("1,234,567") == "1234567"
    assert normalize_answer("1,23") == "1,23"  # not thousands groups: a list
    assert normalize_answer("50%") == r"50\%"
    assert normalize_answer(r"x \leftarrow y") == r"x\leftarrowy"  # \left only as a word
    assert normalize_answer("{(2,3)}") == "(2,3)"
    assert normalize_answer("{ {x} }") == "x"
    assert normalize_answer("{1}+{2}") == "{1}+{2}"  # two groups, not one around everything
    assert normalize_answer(r"\{1,2\}") == r"\{1,2\}"  # a set: escaped braces are kept
    assert normalize_answer(r"\textbf{(073) }") == "073"
    assert normalize_answer("(-5)") == "-5"
    assert normalize_answer("(1,2)") == "(1,2)"
    assert normalize_answer("$ $5$ $") == "5"  # dollars inside dollars, spaces between
    assert normalize_answer(r"\text{\textbf{5}}") == "5"  # nested: unwrapped from the inside out
    assert normalize_answer(r"1\!2\,3\;4\:5\ 6") == "123456"  # every TeX spacing command


def test_exponent_cap():
    assert _exponent("999999999") == 999999999  # 9 digits: read
    assert _exponent("0000000000012") == 12  # leading zeros are no digits
    assert _exponent("1234567890") == _MAX_EXPONENT + 1 == 10_001  # 10 digits: past the cap
    assert _exponent("+1234567890") == 10_001
    assert _exponent("-1234567890") == -10_001
    assert _scientific("1e1234567890") is None
    assert _scientific("1e-0000000000003") == Fraction(1, 1000)


def test_numbers_equal_tolerance_edges():
    # not integers: relative tolerance 1e-6, its edge included: |999999/10^6 - 1| = 1e-6 * 1
    assert _numbers_equal(Fraction(999_999, 10**6), Fraction(1))
    assert _numbers_equal(Fraction(1), Fraction(999_999, 10**6))
    assert not _numbers_equal(Fraction(999_998, 10**6), Fraction(1))
    assert _numbers_equal(Fraction(1), Fraction(10_000_001, 10**7))  # one of them an integer
    assert not _numbers_equal(Fraction(0), Fraction(1, 10**12))  # zero equals only zero
    assert not _numbers_equal(Fraction(1, 10**12), Fraction(0))


def test_parse_number():
    assert parse_number("42") == 42.0
    assert parse_number("-3.5") == -3.5
    assert parse_number(".5") == 0.5
    assert parse_number("1,234") == 1234.0
    assert parse_number("3/4") == 0.75
    assert parse_number(r"\frac{1}{4}") == 0.25
    assert parse_number(r"-\dfrac{1}{4}") == -0.25
    assert parse_number(r"50\%") == 50.0
    assert parse_number("50%") == 50.0
    assert parse_number(r"\text{7}") == 7.0
    assert parse_number("1/0") is None
    assert parse_number("x") is None
    assert parse_number("1e5") == 100000.0
    assert parse_number("4.5E+3") == 4500.0
    assert parse_number("-2.5e-2") == -0.025
    assert parse_number(r"4.5 \times 10^{3}") == 4500.0
    assert parse_number(r"4.5\cdot10^{-3}") == 0.0045
    assert parse_number("10^{-2}") == 0.01
    assert parse_number("10^3") == 1000.0
    assert parse_number("10^33") is None  # TeX: 10^3 followed by 3, not a power of ten
    assert parse_number("2e") is None and parse_number("e5") is None and parse_number("e") is None
    assert parse_number("3e^{2}") is None
    assert parse_number(r"\textbf{(073)}") == 73.0
    assert parse_number("1e999999999") is None  # the exponent cap: never builds 10**999999999
    assert parse_number("2**10") is None
    assert parse_number("9" * 5000) is None  # beyond int()'s digit limit


# ---- Countdown ----------------------------------------------------------------


def test_countdown_value():
    assert countdown_value("(1 + 2) * 3", [1, 2, 3]) == 9.0
    assert countdown_value("3 × (2 + 1)", [1, 2, 3]) == 9.0
    assert countdown_value("6 ÷ 3 - 1", [1, 3, 6]) == 1.0
    assert countdown_value("2/(1+3)", [1, 2, 3]) == 0.5
    assert countdown_value("((((1))))+2", [2, 1]) == 3.0
    assert countdown_value("10 - 2 - 3", [2, 3, 10]) == 5.0  # left-associative
    assert countdown_value("1 + 2", [1, 2, 3]) is None  # unused number
    assert countdown_value("1 + 2 + 3 + 3", [1, 2, 3]) is None  # reused number
    assert countdown_value("1 + 2 + 4", [1, 2, 3]) is None  # wrong number
    assert countdown_value("12 + 3", [1, 2, 3]) is None  # digits glued together
    assert countdown_value("1 / (2 - 2)", [1, 2, 2]) is None  # division by zero
    assert countdown_value("-1 + 2 + 3", [1, 2, 3]) is None  # unary minus
    assert countdown_value("1 + (-2) + 3", [1, 2, 3]) is None
    assert countdown_value("2**3", [2, 3]) is None
    assert countdown_value("__import__('os')", [1]) is None
    assert countdown_value("a + 1", [1]) is None
    assert countdown_value("1 + 2 = 3", [1, 2]) is None
    assert countdown_value("(1 + 2", [1, 2]) is None
    assert countdown_value("1 + 2)", [1, 2]) is None
    assert countdown_value("1 2", [1, 2]) is None
    assert countdown_value("", []) is None
    assert countdown_value("+".join(["1"] * 101), [1] * 101) is None  # > 200 chars
    assert countdown_value("(" * 40 + "1" + ")" * 40, [1]) is None  # too deep
    assert countdown_value("1+", [1]) is None  # ends after an operator
    # the bounds themselves: 200 characters and 32 nested parentheses are allowed, one more is not
    assert countdown_value("1" + " " * 197 + "+2", [1, 2]) == 3.0
    assert countdown_value("1" + " " * 198 + "+2", [1, 2]) is None
    assert countdown_value("(" * 32 + "1+2" + ")" * 32, [1, 2]) == 3.0
    assert countdown_value("(" * 33 + "1+2" + ")" * 33, [1, 2]) is None
    assert countdown_value("٣ + 1", [3, 1]) is None  # non-ASCII digit


def test_countdown_correct():
    assert countdown_correct("2/(1+3)", [1, 2, 3], 0.5)
    assert countdown_correct("1/3", [1, 3], 0.333333)  # within 1e-5
    assert not countdown_correct("1/3", [1, 3], 0.33)
    assert countdown_correct("(100 - 4) / (7 - 3) + 1", [1, 3, 4, 7, 100], 25)
    assert not countdown_correct("(100 - 4) / (7 - 3)", [1, 3, 4, 7, 100], 24)  # 1 unused
    assert not countdown_correct(None, [1, 2], 3)
    assert not countdown_correct("1+2", [1, 2], 4)
    assert not countdown_correct("1/100000", [1, 100000], 0)  # off by exactly 1e-5: outside


# ---- format -------------------------------------------------------------------


def test_format_ok_tag():
    assert format_ok("I add 2 and 2.</think>\n<answer>4</answer>", "tag")
    assert format_ok("reasoning\n</think> <answer> 4 </answer>\n\n", "tag")
    assert not format_ok("reasoning <answer>4</answer>", "tag")  # missing </think>
    assert not format_ok("</think><answer>4</answer>", "tag")  # empty reasoning
    assert not format_ok("  \n</think><answer>4</answer>", "tag")
    assert not format_ok("r</think><answer></answer>", "tag")  # empty answer
    assert not format_ok("r</think><answer>4</answer><answer>5</answer>", "tag")
    assert not format_ok("r</think><answer>4</answer> and more text", "tag")
    assert not format_ok("r</think> text <answer>4</answer>", "tag")
    assert not format_ok("r</think>x</think><answer>4</answer>", "tag")
    assert not format_ok("r</think><answer><think>4</answer>", "tag")  # reopened
    assert not format_ok("r<answer>3</answer></think><answer>4</answer>", "tag")


def test_format_ok_boxed():
    assert format_ok(r"so the answer is $\boxed{\frac{1}{2}}$.", "boxed")
    assert format_ok(r"$\boxed 5$", "boxed")
    assert not format_ok(r"the answer is \boxed{\frac{1}{2}", "boxed")
    assert not format_ok(r"\boxed{}", "boxed")
    assert not format_ok("the answer is 5", "boxed")
    with pytest.raises(ValueError, match="Unknown answer style 'json'"):
        format_ok("x", "json")


def test_format_ok_gsm8k():
    assert format_ok("48 + 24 = 72\n#### 72", "gsm8k")
    assert not format_ok("the answer is 72", "gsm8k")


def test_shutdown_and_restart():
    shutdown_grader()
    shutdown_grader()  # idempotent
    assert answers_match(r"2\sqrt{2}", r"\sqrt{8}")  # pool respawns lazily
