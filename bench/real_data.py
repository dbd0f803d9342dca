"""Real benchmark files: convert each with data_prep.py, then grade each row's own worked solution
against the converted gold with the grader that training and eval.py use (grading.score_completions).

    python bench/real_data.py --data DIR      # DIR: a folder of benchmark files (none ship with the repo)

Every .jsonl/.json/.parquet/.csv file in --data is converted on its own with the task its name
points to (gsm8k, math500, math, aime24, aime, amc23, amc, minerva, olympiadbench). What is graded:
  - GSM8K: the solution with its final "#### N" written as \\boxed{N};
  - a row with a worked solution: that solution (its last \\boxed{} is the prediction);
  - a row without solution text, or a file none of whose solutions has a \\boxed{} (OlympiadBench):
    its curated answer put in a box (then the row checks the converter and the grader, not the data).
A rejected row is a solution that is wrong or has no final answer (a data issue), or a grader miss.
Golds in e-notation (Minerva's 4.5e33) are also written four other ways (4.5 \\times 10^{33},
4.5\\cdot10^{33}, 4.5E+33, the plain decimal), each of which must be accepted, and once with the
exponent one higher, which must be rejected.
Times are seconds per 100 rows: converting (data_prep.prepare, file read included) and grading
(score_completions, after the Math-Verify worker pool has started). The gold acceptance target is
100% on GSM8K test and train, MATH-500, the MATH test and Minerva.
Prints a table per file, the rejected rows by id, and ends with one line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data_prep  # noqa: E402
from common import load_tasks  # noqa: E402
from grading import _mv_verify, answers_match_many, last_boxed, score_completions, shutdown_grader  # noqa: E402

# file name -> data_prep task: the first pattern found in the name (lower case) wins
TASK_OF_NAME = [("gsm8k", "gsm8k"), ("math500", "math500"), ("math_500", "math500"), ("minerva", "minerva"),
                ("olympiad", "olympiadbench"), ("aime24", "aime24"), ("aime", "aime"), ("amc23", "amc23"),
                ("amc", "amc"), ("math", "math")]
TARGET_FULL = ("gsm8k_test", "gsm8k_train", "math500", "math_test", "minerva_math")  # file stems held to 100%


def task_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((task for pattern, task in TASK_OF_NAME if pattern in name), None)


def graded_text(row: dict, boxed_solutions: bool) -> tuple[str, str]:
    """(text to grade, what it is) for one converted row."""
    solution = row["metadata"].get("solution")
    if row["task"] == "gsm8k":
        head, _, final = solution.rpartition("####")
        return head + "\\boxed{" + final.strip() + "}", "solution, #### N boxed"
    if solution and boxed_solutions:
        return solution, "solution"
    if solution:
        return "\\boxed{" + row["answer"] + "}", "answer boxed (no solution has \\boxed{})"
    return "\\boxed{" + row["answer"] + "}", "answer boxed (no solution)"


def check_file(path: Path, out_dir: Path) -> dict:
    """Convert one file and grade its rows' solutions; a dict of the figures and the rejected rows."""
    task = task_of(path)
    result = {"file": path.name, "task": task or "-", "rejected": []}
    if task is None:
        return {**result, "refused": "no data_prep task matches the file name"}
    spec = data_prep.TASKS[task]
    args = argparse.Namespace(task=task, source=str(path), config=spec["config"], split=None,
                              template=spec["template"], limit=None, seed=None, out=str(out_dir / path.name))
    start = time.perf_counter()
    try:
        written, skipped, split, _ = data_prep.prepare(args)
    except data_prep.DataError as e:
        return {**result, "refused": str(e)}
    convert_s = time.perf_counter() - start
    rows = load_tasks(out_dir / path.name) if written else []
    boxed = any(last_boxed(r["metadata"].get("solution") or "") is not None for r in rows)
    texts, kinds = zip(*(graded_text(r, boxed) for r in rows)) if rows else ((), ())
    start = time.perf_counter()
    scores, errors = score_completions(rows, list(texts))
    grade_s = time.perf_counter() - start
    for row, score in zip(rows, scores):
        if not score.correct:
            cause = ("no final \\boxed{} in the solution" if score.pred is None
                     else f"solution's answer {score.pred!r} is not the gold {row['answer']!r}")
            result["rejected"].append((row["id"], cause))
    n_in = written + skipped
    return {**result, "rows": rows, "split": split, "rows_in": n_in, "rows_out": written, "skipped": skipped,
            "skip_why": spec.get("skip", "") if skipped else "", "graded": "; ".join(sorted(set(kinds))),
            "accepted": sum(bool(s.correct) for s in scores), "errors": errors,
            "convert_s_per_100": 100 * convert_s / max(n_in, 1), "grade_s_per_100": 100 * grade_s / max(written, 1)}


def respellings(gold: str) -> tuple[list[str], str] | None:
    """(the same value written other ways, a wrong twin) for a gold in e-notation such as 4.5e33."""
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)", gold.strip())
    if not m:
        return None
    mantissa, exponent = m[1], int(m[2])
    plain = format(Decimal(mantissa).scaleb(exponent), "f")
    return ([f"{mantissa} \\times 10^{{{exponent}}}", f"{mantissa}\\cdot10^{{{exponent}}}",
             f"{mantissa}E{exponent:+d}", plain], f"{mantissa} \\times 10^{{{exponent + 1}}}")


