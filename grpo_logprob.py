"""GRPO with rule-based rewards and log-prob based rewards.

    python grpo_logprob.py                                   # toy task, rule reward (the quickstart)
    accelerate launch grpo_logprob.py --model Qwen/Qwen2.5-Math-1.5B --train_file data/gsm8k_train.jsonl ...

One step: sample a group of n completions per prompt, score them, normalize rewards within the group
(advantages), then take clipped policy-gradient steps. With s_t = exp(lp_t - old_t) per token:
  A_i = (r_i - mean_group(r)) / (std_group(r) + eps)          (--scale_rewards: group, batch or none)
  l_t = -min(s_t A, clip(s_t, 1 - eps_low, 1 + eps_high) A) + beta * k3,  k3 = exp(ref_t - lp_t) - (ref_t - lp_t) - 1
  loss = token-mean: sum_t l_t / tokens of the batch;  seq-mean-token-mean: mean over completions of
         their token mean;  seq-mean-token-sum-norm: sum_t l_t / (completions * max_completion_length)
Papers: GRPO, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
(arXiv 2402.03300); clip-higher and token-mean, "DAPO: An Open-Source LLM Reinforcement Learning System
at Scale" (arXiv 2503.14476); no std and sum-norm, "Understanding R1-Zero-Like Training: A Critical
Perspective" (Dr. GRPO, arXiv 2503.20783). The reference implementations use the unbiased std, as here.

Log-prob reward ("Eliciting Reasoning in LLMs Using Logprob-Based Rewards"): the policy's own
R = sum_t log pi(<answer>gold</answer>_t | prompt + reasoning + "</think>\n"), no gradient; the loss
then covers the reasoning tokens only, as the reward ignores the written answer. Its released code
differs in three defects this file does not repeat (tests/test_grpo.py): an end-of-reasoning marker
that never matched (reasoning_mask), an inverted reward sign (answer_logprob_score), and reasoning
searched for where it never is (scoring_texts). A frozen scorer's perplexity rewards: perplexity_rewards.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from common import (POEM_WEIGHTS, Run, RunArgs, StepStats, Timer, accumulate, add_logprob_gap, answer_style,
                    check_code_sandbox, check_run, collate, collate_ids, encode_prompts, gather_floats, index_batch,
                    is_sharded, logprob_gap_metrics, logprob_timer, make_accelerator, make_evaluator, micro_batches,
                    number, optimizer_step, pad_token_id, parse_args, peak_memory, prompts_for_step, render_prompt,
                    run_main, score_completions, setup_policy, shard, start_sampler, step_seed, token_logprobs, unwrap)


@dataclass
class Args(RunArgs):
    # --- run (output folder, model, data, vLLM engine, evaluation: common.RunArgs) ---
    run_name: str = "grpo_toy"
    """name of the run folder under output_dir"""
    # --- sampling ---
    prompts_per_step: int = 16
    """prompts per optimizer batch, over all processes"""
    num_generations: int = 8
    """group size: completions sampled per prompt"""
    max_completion_length: int = 64
    """maximum completion tokens"""
    temperature: float = 1.0
    """sampling temperature (the training log-probs use the same)"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    # --- reward ---
    reward: str = "correct=1,format=0.1"
    """weighted sum of reward terms name=weight: correct, format (rule based), code (share of a code row's tests passed), poem (poem rule reward: similarity, form, rhyme, syllables); logprob (log-prob of the reference answer after the reasoning); ppl_relative, ppl_absolute, ppl_hybrid (perplexity rewards of a frozen scorer)"""
    logprob_variant: Literal["sum", "mean", "prob"] = "sum"
    """logprob reward: sum (of token log-probs), mean (per token), prob (mean token probability, RLPR)"""
    logprob_debias: bool = False
    """logprob reward: subtract the same score with no reasoning (VR-CLI / RLPR), same answer cue on both sides"""
    logprob_scorer: Literal["policy", "initial"] = "policy"
    """who scores the logprob reward: policy (current weights, no gradient) or initial (frozen starting model)"""
    reward_norm: Literal["none", "zscore", "minmax"] = "none"
    """normalize each reward term before weighting: none, zscore, or minmax"""
    reward_norm_scope: Literal["group", "batch"] = "group"
    """the set a term is normalized over: group (the prompt's samples) or batch (this process's batch)"""
    reasoning_only_loss: Literal["auto", "on", "off"] = "auto"
    """train only the reasoning tokens (through the end-of-reasoning marker): on, off, or auto (on when every reward term ignores the written answer: logprob and ppl_*)"""
    # --- optimization ---
    total_steps: int = 200
    """optimizer steps"""
    learning_rate: float = 5e-5
    """AdamW learning rate (real 1.5B-7B models: about 1e-6)"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant or cosine (decay to 0 at the last optimizer step), both after a linear warmup from 0"""
    warmup_steps: int = 0
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass; gradients accumulate over the step"""
    num_iterations: int = 1
    """optimizer steps on each sampled batch (>1: old log-probs are recomputed after sampling)"""
    epsilon: float = 0.2
    """clip range below: ratio >= 1 - epsilon"""
    epsilon_high: float = 0.2
    """clip range above: ratio <= 1 + epsilon_high (DAPO clip-higher: 0.28)"""
    loss_type: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean (DAPO), seq-mean-token-mean (original GRPO), seq-mean-token-sum-norm (Dr. GRPO)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantage std: group, batch, or none (Dr. GRPO)"""
    beta: float = 0.0
    """KL (k3) weight to the starting model; 0 loads no reference model"""
    mask_truncated_completions: bool = False
    """give no gradient to completions cut at max_completion_length"""
    is_correction: Literal["none", "truncate", "mask"] = "none"
    """sampler/trainer mismatch correction: none, truncate (multiply by min(rho, is_cap)), mask (rho, zeroed outside [is_floor, is_cap])"""
    is_level: Literal["token", "sequence"] = "token"
    """importance ratio rho = exp(old_trainer - old_sampler) per token, or per sequence (product over its tokens)"""
    is_cap: float = 2.0
    """upper bound C of rho"""
    is_floor: float = 0.5
    """lower bound of rho for --is_correction mask"""


