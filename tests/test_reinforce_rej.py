"""Reinforce / Reinforce-rej math with hand-computed numbers (loss, filtering, normalization after
filtering), the DDP gradient with a process whose prompts were all removed, and reinforce_rej.py end
to end on the tiny toy task (under `accelerate launch` and under a two-process torchrun)."""

import json
import math
import sys

import torch

from common import read_jsonl
from conftest import free_port, run_script
from reinforce_rej import (aggregate_loss, correctness_rewards, loss_normalizer, mixed_prompts,
                           reinforce_token_loss, training_batch)


# --- filtering --------------------------------------------------------------------------------
def test_mixed_prompts_drop_all_correct_and_all_wrong():
    correct = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert mixed_prompts(correct).tolist() == [True, False, False, True]
    assert mixed_prompts(torch.tensor([[1.0], [0.0]])).tolist() == [False, False]  # one sample: never mixed


# --- the loss ---------------------------------------------------------------------------------
def test_reinforce_loss_hand_numbers():
    # ratios 1.5, 0.5, 1.0 with r = +1 (row 0) and r = -1 (row 1); eps 0.2
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_()
    loss, low, high = reinforce_token_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.2, 0.2)
    # r=+1: -min(s, clip(s)) -> -1.2 (clipped), -0.5, -1.0;  r=-1: -min(-s, -clip(s)) -> 1.5, 0.8 (clipped), 1.0
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -1.0], [1.5, 0.8, 1.0]]), atol=1e-6)
    assert high.tolist() == [[True, False, False], [False, False, False]]
    assert low.tolist() == [[False, False, False], [False, True, False]]
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.5, -1.0], [1.5, 0.0, 1.0]]), atol=1e-6)
    # a reward of 0 (a wrong answer with --negative_reward 0) has no gradient: none of its tokens counts as clipped,
    # whatever its ratio; nor does a reward of 0.5 below (only a negative reward is clipped below)
    _, low, high = reinforce_token_loss(lp.detach(), torch.zeros(2, 3), torch.tensor([0.0, 0.5]), 0.2, 0.2)
    assert not low.any() and high.tolist() == [[False, False, False], [True, False, False]]


def test_training_batch_masks_the_removed_prompts_samples():
    from common import Rollout
    rollouts = [Rollout([1, 2], [3, 4, 5], [0.0] * 3, "", "stop"), Rollout([1, 2], [6], [0.0], "", "stop")]
    batch = training_batch(rollouts, torch.tensor([1.0, -1.0]), torch.tensor([False, True]), 0, "cpu")
    assert batch["loss_mask"].tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_zero_one_rewards_give_wrong_answers_no_gradient():
    """The released code's {0, 1}: a wrong answer's reward is 0, so its loss and gradient vanish."""
    rewards = correctness_rewards(torch.tensor([1.0, 0.0]), 0.0)
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_()
    loss, _, _ = reinforce_token_loss(lp, lp.detach(), rewards, 0.2, 0.2)
    loss.sum().backward()
    assert lp.grad[1].tolist() == [0.0, 0.0] and lp.grad[0].tolist() == [-1.0, -1.0]


# Three prompts x 3 samples, on policy (s = 1, so l_t = -r): A = [+1, +1, -1] (mixed), B all wrong,
# C = [+1, +1, -1] (mixed). Sample lengths: A 2, 1, 1 tokens; B and C 1 token each.
CORRECT = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
REWARDS = correctness_rewards(CORRECT, -1.0).flatten()
COMPLETION = torch.tensor([[1.0, 1.0]] + [[1.0, 0.0]] * 8)


