"""eval.py: metrics with hand-computed numbers, grading through the eval path, outputs files,
the comparison table and plot, and the round trip with a training run's periodic evaluation."""

import json
import math
import os
import re
import sys
from fractions import Fraction
from math import comb

import pytest

import data_prep as dp
import eval as ev
from common import read_jsonl, write_jsonl
from grading import build_prompt, score_completions
from conftest import REPO, run_script

FIXTURES = REPO / "tests" / "fixtures"

# --- pass@k, avg@k, maj@k by hand ---------------------------------------------------------------


def test_pass_at_k_hand_numbers():
    assert ev.pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert ev.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert ev.pass_at_k(5, 1, 2) == pytest.approx(0.4)  # 1 - C(4,2)/C(5,2) = 1 - 6/10
    assert ev.pass_at_k(10, 3, 4) == pytest.approx(5 / 6)  # 1 - C(7,4)/C(10,4) = 1 - 35/210
    assert ev.pass_at_k(4, 2, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert ev.pass_at_k(4, 4, 4) == 1.0
    assert ev.pass_at_k(4, 0, 1) == 0.0 and ev.pass_at_k(4, 0, 4) == 0.0
    assert ev.pass_at_k(1, 1, 1) == 1.0 and ev.pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_n_below_k_is_nan():
    assert math.isnan(ev.pass_at_k(2, 1, 4))
    assert math.isnan(ev.pass_at_k(1, 1, 2))


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1024) has about 600 digits: the product form never builds it
    exact = 1 - Fraction(comb(2000 - 5, 1024), comb(2000, 1024))
    assert ev.pass_at_k(2000, 5, 1024) == pytest.approx(float(exact), rel=1e-9)
    assert ev.pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_avg_at_k_uses_all_samples():
    assert ev.avg_at_k([1.0, 0.0, 0.0, 1.0], 1) == 0.5
    assert ev.avg_at_k([0.0, 1.0, 1.0, 1.0], 4) == 0.75  # sample 0 is wrong; avg@4 is not 0
    assert math.isnan(ev.avg_at_k([1.0, 0.0], 4))  # n < k


def test_maj_at_k_hand_numbers():
    preds, correct = ["3", "5", "5", "3", "5"], [1.0, 0.0, 0.0, 1.0, 0.0]
    assert ev.maj_at_k(preds, correct, 1) == 1.0  # just "3"
    assert ev.maj_at_k(preds, correct, 2) == 1.0  # 3 vs 5, one vote each: first seen wins
    assert ev.maj_at_k(preds, correct, 3) == 0.0  # 5 has two votes
    assert ev.maj_at_k(preds, correct, 4) == 1.0  # 2-2 tie, 3 came first
    assert ev.maj_at_k(preds, correct, 5) == 0.0  # 5 has three
    assert math.isnan(ev.maj_at_k(preds, correct, 8))  # n < k


def test_maj_at_k_normalized_votes_and_abstentions():
    # \frac{1}{2} and \dfrac{ 1 }{2} are one answer after normalization: 2 votes against 0.5's 1
    assert ev.maj_at_k(["0.5", r"\frac{1}{2}", r"\dfrac{ 1 }{2}"], [0.0, 1.0, 1.0], 3) == 1.0
    assert ev.maj_at_k(["1,000", "1000", "7"], [1.0, 1.0, 0.0], 3) == 1.0
    assert ev.maj_at_k([None, None, "4"], [0.0, 0.0, 1.0], 3) == 1.0  # no answer = no vote
    assert ev.maj_at_k([None, "  ", None], [0.0, 0.0, 0.0], 3) == 0.0


def test_ks_up_to():
    assert ev.ks_up_to(1) == [1]
    assert ev.ks_up_to(4) == [1, 2, 4]
    assert ev.ks_up_to(6) == [1, 2, 4, 6]
    assert ev.ks_up_to(16) == [1, 2, 4, 8, 16]


def record(pid, correct, preds, task="math", level=None, fmt=None, lengths=None, finish=None):
    return dict(id=pid, task=task, prompt=[], answer="3", metadata={} if level is None else {"level": level},
                completions=[""] * len(correct), preds=preds, correct=correct, format=fmt or [1.0] * len(correct),
                lengths=lengths or [10] * len(correct), finish_reasons=finish or ["stop"] * len(correct))