# ----------------------------------------------------------------------------------------------
# the algorithm: pure functions, unit-tested in tests/test_grpo.py
# ----------------------------------------------------------------------------------------------
def parse_reward_weights(spec: str, known: tuple[str, ...]) -> dict[str, float]:
    """'correct=1,format=0.1' -> {'correct': 1.0, 'format': 0.1}."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = math.nan
        if name not in known or not math.isfinite(weights[name]):
            raise SystemExit(f"--reward {spec!r}: each term is name=weight with name in {list(known)} and a number "
                             "as weight.")
    return weights


RULE_TERMS = ("correct", "format", "code", "poem")
ANSWER_BLIND_TERMS = ("logprob", "ppl_relative", "ppl_absolute", "ppl_hybrid")  # ignore the written answer


# The end of the reasoning in the R1 format. The log-prob reward paper's code wrote it "<\think>", where
# "\t" is a TAB: it never matched, and almost every completion was masked out (tests/test_grpo.py).
END_OF_REASONING = "</think>"
# Per answer style: (where the reasoning ends, the cue the reference answer is scored after, how the task
# writes that answer). tag: R1's </think> then <answer>; boxed: the final \boxed{ opens; gsm8k: the final
# "#### N" line (a small instruct model's native format).
REASONING_END = {"tag": (END_OF_REASONING, END_OF_REASONING + "\n", "<answer>{}</answer>"),
                 "boxed": ("\\boxed{", "\\boxed{", "{}}}"),
                 "gsm8k": ("####", "#### ", "{}")}


def reasoning_end(style: str) -> tuple[str, str, str]:
    """REASONING_END of an answer style; code rows take boxed's (a program has no reference answer to score)."""
    return REASONING_END.get(style, REASONING_END["boxed"])


