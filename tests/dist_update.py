"""Every algorithm script's own update, on one process and on two.

    python tests/dist_update.py MODEL_DIR OUT_DIR                              # one process, whole batch
    torchrun --nproc_per_node 2 tests/dist_update.py MODEL_DIR OUT_DIR         # two, each its share
    (and under an FSDP launch config: the same, with the models sharded)

For each case, a fixed batch of rollouts (whole groups, unequal lengths, some truncated) goes through
the script's own functions exactly as its main() calls them: common.shard for the process's prompts,
the script's selection / filter / advantage functions, its training_batch and its update (normalizer
over processes, loss scaling by the process count, micro-batches, mini-batches, iterations, skipped
steps). The main process saves the weights after the update to OUT_DIR/CASE_worldW[_fsdp].pt;
tests/test_distributed.py compares the worlds. Then a NaN advantage on one process: the step is
skipped on every process and the weights stay (check_nonfinite). The optimizer is plain SGD with no gradient clipping,
so that the weights show the gradient itself (AdamW's first step, lr * g / |g|, and clipping would
both hide a gradient scaled by a wrong factor).
"""

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_logprob  # noqa: E402
import prime  # noqa: E402
import raft_pp  # noqa: E402
import reinforce_rej  # noqa: E402
import common  # noqa: E402
from common import Rollout, Run, RunArgs, leave_process_group, make_accelerator, shard  # noqa: E402

SUFFIX = {"FSDP": "_fsdp", "DEEPSPEED": "_zero3"}
PROMPTS, N = 8, 2  # 8 prompts x 2 samples; under two processes each takes 4 prompts
# correctness per prompt: mixed, all right, mixed, all wrong | all wrong, all right, all right, all wrong
CORRECT = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0],
                        [0.0, 0.0]])


def fixed_rollouts(vocab: int) -> list[list[Rollout]]:
    """PROMPTS groups of N rollouts: random ids of unequal lengths, sampler log-probs, some truncated."""
    g = torch.Generator().manual_seed(0)
    groups = []
    for p in range(PROMPTS):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        group = []
        for _ in range(N):
            length = int(torch.randint(1, 11, (1,), generator=g))
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            sampler_lp = (-3 * torch.rand(length, generator=g)).tolist()
            group.append(Rollout(prompt, ids, sampler_lp, "", "length" if length == 10 else "stop"))
        groups.append(group)
    return groups


def prepare(acc, model_dir, n_models=1):
    if acc.distributed_type.name == "DEEPSPEED":
        acc.free_memory()  # accelerator.backward drives the first DeepSpeed engine prepared: drop the last case's
    out = []
    for _ in range(n_models):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        out += list(acc.prepare(model, optimizer))
    scheduler = torch.optim.lr_scheduler.LambdaLR(out[1], lambda _: 1.0)
    return out, scheduler


def frozen_model(acc, model_dir):
    return common.load_model(model_dir, "float32", acc, frozen=True)


def grpo_case(acc, model_dir, groups, **overrides):
    args = grpo_logprob.Args(**{"micro_batch_size": 3, "num_iterations": 2, "beta": 0.05, "max_grad_norm": 0.0,
                                "is_correction": "truncate", "mask_truncated_completions": True,
                                "num_generations": N, "max_completion_length": 10, **overrides})
    (model, optimizer), scheduler = prepare(acc, model_dir)
    mine = shard(list(range(PROMPTS)), acc.process_index, acc.num_processes)
    rollouts = [r for i in mine for r in groups[i]]
    # continuous rewards with ties, as the log-prob and hybrid rewards give
    rewards = torch.tensor([[0.3, -1.2], [0.5, 0.5], [2.0, 0.1], [-0.7, 0.9], [1.1, 1.3], [0.0, 0.0], [-2.0, 0.4],
                            [0.8, -0.3]])[mine].flatten()
    advantages, _ = grpo_logprob.batch_advantages(rewards, args, acc)
    batch = grpo_logprob.training_batch(rollouts, advantages, 0, acc.device, args)
    grpo_logprob.update(model, optimizer, scheduler, batch, args, acc, frozen_model(acc, model_dir))
    return [model]


