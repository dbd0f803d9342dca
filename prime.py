"""PRIME: online implicit process rewards. Paper: "Process Reinforcement through Implicit Rewards"
(Cui et al. 2025, arXiv 2502.01456).

    python prime.py                                   # toy task, PRIME
    python prime.py --process_reward_coef 0           # the same run, outcome-only RLOO (no PRM)

One step: sample groups of n completions, keep the prompts whose group accuracy is in [0.2, 0.8]
(oversampling and a buffer of leftovers fill the batch), then
  implicit PRM  r_t = beta * (log pi_prm(y_t) - log pi_ref(y_t)), scored before the PRM's update (--prm_update)
  PRM loss      BCE(sigmoid(beta * sum_t (log pi_prm - log pi_ref)), outcome label in [0, 1])
  returns       leave-one-out per reward source (paper eq. 5): outcome r_o(i) - mean_{j!=i} r_o(j) on the
                last token, process r_t(i) - mean_{j!=i} rbar(j); each a return-to-go (gamma), summed
                (process weighted by --process_reward_coef), whitened over the batch's valid tokens
  policy        PPO mini-batch steps on -min(s_t A_t, clip(s_t, 1-eps, 1+eps) A_t), token-mean
Paper vs released code (--process_baseline code follows the code): the code feeds the leave-one-out step q_t without
beta (beta only scales the PRM loss), divided by the batch's largest |return-to-go| (see batch_norm), and its baseline
leaves out the token's own reward, not rbar(i) (see leave_one_out); the paper does not state the code's whitening.

The paper's setting (Qwen2.5-Math-7B SFT; Eurus-2-RL-Data), as a command line:
    accelerate launch prime.py --model PRIME-RL/Eurus-2-7B-SFT --train_file data/eurus_train.jsonl \\
        --test_file data/math500.jsonl --learning_rate 5e-7 --prm_learning_rate 1e-6 \\
        --prompts_per_step 256 --num_generations 4 --num_mini_batches 4 --max_completion_length 3072 \\
        --beta 0.05 --granularity token --prm_update after --reference frozen --gamma 1 \\
        --micro_batch_size 4 --dtype bfloat16 --gradient_checkpointing --run_name prime_eurus
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from common import (Rollout, Run, RunArgs, Score, StepStats, Timer, accumulate, add_logprob_gap, check_code_sandbox,
                    check_run, collate, encode_prompts, gather_floats, index_batch, load_model, logprob_gap_metrics,
                    logprob_timer, make_accelerator, make_evaluator, micro_batches, optimizer_step, pad_token_id,
                    parse_args, peak_memory, prompts_for_step, run_main, score_completions, setup_policy, start_sampler,
                    step_seed, token_logprobs, unwrap)


@dataclass
class Args(RunArgs):
    # --- run (output folder, model, data, vLLM engine, evaluation: common.RunArgs) ---
    run_name: str = "prime_toy"
    """name of the run folder under output_dir"""
    # --- sampling ---
    prompts_per_step: int = 16
    """prompts (groups) per update step after filtering, over all processes"""
    num_generations: int = 4
    """group size n: completions sampled per prompt (>= 2 for the leave-one-out baselines)"""
    max_completion_length: int = 64
    """maximum completion tokens"""
    temperature: float = 1.0
    """sampling temperature (the policy's PPO log-probs use the same; PRM and reference use 1)"""
    # --- prompt filter ---
    filter_low: float = 0.2
    """keep a prompt if the mean accuracy of its group is >= filter_low"""
    filter_high: float = 0.8
    """... and <= filter_high (the paper's [0.2, 0.8])"""
    oversample: int = 2
    """each sampling round draws oversample x the prompts still missing from the batch"""
    max_sample_rounds: int = 4
    """sampling rounds per step at most; if the batch is still short, train on what was kept (logged)"""
    # --- implicit PRM ---
    process_reward_coef: float = 1.0
    """weight of the process return in the summed return; 0 = outcome-only RLOO (no PRM, no reference loaded)"""
    beta: float = 0.05
    """implicit reward scale: r_t = beta * (log pi_prm(y_t) - log pi_ref(y_t))"""
    granularity: Literal["token", "whole"] = "token"
    """token (a reward on every token) or whole (the sequence's sum on its last token)"""
    reference: Literal["frozen", "old_policy"] = "frozen"
    """log pi_ref: frozen (the starting model) or old_policy (the policy's log-probs before this step's update)"""
    prm_update: Literal["after", "before"] = "after"
    """after (score with the PRM as it was, then update it: paper default) or before (update, then re-score)"""
    prm_learning_rate: float = 1e-5
    """AdamW learning rate of the PRM (paper, 7B: 1e-6; on the toy 1e-4 made the PRM drift and the policy worse)"""
    # --- advantages and policy update ---
    process_baseline: Literal["paper", "code"] = "paper"
    """process rewards of the returns: paper (eq. 5: r_t = beta q_t, baseline r_t(i) - mean_{j!=i} rbar(j)) or code (the released code: r_t = q_t / (batch max |sum_{s>=t} q_s| + 1e-6), baseline r_t(i) n/(n-1) - sum_j rbar(j)/(n-1))"""
    gamma: float = 1.0
    """discount of the return-to-go"""
    whiten_advantages: bool = True
    """whiten the summed returns over all valid tokens of the batch (reference code: on; the paper does not say)"""
    total_steps: int = 200
    """update steps"""
    learning_rate: float = 5e-5
    """AdamW learning rate of the policy (paper, 7B: 5e-7)"""
    weight_decay: float = 0.0
    """AdamW weight decay (policy and PRM)"""
    max_grad_norm: float = 1.0
    """gradient clipping (policy and PRM; 0: off)"""
    num_mini_batches: int = 4
    """optimizer steps per rollout batch, one per mini-batch, for the policy and for the PRM's single pass"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass; gradients accumulate over the mini-batch"""
    epsilon: float = 0.2
    """PPO clip range: ratio in [1 - epsilon, 1 + epsilon]"""


# --- the algorithm: pure functions, unit-tested in tests/test_prime.py ------------------------------------------
def implicit_process_rewards(prm_logprobs, ref_logprobs, mask, beta: float, granularity: str) -> torch.Tensor:
    """Per-token rewards [N, C] from log-probs [N, C]: r_t = beta * (log pi_prm - log pi_ref) on each
    valid token (token), or their sum placed on the last valid token (whole)."""
    r = beta * (prm_logprobs - ref_logprobs) * mask
    if granularity == "token":
        return r
    if granularity == "whole":
        return r.sum(1, keepdim=True) * last_token_mask(mask)
    raise ValueError(f"unknown granularity {granularity!r}")


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 on the last valid token of each row of a right-padded mask [N, C]."""
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return torch.zeros_like(mask).scatter_(1, last[:, None], 1.0) * (mask.sum(1, keepdim=True) > 0)


def prm_loss(prm_logprobs, ref_logprobs, mask, labels, beta: float) -> torch.Tensor:
    """Per-sequence BCE [N] of sigmoid(beta * sum_t (log pi_prm - log pi_ref)) against the outcome label in [0, 1]."""
    logits = beta * ((prm_logprobs - ref_logprobs) * mask).sum(1)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def keep_groups(correct: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Prompt filter: groups [G, n] of 0/1 outcomes whose mean accuracy lies in [low, high] -> bool [G]."""
    acc = correct.float().mean(1)
    return (acc >= low - 1e-9) & (acc <= high + 1e-9)


def leave_one_out(rewards, reward_mask, group_size: int, baseline: str = "paper") -> torch.Tensor:
    """Leave-one-out baseline of one reward source, rewards/reward_mask [N, C] with N = G * n.
    rbar(j) = mean of completion j's rewards over its reward_mask (outcome: reward_mask = the last token, so
    rbar(j) = r_o(j); process: the completion mask). Each reward r_t(i) becomes
      paper (eq. 5):         r_t(i) - mean_{j != i} rbar(j)
      code (released PRIME): r_t(i) * n/(n-1) - sum_j rbar(j) / (n-1) = r_t(i) - (sum_j rbar(j) - r_t(i)) / (n-1)
    The code leaves out the token's own reward rather than rbar(i). The two agree for the outcome (one reward per
    completion) and on a sequence's sum (its return at t = 0), not token by token."""
    rbar = (rewards * reward_mask).sum(1) / reward_mask.sum(1).clamp(min=1)
    groups = rbar.view(-1, group_size)
    if baseline == "paper":
        advantages = rewards - ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1, 1)
    elif baseline == "code":
        advantages = rewards * group_size / (group_size - 1) \
            - (groups.sum(1, keepdim=True) / (group_size - 1)).repeat_interleave(group_size, 0)
    else:
        raise ValueError(f"unknown process baseline {baseline!r}")
    return advantages * reward_mask