def reasoning_token_count(tokenizer, completion_ids: list[int], marker: str = END_OF_REASONING) -> int | None:
    """Number of leading completion tokens up to and including the end-of-reasoning marker; None without it.

    The smallest k such that decode(ids[:k]) contains the marker, found on characters (binary search:
    decoded prefixes only grow), so it works however the tokenizer splits "</think>".
    """
    def has_marker(k: int) -> bool:
        return marker in tokenizer.decode(completion_ids[:k], skip_special_tokens=False)

    if not completion_ids or not has_marker(len(completion_ids)):
        return None
    lo, hi = 1, len(completion_ids)  # has_marker(hi) is True
    while lo < hi:
        mid = (lo + hi) // 2
        if has_marker(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def reasoning_mask(tokenizer, rollouts, width: int, marker: str | list[str] = END_OF_REASONING
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, width] mask of the reasoning tokens (marker included), and a [N] bool: marker found. `marker`:
    one for all, or one per rollout (its row's answer style: REASONING_END). A completion without the
    marker gets an all-zero row: no policy gradient (fill_failed sets its reward)."""
    markers = [marker] * len(rollouts) if isinstance(marker, str) else marker
    mask = torch.zeros(len(rollouts), width)
    found = torch.zeros(len(rollouts), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rollouts, markers)):
        k = reasoning_token_count(tokenizer, r.completion_ids, m)
        if k is not None:
            mask[i, :k] = 1.0
            found[i] = True
    return mask, found


def scoring_texts(completion: str, answer: str, style: str) -> tuple[str | None, str, str]:
    """(reasoning, cue, continuation) for scoring the reference answer after a completion's reasoning.

    The completion starts inside the reasoning (the prompt prefills "<think>"), so the reasoning is
    everything before the end-of-reasoning marker (REASONING_END of the style). The log-prob reward
    paper's code searched the completion for "<think>", found nothing, and gave every member of a group
    the same reward. The reference answer is wrapped as the task writes answers. reasoning is None when
    the marker is missing.
    """
    marker, cue, written = reasoning_end(style)
    end = completion.find(marker)
    return (None if end < 0 else completion[:end]), cue, written.format(answer)


def answer_logprob_score(logprobs: torch.Tensor, variant: str) -> float:
    """One number from the per-token log-probs of the reference answer: larger = more likely.

    sum: sum_t log p (default; the paper's code min-max scaled |sum_t log p|, which ranks the least
         likely answer highest)
    mean: mean_t log p
    prob: mean_t p ("RLPR: Extrapolating RLVR to General Domains without Verifiers", arXiv 2506.18254)
    """
    if variant == "sum":
        return logprobs.sum().item()
    if variant == "mean":
        return logprobs.mean().item()
    if variant == "prob":
        return logprobs.exp().mean().item()
    raise ValueError(f"unknown logprob variant {variant!r}")


def perplexity_rewards(lp_reasoning: torch.Tensor, lp_baseline: torch.Tensor) -> dict[str, float]:
    """The perplexity rewards of "Designing Good Rewards for RL on LLMs" from the reference answer's
    token log-probs with the reasoning (improved) and without it (baseline), the same answer cue on both
    (the paper cues the improved prompt only, which biases relative).

    PPL = exp(-mean_t log p);  relative = max(0, 1 - PPL_improved / PPL_baseline);
    absolute = 1 / PPL_improved;  hybrid = (relative + absolute) / 2.
    """
    ppl_improved = math.exp(-lp_reasoning.mean().item())
    ppl_baseline = math.exp(-lp_baseline.mean().item())
    relative = max(0.0, 1.0 - ppl_improved / ppl_baseline)
    absolute = 1.0 / ppl_improved
    return {"ppl_relative": relative, "ppl_absolute": absolute, "ppl_hybrid": (relative + absolute) / 2}


def fill_failed(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rewards [G, n] where valid [G, n] is False (no end-of-reasoning marker) get their group's
    lowest valid reward, so that failing to close the reasoning never pays; 0 if none is valid."""
    big = torch.finfo(rewards.dtype).max
    low = torch.where(valid, rewards, torch.full_like(rewards, big)).min(1, keepdim=True).values
    low = torch.where(low == big, torch.zeros_like(low), low)
    return torch.where(valid, rewards, low.expand_as(rewards))


def normalize_rewards(rewards: torch.Tensor, how: str, scope: str, eps: float = 1e-6) -> torch.Tensor:
    """Rescale one reward term [G, n] before the terms are weighted and summed.

    zscore: (r - mean) / (std + eps);  minmax: (r - min) / (max - min); both exactly 0 where all are
    equal (max == min, the test group_advantages uses): a float32 mean of eight equal log-prob rewards
    of -110.537 is off by one unit in the last place, and std + eps then made that -0.88 for each.
    scope: over each group (the prompt's samples) or over the whole batch.
    """
    if how == "none":
        return rewards
    dims = {"group": (1,), "batch": (0, 1)}[scope]
    r = rewards.double()
    low, high = r.amin(dims, keepdim=True), r.amax(dims, keepdim=True)
    if how == "zscore":
        std = r.std(dims, keepdim=True).nan_to_num(0.0)  # a single sample has no spread
        scaled = (r - r.mean(dims, keepdim=True)) / (std + eps)
    elif how == "minmax":
        scaled = (r - low) / (high - low).clamp(min=eps)
    else:
        raise ValueError(f"unknown reward normalization {how!r}")
    return torch.where(high == low, 0.0, scaled).to(rewards.dtype)


def importance_weights(old_trainer, old_sampler, mask, mode: str, level: str, cap: float, floor: float):
    """Truncated importance sampling between the sampler (vLLM) and the trainer: rho = exp(old_trainer
    - old_sampler) per token, or per sequence (exp of the sum over its masked tokens).

    truncate: min(rho, cap);  mask: rho where floor <= rho <= cap, else 0. Returns [N, C] (no grad).
    """
    log_ratio = (old_trainer - old_sampler) * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(mask)
    elif level != "token":
        raise ValueError(f"unknown importance-ratio level {level!r}")
    rho = torch.exp(log_ratio)
    if mode == "truncate":
        return torch.clamp(rho, max=cap)
    if mode == "mask":
        return rho * ((rho >= floor) & (rho <= cap))
    raise ValueError(f"unknown importance-sampling correction {mode!r}")


def all_equal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G] bool: the groups of rewards [G, n] whose rewards are all equal (max == min): no signal."""
    return rewards.amax(1) == rewards.amin(1)


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4,
                     batch_std: float | None = None) -> torch.Tensor:
    """GRPO advantages of rewards [G, n] (G groups of n samples): (r - mean_group) / std.

    std: per group (unbiased, as the reference code), per batch (pass the std of all rewards of
    the optimizer batch as batch_std: under several processes it spans them all), or none.
    A group whose rewards are all equal gets exactly 0. Otherwise float32 rounding could make its
    mean one unit in the last place off, and every member got the same non-zero advantage (eight
    log-prob rewards of -110.537: -0.07 each). The rest is computed in float64 for the same reason.
    """
    r = rewards.double()
    centered = r - r.mean(1, keepdim=True)
    if scale == "group":
        advantages = centered / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = centered / ((r.std() if batch_std is None else batch_std) + eps)
    elif scale == "none":
        advantages = centered
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    advantages = torch.where(all_equal_groups(rewards)[:, None], 0.0, advantages)
    return advantages.to(rewards.dtype)


def clipped_policy_loss(logprobs, old_logprobs, advantages, eps_low, eps_high):
    """Per-token PPO/GRPO loss -min(s A, clip(s, 1-eps_low, 1+eps_high) A) with s = exp(lp - old).

    logprobs, old_logprobs [N, C]; advantages [N]. Returns the loss [N, C] and masks [N, C] of
    tokens whose ratio was clipped below (A < 0) and above (A > 0), for the clip-fraction metrics.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    clipped_low = (ratio < 1 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, clipped_low, clipped_high


def kl_k3(logprobs, ref_logprobs):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - lp) - (ref - lp) - 1 (>= 0, unbiased)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> float:
    """The denominator of the loss for one optimizer batch (mask [N, C] of the whole batch).

    It is computed once for the optimizer batch, not per micro-batch: otherwise gradient
    accumulation would change the objective (token-mean over micro-batches != over the batch).
    seq-mean-token-mean counts every sampled completion, also one whose mask is empty
    (--mask_truncated_completions, the reasoning-only loss): a completion's weight never depends
    on how many of its tokens are masked. TRL's grpo loss and verl do the same, and so do the
    other scripts (raft_pp.py, reinforce_rej.py: every sequence of the batch's sample set).
    """
    if loss_type == "token-mean":
        return mask.sum().item()
    if loss_type == "seq-mean-token-mean":
        return float(mask.shape[0])
    if loss_type == "seq-mean-token-sum-norm":
        return float(mask.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, normalizer: float) -> torch.Tensor:
    """Sum of a micro-batch's share of the batch loss; summing over micro-batches gives the batch loss.

    token-mean:               sum_t l / (unmasked tokens in the batch)
    seq-mean-token-mean:      sum_seq (mean_t l over the sequence) / (sequences in the batch);
                              a fully masked sequence adds 0 and still counts
    seq-mean-token-sum-norm:  sum_t l / (sequences in the batch * max_completion_length)
    """
    if loss_type == "seq-mean-token-mean":
        per_seq = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / max(normalizer, 1.0)
    return (token_loss * mask).sum() / max(normalizer, 1.0)


# ----------------------------------------------------------------------------------------------
# the update: one sampled batch -> optimizer step(s), exactly as main() runs it (tests/dist_update.py
# runs it on one process and on two, and checks that both leave the same weights)
# ----------------------------------------------------------------------------------------------
def micro_batch_loss(model, mb: dict, normalizer: float, args):
    """GRPO's loss on one micro-batch: its share of the optimizer batch's loss (clipped policy loss,
    times the importance weights, plus beta * k3 KL, aggregated by --loss_type over the whole batch's
    normalizer), the trainer's log-probs of its tokens, and its statistics as sums over trained tokens."""
    logprobs, entropy = token_logprobs(model, mb, args.temperature, with_entropy=True)
    old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()  # one step: ratio 1, gradient only
    token_loss, low, high = clipped_policy_loss(logprobs, old, mb["advantages"], args.epsilon, args.epsilon_high)
    if "is_weights" in mb:
        token_loss = token_loss * mb["is_weights"]
    kl = kl_k3(logprobs, mb["ref_logprobs"]) if "ref_logprobs" in mb else torch.zeros_like(logprobs)
    token_loss = token_loss + args.beta * kl
    m = mb["loss_mask"]
    loss = aggregate_loss(token_loss, m, args.loss_type, normalizer)
    sums = dict(kl=(kl * m).sum(), entropy=(entropy * m).sum(), clip_low=(low * m).sum(), clip_high=(high * m).sum(),
                tokens=m.sum())
    return loss, logprobs, sums


def training_batch(rollouts, advantages: torch.Tensor, pad_id: int, device, args, reasoning=None) -> dict:
    """Rollouts -> tensors, with the advantages and the loss mask: every completion token, or, given
    reasoning = (tokenizer, the rollouts' rows), only the reasoning's, each up to its row's own end of
    reasoning (REASONING_END of its answer style); minus truncated completions with --mask_truncated_completions."""
    batch = collate(rollouts, pad_id, device)
    batch["advantages"] = advantages.to(device)
    mask = batch["completion_mask"].clone()
    if reasoning is not None:  # the reward ignores the written answer: train only the reasoning
        tokenizer, rows = reasoning
        markers = [reasoning_end(answer_style(row))[0] for row in rows]
        mask = mask * reasoning_mask(tokenizer, rollouts, mask.shape[1], markers)[0].to(device)
    if args.mask_truncated_completions:
        mask = mask * (~batch["truncated"])[:, None]
    batch["loss_mask"] = mask
    return batch


def batch_advantages(rewards: torch.Tensor, args, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] of this process's rewards [N] (whole groups of num_generations), and every
    process's rewards gathered (--scale_rewards batch divides by their std, over all processes)."""
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
    grouped = rewards.view(-1, args.num_generations)
    return group_advantages(grouped, args.scale_rewards, batch_std=all_rewards.std().item()).flatten(), all_rewards


def update(model, optimizer, scheduler, batch: dict, args, accelerator, frozen=None) -> dict:
    """num_iterations optimizer steps on a sampled batch (this process's share): batch = collate(...)
    plus "advantages" [N] and "loss_mask" [N, C]. Old log-probs (several iterations, IS correction)
    and reference log-probs (beta > 0) are computed first. Returns the update's metrics, reduced over
    processes."""
    world = accelerator.num_processes
    micro = micro_batches(torch.arange(len(batch["advantages"]), device=accelerator.device), args.micro_batch_size)
    stats = StepStats()
    with torch.no_grad(), logprob_timer("logprobs"):
        # old log-probs from the trainer: the policy moves between its steps on this batch, and the
        # IS correction compares them with the sampler's
        if args.num_iterations > 1 or args.is_correction != "none":
            batch["old_logprobs"] = torch.cat([token_logprobs(model, index_batch(batch, i), args.temperature)
                                               for i in micro])
            add_logprob_gap(stats, batch["old_logprobs"], batch["sampler_logprobs"], batch["completion_mask"])
        if args.beta > 0:
            batch["ref_logprobs"] = torch.cat([token_logprobs(frozen, index_batch(batch, i), args.temperature)
                                               for i in micro])
    mask = batch["loss_mask"]
    if args.is_correction != "none":
        batch["is_weights"] = importance_weights(batch["old_logprobs"], batch["sampler_logprobs"], mask,
                                                 args.is_correction, args.is_level, args.is_cap, args.is_floor)
        w = batch["is_weights"][mask.bool()]
        stats.add(is_weight_sum=w.sum(), is_zeroed=(w == 0).sum(), is_tokens=w.numel())
    # The normalizer spans the optimizer batch on all processes; DDP averages gradients over
    # processes, so each backpropagates world * its share to get the global mean.
    normalizer = accelerator.reduce(torch.tensor(loss_normalizer(mask, args.loss_type, args.max_completion_length),
                                                 device=accelerator.device), "sum").item()
    grad_norm = 0.0
    for it in range(args.num_iterations):
        for k, idx in enumerate(micro):
            mb = index_batch(batch, idx)
            with accumulate(accelerator, model, last=k == len(micro) - 1):
                loss, logprobs, sums = micro_batch_loss(model, mb, normalizer, args)
                accelerator.backward(loss * world)
            stats.add(loss=loss / args.num_iterations, **sums)
            if it == 0 and "old_logprobs" not in mb:  # on-policy: these are the sampling weights' log-probs
                add_logprob_gap(stats, logprobs, mb["sampler_logprobs"], mb["completion_mask"])
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm, stats)
    stats.add(completion_tokens=batch["completion_mask"].sum())
    t = stats.reduce(accelerator)
    tokens = max(t["tokens"], 1.0)
    metrics = {
        "loss": t["loss"], "kl": t["kl"] / tokens, "entropy": t["entropy"] / tokens,
        "clip_ratio/low_mean": t["clip_low"] / tokens, "clip_ratio/high_mean": t["clip_high"] / tokens,
        "loss_tokens_frac": tokens / args.num_iterations / max(t["completion_tokens"], 1.0),
        "grad_norm": grad_norm, "train/skipped_nonfinite": t["skipped_nonfinite"], **logprob_gap_metrics(t),
    }
    if "is_tokens" in t:
        metrics["is/mean_weight"] = t["is_weight_sum"] / max(t["is_tokens"], 1.0)
        metrics["is/zeroed_frac"] = t["is_zeroed"] / max(t["is_tokens"], 1.0)
    return metrics


