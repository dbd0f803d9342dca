"""RAFT and RAFT++: train on the positive samples only. Paper: "A Minimalist Approach to LLM Reasoning:
from Rejection Sampling to Reinforce" (Xiong et al. 2025, arXiv 2504.11343).

    python raft_pp.py                       # toy task, RAFT++ (the toy settings are the defaults)
    python raft_pp.py --algo raft           # plain RAFT: supervised step on the positive samples
    accelerate launch raft_pp.py --model Qwen/Qwen2.5-Math-1.5B --train_file data/math_train.jsonl \
        --test_file data/math500.jsonl --algo raft++ --prompts_per_step 1024 --num_generations 4 \
        --mini_batches 4 --learning_rate 1e-6 --weight_decay 0.01 --max_completion_length 3072 \
        --kl_coef 0.001 --entropy_coef 0.001 --micro_batch_size 8 --dtype bfloat16 \
        --gradient_checkpointing --run_name raftpp_math        # the paper's reference settings

One step: sample a group of completions per prompt, keep the positive samples (reward equal to the
group's maximum and better than a wrong answer: with right/wrong rewards, every correct sample;
ties are all kept, as the paper's indicator 1[r = max_i r_i]), then
  raft:   supervised steps on them:   l_t = -log pi_t
  raft++: the same with importance sampling and PPO clipping:  l_t = -min(s_t, clip(s_t, 1-eps, 1+eps))
          with s_t = exp(log pi_t - log pi_old_t); the paper found IS without the clip worse than RAFT.
          Every trained sample has advantage +1, so only the upper clip acts: l_t = -min(s_t, 1+eps_high).
Loss = (1/|D|) sum_{seq in D} (1/|a|) sum_t l_t with D the positive samples of the optimizer batch
(--normalizer selected) or every sample of it (--normalizer batch: the indicator inside a sum over
the batch); l_t also gets kl_coef * k3 - entropy_coef * H_t, k3 = exp(ref_t - lp_t) - (ref_t - lp_t) - 1
(paper: 0.001 each), on the same tokens as l_t (the positive samples; the logged kl and entropy
cover every sample). The toy defaults take two optimizer steps per rollout batch: at the first the
ratio is 1 and RAFT++ has exactly RAFT's gradient; they differ from the second on. Paper vs released
code: the paper rewards a wrong answer -1, the code 0 (--negative_reward); the positive samples are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from common import (Run, RunArgs, StepStats, Timer, accumulate, add_logprob_gap, check_code_sandbox, check_run, collate,
                    encode_prompts, gather_floats, index_batch, logprob_gap_metrics, logprob_timer, make_accelerator,
                    make_evaluator, micro_batches, optimizer_step, pad_token_id, parse_args, peak_memory,
                    prompts_for_step, run_main, score_completions, setup_policy, shard, start_sampler, step_seed,
                    token_logprobs, unwrap)


@dataclass
class Args(RunArgs):
    # --- run (output folder, model, data, vLLM engine, evaluation: common.RunArgs) ---
    run_name: str = ""
    """name of the run folder under output_dir (empty: ALGO_toy)"""
    algo: Literal["raft", "raft++"] = "raft++"
    """raft (supervised step on the positive samples) or raft++ (importance sampling with clipping)"""
    # --- sampling ---
    prompts_per_step: int = 16
    """prompts sampled per step (the rollout batch), over all processes (paper: 1024)"""
    num_generations: int = 8
    """completions sampled per prompt (paper: 4)"""
    max_completion_length: int = 64
    """maximum completion tokens (paper: 3072 to 4096)"""
    temperature: float = 1.0
    """sampling temperature (the training log-probs use the same)"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    # --- reward ---
    negative_reward: float = -1.0
    """reward of a wrong answer (correct: +1): -1 (paper) or 0 (released code); a positive sample scores above it"""
    # --- optimization ---
    total_steps: int = 200
    """rollout steps (each: sample, then mini_batches x num_iterations optimizer steps)"""
    learning_rate: float = 5e-5
    """AdamW learning rate (paper, 1.5B-7B models: 1e-6)"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant or cosine (decay to 0 at the last optimizer step), both after a linear warmup from 0"""
    warmup_steps: int = 0
    """linear warmup, in optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0.01)"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    mini_batches: int = 1
    """optimizer steps per pass over the rollout batch, each on a slice of whole prompts (paper: 1024 / 256 = 4)"""
    num_iterations: int = 2
    """passes over the rollout batch; mini_batches x num_iterations > 1 recomputes old log-probs after sampling"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass; gradients accumulate over the mini-batch"""
    epsilon: float = 0.2
    """raft++: clip range below, ratio >= 1 - epsilon; never active here (advantage +1: only the upper clip acts)"""
    epsilon_high: float = 0.2
    """raft++: clip range above, ratio <= 1 + epsilon_high"""
    normalizer: Literal["selected", "batch"] = "selected"
    """|D| of the loss: selected (the positive samples, SFT on the accepted set) or batch (every sampled completion)"""
    loss_type: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """seq-mean-token-mean (the paper's 1/|a| per sequence, then 1/|D|) or token-mean (sum over tokens / tokens of D)"""
    kl_coef: float = 0.0
    """k3 KL loss weight to the starting model (paper: 0.001)"""
    entropy_coef: float = 0.0
    """entropy bonus weight (paper: 0.001)"""
    log_kl: bool = True
    """log the KL to the starting model even when kl_coef is 0 (one extra no-grad forward of a frozen copy per step)"""