def peak_return(scores, mask) -> torch.Tensor:
    """max over the batch's rows and valid tokens of |sum_{s >= t} score_s|: the largest return-to-go
    (gamma 1) in magnitude, whatever --gamma is (the released code's reverse cumulative sum)."""
    return discounted_returns(scores, mask, 1.0).abs().max()


def batch_norm(scores, mask, peak: float | None = None) -> torch.Tensor:
    """The released code's process scores (prime_norm batch_norm): scores / (peak + 1e-6), peak = the largest
    |return-to-go| of the batch (over all processes when given; default this batch's), so that no process return
    exceeds 1 in magnitude. The code applies it to q_t = log pi_prm - log pi_ref without beta."""
    if peak is None:
        peak = peak_return(scores, mask).item()
    return scores / (peak + 1e-6) * mask


def discounted_returns(rewards, mask, gamma: float) -> torch.Tensor:
    """Return-to-go R_t = sum_{s >= t} gamma^(s-t) r_s over valid tokens, [N, C]."""
    out, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def whiten(values, mask, stats: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over valid tokens (unbiased var, as the reference code's masked_whiten).
    stats = (count, sum, sum of squares) over all processes; default: this batch's."""
    if stats is None:
        stats = whiten_stats(values, mask)
    count, total, sq = stats.double().tolist()
    mean = total / count
    var = max(sq / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return (values - mean) / (var + eps) ** 0.5 * mask


def whiten_stats(values, mask) -> torch.Tensor:
    return torch.stack([mask.sum(), (values * mask).sum(), (values * values * mask).sum()]).double()


def prm_pair_accuracy(seq_rewards, correct, group_size: int) -> tuple[float, int]:
    """Within each group, the (correct, incorrect) pairs the PRM ranks right: its sequence reward of the
    correct sample above the incorrect one's (ties count 1/2). Returns (pairs ranked right, pairs)."""
    right, pairs = 0.0, 0
    for r, c in zip(seq_rewards.view(-1, group_size), correct.view(-1, group_size)):
        diff = r[c > 0.5][:, None] - r[c <= 0.5][None, :]
        right += (diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()
        pairs += diff.numel()
    return right, pairs


def ppo_token_loss(logprobs, old_logprobs, advantages, eps: float):
    """Per-token PPO loss [N, C] -min(s A, clip(s, 1-eps, 1+eps) A), s = exp(lp - old), and the clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)
    return loss, ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps) & (advantages > 0))


def rank_prompts(rows, start: int, count: int, seed: int, rank: int, world: int) -> list[dict]:
    """Prompts start .. start+count-1 of this rank's stream: rank r reads every world-th prompt of the
    seeded epoch order of common.prompts_for_step, so ranks never share a prompt."""
    return [prompts_for_step(rows, i * world + rank + 1, 1, seed)[0] for i in range(start, start + count)]


def to_json(groups: list[dict]) -> list[dict]:
    return [dict(row=g["row"], rollouts=[asdict(r) for r in g["rollouts"]], scores=[asdict(s) for s in g["scores"]])
            for g in groups]


def from_json(groups: list[dict]) -> list[dict]:
    return [dict(row=g["row"], rollouts=[Rollout(**r) for r in g["rollouts"]], scores=[Score(**s) for s in g["scores"]])
            for g in groups]


# --- the update, exactly as main() runs it (tests/dist_update.py: the same weights on one process and on two) ---
def mini_batch_pass(model, optimizer, batch: dict, loss_of, size_of, args, accelerator, stats: StepStats,
                    prefix: str) -> float:
    """One pass over the batch in num_mini_batches optimizer steps. loss_of(mb) -> (summed loss, sums);
    the normalizer size_of(completion_mask) spans the mini-batch on all processes, and DDP averages
    gradients over processes, so each backpropagates world * its share. Returns the last grad norm."""
    world, grad_norm = accelerator.num_processes, 0.0
    order = torch.arange(len(batch["completion_mask"]), device=accelerator.device)
    for mb_rows in order.tensor_split(args.num_mini_batches):
        if len(mb_rows) == 0:  # fewer sequences than mini-batches (the same on every process)
            continue
        normalizer = max(accelerator.reduce(torch.tensor(float(size_of(batch["completion_mask"][mb_rows])),
                                                         device=accelerator.device), "sum").item(), 1.0)
        parts = micro_batches(mb_rows, args.micro_batch_size)
        for k, idx in enumerate(parts):
            with accumulate(accelerator, model, last=k == len(parts) - 1):
                loss, sums = loss_of(index_batch(batch, idx))
                accelerator.backward(loss / normalizer * world)
            stats.add(**{f"{prefix}loss": loss / normalizer / args.num_mini_batches},
                      **{f"{prefix}{name}": v for name, v in sums.items()})
        grad_norm = optimizer_step(accelerator, model, optimizer, None, args.max_grad_norm, stats)
    return grad_norm


def prm_micro_batch_loss(prm, mb: dict, beta: float) -> tuple:
    """The PRM's summed cross-entropy on a micro-batch (normalized by the mini-batch's sequence count)."""
    return prm_loss(token_logprobs(prm, mb), mb["ref_logprobs"], mb["completion_mask"], mb["labels"], beta).sum(), {}


def policy_micro_batch_loss(model, mb: dict, temperature: float, epsilon: float) -> tuple:
    """The policy's summed PPO token loss on a micro-batch (normalized by the mini-batch's token count),
    with the entropy, clipped and token sums for the metrics."""
    lp, entropy = token_logprobs(model, mb, temperature, with_entropy=True)
    loss, clipped = ppo_token_loss(lp, mb["old_logprobs"], mb["advantages"], epsilon)
    m = mb["completion_mask"]
    return (loss * m).sum(), dict(entropy=(entropy * m).sum(), clipped=(clipped * m).sum(), tokens=m.sum())


def logprobs_of(model, batch: dict, size: int, temperature: float = 1.0) -> torch.Tensor:
    """Token log-probs [N, C] of the batch's completions under `model`, no gradient, `size` rows at a time."""
    rows = torch.arange(len(batch["completion_mask"]), device=batch["completion_mask"].device)
    with torch.no_grad(), logprob_timer("logprobs"):
        return torch.cat([token_logprobs(model, index_batch(batch, i), temperature) for i in micro_batches(rows, size)])


def update(model, optimizer, batch: dict, args, accelerator, prm=None, prm_optimizer=None, ref=None) -> tuple:
    """Implicit process rewards, the PRM update (before or after scoring), leave-one-out returns per
    reward source, summed and whitened over all processes, then the PPO mini-batch pass of the policy.
    batch = collate(...) of whole groups plus "labels" [N] (the outcome, 0/1). Returns the metrics
    (reduced over processes) and the per-sequence process rewards [N] of this process's completions."""
    stats, n, mask, size = StepStats(), args.num_generations, batch["completion_mask"], args.micro_batch_size
    batch["old_logprobs"] = logprobs_of(model, batch, size, args.temperature)
    add_logprob_gap(stats, batch["old_logprobs"], batch["sampler_logprobs"], mask)
    token_rewards = torch.zeros_like(mask)
    if prm is not None:
        # log pi_ref: the frozen starting model, or the policy before this step's update (at temperature 1)
        batch["ref_logprobs"] = logprobs_of(ref, batch, size) if ref is not None else \
            batch["old_logprobs"] if args.temperature == 1.0 else logprobs_of(model, batch, size)

        def update_prm():
            loss_of = partial(prm_micro_batch_loss, prm, beta=args.beta)
            mini_batch_pass(prm, prm_optimizer, batch, loss_of, len, args, accelerator, stats, "prm_")

        if args.prm_update == "before":
            update_prm()
        prm_logprobs = logprobs_of(prm, batch, size)
        if args.prm_update == "after":
            update_prm()
        token_rewards = implicit_process_rewards(prm_logprobs, batch["ref_logprobs"], mask, args.beta, args.granularity)
    process_rewards = token_rewards
    if prm is not None and args.process_baseline == "code":  # q_t, no beta, over the batch's largest |return|
        q = implicit_process_rewards(prm_logprobs, batch["ref_logprobs"], mask, 1.0, args.granularity)
        process_rewards = batch_norm(q, mask, accelerator.reduce(peak_return(q, mask), "max").item())
    # --- advantages: leave-one-out per reward source, returns-to-go, summed, whitened ---
    last = last_token_mask(mask)
    outcome_returns = discounted_returns(leave_one_out(batch["labels"][:, None] * last, last, n), mask, args.gamma)
    process_returns = discounted_returns(leave_one_out(process_rewards, mask, n, args.process_baseline), mask,
                                         args.gamma)
    returns = outcome_returns + args.process_reward_coef * process_returns
    if args.whiten_advantages:
        returns = whiten(returns, mask, accelerator.reduce(whiten_stats(returns, mask), "sum"))
    batch["advantages"] = returns
    # --- update: PPO clip, token-mean over each mini-batch ---
    loss_of = partial(policy_micro_batch_loss, model, temperature=args.temperature, epsilon=args.epsilon)
    grad_norm = mini_batch_pass(model, optimizer, batch, loss_of, lambda m: m.sum(), args, accelerator, stats, "")
    stats.add(abs_advantage=(returns.abs() * mask).sum())
    t = stats.reduce(accelerator)
    tokens = max(t["tokens"], 1.0)
    metrics = {"loss": t["loss"], "entropy": t["entropy"] / tokens, "clip_ratio": t["clipped"] / tokens,
               "advantages/abs_mean": t["abs_advantage"] / tokens, "grad_norm": grad_norm,
               "train/skipped_nonfinite": t.get("skipped_nonfinite", 0.0), **logprob_gap_metrics(t)}
    if prm is not None:
        metrics["prm/loss"] = t["prm_loss"]
    return metrics, token_rewards.sum(1).cpu()


def main():
    args = parse_args(Args)
    accelerator = make_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed, device_specific=True)  # seed + process index
    # a user's mistakes end here, with one sentence each, before the run folder or a model exists
    tokenizer, train_rows, test_rows = check_run(
        args, accelerator, group="PRIME's leave-one-out baselines average a prompt's other samples")
    if any(r["task"] == "poem" for r in train_rows):
        raise SystemExit(f"{args.train_file}: poem rows have no correctness check; PRIME needs a verifiable task.")
    check_code_sandbox(train_rows + test_rows, args.allow_unsandboxed_code)
    use_prm = args.process_reward_coef != 0
    if use_prm and accelerator.distributed_type.name == "DEEPSPEED":
        raise SystemExit("prime.py trains two models (policy and PRM), and accelerate runs one DeepSpeed engine per "
                         "process: launch with configs/fsdp2.yaml, or pass --process_reward_coef 0 (RLOO, no PRM).")
    per_rank, n = args.prompts_per_step // world, args.num_generations
    # the policy, the frozen reference of the implicit PRM, and the PRM (a causal LM, trained): all from --model
    model, optimizer, _, ref = setup_policy(args, accelerator, None, use_prm and args.reference == "frozen")
    prm = prm_optimizer = None
    if use_prm:
        prm = load_model(args.model, args.dtype, accelerator, gradient_checkpointing=args.gradient_checkpointing)
        prm_optimizer = torch.optim.AdamW(prm.parameters(), lr=args.prm_learning_rate, weight_decay=args.weight_decay)
        prm, prm_optimizer = accelerator.prepare(prm, prm_optimizer)  # saved and restored with the policy
    run = Run(args, accelerator, resume=args.resume)
    start_step, data_pos, buffer = 0, 0, []  # this rank's position in its prompt stream, kept groups not yet used
    state = run.load_latest_checkpoint() if args.resume else {"step": 0}
    if state["step"]:
        if len(state["data_pos"]) != world:
            raise SystemExit(f"--resume: the checkpoint was written by {len(state['data_pos'])} processes; "
                             "resume with as many.")
        start_step, data_pos, buffer = state["step"], state["data_pos"][rank], from_json(state["buffer"][rank])
    sampler = start_sampler(args, accelerator, tokenizer, model, start_step)
    run_eval = make_evaluator(args, accelerator, sampler, tokenizer, test_rows, run)
    run.evaluate_start(run_eval, start_step)
    pad_id = pad_token_id(tokenizer)
    gathered = partial(gather_floats, accelerator)

    def global_sum(value) -> float:
        return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum").item()

    timer = Timer()
    bar = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps,
               disable=not accelerator.is_main_process, desc="prime")
    for step in bar:
        t_step = time.perf_counter()
        # --- rollout: leftovers first, then rounds of oversampled prompts until the batch is full ---
        batch_groups, buffer = buffer[:per_rank], buffer[per_rank:]
        sampled_correct, sampled_format, sampled_groups, kept_groups, rounds = [], [], 0, 0, 0
        reward_errors = code_timeouts = 0
        with timer("sample"):
            sampler.wake_up()
            # global rounds (a full process samples nothing): ranks sharing a tensor-parallel engine generate together
            while gathered([per_rank - len(batch_groups)]).max() > 0 and rounds < args.max_sample_rounds:
                rows = rank_prompts(train_rows, data_pos, args.oversample * (per_rank - len(batch_groups)),
                                    args.seed, rank, world)
                data_pos += len(rows)
                groups = sampler.generate(encode_prompts(tokenizer, rows), n, args.temperature,
                                          args.max_completion_length, seed=step_seed(args.seed, step, 0, rounds))
                scores, errors = score_completions([r for r in rows for _ in range(n)],
                                                   [c.text for g in groups for c in g])
                reward_errors, code_timeouts = reward_errors + errors, code_timeouts + sum(s.timed_out for s in scores)
                correct = torch.tensor([s.correct for s in scores]).view(len(rows), n)
                keep = keep_groups(correct, args.filter_low, args.filter_high)
                sampled_correct += correct.flatten().tolist()
                sampled_format += [s.format for s in scores]
                sampled_groups, kept_groups = sampled_groups + len(rows), kept_groups + keep.sum().item()
                rounds += 1
                for i in keep.nonzero().flatten().tolist():
                    group = dict(row=rows[i], rollouts=groups[i], scores=scores[i * n:(i + 1) * n])
                    (batch_groups if len(batch_groups) < per_rank else buffer).append(group)
            sampler.sleep()
        # every rank trains on the same number of groups, so that all join each collective
        size = int(gathered([len(batch_groups)]).min().item())
        batch_groups, buffer = batch_groups[:size], batch_groups[size:] + buffer
        metrics = {}
        if size > 0:
            # --- update: PRM and policy on the kept groups ---
            rollouts = [r for g in batch_groups for r in g["rollouts"]]
            with timer("update"):
                batch = collate(rollouts, pad_id, accelerator.device)
                batch["labels"] = torch.tensor([s.correct for g in batch_groups for s in g["scores"]],
                                               device=accelerator.device)
                metrics, seq_rewards = update(model, optimizer, batch, args, accelerator, prm, prm_optimizer, ref)
            with timer("push"):
                sampler.wake_up()
                sampler.push_weights(unwrap(model))
            # --- logging ---
            labels = batch["labels"]
            lengths = gathered([len(r.completion_ids) for r in rollouts])
            metrics.update({
                "reward": gathered(labels).mean().item(),
                "completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
                "completions/clipped_ratio": gathered(batch["truncated"].float()).mean().item(),
                "num_tokens": lengths.sum().item(),
            })
            if use_prm:
                right, pairs = prm_pair_accuracy(seq_rewards, labels.cpu(), n)
                is_correct = labels.cpu() > 0.5
                metrics["prm/accuracy"] = global_sum(right) / max(global_sum(pairs), 1.0)
                for name, sel in (("correct", is_correct), ("incorrect", ~is_correct)):
                    metrics[f"prm/reward_{name}"] = global_sum(seq_rewards[sel].sum()) / max(global_sum(sel.sum()), 1)
            run.log_step_rollouts(step, [{"id": g["row"]["id"], "prompt": g["row"]["prompt"], "completion": r.text,
                                          "correct": s.correct, "process_reward": seq_rewards[i * n + j].item()}
                                         for i, g in enumerate(batch_groups)
                                         for j, (r, s) in enumerate(zip(g["rollouts"], g["scores"]))])
        # ranks sample different numbers of completions: sums, not gathers (which need equal sizes)
        sampled = global_sum(len(sampled_correct))
        metrics.update({
            "train/accuracy": global_sum(sum(sampled_correct)) / sampled if sampled else float("nan"),
            "train/format_rate": global_sum(sum(sampled_format)) / sampled if sampled else float("nan"),
            "rewards/errors": global_sum(reward_errors), "rewards/code_timeouts": global_sum(code_timeouts),
            "filter/kept_frac": global_sum(kept_groups) / max(global_sum(sampled_groups), 1.0),
            "filter/sampled_groups": global_sum(sampled_groups), "filter/batch_groups": size * world,
            "filter/sample_rounds": rounds, "buffer/size": global_sum(len(buffer)),
            **timer.pop(), **logprob_timer.pop(), **peak_memory(),
        })
        metrics["tokens_per_second"] = metrics.get("num_tokens", 0) / (time.perf_counter() - t_step)
        bar.set_postfix(acc=f"{metrics['train/accuracy']:.2f}", kept=f"{metrics['filter/kept_frac']:.2f}")
        # each rank's data position and buffer, gathered: accelerate writes from the main process only
        if run.end_step(step, metrics, run_eval, checkpoint_extra=lambda: dict(
                data_pos=gather_object([data_pos]), buffer=gather_object([to_json(buffer)]))):
            return
    run.finish_training(model, tokenizer)


if __name__ == "__main__":
    run_main(main)