# ----------------------------------------------------------------------------------------------
# scoring the reference answer after the model's own reasoning (needs a model: not pure)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model, prefixes: list[list[int]], continuations: list[list[int]],
                          pad_id: int, batch_size: int = 64, temperature: float = 1.0,
                          accelerator=None) -> list[torch.Tensor]:
    """Per-token log-probs (1-D tensors) of continuations[i] after prefixes[i], no gradient.

    With a sharded model (FSDP, DeepSpeed) every forward pass is collective, so processes with fewer
    batches than the others run filler batches until all have run as many."""
    device = next(unwrap(model).parameters()).device
    result = []
    n_batches = math.ceil(len(prefixes) / batch_size)
    if is_sharded(accelerator):
        n_batches = int(accelerator.reduce(torch.tensor(n_batches, device=accelerator.device), "max").item())
    for b in range(n_batches):
        pairs = list(zip(prefixes[b * batch_size:(b + 1) * batch_size], continuations[b * batch_size:(b + 1) * batch_size]))
        lp = token_logprobs(model, collate_ids(pairs or [([pad_id], [pad_id])], pad_id, device), temperature)
        result += [lp[i, :len(c)].cpu() for i, (_, c) in enumerate(pairs)]
    return result


@torch.no_grad()
def reference_answer_logprobs(scorer, tokenizer, rows: list[dict], texts: list[str], pad_id: int,
                              with_baseline: bool = True, accelerator=None):
    """Per-token log-probs of each row's reference answer (a) after prompt + reasoning + cue, and
    (b) after prompt + cue alone (the no-reasoning baseline, once per distinct prompt; only
    with_baseline: debiasing and the perplexity terms need it).

    Returns (with_reasoning: list of tensors, None where the completion has no end-of-reasoning
    marker; baseline: list of tensors, one per completion, or of None without with_baseline).
    """
    prefixes, continuations, owners = [], [], []
    base_index: dict[str, int] = {}
    base_of = []
    for i, (row, text) in enumerate(zip(rows, texts)):
        prompt = render_prompt(tokenizer, row["prompt"])
        reasoning, cue, answer = scoring_texts(text, str(row["answer"]), answer_style(row))
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if reasoning is not None:
            prefixes.append(tokenizer(prompt + reasoning + cue, add_special_tokens=False)["input_ids"])
            continuations.append(answer_ids), owners.append(i)
        if not with_baseline:
            continue
        key = prompt + "\x00" + str(row["answer"])
        if key not in base_index:
            base_index[key] = len(prefixes)
            prefixes.append(tokenizer(prompt + cue, add_special_tokens=False)["input_ids"])
            continuations.append(answer_ids), owners.append(-1)
        base_of.append(base_index[key])
    lps = continuation_logprobs(scorer, prefixes, continuations, pad_id, accelerator=accelerator)
    with_reasoning: list[torch.Tensor | None] = [None] * len(rows)
    for lp, owner in zip(lps, owners):
        if owner >= 0:
            with_reasoning[owner] = lp
    return with_reasoning, [lps[b] for b in base_of] if with_baseline else [None] * len(rows)


