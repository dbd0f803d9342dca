"""Tests for data_prep.py. Fixtures in tests/fixtures/ copy the real hub layouts (a few rows
each, answers checked by hand); no hub access is needed."""
import argparse
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import grading  # noqa: E402
import data_prep as dp  # noqa: E402


def convert(task, fixture, template=None, split=None):
    """Run one converter on a fixture file through load_rows, as the CLI does."""
    spec = dp.TASKS[task]
    split = split or spec["split"]
    rows = dp.load_rows(str(FIX / fixture), split)
    return spec["convert"](rows, template or spec["template"], str(FIX / fixture), split)


def run_cli(*args):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "data_prep.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def check_schema(rows, task, template):
    assert len({r["id"] for r in rows}) == len(rows), "ids must be unique"
    for r in rows:
        assert set(r) == {"id", "task", "prompt", "answer", "metadata"}
        assert r["task"] == task and r["id"].startswith(task + "-")
        assert isinstance(r["answer"], str) and r["answer"]
        assert all(set(m) == {"role", "content"} for m in r["prompt"])
        meta = r["metadata"]
        assert meta["template"] == template
        assert meta["answer_style"] == {"r1": "tag", "qwen_math": "boxed", "prime": "boxed"}[template]
        assert meta["source"]
        if template == "r1":
            assert r["prompt"][-1] == {"role": "assistant", "content": grading.R1_PREFILL}
        else:
            assert r["prompt"][-1]["role"] == "user"


# --- countdown: an independent evaluator for the reference expressions ------------------
def eval_expr(text):
    """Evaluate + - * / ( ) over integers with Fractions; return (value, numbers used)."""
    tokens = text.replace("(", " ( ").replace(")", " ) ").split()
    pos, used = 0, []

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            v = expr()
            assert tokens[pos] == ")"
            pos += 1
            return v
        used.append(int(tok))
        return Fraction(int(tok))

    def term():
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] in "*/":
            op = tokens[pos]
            pos += 1
            rhs = atom()
            v = v * rhs if op == "*" else v / rhs
        return v

    def expr():
        nonlocal pos
        v = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            rhs = term()
            v = v + rhs if op == "+" else v - rhs
        return v

    value = expr()
    assert pos == len(tokens), text
    return value, used


# --- templates ---------------------------------------------------------------------------
def test_build_prompt_templates():
    q = "What is 1+1?"
    assert grading.build_prompt("qwen_math", q) == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": q}]
    assert grading.build_prompt("prime", q) == [
        {"role": "user", "content": q + "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"}]
    r1 = grading.build_prompt("r1", q)
    assert [m["role"] for m in r1] == ["system", "user", "assistant"]
    assert r1[0]["content"].endswith("<think> reasoning process here </think>\n<answer> answer here </answer>.")
    assert r1[-1]["content"] == "Let me solve this step by step.\n<think>"
    assert grading.build_prompt("code", q) == [{"role": "user", "content": q + "\n\nWrite Python code to solve the problem. "
                                            "Present the code in \n```python\nYour code\n```\nat the end."}]
    with pytest.raises(ValueError, match="unknown template"):
        grading.build_prompt("nope", q)


