"""Hostile text: property-based tests (hypothesis) of everything that reads model output or an
outputs file, each call under a time limit; and a batch of adversarial completions graded through
grading.score_completions, the entry point training uses.

CI runs each property on 200 examples (profile "ci", derandomized: the same examples every run).
`python bench/fuzz.py` runs the same properties on 10,000 random examples each (profile "fuzz").
"""

import contextlib
import io
import json
import os
import random
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import grading
import eval as ev
from common import Rollout
from grading import (_fast_match, _parse_fraction, countdown_correct, countdown_value, extract_answer, format_ok,
                     last_boxed, last_tag, normalize_answer, score_completions)
from conftest import Hang, answers_match, grader_workers, parse_number, settled_workers, time_limit  # noqa: F401  Hang: bench/fuzz.py
from grpo_logprob import reasoning_mask, reasoning_token_count

# No hypothesis deadline: its per-example timer would fail a slow CI machine. A hang is caught by
# CALL_LIMIT instead: the largest input here takes 0.6 s of CPU, so 60 s hold on a machine ten times slower
# and busy, and still catch a quadratic pass over a megabyte (hours).
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", settings.get_profile("ci"), max_examples=10_000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
CALL_LIMIT = 60.0  # seconds per call
MAX_REPEAT = 2**20  # a piece repeated up to this many times: megabyte strings


def bounded(fn, *args):
    with time_limit(CALL_LIMIT):
        return fn(*args)


# ---- strategies -------------------------------------------------------------------------------
PIECES = [
    "\\boxed{", "\\boxed", "\\boxed ", "\\fbox{", "\\fboxsep", "{", "}", "\\{", "\\}", "\\", "$", "$$",
    "\\text{", "\\textbf{", "\\mathrm{", "\\left(", "\\right]", "\\leftarrow", "\\frac{", "\\dfrac{", "\\tfrac",
    "}{", "\\%", "%", ",", ".", "-", "/", "^{", "9^{9^{9^{9}}}", "10^{10^{10}}", "9", "0", "1,000", "1,23", "007",
    "1e5", "3.14", "\\pi", "\\sqrt{", "\\infty", " ", "\n", "\t", "\u00a0", "\u2028", "\\!", "\\,", "\\ ", "\\;",
    "<answer>", "</answer>", "<answer", "</think>", "<think>", "####", "×", "÷", "(", ")", "*", "+", "٣", "½",
    "𝟙", "\x00", "\ufffd", "\ud800", "e", "x", "=",
]
piece = st.sampled_from(PIECES)
repeated = st.tuples(piece, st.integers(1, MAX_REPEAT)).map(lambda t: t[0] * t[1])
fragment = st.one_of(piece, st.text(max_size=12))
WRAPPERS = [("\\text{", "}"), ("{", "}"), ("$", "$"), ("\\boxed{", "}"), ("9^{", "}"), ("(", ")"),
            ("<answer>", "</answer>"), ("\\left(", "\\right)")]
nested = st.tuples(st.sampled_from(WRAPPERS), st.integers(1, MAX_REPEAT // 8), fragment).map(
    lambda t: t[0][0] * t[1] + t[2] + t[0][1] * t[1])
# mostly short mixtures of LaTeX, tags and odd characters; now and then one megabyte-long run or nest
hostile_text = st.tuples(st.lists(fragment, max_size=20), st.one_of(st.just(""), repeated, nested),
                         st.lists(fragment, max_size=20)).map(lambda t: "".join(t[0]) + t[1] + "".join(t[2]))
no_box = hostile_text.filter(lambda s: re.search(r"\\(boxed|fbox)(?![a-zA-Z])", s) is None)
# balanced brace groups without backslashes: what a \boxed{...} can hold


def brace_groups(inner):
    return st.lists(st.one_of(inner, inner.map(lambda s: "{" + s + "}")), max_size=4).map("".join)


balanced = st.recursive(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=8), brace_groups,
                        max_leaves=10)