def test_filtering_removes_prompts_and_the_normalizer_counts_only_kept_samples():
    kept = mixed_prompts(CORRECT).repeat_interleave(3).float()
    assert kept.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    mask = COMPLETION * kept[:, None]
    everything = torch.ones(9)
    lp = torch.full((9, 2), -0.7, requires_grad=True)
    token_loss, _, _ = reinforce_token_loss(lp, lp.detach(), REWARDS, 0.2, 0.2)
    norm = loss_normalizer(kept, COMPLETION, "seq-mean-token-mean")
    assert norm == 6  # |D| = the 6 samples of A and C
    loss = aggregate_loss(token_loss, mask, "seq-mean-token-mean", norm)
    # sum of per-sequence means of -r over the kept samples: -(1 + 1 - 1) * 2 = -2; / 6
    assert math.isclose(loss.item(), -2 / 6, rel_tol=1e-6)
    loss.backward()
    # d/d lp_t = -r / (|a| |D|): A's first sample has 2 tokens -> -1/12 each; removed prompt B -> 0
    assert torch.allclose(lp.grad[0], torch.tensor([-1 / 12, -1 / 12]))
    assert torch.allclose(lp.grad[2], torch.tensor([1 / 6, 0.0]))
    assert torch.all(lp.grad[3:6] == 0)
    # the same as the smaller batch with B physically removed
    rows = torch.tensor([0, 1, 2, 6, 7, 8])
    small = aggregate_loss(token_loss.detach()[rows], COMPLETION[rows], "seq-mean-token-mean",
                           loss_normalizer(everything[rows], COMPLETION[rows], "seq-mean-token-mean"))
    assert math.isclose(small.item(), loss.item(), rel_tol=1e-6)
    # zeroing instead (B's rewards set to 0, B still counted in |D| = 9) would give -2/9
    zeroed = aggregate_loss(token_loss.detach() * kept[:, None], COMPLETION, "seq-mean-token-mean",
                            loss_normalizer(everything, COMPLETION, "seq-mean-token-mean"))
    assert math.isclose(zeroed.item(), -2 / 9, rel_tol=1e-6)
    # vanilla Reinforce keeps B, whose three -1 rewards push the loss to (-2 + 3) / 9
    vanilla = aggregate_loss(token_loss.detach(), COMPLETION, "seq-mean-token-mean", 9)
    assert math.isclose(vanilla.item(), 1 / 9, rel_tol=1e-6)
    # token-mean after filtering: sum over kept tokens / 7 kept tokens = (-1 -1 -1 +1 -1 -1 +1) / 7
    assert math.isclose(aggregate_loss(token_loss.detach(), mask, "token-mean",
                                       loss_normalizer(kept, COMPLETION, "token-mean")).item(), -3 / 7, rel_tol=1e-6)