def test_last_boxed_nested_braces():
    assert dp.last_boxed("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert dp.last_boxed("\\boxed{3} then \\boxed{2\\sqrt{2}}") == "2\\sqrt{2}"  # the LAST one
    assert dp.last_boxed("$\\boxed{\\{-1, 1\\}}$") == "\\{-1, 1\\}"
    assert dp.last_boxed("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert dp.last_boxed("no box here") is None
    assert dp.last_boxed("\\boxed{unclosed {") is None


# --- converters, through the functions ----------------------------------------------------
def test_gsm8k():
    rows, skipped = convert("gsm8k", "gsm8k.jsonl")
    check_schema(rows, "gsm8k", "qwen_math")
    assert skipped == 0
    assert [r["answer"] for r in rows] == ["72", "10", "1234"]  # "#### 1,234" -> "1234"
    assert rows[0]["id"] == "gsm8k-train-00000"
    assert rows[2]["metadata"]["solution"].endswith("#### 1,234")
    assert rows[0]["prompt"][1]["content"].startswith("Natalia sold clips")
    rows, _ = convert("aime24", "aime24.jsonl")
    assert rows[0]["id"] == "aime24-test-00000"  # evaluation benchmarks are test sets


def test_math_lighteval():
    rows, skipped = convert("math", "math_lighteval.jsonl")
    check_schema(rows, "math", "qwen_math")
    assert skipped == 0
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "2\\sqrt{2}", "\\{-1, 1\\}", "2^{4}"]
    assert [r["metadata"]["level"] for r in rows] == [1, 2, 3, "Level ?"]
    assert [r["metadata"]["subject"] for r in rows] == ["Prealgebra", "Algebra", "Algebra", "Algebra"]


def test_math500_uses_answer_field_then_falls_back_to_boxed():
    rows, skipped = convert("math500", "math500.jsonl")
    check_schema(rows, "math500", "qwen_math")
    assert skipped == 0
    assert [r["answer"] for r in rows] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "2", "3"]
    assert rows[0]["id"] == "math500-test-00000"
    meta = rows[0]["metadata"]
    assert (meta["subject"], meta["level"], meta["unique_id"]) == ("Precalculus", 2, "test/precalculus/807.json")


def test_math_skips_rows_without_any_answer():
    rows, skipped = dp.convert_math([{"problem": "p", "solution": "no box"}], "qwen_math", "mem", "train")
    assert (rows, skipped) == ([], 1)


def test_numina_skips_rows_without_boxed():
    rows, skipped = convert("numina", "numina.jsonl")
    check_schema(rows, "numina", "qwen_math")
    assert skipped == 1  # the proof row
    assert [r["answer"] for r in rows] == ["1024", "\\dfrac{3}{2}"]
    assert [r["id"] for r in rows] == ["numina-train-00000", "numina-train-00002"]  # ids follow source rows
    assert rows[1]["metadata"]["numina_source"] == "cn_k12"


def test_eurus_math_rows_strip_prime_suffix():
    rows, skipped = convert("eurus", "eurus.jsonl", template="prime")
    math_rows = [r for r in rows if r["task"] == "eurus"]
    check_schema(math_rows, "eurus", "prime")
    assert skipped == 0 and len(rows) == 5
    assert [r["answer"] for r in math_rows] == ["2", "12", "4"]
    questions = [r["prompt"][-1]["content"] for r in math_rows]
    assert questions[0] == "What is the remainder when $2^{10}$ is divided by $7$?" + grading.PRIME_SUFFIX
    assert all(q.count("Present the answer in LaTex format") == 1 for q in questions)
    assert math_rows[2]["prompt"][-1]["content"] == "How many primes are less than $10$?" + grading.PRIME_SUFFIX
    # PRIME's own system prompt is dropped; the question is re-templated.
    rows, _ = convert("eurus", "eurus.jsonl")
    assert rows[0]["prompt"][0]["content"] == grading.QWEN_MATH_SYSTEM
    assert rows[0]["prompt"][1]["content"] == "What is the remainder when $2^{10}$ is divided by $7$?"
    assert rows[2]["metadata"]["data_source"] == "numina_olympiads"


def check_code_rows(rows, prefix):
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["task"] == "code" and r["id"].startswith(prefix + "-") and isinstance(r["answer"], str)
        assert r["metadata"]["template"] == "code" and r["metadata"]["answer_style"] == "code"
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][-1]["content"].endswith("\n\n" + grading.CODE_INSTRUCTION)
        assert r["prompt"][-1]["content"].count("Write Python code") == 1