big_int = st.integers(-10**400, 10**400)
plain_number = st.one_of(
    big_int.map(str),
    st.tuples(big_int, st.integers(0, 10**400)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.tuples(big_int, st.integers(1, 10**400)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(big_int, big_int).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
    big_int.map(lambda x: f"{x:,}"),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
answer_text = st.one_of(hostile_text, plain_number, st.tuples(plain_number, piece, plain_number).map("".join))


# ---- extraction -------------------------------------------------------------------------------
@given(text=hostile_text)
def test_extraction_and_format_never_raise(text):
    for style in ("tag", "boxed", "gsm8k"):
        answer = bounded(extract_answer, text, style)
        assert answer is None or isinstance(answer, str)
        assert bounded(format_ok, text, style) in (True, False)
    for extract in (last_boxed, last_tag):
        content = bounded(extract, text)
        assert content is None or isinstance(content, str)


@given(before=hostile_text, content=balanced, after=no_box)
def test_last_boxed_finds_the_last_box(before, content, after):
    assert bounded(last_boxed, before + "\\boxed{" + content + "}" + after) == content.strip()


@given(before=hostile_text, content=hostile_text.filter(lambda s: "<answer>" not in s),
       after=hostile_text.filter(lambda s: "</answer>" not in s))
def test_last_tag_finds_the_last_answer(before, content, after):
    assume("</answer>" not in content)
    assert bounded(last_tag, before + "<answer>" + content + "</answer>" + after) == content.strip()


# ---- normalization, plain numbers, the fast path ----------------------------------------------
@given(text=answer_text)
def test_normalization_and_number_parsing_never_raise(text):
    normalized = bounded(normalize_answer, text)
    assert isinstance(normalized, str) and not re.search(r"\s", normalized)
    value = bounded(_parse_fraction, normalized)
    assert value is None or isinstance(value, Fraction)
    number = bounded(parse_number, text)
    assert number is None or (isinstance(number, float) and number == number and abs(number) != float("inf"))


@given(pred=answer_text, gold=answer_text)
def test_fast_match_is_total_symmetric_and_reflexive(pred, gold):
    verdict = bounded(_fast_match, pred, gold)
    assert verdict in (True, False, None)
    assert bounded(_fast_match, gold, pred) == verdict
    assert bounded(_fast_match, pred, pred) is bool(pred.strip())
    assert bounded(_fast_match, None, gold) is False


@given(x=big_int)
def test_integers_in_every_plain_form_match(x):
    forms = [str(x), f"{x:,}", f"${x}$", f"\\text{{{x}}}", f"{x}.", f"{x}/1", f"\\frac{{{x}}}{{1}}"]
    for a in forms:
        assert bounded(_fast_match, a, str(x)) is True, a
    assert bounded(_fast_match, str(x + 1), str(x)) is False  # integers compare exactly
    if abs(x) < 10**300:
        assert parse_number(f"{x:,}") == float(x)


@given(num=big_int, den=st.integers(1, 10**400))
def test_fractions_match_their_value(num, den):
    value = Fraction(num, den)
    assert bounded(_parse_fraction, f"{num}/{den}") == value
    assert bounded(_parse_fraction, f"\\frac{{{num}}}{{{den}}}") == value
    assert bounded(_fast_match, f"{num}/{den}", f"\\frac{{{num}}}{{{den}}}") is True
    doubled = f"{2 * num}/{2 * den}"
    assert bounded(_fast_match, doubled, f"{num}/{den}") is True


# ---- Countdown ----------------------------------------------------------------------------------
@given(expr=hostile_text, nums=st.lists(st.integers(0, 10**6), max_size=8))
def test_countdown_parser_never_raises(expr, nums):
    value = bounded(countdown_value, expr, nums)
    assert value is None or isinstance(value, float)
    assert bounded(countdown_correct, expr, nums, 24) in (True, False)


def expression(leaves):
    """(text, exact value or None on division by zero) of random expression trees over `leaves`."""
    return st.recursive(leaves.map(lambda n: (str(n), Fraction(n))), _operation, max_leaves=8)


def _operation(sub):
    return st.tuples(sub, st.sampled_from("+-*/×÷"), sub, st.booleans()).map(_combine)


def _combine(t):
    (a, va), op, (b, vb), spaced = t
    sep = " " if spaced else ""
    text = f"({a}){sep}{op}{sep}({b})"
    if va is None or vb is None:
        return text, None
    if op in "/÷":
        return text, (va / vb if vb != 0 else None)
    return text, {"+": va + vb, "-": va - vb, "*": va * vb, "×": va * vb}[op]


@given(tree=expression(st.integers(0, 1000)), data=st.data())
def test_countdown_parser_evaluates_generated_expressions(tree, data):
    text, value = tree
    nums = [int(n) for n in re.findall(r"[0-9]+", text)]
    shuffled = data.draw(st.permutations(nums))
    depth = max(text[:i + 1].count("(") - text[:i + 1].count(")") for i in range(len(text)))
    expected = None if value is None or len(text) > 200 or depth > 32 else float(value)
    assert bounded(countdown_value, text, shuffled) == expected
    if expected is not None:
        assert bounded(countdown_value, text, shuffled + [1]) is None  # a number left unused
        assert bounded(countdown_value, text, shuffled[1:]) is None  # a number used but not given
        assert countdown_correct(text, shuffled, expected)


# ---- the reasoning mask: random text split at random token boundaries ---------------------------
MARKER_PIECES = ["</think>", "</", "think", ">", "<", "/", "t", "hink>", "</th", "ink>", "</think", "<think>",
                 "<|im_end|>", "<|endoftext|>", "7", "\n", "=", " ", "é", "中", "🙂"]


@pytest.fixture(scope="module")
def toy_tokenizer(toy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy / "model")


def token_ids(tokenizer, parts) -> list[int]:
    """Each part tokenized on its own (a str) or taken as a raw id (an int): token boundaries
    fall wherever the parts meet, e.g. inside </think>."""
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids.append(part % len(tokenizer))
        else:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


completion_parts = st.lists(st.one_of(st.sampled_from(MARKER_PIECES), st.text(max_size=6),
                                      st.integers(0, 2**16)), max_size=40)


@given(parts=completion_parts)
def test_reasoning_token_count_is_the_first_prefix_with_the_marker(toy_tokenizer, parts):
    ids = token_ids(toy_tokenizer, parts)
    k = bounded(reasoning_token_count, toy_tokenizer, ids)

    def decoded(n):
        return toy_tokenizer.decode(ids[:n], skip_special_tokens=False)

    if "</think>" not in decoded(len(ids)):
        assert k is None
    else:
        assert 1 <= k <= len(ids) and "</think>" in decoded(k) and "</think>" not in decoded(k - 1)


@given(completions=st.lists(completion_parts, min_size=1, max_size=4), extra_width=st.integers(0, 3))
def test_reasoning_mask_rows(toy_tokenizer, completions, extra_width):
    rollouts = [Rollout([1], token_ids(toy_tokenizer, parts), [], "", "stop") for parts in completions]
    width = max(len(r.completion_ids) for r in rollouts) + extra_width
    mask, found = bounded(reasoning_mask, toy_tokenizer, rollouts, width)
    for row, flag, r in zip(mask, found, rollouts):
        k = reasoning_token_count(toy_tokenizer, r.completion_ids)
        assert bool(flag) is (k is not None)
        assert row.tolist() == [1.0] * (k or 0) + [0.0] * (width - (k or 0))


# ---- eval.py's outputs-file reader ---------------------------------------------------------------
JSON_BYTES = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n", b"\r\n", b" ", b'"id"', b'"task"', b'"answer"',
              b'"completions"', b'"lengths"', b'"metadata"', b'"toy"', b"null", b"1", b"-", b"1e999", b"NaN",
              b"\\u", b"\\ud800", b"\xff", b"\xc3", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b"1" * 5000, b"[" * 3000]
json_like_bytes = st.lists(st.one_of(st.sampled_from(JSON_BYTES), st.binary(max_size=16)), max_size=60).map(b"".join)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))


