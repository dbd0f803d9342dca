"""bench/comparisons.py: the run-or-reuse rules and the mean ± sd cells of the learning comparisons;
bench/real_data.py on a tiny folder of hand-made benchmark files."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "bench"))
import comparisons  # noqa: E402


def test_mean_sd_hand_computed():
    # mean 0.6, sample sd sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert comparisons.mean_sd([0.5, 0.7]) == "0.600 ± 0.141"
    assert comparisons.mean_sd([0.5, None, 0.7], digits=1) == "0.6 ± 0.1"
    assert comparisons.mean_sd([0.25]) == "0.250"  # one seed: no sd
    assert comparisons.mean_sd([None]) == "-"


def make_run(folder, steps, config, final=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    lines = [{"step": s, **({"eval/accuracy": 0.5} if s in (0, steps[-1]) else {})} for s in steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if final:
        (folder / "final").mkdir()


def test_finished_needs_last_evaluation_and_final(tmp_path):
    make_run(tmp_path / "a", [0, 1, 2], {"total_steps": 2})
    make_run(tmp_path / "b", [0, 1, 2], {"total_steps": 2}, final=False)
    make_run(tmp_path / "c", [0, 1], {"total_steps": 2})
    assert comparisons.finished(tmp_path / "a", 2)
    assert not comparisons.finished(tmp_path / "b", 2)  # crashed after logging, before final/
    assert not comparisons.finished(tmp_path / "c", 2)  # stopped early
    assert not comparisons.finished(tmp_path / "missing", 2)


def test_train_reuses_a_finished_run_without_running_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(comparisons, "REPO", tmp_path)
    make_run(tmp_path / "runs" / "x_s0", [0, 1, 2], {"seed": 0, "total_steps": 2})
    metrics = comparisons.train(["no_such_script.py"], "runs", "x_s0", dict(seed=0, total_steps=2), jobs=1)
    assert [m["step"] for m in metrics] == [0, 1, 2]


def test_train_refuses_a_folder_made_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(comparisons, "REPO", tmp_path)
    make_run(tmp_path / "runs" / "x_s0", [0, 1, 2], {"seed": 0, "total_steps": 2})
    with pytest.raises(SystemExit, match=r"other settings.*total_steps.*\(2, 3\).*another --runs_dir"):
        comparisons.train(["no_such_script.py"], "runs", "x_s0", dict(seed=0, total_steps=3), jobs=1)


def test_real_data_on_a_tiny_folder(tmp_path):
    """bench/real_data.py on hand-made files in three real layouts: the table, the rejected rows by id,
    the e-notation respellings, the RESULT line; one clear sentence when the folder is absent, and the
    parser's refusal without --data (no folder is assumed)."""
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("gsm8k_test.jsonl", [{"question": "3 + 4?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
                               {"question": "1000 + 234?", "answer": "It is 1,234.\n#### 1,234"}])
    write("minerva_math.jsonl", [{"problem": "Energy?", "solution": "$E=\\boxed{7.2e19}$", "type": "t", "idx": 0},
                                 {"problem": "Ratio?", "solution": "$\\boxed{\\frac{1}{2}}$", "type": "t", "idx": 1}])
    write("aime24.jsonl", [{"problem": "p1", "solution": "so $\\boxed{\\textbf{(042)}}$", "answer": "42"},
                           {"problem": "p2", "solution": "it is 17, no box", "answer": "17"},
                           {"problem": "p3", "solution": "so $\\boxed{9}$", "answer": "8"}])
    out = run_script(["bench/real_data.py", "--data", str(tmp_path)]).stdout
    assert "| gsm8k_test.jsonl | gsm8k | test | 2 | 2 | 0 | solution, #### N boxed | 2/2 = 100.0% |" in out
    assert "| minerva_math.jsonl | minerva | test | 2 | 2 | 0 | solution | 2/2 = 100.0% |" in out
    assert "| aime24.jsonl | aime24 | test | 3 | 3 | 0 | solution | 1/3 = 33.3% |" in out
    assert "  aime24.jsonl aime24-test-00001: no final \\boxed{} in the solution" in out
    assert "  aime24.jsonl aime24-test-00002: solution's answer '9' is not the gold '8'" in out
    assert "1 golds, 4 of 4 other spellings accepted, 1 of 1 wrong twins (exponent + 1) rejected" in out
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].removeprefix("RESULT ").split())
    assert (result["files"], result["rows_out"], result["accepted"], result["rejected_no_box"]) == ("3", "7", "5", "1")
    assert result["acc_minerva_math"] == "1.0000" and "grade_s100_aime24" in result

    absent = subprocess.run([sys.executable, "bench/real_data.py", "--data", str(tmp_path / "nope")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert absent.returncode == 1 and absent.stdout == ""
    assert absent.stderr.strip() == (f"no benchmark files: {tmp_path / 'nope'} is absent; pass --data DIR, a folder "
                                     "of benchmark .jsonl/.json/.parquet/.csv files (nothing was checked)")
    unnamed = subprocess.run([sys.executable, "bench/real_data.py"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert unnamed.returncode == 2 and "the following arguments are required: --data" in unnamed.stderr


def test_the_real_model_benchs_easy_sums_and_step_figures():
    import real_model
    from grading import score_completions

    rows = real_model.easy_rows()
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    sums = [r["prompt"][-1]["content"] for r in rows]
    # the answer is the sum of the two numbers of the question, graded as the GSM8K rows are
    for r, q in zip(rows, sums):
        a, b = [int(w) for w in q.split() if w.isdigit()]
        assert r["answer"] == str(a + b)
    scores, errors = score_completions(rows[:2], [f"#### {rows[0]['answer']}", f"#### {int(rows[1]['answer']) + 1}"])
    assert errors == 0 and [s.correct for s in scores] == [1.0, 0.0]
    step = {"train/skipped_nonfinite": 0.0, "num_tokens": 300.0, "tokens_per_second": 15.0, "grad_norm": 2.5}
    assert real_model.step_figures(step) == {"ok": True, "grad_norm": 2.5, "s_step": 20.0}
    assert not real_model.step_figures({**step, "train/skipped_nonfinite": 1.0})["ok"]
    assert not real_model.step_figures({**step, "num_tokens": 0.0, "tokens_per_second": 1.0})["ok"]
