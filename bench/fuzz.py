"""Hostile text at scale: every property of tests/test_hostile_text.py on 10,000 random examples, and
an adversarial grading batch of 1,000 completions through grading.score_completions.

    python bench/fuzz.py                                     # the full run (about 25 min on 2 cores)
    python bench/fuzz.py --examples 300 --hostile_copies 1 --ordinary_copies 2   # a quick look

The properties are the tests' own functions, run with the hypothesis profile "fuzz" (random examples,
not CI's fixed 200). A property that fails counts as a hang when a call ran past the tests' time limit
(CALL_LIMIT), else as a crash; hypothesis shrinks each failure, and it is printed. The reasoning-mask
properties use the toy task's tokenizer (--tokenizer; built with data_prep.py in a temporary folder
when the folder is absent).

The batch mixes `--hostile_copies` of the tests' hostile completions (two hanging towers, 9^{9^{9^{9}}}
and 10^{10^{10}}; megabyte strings; 10,000 nested braces; a 10,000-high tower) with
`--ordinary_copies` of its ten ordinary answers, in a seeded random order: 10 x 8 + 92 x 10 = 1,000 by
default. It checks that every ordinary answer is graded right, counts the errors, and counts the grader's
worker processes before and after, once idle (a stuck one never is). Its wall time is compared with the time the
timeouts alone must take (timeout x ceil(errors / workers)) and with answers_match_many's bound
(timeout x ceil(n / workers) + start-up allowance).

Ends with one line: RESULT properties=.. examples_per_property=.. crashes=0 hangs=0 batch_... =..
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ["HYPOTHESIS_PROFILE"] = "fuzz"


def toy_tokenizer(path: str, scratch: str):
    from transformers import AutoTokenizer

    if not Path(path, "tokenizer.json").exists():
        print(f"{path} has no tokenizer: building the toy task in {scratch} (tokenizer and a 1-step model)")
        path = str(Path(scratch) / "toy")
        subprocess.run([sys.executable, "data_prep.py", "toy", "--out", path, "--train_size", "1500",
                        "--test_size", "48", "--sft_steps", "1", "--hidden_size", "64", "--num_layers", "2",
                        "--vocab_size", "320"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        path = str(Path(path) / "model")
    return AutoTokenizer.from_pretrained(path)


def run_properties(module, examples: int, tokenizer) -> tuple[int, int, int]:
    """(properties, crashes, hangs): each property once with `examples` examples."""
    from hypothesis import settings

    props = [(name, fn) for name, fn in vars(module).items() if getattr(fn, "is_hypothesis_test", False)]
    crashes = hangs = 0
    for name, prop in props:
        kwargs = {"toy_tokenizer": tokenizer} if "reasoning" in name else {}
        start = time.monotonic()
        try:
            settings(settings.get_profile("fuzz"), max_examples=examples)(prop)(**kwargs)
            outcome = "ok"
        except BaseException as error:  # noqa: BLE001 - every failure is counted and shown
            leaves = list(error.exceptions) if isinstance(error, BaseExceptionGroup) else [error]
            n_hang = sum(isinstance(e, module.Hang) for e in leaves)
            hangs, crashes = hangs + n_hang, crashes + len(leaves) - n_hang
            outcome = "; ".join(f"{type(e).__name__}: {str(e)[:200]}" for e in leaves)
            for e in leaves:
                for note in getattr(e, "__notes__", []):
                    print("    " + note[:2000])
        print(f"  {name:<62} {time.monotonic() - start:7.1f} s  {outcome}", flush=True)
    return len(props), crashes, hangs


def run_batch(module, hostile_copies: int, ordinary_copies: int, timeout: float) -> dict:
    import grading

    rows, texts, expected = module.adversarial_batch(hostile_copies, ordinary_copies, shuffle_seed=0)
    grading.answers_match_many([("1", "2\\cdot\\frac{1}{2}")])  # pool start-up is not part of the batch
    workers_before = module.settled_workers()
    start = time.monotonic()
    with module.time_limit(3600):
        scores, errors = grading.score_completions(rows, texts, timeout=timeout)
    wall = time.monotonic() - start
    ordinary = [(s.correct, c) for s, c in zip(scores, expected) if c is not None]
    workers_after = module.settled_workers()  # -1: a worker stayed busy
    grading.shutdown_grader()
    workers = grading._MV_WORKERS
    return dict(batch_n=len(texts), batch_hostile=len(texts) - len(ordinary), batch_wall_s=round(wall, 1),
                batch_errors=errors, batch_ordinary_wrong=sum(got != want for got, want in ordinary),
                batch_workers_before=workers_before, batch_workers_after=workers_after,
                batch_workers_after_shutdown=len(module.grader_workers()),
                batch_timeouts_floor_s=timeout * math.ceil(errors / workers),
                batch_bound_s=timeout * math.ceil(len(texts) / workers) + grading._MV_START_TIMEOUT,
                batch_wall_vs_timeouts_floor=round(wall / max(timeout * math.ceil(errors / workers), 1e-9), 3),
                batch_wall_vs_bound=round(wall / (timeout * math.ceil(len(texts) / workers)
                                                  + grading._MV_START_TIMEOUT), 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=10_000, help="examples per property")
    ap.add_argument("--hostile_copies", type=int, default=10, help="copies of the 8 hostile completions in the batch")
    ap.add_argument("--ordinary_copies", type=int, default=92, help="copies of the 10 ordinary answers in the batch")
    ap.add_argument("--timeout", type=float, default=5.0, help="grading timeout per answer (training's default)")
    ap.add_argument("--tokenizer", default="data/toy/model", help="toy tokenizer folder (built when absent)")
    args = ap.parse_args()

    import test_hostile_text as module

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = toy_tokenizer(str(REPO / args.tokenizer), scratch)
    print(f"{args.examples} examples per property:")
    start = time.monotonic()
    n_props, crashes, hangs = run_properties(module, args.examples, tokenizer)
    props_wall = time.monotonic() - start
    print(f"adversarial batch: {args.hostile_copies} x {len(module.HOSTILE)} hostile + "
          f"{args.ordinary_copies} x {len(module.ORDINARY)} ordinary completions ...", flush=True)
    batch = run_batch(module, args.hostile_copies, args.ordinary_copies, args.timeout)
    for key, value in batch.items():
        print(f"  {key:<34} {value}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in dict(
        properties=n_props, examples_per_property=args.examples, crashes=crashes, hangs=hangs,
        properties_wall_s=round(props_wall, 1), **batch).items()))


if __name__ == "__main__":
    main()