# ----------------------------------------------------------------------------------------------
# the algorithm: pure functions, unit-tested in tests/test_raft_pp.py
# ----------------------------------------------------------------------------------------------
def correctness_rewards(correct: torch.Tensor, negative_reward: float) -> torch.Tensor:
    """+1 for a correct answer, negative_reward (-1 in the paper, 0 in the released code) otherwise."""
    return torch.where(correct > 0, torch.ones_like(correct), torch.full_like(correct, negative_reward))


def positive_samples(rewards: torch.Tensor, negative_reward: float) -> torch.Tensor:
    """Samples RAFT trains on, from rewards [G, n]: reward equal to its group's maximum (ties: all of
    them, the paper's 1[r = max_i r_i]) and above a wrong answer's, so an all-wrong group gives none."""
    return (rewards == rewards.max(1, keepdim=True).values) & (rewards > negative_reward)


def raft_token_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """RAFT, supervised: l_t = -log pi_t  [N, C]."""
    return -logprobs


def raft_pp_token_loss(logprobs, old_logprobs, eps_low: float, eps_high: float):
    """RAFT++: l_t = -min(s_t, clip(s_t, 1-eps_low, 1+eps_high)), s_t = exp(lp - old): the PPO loss with
    advantage 1 on a positive sample. At s = 1 its gradient is RAFT's. Returns the loss [N, C] and the
    mask of tokens clipped above (no gradient there)."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss = -torch.min(ratio, torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    return loss, ratio > 1 + eps_high


def kl_k3(logprobs, ref_logprobs):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - lp) - (ref - lp) - 1 (>= 0, unbiased)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def loss_normalizer(in_d: torch.Tensor, token_mask: torch.Tensor, loss_type: str) -> float:
    """|D| of one optimizer batch (this process's part; the caller sums over processes). in_d [N]:
    the sequences of D (the positive samples with --normalizer selected, every sample with batch);
    token_mask [N, C]: the tokens that carry loss.

    seq-mean-token-mean: the number of sequences in D, each counted even if its token mask is empty
    (cut by a truncation or reasoning mask), so that a completion's weight 1/|D| never depends on how
    many of its tokens are masked; grpo_logprob.py, TRL's grpo loss and verl count the same way.
    token-mean: the tokens of D under token_mask."""
    in_d = in_d.to(token_mask.device).bool()
    if loss_type == "seq-mean-token-mean":
        return float(in_d.sum().item())
    if loss_type == "token-mean":
        return (token_mask * in_d[:, None]).sum().item()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def aggregate_loss(token_loss, loss_mask, loss_type: str, normalizer: float) -> torch.Tensor:
    """A micro-batch's share of (1/|D|) sum_seq (1/|a|) sum_t l_t (or sum_t l_t / tokens of D);
    summing the shares of all micro-batches and processes gives the batch loss. A sequence whose
    loss_mask is empty adds 0 (and still counts in |D|, see loss_normalizer)."""
    if loss_type == "seq-mean-token-mean":
        per_seq = (token_loss * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)
        return per_seq.sum() / max(normalizer, 1.0)
    return (token_loss * loss_mask).sum() / max(normalizer, 1.0)


# ----------------------------------------------------------------------------------------------
# the update: one sampled batch -> optimizer steps, exactly as main() runs it (tests/dist_update.py
# runs it on one process and on two, and checks that both leave the same weights)
# ----------------------------------------------------------------------------------------------
def training_batch(rollouts, selected: torch.Tensor, pad_id: int, device, args) -> dict:
    """Rollouts -> tensors, with the loss mask (the positive samples' tokens) and the count mask whose
    rows make up |D| (--normalizer selected: the positive samples; batch: every sample)."""
    batch = collate(rollouts, pad_id, device)
    batch["loss_mask"] = batch["completion_mask"] * selected.to(device)[:, None]
    batch["in_d"] = selected.to(device) if args.normalizer == "selected" else torch.ones_like(selected, device=device)
    return batch


def micro_batch_loss(model, mb: dict, normalizer: float, args):
    """RAFT / RAFT++ loss on one micro-batch (its share of (1/|D|) sum_seq (1/|a|) sum_t l_t, plus
    kl_coef * k3 and minus entropy_coef * entropy on the same tokens), the trainer's log-probs, and sums."""
    logprobs, entropy = token_logprobs(model, mb, args.temperature, with_entropy=True)
    if args.algo == "raft++":
        old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()  # ratio 1: RAFT's gradient
        token_loss, clipped = raft_pp_token_loss(logprobs, old, args.epsilon, args.epsilon_high)
    else:
        token_loss, clipped = raft_token_loss(logprobs), torch.zeros_like(logprobs)
    kl = kl_k3(logprobs, mb["ref_logprobs"]) if "ref_logprobs" in mb else torch.zeros_like(logprobs)
    token_loss = token_loss + args.kl_coef * kl - args.entropy_coef * entropy
    loss_mask, sampled = mb["loss_mask"], mb["completion_mask"]  # metrics cover every sampled token
    loss = aggregate_loss(token_loss, loss_mask, args.loss_type, normalizer)
    return loss, logprobs, dict(clipped=(clipped * loss_mask).sum(), kl=(kl * sampled).sum(),
                                entropy=(entropy * sampled).sum(), tokens=sampled.sum())


def update(model, optimizer, scheduler, batch: dict, args, accelerator, frozen=None) -> dict:
    """mini_batches x num_iterations optimizer steps on a sampled batch (this process's share; the
    i-th mini-batch is the i-th slice of whole prompts). Returns the update's metrics, reduced over
    processes. Every sample goes through the forward pass, the unselected ones with a zero loss mask:
    the entropy and KL metrics then describe the policy on all its samples, and every process runs the
    same forward/backward calls, as DDP's collective ops need."""
    world, device = accelerator.num_processes, accelerator.device
    n = len(batch["completion_mask"])
    everything = micro_batches(torch.arange(n, device=device), args.micro_batch_size)
    stats = StepStats()
    with torch.no_grad(), logprob_timer("logprobs"):
        if args.algo == "raft++" and args.mini_batches * args.num_iterations > 1:
            # the policy moves within the batch: old log-probs from the trainer, right after sampling
            batch["old_logprobs"] = torch.cat([token_logprobs(model, index_batch(batch, i), args.temperature)
                                               for i in everything])
            add_logprob_gap(stats, batch["old_logprobs"], batch["sampler_logprobs"], batch["completion_mask"])
        if frozen is not None:
            batch["ref_logprobs"] = torch.cat([token_logprobs(frozen, index_batch(batch, i), args.temperature)
                                               for i in everything])
    per_mini = n // args.mini_batches  # whole groups: the local prompt count is a multiple of mini_batches
    grad_norm = 0.0
    for it in range(args.num_iterations):
        for j in range(args.mini_batches):
            mini_rows = torch.arange(j * per_mini, (j + 1) * per_mini, device=device)
            # |D| of this optimizer step and its tokens that carry loss, summed over all processes
            local = [loss_normalizer(batch["in_d"][mini_rows], batch["completion_mask"][mini_rows], args.loss_type),
                     batch["loss_mask"][mini_rows].sum().item()]
            normalizer, loss_tokens = accelerator.reduce(torch.tensor(local, device=device), "sum").tolist()
            # No positive sample on any process: no step. A step on a zero gradient would still move the
            # weights (Adam's momentum, weight decay), and with --normalizer batch |D| is never 0, so the
            # decision counts the loss tokens. It is global: all processes skip together.
            skip = loss_tokens == 0
            stats.add(skipped=float(skip) / world)
            if skip and it > 0:
                continue
            parts = micro_batches(mini_rows, args.micro_batch_size)
            for k, idx in enumerate(parts):
                mb = index_batch(batch, idx)
                with accumulate(accelerator, model, last=k == len(parts) - 1), torch.set_grad_enabled(not skip):
                    loss, logprobs, sums = micro_batch_loss(model, mb, normalizer, args)
                    if not skip:  # DDP averages gradients over processes: world * the share gives the sum
                        accelerator.backward(loss * world)
                stats.add(loss=loss / (args.num_iterations * args.mini_batches), clipped=sums.pop("clipped"))
                if it == 0:  # the first pass: every sampled token once (mini-batch j after j optimizer steps)
                    stats.add(**sums)
                    if j == 0 and "old_logprobs" not in mb:
                        add_logprob_gap(stats, logprobs, mb["sampler_logprobs"], mb["completion_mask"])
            if not skip:
                grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm, stats)
    stats.add(trained=batch["loss_mask"].sum() * args.num_iterations)
    t = stats.reduce(accelerator)
    tokens = max(t["tokens"], 1.0)
    metrics = {"loss": t["loss"], "entropy": t["entropy"] / tokens, "grad_norm": grad_norm,
               "skipped_updates": t["skipped"], "train/skipped_nonfinite": t.get("skipped_nonfinite", 0.0),
               **logprob_gap_metrics(t)}
    if args.algo == "raft++":  # share of the trained tokens clipped above, over the iterations
        metrics["clip_ratio/high_mean"] = t["clipped"] / max(t["trained"], 1.0)
    if frozen is not None:
        metrics["kl"] = t["kl"] / tokens  # to the starting model, over the first pass (see above)
    return metrics


def main():
    args = parse_args(Args)
    args.run_name = args.run_name or f"{args.algo}_toy"
    accelerator = make_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed, device_specific=True)  # seed + process index
    # a user's mistakes end here, with one sentence each, before the run folder or a model exists
    tokenizer, train_rows, test_rows = check_run(args, accelerator)
    if (args.prompts_per_step // world) % args.mini_batches:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must split into {world} processes x "
                         f"--mini_batches {args.mini_batches} whole prompts.")
    if args.negative_reward >= 1:
        raise SystemExit(f"--negative_reward {args.negative_reward} must be below 1, a correct answer's reward: "
                         "positive samples score above it.")
    if any(r["task"] == "poem" for r in train_rows):
        raise SystemExit(f"{args.train_file}: poem rows have no correctness check; RAFT needs a verifiable task.")
    check_code_sandbox(train_rows + test_rows, args.allow_unsandboxed_code)

    # the frozen starting model: KL reference and the KL-to-initial-policy metric
    needs_frozen = args.kl_coef > 0 or args.log_kl
    updates = args.total_steps * args.mini_batches * args.num_iterations
    model, optimizer, scheduler, frozen = setup_policy(args, accelerator, updates, needs_frozen)
    run = Run(args, accelerator, resume=args.resume)
    start_step = run.load_latest_checkpoint()["step"] if args.resume else 0
    sampler = start_sampler(args, accelerator, tokenizer, model, start_step)
    run_eval = make_evaluator(args, accelerator, sampler, tokenizer, test_rows, run)
    run.evaluate_start(run_eval, start_step)
    pad_id = pad_token_id(tokenizer)
    gathered = partial(gather_floats, accelerator)

    timer = Timer()
    bar = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps,
               disable=not accelerator.is_main_process, desc=args.algo)
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

        # --- rewards and selection: the positive samples of each group ---
        with timer("score"):
            scores, reward_errors = score_completions(rollout_rows, [r.text for r in rollouts])
            correct = torch.tensor([s.correct or 0.0 for s in scores])
            rewards = correctness_rewards(correct, args.negative_reward)
            selected = positive_samples(rewards.view(len(rows), -1), args.negative_reward).flatten()

        # --- update: mini_batches x num_iterations optimizer steps on the rollout batch ---
        with timer("update"):
            batch = training_batch(rollouts, selected, pad_id, accelerator.device, args)
            update_metrics = update(model, optimizer, scheduler, batch, args, accelerator, frozen)
        with timer("push"):
            sampler.wake_up()
            sampler.push_weights(unwrap(model))

        # --- logging ---
        all_rewards, all_correct = gathered(rewards), gathered(correct)
        all_selected = gathered(selected.float()).view(-1, args.num_generations)
        lengths = gathered([len(r.completion_ids) for r in rollouts])
        metrics = {
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item(),
            "rewards/errors": gathered([float(reward_errors)]).sum().item(),
            "rewards/code_timeouts": gathered([float(sum(s.timed_out for s in scores))]).sum().item(),
            "train/accuracy": all_correct.mean().item(),
            "train/format_rate": gathered([s.format for s in scores]).mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": gathered(batch["truncated"].float()).mean().item(),
            "frac_reward_zero_std": (all_correct.view(-1, args.num_generations).std(1) == 0).float().mean().item(),
            "kept_prompts_frac": (all_selected.sum(1) > 0).float().mean().item(),  # prompts with a positive sample
            "positive_samples": all_selected.sum().item(),  # samples in the loss
            **update_metrics,  # loss, entropy, kl, grad_norm, skipped_updates, clip ratio, log-prob gap
            "learning_rate": scheduler.get_last_lr()[0],
            "num_tokens": lengths.sum().item(),
            **timer.pop(), **logprob_timer.pop(),
            **peak_memory(),
        }
        metrics["tokens_per_second"] = metrics["num_tokens"] / (time.perf_counter() - t_step)
        run.log_step_rollouts(step, [{"id": row["id"], "prompt": row["prompt"], "completion": r.text,
                                      "reward": rw.item(), "correct": s.correct, "format": s.format,
                                      "selected": bool(sel)}
                                     for row, r, rw, s, sel in zip(rollout_rows, rollouts, rewards, scores, selected)])
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['train/accuracy']:.2f}")
        if run.end_step(step, metrics, run_eval):
            return
    run.finish_training(model, tokenizer)


if __name__ == "__main__":
    run_main(main)