def test_eurus_code_rows_carry_their_tests():
    """Eurus-2-RL-Data code rows: ground_truth is a JSON string (stdin/stdout, or fn_name call tests);
    the prompt's instruction (either spelling) is replaced by the code template's."""
    rows, _ = convert("eurus", "eurus.jsonl")
    code = [r for r in rows if r["task"] == "code"]
    check_code_rows(code, "eurus")
    assert [r["id"] for r in code] == ["eurus-train-00001", "eurus-train-00004"]
    assert code[0]["metadata"]["tests"] == {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    assert code[1]["metadata"]["tests"] == {"fn_name": "minFlips", "inputs": [["001"], ["0101"], ["1111"]],
                                            "outputs": [[1], [0], [2]]}
    assert code[1]["prompt"][-1]["content"].startswith("Complete the function minFlips(S) which returns")
    assert code[1]["metadata"]["data_source"] == "taco" and code[1]["metadata"]["orig_index"] == 4
    spec = dp.TASKS["eurus"]
    source = dp.load_rows(str(FIX / "eurus.jsonl"), "train")
    for ability, tasks, skipped in (("math", {"eurus"}, 2), ("code", {"code"}, 3)):
        kept, n = spec["convert"](source, "qwen_math", "f", "train", ability=ability)
        assert {r["task"] for r in kept} == tasks and n == skipped
    with pytest.raises(dp.DataError, match="--template code is for code rows"):
        spec["convert"](source, "code", "f", "train")


def test_taco_layout_stdin_and_call_tests():
    rows, skipped = convert("taco", "taco.jsonl")
    check_code_rows(rows, "taco")
    assert skipped == 1  # the row whose input_output is empty
    assert rows[0]["metadata"]["tests"] == {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]}
    assert rows[0]["answer"] == "a, b = map(int, input().split())\nprint(a + b)"  # the first reference solution
    assert rows[2]["metadata"]["tests"]["fn_name"] == "twoSum"
    assert rows[2]["metadata"]["starter_code"].startswith("class Solution:")
    assert "Start from this code:\n```python\nclass Solution:" in rows[2]["prompt"][-1]["content"]
    assert rows[3]["answer"] == "" and rows[3]["metadata"]["difficulty"] == "EASY"  # no solution given


def test_reference_solutions_pass_their_own_tests():
    """The fixture's reference solutions, graded in the sandbox: every test passes."""
    from sandbox import run_code_tests_many

    rows, _ = convert("taco", "taco.jsonl")
    solved = [r for r in rows if r["answer"]]
    results = run_code_tests_many([(r["answer"], r["metadata"]["tests"]) for r in solved])
    assert [(res.passed, res.total) for res in results] == [(3, 3), (2, 2), (3, 3)]


def test_countdown_reference_expressions_are_valid():
    rows, skipped = convert("countdown", "countdown.jsonl")
    check_schema(rows, "countdown", "r1")
    assert skipped == 1  # [1, 2, 3] cannot reach 1000
    for r in rows:
        nums, target = r["metadata"]["nums"], r["metadata"]["target"]
        value, used = eval_expr(r["answer"])
        assert value == target and sorted(used) == sorted(nums), r["answer"]
        assert r["prompt"][1]["content"].startswith(
            f"Using the numbers {nums}, create an equation that equals {target}. You can use basic")
    assert [r["metadata"]["target"] for r in rows] == [98, 24, 65]
    assert rows[1]["answer"] == "8 / (3 - (8 / 3))"  # needs exact fractions; deterministic


def test_solve_countdown_directly():
    assert dp.solve_countdown([1, 2, 3], 1000) is None
    assert dp.solve_countdown([2, 2], 1) == "2 / 2"
    assert dp.solve_countdown([5, 0], 5) == "5 + 0"  # division by zero is never tried
    assert eval_expr(dp.solve_countdown([7, 2, 4], 22))[0] == 22