def test_a_fully_masked_sequence_of_d_still_counts_in_d():
    """seq-mean-token-mean counts every kept sample, also one whose token mask is empty, as
    grpo_logprob.py does: (6/3 + 4 + 0) / 3 = 2.0. Counting only non-empty masks would give 3.0."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    norm = loss_normalizer(torch.ones(3), mask, "seq-mean-token-mean")
    assert norm == 3.0 and aggregate_loss(loss, mask, "seq-mean-token-mean", norm).item() == 2.0
    non_empty = loss_normalizer(mask.sum(1) > 0, mask, "seq-mean-token-mean")  # the other definition
    assert non_empty == 2.0 and aggregate_loss(loss, mask, "seq-mean-token-mean", non_empty).item() == 3.0


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]


# --- the script end to end --------------------------------------------------------------------
def rej_cmd(toy, out, name, *extra):
    return ["reinforce_rej.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--total_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
            "--max_completion_length", "48", "--eval_limit", "10", "--log_rollouts_every", "1", *extra]


def test_reinforce_under_accelerate_launch_with_vllm(toy, tmp_path):
    out = run_script(rej_cmd(toy, tmp_path, "acc", "--algo", "reinforce", "--sampler", "vllm", "--kl_coef", "0.01",
                             "--entropy_coef", "0.01", "--num_iterations", "2"),
                     launcher=ACCELERATE, env={"HF_HUB_OFFLINE": "1"})
    metrics = read_jsonl(tmp_path / "acc" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for key in ("reward", "entropy", "kl", "kept_prompts_frac", "used_samples", "positive_samples",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "loss", "grad_norm"):
        assert key in metrics[1], key
    assert all(m["kept_prompts_frac"] == 1.0 and m["used_samples"] == 16 for m in metrics[1:])  # no filter
    assert metrics[1]["reward"] == 2 * metrics[1]["train/accuracy"] - 1  # rewards in {-1, +1}
    assert metrics[2]["kl"] > 0 and "test accuracy" in out.stdout


def test_reinforce_rej_on_two_processes_in_mixed_precision_with_vllm(toy, tmp_path):
    """accelerate launch with 2 processes and --mixed_precision bf16 (bf16 autocast over float32 weights),
    colocated vLLM engines sampling in bf16. Every other training row has a gold answer no completion
    gives: those prompts are all wrong and must be dropped; the filter keeps the mixed ones."""
    data = tmp_path / "half_unreachable.jsonl"
    rows = [json.loads(line) for line in (toy / "train.jsonl").read_text().splitlines()[:100]]
    data.write_text("".join(json.dumps({**r, "answer": "123456789"} if i % 2 else r) + "\n" for i, r in enumerate(rows)))
    unreachable = {r["id"] for i, r in enumerate(rows) if i % 2}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                "--mixed_precision", "bf16", "--main_process_port", str(free_port())]
    cmd = rej_cmd(toy, tmp_path, "ddp", "--sampler", "vllm", "--vllm_dtype", "bfloat16")
    cmd[cmd.index("--train_file") + 1] = str(data)
    run_script(cmd, launcher=launcher, timeout=600)
    metrics = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2] and metrics[0]["eval/num_problems"] == 10
    rollouts = read_jsonl(tmp_path / "ddp" / "rollouts.jsonl")
    kept_ids, dropped_ids = set(), set()
    for step in (1, 2):  # the logged filter counts agree with the rollouts of both processes
        by_prompt = {}
        for r in (r for r in rollouts if r["step"] == step):
            by_prompt.setdefault(r["id"], []).append(r)
        assert len(by_prompt) == 4 and all(len(g) == 4 for g in by_prompt.values())
        mixed = [g for g in by_prompt.values() if 0 < sum(r["correct"] for r in g) < len(g)]
        assert all(r["kept"] == (g in mixed) for g in by_prompt.values() for r in g)
        kept_ids |= {g[0]["id"] for g in mixed}
        dropped_ids |= {i for i, g in by_prompt.items() if g not in mixed}
        assert metrics[step]["kept_prompts_frac"] == len(mixed) / 4
        assert metrics[step]["used_samples"] == 4 * len(mixed)
        assert metrics[step]["positive_samples"] == sum(r["correct"] for g in mixed for r in g)
        assert 0 < metrics[step]["sampler/logprob_gap_mean"] < metrics[step]["sampler/logprob_gap_max"] < 2.0
    # what the filter did: it dropped every unreachable prompt drawn, and kept some
    assert unreachable & dropped_ids and not unreachable & kept_ids
    assert kept_ids, "no mixed group in two steps: the filter kept nothing, so this run shows nothing it keeps"


def test_reinforce_rej_skips_the_update_when_every_prompt_is_removed(toy, tmp_path):
    """Gold answers no completion gives: every sample is wrong, every prompt is all-wrong and removed, so
    nothing is left to train on; no optimizer step is taken (AdamW would still move the weights on its
    state). The rollouts show what the filter dropped: every sample, each with reward -1."""
    unreachable = tmp_path / "unreachable.jsonl"
    rows = [json.loads(line) for line in (toy / "train.jsonl").read_text().splitlines()[:50]]
    unreachable.write_text("".join(json.dumps({**r, "answer": "123456789"}) + "\n" for r in rows))
    cmd = rej_cmd(toy, tmp_path, "empty", "--sampler", "hf", "--num_generations", "2", "--total_steps", "1",
                  "--eval_limit", "4", "--num_iterations", "2")
    cmd[cmd.index("--train_file") + 1] = str(unreachable)
    run_script(cmd)
    metrics = read_jsonl(tmp_path / "empty" / "metrics.jsonl")
    assert metrics[1]["kept_prompts_frac"] == 0 and metrics[1]["used_samples"] == 0
    assert metrics[1]["skipped_updates"] == 2 and metrics[1]["loss"] == 0  # both iterations skipped
    rollouts = read_jsonl(tmp_path / "empty" / "rollouts.jsonl")
    assert len(rollouts) == 8 and all(r["kept"] is False and r["reward"] == -1 and r["correct"] == 0 for r in rollouts)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "empty" / "final").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