def json_containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3))


json_value = st.recursive(JSON_LEAVES, json_containers, max_leaves=8)


@st.composite
def outputs_record(draw):
    completions = draw(st.lists(st.text(max_size=30), min_size=1, max_size=3))
    record = {"id": draw(json_value), "task": draw(st.sampled_from(["toy", "math", "countdown", "poem"])),
              "answer": draw(json_value), "completions": completions}
    if draw(st.booleans()):
        record["metadata"] = draw(st.dictionaries(st.text(max_size=6), json_value, max_size=3))
    if draw(st.booleans()):
        record["lengths"] = draw(st.lists(st.integers(0, 4096), min_size=len(completions), max_size=len(completions)))
    if draw(st.booleans()):
        record["finish_reasons"] = draw(st.lists(st.sampled_from(["stop", "length"]), min_size=len(completions),
                                                 max_size=len(completions)))
    return record


REPORT_LINE = re.compile(r"(?P<path>.+?):(?P<line>\d+): .+|(?P<skip>.+: skipped \d+ malformed line\(s\), "
                         r"scored \d+ records)")
READER_EXITS = ("malformed line(s), listed above; fix them, or drop --strict to score the other lines.",
                "no valid records to score.")


def read_outputs_file(data: bytes, strict: bool):
    """(records or the SystemExit message, stderr lines) of eval.read_outputs on a file holding `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.jsonl"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                result = bounded(ev.read_outputs, path, strict)
            except SystemExit as e:
                result = str(e)
                assert result.startswith(f"{path}: ") and result.endswith(READER_EXITS), result
    lines = err.getvalue().splitlines()
    for line in lines:
        assert REPORT_LINE.fullmatch(line), line
    return result, lines


@given(data=st.one_of(st.binary(max_size=2000), json_like_bytes), strict=st.booleans())
def test_outputs_reader_on_random_bytes(data, strict):
    result, _ = read_outputs_file(data, strict)
    if not isinstance(result, str):
        assert result and all(ev.record_problem(r) is None for r in result)


@given(records=st.lists(outputs_record(), min_size=1, max_size=6), data=st.data())
def test_outputs_reader_on_truncated_lines(records, data):
    lines, intact, broken = [], [], []
    for lineno, record in enumerate(records, 1):
        line = json.dumps(record, ensure_ascii=data.draw(st.booleans()))
        cut = data.draw(st.one_of(st.none(), st.integers(0, len(line) - 1)))
        if cut is None:
            intact.append(record)
        elif cut > 0:  # cut to nothing: a blank line, skipped without a word
            broken.append(lineno)
        lines.append(line if cut is None else line[:cut])
    strict = data.draw(st.booleans())
    result, report = read_outputs_file(("\n".join(lines) + "\n").encode(), strict)
    assert [int(m["line"]) for m in map(REPORT_LINE.fullmatch, report) if m["line"]] == broken
    if intact and not (strict and broken):
        assert result == intact
    else:
        assert isinstance(result, str)


@given(records=st.lists(st.fixed_dictionaries(
    {"id": json_value, "task": st.one_of(st.sampled_from(["toy", "math", "countdown", "poem"]), json_value),
     "answer": json_value, "completions": st.lists(st.one_of(st.text(max_size=20), st.sampled_from(
         ["</think><answer>5</answer>", "\\boxed{5}", "#### 5", "x</think><answer>1+2</answer>"])), min_size=1,
         max_size=3)},
    optional={"metadata": st.one_of(json_value, st.fixed_dictionaries({"answer_style": json_value,
                                                                       "nums": json_value, "target": json_value})),
              "lengths": json_value, "finish_reasons": json_value, "preds": json_value}),
    min_size=1, max_size=4))
def test_eval_scores_every_record_the_reader_accepts(records):
    """Records with the required fields but any JSON in the others: each is reported as a bad line,
    or scored, summarized, printed and written without an error."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    result, _ = read_outputs_file(data, strict=False)
    if isinstance(result, str):
        return
    grading._get_pool()  # the grader's start-up (bounded by grading itself) is not this call's
    with time_limit(CALL_LIMIT):
        scored, errors = ev.rescore(result)
        summary = ev.summarize(scored, errors, by=("level",))
        ev.report("out", summary)
        with tempfile.TemporaryDirectory() as tmp:
            ev.write_outputs(scored, summary, Path(tmp) / "scored.jsonl")


