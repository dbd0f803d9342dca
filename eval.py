"""Evaluate a model on a test set, score saved outputs, compare runs.

    python eval.py --model runs/grpo_toy/final --dataset data/toy/test.jsonl --n 4
    python eval.py runs/grpo_toy/eval/step_000200.jsonl              # re-score saved outputs, no model
    python eval.py runs/grpo_toy/eval/step_*.jsonl --plot             # one table, accuracy against step
    python eval.py samples_gsm8k_2025-01-01T00-00-00.jsonl             # another tool's outputs: agreement too

The sampler and the outputs format are common.py's (Sampler, evaluate), the answer checker is
grading.py's (score_completions): the files a training run writes under runs/NAME/eval/ are outputs files of this
script. Outputs of the Qwen2.5-Math evaluation harness and lm-evaluation-harness --log_samples files
are read too, and their own verdicts compared with ours. Re-scoring always recomputes
preds/correct/format from the completions, so a fix to the grader applies to old runs too.
Metric definitions: README "eval.py" and the docstrings of pass_at_k, avg_at_k and maj_at_k below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from common import (Sampler, atomic_write_text, check_writable, evaluate, fit_context, jsonable, load_tasks,
                    load_tokenizer, read_jsonl, run_main, score_fields, task_metrics, vllm_available, write_jsonl)
from grading import (ANSWER_STYLE, CODE_INSTRUCTION, PRIME_SUFFIX, as_answer, build_prompt, gsm8k_gold, last_boxed,
                     last_tag, normalize_answer, score_completions, shutdown_grader)
from sandbox import check_code_sandbox

# ----------------------------------------------------------------------------------------------
# metrics of one problem (hand-computed tests: tests/test_eval.py)
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    nan when k > n (not estimable from n samples; such k are not reported). Computed as the product
    1 - prod_{i=n-c+1..n} (1 - k/i) (Chen et al. 2021), never forming binomials that overflow.
    """
    if k > n:
        return math.nan
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: list[float], k: int) -> float:
    """avg@k: expected accuracy of a sample, from ALL n >= k samples (not the first k, not sample 0).

    The mean over every k-subset of its accuracy is the mean over all n, so n samples give a
    lower-variance estimate than any k of them. nan when n < k.
    """
    return math.nan if len(correct) < k else float(np.mean(correct))