def test_poem():
    rows, skipped = convert("poem", "poem.jsonl")
    check_schema(rows, "poem", "r1")
    assert skipped == 0
    user = rows[1]["prompt"][1]["content"]
    assert user == ('Here is the beginning of a poem by Robert Frost, titled "Nothing Gold Can Stay" '
                    "(rhymed couplets). Continue the poem until its end.\n\nNature's first green is gold,\n"
                    "Her hardest hue to hold.\nHer early leaf's a flower;\nBut only so an hour.")
    assert rows[1]["answer"].endswith("Nothing gold can stay.")
    assert {k: rows[1]["metadata"][k] for k in ("author", "title", "form")} == {
        "author": "Robert Frost", "title": "Nothing Gold Can Stay", "form": "rhymed couplets"}
    assert rows[1]["metadata"]["poem_start"].startswith("Nature's first green is gold,\n")  # for the poem reward


@pytest.mark.parametrize("task, fixture, answers", [
    ("aime24", "aime24.jsonl", ["16", "401", "120"]),
    ("amc23", "amc23.jsonl", ["27", "2.5", "3"]),  # floats on the hub: 27.0 -> "27"
    ("minerva", "minerva.jsonl", ["6e14", "\\sqrt{2}", "3600"]),
    ("olympiadbench", "olympiadbench.jsonl", ["8", "1, 2", "20"]),  # final_answer lists joined, $...$ dropped
])
def test_benchmarks(task, fixture, answers):
    rows, skipped = convert(task, fixture)
    check_schema(rows, task, "qwen_math")
    assert skipped == 0 and [r["answer"] for r in rows] == answers


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_minerva_gold_is_the_solutions_last_box(tmp_path):
    """The common Minerva copy: problem, solution, type, idx, and no answer field."""
    path = write_rows(tmp_path / "minerva_math.jsonl", [
        {"problem": "Energy of the flare?", "solution": "First $E=\\boxed{1}$ is wrong; $E=\\boxed{7.2e19}$.",
         "type": "Astrophysics", "idx": 0},
        {"problem": "Period?", "solution": "No final answer here.", "type": "Mechanics", "idx": 1}])
    rows, skipped = dp.convert_minerva(dp.load_rows(str(path), "test"), "qwen_math", str(path), "test")
    assert skipped == 1 and [r["answer"] for r in rows] == ["7.2e19"]
    meta = rows[0]["metadata"]
    assert meta["answer_field"] == "solution" and meta["solution"].endswith("$E=\\boxed{7.2e19}$.")
    assert (meta["subject"], meta["idx"]) == ("Astrophysics", 0)


def test_curated_answer_wins_over_the_solutions_box():
    rows, _ = dp.convert_math500([
        {"problem": "p", "solution": "so $\\boxed{x=5}$", "answer": "5"},
        {"problem": "p", "solution": "so $\\boxed{\\frac 12}$", "expected_answer": "\\frac{1}{2}"},
        {"problem": "p", "solution": ["no box", "at all"], "final_answer": ["$(1,2)$"]},
        {"problem": "p", "solution": "so $\\boxed{9}$", "answer": " "}], "qwen_math", "mem", "test")
    assert [r["answer"] for r in rows] == ["5", "\\frac{1}{2}", "(1,2)", "9"]
    assert [r["metadata"]["answer_field"] for r in rows] == ["answer", "expected_answer", "final_answer", "solution"]
    assert rows[2]["metadata"]["solution"] == "no box\n\nat all"  # OlympiadBench's solution list, kept as text