def reward_terms(weights, scores, valid, with_reasoning, baseline, with_reasoning_frozen, baseline_frozen, args,
                 group_size):
    """Each weighted reward term as a tensor [N], before normalization. valid [N]: the completion
    closed its reasoning; answer-blind terms of the others are set by fill_failed."""
    terms = {}
    for name in weights:
        if name == "correct":
            terms[name] = torch.tensor([s.correct or 0.0 for s in scores])
        elif name == "format":
            terms[name] = torch.tensor([s.format for s in scores])
        elif name == "code":  # the share of tests passed; 0 on rows that are not code
            terms[name] = torch.tensor([s.tests_passed or 0.0 for s in scores])
        elif name == "poem":  # the weighted poem components; 0 on rows that are not poems
            terms[name] = torch.tensor([s.poem["reward"] if s.poem else 0.0 for s in scores])
        elif name == "logprob":
            values = []
            for lp, base in zip(with_reasoning, baseline):
                v = answer_logprob_score(lp, args.logprob_variant) if lp is not None else 0.0
                if args.logprob_debias and lp is not None:
                    v -= answer_logprob_score(base, args.logprob_variant)
                values.append(v)
            terms[name] = torch.tensor(values)
        else:  # ppl_*: the frozen scorer
            terms[name] = torch.tensor([perplexity_rewards(lp, base)[name] if lp is not None else 0.0
                                        for lp, base in zip(with_reasoning_frozen, baseline_frozen)])
        if name in ANSWER_BLIND_TERMS:
            terms[name] = fill_failed(terms[name].view(-1, group_size), valid.view(-1, group_size)).flatten()
    return terms