def maj_at_k(preds: list[str | None], correct: list[float], k: int) -> float:
    """maj@k: correctness of the most frequent answer among the first k samples.

    Answers vote by their normalized string (grading.normalize_answer: spacing, \\text{}, \\dfrac,
    thousands commas, $...$); samples without an answer abstain; a tie goes to the answer seen
    first. The winner's correctness is that of its first sample, as graded by the one checker.
    0 when no sample has an answer; nan when n < k.
    """
    if len(preds) < k:
        return math.nan
    votes: dict[str, list[int]] = {}  # normalized answer -> [count, first sample index]
    for i, pred in enumerate(preds[:k]):
        if pred is not None and pred.strip():
            votes.setdefault(normalize_answer(pred), [0, i])[0] += 1
    if not votes:
        return 0.0
    _, first = max(votes.values(), key=lambda v: (v[0], -v[1]))
    return float(correct[first])


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks + [n] if ks[-1] != n else ks


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """95% percentile intervals of the column means of values [P, M], resampling the P problems."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = np.nanmean(values[idx], axis=1)  # [resamples, M]; nan: a k above a problem's n
    return np.percentile(means, [2.5, 97.5], axis=0).T  # [M, 2]


# ----------------------------------------------------------------------------------------------
# summary of a list of scored records
# ----------------------------------------------------------------------------------------------


def per_problem(records: list[dict], ks: list[int]) -> tuple[list[str], np.ndarray]:
    """Column names and a [P, M] table: avg@n, pass@k and maj@k for each k, format rate.
    Samples whose correctness is None (no checker, e.g. poem) are left out of the correctness columns."""
    n = ks[-1]
    names = [f"avg@{n}"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks] + ["format_rate"]
    table = []
    for r in records:
        graded = [(p, c) for p, c in zip(r["preds"], r["correct"]) if c is not None]
        preds, correct = [p for p, _ in graded], [c for _, c in graded]
        row = [avg_at_k(correct, 1) if correct else math.nan]
        row += [pass_at_k(len(correct), int(sum(correct)), k) if correct else math.nan for k in ks]
        row += [maj_at_k(preds, correct, k) if correct else math.nan for k in ks]
        table.append(row + [float(np.mean(r["format"]))])
    return names, np.array(table, dtype=float)


def summarize(records: list[dict], grader_errors: int = 0, by: tuple[str, ...] = ()) -> dict:
    """Headline metrics with 95% bootstrap intervals, and breakdowns by task and metadata fields."""
    n = min(len(r["completions"]) for r in records)  # pass@k / maj@k for k up to the smallest n
    names, table = per_problem(records, ks_up_to(n))
    graded = ~np.isnan(table[:, 0])
    lengths = [x for r in records for x in (r.get("lengths") or [])]
    finish = [x for r in records for x in (r.get("finish_reasons") or [])]
    metrics = {name: _mean(table[graded, j]) for j, name in enumerate(names[:-1])}
    metrics["format_rate"] = _mean(table[:, -1])  # also for samples without a correctness check
    metrics.update(mean_length=float(np.mean(lengths)) if lengths else math.nan,
                   truncated_rate=float(np.mean([f == "length" for f in finish])) if finish else math.nan)
    metrics.update(task_metrics(records))  # code: tests passed, timeouts; poem: the reward's components
    ci = {}
    if graded.any():
        for name, (lo, hi) in zip(names[:-1], bootstrap_ci(table[graded, :-1])):
            ci[name] = [float(lo), float(hi)]
    ci["format_rate"] = [float(x) for x in bootstrap_ci(table[:, -1:])[0]]

    def breakdown(key) -> dict:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            value = key(r)
            if value is not None:
                groups.setdefault(str(value), []).append(i)
        return {g: {"num_problems": len(idx), **{name: _mean(table[idx, j]) for j, name in enumerate(names)}}
                for g, idx in sorted(groups.items())}

    by_field = {f: breakdown(lambda r, f=f: (r.get("metadata") or {}).get(f)) for f in by}
    return {"num_problems": len(records), "num_graded": int(graded.sum()), "n": n, "metrics": metrics,
            "ci95": ci, "grader_errors": grader_errors, "by_task": breakdown(lambda r: r["task"]),
            "by": {f: b for f, b in by_field.items() if b}}


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


# ----------------------------------------------------------------------------------------------
# outputs files: read, re-score, write
# ----------------------------------------------------------------------------------------------


def record_problem(r) -> str | None:
    """Why a parsed line is not a usable outputs record, or None."""
    if not isinstance(r, dict):
        return "not a JSON object"
    missing = [k for k in ("id", "task", "answer", "completions") if k not in r]
    if missing:
        return f"missing field(s) {missing}"
    comps = r["completions"]
    if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
        return "'completions' must be a non-empty list of strings"
    for key, ok, kind in (("lengths", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "numbers"),
                          ("finish_reasons", lambda v: isinstance(v, str), "strings"),
                          ("original_correct", lambda v: v is None or isinstance(v, (bool, int, float)), "verdicts")):
        values = r.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not all(ok(v) for v in values):
            return f"'{key}' must be a list of {kind}"
        if len(values) != len(comps):
            return f"'{key}' has {len(values)} entries for {len(comps)} completions"
    if r.get("metadata") is not None and not isinstance(r["metadata"], dict):
        return "'metadata' must be a JSON object"
    return None


# Outputs of other evaluation tools, mapped onto eval.py records so that published outputs can be
# re-scored with this project's grader (layout_of tells them apart by their fields; from_qwen and
# from_lm_eval map one line). The tool's own verdicts are kept as `original_correct`.
LAYOUTS = {
    "eval": "eval.py outputs (id, task, answer, completions)",
    "qwen": "Qwen2.5-Math evaluation-harness outputs (idx, gt, code, pred, score)",
    "lm_eval": "lm-evaluation-harness --log_samples (doc, target, resps, filtered_resps)",
}
VERDICT_KEYS = ("exact_match", "acc", "math_verify")  # lm-eval metrics that are a 0/1 verdict
ANSWER_STYLE_TEXT = {"boxed": "the last \\boxed{}", "gsm8k": "the text after '####'", "tag": "<answer>...</answer>"}


def layout_of(obj: dict) -> str | None:
    if all(k in obj for k in ("idx", "gt", "code")):
        return "qwen"
    if "resps" in obj and ("target" in obj or "doc" in obj):
        return "lm_eval"
    if any(k in obj for k in ("id", "task", "answer", "completions")):
        return "eval"
    return None


def as_verdict(value) -> float | None:
    """1.0/0.0 for a boolean or 0/1 verdict, None for anything else (a score, a missing value)."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return float(value)
    return None