def check_respellings(rows: list[dict]) -> dict:
    """Grade the respelled golds (must match) and the wrong twins (must not) through score_completions,
    and through Math-Verify alone (the peer: the same LaTeX-extraction call our worker pool makes,
    without our fast path)."""
    cases = [(r, *found) for r in rows if (found := respellings(r["answer"]))]
    same = [(r, text) for r, spelled, _ in cases for text in spelled]
    twins = [(r, twin) for r, _, twin in cases]
    scores, errors = score_completions([r for r, _ in same + twins], [f"\\boxed{{{t}}}" for _, t in same + twins])
    accepted = [bool(s.correct) for s in scores[:len(same)]]
    rejected = [not s.correct for s in scores[len(same):]]
    for (r, text), ok in zip(same, accepted):
        if not ok:
            print(f"  respelling not accepted: {r['id']} gold {r['answer']!r} written {text!r}")
    for (r, text), ok in zip(twins, rejected):
        if not ok:
            print(f"  wrong twin accepted: {r['id']} gold {r['answer']!r} written {text!r}")
    return {"golds": len(cases), "respelled": len(same), "accepted": sum(accepted),
            "twins": len(twins), "twins_rejected": sum(rejected), "errors": errors,
            "mv_accepted": sum(_mv_verify(r["answer"], text) for r, text in same),
            "mv_twins_rejected": sum(not _mv_verify(r["answer"], text) for r, text in twins)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding the benchmark files")
    args = p.parse_args()
    folder = Path(args.data)
    files = sorted(f for f in folder.glob("*") if f.suffix in data_prep.FORMATS) if folder.is_dir() else []
    if not files:
        what = "empty" if folder.is_dir() else "a file" if folder.exists() else "absent"
        raise SystemExit(f"no benchmark files: {folder} is {what}; pass --data DIR, a folder of benchmark "
                         ".jsonl/.json/.parquet/.csv files (nothing was checked)")

    import datasets  # paid once, outside the conversion timings

    datasets.disable_progress_bars()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the peer's calls run without its timeout

    answers_match_many([(r"2\sqrt{2}", r"\sqrt{8}")])  # start the Math-Verify pool outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        results = [check_file(f, Path(tmp)) for f in files]
        spelled = check_respellings([row for r in results for row in r.get("rows", [])])
    shutdown_grader()

    head = ["file", "task", "split", "rows in", "rows out", "skipped (why)", "graded", "gold accepted",
            "convert s/100", "grade s/100", "grader errors"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        if "refused" in r:
            print(f"| {r['file']} | {r['task']} | refused: {r['refused']} |")
            continue
        skipped = f"{r['skipped']} ({r['skip_why']})" if r["skipped"] else "0"
        rate = r["accepted"] / r["rows_out"] if r["rows_out"] else float("nan")
        print(f"| {r['file']} | {r['task']} | {r['split']} | {r['rows_in']} | {r['rows_out']} | {skipped} | "
              f"{r['graded']} | {r['accepted']}/{r['rows_out']} = {100 * rate:.1f}% | "
              f"{r['convert_s_per_100']:.3f} | {r['grade_s_per_100']:.3f} | {r['errors']} |")
    print("\nrejected rows (id: cause):")
    rejected = [(r["file"], row_id, cause) for r in results for row_id, cause in r["rejected"]]
    for file, row_id, cause in rejected:
        print(f"  {file} {row_id}: {cause}")
    if not rejected:
        print("  none")
    print(f"\ne-notation golds written other ways: {spelled['golds']} golds, {spelled['accepted']} of "
          f"{spelled['respelled']} other spellings accepted, {spelled['twins_rejected']} of {spelled['twins']} "
          f"wrong twins (exponent + 1) rejected, {spelled['errors']} grader errors; Math-Verify alone (peer): "
          f"{spelled['mv_accepted']} of {spelled['respelled']} accepted, {spelled['mv_twins_rejected']} of "
          f"{spelled['twins']} twins rejected")
    by_cause = collections.Counter("no final box" if c.startswith("no final") else "other answer"
                                   for _, _, c in rejected)

    done = [r for r in results if "refused" not in r]
    full = {Path(r["file"]).stem: r for r in done if Path(r["file"]).stem in TARGET_FULL}
    met = all(r["accepted"] == r["rows_out"] for r in full.values())
    print(f"\ntarget: 100% gold acceptance on {', '.join(TARGET_FULL)}: "
          f"{'met' if met and len(full) == len(TARGET_FULL) else 'NOT met'} ({len(full)} of them present)")
    result = {"files": len(results), "refused": len(results) - len(done),
              "rows_out": sum(r["rows_out"] for r in done), "accepted": sum(r["accepted"] for r in done),
              "rejected_no_box": by_cause["no final box"], "rejected_other": by_cause["other answer"],
              "grader_errors": sum(r["errors"] for r in done), "target_met": int(met and len(full) == len(TARGET_FULL))}
    result.update({"enotation_golds": spelled["golds"], "respelled_accepted": spelled["accepted"],
                   "respelled": spelled["respelled"], "twins_rejected": spelled["twins_rejected"],
                   "twins": spelled["twins"], "mv_alone_respelled_accepted": spelled["mv_accepted"],
                   "mv_alone_twins_rejected": spelled["mv_twins_rejected"]})
    result.update({f"acc_{Path(r['file']).stem}": f"{r['accepted'] / max(r['rows_out'], 1):.4f}" for r in done})
    result.update({f"grade_s100_{Path(r['file']).stem}": f"{r['grade_s_per_100']:.3f}" for r in done})
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