def raft_case(acc, model_dir, groups, **overrides):
    args = raft_pp.Args(**{"micro_batch_size": 3, "mini_batches": 2, "num_iterations": 2, "kl_coef": 0.05,
                           "entropy_coef": 0.01, "max_grad_norm": 0.0, "num_generations": N, **overrides})
    (model, optimizer), scheduler = prepare(acc, model_dir)
    mine = shard(list(range(PROMPTS)), acc.process_index, acc.num_processes)
    rollouts = [r for i in mine for r in groups[i]]
    rewards = raft_pp.correctness_rewards(CORRECT[mine], args.negative_reward)
    selected = raft_pp.positive_samples(rewards, args.negative_reward).flatten()
    batch = raft_pp.training_batch(rollouts, selected, 0, acc.device, args)
    raft_pp.update(model, optimizer, scheduler, batch, args, acc, frozen_model(acc, model_dir))
    # then a batch with no positive sample anywhere: no step, and each of its 4 skips counted once over processes
    nothing = raft_pp.training_batch(rollouts, torch.zeros_like(selected), 0, acc.device, args)
    metrics = raft_pp.update(model, optimizer, scheduler, nothing, args, acc, frozen_model(acc, model_dir))
    assert metrics["skipped_updates"] == 4, metrics
    return [model]


def reinforce_case(acc, model_dir, groups, **overrides):
    """reinforce_rej keeps prompts 0 and 2 only: under two processes rank 1 keeps nothing, and the
    second mini-batch (prompts 4-7) is empty on every process, so its steps are skipped."""
    args = reinforce_rej.Args(**{"micro_batch_size": 3, "mini_batches": 2, "num_iterations": 2, "kl_coef": 0.05,
                                 "entropy_coef": 0.01, "max_grad_norm": 0.0, "num_generations": N, **overrides})
    (model, optimizer), scheduler = prepare(acc, model_dir)
    mine = shard(list(range(PROMPTS)), acc.process_index, acc.num_processes)
    rollouts = [r for i in mine for r in groups[i]]
    correct = CORRECT[mine]
    kept = reinforce_rej.mixed_prompts(correct) if args.algo == "reinforce_rej" else torch.ones(len(mine), dtype=torch.bool)
    rewards = reinforce_rej.correctness_rewards(correct.flatten(), args.negative_reward)
    batch = reinforce_rej.training_batch(rollouts, rewards, kept.repeat_interleave(N), 0, acc.device)
    metrics = reinforce_rej.update(model, optimizer, scheduler, batch, args, acc, frozen_model(acc, model_dir))
    if args.algo == "reinforce_rej":
        assert metrics["skipped_updates"] == 2, metrics  # the empty second mini-batch, in both iterations
    return [model]


def prime_case(acc, model_dir, groups, **overrides):
    """PRIME trains on the kept groups its own sampling loop collects; here 4 of them (2 per process)."""
    args = prime.Args(**{"micro_batch_size": 3, "num_mini_batches": 2, "max_grad_norm": 0.0, "num_generations": N,
                         "beta": 0.5, **overrides})
    (model, optimizer, prm, prm_optimizer), _ = prepare(acc, model_dir, n_models=2)
    kept = [0, 2, 4, 6]  # groups with the labels below
    mine = shard(kept, acc.process_index, acc.num_processes)
    rollouts = [r for i in mine for r in groups[i]]
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0],
                           [0.0, 1.0]])
    batch = prime.collate(rollouts, 0, acc.device)
    batch["labels"] = labels[mine].flatten().to(acc.device)
    prime.update(model, optimizer, batch, args, acc, prm, prm_optimizer, frozen_model(acc, model_dir))
    return [model, prm]


CASES = {
    "grpo_token-mean": lambda *a: grpo_case(*a, loss_type="token-mean"),
    "grpo_seq-mean-token-mean": lambda *a: grpo_case(*a, loss_type="seq-mean-token-mean", scale_rewards="batch"),
    "grpo_seq-mean-token-sum-norm": lambda *a: grpo_case(*a, loss_type="seq-mean-token-sum-norm", scale_rewards="none"),
    "raft++": lambda *a: raft_case(*a, algo="raft++"),
    "raft_token-mean_batch": lambda *a: raft_case(*a, algo="raft", loss_type="token-mean", normalizer="batch"),
    "reinforce_rej": lambda *a: reinforce_case(*a, algo="reinforce_rej"),
    "reinforce_token-mean": lambda *a: reinforce_case(*a, algo="reinforce", loss_type="token-mean"),
    "prime": lambda *a: prime_case(*a),
    # the PRM updated before it scores, so that it differs from the reference and the process rewards are not 0;
    # the released code's path: q_t over the largest |return| of the batch on all processes
    "prime_code": lambda *a: prime_case(*a, process_baseline="code", prm_update="before"),
}