def texts_in(value) -> list[str] | None:
    """lm-eval's resps/filtered_resps: strings nested one level per request ([["text", ...]])."""
    flat = [x for item in value for x in (item if isinstance(item, list) else [item])] \
        if isinstance(value, list) else None
    return flat if flat and all(isinstance(x, str) for x in flat) else None


def from_qwen(r: dict) -> dict | str:
    """A Qwen2.5-Math harness line (one problem: gt, code = its completions, score = their verdicts)."""
    code = r["code"]
    if not isinstance(code, list) or not code or not all(isinstance(c, str) for c in code):
        return "'code' must be a non-empty list of completion strings"
    score, pred = r.get("score"), r.get("pred")
    verdicts = [as_verdict(v) for v in score] if isinstance(score, list) and len(score) == len(code) else None
    meta = {k: r[k] for k in ("level", "subfield", "unit", "answer_type") if r.get(k) is not None}
    if r.get("type") is not None:
        meta["subject"] = r["type"]
    try:
        gold = as_answer(r["gt"])
    except ValueError as e:
        return f"'gt': {e}"
    return {"id": str(r["idx"]), "task": "qwen_harness", "answer": gold, "metadata": meta,
            "prompt": [{"role": "user", "content": r["question"]}] if isinstance(r.get("question"), str) else [],
            "completions": code, "original_correct": verdicts,
            "original_preds": [str(x) for x in pred] if isinstance(pred, list) and len(pred) == len(code) else None}


def from_lm_eval(r: dict, line: int) -> dict | str:
    """An lm-evaluation-harness sample (one document under one filter). Its verdict is per document:
    it is compared with ours only when the document has one response."""
    completions = texts_in(r["resps"])
    if completions is None:
        return "'resps' holds no text completions (a log-likelihood task has nothing to grade)"
    target = r.get("target")
    if target is None:
        return "missing field(s) ['target']"
    if isinstance(target, str) and "####" in target:
        gold = gsm8k_gold(target)
    else:
        try:
            gold = (last_boxed(target) if isinstance(target, str) else None) or as_answer(target)
        except ValueError as e:
            return f"'target': {e}"
    keys = [k for k in (r.get("metrics") or []) if k in r] + [k for k in VERDICT_KEYS if k in r]
    verdict = next((v for v in (as_verdict(r[k]) for k in keys) if v is not None), None)
    doc = r.get("doc") if isinstance(r.get("doc"), dict) else {}
    meta = {k: doc[k] for k in ("level", "subject", "type") if isinstance(doc.get(k), (str, int))}
    question = next((doc[k] for k in ("problem", "question") if isinstance(doc.get(k), str)), None)
    filtered = texts_in(r.get("filtered_resps"))
    one = len(completions) == 1
    return {"id": str(r.get("doc_id", line)), "task": "lm_eval", "answer": gold, "metadata": meta,
            "prompt": [{"role": "user", "content": question}] if question else [], "completions": completions,
            "original_correct": [verdict] if one and verdict is not None else None,
            "original_preds": filtered if one and filtered and len(filtered) == 1 else None}