def test_column_oriented_json_is_read_as_rows(tmp_path):
    """pandas' column-oriented JSON ({"column": {"row": value}}), e.g. PRIME's copy of MATH-500."""
    columns = {"problem": {"0": "What is 1+1?", "1": "Half of 1?"},
               "solution": {"0": "$\\boxed{2}$", "1": "$\\boxed{\\frac 12}$"},
               "expected_answer": {"0": "2", "1": "\\frac{1}{2}"},
               "level": {"0": "Level 1", "1": "Level 2"}, "type": {"0": "Algebra", "1": "Prealgebra"},
               "id": {"0": "test/algebra/1.json", "1": "test/prealgebra/2.json"}}
    path = tmp_path / "math500_columns.json"
    path.write_text(json.dumps(columns))
    ds = dp.load_rows(str(path), "test")
    assert len(ds) == 2 and ds[1]["problem"] == "Half of 1?"
    rows, skipped = dp.convert_math500(ds, "qwen_math", str(path), "test")
    assert skipped == 0 and [r["answer"] for r in rows] == ["2", "\\frac{1}{2}"]
    assert rows[1]["metadata"]["level"] == 2 and rows[1]["metadata"]["id"] == "test/prealgebra/2.json"
    # the same rows as one JSON array and as JSON lines read the same
    (tmp_path / "array.json").write_text(json.dumps(list(ds)))
    assert list(dp.load_rows(str(tmp_path / "array.json"), "test")) == list(ds)
    # columns whose row keys differ are refused, naming the file and the layouts expected
    path.write_text(json.dumps({"problem": {"0": "a", "1": "b"}, "answer": {"0": "1"}}))
    with pytest.raises(dp.DataError, match=r"math500_columns.json is one JSON object of objects whose row keys "
                                           r"differ.*expected JSON lines, an array of row objects, or column"):
        dp.load_rows(str(path), "test")


def test_same_rows_in_two_files_of_a_folder_are_refused(tmp_path):
    rows = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2+2?", "answer": "4"}]
    write_rows(tmp_path / "bench.jsonl", rows)
    (tmp_path / "bench_array.json").write_text(json.dumps(rows))
    with pytest.raises(dp.DataError, match=r"bench_array.json repeats 2 of its 2 rows from .*bench.jsonl .*pass "
                                           r"one of the files with --source"):
        dp.load_rows(str(tmp_path), "test")
    (tmp_path / "bench_array.json").write_text(json.dumps([{"problem": "What is 3+3?", "answer": "6"}]))
    assert len(dp.load_rows(str(tmp_path), "test")) == 3  # different rows: one folder, one dataset
    write_rows(tmp_path / "other.jsonl", [{"question": "q", "final_answer": ["1"]}])
    with pytest.raises(dp.DataError, match=r"do not have the same fields.*other.jsonl: question, final_answer"):
        dp.load_rows(str(tmp_path), "test")


def test_rows_in_the_wrong_layout_are_one_sentence():
    with pytest.raises(dp.DataError, match=r"mem row 0 field 'problem' is a dict, not text"):
        dp.convert_math([{"problem": {"0": "p"}, "answer": "1"}], "qwen_math", "mem", "test")
    with pytest.raises(dp.DataError, match=r"field 'answer' is a worked solution ending in '#### N'.*gsm8k task"):
        dp.convert_minerva([{"question": "q", "answer": "3 + 4 = 7\n#### 7"}], "qwen_math", "mem", "test")
    with pytest.raises(dp.DataError, match=r"has none of the fields \['answer', 'expected_answer', 'final_answer', "
                                           r"'solution'\] \(it has: problem, level\)"):
        dp.convert_math([{"problem": "p", "level": 1}], "qwen_math", "mem", "test")
    with pytest.raises(dp.DataError, match=r"field 'solution' is a int, not text"):
        dp.convert_numina([{"problem": "p", "solution": 5}], "qwen_math", "mem", "train")


