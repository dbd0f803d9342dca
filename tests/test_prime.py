"""PRIME math with hand-computed numbers, and prime.py end to end on the tiny toy task."""

import math
import sys

import torch

from common import Rollout, prompts_for_step
from grading import Score
from common import read_jsonl
from conftest import REPO, run_script, torchrun
from prime import (batch_norm, discounted_returns, from_json, implicit_process_rewards, keep_groups, last_token_mask,
                   leave_one_out, peak_return, ppo_token_loss, prm_loss, prm_pair_accuracy, rank_prompts, to_json,
                   whiten, whiten_stats)

# Two completions of lengths 3 and 2 (mixed lengths: row 1 has a padded column).
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
PRM_LP = torch.tensor([[-1.0, -2.0, -0.25], [-1.0, -3.0, 0.0]])
REF_LP = torch.tensor([[-2.0, -1.0, -0.5], [-1.5, -1.0, -9.0]])  # -9 sits under the padding: must not count


# --- implicit process reward ------------------------------------------------------------------
def test_implicit_reward_token_and_whole():
    # q = prm - ref: row 0 [1, -1, 0.25], row 1 [0.5, -2, (pad)]; beta 0.5
    r = implicit_process_rewards(PRM_LP, REF_LP, MASK, 0.5, "token")
    assert torch.allclose(r, torch.tensor([[0.5, -0.5, 0.125], [0.25, -1.0, 0.0]]))
    # whole: the sum on the last valid token (0.125 at column 2; -0.75 at column 1)
    r = implicit_process_rewards(PRM_LP, REF_LP, MASK, 0.5, "whole")
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, 0.125], [0.0, -0.75, 0.0]]))
    # the PRM starts as a copy of the reference: every reward is exactly 0
    assert torch.equal(implicit_process_rewards(REF_LP, REF_LP, MASK, 0.05, "token"), torch.zeros(2, 3))


def test_last_token_mask_mixed_lengths_and_empty_row():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(last_token_mask(mask), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# --- PRM loss ---------------------------------------------------------------------------------
def test_prm_loss_hand_numbers():
    # logits beta * sum q: 0.5 * 0.25 = 0.125 (label 1), 0.5 * -1.5 = -0.75 (label 0)
    loss = prm_loss(PRM_LP, REF_LP, MASK, torch.tensor([1.0, 0.0]), 0.5)
    # -log sigmoid(0.125) = log(1 + e^-0.125) = 0.632595;  -log(1 - sigmoid(-0.75)) = log(1 + e^-0.75) = 0.386871
    assert torch.allclose(loss, torch.tensor([0.632595, 0.386871]), atol=1e-6)
    # at the start (PRM == reference) every sample costs log 2
    assert torch.allclose(prm_loss(REF_LP, REF_LP, MASK, torch.tensor([1.0, 0.0]), 0.05), torch.full((2,), math.log(2)))
    # the gradient raises the PRM's log-probs of a correct sample and lowers those of a wrong one
    lp = REF_LP.clone().requires_grad_()
    prm_loss(lp, REF_LP, MASK, torch.tensor([1.0, 0.0]), 0.05).sum().backward()
    # d/d lp_t = beta * (sigmoid(0) - y) = -0.025 (label 1), +0.025 (label 0); 0 under the padding
    assert torch.allclose(lp.grad, torch.tensor([[-0.025] * 3, [0.025, 0.025, 0.0]]))


# --- prompt filter ----------------------------------------------------------------------------
def test_filter_keeps_accuracy_in_range():
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert keep_groups(correct, 0.2, 0.8).tolist() == [True, True, True, False, False]  # 0.25 .. 0.75 kept
    # both bounds are inclusive: 1/5 = 0.2 and 4/5 = 0.8 (floating point must not drop them)
    assert keep_groups(torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]), 0.2, 0.8).tolist() == [True, True]
    # at 0 too: bounds 0 and 1 keep every group (the RLOO set-up), 0 and 0 the all-wrong groups only
    assert keep_groups(correct, 0.0, 1.0).tolist() == [True] * 5
    assert keep_groups(correct, 0.0, 0.0).tolist() == [False, False, False, False, True]