def to_record(layout: str, obj, lineno: int) -> dict | str:
    """The eval.py record of one parsed line, or why the line is not usable."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if layout != "eval":
        missing = [k for k in {"qwen": ("idx", "gt", "code"), "lm_eval": ("resps",)}[layout] if k not in obj]
        if missing:
            return f"missing field(s) {missing}"
        obj = from_qwen(obj) if layout == "qwen" else from_lm_eval(obj, lineno)
        if isinstance(obj, str):
            return obj
    return record_problem(obj) or obj


def answer_style_of(records: list[dict]) -> str | None:
    """The final-answer format most completions of another tool's file use (ties: boxed first), or None
    when no completion has one."""
    texts = [c for r in records for c in r["completions"]]
    counts = {"boxed": sum(last_boxed(t) is not None for t in texts),
              "gsm8k": sum("####" in t for t in texts),
              "tag": sum(last_tag(t) is not None for t in texts)}
    return max(counts, key=counts.get) if any(counts.values()) else None


def read_lines(path: Path, bad: list[str]) -> list[tuple[int, object]]:
    """(line number, parsed value) of a JSON-lines file, or (index + 1, element) of a file that is one JSON
    array (lm-evaluation-harness up to 0.4.2 wrote its samples so, also under a .jsonl name)."""
    with path.open("rb") as f:
        start = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"["):
        with contextlib.suppress(ValueError, RecursionError):  # not one array: JSON lines, or bad lines
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, list):
                return list(enumerate(data, 1))
    return read_jsonl(path, bad, numbered=True)


def read_outputs(path: Path, strict: bool) -> list[dict]:
    """Records of an outputs file: eval.py's own, or another tool's (see LAYOUTS), mapped onto ours.
    Each malformed line is reported as FILE:LINE and skipped; --strict stops instead. A file in an
    unknown layout is refused with one sentence."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; pass an outputs .jsonl (e.g. runs/NAME/eval/step_N.jsonl).")
    bad: list[str] = []
    lines = read_lines(path, bad)
    first = next((obj for _, obj in lines if isinstance(obj, dict)), None)
    layout = layout_of(first) if first is not None else "eval"
    if layout is None:
        raise SystemExit(f"{path}: unknown layout: its first record has the fields {sorted(first)}; eval.py reads "
                         + "; ".join(LAYOUTS.values()) + ".")
    records = []
    filters = list(dict.fromkeys(obj.get("filter") for _, obj in lines if isinstance(obj, dict)))
    for lineno, obj in lines:
        if layout == "lm_eval" and isinstance(obj, dict) and obj.get("filter") != filters[0]:
            continue  # lm-eval logs each document once per filter; the first filter is read
        r = to_record(layout, obj, lineno)
        if isinstance(r, str):
            bad.append(f"{path}:{lineno}: {r}")
        else:
            records.append(r)
    for message in bad:
        print(message, file=sys.stderr)
    if bad and strict:
        raise SystemExit(f"{path}: {len(bad)} malformed line(s), listed above; fix them, or drop --strict "
                         "to score the other lines.")
    if not records:
        raise SystemExit(f"{path}: no valid records to score.")
    if bad:
        print(f"{path}: skipped {len(bad)} malformed line(s), scored {len(records)} records", file=sys.stderr)
    if layout == "qwen":
        uneven = sum(isinstance(o, dict) and isinstance(o.get("score"), list) and isinstance(o.get("code"), list)
                     and len(o["score"]) != len(o["code"]) for _, o in lines)
        if uneven:
            print(f"{path}: {uneven} record(s) hold a different number of 'score' verdicts than 'code' "
                  "completions; their verdicts are left out of the agreement", file=sys.stderr)
    if layout != "eval":
        style = answer_style_of(records)
        source = ANSWER_STYLE_TEXT.get(style)
        if style is None:  # e.g. "The final answer is $x$": grade the answers the tool extracted itself
            if not all(r["original_preds"] for r in records):
                raise SystemExit(f"{path}: no completion has a \\boxed{{}}, '####' or <answer>, and not every "
                                 "record has the tool's own extracted answers (pred, filtered_resps); eval.py "
                                 "cannot tell which part of a completion is its answer.")
            for r in records:
                r["completions"] = [f"\\boxed{{{pred}}}" for pred in r["original_preds"]]
            style, source = "boxed", ("the file's own extracted answers (no completion has a \\boxed{}, "
                                      "'####' or <answer>), each graded as \\boxed{pred}")
        for r in records:
            r["metadata"]["answer_style"] = style
        which = f", filter {filters[0]!r} of {filters}" if layout == "lm_eval" and len(filters) > 1 else ""
        print(f"{path}: {LAYOUTS[layout]}{which}: {len(records)} problems mapped onto eval.py records; "
              f"answers read from {source}")
    return records


