"""bench/comparisons.py: the run-or-reuse rules and the mean ± sd cells of the learning comparisons."""

import json
import sys

import pytest

from conftest import REPO

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
