"""Is this answer right? Answer extraction, normalization and equivalence, the Countdown and format
checks, the poem reward, and `score_completions`: the one checker of training rewards and eval.py.

Safety rule, for exactly this file: model output never reaches eval, exec, sympify or parse_expr.
Plain numbers are parsed with regexes and Fraction; Countdown expressions with a small recursive-descent
parser; everything else goes to Math-Verify with the LaTeX extractor only (its ExprExtractionConfig
calls sympy's eval-based parse_expr). Math-Verify can hang (e.g. 9^{9^{9^{9}}}) and its own timeout
uses signal.alarm (main thread only), so it runs in a small spawned worker pool and we bound the wait
ourselves; a pool with a stuck worker is killed. Spawned workers re-import the main script, so entry
scripts need the `if __name__ == "__main__":` guard. Code rows are graded by running the program on
its tests, which only sandbox.py does. No torch here.

Read top to bottom:
  prompt templates   what each template asks the model to write (data_prep.py, eval.py --template)
  extraction         the final answer of a completion: \\boxed{}, <answer>, GSM8K's ####, a code block
  normalization      plain numbers read exactly (Fraction), scientific notation, thousands, percents
  equivalence        the exact fast path, then Math-Verify in a worker pool (answers_match_many)
  Countdown, format, poem reward
  scoring a batch    score_completions
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import math
import multiprocessing
import operator
import os
import re
import sys
import threading
import time
import types
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from sandbox import run_code_tests_many

# ---- prompt templates: each promises an answer style that the checks below read -------------------
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PRIME_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within <think> "
    "</think> and the answer is enclosed within <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think>\n<answer> answer here </answer>."
)
# Prefilled assistant turn: the completion starts INSIDE the reasoning and goes on with
# "... </think>\n<answer> ... </answer>".
R1_PREFILL = "Let me solve this step by step.\n<think>"
# PRIME's instruction for coding problems; the reward runs the last ```python block against the tests.
CODE_INSTRUCTION = "Write Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
# GSM8K's own answer line, shown once: a worked example as an earlier turn, then the question. Greedy on
# 100 GSM8K test problems, SmolLM2-135M-Instruct wrote a final "#### N" line in 0 under qwen_math (it
# ends with "The answer is N"), 16 with the instruction as a system prompt, 91 after this example.
GSM8K_EXAMPLE = ("A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar bill. "
                 "How much change does he get?",
                 "4 pens cost 4 * 3 = 12 dollars.\nHis change is 20 - 12 = 8 dollars.\n#### 8")
ANSWER_STYLE = {"qwen_math": "boxed", "prime": "boxed", "r1": "tag", "code": "code",
                "gsm8k": "gsm8k"}  # template -> answer_style


def build_prompt(template: str, question: str) -> list[dict]:
    """Chat messages for one question under a named template."""
    if template == "qwen_math":
        return [{"role": "system", "content": QWEN_MATH_SYSTEM}, {"role": "user", "content": question}]
    if template == "prime":
        return [{"role": "user", "content": question + PRIME_SUFFIX}]
    if template == "r1":
        return [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": R1_PREFILL}]
    if template == "code":
        return [{"role": "user", "content": question + "\n\n" + CODE_INSTRUCTION}]
    if template == "gsm8k":
        return [{"role": "user", "content": GSM8K_EXAMPLE[0]}, {"role": "assistant", "content": GSM8K_EXAMPLE[1]},
                {"role": "user", "content": question}]
    raise ValueError(f"unknown template {template!r}; choose one of {sorted(ANSWER_STYLE)}")


def as_answer(x) -> str:
    """Reference answers are strings: 27.0 becomes "27"; lists (OlympiadBench's ["$1$", "$2$"]) are
    joined after their $...$ delimiters are dropped. ValueError for what is no answer: null, true/false,
    NaN or infinity, a list of lists."""
    if isinstance(x, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in x):
            raise ValueError("a list of lists is not an answer")
        return ", ".join(strip_dollars(as_answer(v)) for v in x)
    if x is None or isinstance(x, bool) or isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{x!r} is not an answer")
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def strip_dollars(s: str) -> str:
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def answer_style(row: dict) -> str:
    """How the answer is written: "tag" (<answer>..</answer>, R1 template), "boxed" (\\boxed{}), "gsm8k" (a
    final "#### N" line) or "code" (a fenced Python block)."""
    default = "tag" if row["task"] in ("toy", "countdown", "poem") else "code" if row["task"] == "code" else "boxed"
    return row.get("metadata", {}).get("answer_style", default)


# ---- extraction -----------------------------------------------------------

# (?![a-zA-Z]) so that e.g. \fboxsep is not taken for \fbox
_BOXED_RE = re.compile(r"\\(boxed|fbox)(?![a-zA-Z])")


def _braced(text: str, start: int) -> str | None:
    """Content of the {...} group opening at text[start], or None if unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":  # skip escaped chars so \{ and \} do not count as braces
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / `\\boxed 5`; None if absent or unbalanced."""
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]  # only the last one counts, even if an earlier one was fine
    rest = text[m.end() :]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _braced(text, len(text) - len(stripped))
        return None if content is None else content.strip()
    # `\boxed 5`: TeX's single-token argument form
    token = re.match(r"\s+([^\s$]+)", rest)
    if m.group(1) == "boxed" and token:
        return token.group(1)
    return None


def last_tag(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last <tag>...</tag>; None if there is none."""
    open_, close = f"<{tag}>", f"</{tag}>"
    end = text.rfind(close)
    if end == -1:
        return None
    # rfind (not a regex) so that "<answer>a <answer>b</answer>" gives "b"
    start = text.rfind(open_, 0, end)
    if start == -1:
        return None
    return text[start + len(open_) : end].strip()


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K reference: the text after the last '####', without thousands commas."""
    return answer_field.split("####")[-1].strip().replace(",", "")


# an opening fence: ```python, ```py or ```python3 (any case), then the line break
_CODE_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n", re.IGNORECASE)


def last_code_block(text: str) -> str | None:
    """Body of the last fenced Python block; an unclosed last block runs to the end of the text
    (a completion cut at max tokens). None when there is no Python fence."""
    fences = list(_CODE_FENCE_RE.finditer(text))
    if not fences:
        return None
    body = text[fences[-1].end():]
    end = body.find("```")
    return body if end < 0 else body[:end]


def extract_answer(text: str, style: str) -> str | None:
    """The final answer of a model output for a prompt style: 'tag', 'boxed', 'gsm8k' or 'code'.

    code: the program to run, the last fenced Python block; a completion with no fence at all is
    taken as the program itself, as PRIME's verifier does (it then fails the format check)."""
    if style == "tag":
        content = last_tag(text, "answer")
        if content is not None and (boxed := last_boxed(content)) is not None:
            return boxed  # "<answer>\boxed{7}</answer>" is common; grade the 7
        return content
    if style == "boxed":
        return last_boxed(text)
    if style == "gsm8k":
        if "####" not in text:
            return None
        # first line only: models often keep talking after the answer
        after = text.rsplit("####", 1)[1].strip()
        return after.split("\n", 1)[0].strip() or None
    if style == "code":
        block = last_code_block(text)
        return text if block is None else block
    raise ValueError(f"Unknown answer style {style!r}; expected 'tag', 'boxed', 'gsm8k' or 'code'.")


# ---- normalization and plain numbers --------------------------------------

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
_TEXT_MAX_NESTING = 8  # deeper is no answer a person writes; a bound keeps each call linear in the text
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")  # not \leftarrow
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_SLASH_RE = re.compile(r"(-?\d+)/(\d+)")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_PAREN_NUMBER_RE = re.compile(r"\((-?(?:\d+(?:\.\d+)?|\.\d+))\)")  # "(073)": AIME's answer style
# Scientific notation, matched against a WHOLE normalized answer only, so that Euler's e in
# "3e^{-2t}" or "2e" is never read as an exponent: 4.5e33, 4.5E+33, 4.5\times10^{33},
# 4.5\cdot10^{33}, 10^{-8}. (TeX's 10^33 means 10^3 followed by 3, so only 10^{..} or 10^d.)
_MANTISSA = r"(?:\d+(?:\.\d*)?|\.\d+)"
_E_NOTATION_RE = re.compile(rf"(-?)({_MANTISSA})[eE]([+-]?\d+)")
_TIMES_TEN_RE = re.compile(rf"(-?)(?:({_MANTISSA})(?:\\times|\\cdot|×|·))?10\^(?:\{{([+-]?\d+)\}}|(\d))")
_MAX_EXPONENT = 10_000  # 10**10000 is instant; 1e999999999 from a model must not hang the grader
_REL_TOL = Fraction(1, 10**6)


def _strip_outer_braces(s: str) -> str:
    """`{(2,3)}` -> `(2,3)`: peel brace groups that span the whole text (a TeX group is its content).
    One pass pairs every { with its }; escaped \\{ \\} (sets) are never touched."""
    close_of, opened, i = {}, [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            close_of[opened.pop()] = i
        i += 1
    lo, hi = 0, len(s) - 1
    while True:
        while lo < hi and s[lo].isspace():
            lo += 1
        while hi > lo and s[hi].isspace():
            hi -= 1
        if lo < hi and s[lo] == "{" and close_of.get(lo) == hi:
            lo, hi = lo + 1, hi - 1
        else:
            return s[lo : hi + 1]


def normalize_answer(s: str) -> str:
    """Light, deterministic normalization for the exact-match fast path.

    Only rewrites that can never make two different answers equal. Units and
    percent semantics are left to Math-Verify; a trailing percent sign is kept
    (as \\%) so it can still be seen.
    """
    s = s.strip()
    # "$5$", "$$5$$": moved indices, not slices, so that a megabyte of "$" takes linear time
    start, end = 0, len(s)
    while end - start >= 2 and s[start] == "$" and s[end - 1] == "$":
        start, end = start + 1, end - 1
        while start < end and s[start].isspace():
            start += 1
        while end > start and s[end - 1].isspace():
            end -= 1
    s = s[start:end]
    for _ in range(_TEXT_MAX_NESTING):  # unwrap nested \text{\textbf{...}} from the inside out
        prev, s = s, _TEXT_RE.sub(r"\1", s)
        if s == prev:
            break
    s = _LEFT_RIGHT_RE.sub("", s)
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ "):
        s = s.replace(spacing, "")
    listed = re.search(r",\s", s) is not None  # "2, 500" is a list, "2,500" a number
    s = re.sub(r"\s+", "", s)
    s = _strip_outer_braces(s)  # "\boxed{{(2,3)}}"
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if s.endswith("."):  # "5." at the end of a sentence
        s = s[:-1]
    if not listed and _THOUSANDS_RE.fullmatch(s):  # "1,234,567" but not "1,23" or "0,100" (lists)
        s = s.replace(",", "")
    if m := _PAREN_NUMBER_RE.fullmatch(s):  # "\textbf{(073)}" -> "073"
        s = m[1]
    if s.endswith("%") and not s.endswith("\\%"):
        s = s[:-1] + "\\%"
    return s


def _scientific_parts(s: str) -> tuple[str, str, int] | None:
    """(sign, mantissa, exponent) of a normalized number in scientific notation, or None."""
    if m := _E_NOTATION_RE.fullmatch(s):
        return m[1], m[2], _exponent(m[3])
    if m := _TIMES_TEN_RE.fullmatch(s):
        return m[1], m[2] or "1", _exponent(m[3] or m[4])
    return None


def _exponent(digits: str) -> int:
    """An exponent's value; one of more than 9 digits is past the cap anyway (and int() refuses 4,300)."""
    if len(digits.lstrip("+-").lstrip("0")) > 9:
        return -(_MAX_EXPONENT + 1) if digits.startswith("-") else _MAX_EXPONENT + 1
    return int(digits)


def _scientific(s: str) -> Fraction | None:
    """Exact value of a normalized number in scientific notation, or None (also beyond the exponent cap)."""
    parts = _scientific_parts(s)
    if parts is None or abs(parts[2]) > _MAX_EXPONENT:
        return None
    sign, mantissa, exponent = parts
    value = Fraction(mantissa) * Fraction(10) ** exponent
    return -value if sign else value


def _parse_fraction(s: str) -> Fraction | None:
    """Exact value of an already-normalized plain number; a trailing \\% is ignored."""
    s = s.removesuffix("\\%")
    try:
        if _DECIMAL_RE.fullmatch(s):
            return Fraction(s)
        if m := _SLASH_RE.fullmatch(s):
            return Fraction(int(m[1]), int(m[2]))
        if m := _FRAC_RE.fullmatch(s):
            value = Fraction(int(m[2]), int(m[3]))
            return -value if m[1] else value
        return _scientific(s)
    except (ValueError, ZeroDivisionError):  # x/0, or too many digits for int()
        return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Integers exactly (73 != 730, 1000001 != 1000000, 4.5e33 == 45\\times10^{32}); otherwise a
    relative tolerance of 1e-6, so 2.0000001 == 2 but 0.33 != 1/3 and 4.5e32 != 4.5e33. Zero only
    equals zero: 1e-12 and 1e-15 are different answers, and 0 is not 1.6e-19."""
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1 or a == 0 or b == 0:
        return False
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b))


def _for_math_verify(s: str) -> str:
    """The text Math-Verify gets: a whole-text brace group peeled, and e-notation spelled
    \\times10^{n} (Math-Verify's LaTeX reader takes 4.5e33 for 4.5 * Euler's e * 33)."""
    s = _strip_outer_braces(s.strip())
    if m := _E_NOTATION_RE.fullmatch(normalize_answer(s)):
        s = f"{m[1]}{m[2]}\\times10^{{{int(m[3])}}}"
    return s


# ---- equivalence: fast path + Math-Verify in a worker pool ----------------

_MV_WORKERS = 2  # small: Math-Verify calls are short, the pool only isolates them
_MV_START_TIMEOUT = 60.0  # spawning + importing sympy; not charged to `timeout`
_pool = None
_pool_pid = None
_pool_lock = threading.Lock()


def _fast_match(pred: str | None, gold: str) -> bool | None:
    """True/False when decidable without Math-Verify, else None."""
    if pred is None or not pred.strip() or not gold.strip():
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p == g:
        return True
    a, b = _parse_fraction(p), _parse_fraction(g)
    if a is None or b is None:
        if any((parts := _scientific_parts(s)) and abs(parts[2]) > _MAX_EXPONENT for s in (p, g)):
            return False  # no answer is 1e999999999; sympy would try to build that power
        return None
    if _numbers_equal(a, b):
        return True
    if p.endswith("\\%") or g.endswith("\\%"):
        return None  # 50\% vs 0.5: Math-Verify accepts both readings of a percent
    return False


def _mv_init() -> None:
    import logging
    import signal

    # Die at once on SIGTERM: a worker stuck in C code (a huge integer power) cannot run the
    # pool's Python-level SIGTERM handler, and would cost a further wait before SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # we pass timeouts of None on purpose; silence Math-Verify's warning about it
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  pay the sympy import once per worker


def _mv_ping() -> bool:
    return True


def _mv_verify(gold: str, pred: str) -> bool:
    """Runs in a worker process. LaTeX extraction only: the Expr extractor evals."""
    from math_verify import LatexExtractionConfig, parse, verify

    # "$...$" rather than "\boxed{...}": the boxed wrapper silently closes
    # unbalanced braces, e.g. pred "5}" would become 5.
    config = [LatexExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    # gold first: verify is asymmetric
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _get_pool():
    """The shared worker pool, spawned on first use, and again if it broke (a worker killed from
    outside while idle breaks a pebble pool for good)."""
    global _pool, _pool_pid
    with _pool_lock:
        # pid check: a forked child must not use its parent's pool
        if _pool is None or _pool_pid != os.getpid() or not _pool.active:
            if _pool is not None and _pool_pid == os.getpid():
                _stop_pool(_pool)
            from pebble import ProcessPool

            pool = ProcessPool(_MV_WORKERS, initializer=_mv_init, context=multiprocessing.get_context("spawn"))
            try:
                with _main_script_hidden():  # the first schedule starts the workers, in this thread
                    ping = pool.schedule(_mv_ping)
                ping.result(_MV_START_TIMEOUT)
            except BaseException:
                _stop_pool(pool)
                raise
            _pool, _pool_pid = pool, os.getpid()
        return _pool


@contextlib.contextmanager
def _main_script_hidden():
    """A spawned process imports the main script first (multiprocessing's rule). For a training script
    that is torch and the model code, about 190 MB per grader worker that Math-Verify never uses, so the
    pool's workers start while __main__ is a bare module and import only this file. A worker the pool
    replaces later (one that crashed) starts the usual way, which is slower but equally correct."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stop_pool(pool) -> None:
    """Kill a pool's workers, stuck ones included, and wait until they are gone."""
    pool.stop()
    pool.join()


def _discard_pool(pool) -> None:
    """Kill a pool that may hold a stuck worker; the next call spawns a fresh one."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    _stop_pool(pool)


def shutdown_grader() -> None:
    """Terminate the Math-Verify worker pool (also run at interpreter exit)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and _pool_pid == os.getpid():
        _stop_pool(pool)


def forget_grader_pool() -> None:
    """Drop the worker pool without stopping it, for a caller that kills this process's children itself
    (common.stop_children on an interrupt): the exit handler then has nothing left to stop. No lock: the
    interrupt may have arrived while this thread held it."""
    global _pool
    _pool = None


atexit.register(shutdown_grader)


def answers_match_many(pairs: list[tuple[str | None, str]], timeout: float = 5.0) -> tuple[list[bool], int]:
    """The one equivalence check: is each pred the same answer as its gold? Returns (results, n_failed).

    Only pairs the fast path cannot decide go to Math-Verify, all at once. Each gets `timeout` seconds
    of a worker, counted from when a worker takes it; a worker still busy then is killed and replaced,
    so a pair that hangs (9^{9^{9^{9}}}) holds up neither the pairs after it nor later batches. A batch
    takes about timeout * ceil(h / workers) for h pairs that hang, plus a worker start-up (~2 s) per
    hang; it waits at most timeout * ceil(n / workers) + _MV_START_TIMEOUT in all, then kills the pool.
    Timeouts and worker errors count as False and as failed.
    """
    results, todo, texts, n_failed = [False] * len(pairs), [], {}, 0
    for i, (pred, gold) in enumerate(pairs):
        try:  # one answer that breaks the fast path fails alone, not its whole batch
            fast = _fast_match(pred, gold)
            if fast is None:
                texts[i] = (_for_math_verify(gold), _for_math_verify(pred))
                todo.append(i)
            else:
                results[i] = fast
        except Exception:
            n_failed += 1
    if not todo:
        return results, n_failed

    try:
        pool = _get_pool()
        jobs = [(i, pool.schedule(_mv_verify, texts[i], timeout=timeout)) for i in todo]
    except Exception:  # pool failed to start, or another thread just killed it
        return results, n_failed + len(todo)

    # a backstop only: each replaced worker also needs a start-up, hence one start-up allowance
    deadline = time.monotonic() + timeout * math.ceil(len(todo) / _MV_WORKERS) + _MV_START_TIMEOUT
    out_of_time = False
    for i, job in jobs:
        try:
            results[i] = bool(job.result(max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:  # its own timeout, or the batch's deadline
            n_failed += 1
            out_of_time = out_of_time or not job.done()
        except Exception:  # an exception raised inside the worker, or a worker that died
            n_failed += 1
    if out_of_time:
        _discard_pool(pool)  # the batch ran out of time with pairs still queued or running
    return results, n_failed


# ---- Countdown -------------------------------------------------------------

_CD_MAX_LEN = 200
_CD_MAX_DEPTH = 32
_CD_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def countdown_value(expr: str, nums: list[int]) -> float | None:
    """Value of a Countdown expression that uses every number in `nums` exactly once.

    Grammar (binary + - * / and parentheses only, no unary minus):
        expr := term (('+' | '-') term)*
        term := atom (('*' | '/') atom)*
        atom := INT | '(' expr ')'
    Returns None for anything else, for a wrong multiset of numbers, or for x/0.
    """
    expr = expr.replace("×", "*").replace("÷", "/").strip()
    # [0-9], not \d: \d also matches non-ASCII digits that int() would accept
    if len(expr) > _CD_MAX_LEN or not re.fullmatch(r"[0-9 +\-*/()]+", expr):
        return None
    tokens = re.findall(r"[0-9]+|[+\-*/()]", expr)
    pos = 0
    literals = []

    def parse_binary(depth, ops, operand):  # operand ((op) operand)*, left to right
        nonlocal pos
        value = operand(depth)
        while pos < len(tokens) and tokens[pos] in ops:
            op = tokens[pos]
            pos += 1
            value = _CD_OPS[op](value, operand(depth))  # Fraction: x/0 raises
        return value

    def parse_expr(depth):
        return parse_binary(depth, "+-", parse_term)

    def parse_term(depth):
        return parse_binary(depth, "*/", parse_atom)

    def parse_atom(depth):
        nonlocal pos
        if depth > _CD_MAX_DEPTH or pos >= len(tokens):
            raise ValueError("too deep or unexpected end")
        token = tokens[pos]
        pos += 1
        if token.isdigit():
            literals.append(int(token))
            return Fraction(int(token))
        if token == "(":
            value = parse_expr(depth + 1)
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError("missing ')'")
            pos += 1
            return value
        raise ValueError(f"unexpected {token!r}")  # e.g. unary minus, '**'

    try:
        value = parse_expr(0)
    except (ValueError, ZeroDivisionError):
        return None
    if pos != len(tokens) or sorted(literals) != sorted(nums):
        return None  # trailing tokens, or numbers missing / reused / invented
    return float(value)


def countdown_correct(expr: str | None, nums: list[int], target: float) -> bool:
    """Whether `expr` is a valid Countdown solution reaching `target` (within 1e-5)."""
    if expr is None:
        return False
    value = countdown_value(expr, nums)
    return value is not None and abs(value - target) < 1e-5


# ---- format ----------------------------------------------------------------

# The prompt prefills "<think>", so a tag-style completion starts mid-reasoning.
_TAG_FORMAT_RE = re.compile(r"(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_ok(completion: str, style: str) -> bool:
    """Whether a completion follows the output format of its prompt style."""
    if style == "tag":
        if not completion.count("</think>") == completion.count("<answer>") == completion.count("</answer>") == 1:
            return False
        m = _TAG_FORMAT_RE.fullmatch(completion)
        # non-empty reasoning, non-empty answer, no reasoning reopened after </think>
        return bool(m and m[1].strip() and m[2].strip() and "<think>" not in m[2])
    if style == "boxed":
        boxed = last_boxed(completion)
        return boxed is not None and boxed.strip() != ""
    if style == "gsm8k":
        return extract_answer(completion, "gsm8k") is not None
    if style == "code":  # a closed, non-empty Python block
        fences = list(_CODE_FENCE_RE.finditer(completion))
        return bool(fences) and "```" in completion[fences[-1].end():] and bool(last_code_block(completion).strip())
    raise ValueError(f"Unknown answer style {style!r}; expected 'tag', 'boxed', 'gsm8k' or 'code'.")



# ---- poem completion: the rule reward -------------------------------------
# The generated ending (the <answer> content) against the gold ending and the poem's form:
#   similarity  chrF of the generated ending against the gold ending (sacrebleu), / 100
#   form        line count: sonnet 14, quatrain 4, octave 8 lines for the whole poem (given beginning
#               + generated ending): max(0, 1 - |lines - N| / N); other forms (free verse) unconstrained: 1
#   rhyme       the gold poem's rhyme pairs (lines at most 3 apart whose last words rhyme in CMUdict,
#               at least one of them in the ending) that the generated poem keeps, as a share; 1 if none
#   syllables   per gold ending line: max(0, 1 - |s_generated - s_gold| / s_gold) at the same line, mean
# A completion without an answer scores 0 on every component.
POEM_LINES = {"sonnet": 14, "quatrain": 4, "octave": 8}
POEM_WEIGHTS = {"similarity": 0.4, "form": 0.2, "rhyme": 0.2, "syllables": 0.2}
_RHYME_WINDOW = 3  # ABAB, ABBA, ABCB, AABB: rhyme partners are at most 3 lines apart
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


def poem_lines(text: str) -> list[str]:
    """Non-empty lines, stripped (stanza breaks do not count)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _last_word(line: str) -> str | None:
    words = _WORD_RE.findall(line.lower().replace("\u2019", "'"))
    return words[-1] if words else None


def words_rhyme(a: str | None, b: str | None) -> bool:
    """Two different words whose CMUdict pronunciations share the rhyming part (last stressed vowel on)."""
    import pronouncing

    if not a or not b or a == b:  # repeating a word is not a rhyme
        return False
    parts_a = {pronouncing.rhyming_part(p) for p in pronouncing.phones_for_word(a)}
    return any(pronouncing.rhyming_part(p) in parts_a for p in pronouncing.phones_for_word(b))


def syllable_count(line: str) -> int:
    """Syllables of a line: CMUdict's first pronunciation of each word; unknown words count their vowel
    groups (a final silent e dropped)."""
    import pronouncing

    total = 0
    for word in _WORD_RE.findall(line.lower().replace("\u2019", "'")):
        phones = pronouncing.phones_for_word(word)
        if phones:
            total += pronouncing.syllable_count(phones[0])
        else:
            groups = len(re.findall(r"[aeiouy]+", word))
            if word.endswith("e") and not word.endswith(("le", "ee")) and groups > 1:
                groups -= 1
            total += max(groups, 1)
    return total


def poem_components(generated: str | None, gold: str, beginning: str, form: str) -> dict[str, float]:
    """The poem reward's components and `reward`, their weighted sum (POEM_WEIGHTS), each in [0, 1]."""
    import sacrebleu

    gen, gold_lines, begin = poem_lines(generated or ""), poem_lines(gold), poem_lines(beginning)
    if not gen:
        return {**dict.fromkeys(POEM_WEIGHTS, 0.0), "reward": 0.0}
    similarity = sacrebleu.sentence_chrf("\n".join(gen), ["\n".join(gold_lines)]).score / 100
    n = POEM_LINES.get(form.strip().lower())
    form_score = 1.0 if n is None else max(0.0, 1 - abs(len(begin) + len(gen) - n) / n)
    gold_words = [_last_word(line) for line in begin + gold_lines]
    gen_words = [_last_word(line) for line in begin + gen]
    pairs = [(i, j) for j in range(len(begin), len(gold_words)) for i in range(max(0, j - _RHYME_WINDOW), j)
             if words_rhyme(gold_words[i], gold_words[j])]
    kept = sum(j < len(gen_words) and words_rhyme(gen_words[i], gen_words[j]) for i, j in pairs)
    rhyme = kept / len(pairs) if pairs else 1.0
    per_line = []
    for k, line in enumerate(gold_lines):
        target = syllable_count(line)
        if target:
            per_line.append(max(0.0, 1 - abs(syllable_count(gen[k]) - target) / target) if k < len(gen) else 0.0)
    syllables = float(np.mean(per_line)) if per_line else 1.0
    parts = {"similarity": similarity, "form": form_score, "rhyme": rhyme, "syllables": syllables}
    return {**parts, "reward": sum(POEM_WEIGHTS[k] * v for k, v in parts.items())}


# ---- scoring a batch ------------------------------------------------------------


@dataclass
class Score:
    correct: float | None  # 1/0; None when the task has no correctness check (poem completion)
    format: float  # 1 if the completion follows the template's answer format
    pred: str | None  # the extracted answer (code: the program that was run)
    tests_passed: float | None = None  # code: the share of the row's tests the program passed
    timed_out: bool = False  # code: the program ran out of time (its remaining tests were not run)
    poem: dict | None = None  # poem: poem_components (similarity, form, rhyme, syllables, reward)


def score_completions(rows: list[dict], texts: list[str], timeout: float = 5.0) -> tuple[list[Score], int]:
    """Rule-based scores of completions (rows[i] is the task row of texts[i]).

    A scorer that raises or runs out of time gives 0 and is counted: the second return value is
    the number of such failures, logged as `rewards/errors`. Training never stops on a bad answer.
    Code rows run their program on the row's tests in the sandbox (sandbox.py): correct is 1 when
    every test passes; a program killed by a signal other than its time limit, or a sandbox that
    failed, counts as an error; a program out of time sets Score.timed_out (`rewards/code_timeouts`).
    """
    preds, fmts, errors = [], [], 0
    for row, text in zip(rows, texts):
        style = answer_style(row)
        try:
            preds.append(extract_answer(text, style))
            fmts.append(float(format_ok(text, style)))
        except Exception:
            preds.append(None), fmts.append(0.0)
            errors += 1
    scores = [Score(None, f, p) for f, p in zip(fmts, preds)]
    math_idx, code_idx = [], []
    for i, (row, pred) in enumerate(zip(rows, preds)):
        if row["task"] == "poem":
            meta = row["metadata"]
            try:
                scores[i].poem = poem_components(pred, str(row["answer"]), meta.get("poem_start", ""),
                                                 meta.get("form", ""))
            except Exception:
                scores[i].poem, errors = poem_components(None, "", "", ""), errors + 1
        elif row["task"] == "countdown":
            try:
                meta = row["metadata"]
                scores[i].correct = float(countdown_correct(pred, meta["nums"], meta["target"]))
            except Exception:
                scores[i].correct, errors = 0.0, errors + 1
        elif row["task"] == "code":
            code_idx.append(i)
        else:
            math_idx.append(i)
    if math_idx:
        try:
            matches, failed = answers_match_many([(preds[i], str(rows[i]["answer"])) for i in math_idx], timeout)
        except Exception:
            matches, failed = [False] * len(math_idx), len(math_idx)
        errors += failed
        for i, ok in zip(math_idx, matches):
            scores[i].correct = float(ok)
    if code_idx:
        results = run_code_tests_many([(preds[i], rows[i]["metadata"].get("tests")) for i in code_idx])
        for i, result in zip(code_idx, results):
            scores[i].correct = float(result.passed == result.total > 0)
            scores[i].tests_passed = result.passed / result.total if result.total else 0.0
            scores[i].timed_out = "timeout" in result.outcomes
            errors += result.errors
    return scores, errors