def check_checkpoint(acc, model_dir, out: Path, groups):
    """Run.save_checkpoint under several processes (DDP, FSDP or DeepSpeed): every rank's state lands in the
    checkpoint even when rank 1 writes late (the main process must not rename the temporary folder
    before all ranks have written into it), and loading it restores the weights after they moved."""
    (model, optimizer), _ = prepare(acc, model_dir)
    run = Run(RunArgs(output_dir=str(out / f"ckpt_{acc.distributed_type.name}"), run_name="ckpt"), acc)
    def weights():  # a copy: without sharding, get_state_dict returns the live tensors
        state = acc.get_state_dict(model)  # DeepSpeed ZeRO-3: gathered on the main process only (None elsewhere)
        return {k: v.detach().clone() for k, v in (state or {}).items()}

    saved = weights()
    if acc.process_index == 1:  # a slow rank: its save_state starts (and ends) after rank 0's
        save_state = acc.save_state
        acc.save_state = lambda *a, **k: (time.sleep(3), save_state(*a, **k))
    run.save_checkpoint(1)
    acc.save_state = type(acc).save_state.__get__(acc)
    folder = run.dir / "checkpoints" / "step_1"
    for rank in range(acc.num_processes):
        assert (folder / f"random_states_{rank}.pkl").exists(), f"checkpoint lacks rank {rank}'s RNG state"
    assert not list(folder.parent.glob(".tmp_*")), "a temporary checkpoint folder was left behind"
    batch = prime.collate([r for g in groups for r in g], 0, acc.device)
    acc.backward(-prime.token_logprobs(model, batch).sum())
    optimizer.step()
    moved = weights()
    assert run.load_latest_checkpoint()["step"] == 1
    restored = weights()
    if acc.is_main_process:
        assert any(not torch.equal(saved[k], moved[k]) for k in saved), "the step did not move the weights"
        assert all(torch.equal(saved[k], restored[k]) for k in saved), "the checkpoint did not restore the weights"
    acc.print(f"checkpoint: every rank's state written before the atomic rename, weights restored "
              f"({acc.distributed_type.name})")


def check_nonfinite(acc, model_dir, groups):
    """A NaN advantage on the last process only: the optimizer step is skipped on every process (an
    all-reduce decides), each process's weights (its shard under FSDP) stay as they were, and the skip
    is counted. Every process prints its own verdict."""
    args = grpo_logprob.Args(micro_batch_size=3, num_generations=N, max_completion_length=10, max_grad_norm=0.0)
    (model, optimizer), scheduler = prepare(acc, model_dir)
    mine = shard(list(range(PROMPTS)), acc.process_index, acc.num_processes)
    rollouts = [r for i in mine for r in groups[i]]
    advantages = torch.tensor([1.0, -1.0] * (len(rollouts) // 2))
    if acc.process_index == acc.num_processes - 1:
        advantages[0] = float("nan")

    def local_weights():
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]

    before = local_weights()
    batch = grpo_logprob.training_batch(rollouts, advantages, 0, acc.device, args)
    metrics = grpo_logprob.update(model, optimizer, scheduler, batch, args, acc)
    assert all(torch.equal(a, b) for a, b in zip(before, local_weights())), "a non-finite step changed the weights"
    assert metrics["train/skipped_nonfinite"] == 1.0 and metrics["grad_norm"] != metrics["grad_norm"], metrics
    print(f"rank {acc.process_index}: the non-finite step was skipped, weights unchanged, counted once", flush=True)


def main():
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(CASES)
    acc = make_accelerator()
    if acc.distributed_type.name == "DEEPSPEED":
        acc.state.deepspeed_plugin.deepspeed_config.update(zero_allow_untested_optimizer=True, gradient_clipping=0.0)
        # two trained models: prime.py refuses DeepSpeed with a PRM
        only = [c for c in only if not c.startswith("prime")]
    groups = fixed_rollouts(AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size)
    for case in only:
        models = CASES[case](acc, model_dir, groups)
        states = [acc.get_state_dict(m) for m in models]  # gathered on the main process under FSDP
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            torch.save([{k: v.detach().cpu().float() for k, v in s.items()} for s in states],
                       out / f"{case}_world{acc.num_processes}{SUFFIX.get(acc.distributed_type.name, '')}.pt")
        acc.wait_for_everyone()
        acc.print(f"{case}: saved")
    if acc.num_processes > 1:
        check_checkpoint(acc, model_dir, out, groups)
    if acc.distributed_type.name != "DEEPSPEED":  # its engine steps inside the backward pass
        check_nonfinite(acc, model_dir, groups)
    acc.print("DIST_UPDATE_OK", acc.distributed_type)
    leave_process_group(acc)


if __name__ == "__main__":
    main()
