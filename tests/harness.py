"""Run a repo script as its own `__main__` does (`common.run_main(main)`), with hooks that only tests use,
chosen by flags before the script's name:

    python tests/harness.py [--pause POINT] [--patient_grading] [--hanging_programs] [--same_samples] SCRIPT.py ARGS...

--pause POINT      stop at a known point of the run, print the line `PAUSED POINT` and wait there until a
                   signal ends the process (the test sends it after reading the line), so that no test
                   races the run or assumes how fast the machine is. POINT is one of
                     after_step     the first step this launch ends: its metrics line and checkpoint are written
                     in_checkpoint  inside the first checkpoint write: accelerate has filled the temporary
                                    folder, which is not renamed yet
                     after_grading  the first batch of answers went to Math-Verify: its worker processes run
                     in_sandbox     while a batch of programs runs in its sandboxes (with --hanging_programs)
--patient_grading  Math-Verify's pool may take an hour to start and each answer an hour to grade: on a busy
                   machine the real limits (60 s, 5 s) can cut a pair short, which changes its reward, so a run
                   compared with another would differ by the machine's load
--hanging_programs every completion of a code row is a program that sleeps for an hour, graded with limits
                   of an hour: its sandbox runs until the run is stopped
--same_samples     each prompt is sampled alone, with a seed made of the call's seed and the prompt's tokens,
                   so a prompt's samples do not depend on the process that draws them or on the other prompts
                   of the call: a run on two processes then draws the samples a run on one process draws
"""

import argparse
import hashlib
import importlib
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import grading  # noqa: E402
import sandbox  # noqa: E402

POINTS = ("after_step", "in_checkpoint", "after_grading", "in_sandbox")
HOUR = 3600.0
HANGING_PROGRAM = "```python\nimport time\ntime.sleep(3600)\n```"


def pause(point: str) -> None:
    """Say where the run is, then wait for the signal (its handler raises in this thread)."""
    print(f"PAUSED {point}", flush=True)
    while True:
        time.sleep(3600)


def once(point: str, wrap):
    """wrap(real) -> a replacement that pauses at `point` the first time it runs; applied by the caller."""
    state = {"done": False}

    def make(real):
        def hooked(*args, **kwargs):
            out = wrap(real, *args, **kwargs)
            if not state["done"]:
                state["done"] = True
                pause(point)
            return out
        return hooked
    return make


def sandbox_started() -> bool:
    """A program's launcher is running inside a sandbox below this process."""
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if cmd[:3] == [sandbox.SANDBOX_PYTHON, "-I", "-c"]:
            return True
    return False


def say_when_sandboxed() -> None:
    while not sandbox_started():
        time.sleep(0.05)
    print("PAUSED in_sandbox", flush=True)


def install(args, module) -> None:
    def call(real, *a, **k):
        return real(*a, **k)

    if args.pause == "after_step":
        common.Run.end_step = once("after_step", call)(common.Run.end_step)
    elif args.pause == "in_checkpoint":
        from accelerate import Accelerator

        Accelerator.save_state = once("in_checkpoint", call)(Accelerator.save_state)
    elif args.pause == "after_grading":
        grading.answers_match_many = once("after_grading", call)(grading.answers_match_many)

    if args.patient_grading:
        real_match = grading.answers_match_many  # with the after_grading pause, if any
        grading._MV_START_TIMEOUT = HOUR
        grading.answers_match_many = lambda pairs, timeout=5.0: real_match(pairs, HOUR)

    if args.hanging_programs:
        real_score, real_tests = grading.score_completions, grading.run_code_tests_many
        hour = sandbox.CodeLimits(time_seconds=HOUR, program_seconds=HOUR)

        def score(rows, texts, *a, **k):
            texts = [HANGING_PROGRAM if row["task"] == "code" else t for row, t in zip(rows, texts)]
            return real_score(rows, texts, *a, **k)

        def run_tests(jobs, limits=None, isolated=None):
            if args.pause == "in_sandbox":  # not the sandbox probe at the start: this batch's programs
                threading.Thread(target=say_when_sandboxed, daemon=True).start()
            return real_tests(jobs, hour, isolated)

        grading.run_code_tests_many = run_tests
        module.score_completions = score  # the script holds its own reference to the scorer

    if args.same_samples:
        real_generate = common.Sampler.generate

        def generate(self, prompt_ids, n, temperature, max_tokens, seed, top_p=1.0):
            out = []
            for p in prompt_ids:
                digest = hashlib.sha256(f"{seed} {p}".encode()).digest()
                own_seed = int.from_bytes(digest[:4], "little") % (2**31 - 1)
                # the sampler offsets the seed by its sampling group: undo it, so every process uses own_seed
                out += real_generate(self, [p], n, temperature, max_tokens, own_seed - 101 * self.group, top_p)
            return out

        common.Sampler.generate = generate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pause", choices=POINTS)
    parser.add_argument("--patient_grading", action="store_true")
    parser.add_argument("--hanging_programs", action="store_true")
    parser.add_argument("--same_samples", action="store_true")
    parser.add_argument("script")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    sys.argv = [args.script, *args.argv]
    module = importlib.import_module(Path(args.script).stem)
    install(args, module)
    common.run_main(module.main)


if __name__ == "__main__":
    main()