def rescore(records: list[dict]) -> tuple[list[dict], int]:
    """preds/correct/format recomputed from the completions with grading.score_completions."""
    rows = [dict(r, answer=str(r["answer"]), metadata=r.get("metadata") or {}) for r in records]
    flat_rows = [r for r in rows for _ in r["completions"]]
    scores, errors = score_completions(flat_rows, [c for r in rows for c in r["completions"]])
    start = 0
    for r in rows:
        sc = scores[start:start + len(r["completions"])]
        start += len(sc)
        r.update(score_fields(r["task"], sc))
    return rows, errors


def write_outputs(records: list[dict], summary: dict, path: Path) -> Path:
    """path (outputs JSONL) and path.summary.json next to it; returns the summary's path."""
    write_jsonl(records, path)
    summary_path = path.with_name(path.name.removesuffix(".jsonl") + ".summary.json")
    atomic_write_text(summary_path, json.dumps(jsonable(summary), indent=2) + "\n")
    return summary_path


def disagreements(records: list[dict]) -> tuple[list[tuple[dict, int]], list[tuple[dict, int]]]:
    """(samples carrying the file's own verdict and ours, those of them where the two differ)."""
    both = [(r, j) for r in records if r.get("original_correct")
            for j, v in enumerate(r["original_correct"]) if v is not None and r["correct"][j] is not None]
    return both, [(r, j) for r, j in both if r["original_correct"][j] != r["correct"][j]]


def agreement(records: list[dict]) -> dict | None:
    """The file's own accuracy and ours over the samples the file has verdicts for; None without any."""
    both, differ = disagreements(records)
    if not both:
        return None
    return {"samples": len(both), "file_accuracy": float(np.mean([r["original_correct"][j] for r, j in both])),
            "our_accuracy": float(np.mean([r["correct"][j] for r, j in both])), "disagreements": len(differ)}