def test_split_named_truthfully(tmp_path):
    assert dp.splits_named("gsm8k_test.jsonl") == {"test"} and dp.splits_named("train-00000-of-00002.parquet") == {"train"}
    assert dp.splits_named("contest.jsonl") == set() and dp.splits_named("math500.jsonl") == set()
    args = lambda source, split=None: argparse.Namespace(task="aime24", source=source, split=split)  # noqa: E731
    spec = dp.TASKS["aime24"]
    # a hub copy with one split called "train" is loaded as such, but the ids say test
    assert dp.resolve_split(args("HuggingFaceH4/aime_2024"), spec) == ("train", "test", "the aime24 default")
    assert dp.resolve_split(args(str(FIX / "aime24.jsonl")), spec) == ("test", "test", "the aime24 default")
    copy = tmp_path / "aime_validation.jsonl"
    copy.write_text((FIX / "aime24.jsonl").read_text())
    assert dp.resolve_split(args(str(copy)), spec) == ("validation", "validation", "named in the file name")
    assert dp.resolve_split(args(str(copy), "validation"), spec) == ("validation", "validation", "--split")
    assert dp.resolve_split(args(str(FIX / "aime24.jsonl"), "dev"), spec) == ("dev", "dev", "--split")
    # --split against the split a file names: the ids would call validation rows dev
    with pytest.raises(dp.DataError, match=r"--split dev: the file names of .*aime_validation.jsonl name the "
                                           r"split\(s\) validation, not dev; pass --split validation, or drop --split"):
        dp.resolve_split(args(str(copy), "dev"), spec)
    (tmp_path / "aime_test.jsonl").write_text(copy.read_text())  # a folder of two named splits, neither asked
    with pytest.raises(dp.DataError, match=r"name the split\(s\) test, validation, not train"):
        dp.resolve_split(args(str(tmp_path), "train"), spec)
    assert all(dp.TASKS[t]["split"] == "test" for t in ("math500", "aime24", "aime", "amc23", "amc", "minerva",
                                                        "olympiadbench"))


def test_what_is_no_answer_is_refused():
    for value, says in ((True, "True is not an answer"), (float("nan"), "nan is not an answer"),
                        ([[1, 2], [3]], "a list of lists is not an answer")):
        with pytest.raises(dp.DataError, match=rf"mem row 0 field 'answer': {says}; fix that row or drop it"):
            dp.convert_math([{"problem": "p", "answer": value}], "qwen_math", "mem", "test")
    assert grading.as_answer(["$1$", 2.0]) == "1, 2" and grading.as_answer(-0.5) == "-0.5"


def test_benchmark_metadata_and_tolerant_fields():
    rows, _ = convert("olympiadbench", "olympiadbench.jsonl")
    assert rows[2]["metadata"]["unit"] == "m" and "unit" not in rows[0]["metadata"]
    rows, _ = convert("aime24", "aime24.jsonl")
    assert rows[0]["metadata"]["year"] == "2024"
    # other copies of the same benchmark name fields differently
    mem = [{"problem": "p1", "final_answer": ["7"]}, {"question": "p2", "answer": 5},
           {"question": "p3", "answer": 142.0, "solution": None}]  # AMC copies: float answers, null solutions
    rows, _ = dp.convert_olympiadbench(mem, "r1", "mem", "test")
    assert [r["answer"] for r in rows] == ["7", "5", "142"] and "solution" not in rows[2]["metadata"]
    assert [r["prompt"][1]["content"] for r in rows] == ["p1", "p2", "p3"]


# --- errors a user can cause ---------------------------------------------------------------
def test_missing_field_names_row_and_field():
    with pytest.raises(ValueError, match=r"mem row 1 has no field 'answer'"):
        dp.convert_gsm8k([{"question": "q", "answer": "#### 1"}, {"question": "q"}], "qwen_math", "mem", "train")
    with pytest.raises(ValueError, match=r"row 0 has none of the fields \['problem', 'question'\]"):
        dp.convert_aime24([{"answer": "1"}], "qwen_math", "mem", "train")
    with pytest.raises(ValueError, match="no '#### <answer>' line"):
        dp.convert_gsm8k([{"question": "q", "answer": "42"}], "qwen_math", "mem", "train")


def test_missing_file():
    with pytest.raises(ValueError, match="nope.jsonl not found"):
        dp.load_rows("tests/fixtures/nope.jsonl", "train")