# ---- an adversarial grading batch through score_completions -------------------------------------
TOWERS = [("\\boxed{9^{9^{9^{9}}}}", "2"), ("\\boxed{10^{10^{10}}}", "3")]
MB = 1_000_000
HOSTILE = TOWERS + [  # (completion, reference)
    ("x" * MB, "5"), ("\\boxed{" + "1" * MB + "}", "1"), ("\\boxed{" + "$" * MB + "}", "1"),
    ("\\boxed{" + "\\text{" * (MB // 7) + "5" + "}" * (MB // 7) + "}", "5"),
    ("\\boxed{" + "9^{" * 10_000 + "9" + "}" * 10_000 + "}", "9"), ("\\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}", "5"),
]
ORDINARY = [  # (completion, reference, correct)
    ("so $\\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1.0), ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{42}", "42", 1.0), ("\\boxed{41}", "42", 0.0), ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{3.14}", "\\pi", 0.0), ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0), ("no answer", "5", 0.0),
    ("\\boxed{1,000}", "1000", 1.0), ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}", 0.0),
]


def adversarial_batch(hostile_copies: int = 1, ordinary_copies: int = 1, shuffle_seed: int | None = None):
    """(rows, completions, expected correctness, None for the hostile ones) of a grading batch: hanging
    towers, megabyte strings, 10,000 nested braces and a 10,000-high tower, then ordinary answers;
    in a seeded random order with shuffle_seed."""
    items = [(t, g, None) for t, g in HOSTILE] * hostile_copies + ORDINARY * ordinary_copies
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    rows = [{"id": str(i), "task": "math", "prompt": [], "answer": g, "metadata": {"answer_style": "boxed"}}
            for i, (_, g, _) in enumerate(items)]
    return rows, [t for t, _, _ in items], [c for _, _, c in items]


def test_adversarial_batch_is_graded_in_bounded_time(monkeypatch):
    # The batch's backstop (answers_match_many's deadline) is tested on a fake clock in test_grading; here it
    # must not decide, however slow the machine: what is tested is that each hanging pair is cut by its own
    # timeout, so the pairs after it are still graded.
    monkeypatch.setattr(grading, "_MV_START_TIMEOUT", 600.0)
    rows, texts, expected = adversarial_batch()
    answers_match("1", "2\\cdot\\frac{1}{2}")  # the pool is up
    assert settled_workers() == grading._MV_WORKERS
    pool = grading._pool
    with time_limit(1200):  # a hang guard only: the hanging towers must not make the batch hang
        scores, errors = score_completions(rows, texts)
    assert grading._pool is pool  # no pair was left to the backstop, which would have discarded the pool
    # the towers time out and are counted; the other hostile inputs may fail too, and are counted
    assert len(TOWERS) <= errors <= len(HOSTILE), errors
    got = [s.correct for s, c in zip(scores, expected) if c is not None]
    assert got == [c for c in expected if c is not None]  # ordinary answers after the towers: right
    # the stuck workers were killed and replaced: as many as before, and none left busy
    assert settled_workers() == grading._MV_WORKERS
    assert answers_match("2\\sqrt{2}", "\\sqrt{8}")
    grading.shutdown_grader()
    assert grader_workers() == []


# ---- what the fuzzing found, fixed: each input as it was found --------------------------------
def test_a_huge_number_against_a_decimal_is_compared_exactly():
    # float() of a 400-digit value overflowed inside the fast path, and the whole batch went ungraded
    assert _fast_match("1" + "0" * 400, "1.2") is False
    assert _fast_match("1" + "0" * 400 + ".5", "1" + "0" * 400) is True  # relative tolerance 1e-6
    assert _fast_match("1" + "0" * 400 + ".5", "2" + "0" * 400) is False


def test_normalization_takes_linear_time_on_megabyte_answers():
    # both took quadratic time: about 6 s for a megabyte of "$", hours for 140,000 nested \text{
    with time_limit(CALL_LIMIT):
        assert normalize_answer("$" * MB + " 5 " + "$" * MB) == "5"
        nested = normalize_answer("\\text{" * (MB // 7) + "5" + "}" * (MB // 7))
    assert nested.endswith("5" + "}" * (MB // 7 - 8))  # eight levels unwrapped, then left to Math-Verify
    assert normalize_answer("\\text{\\textbf{\\mathrm{ 5 }}}") == "5"


def test_outputs_reader_reports_each_unusable_line(tmp_path, capsys):
    good = {"id": "a", "task": "toy", "answer": "5", "completions": ["x</think><answer>5</answer>"]}
    lines = [json.dumps(good).encode(), b'{"id": "\xff"}', b"[" * 5000, b'{"id": ' + b"1" * 5000 + b"}",
             json.dumps({**good, "id": "\\ud800"}).encode().replace(b"\\\\ud800", b"\\ud800"),
             json.dumps({**good, "lengths": False}).encode(), json.dumps({**good, "lengths": [None]}).encode(),
             json.dumps({**good, "finish_reasons": [1]}).encode(), json.dumps({**good, "metadata": 3}).encode()]
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = ev.read_outputs(path, strict=False)
    assert records == [good]
    err = capsys.readouterr().err
    for message in [":2: not UTF-8 text", ":3: not valid JSON (nested too deeply)", ":4: not valid JSON (Exceeds",
                    ":5: not UTF-8 text", ":6: 'lengths' must be a list of numbers",
                    ":7: 'lengths' must be a list of numbers", ":8: 'finish_reasons' must be a list of strings",
                    ":9: 'metadata' must be a JSON object"]:
        assert f"{path}{message}" in err, message
    with pytest.raises(SystemExit, match="8 malformed line"):
        ev.read_outputs(path, strict=True)