def gold_logprob_metric(model, tokenizer, records: list[dict], pad_id: int, accelerator) -> dict:
    """eval/gold_logprob: the mean log-prob of the reference answer after the model's own reasoning (summed
    over its tokens), over the evaluated completions that closed their reasoning (nan if none did)."""
    world = accelerator.num_processes
    mine = records[accelerator.process_index::world]
    lps, _ = reference_answer_logprobs(model, tokenizer, [r for r in mine for _ in r["completions"]],
                                       [c for r in mine for c in r["completions"]], pad_id, with_baseline=False,
                                       accelerator=accelerator)
    sums = [lp.sum().item() for lp in lps if lp is not None]
    # sum and count over ranks, not a gather: the ranks' shares differ in size
    total, count = accelerator.reduce(torch.tensor([sum(sums), len(sums)], dtype=torch.float64,
                                                   device=accelerator.device), "sum").tolist()
    return {"eval/gold_logprob": total / count if count else float("nan")}


def main():
    args = parse_args(Args)
    # cpu=True on CPU-only machines: without it accelerate treats torchrun's processes as unrelated
    accelerator = make_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed, device_specific=True)  # seed + process index
    # a user's mistakes end here, with one sentence each, before the run folder or a model exists
    tokenizer, train_rows, test_rows = check_run(
        args, accelerator, group="GRPO normalizes each reward within its prompt's group")
    weights = parse_reward_weights(args.reward, RULE_TERMS + ANSWER_BLIND_TERMS)
    if "correct" in weights and any(row["task"] == "poem" for row in train_rows):
        raise SystemExit(f"--reward {args.reward!r}: {args.train_file} has poem rows, which have no correctness "
                         "check; use the poem rule reward or answer-blind terms, e.g. --reward poem=1,logprob=1.")
    for term, task in (("code", "code"), ("poem", "poem")):
        if term in weights and not any(row["task"] == task for row in train_rows):
            raise SystemExit(f"--reward {args.reward!r}: the {term} term scores {task} rows, and {args.train_file} "
                             f"has none; drop the term or train on {task} rows.")
    check_code_sandbox(train_rows + test_rows, args.allow_unsandboxed_code)
    answer_blind = all(name in ANSWER_BLIND_TERMS for name in weights)
    reasoning_only = args.reasoning_only_loss == "on" or (args.reasoning_only_loss == "auto" and answer_blind)
    needs_frozen = (args.beta > 0 or any(n.startswith("ppl_") for n in weights)
                    or ("logprob" in weights and args.logprob_scorer == "initial"))

    model, optimizer, scheduler, frozen = setup_policy(args, accelerator, args.total_steps * args.num_iterations,
                                                       needs_frozen)
    run = Run(args, accelerator, resume=args.resume)
    start_step = run.load_latest_checkpoint()["step"] if args.resume else 0
    sampler = start_sampler(args, accelerator, tokenizer, model, start_step)
    pad_id = pad_token_id(tokenizer)
    run_eval = make_evaluator(args, accelerator, sampler, tokenizer, test_rows, run,
                              extra=lambda records: gold_logprob_metric(unwrap(model), tokenizer, records, pad_id,
                                                                        accelerator))
    run.evaluate_start(run_eval, start_step)
    gathered = partial(gather_floats, accelerator)

    timer = Timer()
    bar = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps,
               disable=not accelerator.is_main_process, desc="grpo")
    for step in bar:
        t_step = time.perf_counter()
        # --- rollout: this rank samples its share of the prompts, whole groups ---
        rows = shard(prompts_for_step(train_rows, step, args.prompts_per_step, args.seed), rank, world)
        with timer("sample"):
            sampler.wake_up()
            groups = sampler.generate(encode_prompts(tokenizer, rows), args.num_generations, args.temperature,
                                      args.max_completion_length, seed=step_seed(args.seed, step),
                                      top_p=args.top_p)
            sampler.sleep()
        rollouts = [r for g in groups for r in g]
        rollout_rows = [row for row, g in zip(rows, groups) for _ in g]
        texts = [r.text for r in rollouts]

        # --- rewards: rule terms, and the reference answer's log-prob after the reasoning ---
        with timer("score"):
            scores, reward_errors = score_completions(rollout_rows, texts)
            lp_policy = lp_policy_base = lp_frozen = lp_frozen_base = None
            if "logprob" in weights:
                scorer = frozen if args.logprob_scorer == "initial" else unwrap(model)
                lp_policy, lp_policy_base = reference_answer_logprobs(scorer, tokenizer, rollout_rows, texts, pad_id,
                                                                      with_baseline=args.logprob_debias,
                                                                      accelerator=accelerator)
            if any(n.startswith("ppl_") for n in weights):
                lp_frozen, lp_frozen_base = reference_answer_logprobs(frozen, tokenizer, rollout_rows, texts, pad_id)
            valid = torch.tensor([scoring_texts(t, "", answer_style(row))[0] is not None
                                  for row, t in zip(rollout_rows, texts)])
            terms = reward_terms(weights, scores, valid, lp_policy, lp_policy_base, lp_frozen, lp_frozen_base,
                                 args, args.num_generations)
            rewards = sum(w * normalize_rewards(terms[n].view(len(rows), -1), args.reward_norm,
                                                args.reward_norm_scope).flatten()
                          for n, w in weights.items())

        # --- advantages (per group; the groups of this rank are complete) ---
        grouped = rewards.view(len(rows), args.num_generations)
        advantages, all_rewards = batch_advantages(rewards, args, accelerator)

        # --- update ---
        with timer("update"):
            batch = training_batch(rollouts, advantages, pad_id, accelerator.device, args,
                                   (tokenizer, rollout_rows) if reasoning_only else None)
            update_metrics = update(model, optimizer, scheduler, batch, args, accelerator, frozen)
        with timer("push"):
            sampler.wake_up()
            sampler.push_weights(unwrap(model))

        # --- logging ---
        lengths = gathered([len(r.completion_ids) for r in rollouts])
        correct_all = gathered([s.correct if s.correct is not None else float("nan") for s in scores])
        metrics = {
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item(),
            "rewards/errors": gathered([float(reward_errors)]).sum().item(),
            "rewards/code_timeouts": gathered([float(sum(s.timed_out for s in scores))]).sum().item(),
            "train/accuracy": correct_all.nanmean().item(),  # nan (null in metrics.jsonl) without a checker
            "train/format_rate": gathered([s.format for s in scores]).mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": gathered(batch["truncated"].float()).mean().item(),
            "frac_reward_zero_std": gathered(all_equal_groups(grouped).float()).mean().item(),
            **update_metrics,
            "learning_rate": scheduler.get_last_lr()[0],
            "num_tokens": lengths.sum().item(),
            **timer.pop(), **logprob_timer.pop(),
            **peak_memory(),
        }
        for name, values in terms.items():
            values = gathered(values)
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = values.mean().item(), values.std().item()
        if "poem" in weights:  # the components of the poem term, on the poem rows
            for part in POEM_WEIGHTS:
                values = gathered([s.poem[part] if s.poem else float("nan") for s in scores])
                metrics[f"rewards/poem/{part}"] = values.nanmean().item()
        if any(n in ANSWER_BLIND_TERMS for n in weights):
            metrics["rewards/no_marker"] = 1.0 - gathered(valid.float()).mean().item()
        metrics["tokens_per_second"] = metrics["num_tokens"] / (time.perf_counter() - t_step)
        run.log_step_rollouts(step, [{"id": row["id"], "prompt": row["prompt"], "completion": r.text,
                                      "reward": rw.item(), "correct": s.correct, "format": s.format,
                                      **{f"reward_{n}": terms[n][i].item() for n in terms}}
                                     for i, (row, r, rw, s) in enumerate(zip(rollout_rows, rollouts, rewards, scores))])
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=number(metrics['train/accuracy'], 2))
        if run.end_step(step, metrics, run_eval):
            return
    run.finish_training(model, tokenizer)


if __name__ == "__main__":
    run_main(main)