def test_summarize_hand_numbers_and_breakdowns():
    records = [
        record("a", [1.0, 0.0, 0.0, 1.0], ["3", "5", "5", "3"], level=1, lengths=[10, 20, 30, 40],
               finish=["stop", "length", "stop", "stop"]),
        record("b", [0.0] * 4, [None] * 4, level=2, fmt=[0.0, 0.0, 1.0, 1.0]),
        record("c", [1.0] * 4, ["3"] * 4, task="gsm8k", level=2),
    ]
    s = ev.summarize(records, by=("level", "subject"))
    m = s["metrics"]
    assert s["n"] == 4 and s["num_problems"] == 3
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["maj@4"] == pytest.approx((1 + 0 + 1) / 3)  # a: 3 vs 5 tie, 3 first
    assert m["format_rate"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["mean_length"] == pytest.approx((100 + 80) / 12)
    assert m["truncated_rate"] == pytest.approx(1 / 12)
    assert s["by_task"]["math"]["avg@4"] == pytest.approx(0.25)
    assert s["by_task"]["gsm8k"]["num_problems"] == 1
    assert s["by"]["level"]["2"]["avg@4"] == pytest.approx(0.5)
    assert "subject" not in s["by"]  # no record has it
    lo, hi = s["ci95"]["avg@4"]
    assert 0.0 <= lo <= m["avg@4"] <= hi <= 1.0
    assert ev.summarize(records)["ci95"] == s["ci95"]  # fixed seed


def test_summarize_ci_collapses_when_problems_agree_and_uses_smallest_n():
    records = [record("a", [1.0, 0.0], ["3", "4"]), record("b", [1.0, 0.0, 1.0, 1.0], ["3", "4", "3", "3"])]
    s = ev.summarize(records)
    assert s["n"] == 2 and "pass@4" not in s["metrics"]  # k only up to the smallest n
    assert s["metrics"]["avg@2"] == pytest.approx((0.5 + 0.75) / 2)  # each problem's own samples
    same = ev.summarize([record(str(i), [1.0, 0.0], ["3", "4"]) for i in range(5)])
    assert same["ci95"]["avg@2"] == [0.5, 0.5]


def test_poem_rows_without_checker_are_not_counted_as_wrong():
    records = [record("a", [1.0, 1.0], ["3", "3"]), record("p", [None, None], [None, None], task="poem")]
    s = ev.summarize(records)
    assert s["num_graded"] == 1 and s["metrics"]["avg@2"] == 1.0


# --- grading through the eval path (score_completions on outputs rows) ----------------------------
# New cases only: tests/test_grading.py has 124 more. (style, model output, reference, expected)
def gsm8k_gold_of(field):
    """The reference answer data_prep.py stores for a GSM8K `answer` field."""
    rows, _ = dp.convert_gsm8k([{"question": "q", "answer": field}], "qwen_math", "mem", "test")
    return rows[0]["answer"]


GRADER_CASES = [
    # boxed answers with nested braces
    ("boxed", r"so $\boxed{\frac{a+b}{\sqrt{c}}}$", r"\frac{a+b}{\sqrt{c}}", True),
    ("boxed", r"\boxed{\left\{ 1, 2 \right\}}", r"\{1,2\}", True),
    ("boxed", r"\boxed{2^{10}}", "1024", True),
    ("boxed", r"\boxed{\frac{1}{2^{3}}}", "0.125", True),
    ("boxed", r"$\boxed{\sqrt{\frac{9}{4}}}$", r"\frac{3}{2}", True),
    ("boxed", r"\boxed{\text{\textbf{12}}}", "12", True),
    ("boxed", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    ("boxed", r"\boxed{\frac{1}{\sqrt{3}}}", r"\frac{\sqrt{2}}{2}", False),
    # fractions against decimals
    ("boxed", r"\boxed{\frac{5}{4}}", "1.25", True),
    ("boxed", r"\boxed{1.25}", r"\frac{5}{4}", True),
    ("boxed", r"\boxed{0.125}", "1/8", True),
    ("boxed", r"\boxed{\frac{-3}{4}}", "-0.75", True),
    ("boxed", r"\boxed{\frac{10}{4}}", r"\frac{5}{2}", True),
    ("boxed", r"\boxed{\frac{2}{3}}", "0.67", False),
    ("boxed", r"\boxed{0.2}", r"\frac{1}{4}", False),
    ("boxed", r"\boxed{2.50}", r"\frac{5}{2}", True),
    # LaTeX spacing and \text{}
    ("boxed", r"\boxed{\text{Monday}}", r"\text{Monday}", True),
    ("boxed", r"\boxed{\textbf{(D)}}", "D", True),
    ("boxed", r"\boxed{\, 7 \,}", "7", True),
    ("boxed", r"\boxed{\mathrm{12}}", "12", True),
    ("boxed", r"\boxed{\dfrac{\pi}{3}}", r"\frac{\pi}{3}", True),
    ("boxed", r"\boxed{\text{yes}}", r"\text{no}", False),
    ("boxed", r"\boxed{ 3 \! + \! 4i }", "3+4i", True),
    ("boxed", r"\boxed{\frac{1}{2} \;}", "0.5", True),
    # thousands separators
    ("boxed", r"\boxed{12,345}", "12345", True),
    ("boxed", r"\boxed{-1,000}", "-1000", True),
    ("boxed", r"\boxed{1,000.5}", "1000.5", True),
    ("boxed", r"\boxed{10,000}", "1000", False),
    ("boxed", r"\boxed{1{,}000{,}000}", "1000000", True),
    ("boxed", r"\boxed{1,000,000}", "1000000", True),
    # negative numbers
    ("boxed", r"\boxed{-0.5}", r"-\frac{1}{2}", True),
    ("boxed", r"\boxed{-7}", "-7.0", True),
    ("boxed", r"\boxed{-2x}", "-2x", True),
    ("boxed", r"\boxed{2x}", "-2x", False),
    ("boxed", r"\boxed{(-1, -2)}", "(-1,-2)", True),
    ("boxed", r"\boxed{-\sqrt{2}}", r"\sqrt{2}", False),
    # several boxed answers: the last one counts
    ("boxed", r"\boxed{1}, no: \boxed{\frac{1}{2}}", "0.5", True),
    ("boxed", r"\boxed{5}. Check: $\boxed{5}$", "5", True),
    ("boxed", r"\boxed{4} is wrong, it is \boxed{5", "4", False),  # the last box is broken: no answer
    ("boxed", r"$\boxed{a}$ and then $\boxed{b}$", "a", False),
    ("tag", r"ok</think><answer>\boxed{2} or \boxed{3}</answer>", "3", True),
    # intervals and sets
    ("boxed", r"\boxed{[0, \infty)}", r"[0,\infty)", True),
    ("boxed", r"\boxed{(0, 1)}", "[0,1]", False),
    ("boxed", r"\boxed{(-\infty, -1) \cup (1, \infty)}", r"(-\infty,-1)\cup(1,\infty)", True),
    ("boxed", r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", True),
    ("boxed", r"\boxed{[1, 2)}", "[1,2)", True),
    ("boxed", r"\boxed{\{1, 2\}}", r"\{1, 3\}", False),
    # percentages
    ("boxed", r"\boxed{25\%}", "25", True),
    ("boxed", r"\boxed{25\%}", "0.25", True),
    ("boxed", r"\boxed{12.5\%}", "12.5", True),
    ("boxed", r"\boxed{20\%}", "25", False),
    ("boxed", r"\boxed{40 \%}", r"40\%", True),
    # no answer in the output
    ("boxed", "The answer is 42.", "42", False),
    ("boxed", "", "0", False),
    ("boxed", r"\boxed{ }", "0", False),
    ("tag", "I think it is 3 </think>", "3", False),
    ("tag", "</think><answer>3", "3", False),
    # GSM8K `####` gold answers (as data_prep.py stores them) against model outputs
    ("boxed", r"She earns $\boxed{72}$ dollars.", gsm8k_gold_of("48 + 24 = <<48+24=72>>72\n#### 72"), True),
    ("boxed", r"\boxed{1500}", gsm8k_gold_of("So 1,500 total.\n#### 1,500"), True),
    ("boxed", r"\boxed{1,500}", gsm8k_gold_of("So 1,500 total.\n#### 1,500"), True),
    ("gsm8k", "Total: 1,500 apples.\n#### 1,500", gsm8k_gold_of("#### 1,500"), True),
    ("gsm8k", "It drops by 3.\n#### -3", gsm8k_gold_of("10 - 13 = -3\n#### -3"), True),
    ("gsm8k", "#### 150", gsm8k_gold_of("#### 1,500"), False),
    ("boxed", r"\boxed{2,125,000}", gsm8k_gold_of("#### 2,125,000"), True),
]


@pytest.fixture(scope="module")
def grader_results():
    rows = [{"id": str(i), "task": "gsm8k" if "####" in out else "math", "answer": ref,
             "metadata": {"answer_style": style}} for i, (style, out, ref, _) in enumerate(GRADER_CASES)]
    scores, errors = score_completions(rows, [out for _, out, _, _ in GRADER_CASES])
    assert errors == 0
    return [s.correct for s in scores]


def test_grader_case_count():
    assert len(GRADER_CASES) >= 60


@pytest.mark.parametrize("i", range(len(GRADER_CASES)), ids=[f"{c[0]}:{c[1][:30]}|{c[2]}" for c in GRADER_CASES])
def test_grader_cases_through_eval(grader_results, i):
    style, output, reference, expected = GRADER_CASES[i]
    assert grader_results[i] == float(expected), (output, reference)


# --- outputs files ------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def toy_record(pid, answer, completions):
    return {"id": pid, "task": "toy", "prompt": [{"role": "user", "content": "q"}], "answer": answer,
            "metadata": {"answer_style": "tag"}, "completions": completions}


def test_malformed_lines_are_reported_and_the_rest_scored(tmp_path, capsys):
    good = toy_record("a", "5", ["x</think><answer>5</answer>", "x</think><answer>4</answer>"])
    path = write_lines(tmp_path / "out.jsonl", [
        good, "{not json", {"id": "b", "task": "toy", "answer": "1"},
        {**good, "id": "c", "lengths": [1]}, {**good, "id": "d", "completions": []}, [1, 2],
        toy_record("e", "7", ["x</think><answer>7</answer>", "x</think><answer>7</answer>"])])
    ev.main([str(path)])
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err
    assert f"{path}:3: missing field(s) ['completions']" in err
    assert f"{path}:4: 'lengths' has 1 entries for 2 completions" in err
    assert f"{path}:5: 'completions' must be a non-empty list" in err
    assert f"{path}:6: not a JSON object" in err
    summary = json.loads((tmp_path / "scored" / "out.summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["metrics"]["avg@2"] == 0.75
    assert summary["metrics"]["mean_length"] is None  # no lengths in the file: not invented
    scored = read_jsonl(tmp_path / "scored" / "out.jsonl")
    assert [r["correct"] for r in scored] == [[1.0, 0.0], [1.0, 1.0]] and scored[0]["preds"] == ["5", "4"]
    with pytest.raises(SystemExit, match="5 malformed line"):
        ev.main([str(path), "--strict", "--out", str(tmp_path / "strict")])


def test_rescoring_ignores_stored_scores(tmp_path):
    stale = {**toy_record("a", "5", ["x</think><answer>5</answer>"]), "preds": ["9"], "correct": [0.0], "format": [0.0]}
    ev.main([str(write_lines(tmp_path / "o.jsonl", [stale])), "--out", str(tmp_path / "s")])
    assert read_jsonl(tmp_path / "s" / "o.jsonl")[0]["correct"] == [1.0]


def test_poem_outputs_report_the_poem_reward_components(tmp_path, capsys):
    """A poem record (gold ending written back, and no answer) next to a toy record: the poem
    components are averaged over the poem samples only; the toy record keeps its accuracy."""
    gold = "And found a hidden light\nThat faded all too soon"
    poem = {"id": "p", "task": "poem", "prompt": [], "answer": gold,
            "metadata": {"form": "quatrain", "poem_start": "I wandered through the night\nBeneath the silver moon",
                         "answer_style": "tag"},
            "completions": [f"x</think><answer>{gold}</answer>", "no answer"]}
    path = write_lines(tmp_path / "o.jsonl", [poem, toy_record("a", "5", ["x</think><answer>5</answer>"] * 2)])
    ev.main([str(path)])
    s = json.loads((tmp_path / "scored" / "o.summary.json").read_text())["metrics"]
    assert {k: s[f"poem/{k}"] for k in ("similarity", "form", "rhyme", "syllables", "reward")} == \
        dict.fromkeys(["similarity", "form", "rhyme", "syllables", "reward"], 0.5)  # (1 + 0) / 2 each
    assert s["avg@2"] == 1.0  # the poem has no checker: only the toy record counts
    scored = read_jsonl(tmp_path / "scored" / "o.jsonl")
    assert scored[0]["poem"][0]["reward"] == 1.0 and "poem" not in scored[1]
    assert "poem/reward" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    ([], "give either OUTPUTS files to score, or --model and --dataset to generate (not both)."),
    (["x.jsonl", "--model", "m", "--dataset", "d"],
     "give either OUTPUTS files to score, or --model and --dataset to generate (not both)."),
    (["--model", "m"], "--model and --dataset go together."),
    (["--dataset", "d"], "--model and --dataset go together."),
    (["x.jsonl", "--template", "r1"], "--template only applies when generating (--model); saved outputs keep their prompts."),
    (["--model", "m", "--dataset", "d", "--n", "0"], "--n and --max_tokens must be at least 1."),
    (["--model", "m", "--dataset", "d", "--max_tokens", "0"], "--n and --max_tokens must be at least 1."),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        ev.parse(argv)
    assert stop.value.code == 2  # argparse's usage error
    prog = os.path.basename(sys.argv[0])  # argparse's program name
    assert capsys.readouterr().err.splitlines()[-1] == f"{prog}: error: {message}"


def test_missing_outputs_file():
    with pytest.raises(SystemExit) as stop:
        ev.main(["missing.jsonl"])
    assert str(stop.value) == ("missing.jsonl: no such file; pass an outputs .jsonl (e.g. "
                               "runs/NAME/eval/step_N.jsonl).")


def test_benchmark_outputs_break_down_by_subject_and_level(tmp_path):
    """MATH-500 fixture (hub layout) -> data_prep rows -> an outputs file -> eval.py breakdowns."""
    rows, _ = dp.convert_math500(dp.load_rows(str(FIXTURES / "math500.jsonl"), "test"),
                                 "qwen_math", "fixture", "test")
    records = [{**r, "completions": [rf"so \boxed{{{r['answer']}}}", "no idea"]} for r in rows]
    path = write_lines(tmp_path / "math500.jsonl", records)
    ev.main([str(path)])
    s = json.loads((tmp_path / "scored" / "math500.summary.json").read_text())
    assert s["metrics"]["avg@2"] == 0.5 and s["metrics"]["pass@2"] == 1.0
    assert s["metrics"]["maj@2"] == 1.0  # the unanswered sample abstains
    subjects = {r["metadata"]["subject"] for r in rows}
    assert set(s["by"]["subject"]) == subjects and set(s["by"]["level"]) == {str(r["metadata"]["level"]) for r in rows}


def test_retemplate_renders_the_question_again():
    row = {"id": "x", "task": "math", "answer": "1",
           "prompt": build_prompt("prime", "What is 1?"), "metadata": {"template": "prime", "answer_style": "boxed"}}
    r1 = ev.retemplate(row, "r1")
    assert r1["prompt"] == build_prompt("r1", "What is 1?")
    assert r1["metadata"]["answer_style"] == "tag" and row["metadata"]["template"] == "prime"


def test_dataset_folder_limit_per_file_and_template(tmp_path):
    for task in ("aime24", "amc23"):
        rows, _ = dp.TASKS[task]["convert"](dp.load_rows(str(FIXTURES / f"{task}.jsonl"), "test"),
                                            "qwen_math", "fixture", "test")
        write_jsonl(rows, tmp_path / f"{task}.jsonl")
    rows = ev.load_dataset_rows(str(tmp_path), "r1", limit=2)
    assert [r["task"] for r in rows] == ["aime24", "aime24", "amc23", "amc23"]
    assert all(r["prompt"][-1]["role"] == "assistant" and r["metadata"]["answer_style"] == "tag" for r in rows)
    write_jsonl(rows[:1], tmp_path / "dup.jsonl")
    with pytest.raises(SystemExit, match="appears twice"):
        ev.load_dataset_rows(str(tmp_path), None, limit=0)


# --- end to end on the toy task ---------------------------------------------------------------


def test_round_trip_with_a_training_run(toy, tmp_path):
    """A run's periodic evaluation files, scored again by `python eval.py FILE`, give the logged accuracy."""
    run_script(["grpo_logprob.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
                "--test_file", str(toy / "test.jsonl"), "--sampler", "hf", "--total_steps", "2",
                "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "48",
                "--eval_limit", "10", "--eval_every", "2", "--eval_num_samples", "2",
                "--output_dir", str(tmp_path), "--run_name", "r"])
    run_dir = tmp_path / "r"
    logged = {m["step"]: m["eval/accuracy"] for m in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in m}
    files = [str(run_dir / "eval" / f"step_{s:06d}.jsonl") for s in (0, 2)]
    run_script(["eval.py", files[1]])
    summary = json.loads((run_dir / "eval" / "scored" / "step_000002.summary.json").read_text())
    assert summary["metrics"]["avg@2"] == pytest.approx(logged[2], abs=1e-12)
    assert summary["num_problems"] == 10 and summary["n"] == 2
    original = read_jsonl(files[1])
    assert [r["correct"] for r in read_jsonl(run_dir / "eval" / "scored" / "step_000002.jsonl")] == \
        [r["correct"] for r in original]

    # comparing the run's evaluations: one table row per file, and accuracy against step
    ev.main([*files, "--plot", str(tmp_path / "acc.png")])
    table = (run_dir / "eval" / "scored" / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| file | step |") and len(table) == 2 + 2
    for line, step in zip(table[2:], (0, 2)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(step) and float(cells[4]) == pytest.approx(logged[step], abs=5e-4)
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_with_a_model(toy, tmp_path):
    out = tmp_path / "gen.jsonl"
    run_script(["eval.py", "--model", str(toy / "model"), "--dataset", str(toy / "test.jsonl"), "--n", "2",
                "--limit", "6", "--max_tokens", "48", "--sampler", "hf", "--out", str(out)])
    records = read_jsonl(out)
    assert len(records) == 6 and all(len(r["completions"]) == 2 == len(r["lengths"]) for r in records)
    assert set(records[0]) >= {"id", "task", "prompt", "answer", "metadata", "completions", "preds", "correct",
                               "format", "lengths", "finish_reasons"}
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["config"]["n"] == 2 and summary["n"] == 2
    flat = [c for r in records for c in r["correct"]]
    assert summary["metrics"]["avg@2"] == pytest.approx(sum(flat) / len(flat))
    # the written outputs are an outputs file: scoring them again gives the same numbers
    ev.main([str(out), "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "gen.summary.json").read_text())
    assert again["metrics"] == summary["metrics"]


def test_same_file_names_into_one_out_folder_are_refused(tmp_path):
    rec = toy_record("a", "5", ["x</think><answer>5</answer>"])
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        write_lines(tmp_path / run / "step_000002.jsonl", [rec])
    files = [str(tmp_path / run / "step_000002.jsonl") for run in ("a", "b")]
    with pytest.raises(SystemExit, match="same name"):
        ev.main([*files, "--out", str(tmp_path / "out")])
    ev.main(files)  # default: a scored/ folder next to each file
    assert (tmp_path / "a" / "scored" / "step_000002.summary.json").exists()
    assert (tmp_path / "b" / "scored" / "comparison.md").exists() is False
    assert len((tmp_path / "a" / "scored" / "comparison.md").read_text().splitlines()) == 4


# --- outputs files of other evaluation tools ------------------------------------------------------
# Hand-written lines in the layouts of the Qwen2.5-Math evaluation harness (one line per problem: gt,
# code = completions, score = the harness's verdicts) and of lm-evaluation-harness --log_samples (one
# line per document and filter: target, resps, filtered_resps, the metric).
QWEN_LINES = [
    {"idx": 0, "question": "Energy of the flare?", "gt_cot": "...", "gt": "7.2e19", "type": "Physics", "level": 2,
     "code": [r"So $E = \boxed{7.2 \times 10^{19}}$ J.", r"So $E = \boxed{7.2e18}$."], "pred": ["7.2", "7.2e18"],
     "report": [None, None], "score": [False, False]},
    {"idx": 1, "question": "AIME problem?", "gt": "42", "type": "Algebra", "level": 5,
     "code": [r"\boxed{\textbf{(042)}}", r"\boxed{24}"], "pred": ["042", "24"], "score": [True, False]},
    {"idx": 2, "question": "Which pair?", "gt": "(1,5)", "type": "Algebra", "level": 1,
     "code": [r"The pair is $\boxed{{(1,5)}}$.", "I give up."], "pred": ["{(1,5)}", ""], "score": [False, False]},
]


def lm_eval_lines():
    docs = [  # (target, responses, the harness's exact_match under strict-match)
        ("She sells 1,500.\n#### 1,500", [["1,000 + 500 = 1,500.\n#### 1,500"]], 1.0),
        ("#### 8", [["So 8.00 in total.\n#### 8.00"]], 0.0),  # the harness compares strings: 8.00 != 8
        ("#### 12", [["I think 13.\n#### 13"]], 0.0),
        ("#### 5", [["#### 5", "#### 6"]], 1.0),  # two responses: one verdict for the document
    ]
    return [{"doc_id": i, "doc": {"question": f"question {i}", "answer": target}, "target": target,
             "arguments": {"gen_args_0": {"arg_0": f"Question: question {i}\nAnswer:", "arg_1": {}}},
             "resps": resps, "filtered_resps": [resps[0][0].rsplit("#### ", 1)[1]], "filter": name,
             "metrics": ["exact_match"], "exact_match": verdict}
            for name in ("strict-match", "flexible-extract") for i, (target, resps, verdict) in enumerate(docs)]


def test_qwen_harness_outputs_are_rescored_with_agreement(tmp_path, capsys):
    path = write_lines(tmp_path / "test_qwen25-math-cot_-1_seed0_t0.0_s0_e-1.jsonl", QWEN_LINES)
    ev.main([str(path), "--show_disagreements", "5"])
    out = capsys.readouterr().out
    assert (f"{path}: Qwen2.5-Math evaluation-harness outputs (idx, gt, code, pred, score): 3 problems mapped onto "
            "eval.py records; answers read from the last \\boxed{}") in out
    scored = read_jsonl(path.parent / "scored" / path.name)
    assert [r["correct"] for r in scored] == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    assert [r["original_correct"] for r in scored] == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    s = json.loads((path.parent / "scored" / (path.stem + ".summary.json")).read_text())
    assert s["metrics"]["avg@2"] == 0.5 and s["by"]["level"]["5"]["num_problems"] == 1
    # 6 samples: the harness accepts 1, we accept 3; they differ on 7.2e19 and on {(1,5)}
    assert s["agreement"] == {"samples": 6, "file_accuracy": pytest.approx(1 / 6), "our_accuracy": 0.5,
                              "disagreements": 2}
    assert ("agreement with the file's own verdicts over 6 samples: file accuracy 0.167, ours 0.500, "
            "2 disagreement(s)") in out
    assert "id 0 sample 0: gold '7.2e19'; file: wrong (pred '7.2'); ours: right (pred '7.2 \\\\times 10^{19}')" in out
    assert "id 2 sample 0: gold '(1,5)'; file: wrong (pred '{(1,5)}'); ours: right" in out


def test_lm_eval_samples_are_rescored_with_agreement(tmp_path, capsys):
    path = write_lines(tmp_path / "samples_gsm8k_2025-01-01T00-00-00.jsonl", lm_eval_lines())
    ev.main([str(path), "--show_disagreements", "1"])
    out = capsys.readouterr().out
    assert (f"{path}: lm-evaluation-harness --log_samples (doc, target, resps, filtered_resps), filter "
            "'strict-match' of ['strict-match', 'flexible-extract']: 4 problems mapped onto eval.py records; "
            "answers read from the text after '####'") in out
    scored = read_jsonl(path.parent / "scored" / path.name)
    assert [r["answer"] for r in scored] == ["1500", "8", "12", "5"]
    assert [r["correct"] for r in scored] == [[1.0], [1.0], [0.0], [1.0, 0.0]]
    s = json.loads((path.parent / "scored" / (path.stem + ".summary.json")).read_text())
    assert s["metrics"]["avg@1"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # the two-response document's single verdict is not compared with a sample
    assert s["agreement"] == {"samples": 3, "file_accuracy": pytest.approx(1 / 3),
                              "our_accuracy": pytest.approx(2 / 3), "disagreements": 1}
    assert "id 1 sample 0: gold '8'; file: wrong (pred '8.00'); ours: right (pred '8.00')" in out


def test_answers_in_no_known_format_are_read_from_the_files_own_extraction(tmp_path, capsys):
    """lm-eval's minerva_math writes "Final Answer: The final answer is $x$"; its filtered_resps holds x.
    The file is one indented JSON array, as lm-eval up to 0.4.2 wrote --log_samples (also as .jsonl)."""
    docs = [("4.5e33", r"4.5\times 10^{33}", 0.0), ("0.5", r"\frac{1}{2}", 1.0), ("7", "8", 0.0)]
    samples = [{"doc_id": i, "doc": {"problem": f"p{i}"}, "target": gold, "filter": "none",
                "resps": [[f"Work.\nFinal Answer: The final answer is ${x}$. I hope it is correct."]],
                "filtered_resps": [x], "metrics": ["exact_match"], "exact_match": verdict}
               for i, (gold, x, verdict) in enumerate(docs)]
    path = tmp_path / "samples_minerva_math.jsonl"
    path.write_text(json.dumps(samples, indent=2))
    ev.main([str(path)])
    out = capsys.readouterr().out
    assert "3 problems mapped onto eval.py records; answers read from the file's own extracted answers" in out
    assert [r["correct"] for r in read_jsonl(path.parent / "scored" / path.name)] == [[1.0], [1.0], [0.0]]
    assert "file accuracy 0.333, ours 0.667, 1 disagreement(s)" in out
    for sample in samples:  # without the tool's extraction there is nothing to grade: one sentence
        del sample["filtered_resps"]
    path.write_text(json.dumps(samples))
    with pytest.raises(SystemExit, match="no completion has a .*cannot tell which part of a completion is its answer"):
        ev.main([str(path)])


def test_other_layouts_through_the_command_line(tmp_path):
    path = write_lines(tmp_path / "qwen.jsonl", QWEN_LINES)
    out = run_script(["eval.py", str(path), "--show_disagreements", "1"]).stdout
    assert "Qwen2.5-Math evaluation-harness outputs" in out and re.search(r"avg@2 +0\.500", out)
    assert "file accuracy 0.167, ours 0.500, 2 disagreement(s)" in out and out.count(" sample 0: gold ") == 1


def test_unknown_layout_is_one_sentence_and_bad_foreign_lines_are_listed(tmp_path, capsys):
    path = write_lines(tmp_path / "other.jsonl", [{"prompt": "q", "response": "a"}] * 3)
    with pytest.raises(SystemExit) as e:
        ev.main([str(path)])
    assert str(e.value) == (f"{path}: unknown layout: its first record has the fields ['prompt', 'response']; "
                            "eval.py reads eval.py outputs (id, task, answer, completions); Qwen2.5-Math "
                            "evaluation-harness outputs (idx, gt, code, pred, score); lm-evaluation-harness "
                            "--log_samples (doc, target, resps, filtered_resps).")
    assert capsys.readouterr().err == ""  # not one line per row
    lines = [QWEN_LINES[0], {k: v for k, v in QWEN_LINES[1].items() if k != "code"}, {**QWEN_LINES[2], "code": []}]
    path = write_lines(tmp_path / "qwen.jsonl", lines)
    ev.main([str(path)])
    err = capsys.readouterr().err
    assert f"{path}:2: missing field(s) ['code']" in err and f"{path}:3: 'code' must be a non-empty list" in err
    # a null gold is no answer; verdicts that do not pair with the completions are left out, and said so
    lines = [QWEN_LINES[0], {**QWEN_LINES[1], "gt": None}, {**QWEN_LINES[2], "score": [False]}]
    path = write_lines(tmp_path / "qwen.jsonl", lines)
    ev.main([str(path)])
    captured = capsys.readouterr()
    assert f"{path}:2: 'gt': None is not an answer" in captured.err
    assert (f"{path}: 1 record(s) hold a different number of 'score' verdicts than 'code' completions; their "
            "verdicts are left out of the agreement") in captured.err
    assert "agreement with the file's own verdicts over 2 samples" in captured.out