def agreement_report(records: list[dict], a: dict, show: int) -> str:
    lines = [f"  agreement with the file's own verdicts over {a['samples']} samples: file accuracy "
             f"{a['file_accuracy']:.3f}, ours {a['our_accuracy']:.3f}, {a['disagreements']} disagreement(s)"]
    for r, j in disagreements(records)[1][:show]:
        theirs = (r.get("original_preds") or [None] * (j + 1))[j]
        verdict = lambda v: "right" if v else "wrong"  # noqa: E731
        lines.append(f"    id {r['id']} sample {j}: gold {r['answer']!r}; file: {verdict(r['original_correct'][j])}"
                     + (f" (pred {theirs!r})" if theirs is not None else "")
                     + f"; ours: {verdict(r['correct'][j])} (pred {r['preds'][j]!r})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# printing, comparison table, plot
# ----------------------------------------------------------------------------------------------


def report(name: str, s: dict) -> str:
    m, ci = s["metrics"], s["ci95"]
    lines = [f"{name}: {s['num_problems']} problems x {s['n']} samples (95% bootstrap CI over problems)"]
    for key, value in m.items():
        interval = f"  [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else ""
        lines.append(f"  {key:<17} {value:8.3f}{interval}")
    lines.append(f"  {'grader_errors':<17} {s['grader_errors']:8d}")
    n = s["n"]
    for title, groups in [("task", s["by_task"])] + list(s["by"].items()):
        if len(groups) > 1 or title != "task":
            lines.append(f"  by {title}:")
            lines += [f"    {g:<13} {b['num_problems']:5d} problems  avg@{n} {b[f'avg@{n}']:.3f}  "
                      f"pass@{n} {b[f'pass@{n}']:.3f}  maj@{n} {b[f'maj@{n}']:.3f}" for g, b in groups.items()]
    return "\n".join(lines)


def step_of(path: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", path.name.removesuffix(".jsonl"))
    return int(m.group(1)) if m else None


def comparison_table(summaries: list[tuple[Path, dict]]) -> str:
    """Markdown: a row per file, a column per metric. pass@k for every k any file has;
    avg@n and maj@n use each file's own n (the n column)."""
    ks = sorted({int(k[5:]) for _, s in summaries for k in s["metrics"] if k.startswith("pass@")})
    head = ["file", "step", "problems", "n", "avg@n", "95% CI"] + [f"pass@{k}" for k in ks] + \
           ["maj@n", "format", "length", "truncated"]
    rows = []
    for path, s in summaries:
        m, n, ci = s["metrics"], s["n"], s["ci95"].get(f"avg@{s['n']}")
        step = step_of(path)
        cells = [str(path), "" if step is None else str(step), str(s["num_problems"]), str(n),
                 _fmt(m[f"avg@{n}"]), f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""]
        cells += [_fmt(m.get(f"pass@{k}", math.nan)) for k in ks]
        cells += [_fmt(m[f"maj@{n}"]), _fmt(m["format_rate"]), _fmt(m["mean_length"], 1), _fmt(m["truncated_rate"])]
        rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows)


def _fmt(x: float, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def plot_accuracy(summaries: list[tuple[Path, dict]], out: Path) -> None:
    """avg@n against training step, with the 95% intervals, from a run's eval/step_N.jsonl files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unnamed = [str(p) for p, _ in summaries if step_of(p) is None]
    if unnamed:
        raise SystemExit(f"--plot needs files named step_N.jsonl (a run's eval folder); {unnamed[0]} is not.")
    points = sorted((step_of(p), s) for p, s in summaries)
    steps = [st for st, _ in points]
    acc = [s["metrics"][f"avg@{s['n']}"] for _, s in points]
    ci = np.array([s["ci95"].get(f"avg@{s['n']}", [a, a]) for (_, s), a in zip(points, acc)])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(steps, acc, yerr=[np.subtract(acc, ci[:, 0]), np.subtract(ci[:, 1], acc)], marker="o", capsize=3)
    ax.set(xlabel="training step", ylabel="test accuracy (avg@n, 95% CI)", title=str(summaries[0][0].parent))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------


def load_dataset_rows(dataset: str, template: str | None, limit: int) -> list[dict]:
    """data_prep.py rows from a file or every .jsonl in a folder; --template re-renders the prompts."""
    path = Path(dataset)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"{dataset}: the folder holds no .jsonl files; build them with data_prep.py.")
    rows = [row for f in files for row in load_tasks(f)[:limit or None]]
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise SystemExit(f"{dataset}: id {row['id']!r} appears twice; ids must be unique across the files.")
        seen.add(row["id"])
    return [retemplate(r, template) for r in rows] if template else rows


def retemplate(row: dict, template: str) -> dict:
    """The row's question (its last user message, without PRIME's suffix) under another template."""
    users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
    if not users:
        raise SystemExit(f"--template: row {row['id']} has no user message to take the question from.")
    question = users[-1].removesuffix(PRIME_SUFFIX).removesuffix("\n\n" + CODE_INSTRUCTION)
    meta = {**row.get("metadata", {}), "template": template, "answer_style": ANSWER_STYLE[template]}
    return {**row, "prompt": build_prompt(template, question), "metadata": meta}


def generate(args) -> tuple[list[dict], int]:
    """Sample args.n completions per problem with common.Sampler and score them (common.evaluate)."""
    import torch
    from transformers import AutoModelForCausalLM  # here: re-scoring needs no model

    rows = load_dataset_rows(args.dataset, args.template, args.limit)
    check_code_sandbox(rows, args.allow_unsandboxed_code)
    tokenizer, context = load_tokenizer(args.model, args.max_model_len)
    rows = fit_context(rows, tokenizer, context, args.max_tokens, args.dataset, "--max_tokens")
    backend = ("vllm" if vllm_available() else "hf") if args.sampler == "auto" else args.sampler
    model = None
    if backend == "hf":
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    sampler = Sampler(backend, args.model, tokenizer, model=model, max_model_len=args.max_model_len,
                      gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=args.cpu_kv_cache_gb,
                      tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, seed=args.seed)
    metrics, records = evaluate(sampler, tokenizer, rows, n=args.n, temperature=args.temperature,
                                max_tokens=args.max_tokens, seed=args.seed, top_p=args.top_p)
    return records, metrics["eval/grader_errors"]


def default_out(model: str, dataset: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", model.strip("/")).strip("_")
    return Path("runs/evals") / f"{slug}__{Path(dataset).name.removesuffix('.jsonl')}.jsonl"


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="*", help="outputs .jsonl files to re-score and compare (no model needed)")
    p.add_argument("--model", help="hub id or local path: generate and score instead (needs --dataset)")
    p.add_argument("--dataset", help="data_prep.py .jsonl file, or a folder: every .jsonl in it")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max_tokens", type=int, default=1024, help="maximum completion tokens")
    p.add_argument("--template", choices=sorted(ANSWER_STYLE),
                   help="re-render each prompt from its question with this data_prep.py template "
                        "(default: the file's prompts as they are)")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems of each dataset file (0: all)")
    p.add_argument("--sampler", default="auto", choices=["auto", "vllm", "hf"],
                   help="as in training: vllm if installed")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model weights")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max_model_len", type=int, default=0, help="vLLM: prompt + completion tokens (0: model's own)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.3, help="vLLM on GPU: memory fraction")
    p.add_argument("--cpu_kv_cache_gb", type=float, default=1.0, help="vLLM on CPU: KV cache size in GiB")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM: tensor parallel size")
    p.add_argument("--by", default="subject,level", help="comma-separated metadata fields to break results down by")
    p.add_argument("--out", help="with --model: the outputs .jsonl (default runs/evals/MODEL__DATASET.jsonl); "
                                 "with files: a folder (default: scored/ next to each file)")
    p.add_argument("--plot", nargs="?", const="", help="PNG of accuracy against step (files named step_N.jsonl); "
                                                       "default path: accuracy_vs_step.png in the output folder")
    p.add_argument("--strict", action="store_true", help="stop at malformed lines instead of skipping them")
    p.add_argument("--show_disagreements", type=int, default=0, metavar="N",
                   help="files with their own verdicts (other tools' outputs): list N samples where ours differ")
    p.add_argument("--allow_unsandboxed_code", action="store_true",
                   help="code rows: run model-written programs without the bubblewrap sandbox if it cannot start")
    args = p.parse_args(argv)
    if bool(args.files) == bool(args.model or args.dataset):
        p.error("give either OUTPUTS files to score, or --model and --dataset to generate (not both).")
    if args.model and not args.dataset or args.dataset and not args.model:
        p.error("--model and --dataset go together.")
    if args.files and args.template:
        p.error("--template only applies when generating (--model); saved outputs keep their prompts.")
    if args.n < 1 or args.max_tokens < 1:
        p.error("--n and --max_tokens must be at least 1.")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.limit < 0 or args.max_model_len < 0:
        p.error("--temperature, --limit and --max_model_len must not be negative, and --top_p must be in (0, 1].")
    if args.cpu_kv_cache_gb <= 0:
        p.error(f"--cpu_kv_cache_gb {args.cpu_kv_cache_gb}: must be greater than 0.")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    by = tuple(f for f in args.by.split(",") if f)
    summaries = []
    if args.model:
        out = Path(args.out) if args.out else default_out(args.model, args.dataset)
        check_writable(out.parent, "--out")  # before the model samples for an hour
        records, errors = generate(args)
        summary = summarize(records, errors, by)
        summary["config"] = {k: getattr(args, k) for k in ("model", "dataset", "n", "temperature", "top_p",
                                                           "max_tokens", "template", "sampler", "seed", "limit")}
        summary_path = write_outputs(records, summary, out)
        print(report(str(out), summary))
        print(f"wrote {out} and {summary_path}")
        summaries.append((out, summary))
        out_dir = out.parent
    else:
        paths = [Path(name) for name in args.files]
        targets = [Path(args.out) / p.name if args.out else p.parent / "scored" / p.name for p in paths]
        if len(set(targets)) < len(targets):
            raise SystemExit("two input files have the same name and would be written to the same place in "
                             f"--out {args.out}; score them into separate --out folders.")
        out_dir = targets[0].parent
        for path, target in zip(paths, targets):
            records = read_outputs(path, args.strict)
            check_code_sandbox(records, args.allow_unsandboxed_code)
            records, errors = rescore(records)
            summary = summarize(records, errors, by)
            if (agree := agreement(records)) is not None:
                summary["agreement"] = agree
            summary_path = write_outputs(records, summary, target)
            print(report(str(path), summary))
            if agree is not None:
                print(agreement_report(records, agree, args.show_disagreements))
            print(f"wrote {target} and {summary_path}\n")
            summaries.append((path, summary))
    if len(summaries) > 1:
        table = comparison_table(summaries)
        atomic_write_text(out_dir / "comparison.md", table + "\n")
        print(table + f"\n\nwrote {out_dir / 'comparison.md'}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else out_dir / "accuracy_vs_step.png"
        plot_accuracy(summaries, png)
        print(f"wrote {png}")
    shutdown_grader()


if __name__ == "__main__":
    run_main(main)
