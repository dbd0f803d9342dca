"""RAFT / RAFT++ math with hand-computed numbers, and raft_pp.py end to end on the tiny toy task
(under `accelerate launch` and under a two-process torchrun)."""

import math
import sys

import pytest
import torch

from common import read_jsonl
from conftest import run_script, torchrun
from raft_pp import (aggregate_loss, correctness_rewards, kl_k3, loss_normalizer, micro_batches,
                     positive_samples, raft_pp_token_loss, raft_token_loss)

LN2, LN4 = math.log(2), math.log(4)


# --- rewards and selection --------------------------------------------------------------------
def test_correctness_rewards_both_scales():
    correct = torch.tensor([1.0, 0.0, 1.0])
    assert correctness_rewards(correct, -1.0).tolist() == [1.0, -1.0, 1.0]
    assert correctness_rewards(correct, 0.0).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("negative", [-1.0, 0.0])
def test_positive_samples_keep_every_tie_and_nothing_from_all_wrong_groups(negative):
    r = correctness_rewards(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), negative)
    assert positive_samples(r, negative).tolist() == [[True, False, True, False], [False] * 4, [True] * 4]


# --- losses -----------------------------------------------------------------------------------
# Three samples: 0 positive with p = 0.5, 0.25 (2 tokens); 1 positive with p = 0.5 (1 token, then
# padding); 2 not positive (2 tokens, p = 0.5 each).
LP = torch.log(torch.tensor([[0.5, 0.25], [0.5, 1.0], [0.5, 0.5]]))
COMPLETION = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
SELECTED = torch.tensor([True, True, False])
LOSS_MASK = COMPLETION * SELECTED[:, None]


@pytest.mark.parametrize("loss_type,count,expected", [
    # per-sequence means (ln2 + ln4)/2 = 1.0397 and ln2, then / |D|
    ("seq-mean-token-mean", "selected", ((LN2 + LN4) / 2 + LN2) / 2),  # |D| = 2 positive samples
    ("seq-mean-token-mean", "batch", ((LN2 + LN4) / 2 + LN2) / 3),     # |D| = all 3 samples
    ("token-mean", "selected", (LN2 + LN4 + LN2) / 3),                 # 3 positive tokens
    ("token-mean", "batch", (LN2 + LN4 + LN2) / 5),                    # 5 sampled tokens
])
def test_raft_loss_hand_numbers(loss_type, count, expected):
    norm = loss_normalizer(SELECTED if count == "selected" else torch.ones(3), COMPLETION, loss_type)
    loss = aggregate_loss(raft_token_loss(LP), LOSS_MASK, loss_type, norm)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_raft_pp_loss_hand_numbers():
    # ratios 1.5, 0.5, 1.0 on a positive sample; eps 0.2: -min(s, clip(s)) = -1.2 (clipped), -0.5, -1.0
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]])).requires_grad_()
    loss, high = raft_pp_token_loss(lp, torch.zeros(1, 3), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -1.0]]), atol=1e-6)
    assert high.tolist() == [[True, False, False]]
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.5, -1.0]]), atol=1e-6)  # no gradient where clipped
    # per-sequence token-mean, then / |D|: (-1.2 - 0.5 - 1.0) / 3 / 1
    agg = aggregate_loss(loss, torch.ones(1, 3), "seq-mean-token-mean", 1.0)
    assert math.isclose(agg.item(), -0.9, rel_tol=1e-6)


