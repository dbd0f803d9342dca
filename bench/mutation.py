"""Mutation testing: break the math and the wiring on purpose, one change at a time, and count the changes
some test catches. A surviving mutant is code that no test pins down.

    pip install mutmut==3.8.1                         # the tool (not in requirements.txt: only this bench needs it)
    python bench/mutation.py                          # every module of SCOPE (hours on 2 cores)
    python bench/mutation.py --module prime --module grpo_logprob
    python bench/mutation.py --written_only           # only the written mutants (minutes)
    python bench/mutation.py --module prime --again   # the last run's survivors against today's tests
    python bench/mutation.py --module prime --rest    # go on with the mutants a stopped run did not reach
    python bench/mutation.py --report                 # the results so far, without running anything
    python bench/mutation.py --module raft_pp --report --two_process   # the survivors through the two-process test

Two kinds of mutants, each run against the repository's own tests in a copy under --workdir:
  written  defects a tool does not make (a mask reversed, two arguments swapped, a branch dropped), each a
           text replacement with the tests that must catch it: the defects that once passed the whole suite.
  mutmut   mutmut 3 mutates every function of SCOPE (operators, numbers, constants, arguments, return values)
           and runs, for each mutant, the tests that call that function (it records which tests call which
           function in a first pass). Only in-process tests are used: a test that runs a script in a
           subprocess (run_script, torchrun, vLLM engines) takes minutes and mutmut cannot see into it, so
           main() and the sampler are out of SCOPE; they are the end-to-end tests' job.
Equivalent or harmless survivors are listed in EQUIVALENT with the reason (bench/README.md: the table). A
survivor not listed there is printed with its diff. The last line:
RESULT killed=K total=N written_killed=.. written_total=.. mutmut_killed=.. mutmut_total=.. two_process_killed=..
       equivalent=.. survived=.. timed_out=.. not_run=.. minutes=..
(mutmut_killed includes two_process_killed: survivors of the in-process tests that --two_process killed; their
results are kept in WORKDIR/two_process.json. timed_out are not counted as killed.)
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODULES = ("grpo_logprob.py", "raft_pp.py", "reinforce_rej.py", "prime.py", "common.py", "grading.py")

# The functions mutated, per module: the math (advantages, losses, masks, filters, normalizers, PRIME's
# rewards and PRM loss), the update loops that use them, the reward assembly, and common's log-prob pass,
# batching, statistics and optimizer step, and grading's checks. mutmut names methods "Class.method".
SCOPE = {
    "grpo_logprob": ["parse_reward_weights", "reasoning_token_count", "reasoning_mask", "scoring_texts",
                     "answer_logprob_score", "perplexity_rewards", "fill_failed", "normalize_rewards",
                     "importance_weights", "all_equal_groups", "group_advantages", "clipped_policy_loss", "kl_k3",
                     "loss_normalizer", "aggregate_loss", "micro_batch_loss", "training_batch", "batch_advantages",
                     "update", "reward_terms"],
    "raft_pp": ["correctness_rewards", "positive_samples", "raft_token_loss", "raft_pp_token_loss", "kl_k3",
                "loss_normalizer", "aggregate_loss", "training_batch", "micro_batch_loss", "update"],
    "reinforce_rej": ["correctness_rewards", "mixed_prompts", "reinforce_token_loss", "kl_k3", "loss_normalizer",
                      "aggregate_loss", "training_batch", "micro_batch_loss", "update"],
    "prime": ["implicit_process_rewards", "last_token_mask", "prm_loss", "keep_groups", "leave_one_out", "peak_return",
              "batch_norm", "discounted_returns", "whiten", "whiten_stats", "prm_pair_accuracy", "ppo_token_loss",
              "mini_batch_pass", "prm_micro_batch_loss", "policy_micro_batch_loss", "logprobs_of", "update"],
    "common": ["_ChunkedLogprobEntropy.forward", "_ChunkedLogprobEntropy.backward", "_ChunkedLogprobEntropy._backward",
               "token_logprobs", "collate_ids", "collate", "prompts_for_step", "shard", "micro_batches",
               "full_named_parameters", "top_p_filter", "StepStats.add", "StepStats.max", "StepStats.reduce",
               "optimizer_step", "add_logprob_gap", "logprob_gap_metrics"],
    "grading": ["_braced", "last_boxed", "last_tag", "gsm8k_gold", "last_code_block", "extract_answer", "answer_style",
                "strip_dollars", "_strip_outer_braces", "normalize_answer", "_scientific_parts", "_exponent",
                "_scientific", "_parse_fraction", "_numbers_equal", "_fast_match", "countdown_value",
                "countdown_correct", "format_ok", "score_completions"],
}
# The tests of each module (mutmut then runs, for each mutant, those of them that call its function).
TEST_FILES = {
    "grpo_logprob": ["tests/test_grpo.py", "tests/test_update_steps.py"],
    "raft_pp": ["tests/test_raft_pp.py", "tests/test_update_steps.py"],
    "reinforce_rej": ["tests/test_reinforce_rej.py", "tests/test_update_steps.py"],
    "prime": ["tests/test_prime.py", "tests/test_update_steps.py"],
    "common": ["tests/test_common.py", "tests/test_update_steps.py"],
    "grading": ["tests/test_grading.py", "tests/test_common.py", "tests/test_code.py",
                "tests/test_poem_reward.py", "tests/test_hostile_text.py"],
}
# The two-process test: every script's own update() on one process and on two (tests/dist_update.py under
# torchrun) must leave the same weights. mutmut cannot see into its subprocesses, and on one process the
# process count is 1 and a reduction over processes changes nothing, so a mutant of that arithmetic survives
# the in-process tests; --two_process runs each survivor through this test, the mutant switched on in the
# subprocesses too (mutmut's trampolines read MUTANT_UNDER_TEST, which they inherit).
TWO_PROCESS_TEST = "tests/test_distributed.py::test_update_on_two_processes_equals_one_process[ddp]"
TWO_PROCESS_RESULTS = "two_process.json"  # in the work folder: {mutant: killed by TWO_PROCESS_TEST}
# a test that names one of these runs something out of process, or measures time or the grader's worker pool
OUT_OF_PROCESS = {"run_script", "subprocess", "torchrun", "Popen", "vllm", "settled_workers", "grader_workers",
                  "time_limit", "Hang", "sleep"}

# Defects that passed the whole suite once, written by hand: (name, file, text, replacement, tests).
WRITTEN = [
    ("reasoning-only loss reversed (only answer tokens train)", "grpo_logprob.py",
     "mask = mask * reasoning_mask(tokenizer, rollouts, mask.shape[1], markers)[0].to(device)",
     "mask = mask * (1 - reasoning_mask(tokenizer, rollouts, mask.shape[1], markers)[0].to(device))",
     ["tests/test_update_steps.py::test_reasoning_only_loss_trains_exactly_the_reasoning_tokens"]),
    ("reasoning-only loss ends every row at </think> (boxed and gsm8k rows train nothing)", "grpo_logprob.py",
     "markers = [reasoning_end(answer_style(row))[0] for row in rows]", "markers = END_OF_REASONING",
     ["tests/test_real_model.py::test_reasoning_only_loss_finds_each_rows_own_end_of_reasoning"]),
    ("PRIME implicit reward sign flipped (PRM and reference swapped at the call)", "prime.py",
     'token_rewards = implicit_process_rewards(prm_logprobs, batch["ref_logprobs"], mask, args.beta, args.granularity)',
     'token_rewards = implicit_process_rewards(batch["ref_logprobs"], prm_logprobs, mask, args.beta, args.granularity)',
     ["tests/test_update_steps.py::test_prime_process_reward_alone_moves_the_policy_its_way"]),
    ("PRIME released-code path: PRM and reference swapped", "prime.py",
     'q = implicit_process_rewards(prm_logprobs, batch["ref_logprobs"], mask, 1.0, args.granularity)',
     'q = implicit_process_rewards(batch["ref_logprobs"], prm_logprobs, mask, 1.0, args.granularity)',
     ["tests/test_update_steps.py::test_prime_process_reward_alone_moves_the_policy_its_way"]),
    ("PRIME released-code path: beta applied, no batch scaling", "prime.py",
     "process_rewards = batch_norm(q, mask, accelerator.reduce(peak_return(q, mask), \"max\").item())",
     "process_rewards = token_rewards",
     ["tests/test_update_steps.py::test_prime_update_feeds_its_returns_the_process_rewards_of_its_path"]),
    ("missing-</think> fill of the log-prob reward removed", "grpo_logprob.py",
     "        if name in ANSWER_BLIND_TERMS:\n            terms[name] = fill_failed(",
     "        if False:\n            terms[name] = fill_failed(",
     ["tests/test_grpo.py::test_reward_terms_hand_numbers"]),
    ("--logprob_debias subtracting with the wrong sign", "grpo_logprob.py",
     "v -= answer_logprob_score(base, args.logprob_variant)", "v += answer_logprob_score(base, args.logprob_variant)",
     ["tests/test_grpo.py::test_reward_terms_hand_numbers"]),
    ("RAFT++ without old log-probs (no ratio, no clip: plain RAFT)", "raft_pp.py",
     'if args.algo == "raft++" and args.mini_batches * args.num_iterations > 1:', "if False:",
     ["tests/test_update_steps.py::test_raft_pp_clips_the_ratio_on_its_second_step"]),
    ("--mask_truncated_completions removed", "grpo_logprob.py",
     "    if args.mask_truncated_completions:\n", "    if False:\n",
     ["tests/test_update_steps.py::test_mask_truncated_completions_leaves_a_cut_completion_without_gradient"]),
    ("zscore reward normalization without the max == min test", "grpo_logprob.py",
     "return torch.where(high == low, 0.0, scaled).to(rewards.dtype)", "return scaled.to(rewards.dtype)",
     ["tests/test_grpo.py::test_normalize_rewards_gives_an_all_equal_float32_group_exactly_zero"]),
]

RAFT_CLIP = "loss = -torch.min(ratio, torch.clamp(ratio, {}, 1 + eps_high))"
LOWER_CLIP = ("advantage +1: -min(s, clip(s, lo, 1+eps_high)) = -min(s, 1+eps_high) for any lower bound lo (torch "
              "clamps to the upper bound when lo > hi), so the lower clip never acts (raft_pp.Args.epsilon says so)")
# Survivors judged equivalent or harmless, by (function, the mutated line as mutmut shows it): the reason.
EQUIVALENT: dict[tuple[str, str], str] = {
    **{("raft_pp.raft_pp_token_loss", RAFT_CLIP.format(low)): LOWER_CLIP
       for low in ("None", "1 + eps_low", "2 - eps_low")},
    ("reinforce_rej.reinforce_token_loss",
     "return loss, (ratio <= 1 - eps_low) & (r < 0), (ratio > 1 + eps_high) & (r > 0)"):
        "the clip metric alone, at a ratio of exactly 1 - eps_low, where the clipped and unclipped losses agree",
    ("reinforce_rej.reinforce_token_loss",
     "return loss, (ratio < 1 - eps_low) & (r < 0), (ratio >= 1 + eps_high) & (r > 0)"):
        "the clip metric alone, at a ratio of exactly 1 + eps_high, where the clipped and unclipped losses agree",
    ("raft_pp.raft_pp_token_loss", "return loss, ratio >= 1 + eps_high"):
        "the clip metric alone, at a ratio of exactly 1 + eps_high, where the clipped and unclipped losses agree",
    **{(f"{m}.update", "if skip and it > 1:"):
       "a skipped mini-batch's pass at iteration 1 runs again without a gradient: the same numbers, more work"
       for m in ("raft_pp", "reinforce_rej")},
    ("raft_pp.update", "if args.algo == \"raft++\" and args.mini_batches * args.num_iterations >= 1:"):
        "with one step per batch RAFT++ computes old log-probs equal to the loss pass's: more work, the same numbers",
    ("reinforce_rej.update", "if args.mini_batches * args.num_iterations >= 1:"):
        "with one step per batch the old log-probs equal the loss pass's: more work, the same numbers",
    ("raft_pp.update", "metrics[\"clip_ratio/high_mean\"] = t[\"clipped\"] / max(t[\"trained\"], 2.0)"):
        "the floor keeps a batch that trains nothing from dividing by 0 (its clip count is 0); at 2 it differs only "
        "when a single token was trained",
    ("raft_pp.update", "tokens = max(t[\"tokens\"], 2.0)"):
        "the floor keeps an empty batch (0 tokens) from dividing by 0; at 2 it differs only when the batch holds a "
        "single token (its entropy and KL metrics halved)",
    **{("reinforce_rej.update", f"tokens, trained = max(t[\"tokens\"], {a}), max(t[\"trained\"], {b})"):
       "the floor keeps an empty batch (0 tokens) from dividing by 0; at 2 it differs only when the batch holds a "
       "single token (its metric halved)" for a, b in (("2.0", "1.0"), ("1.0", "2.0"))},
    ("grpo_logprob.parse_reward_weights", 'name, _, value = part.rpartition("=")'):
        "a term with one '=' splits alike; one with two is refused in the same sentence either way",
    ("grpo_logprob.normalize_rewards", "std = r.std(dims, keepdim=True).nan_to_num(None)  # a single sample has no spread"):
        "the std is NaN only for a single reward, which the max == min test sets to 0 whatever the std",
    ("grpo_logprob.normalize_rewards", "std = r.std(dims, keepdim=True).nan_to_num(1.0)  # a single sample has no spread"):
        "the std is NaN only for a single reward, which the max == min test sets to 0 whatever the std",
    ("grpo_logprob.reward_terms", "v = answer_logprob_score(lp, args.logprob_variant) if lp is not None else 1.0"):
        "the placeholder of a completion without the marker is replaced by fill_failed (the group's lowest)",
    ("grpo_logprob.reward_terms",
     "terms[name] = torch.tensor([perplexity_rewards(lp, base)[name] if lp is not None else 1.0"):
        "the placeholder of a completion without the marker is replaced by fill_failed (the group's lowest)",
    ("prime.update",
     'batch["old_logprobs"] if (args.temperature == 1.0) and False else logprobs_of(model, batch, size)'):
        "at temperature 1 the reference pass recomputes the old log-probs: more work, the same numbers",
    ("prime.update", 'q = implicit_process_rewards(prm_logprobs, batch["ref_logprobs"], mask, 2.0, args.granularity)'):
        "batch_norm divides q by the batch's largest |return|, so a factor on q cancels (up to its 1e-6 guard)",
    ("prime.update", 'tokens = max(t["tokens"], 2.0)'):
        "the floor keeps an empty batch (0 tokens) from dividing by 0; at 2 it differs only when the batch holds a "
        "single token (its metrics halved)",
    **{("prime.update", f'"train/skipped_nonfinite": {get}, **logprob_gap_metrics(t)}}'):
       "main() calls update() only with whole groups on every process, so at least one optimizer step adds the count: "
       "the default is never read"
       for get in (f't.get("skipped_nonfinite", {default})' for default in ("None", "", "1.0"))},
    ("prime.mini_batch_pass", "break"):
        "tensor_split puts the empty mini-batches last: after the first, every one left is empty too",
    ("prime.mini_batch_pass", "world, grad_norm = accelerator.num_processes, 1.0"):
        "the start value is returned only when no mini-batch steps; update() always has whole groups, so one does",
    ("prime.prm_loss", 'return F.binary_cross_entropy_with_logits(logits, labels.to(None), reduction="none")'):
        "float32 labels against bf16 logits: torch computes the loss in float32, no worse than in the logits' dtype",
    **{("prime.prm_pair_accuracy", f"diff = r[c {a} 0.5][:, None] - r[c {b} 0.5][None, :]"):
       "the outcome labels are 0 or 1: no label sits at 0.5" for a, b in ((">=", "<="), (">", "<"))},
    ("prime.ppo_token_loss",
     "return loss, ((ratio <= 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))"):
        "the clip metric alone, at a ratio of exactly 1 - eps, where the clipped and unclipped losses agree",
    ("prime.ppo_token_loss",
     "return loss, ((ratio < 1 - eps) & (advantages < 0)) | ((ratio >= 1 + eps) & (advantages > 0))"):
        "the clip metric alone, at a ratio of exactly 1 + eps, where the clipped and unclipped losses agree",
    ("grading._numbers_equal", "if a.denominator == 1 and b.denominator == 1 or a == 0 and b == 0:"):
        "zero against a non-zero b fails the relative test anyway (|b| <= 1e-6 |b| only for b = 0): the zero test "
        "only saves work",
    **{("grading.countdown_value", f'return parse_binary(depth, "XX{ops}XX", {operand})'):
       "the tokens are digit runs and single characters of +-*/(): none is an X"
       for ops, operand in (("+-", "parse_term"), ("*/", "parse_atom"))},
    **{("grading.extract_answer", f'return after.split("\\n", {limit})[0].strip() or None'):
       "the first line is the same whatever the split limit" for limit in ("", "2")},
    ("grading.extract_answer", "content = last_tag(text, )"): "last_tag's default tag is answer",
    ("grading.last_tag", "start = text.rfind(open_, None, end)"): "a start of None is 0",
    **{("grading.score_completions", f"scores[i].poem, errors = poem_components(None, {args}), errors + 1"):
       "poem_components of no text is all zeros, whatever its other arguments"
       for args in ('"", "", None', '"XXXX", "", ""', '"", "XXXX", ""', '"", "", "XXXX"', '"", None, ""')},
    ("grading.score_completions", 'meta.get("form", "XXXX"))'):
        "a form poem_components does not know, '' or 'XXXX', leaves the line count unconstrained",
    **{("grading._strip_outer_braces", line):
       "differs only on a group holding nothing but spaces: ' ' or '', no answer either way"
       for line in ("while lo <= hi and s[lo].isspace():", "while hi >= lo and s[hi].isspace():",
                    'if lo <= hi and s[lo] == "{" and close_of.get(lo) == hi:')},
    **{("grading.normalize_answer", line):
       "differs only on a text of dollar signs and spaces ('$', '$$', ''): no answer either way"
       for line in ('while end + start >= 2 and s[start] == "$" and s[end - 1] == "$":',
                    'while end - start > 2 and s[start] == "$" and s[end - 1] == "$":',
                    'while end - start >= 3 and s[start] == "$" and s[end - 1] == "$":',
                    "while start <= end and s[start].isspace():", "while end >= start and s[end - 1].isspace():")},
    **{("common.top_p_filter", line): "the sampler filters one step's log-probs [B, V]: dimension 1 is the last"
       for line in ("sorted_lp, idx = logp.sort(+1, descending=True)", "sorted_lp, idx = logp.sort(descending=True)",
                    "cum = sorted_lp.exp().cumsum(+1)",
                    'filtered = torch.full_like(logp, float("-inf")).scatter(+1, idx, sorted_lp)',
                    "return torch.log_softmax(filtered, +1)")},
    **{("common.top_p_filter", line): 'float("-INF") is float("-inf")'
       for line in ('sorted_lp = sorted_lp.masked_fill(drop, float("-INF"))',
                    'filtered = torch.full_like(logp, float("-INF")).scatter(-1, idx, sorted_lp)')},
    ("common.prompts_for_step", "order = np.random.default_rng(seed + 7920 * epoch).permutation(len(rows))"):
        "another factor gives each epoch its own seeded permutation too: a different order, as good",
    ("common.optimizer_step", "local = torch.nn.utils.get_total_norm(grads) if (grads) or True else torch.zeros(())"):
        "the norm of no gradients is 0 either way",
    ("common.optimizer_step",
     "skip_nonfinite_step(accelerator, float(grad_norm if (grad_norm is not None) and False else local))"):
        "only the warning's wording: it names this process's norm instead of the clipped one, which is non-finite "
        "too when this process's is, and says 'on another process' otherwise, which is then true",
    ("common._ChunkedLogprobEntropy.forward", "ctx.set_materialize_grads(True)"):
        "an unused output's gradient comes as zeros instead of None: the same gradients, its terms computed for nothing",
}
# Functions that catch every ValueError they raise: the message of such a raise is never read.
CAUGHT_RAISES = {"grading.countdown_value"}


def copy_repo(dest: Path) -> None:
    """The repository's code, tests and bench scripts (test_code.py imports bench/code_sandbox.py) in dest (no
    data, runs or git); over an existing copy, its files are overwritten and files deleted since stay."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in REPO.glob("*.py"):
        shutil.copy2(p, dest / p.name)
    for folder in ("tests", "bench"):
        shutil.copytree(REPO / folder, dest / folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def build_toy(workdir: Path) -> Path:
    """The tests' tiny toy task and model, built once (tests/conftest.py's TINY_TOY) and shared by every run."""
    toy = workdir / "toy"
    if not (toy / "model" / "config.json").exists():
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY_TOY

        subprocess.run([PYTHON, "data_prep.py", "toy", "--out", str(toy), *TINY_TOY], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return toy


def out_of_process(test: ast.FunctionDef) -> bool:
    """Whether a test function names one of OUT_OF_PROCESS (bench/mutation_select.py drops such tests)."""
    words = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    words |= {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    words |= {n.value for n in ast.walk(test) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return bool(words & OUT_OF_PROCESS)


def run_written(workdir: Path, env: dict) -> list[tuple[str, bool]]:
    """Each written mutant in a fresh copy: killed when its tests fail (pytest exit code 1)."""
    results = []
    root = workdir / "written"
    copy_repo(root)
    tests = sorted({t for *_, ts in WRITTEN for t in ts})
    clean = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root, env=env,
                           capture_output=True, text=True)
    if clean.returncode != 0:
        raise SystemExit(f"the written mutants' tests fail on the unmutated code:\n{clean.stdout[-3000:]}")
    for name, file, text, replacement, tests in WRITTEN:
        source = (REPO / file).read_text()
        if source.count(text) != 1:
            raise SystemExit(f"written mutant {name!r}: {file} no longer holds its text once; update WRITTEN.")
        (root / file).write_text(source.replace(text, replacement))
        run = subprocess.run([PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=root,
                             env=env, capture_output=True, text=True)
        (root / file).write_text(source)
        results.append((name, run.returncode == 1))
        print(f"written mutant: {'killed  ' if run.returncode == 1 else 'SURVIVED'} {name}", flush=True)
    return results


def mutmut_names(modules: list[str], functions: list[str] | None = None) -> list[str]:
    """mutmut's mutant-name patterns of SCOPE (or of its `functions` alone): module.x_function__mutmut_*,
    module.xǁClassǁmethod__mutmut_*."""
    patterns = []
    for module in modules:
        for fn in [f for f in SCOPE[module] if functions is None or f in functions]:
            mangled = "xǁ" + fn.replace(".", "ǁ") if "." in fn else "x_" + fn
            patterns.append(f"{module}.{mangled}__mutmut_*")
    return patterns


def mutmut_codes(root: Path, patterns: list[str]) -> dict[str, int | None]:
    """{mutant name: mutmut's exit code} of the mutants matching patterns (1 or 3: killed; None: not run)."""
    codes = {}
    for meta in (root / "mutants").glob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                codes[name] = code
    return codes


def run_mutmut(workdir: Path, env: dict, modules: list[str], children: int, keep: str | None,
               functions: list[str] | None = None) -> dict[str, int | None]:
    """mutmut over SCOPE's functions of `modules` (or `functions` of them); returns {mutant name: exit code}.
    keep ("again" or "rest"): keep the last run's results in workdir and test, with today's code and tests, only
    its survivors ("again") or only the mutants it did not reach ("rest": a run stopped early goes on)."""
    root = workdir / "mutmut"
    patterns = mutmut_names(modules, functions)
    if keep and (root / "mutants").exists():
        copy_repo(root)
        codes = mutmut_codes(root, patterns)
        names = [n for n, c in codes.items() if (c is None if keep == "rest" else c not in (1, 3, None))]
        if not names:
            return codes
    else:
        shutil.rmtree(root, ignore_errors=True)
        copy_repo(root)
        names = patterns
    forget_two_process(workdir, names)
    tests = sorted({f for m in modules for f in TEST_FILES[m]})
    (root / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        f"source_paths = {json.dumps(list(MODULES))}\n"
        f"also_copy = {json.dumps([p.name for p in REPO.glob('*.py') if p.name not in MODULES] + ['bench'])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'pytest_add_cli_args = ["-p", "mutation_select"]\n'  # the in-process tests only (mutation_select.py)
        # guards of choices the parser already refuses (Literal flags): unreachable from a command line
        'do_not_mutate_patterns = ["raise ValueError\\\\(f\\"unknown "]\n'
        'process_isolation = "forkserver"\n'  # torch is not fork-safe once its thread pool runs
        "timeout_multiplier = 40.0\n"  # mutmut's 15 x the tests' time cut off mutants that only dropped a device
        "use_git_change_detection = false\n")
    plugin_path = os.pathsep.join(filter(None, [str(REPO / "bench"), env.get("PYTHONPATH")]))  # mutation_select
    run = subprocess.run([PYTHON, "-m", "mutmut", "run", "--max-children", str(children), *names], cwd=root,
                         env={**env, "PYTHONPATH": plugin_path}, capture_output=True, text=True)
    if run.returncode != 0:  # e.g. a selected test fails on the unmutated code
        raise SystemExit(f"mutmut run failed (exit code {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return mutmut_codes(root, patterns)


def mutant_diff(root: Path, name: str, env: dict) -> list[str]:
    out = subprocess.run([PYTHON, "-m", "mutmut", "show", name], cwd=root, env=env, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")]


def two_process_results(workdir: Path) -> dict[str, bool]:
    """{mutant: killed} of the survivors run through TWO_PROCESS_TEST so far (workdir/two_process.json)."""
    cache_file = workdir / TWO_PROCESS_RESULTS
    return json.loads(cache_file.read_text()) if cache_file.exists() else {}


def save_two_process(workdir: Path, results: dict[str, bool]) -> None:
    (workdir / TWO_PROCESS_RESULTS).write_text(json.dumps(results, indent=1))


def forget_two_process(workdir: Path, patterns: list[str]) -> None:
    """Drop the two-process results of the mutants mutmut is about to test again."""
    if (workdir / TWO_PROCESS_RESULTS).exists():
        save_two_process(workdir, {n: k for n, k in two_process_results(workdir).items()
                                   if not any(fnmatch.fnmatch(n, p) for p in patterns)})


def two_process_test(workdir: Path, env: dict, mutant: str | None = None) -> subprocess.CompletedProcess:
    """TWO_PROCESS_TEST in mutmut's copy of the code, with `mutant` switched on (None: the unmutated code)."""
    mutant_env = {"MUTANT_UNDER_TEST": mutant} if mutant else {}
    return subprocess.run([PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TWO_PROCESS_TEST],
                          cwd=workdir / "mutmut" / "mutants", env={**env, **mutant_env}, capture_output=True, text=True)


def run_two_process(workdir: Path, env: dict, names: list[str]) -> None:
    """Run the survivors `names` not yet tested through TWO_PROCESS_TEST (about a minute each), after checking
    that it passes on the unmutated code, and add {mutant: killed} to workdir/two_process.json: a mutant tested
    once is not tested again until mutmut's results are renewed."""
    cache = two_process_results(workdir)
    todo = [n for n in names if n not in cache]
    if not todo:
        return
    clean = two_process_test(workdir, env)
    if clean.returncode != 0:
        raise SystemExit(f"the two-process test fails on the unmutated code:\n{clean.stdout[-3000:]}")
    for name in todo:
        run = two_process_test(workdir, env, name)
        if run.returncode not in (0, 1):
            raise SystemExit(f"the two-process test did not run for {name} (pytest exit code {run.returncode}):\n"
                             f"{run.stdout[-2000:]}")
        cache[name] = run.returncode == 1
        save_two_process(workdir, cache)
        print(f"two processes: {'killed  ' if cache[name] else 'SURVIVED'} {name}", flush=True)


def device_only(removed: str, changed: str) -> str | None:
    """The reason a mutant that only drops a tensor's device (device=device -> None or nothing) changes
    nothing here, or None. The tests run on the CPU, where device None is the device; training_batch's
    devices are tested on the meta device, and update()'s index and count tensors are harmless elsewhere
    too (a GPU tensor takes a CPU index; a reduction over NCCL of a CPU tensor fails at once)."""
    device = r'[\w.\[\]"]+'  # device, accelerator.device, batch["mask"].device, self.sums[name].device
    if changed in (re.sub(f"device={device}", "device=None", removed), re.sub(f"device={device}", "", removed).strip(),
                   re.sub(rf"\.to\({device}\.device\)", ".to(None)", removed)):
        return "device None is the CPU, the only device here (see device_only)"
    return None


def reduction_only(removed: str, changed: str) -> str | None:
    """The reason a mutant of accelerator.reduce's "sum" (to None, "XXsumXX", "SUM" or the default) changes
    nothing, or None: accelerate sums for every reduction but "max" and divides only for "mean", and
    Accelerator.reduce's default is "sum" (these survive the two-process test too)."""
    if '"sum")' in removed and changed in [removed.replace('"sum")', v) for v in ('None)', '"XXsumXX")', '"SUM")')] + [
            removed.replace(', "sum")', ", )")]:
        return "accelerate's reduce sums for any reduction but max and divides only for mean; its default is sum"
    return None


def caught_raise(function: str, removed: str, changed: str) -> str | None:
    """The reason a mutant that only changes the message of a ValueError its function catches changes nothing."""
    raise_ = "raise ValueError("
    if function in CAUGHT_RAISES and removed.startswith(raise_) and changed.startswith(raise_):
        return f"{function} catches its own ValueError: the message is never read"
    return None


def function_of(name: str) -> str:
    module, mangled = name.split("__mutmut_")[0].split(".", 1)
    return f"{module}.{mangled.removeprefix('x_').removeprefix('xǁ').replace('ǁ', '.')}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(SCOPE), help="modules to mutate (default: all)")
    parser.add_argument("--function", action="append",
                        help="only these functions of the modules' scope (as SCOPE names them: optimizer_step, "
                             "StepStats.add); with --rest, a long run goes on with the functions that matter first")
    parser.add_argument("--written_only", action="store_true", help="only the written mutants")
    parser.add_argument("--workdir", default=str(REPO / ".mutation"), help="copies, the toy model and mutmut's state")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--report", action="store_true",
                        help="only report the results in --workdir so far (a run stopped early: not_run counts the rest)")
    parser.add_argument("--again", action="store_true",
                        help="keep the last run's results; test only its survivors, with today's code and tests")
    parser.add_argument("--rest", action="store_true",
                        help="keep the last run's results; test only the mutants it did not reach (a run stopped early)")
    parser.add_argument("--two_process", action="store_true",
                        help="also run each survivor through the two-process update test (about a minute each); "
                             "with --report, only that, on the results so far")
    args = parser.parse_args()
    modules = args.module or sorted(SCOPE)
    unknown = sorted(set(args.function or []) - {f for m in modules for f in SCOPE[m]})
    if unknown:
        raise SystemExit(f"--function {', '.join(unknown)}: not in the scope of {', '.join(modules)}; "
                         "bench/mutation.py's SCOPE lists the functions mutated.")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit("mutmut is not installed: pip install mutmut==3.8.1 (only this bench needs it).") from None
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = {**os.environ, "TOY_DIR": str(build_toy(workdir)), "PYTHONDONTWRITEBYTECODE": "1"}

    if args.report:
        written, codes = [], mutmut_codes(workdir / "mutmut", mutmut_names(modules, args.function))
    else:
        keep = "again" if args.again else "rest" if args.rest else None
        written = [] if keep else run_written(workdir, env)  # a run that goes on leaves out the written mutants
        codes = {} if args.written_only else run_mutmut(workdir, env, modules, args.children, keep, args.function)
    not_run = {n for n, c in codes.items() if c is None}
    codes = {n: c for n, c in codes.items() if c is not None}

    killed = {n for n, c in codes.items() if c in (1, 3)}
    # the tests did not finish in mutmut's time: an endless loop, or a busy machine (a mutant that only drops a
    # device timed out at 2 children here). Not counted as caught: --again tests them again.
    timeouts = {n for n, c in codes.items() if c in (-24, 24, 36, 152, 255)}
    survivors = sorted(set(codes) - killed - timeouts)
    equivalent, meaningful = [], []
    for name in survivors:
        diff = mutant_diff(workdir / "mutmut", name, env)
        changed = next((line[1:].strip() for line in diff if line.startswith("+")), "")
        removed = next((line[1:].strip() for line in diff if line.startswith("-")), "")
        reason = (EQUIVALENT.get((function_of(name), changed)) or device_only(removed, changed)
                  or reduction_only(removed, changed) or caught_raise(function_of(name), removed, changed))
        (equivalent if reason else meaningful).append((name, codes[name], diff, reason))
    if args.two_process:  # with --report: only this pass, on the results so far
        run_two_process(workdir, env, [name for name, *_ in meaningful])
    two = {n: k for n, k in two_process_results(workdir).items() if n in codes}
    meaningful = [m for m in meaningful if not two.get(m[0])]
    for title, group in (("surviving mutants", meaningful), ("equivalent or harmless survivors", equivalent)):
        print(f"\n{title}: {len(group)}")
        for name, code, diff, reason in group:
            status = "no test calls it" if code == 33 else "survived" if code == 0 else f"exit code {code}"
            print(f"  {name} ({status}){': ' + reason if reason else ''}")
            for line in diff:
                print(f"      {line}")
    w_killed = sum(k for _, k in written)
    two_killed = sum(two.values())
    m_killed = len(killed) + two_killed
    functions = len(set(args.function)) if args.function else sum(len(SCOPE[m]) for m in modules)
    print(f"\n{len(codes)} mutmut mutants of {functions} functions tested, "
          f"{len(timeouts)} of them timed out (not counted: test them again with --again), {two_killed} killed by "
          f"the two-process test of {len(two)} survivors run through it; {time.time() - t0:.0f} s")
    print(f"RESULT killed={w_killed + m_killed} total={len(written) + len(codes)} written_killed={w_killed} "
          f"written_total={len(written)} mutmut_killed={m_killed} mutmut_total={len(codes)} "
          f"two_process_killed={two_killed} equivalent={len(equivalent)} survived={len(meaningful)} "
          f"timed_out={len(timeouts)} not_run={len(not_run)} minutes={(time.time() - t0) / 60:.1f}")


if __name__ == "__main__":
    main()