# --- loading other local layouts ------------------------------------------------------------
def test_load_rows_parquet_folder_and_save_to_disk(tmp_path):
    import datasets
    ds = dp.load_rows(str(FIX / "countdown.jsonl"), "train")
    ds.to_parquet(str(tmp_path / "cd.parquet"))
    assert list(dp.load_rows(str(tmp_path / "cd.parquet"), "train")) == list(ds)
    # a folder like a hub snapshot: the file named after the split is picked
    folder = tmp_path / "snapshot"
    folder.mkdir()
    ds.select([0]).to_json(str(folder / "test.jsonl"))
    ds.select([1, 2]).to_json(str(folder / "train.jsonl"))
    assert len(dp.load_rows(str(folder), "train")) == 2
    assert len(dp.load_rows(str(folder), "test")) == 1
    # a DatasetDict written by save_to_disk
    datasets.DatasetDict({"train": ds, "test": ds.select([3])}).save_to_disk(str(tmp_path / "saved"))
    assert list(dp.load_rows(str(tmp_path / "saved"), "test")) == [{"target": 65, "nums": [19, 36, 55, 7]}]
    with pytest.raises(ValueError, match="not 'validation'"):
        dp.load_rows(str(tmp_path / "saved"), "validation")


def test_hub_ids_go_to_load_dataset(monkeypatch):
    import datasets
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or ["row"])
    assert dp.load_rows("openai/gsm8k", "test", "main") == ["row"]
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]