def test_raft_pp_on_policy_gradient_is_raft_gradient():
    """At the sampling policy (s = 1) RAFT++ and RAFT have the same gradient: RAFT++ only adds the
    importance ratio and its clip once the policy has moved (mini-batches, iterations)."""
    norm = loss_normalizer(SELECTED, COMPLETION, "seq-mean-token-mean")
    grads = []
    for algo in ("raft", "raft++"):
        lp = LP.clone().requires_grad_()
        token = raft_token_loss(lp) if algo == "raft" else raft_pp_token_loss(lp, lp.detach(), 0.2, 0.2)[0]
        aggregate_loss(token, LOSS_MASK, "seq-mean-token-mean", norm).backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[0], grads[1])
    # d/d lp of -(1/|D|)(1/|a|) lp: -1/(2*2) on sample 0, -1/(2*1) on sample 1, 0 elsewhere
    assert torch.allclose(grads[0], torch.tensor([[-0.25, -0.25], [-0.5, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("loss_type", ["seq-mean-token-mean", "token-mean"])
def test_micro_batches_and_processes_sum_to_the_batch_loss(loss_type):
    """The normalizer spans the optimizer batch (all micro-batches, all processes): summing the
    shares gives the loss of the whole batch, whatever the split."""
    torch.manual_seed(0)
    token_loss = torch.rand(7, 5)
    selected = torch.tensor([True, False, True, True, False, True, True])
    mask = (torch.rand(7, 5) > 0.3).float() * selected[:, None]
    norm = loss_normalizer(selected, torch.ones(7, 5), loss_type)
    whole = aggregate_loss(token_loss, mask, loss_type, norm)
    parts = sum(aggregate_loss(token_loss[i], mask[i], loss_type, norm) for i in micro_batches(torch.arange(7), 3))
    assert [len(i) for i in micro_batches(torch.arange(7), 3)] == [3, 3, 1]
    assert torch.allclose(whole, parts, atol=1e-6)


def test_a_fully_masked_sequence_of_d_still_counts_in_d():
    """seq-mean-token-mean counts every sequence of D, also one whose token mask is empty, as
    grpo_logprob.py does: (6/3 + 4 + 0) / 3 = 2.0. Counting only non-empty masks would give 3.0."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    norm = loss_normalizer(torch.ones(3), mask, "seq-mean-token-mean")
    assert norm == 3.0 and aggregate_loss(loss, mask, "seq-mean-token-mean", norm).item() == 2.0
    non_empty = loss_normalizer(mask.sum(1) > 0, mask, "seq-mean-token-mean")  # the other definition
    assert non_empty == 2.0 and aggregate_loss(loss, mask, "seq-mean-token-mean", non_empty).item() == 3.0
    assert loss_normalizer(torch.ones(3), mask, "token-mean") == 4.0  # token-mean: the unmasked tokens of D
    assert loss_normalizer(torch.tensor([True, True, False]), mask, "seq-mean-token-mean") == 2.0  # not in D


def test_kl_k3_hand_numbers():
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert math.isclose(kl_k3(lp, ref).item(), 0.5 + LN2 - 1, rel_tol=1e-5)  # exp(d) - d - 1, d = -ln 2


# --- the script end to end --------------------------------------------------------------------
def raft_cmd(toy, out, name, *extra):
    return ["raft_pp.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--sampler", "hf", "--total_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
            "--max_completion_length", "48", "--eval_limit", "10", *extra]


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]


def test_raft_pp_under_accelerate_launch(toy, tmp_path):
    out = run_script(raft_cmd(toy, tmp_path, "acc", "--mini_batches", "2", "--num_iterations", "2", "--kl_coef", "0.01",
                              "--entropy_coef", "0.01", "--micro_batch_size", "4", "--log_rollouts_every", "1"),
                     launcher=ACCELERATE, env={"HF_HUB_OFFLINE": "1"})
    run = tmp_path / "acc"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for key in ("reward", "train/accuracy", "entropy", "kl", "kept_prompts_frac",
                "positive_samples", "skipped_updates", "clip_ratio/high_mean", "loss", "grad_norm", "time/update"):
        assert key in metrics[1], key
    assert metrics[2]["kl"] > 0 and metrics[1]["entropy"] > 0  # the policy moved away from the starting model
    rollouts = read_jsonl(run / "rollouts.jsonl")
    assert len(rollouts) == 2 * 16
    for step in (1, 2):  # the logged counts are the positive samples of the step's rollouts
        mine = [r for r in rollouts if r["step"] == step]
        assert metrics[step]["positive_samples"] == sum(r["selected"] for r in mine) == sum(r["correct"] for r in mine)
    assert "test accuracy" in out.stdout and (run / "final" / "model.safetensors").exists()


def test_raft_on_two_processes_in_bf16_with_vllm(toy, tmp_path):
    """torchrun, colocated vLLM engines sampling in bf16, bf16 training weights."""
    run_script(raft_cmd(toy, tmp_path, "ddp", "--algo", "raft", "--sampler", "vllm", "--dtype", "bfloat16",
                        "--vllm_dtype", "bfloat16"), launcher=torchrun(), timeout=600)
    metrics = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["eval/num_problems"] == 10  # both ranks' shares gathered
    assert all(m["num_tokens"] > 0 and "positive_samples" in m for m in metrics[1:])
    # bf16 sampler and bf16 trainer: a real but small mismatch, logged every step
    assert all(0 < m["sampler/logprob_gap_mean"] < m["sampler/logprob_gap_max"] < 2.0 for m in metrics[1:])


TIMING_KEYS = ("time/", "tokens_per_second", "memory/")


def test_raft_on_two_processes_resume_equals_straight(toy, tmp_path):
    """torchrun, two processes: 2 steps straight == 1 step, stop, --resume, 1 more (every metric but timings
    and memory, the rollouts of both processes and the evaluations)."""
    # temperature 0.5: the tiny test model then gets some samples right, so that step 1 trains
    small = ("--temperature", "0.5", "--eval_limit", "6", "--log_rollouts_every", "1", "--save_every", "0", "--no-log_kl")
    run_script(raft_cmd(toy, tmp_path, "straight", *small), launcher=torchrun())
    run_script(raft_cmd(toy, tmp_path, "resumed", *small, "--stop_at_step", "1"), launcher=torchrun())
    assert [m["step"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [0, 1]
    run_script(raft_cmd(toy, tmp_path, "resumed", *small, "--resume"), launcher=torchrun())

    def strip(name):
        return [{k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}
                for m in read_jsonl(tmp_path / name / "metrics.jsonl")]

    assert [m["step"] for m in strip("resumed")] == [0, 1, 2] and strip("straight") == strip("resumed")
    step1 = strip("straight")[1]  # the weights the resumed run must restore moved at step 1
    assert step1["positive_samples"] > 0 and step1["skipped_updates"] == 0, step1
    assert read_jsonl(tmp_path / "straight" / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")
    assert len(read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")) == 2 * 4 * 4  # both processes' samples
    for name in ("step_000000.jsonl", "step_000002.jsonl"):
        assert read_jsonl(tmp_path / "straight" / "eval" / name) == read_jsonl(tmp_path / "resumed" / "eval" / name)