# --- leave-one-out returns on a group of 3 with lengths 3, 1, 2 -------------------------------
LOO_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_outcome_leave_one_out_on_the_last_token():
    last = last_token_mask(LOO_MASK)
    outcome = torch.tensor([1.0, 0.0, 1.0])
    adv = leave_one_out(outcome[:, None] * last, last, 3)
    # r_i - mean of the other two: 1 - 0.5, 0 - 1, 1 - 0.5, on each completion's last token
    assert torch.allclose(adv, torch.tensor([[0.0, 0.0, 0.5], [-1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    assert torch.allclose(discounted_returns(adv, LOO_MASK, 1.0),
                          torch.tensor([[0.5, 0.5, 0.5], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    assert torch.allclose(discounted_returns(adv, LOO_MASK, 0.5),
                          torch.tensor([[0.125, 0.25, 0.5], [-1.0, 0.0, 0.0], [0.25, 0.5, 0.0]]))


def test_process_leave_one_out_against_the_others_per_token_mean():
    rewards = torch.tensor([[0.3, 0.0, 0.6], [0.6, 0.0, 0.0], [-0.3, 0.9, 0.0]])
    # per-token means rbar = 0.3, 0.6, 0.3; baselines = mean of the others' = 0.45, 0.3, 0.45
    adv = leave_one_out(rewards, LOO_MASK, 3)
    assert torch.allclose(adv, torch.tensor([[-0.15, -0.45, 0.15], [0.3, 0.0, 0.0], [-0.75, 0.45, 0.0]]))
    process = discounted_returns(adv, LOO_MASK, 1.0)  # return-to-go: suffix sums
    assert torch.allclose(process, torch.tensor([[-0.45, -0.3, 0.15], [0.3, 0.0, 0.0], [-0.3, 0.45, 0.0]]))
    # the two returns are summed (outcome returns from the test above)
    outcome = torch.tensor([[0.5, 0.5, 0.5], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert torch.allclose(outcome + process, torch.tensor([[0.05, 0.2, 0.65], [-0.7, 0.0, 0.0], [0.2, 0.95, 0.0]]))


# n = 2, process rewards [[0.1, 0.3], [0, 0]], labels [1, 0], gamma 1: outcome returns [[1, 1], [-1, -1]]
# (1 - 0 and 0 - 1 on the last token); rbar = 0.2, 0.
PROCESS = torch.tensor([[0.1, 0.3], [0.0, 0.0]])


def summed_returns(baseline):
    mask, last = torch.ones(2, 2), last_token_mask(torch.ones(2, 2))
    outcome = discounted_returns(leave_one_out(torch.tensor([1.0, 0.0])[:, None] * last, last, 2), mask, 1.0)
    assert torch.allclose(outcome, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    return outcome + discounted_returns(leave_one_out(PROCESS, mask, 2, baseline), mask, 1.0)


def test_process_baseline_paper():
    # r_t(i) - mean_{j!=i} rbar(j): sample 0 [0.1, 0.3] - 0 -> returns [0.4, 0.3]; sample 1 [0, 0] - 0.2 -> [-0.4, -0.2]
    assert torch.allclose(leave_one_out(PROCESS, torch.ones(2, 2), 2, "paper"), torch.tensor([[0.1, 0.3], [-0.2, -0.2]]))
    assert torch.allclose(summed_returns("paper"), torch.tensor([[1.4, 1.3], [-1.4, -1.2]]))


def test_process_baseline_code():
    # r_t(i) * n/(n-1) - sum_j rbar(j)/(n-1) = 2 r_t(i) - 0.2: sample 0 [0, 0.4] -> returns [0.4, 0.4];
    # sample 1 [-0.2, -0.2] -> [-0.4, -0.2]. The same sequence total (t = 0) as the paper's, not per token
    assert torch.allclose(leave_one_out(PROCESS, torch.ones(2, 2), 2, "code"), torch.tensor([[0.0, 0.4], [-0.2, -0.2]]))
    assert torch.allclose(summed_returns("code"), torch.tensor([[1.4, 1.4], [-1.4, -1.2]]))
    # for the outcome (one reward per completion) the two baselines agree
    outcome = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    last = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(leave_one_out(outcome, last, 3, "code"), leave_one_out(outcome, last, 3, "paper"))


def test_released_code_process_path_hand_numbers():
    """The released code's path (--process_baseline code): q_t without beta, divided by the batch's largest
    |return-to-go| + 1e-6, then its leave-one-out; n = 2, q from PRM_LP - REF_LP, labels [1, 0], gamma 1."""
    q = implicit_process_rewards(PRM_LP, REF_LP, MASK, 1.0, "token")
    assert torch.allclose(q, torch.tensor([[1.0, -1.0, 0.25], [0.5, -2.0, 0.0]]))
    # reverse cumulative sums: row 0 [0.25, -0.75, 0.25], row 1 [-1.5, -2, (pad)]: the peak is 2
    assert peak_return(q, MASK).item() == 2.0
    scores = batch_norm(q, MASK)
    assert torch.allclose(scores, torch.tensor([[0.5, -0.5, 0.125], [0.25, -1.0, 0.0]]) / (1 + 5e-7), atol=1e-7)
    assert discounted_returns(scores, MASK, 1.0).abs().max() < 1  # no return exceeds 1 in magnitude
    # gamma does not enter the peak: 0.5 discounting gives the same divisor
    assert peak_return(q, MASK).item() == 2.0 and torch.equal(batch_norm(q, MASK, 4.0), q / (4.0 + 1e-6))
    # code baseline: rbar = 0.125/3 = 0.041667 and -0.75/2 = -0.375, their sum -1/3; 2 r_t + 1/3
    process = discounted_returns(leave_one_out(scores, MASK, 2, "code"), MASK, 1.0)
    # per token [4/3, -2/3, 7/12] and [5/6, -5/3]: returns-to-go [5/4, -1/12, 7/12] and [-5/6, -5/3]
    assert torch.allclose(process, torch.tensor([[1.25, -1 / 12, 7 / 12], [-5 / 6, -5 / 3, 0.0]]), atol=1e-5)
    outcome = discounted_returns(leave_one_out(torch.tensor([1.0, 0.0])[:, None] * last_token_mask(MASK),
                                               last_token_mask(MASK), 2), MASK, 1.0)
    assert torch.allclose(outcome + process, torch.tensor([[2.25, 11 / 12, 19 / 12], [-11 / 6, -8 / 3, 0.0]]),
                          atol=1e-5)
    # whole: the sum of q on the last token, then the same scaling (peak |0.25| and |-1.5|: 1.5)
    whole = implicit_process_rewards(PRM_LP, REF_LP, MASK, 1.0, "whole")
    assert torch.allclose(batch_norm(whole, MASK), torch.tensor([[0.0, 0.0, 0.25], [0.0, -1.5, 0.0]]) / 1.500001)


def test_leave_one_out_is_per_group():
    rewards = torch.tensor([[1.0], [0.0], [5.0], [5.0]])  # two groups of 2: (1, 0) and (5, 5)
    assert torch.allclose(leave_one_out(rewards, torch.ones(4, 1), 2), torch.tensor([[1.0], [-1.0], [0.0], [0.0]]))


def test_whiten_over_valid_tokens_and_across_processes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # valid 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std 1.290994
    w = whiten(values, mask)
    assert torch.allclose(w, torch.tensor([[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]]), atol=1e-5)
    # two processes' statistics summed give the same as the whole batch
    stats = whiten_stats(values[:1], mask[:1]) + whiten_stats(values[1:], mask[1:])
    assert torch.allclose(whiten(values[1:], mask[1:], stats), w[1:], atol=1e-6)
    # two valid tokens, a small spread: mean 0.2, unbiased var (0.01 + 0.01) / 1 = 0.02, std 0.141421
    w = whiten(torch.tensor([[0.1, 0.3, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[-0.707107, 0.707107, 0.0]]), atol=1e-5)


def test_prm_pair_accuracy_within_groups():
    seq_rewards = torch.tensor([0.3, -0.1, 0.3, 0.5, 9.0, 9.0, 1.0, 2.0])
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # group 2: all correct, no pairs
    # pairs (correct, incorrect): 0.3 > -0.1, 0.3 = 0.3 (tie: 1/2), 0.5 > -0.1, 0.5 > 0.3
    assert prm_pair_accuracy(seq_rewards, correct, 4) == (3.5, 4)


def test_ppo_token_loss_per_token_advantages():
    """-min(s A, clip(s, 0.8, 1.2) A) by hand, and which tokens the clip holds (s below 0.8 with A < 0, or above
    1.2 with A > 0): advantages other than +-1 and 0, ratios inside and outside the range on either side."""
    ratio = torch.tensor([[0.5, 0.5, 1.5, 1.5, 1.1, 1.5, 0.5, 0.5, 1.1, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -2.0, 2.0, -0.5, 3.0, 0.0, 0.0, 0.5, -1.0, 0.5]], dtype=torch.float64)
    loss, clipped = ppo_token_loss(ratio.log(), torch.zeros_like(ratio), adv, 0.2)
    # min(1.0, 1.6); min(-1.0, -1.6); min(3.0, 2.4); min(-0.75, -0.6); min(3.3, 3.3); 0; 0; min(0.25, 0.4);
    # min(-1.1, -1.1); min(0.75, 0.6)
    expected = torch.tensor([[-1.0, 1.6, -2.4, 0.75, -3.3, 0.0, 0.0, -0.25, 1.1, -0.6]], dtype=torch.float64)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert clipped.tolist() == [[False, True, True, False, False, False, False, False, False, True]]


def test_returns_of_one_token_completions():
    """A batch whose completions are all one token long (an immediate end of text) has one column."""
    rewards, mask = torch.tensor([[0.5], [-1.0]]), torch.ones(2, 1)
    assert torch.equal(discounted_returns(rewards, mask, 0.9), rewards)


# --- data stream and buffer -------------------------------------------------------------------
def test_rank_streams_are_disjoint_and_follow_the_epoch_order():
    rows = [{"id": i} for i in range(10)]
    single = [r["id"] for r in rank_prompts(rows, 0, 12, 3, 0, 1)]
    assert single == [prompts_for_step(rows, k + 1, 1, 3)[0]["id"] for k in range(12)]
    r0, r1 = ([r["id"] for r in rank_prompts(rows, 0, 6, 3, rank, 2)] for rank in (0, 1))
    assert r0 == single[0::2] and r1 == single[1::2]


def test_buffer_round_trips_through_json():
    import json

    group = dict(row={"id": "a", "prompt": []}, rollouts=[Rollout([1, 2], [3, 4], [-0.1, -0.7], "x", "stop")],
                 scores=[Score(1.0, 1.0, "5")])
    assert from_json(json.loads(json.dumps(to_json([group])))) == [group]


# --- the script end to end --------------------------------------------------------------------
def prime_cmd(toy, out, name, *extra):
    return ["prime.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--sampler", "hf", "--prompts_per_step", "4", "--num_generations", "4", "--max_completion_length", "48",
            "--eval_limit", "10", "--num_mini_batches", "2", "--micro_batch_size", "4", *extra]


TIMING_KEYS = ("time/", "tokens_per_second", "memory/")


def check_batch_and_buffer(metrics, rollouts, groups_per_step=4, n=4):
    """The batch takes the buffer's groups first, then kept groups until it holds prompts_per_step;
    the rest waits in the buffer. rollouts.jsonl (logged every step) holds exactly the trained groups."""
    buffer = 0
    for m in metrics[1:]:
        kept = round(m["filter/kept_frac"] * m["filter/sampled_groups"])
        assert m["filter/batch_groups"] == min(groups_per_step, buffer + kept), m
        assert m["buffer/size"] == buffer + kept - m["filter/batch_groups"], m
        assert sum(r["step"] == m["step"] for r in rollouts) == n * m["filter/batch_groups"]
        buffer = m["buffer/size"]


def test_prime_end_to_end(toy, tmp_path):
    out = run_script(prime_cmd(toy, tmp_path, "e2e", "--total_steps", "3", "--log_rollouts_every", "1"))
    run = tmp_path / "e2e"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
    trained = [m for m in metrics[1:] if m["filter/batch_groups"] > 0]
    assert trained, "no step kept a prompt"
    for key in ("reward", "loss", "entropy", "clip_ratio", "grad_norm", "prm/loss", "prm/accuracy",
                "prm/reward_correct", "prm/reward_incorrect"):
        assert key in trained[0], key
    for key in ("filter/kept_frac", "filter/sampled_groups", "filter/sample_rounds", "buffer/size", "train/accuracy"):
        assert key in metrics[1], key
    assert math.isclose(trained[0]["prm/loss"], math.log(2), rel_tol=0.05)  # PRM == reference at the start
    assert "test accuracy" in out.stdout
    rollouts = read_jsonl(run / "rollouts.jsonl")
    check_batch_and_buffer(metrics, rollouts)
    assert {"completion", "correct", "process_reward"} <= set(rollouts[0])
    # only mixed groups are trained on: 1 to 3 of 4 correct (filter [0.2, 0.8])
    by_prompt = {}
    for r in rollouts:
        by_prompt.setdefault((r["step"], r["id"]), []).append(r["correct"])
    assert all(1 <= sum(c) <= 3 for c in by_prompt.values())
    # the checkpoint holds the PRM and its optimizer next to the policy's
    ckpt = run / "checkpoints" / "step_3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model_1.safetensors", "optimizer_1.bin"} <= names, names
    assert (run / "final" / "model.safetensors").exists()


def test_prime_on_code_rows(toy, tmp_path):
    """Code rows: outcomes come from the sandboxed tests. The toy model's programs all fail, so the
    filter keeps no group and no update is taken; sampling, scoring and logging run as on math."""
    data = tmp_path / "code.jsonl"
    run_script(["data_prep.py", "taco", "--source", str(REPO / "tests" / "fixtures" / "taco.jsonl"), "--out", str(data)])
    cmd = prime_cmd(toy, tmp_path, "code", "--total_steps", "2", "--oversample", "1", "--max_sample_rounds", "1")
    cmd[cmd.index("--train_file") + 1] = cmd[cmd.index("--test_file") + 1] = str(data)
    run_script(cmd)
    metrics = read_jsonl(tmp_path / "code" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["filter/sampled_groups"] == 4 and m["train/accuracy"] == 0.0
        assert m["rewards/errors"] == 0 and "rewards/code_timeouts" in m
    assert metrics[0]["eval/code_tests_passed"] == 0.0


def test_resume_logs_the_same_metrics(toy, tmp_path):
    """N steps straight == k steps, stop, --resume (PRM, its optimizer, data position and buffer restored)."""
    common = ("--total_steps", "4", "--save_every", "0", "--eval_every", "2", "--oversample", "3", "--filter_low", "0",
              "--prm_update", "before", "--reference", "old_policy", "--log_rollouts_every", "1")
    run_script(prime_cmd(toy, tmp_path, "straight", *common))
    run_script(prime_cmd(toy, tmp_path, "resumed", *common, "--stop_at_step", "2"))
    assert [m["step"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    run_script(prime_cmd(toy, tmp_path, "resumed", *common, "--resume"))

    def strip(m):
        return {k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}

    straight = [strip(m) for m in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    resumed = [strip(m) for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4]
    assert straight == resumed
    assert straight[2]["buffer/size"] > 0, "the buffer was empty at the stop: the test would not cover it"
    check_batch_and_buffer(read_jsonl(tmp_path / "straight" / "metrics.jsonl"),
                           read_jsonl(tmp_path / "straight" / "rollouts.jsonl"))
    assert any("prm/loss" in m for m in straight[3:])
    assert read_jsonl(tmp_path / "straight" / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")


def test_prime_on_two_processes_sharing_a_tensor_parallel_engine(toy, tmp_path):
    """torchrun, colocated vLLM with --vllm_tensor_parallel_size 2: both processes share one engine, so
    their sampling rounds must stay in step even when one of them has filled its batch. One sampling
    round per step: the ranks often keep different numbers of groups."""
    run_script(prime_cmd(toy, tmp_path, "ddp", "--total_steps", "3", "--granularity", "whole", "--oversample", "2",
                         "--max_sample_rounds", "1", "--log_rollouts_every", "1", "--sampler", "vllm",
                         "--vllm_tensor_parallel_size", "2"), launcher=torchrun())
    metrics = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[0]["eval/num_problems"] == 10
    # Every rank trains on the smallest rank's number of groups. Rank r reads prompts r, r + 2, ...
    # of the seeded stream, so each logged rollout tells its rank.
    rows = read_jsonl(toy / "train.jsonl")
    rank_of = {prompts_for_step(rows, k + 1, 1, 0)[0]["id"]: k % 2 for k in range(200)}
    rollouts = read_jsonl(tmp_path / "ddp" / "rollouts.jsonl")
    buffer, trimmed = 0, 0
    for m in metrics[1:]:
        groups = [sum(rank_of[r["id"]] == rank for r in rollouts if r["step"] == m["step"]) / 4 for rank in (0, 1)]
        assert groups == [m["filter/batch_groups"] / 2] * 2, (m, groups)
        # fewer trained than the ranks held together: one rank held more, and kept the rest in its buffer
        held = buffer + round(m["filter/kept_frac"] * m["filter/sampled_groups"])
        trimmed += m["filter/batch_groups"] < min(4, held)
        buffer = m["buffer/size"]
    assert trimmed and any(m["filter/batch_groups"] for m in metrics[1:]), "the run would not test the rule"
    state = read_jsonl(tmp_path / "ddp" / "checkpoints" / "step_3" / "trainer_state.json")[0]
    assert len(state["data_pos"]) == 2 and len(state["buffer"]) == 2  # each rank's stream and buffer


def test_outcome_only_rloo_under_accelerate_launch(toy, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    run_script(prime_cmd(toy, tmp_path, "rloo", "--total_steps", "2", "--process_reward_coef", "0",
                         "--no-whiten_advantages"), launcher=launcher)
    metrics = read_jsonl(tmp_path / "rloo" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert not any(k.startswith("prm/") for m in metrics for k in m)  # no PRM is loaded or trained
    assert "model_1.safetensors" not in {p.name for p in (tmp_path / "rloo" / "checkpoints" / "step_2").iterdir()}