# --- the CLI --------------------------------------------------------------------------------
def test_cli_gsm8k_test_split_with_r1(tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    res = run_cli("gsm8k", "--source", "tests/fixtures/gsm8k.jsonl", "--split", "test",
                  "--template", "r1", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "wrote 3 rows of split 'test' (--split)" in res.stdout and str(out) in res.stdout
    rows = common.read_jsonl(out)
    check_schema(rows, "gsm8k", "r1")
    assert rows[2]["id"] == "gsm8k-test-00002" and rows[2]["answer"] == "1234"
    assert rows[0]["metadata"]["source"] == "tests/fixtures/gsm8k.jsonl"


def test_cli_split_from_the_file_name_and_unreadable_files(tmp_path):
    source = tmp_path / "gsm8k_test.jsonl"
    source.write_text((FIX / "gsm8k.jsonl").read_text())
    res = run_cli("gsm8k", "--source", source, "--out", tmp_path / "out.jsonl")
    assert res.returncode == 0, res.stderr
    assert "wrote 3 rows of split 'test' (named in the file name)" in res.stdout
    assert common.read_jsonl(tmp_path / "out.jsonl")[0]["id"] == "gsm8k-test-00000"
    broken = tmp_path / "broken.json"
    broken.write_text('{"problem": "p", "answer": ')
    res = run_cli("math", "--source", broken, "--out", tmp_path / "x.jsonl")
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith(f"error: could not read {broken} (") and err[0].endswith(
        "expected JSON lines, an array of row objects, or column-oriented JSON "
        '({"column": {"row": value}}, as pandas writes it)')


def test_text_that_is_not_utf8_is_one_sentence_naming_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "p1", "answer": "5"}\n{"problem": "caf\xe9", "answer": "5"}\n')
    with pytest.raises(dp.DataError, match=r"latin1.jsonl:2: not UTF-8 text \(.*\); save the file as UTF-8"):
        dp.load_rows(str(path), "test")
    bom = tmp_path / "columns.json"  # a byte-order mark does not hide a column-oriented layout
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": {"0": "p"}, "answer": {"0": "5"}}).encode())
    assert list(dp.load_rows(str(bom), "test")) == [{"problem": "p", "answer": "5"}]


def test_cli_numina_reports_skipped(tmp_path):
    out = tmp_path / "numina.jsonl"
    res = run_cli("numina", "--source", "tests/fixtures/numina.jsonl", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "wrote 2 rows (skipped 1: no \\boxed{} answer" in res.stdout
    check_schema(common.read_jsonl(out), "numina", "qwen_math")


def test_cli_countdown_limit_and_seed(tmp_path):
    out = tmp_path / "cd.jsonl"
    res = run_cli("countdown", "--source", "tests/fixtures/countdown.jsonl", "--limit", "2", "--out", out)
    assert res.returncode == 0, res.stderr
    assert [r["metadata"]["target"] for r in common.read_jsonl(out)] == [98, 24]
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"cd_seed{i}.jsonl")
        res = run_cli("countdown", "--source", "tests/fixtures/countdown.jsonl", "--seed", "3", "--out", outs[-1])
        assert res.returncode == 0, res.stderr
    assert outs[0].read_text() == outs[1].read_text()  # same seed, same file


def test_cli_errors_are_one_line(tmp_path):
    res = run_cli("gsm8k", "--source", "tests/fixtures/nope.jsonl", "--out", tmp_path / "x.jsonl")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: tests/fixtures/nope.jsonl not found; check the path (or pass a hub id such as openai/gsm8k)"]
    res = run_cli("numina", "--source", "tests/fixtures/gsm8k.jsonl", "--out", tmp_path / "x.jsonl")
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "row 0 has no field 'problem'" in err[0]
    res = run_cli("poem", "--out", tmp_path / "x.jsonl")
    assert res.returncode == 1 and "pass a local file with --source" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_toy_task_files_split_and_model(toy):
    """The session's tiny toy build (conftest runs `python data_prep.py toy`): schema, disjoint
    splits, arithmetic of every answer, R1 prefill, and a model + tokenizer that load back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import load_tasks, render_prompt

    train, test = load_tasks(toy / "train.jsonl"), load_tasks(toy / "test.jsonl")
    assert len(train) == 1500 and len(test) == 48
    key = lambda r: r["prompt"][1]["content"]  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}  # disjoint problems
    for row in train[:200] + test:
        value = row["metadata"]["start"]
        for step in row["metadata"]["steps"]:
            value = value + int(step[1:]) if step[0] == "+" else value - int(step[1:])
        assert row["answer"] == str(value) and row["task"] == "toy"
        assert row["prompt"][-1] == {"role": "assistant", "content": grading.R1_PREFILL}
        assert row["metadata"]["answer_style"] == "tag"
    tok = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    assert model.config.model_type == "qwen2" and model.config.head_dim >= 32
    text = render_prompt(tok, test[0]["prompt"])
    assert text.endswith("<|im_start|>assistant\n" + grading.R1_PREFILL)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # chat markers are single tokens
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_toy_solution_slips_carry_through():
    text, value = dp.toy_solution(7, (("+", 5), ("-", 3)))
    assert text == "\n7+5=12\n12-3=9\n</think>\n<answer>9</answer>" and value == 9
    text, value = dp.toy_solution(7, (("+", 5), ("-", 3)), slip_at=0, slip=1)
    assert text == "\n7+5=13\n13-3=10\n</think>\n<answer>10</answer>" and value == 10


@pytest.mark.parametrize("task", ["taco", "eurus"])
def test_a_code_row_whose_test_expects_blank_output_is_refused(tmp_path, task):
    """Any program that prints nothing would pass such a test: the row is refused in one sentence naming it."""
    tests = json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "  \n"]})
    eurus = {"ability": "code", "prompt": [{"role": "user", "content": "Add."}], "reward_model": {"ground_truth": tests}}
    row = {"question": "Add.", "input_output": tests} if task == "taco" else eurus
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(dp.DataError, match=r"row 0: test 1 expects a blank output, which any program that prints "
                                           r"nothing passes; give the test its expected output or remove the row"):
        dp.TASKS[task]["convert"](dp.load_rows(str(path), "train"), "code", str(path), "train",
                                  **({"ability": "code"} if task == "eurus" else {}))
    proc = run_cli(task, "--source", str(path), "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{path} row 0: test 1 expects a blank output" in proc.stderr
