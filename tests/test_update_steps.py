"""One step of each script's own update() on the toy model: it moves the policy the right way (rewards
reach each loss with the right sign, the KL term pulls towards the reference, the entropy bonus raises
the entropy), the importance-sampling correction weights a real sampler/trainer mismatch as it must, and
a non-finite loss never reaches the weights."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import grpo_logprob
import prime
import raft_pp
import reinforce_rej
from common import Rollout, collate, encode_prompts, load_tasks, make_accelerator, token_logprobs

# two completions of one toy prompt: a right chain and a wrong one (different tokens, different lengths)
TEXTS = ["\n3+4=7\n7-2=5\n</think>\n<answer>5</answer>", "\n9-9=3\n</think>\n<answer>1</answer>"]
TOY_ROW = {"task": "toy", "answer": "5"}  # a toy task row: the R1 tag style, </think> ends its reasoning


@pytest.fixture(scope="module")
def acc():
    return make_accelerator()


@pytest.fixture(scope="module")
def rollouts(toy):
    tok = AutoTokenizer.from_pretrained(toy / "model")
    prompt = encode_prompts(tok, load_tasks(toy / "test.jsonl")[:1])[0]
    out = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Rollout(prompt, ids, [0.0] * len(ids), text, "stop"))
    return out


@pytest.fixture(autouse=True)
def no_earlier_skips():
    common._NONFINITE["in_a_row"] = 0
    yield
    common._NONFINITE["in_a_row"] = 0


_LOADED = {}


def toy_model(toy):
    """A fresh copy of the toy model (loaded from disk once per module)."""
    if toy not in _LOADED:
        _LOADED[toy] = AutoModelForCausalLM.from_pretrained(toy / "model", dtype=torch.float32)
    return copy.deepcopy(_LOADED[toy])


def policy(acc, toy, lr=0.05, adamw_weight_decay=None):
    """The toy model under plain SGD (the weights move along the gradient itself), or under AdamW with this
    weight decay, prepared by accelerate."""
    model = toy_model(toy)
    if adamw_weight_decay is None:
        return acc.prepare(model, torch.optim.SGD(model.parameters(), lr=lr))
    return acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=adamw_weight_decay))


def frozen(toy):
    return toy_model(toy).eval().requires_grad_(False)


@torch.no_grad()
def sequence_logprobs(model, rollouts) -> torch.Tensor:
    batch = collate(rollouts, 0, "cpu")
    return (token_logprobs(model, batch) * batch["completion_mask"]).sum(1)


@torch.no_grad()
def mean_entropy_and_kl(model, ref, rollouts) -> tuple[float, float]:
    batch = collate(rollouts, 0, "cpu")
    lp, entropy = token_logprobs(model, batch, with_entropy=True)
    kl = grpo_logprob.kl_k3(lp, token_logprobs(ref, batch))
    m = batch["completion_mask"]
    return ((entropy * m).sum() / m.sum()).item(), ((kl * m).sum() / m.sum()).item()


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- direction: each script's rewards reach its loss with the right sign -----------------------
def test_grpo_step_raises_the_better_completion_and_lowers_the_worse(acc, toy, rollouts):
    """Rewards 1 and 0 in one group: advantages +a and -a; after one step the log-prob of the first
    completion rose and that of the second fell."""
    model, opt = policy(acc, toy)
    args = grpo_logprob.Args(num_generations=2, max_grad_norm=0.0, max_completion_length=32)
    advantages, _ = grpo_logprob.batch_advantages(torch.tensor([1.0, 0.0]), args, acc)
    assert advantages[0] > 0 > advantages[1]
    before = sequence_logprobs(model, rollouts)
    grpo_logprob.update(model, opt, None, grpo_logprob.training_batch(rollouts, advantages, 0, acc.device, args), args, acc)
    after = sequence_logprobs(model, rollouts)
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)


def test_grpo_kl_term_alone_pulls_the_policy_back_to_the_reference(acc, toy, rollouts):
    """Zero advantages and beta > 0: the loss is beta * KL, and one step lowers the KL to the reference."""
    model, opt = policy(acc, toy, lr=0.002)  # a small step: the k3 gradient grows as exp(ref - lp)
    with torch.no_grad():  # move the policy away from the reference first
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref = frozen(toy)
    args = grpo_logprob.Args(num_generations=2, max_grad_norm=0.0, max_completion_length=32, beta=1.0)
    _, kl_before = mean_entropy_and_kl(model, ref, rollouts)
    metrics = grpo_logprob.update(model, opt, None, grpo_logprob.training_batch(rollouts, torch.zeros(2), 0, acc.device,
                                                                                args), args, acc, ref)
    _, kl_after = mean_entropy_and_kl(model, ref, rollouts)
    assert kl_before > 0.01 and metrics["kl"] == pytest.approx(kl_before, rel=1e-4)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)


def test_entropy_bonus_raises_the_entropy(acc, toy, rollouts):
    """Reinforce with zero rewards and an entropy bonus: the loss is -entropy_coef * entropy."""
    model, opt = policy(acc, toy, lr=0.5)
    ref = frozen(toy)
    args = reinforce_rej.Args(algo="reinforce", num_generations=2, max_grad_norm=0.0, entropy_coef=1.0, num_iterations=1)
    entropy_before, _ = mean_entropy_and_kl(model, ref, rollouts)
    batch = reinforce_rej.training_batch(rollouts, torch.zeros(2), torch.ones(2, dtype=torch.bool), 0, acc.device)
    reinforce_rej.update(model, opt, None, batch, args, acc)
    entropy_after, _ = mean_entropy_and_kl(model, ref, rollouts)
    assert entropy_after > entropy_before + 0.01, (entropy_before, entropy_after)


@pytest.mark.parametrize("algo", ["raft", "raft++"])
def test_raft_step_raises_the_positive_sample(acc, toy, rollouts, algo):
    """Correctness 1 and 0: RAFT trains on the positive sample only, and its log-prob rises."""
    model, opt = policy(acc, toy)
    args = raft_pp.Args(algo=algo, num_generations=2, max_grad_norm=0.0, num_iterations=2, log_kl=False)
    rewards = raft_pp.correctness_rewards(torch.tensor([1.0, 0.0]), args.negative_reward)
    selected = raft_pp.positive_samples(rewards.view(1, 2), args.negative_reward).flatten()
    assert selected.tolist() == [True, False]
    before = sequence_logprobs(model, rollouts)
    raft_pp.update(model, opt, None, raft_pp.training_batch(rollouts, selected, 0, acc.device, args), args, acc)
    assert sequence_logprobs(model, rollouts)[0] > before[0] + 0.05


@pytest.mark.parametrize("normalizer", ["selected", "batch"])
def test_raft_without_a_positive_sample_leaves_the_weights(acc, toy, rollouts, normalizer):
    """Both answers wrong: no sample is selected, every optimizer step is skipped and counted, and the weights
    stay, also with --normalizer batch (|D| = every sample, never 0). AdamW with weight decay: a step on the
    zero gradient would move them."""
    model, opt = policy(acc, toy, adamw_weight_decay=0.1)
    args = raft_pp.Args(num_generations=2, max_grad_norm=0.0, num_iterations=2, normalizer=normalizer, log_kl=False)
    rewards = raft_pp.correctness_rewards(torch.tensor([0.0, 0.0]), args.negative_reward)
    selected = raft_pp.positive_samples(rewards.view(1, 2), args.negative_reward).flatten()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = raft_pp.update(model, opt, None, raft_pp.training_batch(rollouts, selected, 0, acc.device, args), args, acc)
    assert metrics["skipped_updates"] == 2 and metrics["loss"] == 0, metrics
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("algo", ["reinforce", "reinforce_rej"])
def test_reinforce_step_follows_the_reward_sign(acc, toy, rollouts, algo):
    """Rewards +1 (right) and -1 (wrong): the right completion's log-prob rises, the wrong one's falls."""
    model, opt = policy(acc, toy)
    args = reinforce_rej.Args(algo=algo, num_generations=2, max_grad_norm=0.0, num_iterations=1)
    correct = torch.tensor([1.0, 0.0])
    rewards = reinforce_rej.correctness_rewards(correct, args.negative_reward)
    kept = reinforce_rej.mixed_prompts(correct.view(1, 2)) if algo == "reinforce_rej" else torch.ones(1, dtype=torch.bool)
    before = sequence_logprobs(model, rollouts)
    reinforce_rej.update(model, opt, None, reinforce_rej.training_batch(rollouts, rewards, kept.repeat_interleave(2), 0,
                                                                        acc.device), args, acc)
    after = sequence_logprobs(model, rollouts)
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_prime_step_follows_the_outcome(acc, toy, rollouts, coef):
    """Outcomes 1 and 0 (with and without the implicit PRM): the leave-one-out returns are positive for the
    right completion and negative for the wrong one, and the policy moves accordingly."""
    model, opt = policy(acc, toy)
    args = prime.Args(num_generations=2, max_grad_norm=0.0, process_reward_coef=coef, num_mini_batches=1)
    prm = prm_opt = ref = None
    if coef:
        prm, prm_opt = policy(acc, toy, lr=0.01)
        ref = frozen(toy)
    batch = collate(rollouts, 0, acc.device)
    batch["labels"] = torch.tensor([1.0, 0.0])
    before = sequence_logprobs(model, rollouts)
    prime.update(model, opt, batch, args, acc, prm, prm_opt, ref)
    after = sequence_logprobs(model, rollouts)
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)


# --- the importance-sampling correction on a real mismatch -------------------------------------
def mismatched(model, rollouts, ratios: list[float]):
    """The rollouts with sampler log-probs that differ from the trainer's by log(rho) per token, rho
    cycling through `ratios`: exactly the mismatch a bf16 sampler makes, with known sizes. Returns them
    and rho [N, C] (0 under the padding)."""
    batch = collate(rollouts, 0, "cpu")
    with torch.no_grad():
        trainer = token_logprobs(model, batch)
    mask = batch["completion_mask"]
    rho = torch.tensor(ratios).repeat(mask.numel() // len(ratios) + 1)[:mask.numel()].view(mask.shape) * mask
    sampler = trainer - torch.log(rho.clamp(min=1e-30)) * mask
    out = [Rollout(r.prompt_ids, r.completion_ids, sampler[i, :len(r.completion_ids)].tolist(), r.text, r.finish_reason)
           for i, r in enumerate(rollouts)]
    return out, rho


def test_is_correction_masks_and_truncates_a_real_mismatch(acc, toy, rollouts):
    """Sampler log-probs off by log 4, 0 and -log 3: rho = 0.25, 1, 3 per token. --is_correction mask with
    [0.5, 2] zeroes the tokens with rho 0.25 and 3 and keeps rho 1: the step equals a step without the
    correction on the kept tokens only (a normalizer that does not depend on the mask:
    seq-mean-token-sum-norm). truncate caps 3 at 2: weights 0.25, 1, 2."""
    args = grpo_logprob.Args(num_generations=2, max_grad_norm=0.0, max_completion_length=32, is_correction="mask",
                             is_floor=0.5, is_cap=2.0, loss_type="seq-mean-token-sum-norm")
    advantages = torch.tensor([1.0, -1.0])
    model, opt = policy(acc, toy)
    skewed, rho = mismatched(model, rollouts, [0.25, 1.0, 3.0])
    batch = grpo_logprob.training_batch(skewed, advantages, 0, acc.device, args)
    metrics = grpo_logprob.update(model, opt, None, batch, args, acc)
    mask = batch["completion_mask"].bool()
    keep = (rho - 1.0).abs() < 1e-6
    assert torch.allclose(batch["is_weights"][mask], keep.float()[mask], atol=1e-5)
    tokens, zeroed = mask.sum().item(), (~keep & mask).sum().item()
    assert zeroed == (rho[mask] != 1.0).sum().item() and 0 < zeroed < tokens
    assert metrics["is/zeroed_frac"] == pytest.approx(zeroed / tokens)
    assert metrics["is/mean_weight"] == pytest.approx((tokens - zeroed) / tokens, abs=1e-6)
    assert metrics["sampler/logprob_gap_max"] == pytest.approx(math.log(4), abs=1e-5)

    # the same step without the correction, on the kept tokens only
    plain_model, plain_opt = policy(acc, toy)
    plain = grpo_logprob.Args(**{**vars(args), "is_correction": "none"})
    plain_batch = grpo_logprob.training_batch(rollouts, advantages, 0, acc.device, plain)
    plain_batch["loss_mask"] = plain_batch["loss_mask"] * keep
    grpo_logprob.update(plain_model, plain_opt, None, plain_batch, plain, acc)
    start = weights(AutoModelForCausalLM.from_pretrained(toy / "model", dtype=torch.float32))
    moved = max((a - s).abs().max().item() for a, s in zip(weights(model), start))
    worst = max((a - b).abs().max().item() for a, b in zip(weights(model), weights(plain_model)))
    assert moved > 1e-3 and worst < 1e-6, (moved, worst)

    truncate = grpo_logprob.Args(**{**vars(args), "is_correction": "truncate"})
    model, opt = policy(acc, toy)
    batch = grpo_logprob.training_batch(mismatched(model, rollouts, [0.25, 1.0, 3.0])[0], advantages, 0, acc.device,
                                        truncate)
    metrics = grpo_logprob.update(model, opt, None, batch, truncate, acc)
    assert torch.allclose(batch["is_weights"][mask], rho.clamp(max=2.0)[mask], atol=1e-5)
    assert metrics["is/zeroed_frac"] == 0.0
    assert metrics["is/mean_weight"] == pytest.approx(rho.clamp(max=2.0)[mask].mean().item(), abs=1e-6)


# --- non-finite numbers never reach the weights ------------------------------------------------
def test_a_nan_advantage_skips_the_step_and_is_counted(acc, toy, rollouts, capsys):
    model, opt = policy(acc, toy)
    args = grpo_logprob.Args(num_generations=2, max_grad_norm=1.0, max_completion_length=32)
    start = weights(model)
    batch = grpo_logprob.training_batch(rollouts, torch.tensor([float("nan"), 1.0]), 0, acc.device, args)
    metrics = grpo_logprob.update(model, opt, None, batch, args, acc)
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert metrics["train/skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(weights(model), start))
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warning == ["warning: non-finite loss or gradient norm (nan): the optimizer step was skipped (1 in a row; "
                       "the run stops at 3)."]
    # a finite batch afterwards steps as usual, and is not counted
    batch = grpo_logprob.training_batch(rollouts, torch.tensor([1.0, -1.0]), 0, acc.device, args)
    metrics = grpo_logprob.update(model, opt, None, batch, args, acc)
    assert metrics["train/skipped_nonfinite"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), start))
    assert common._NONFINITE["in_a_row"] == 0


class ClipSpy:
    """An accelerator as optimizer_step sees it, of a given kind (accelerate's DistributedType name), whose own
    gradient clipping is recorded: accelerate's clipping unscales fp16 gradients and clips inside DeepSpeed's
    engine, but under FSDP it compares the parameters with its first prepared model's and fails for a second
    one (PRIME's PRM), so there torch's clipping, which reduces over the shards, must be used instead."""

    def __init__(self, kind: str):
        self.distributed_type = type("Kind", (), {"name": kind})()
        self.device, self.num_processes, self.is_main_process, self.clipped = torch.device("cpu"), 1, True, []

    def clip_grad_norm_(self, parameters, max_norm):
        if self.distributed_type.name == "FSDP":
            raise AssertionError("accelerate's clipping called under FSDP")
        self.clipped.append(max_norm)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@pytest.mark.parametrize("kind", ["FSDP", "MULTI_GPU", "NO"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0, 4.0])
def test_optimizer_step_clips_with_torch_under_fsdp_and_with_accelerate_otherwise(kind, max_grad_norm):
    """A gradient (3, 4) of norm 5 and SGD at lr 1: clipped to norm 1 or 4 the weights move by (3, 4) / 5 times
    it, with 0 not at all; the returned norm is the norm before clipping (0.0 when not clipped)."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    accelerator = ClipSpy(kind)
    norm = common.optimizer_step(accelerator, model, torch.optim.SGD(model.parameters(), lr=1.0), None, max_grad_norm)
    step = torch.tensor([[3.0, 4.0]]) * (max_grad_norm / 5 if max_grad_norm else 1.0)
    assert torch.allclose(model.weight.detach(), -step) and model.weight.grad is None
    assert norm == (pytest.approx(5.0) if max_grad_norm else 0.0)
    assert accelerator.clipped == ([max_grad_norm] if max_grad_norm and kind != "FSDP" else [])
    # no gradient at all (a process whose rows trained nothing still steps with the others): not a skip
    assert common.optimizer_step(accelerator, model, torch.optim.SGD(model.parameters(), lr=1.0), None, 0.0) == 0.0
    assert torch.allclose(model.weight.detach(), -step)


class Sharded(torch.Tensor):
    """An FSDP2 DTensor as optimizer_step sees it: to_local() is this process's shard, full_tensor() the value
    over all shards (both set by the test); its own value is what code that skipped them would see."""

    def to_local(self):
        return self.local

    def full_tensor(self):
        return self.full


def sharded(value, **parts) -> Sharded:
    t = torch.Tensor._make_subclass(Sharded, torch.as_tensor(value))
    t.__dict__.update(parts)
    return t


def test_optimizer_step_checks_each_shard_and_returns_the_norm_over_all_shards(monkeypatch):
    """Under FSDP2 each process checks its own shard of the gradient for a NaN or inf (the all-reduce of the
    verdicts then decides), and the norm torch's clipping returns is a DTensor whose full value is the norm."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    model.weight.grad = sharded([[3.0, 4.0]], local=torch.tensor([[float("inf"), 0.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert math.isnan(common.optimizer_step(ClipSpy("FSDP"), model, optimizer, None, 0.0))
    assert torch.equal(model.weight.detach(), torch.zeros(1, 2))  # this shard's inf: skipped
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: sharded(
        clip(params, max_norm), full=torch.tensor(13.0)))  # the norm over all shards: 13, this one's 5
    model.weight.grad = sharded([[3.0, 4.0]], local=torch.tensor([[3.0, 4.0]]))
    assert common.optimizer_step(ClipSpy("FSDP"), model, optimizer, None, 1.0) == 13.0
    assert torch.allclose(model.weight.detach(), torch.tensor([[-0.6, -0.8]]))


@pytest.mark.parametrize("other_bad", [0.0, 1.0])
def test_optimizer_step_skips_when_another_process_found_a_non_finite_gradient(other_bad, capsys):
    """Each process checks its own gradient; the verdicts are combined by an all-reduce of their maximum, so a
    NaN on any process skips the step on all (and this process says it was another's)."""
    accelerator = ClipSpy("MULTI_GPU")
    accelerator.num_processes, reduced = 2, []

    def reduce(tensor, op):
        reduced.append((tensor.item(), op))
        return torch.maximum(tensor, torch.tensor(other_bad)) if op == "max" else tensor + other_bad

    accelerator.reduce = reduce
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    stats = common.StepStats()
    norm = common.optimizer_step(accelerator, model, torch.optim.SGD(model.parameters(), lr=1.0), None, 0.0, stats)
    assert reduced == [(0.0, "max")]
    assert stats.sums["skipped_nonfinite"].item() == other_bad / 2  # each process's half: summed, one skip
    if other_bad:
        assert math.isnan(norm) and torch.equal(model.weight.detach(), torch.zeros(1, 2))
        assert "non-finite loss or gradient norm (on another process)" in capsys.readouterr().err
    else:
        assert norm == 0.0 and torch.equal(model.weight.detach(), torch.tensor([[-3.0, -4.0]]))


def test_three_non_finite_steps_in_a_row_stop_the_run(acc):
    model = torch.nn.Linear(3, 1)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    start = weights(model)
    stats = common.StepStats()

    def step(value):
        model(torch.full((2, 3), value)).sum().backward()
        return common.optimizer_step(acc, model, opt, None, 1.0, stats)

    assert math.isnan(step(float("nan"))) and math.isnan(step(float("inf")))
    with pytest.raises(SystemExit) as stop:
        step(float("nan"))
    assert str(stop.value) == ("3 optimizer steps in a row had a non-finite loss or gradient norm, so the run stops "
                               "with the weights of the last finite step; look for the NaN or inf in the rewards or "
                               "the advantages (metrics.jsonl: train/skipped_nonfinite) or lower the learning rate.")
    assert all(torch.equal(a, b) for a, b in zip(weights(model), start))
    assert stats.reduce(acc)["skipped_nonfinite"] == 2.0  # the third stopped the run before it was counted


# --- which tokens carry gradient, and terms that cannot pass by accident ------------------------
def logprob_grads(monkeypatch, module) -> list[torch.Tensor]:
    """Spy on `module`'s token_logprobs inside its update(): every log-prob tensor [rows, C] of a micro-batch
    that the loss is built on keeps its gradient, so a test sees which tokens the loss trained."""
    seen = []
    real = module.token_logprobs

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        lp = out[0] if isinstance(out, tuple) else out
        if lp.requires_grad:
            lp.retain_grad()
            seen.append(lp)
        return out

    monkeypatch.setattr(module, "token_logprobs", spy)
    return seen


def test_reasoning_only_loss_trains_exactly_the_reasoning_tokens(acc, toy, rollouts, monkeypatch):
    """--reasoning_only_loss: the gradient of the loss reaches every token up to and including "</think>"
    and no token after it (the written answer); without it, every completion token."""
    tok = AutoTokenizer.from_pretrained(toy / "model")
    args = grpo_logprob.Args(num_generations=2, max_completion_length=32)
    for reasoning_only in (True, False):
        grads = logprob_grads(monkeypatch, grpo_logprob)
        model, opt = policy(acc, toy)
        batch = grpo_logprob.training_batch(rollouts, torch.tensor([1.0, -1.0]), 0, acc.device, args,
                                            (tok, [TOY_ROW] * len(rollouts)) if reasoning_only else None)
        grpo_logprob.update(model, opt, None, batch, args, acc)
        (grad,) = [g.grad for g in grads]
        for i, r in enumerate(rollouts):
            k = grpo_logprob.reasoning_token_count(tok, r.completion_ids) if reasoning_only else len(r.completion_ids)
            assert 0 < k <= len(r.completion_ids)
            assert torch.all(grad[i, :k] != 0) and torch.all(grad[i, k:] == 0), (reasoning_only, i, k, grad[i])
        if reasoning_only:  # the answer after the marker exists, and is left out
            assert all(grpo_logprob.reasoning_token_count(tok, r.completion_ids) < len(r.completion_ids) - 3
                       for r in rollouts)


def test_mask_truncated_completions_leaves_a_cut_completion_without_gradient(acc, toy, rollouts, monkeypatch):
    cut = [rollouts[0], Rollout(rollouts[1].prompt_ids, rollouts[1].completion_ids, rollouts[1].logprobs,
                                rollouts[1].text, "length")]
    for flag in (True, False):
        grads = logprob_grads(monkeypatch, grpo_logprob)
        args = grpo_logprob.Args(num_generations=2, max_completion_length=32, mask_truncated_completions=flag)
        model, opt = policy(acc, toy)
        grpo_logprob.update(model, opt, None, grpo_logprob.training_batch(cut, torch.tensor([1.0, -1.0]), 0, acc.device,
                                                                          args), args, acc)
        (grad,) = [g.grad for g in grads]
        n0, n1 = len(cut[0].completion_ids), len(cut[1].completion_ids)
        assert torch.all(grad[0, :n0] != 0)
        assert torch.all(grad[1, :n1] == 0) if flag else torch.all(grad[1, :n1] != 0), (flag, grad[1])


def prm_apart_from_reference(acc, toy, rollouts):
    """A PRM that differs from the reference: the toy model moved a short way (norm 0.03) up the gradient of
    log pi(first completion) - log pi(second), so sum_t q_t (q_t = log pi_prm - log pi_ref) is larger on the
    first than on the second. Its optimizer has learning rate 0: the PRM that scores stays this one."""
    prm = toy_model(toy)
    batch = collate(rollouts, 0, "cpu")
    lp = token_logprobs(prm, batch) * batch["completion_mask"]
    grads = torch.autograd.grad(lp[0].sum() - lp[1].sum(), list(prm.parameters()))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(prm.parameters(), grads):
            p.add_(0.03 * g / norm)
    return acc.prepare(prm, torch.optim.SGD(prm.parameters(), lr=0.0))


@pytest.mark.parametrize("baseline", ["paper", "code"])
def test_prime_process_reward_alone_moves_the_policy_its_way(acc, toy, rollouts, baseline):
    """Equal outcomes (both right): the outcome advantages are exactly 0, so only the implicit process reward
    moves the policy. It is non-zero (the PRM is not the reference) and larger on the completion the PRM
    prefers, and the step raises that completion and lowers the other. Granularity whole (the sum of q_t on the
    last token): every token of a completion then gets a return of one sign; with per-token rewards a
    completion's early and late tokens can get returns of either sign."""
    model, opt = policy(acc, toy)
    prm, prm_opt = prm_apart_from_reference(acc, toy, rollouts)
    args = prime.Args(num_generations=2, max_grad_norm=0.0, num_mini_batches=1, process_baseline=baseline,
                      granularity="whole")
    batch = collate(rollouts, 0, acc.device)
    batch["labels"] = torch.tensor([1.0, 1.0])
    before = sequence_logprobs(model, rollouts)
    _, seq_rewards = prime.update(model, opt, batch, args, acc, prm, prm_opt, frozen(toy))
    after = sequence_logprobs(model, rollouts)
    assert seq_rewards.abs().min() > 0.01 and seq_rewards[0] > seq_rewards[1] + 0.05, seq_rewards  # beta sum_t q_t
    assert (batch["advantages"][0] > 0).all() and (batch["advantages"][1][batch["completion_mask"][1] > 0] < 0).all()
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)
    # the same step with the outcome only (coefficient 0) does not move the policy: nothing else did
    model, opt = policy(acc, toy)
    start = weights(model)
    batch = collate(rollouts, 0, acc.device)
    batch["labels"] = torch.tensor([1.0, 1.0])
    prime.update(model, opt, batch, prime.Args(**{**vars(args), "process_reward_coef": 0.0}), acc, prm, prm_opt,
                 frozen(toy))
    assert all(torch.equal(a, b) for a, b in zip(weights(model), start))


@pytest.mark.parametrize("baseline", ["paper", "code"])
def test_prime_update_feeds_its_returns_the_process_rewards_of_its_path(acc, toy, rollouts, baseline):
    """update()'s advantages (no whitening) are the pure functions' returns from the PRM's and the reference's
    own log-probs: paper beta q_t; code q_t without beta over the batch's largest |return| (beta 0.5 would
    change the paper's numbers and not the code's)."""
    model, opt = policy(acc, toy, lr=0.0)
    prm, prm_opt = prm_apart_from_reference(acc, toy, rollouts)
    ref = frozen(toy)
    args = prime.Args(num_generations=2, num_mini_batches=1, process_baseline=baseline, beta=0.5,
                      whiten_advantages=False, process_reward_coef=2.0)
    batch = collate(rollouts, 0, acc.device)
    batch["labels"] = torch.tensor([1.0, 0.0])
    mask = batch["completion_mask"]
    with torch.no_grad():
        q = (token_logprobs(prm, batch) - token_logprobs(ref, batch)) * mask
    prime.update(model, opt, batch, args, acc, prm, prm_opt, ref)
    scores = 0.5 * q if baseline == "paper" else q / (prime.peak_return(q, mask) + 1e-6)
    last = prime.last_token_mask(mask)
    outcome = prime.discounted_returns(prime.leave_one_out(batch["labels"][:, None] * last, last, 2), mask, 1.0)
    process = prime.discounted_returns(prime.leave_one_out(scores, mask, 2, baseline), mask, 1.0)
    assert torch.allclose(batch["advantages"], outcome + 2.0 * process, atol=1e-5)
    assert process.abs().max() > 0.05  # the process part is there
    if baseline == "code":
        assert prime.discounted_returns(scores, mask, 1.0).abs().max() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("algo", ["raft++", "raft"])
def test_raft_pp_clips_the_ratio_on_its_second_step(acc, toy, rollouts, monkeypatch, algo):
    """RAFT++ over two iterations: after the first step some tokens of the positive sample have a ratio
    s_t = exp(lp - old) above 1 + eps_high; the second step gives them no gradient and the rest -s_t. Plain
    RAFT keeps the gradient on every token (and ends at other weights)."""
    grads = logprob_grads(monkeypatch, raft_pp)
    model, opt = policy(acc, toy, lr=0.05)
    args = raft_pp.Args(algo=algo, num_generations=2, max_grad_norm=0.0, num_iterations=2, log_kl=False,
                        epsilon_high=0.05)
    selected = torch.tensor([True, False])
    batch = raft_pp.training_batch(rollouts, selected, 0, acc.device, args)
    metrics = raft_pp.update(model, opt, None, batch, args, acc)
    first, second = [g for g in grads]
    n = len(rollouts[0].completion_ids)
    assert torch.all(first.grad[0, :n] != 0) and torch.all(first.grad[1] == 0)
    if algo == "raft":
        assert torch.all(second.grad[0, :n] != 0) and "clip_ratio/high_mean" not in metrics
        return
    ratio = torch.exp(second.detach() - batch["old_logprobs"])[0, :n]
    clipped = ratio > 1 + args.epsilon_high
    assert 0 < clipped.sum() < n, ratio
    assert torch.all(second.grad[0, :n][clipped] == 0) and torch.all(second.grad[0, :n][~clipped] != 0)
    # d/d lp of -(1/|D|)(1/|a|) s_t = -s_t / n where not clipped
    assert torch.allclose(second.grad[0, :n][~clipped], -ratio[~clipped] / n, atol=1e-6)
    # the logged share: clipped tokens of the trained ones, over both iterations (the first has none)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(clipped.sum().item() / (2 * n))


def moved_policy(acc, toy, lr):
    model, opt = policy(acc, toy, lr=lr)
    with torch.no_grad():  # away from the reference first: a KL term has something to pull back
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, opt


@pytest.mark.parametrize("script", ["raft_pp", "reinforce_rej"])
def test_kl_and_entropy_terms_of_raft_and_reinforce(acc, toy, rollouts, script):
    """kl_coef pulls the policy towards the reference and entropy_coef raises the entropy: the same step
    from the same weights with the term ends closer to the reference (higher entropy) than without it. RAFT
    applies them to the positive sample's tokens, Reinforce to the kept samples'."""
    module = {"raft_pp": raft_pp, "reinforce_rej": reinforce_rej}[script]
    ref = frozen(toy)

    def step(lr, **coefs):
        model, opt = moved_policy(acc, toy, lr=lr)
        args = module.Args(num_generations=2, max_grad_norm=0.0, num_iterations=1, **coefs)
        if script == "raft_pp":
            batch = raft_pp.training_batch(rollouts, torch.tensor([True, False]), 0, acc.device, args)
        else:
            batch = reinforce_rej.training_batch(rollouts, torch.tensor([1.0, -1.0]), torch.ones(2, dtype=torch.bool),
                                                 0, acc.device)
        metrics = module.update(model, opt, None, batch, args, acc, ref)
        return mean_entropy_and_kl(model, ref, rollouts), metrics

    (_, kl_plain), metrics = step(0.002)  # a small step: the k3 gradient grows as exp(ref - lp)
    (_, kl_pulled), _ = step(0.002, kl_coef=1.0)
    (entropy_plain, _), _ = step(0.05)
    (entropy_raised, _), _ = step(0.05, entropy_coef=1.0)
    assert metrics["kl"] > 0.01  # the moved policy is away from the reference (logged before the step)
    assert kl_pulled < kl_plain - 0.01, (kl_plain, kl_pulled)
    assert entropy_raised > entropy_plain + 0.01, (entropy_plain, entropy_raised)


# --- each flag of each script changes a tested number ---------------------------------------------
# Flags that update() reads: {flag: (other value, settings on both sides)}. The same step from the same
# weights with the other value must end at other weights; SAME lists flags that must not change them.
UPDATE_FLAGS = {
    "grpo_logprob": {
        "temperature": (0.7, {}), "max_completion_length": (64, {"loss_type": "seq-mean-token-sum-norm"}),
        "max_grad_norm": (0.01, {}), "num_iterations": (1, {}), "epsilon": (0.01, {}), "epsilon_high": (0.01, {}),
        "loss_type": ("seq-mean-token-mean", {}), "scale_rewards": ("batch", {}), "beta": (0.0, {}),
        "mask_truncated_completions": (True, {}), "is_correction": ("none", {}), "is_level": ("sequence", {}),
        "is_cap": (1.5, {}), "is_floor": (0.9, {"is_correction": "mask"}), "reasoning_only_loss": ("on", {}),
        "micro_batch_size": (1, {}),
    },
    "raft_pp": {
        "algo": ("raft", {}), "temperature": (0.7, {}), "max_grad_norm": (0.01, {}), "mini_batches": (2, {}),
        "num_iterations": (1, {}), "epsilon_high": (0.01, {}), "normalizer": ("batch", {}),
        "loss_type": ("token-mean", {}), "kl_coef": (0.0, {}), "entropy_coef": (0.0, {}), "micro_batch_size": (1, {}),
        "epsilon": (0.5, {}),
    },
    "reinforce_rej": {
        "temperature": (0.7, {}), "max_grad_norm": (0.01, {}), "mini_batches": (2, {}), "num_iterations": (1, {}),
        "epsilon": (0.01, {}), "epsilon_high": (0.01, {"kl_coef": 0.0, "entropy_coef": 0.0}),
        "loss_type": ("token-mean", {}), "kl_coef": (0.0, {}), "entropy_coef": (0.0, {}), "micro_batch_size": (1, {}),
    },
    "prime": {
        "temperature": (0.7, {}), "process_reward_coef": (0.0, {}), "beta": (0.5, {}), "granularity": ("whole", {}),
        "reference": ("old_policy", {}), "prm_update": ("before", {}), "process_baseline": ("code", {}),
        "gamma": (0.5, {}), "whiten_advantages": (False, {}), "max_grad_norm": (0.01, {}),
        "num_mini_batches": (1, {}), "epsilon": (0.01, {}), "micro_batch_size": (1, {}),
    },
}
# micro-batches only split the work (gradient accumulation); RAFT++ trains advantage +1 only, so its lower
# clip never acts (-min(s, clip(s)) = -s below 1 - epsilon)
SAME = {("grpo_logprob", "micro_batch_size"), ("raft_pp", "micro_batch_size"), ("reinforce_rej", "micro_batch_size"),
        ("prime", "micro_batch_size"), ("raft_pp", "epsilon")}
# Flags that main() or the set-up reads: the test that checks their number.
SETUP = "test_update_steps.py::test_setup_takes_the_optimizer_flags"
OPTIMIZER = {"learning_rate": SETUP, "lr_schedule": SETUP, "warmup_steps": SETUP, "weight_decay": SETUP}
GRPO_RUN, RAFT_RUN = "test_grpo.py::test_grpo_end_to_end_hf", "test_raft_pp.py::test_raft_pp_under_accelerate_launch"
REJ_RUN, PRIME_RUN = ("test_reinforce_rej.py::test_reinforce_under_accelerate_launch_with_vllm",
                      "test_prime.py::test_prime_end_to_end")
TOP_P = "test_common.py::test_top_p_filter_keeps_smallest_nucleus"
LOG_KL = "test_raft_pp.py::test_raft_on_two_processes_resume_equals_straight"
OTHER_FLAGS = {
    "grpo_logprob": {
        **OPTIMIZER, "prompts_per_step": GRPO_RUN, "num_generations": GRPO_RUN, "total_steps": GRPO_RUN,
        "top_p": TOP_P, "reward": "test_grpo.py::test_parse_reward_weights",
        "logprob_variant": "test_grpo.py::test_reward_terms_hand_numbers",
        "logprob_debias": "test_grpo.py::test_reward_terms_hand_numbers",
        "logprob_scorer": "test_grpo.py::test_logprob_reward_end_to_end_under_accelerate_launch",
        "reward_norm": "test_grpo.py::test_normalize_rewards_hand_numbers",
        "reward_norm_scope": "test_grpo.py::test_normalize_rewards_hand_numbers",
    },
    "raft_pp": {
        **OPTIMIZER, "prompts_per_step": RAFT_RUN, "num_generations": RAFT_RUN, "total_steps": RAFT_RUN,
        "max_completion_length": GRPO_RUN, "top_p": TOP_P, "log_kl": LOG_KL,
        "negative_reward": "test_raft_pp.py::test_positive_samples_keep_every_tie_and_nothing_from_all_wrong_groups",
    },
    "reinforce_rej": {
        **OPTIMIZER, "prompts_per_step": REJ_RUN, "num_generations": REJ_RUN, "total_steps": REJ_RUN,
        "max_completion_length": GRPO_RUN, "top_p": TOP_P, "log_kl": LOG_KL,
        "algo": "test_reinforce_rej.py::test_mixed_prompts_drop_all_correct_and_all_wrong",
        "negative_reward": "test_reinforce_rej.py::test_zero_one_rewards_give_wrong_answers_no_gradient",
    },
    "prime": {
        "prompts_per_step": PRIME_RUN, "num_generations": PRIME_RUN, "total_steps": PRIME_RUN,
        "max_completion_length": GRPO_RUN, "filter_low": "test_prime.py::test_filter_keeps_accuracy_in_range",
        "filter_high": "test_prime.py::test_filter_keeps_accuracy_in_range",
        "oversample": "test_prime.py::test_prime_on_code_rows",
        "max_sample_rounds": "test_prime.py::test_prime_on_code_rows",
        "prm_learning_rate": SETUP, "learning_rate": SETUP, "weight_decay": SETUP,
    },
}


def own_flags(module) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(module.Args)} - {f.name for f in dataclasses.fields(common.RunArgs)}


@pytest.mark.parametrize("name", sorted(UPDATE_FLAGS))
def test_every_flag_has_a_test_of_its_number(name):
    """Every flag a script adds to common.RunArgs is either read by update() (UPDATE_FLAGS: the next test
    steps with and without it) or named with the test that checks its number, and that test exists."""
    import ast
    from pathlib import Path

    module = {"grpo_logprob": grpo_logprob, "raft_pp": raft_pp, "reinforce_rej": reinforce_rej, "prime": prime}[name]
    assert set(UPDATE_FLAGS[name]) | set(OTHER_FLAGS[name]) == own_flags(module)
    assert not set(UPDATE_FLAGS[name]) & set(OTHER_FLAGS[name])
    for node in set(OTHER_FLAGS[name].values()):
        file, test = node.split("::")
        source = ast.parse((Path(__file__).parent / file).read_text())
        assert test in {f.name for f in source.body if isinstance(f, ast.FunctionDef)}, node


def update_with(name, acc, toy, rollouts, skewed, flags) -> tuple[list[torch.Tensor], dict]:
    """One update() of `name` on four completions (two groups of two) from weights moved away from the toy
    model, with every term active (several iterations, KL, entropy, IS correction, a truncated completion, a
    PRM apart from the reference), and `flags` on top. Returns the weights it ends at and the metrics."""
    torch.manual_seed(0)
    model, opt = moved_policy(acc, toy, lr=0.05)
    ref = frozen(toy)
    if name == "grpo_logprob":
        args = grpo_logprob.Args(**{"num_generations": 2, "max_completion_length": 32, "num_iterations": 2,
                                    "beta": 0.1, "is_correction": "truncate", "max_grad_norm": 0.0,
                                    "reasoning_only_loss": "off", **flags})
        advantages, _ = grpo_logprob.batch_advantages(torch.tensor([1.0, 0.0, 0.6, 0.2]), args, acc)
        reasoning = ((AutoTokenizer.from_pretrained(toy / "model"), [TOY_ROW] * len(skewed))
                     if args.reasoning_only_loss == "on" else None)
        batch = grpo_logprob.training_batch(skewed, advantages, 0, acc.device, args, reasoning)
        metrics = grpo_logprob.update(model, opt, None, batch, args, acc, ref)
    elif name == "raft_pp":
        args = raft_pp.Args(**{"num_generations": 2, "num_iterations": 2, "max_grad_norm": 0.0, "kl_coef": 0.1,
                               "entropy_coef": 0.1, "log_kl": False, **flags})
        batch = raft_pp.training_batch(skewed, torch.tensor([True, False, True, True]), 0, acc.device, args)
        metrics = raft_pp.update(model, opt, None, batch, args, acc, ref)
    elif name == "reinforce_rej":
        args = reinforce_rej.Args(**{"num_generations": 2, "num_iterations": 2, "max_grad_norm": 0.0, "kl_coef": 0.1,
                                     "entropy_coef": 0.1, **flags})
        rewards, kept = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, dtype=torch.bool)
        batch = reinforce_rej.training_batch(skewed, rewards, kept, 0, acc.device)
        metrics = reinforce_rej.update(model, opt, None, batch, args, acc, ref)
    else:
        args = prime.Args(**{"num_generations": 2, "num_mini_batches": 2, "max_grad_norm": 0.0, **flags})
        prm, _ = prm_apart_from_reference(acc, toy, rollouts)
        prm, prm_opt = acc.prepare(prm, torch.optim.SGD(prm.parameters(), lr=0.05))
        batch = collate(skewed, 0, acc.device)
        batch["labels"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
        metrics, _ = prime.update(model, opt, batch, args, acc, prm, prm_opt,
                                  ref if args.reference == "frozen" else None)
    return weights(model), metrics


_BASE_STEPS = {}  # (script, settings) -> the weights of the step without the flag, shared by the flags


@pytest.mark.parametrize("name,flag", [(n, f) for n in UPDATE_FLAGS for f in UPDATE_FLAGS[n]])
def test_each_update_flag_changes_the_step(acc, toy, rollouts, name, flag):
    """The same step with the flag's other value ends at other weights (or, for SAME, at the same ones)."""
    value, both = UPDATE_FLAGS[name][flag]
    model, _ = moved_policy(acc, toy, lr=0.05)
    four = [*rollouts, rollouts[0], Rollout(rollouts[1].prompt_ids, rollouts[1].completion_ids, rollouts[1].logprobs,
                                            rollouts[1].text, "length")]
    skewed, _ = mismatched(model, four, [0.25, 0.7, 1.0, 1.8])
    key = (name, tuple(sorted(both.items())))
    if key not in _BASE_STEPS:
        _BASE_STEPS[key] = update_with(name, acc, toy, rollouts, skewed, both)[0]
    base = _BASE_STEPS[key]
    other, _ = update_with(name, acc, toy, rollouts, skewed, {**both, flag: value})
    gap = max((a - b).abs().max().item() for a, b in zip(base, other))
    if (name, flag) in SAME:
        assert gap < 1e-6, (flag, gap)
    else:
        assert gap > 1e-6, (flag, gap)


def test_setup_takes_the_optimizer_flags(acc, toy):
    """--learning_rate, --weight_decay, --lr_schedule and --warmup_steps reach the optimizer and its schedule
    (common.setup_policy); prime.py's PRM gets --prm_learning_rate."""
    args = grpo_logprob.Args(model=str(toy / "model"), learning_rate=0.25, weight_decay=0.125, lr_schedule="cosine",
                             warmup_steps=2)
    _, optimizer, scheduler, _ = common.setup_policy(args, acc, 6, needs_frozen=False)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.125 and scheduler.get_last_lr()[0] == 0.0  # warmup from 0
    lrs = []
    for _ in range(6):
        optimizer.step(), scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    # warmup 0.125, 0.25; then the cosine over 4 steps: 0.25 * [c1, 0.5, c3, 0]
    c1, c3 = (2 + math.sqrt(2)) / 4, (2 - math.sqrt(2)) / 4
    assert lrs == pytest.approx([0.125, 0.25, 0.25 * c1, 0.125, 0.25 * c3, 0.0], abs=1e-12)
    import inspect

    source = inspect.getsource(prime.main)  # the PRM's optimizer is built in main()
    assert "AdamW(prm.parameters(), lr=args.prm_learning_rate, weight_decay=args.weight_decay)" in source


# --- the formulas each script writes for itself (single file per algorithm) ------------------------
@pytest.mark.parametrize("name", ["grpo_logprob", "raft_pp", "reinforce_rej"])
def test_each_scripts_kl_k3_and_aggregate_loss_by_hand(name):
    """k3 = exp(d) - d - 1 with d = ref - lp = -ln 2: 0.5 + ln 2 - 1, and 0 where the policy is the reference.
    aggregate_loss at |D| = 1 (one sample; one token under token-mean): that sample's mean, that token's value."""
    module = {"grpo_logprob": grpo_logprob, "raft_pp": raft_pp, "reinforce_rej": reinforce_rej}[name]
    lp, ref = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.5]))
    assert torch.allclose(module.kl_k3(lp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]), atol=1e-6)
    token_loss, mask = torch.tensor([[2.0, 4.0], [8.0, 16.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert module.aggregate_loss(token_loss, mask, "seq-mean-token-mean", 1.0).item() == 3.0
    assert module.aggregate_loss(token_loss, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "token-mean", 1.0).item() == 4.0


# --- update()'s wiring: which rows each pass sees, what it logs, when it steps --------------------
WIRED = {"grpo_logprob": grpo_logprob, "raft_pp": raft_pp, "reinforce_rej": reinforce_rej}


def wired_step(name, acc, model, opt, rollouts, trained=(True, True, True, True), scheduler=None, ref=None, **flags):
    """One update() of `name` on four completions (two groups of two); `trained` says which completions carry
    loss (RAFT's positive samples, Reinforce-rej's kept prompts; GRPO: the advantages' signs). Each batch row
    carries its index in "row", which index_batch passes to every micro-batch."""
    trained = torch.tensor(trained)
    if name == "grpo_logprob":
        args = grpo_logprob.Args(**{"num_generations": 2, "max_grad_norm": 0.0, "max_completion_length": 32, **flags})
        batch = grpo_logprob.training_batch(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5]) * trained, 0, acc.device,
                                            args)
    elif name == "raft_pp":
        args = raft_pp.Args(**{"num_generations": 2, "max_grad_norm": 0.0, **flags})
        batch = raft_pp.training_batch(rollouts, trained, 0, acc.device, args)
    else:
        args = reinforce_rej.Args(**{"num_generations": 2, "max_grad_norm": 0.0, **flags})
        batch = reinforce_rej.training_batch(rollouts, torch.tensor([1.0, -1.0, 1.0, -1.0]), trained, 0, acc.device)
    batch["row"] = torch.arange(len(rollouts), device=acc.device)
    return WIRED[name].update(model, opt, scheduler, batch, args, acc, ref), args


def steps_counted(opt):
    """A schedule that only counts the optimizer steps it is stepped with (last_epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@pytest.mark.parametrize("name", sorted(WIRED))
def test_update_runs_each_mini_batch_in_its_micro_batches_and_steps_after_each(acc, toy, rollouts, monkeypatch, name):
    """Two iterations over two mini-batches of two completions, in micro-batches of one: each pass sees rows
    0, 1 then 2, 3 (GRPO, which has no mini-batches: 0 to 3), gradients are synchronized on the last
    micro-batch of each optimizer step only, the optimizer and the schedule step once per mini-batch, and the
    logged loss is the mean of the optimizer steps' losses (each the sum of its micro-batches' shares)."""
    module, seen, synced, clips = WIRED[name], [], [], []
    real_loss, real_accumulate = module.micro_batch_loss, module.accumulate

    def loss_spy(model, mb, normalizer, args):
        out = real_loss(model, mb, normalizer, args)
        seen.append((mb["row"].tolist(), out[0].item()))
        clips.append({k: v.item() for k, v in out[2].items() if k.startswith("clip")})
        return out

    def accumulate_spy(accelerator, model, last):
        synced.append((model is wired_model, last))
        return real_accumulate(accelerator, model, last)

    monkeypatch.setattr(module, "micro_batch_loss", loss_spy)
    monkeypatch.setattr(module, "accumulate", accumulate_spy)
    wired_model, opt = policy(acc, toy, lr=0.01)
    four = [*rollouts, *rollouts]
    flags = dict(num_iterations=2, micro_batch_size=1, epsilon=0.01, epsilon_high=0.01)
    flags |= {} if name == "grpo_logprob" else {"mini_batches": 2}
    scheduler = steps_counted(opt)
    metrics, args = wired_step(name, acc, wired_model, opt, four, scheduler=scheduler, **flags)
    minis = [[0, 1], [2, 3]] if name != "grpo_logprob" else [[0, 1, 2, 3]]
    assert [rows for rows, _ in seen] == [[r] for _ in range(2) for mini in minis for r in mini]
    assert synced == [(True, r == mini[-1]) for _ in range(2) for mini in minis for r in mini]
    assert scheduler.last_epoch == 2 * len(minis)
    assert metrics["loss"] == pytest.approx(sum(loss for _, loss in seen) / scheduler.last_epoch, rel=1e-6)
    # the clip shares: the micro-batches' clipped tokens over the trained tokens of both iterations
    trained = 2 * sum(len(r.completion_ids) for r in four)
    logged = {"raft_pp": {"clipped": "clip_ratio/high_mean"},
              "reinforce_rej": {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean"}}.get(name, {})
    for key, metric in logged.items():
        assert sum(c[key] for c in clips) > 0, key  # the second iteration clips some tokens
        assert metrics[metric] == pytest.approx(sum(c[key] for c in clips) / trained, rel=1e-6), key


RHO = torch.tensor([0.5, 1.0, 2.0, 4.0])  # the sampler/trainer ratio put into each of four completions


@torch.no_grad()
def sampled_off_by_rho(model, rollouts, temperature: float):
    """The rollouts with sampler log-probs the model's own at `temperature` minus log RHO[i] for completion i
    (a sampler/trainer gap of known size), and the model's log-probs and entropies there [N, C]."""
    own, entropy = token_logprobs(model, collate(rollouts, 0, "cpu"), temperature, with_entropy=True)
    skewed = [Rollout(r.prompt_ids, r.completion_ids, (own[i, :len(r.completion_ids)] - math.log(RHO[i])).tolist(),
                      r.text, r.finish_reason) for i, r in enumerate(rollouts)]
    return skewed, own, entropy


@pytest.mark.parametrize("name,flags,gap_rows", [
    ("grpo_logprob", {"num_iterations": 1, "beta": 0.1}, [0, 1, 2, 3]),  # no old log-probs: measured in the loss's pass
    ("grpo_logprob", {"num_iterations": 2, "beta": 0.1}, [0, 1, 2, 3]),  # old log-probs of every row, before any step
    ("raft_pp", {"algo": "raft++", "num_iterations": 1, "mini_batches": 1}, [0, 1, 2, 3]),
    ("raft_pp", {"algo": "raft++", "num_iterations": 1, "mini_batches": 2}, [0, 1, 2, 3]),
    ("raft_pp", {"algo": "raft", "num_iterations": 1, "mini_batches": 2}, [0, 1]),  # plain RAFT has no old log-probs
    ("reinforce_rej", {"num_iterations": 1, "mini_batches": 1}, [0, 1, 2, 3]),
    ("reinforce_rej", {"num_iterations": 2, "mini_batches": 2}, [0, 1, 2, 3]),
])
def test_update_logs_the_sampling_policys_entropy_kl_and_logprob_gap(acc, toy, rollouts, name, flags, gap_rows):
    """At temperature 0.7 and learning rate 0 (the policy stays where it sampled), the logged entropy and KL
    to the reference are the masked means over every sampled token of the policy's own at 0.7 (the padding
    of the shorter completions left out), and the sampler/trainer log-prob gap is the one put into the
    sampler's log-probs: |log rho| with rho = 0.5, 1, 2, 4 per completion, measured on the weights that sampled
    (the old log-probs when there are, else the first mini-batch's pass). The log-prob passes are timed."""
    model, opt = moved_policy(acc, toy, lr=0.0)
    ref, four = frozen(toy), [*rollouts, *rollouts]
    skewed, own, entropy = sampled_off_by_rho(model, four, 0.7)
    batch = collate(four, 0, "cpu")
    with torch.no_grad():
        kl = grpo_logprob.kl_k3(own, token_logprobs(ref, batch, 0.7))
    mask = batch["completion_mask"]
    assert (mask == 0).any()  # unequal lengths: padding that no metric may count
    common.logprob_timer.pop()
    metrics, _ = wired_step(name, acc, model, opt, skewed, ref=ref, temperature=0.7, **flags)
    assert metrics["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5)
    gap = RHO.log().abs()[gap_rows, None] * mask[gap_rows]
    assert metrics["sampler/logprob_gap_mean"] == pytest.approx((gap.sum() / mask[gap_rows].sum()).item(), abs=1e-5)
    assert metrics["sampler/logprob_gap_max"] == pytest.approx(gap.max().item(), abs=1e-5)
    assert "time/logprobs" in common.logprob_timer.pop()


@pytest.mark.parametrize("reference,temperature", [("old_policy", 0.7), ("old_policy", 2.0), ("frozen", 0.7)])
def test_prime_update_logs_the_sampling_policys_entropy_and_logprob_gap(acc, toy, rollouts, reference, temperature):
    """PRIME at a temperature other than 1 and learning rate 0: the old log-probs are the policy's own at that
    temperature, the logged entropy their masked mean's, the sampler/trainer gap the |log rho| put into the
    sampler's log-probs; the PRM's reference is at temperature 1 (--reference old_policy: the policy before the
    step, not its old log-probs; frozen: the starting model). The log-prob passes are timed."""
    model, opt = moved_policy(acc, toy, lr=0.0)
    prm, prm_opt = prm_apart_from_reference(acc, toy, rollouts)
    ref, four = frozen(toy), [*rollouts, *rollouts]
    skewed, own, entropy = sampled_off_by_rho(model, four, temperature)
    batch = collate(four, 0, "cpu")
    with torch.no_grad():
        at_one = token_logprobs(model if reference == "old_policy" else ref, batch)
    mask = batch["completion_mask"]
    args = prime.Args(num_generations=2, num_mini_batches=2, max_grad_norm=0.0, temperature=temperature,
                      reference=reference)
    batch = collate(skewed, 0, acc.device)
    batch["labels"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    common.logprob_timer.pop()
    metrics, _ = prime.update(model, opt, batch, args, acc, prm, prm_opt, ref if reference == "frozen" else None)
    assert torch.allclose(batch["old_logprobs"], own * mask, atol=1e-5)
    assert torch.allclose(batch["ref_logprobs"], at_one * mask, atol=1e-5)
    assert not torch.allclose(at_one * mask, own * mask, atol=1e-2)  # temperature 1 and the other differ here
    assert metrics["entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-5)
    gap = RHO.log().abs()[:, None] * mask
    assert metrics["sampler/logprob_gap_mean"] == pytest.approx((gap.sum() / mask.sum()).item(), abs=1e-5)
    assert metrics["sampler/logprob_gap_max"] == pytest.approx(gap.max().item(), abs=1e-5)
    assert "time/logprobs" in common.logprob_timer.pop()


def test_prime_update_metrics_are_its_passes_sums(acc, toy, rollouts, monkeypatch):
    """PRIME's logged metrics, each from what its passes computed (2 mini-batches of 2 rows, one row per
    micro-batch): the loss is the mini-batches' token-mean PPO losses averaged; entropy and clip share are over
    the trained tokens (the second mini-batch, after a step, clips); the mean |advantage| is over the valid
    tokens (padding present); the PRM's loss is its mean cross-entropy; the gradient norm is the last step's.
    Gradients are synchronized on each mini-batch's last micro-batch only, of the model that pass trains. With
    one row per mini-batch every row still trains and the PRM's loss is still its mean. A NaN in the weights
    is counted as a skipped step."""
    seen, synced, real, real_accumulate = [], [], prime.policy_micro_batch_loss, prime.accumulate

    def spy(model, mb, temperature, epsilon):
        loss, sums = real(model, mb, temperature, epsilon)
        seen.append((loss.item(), {k: v.item() for k, v in sums.items()}))
        return loss, sums

    def accumulate_spy(accelerator, model, last):
        synced.append(("policy" if model is trained else "prm" if model is prm else None, last))
        return real_accumulate(accelerator, model, last)

    monkeypatch.setattr(prime, "policy_micro_batch_loss", spy)
    monkeypatch.setattr(prime, "accumulate", accumulate_spy)
    trained, opt = policy(acc, toy, lr=0.5)
    prm, prm_opt = prm_apart_from_reference(acc, toy, rollouts)
    ref, four = frozen(toy), [*rollouts, *rollouts]
    args = prime.Args(num_generations=2, num_mini_batches=2, micro_batch_size=1, max_grad_norm=100.0, epsilon=0.001,
                      beta=0.5)
    batch = collate(four, 0, acc.device)
    batch["labels"] = labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = batch["completion_mask"]
    assert (mask == 0).any()
    with torch.no_grad():
        bce = prime.prm_loss(token_logprobs(prm, batch), token_logprobs(ref, batch), mask, labels, 0.5)
    metrics, _ = prime.update(trained, opt, batch, args, acc, prm, prm_opt, ref)
    losses, sums = [loss for loss, _ in seen], [s for _, s in seen]
    tokens = sum(s["tokens"] for s in sums)
    assert len(seen) == 4 and tokens == mask.sum().item()
    assert metrics["loss"] == pytest.approx(((losses[0] + losses[1]) / (sums[0]["tokens"] + sums[1]["tokens"])
                                             + (losses[2] + losses[3]) / (sums[2]["tokens"] + sums[3]["tokens"])) / 2)
    assert metrics["entropy"] == pytest.approx(sum(s["entropy"] for s in sums) / tokens)
    assert sum(s["clipped"] for s in sums) > 0
    assert metrics["clip_ratio"] == pytest.approx(sum(s["clipped"] for s in sums) / tokens)
    advantages = batch["advantages"]
    assert metrics["advantages/abs_mean"] == pytest.approx(((advantages.abs() * mask).sum() / mask.sum()).item())
    assert metrics["prm/loss"] == pytest.approx(bce.mean().item(), rel=1e-5)
    assert metrics["grad_norm"] > 0 and metrics["train/skipped_nonfinite"] == 0.0
    # the PRM's pass (after it scored) comes before the policy's: 2 mini-batches of 2 micro-batches each
    assert synced == [(who, last) for who in ("prm", "policy") for _ in range(2) for last in (False, True)]
    seen.clear()
    args = prime.Args(**{**vars(args), "num_mini_batches": 4, "micro_batch_size": 2})
    metrics, _ = prime.update(trained, opt, collate(four, 0, acc.device) | {"labels": labels}, args, acc, prm, prm_opt,
                              ref)
    assert len(seen) == 4 and metrics["prm/loss"] == pytest.approx(bce.mean().item(), rel=1e-5)
    with torch.no_grad():
        next(trained.parameters()).fill_(float("nan"))
    args = prime.Args(num_generations=2, num_mini_batches=1, process_reward_coef=0.0)
    metrics, _ = prime.update(trained, opt, collate(four, 0, acc.device) | {"labels": labels}, args, acc)
    assert metrics["train/skipped_nonfinite"] == 1.0


@pytest.mark.parametrize("name", ["raft_pp", "reinforce_rej"])
def test_a_mini_batch_with_nothing_to_train_skips_only_its_own_steps(acc, toy, rollouts, name):
    """Mini-batch 0 carries no loss (no positive sample; its prompt removed), mini-batch 1 does: over two
    iterations only mini-batch 1 steps (twice, the schedule with it), and the two skips are counted. With
    nothing to train anywhere no step is taken and the gradient norm is logged as 0 (clipping on: a step
    would log its norm)."""
    model, opt = policy(acc, toy)
    scheduler = steps_counted(opt)
    metrics, _ = wired_step(name, acc, model, opt, [*rollouts, *rollouts], (False, False, True, True), scheduler,
                            num_iterations=2, mini_batches=2, max_grad_norm=100.0)
    assert scheduler.last_epoch == 2 and metrics["skipped_updates"] == 2.0 and metrics["grad_norm"] > 0
    assert metrics["train/skipped_nonfinite"] == 0.0
    model, opt = policy(acc, toy)
    scheduler = steps_counted(opt)
    metrics, _ = wired_step(name, acc, model, opt, [*rollouts, *rollouts], (False,) * 4, scheduler,
                            num_iterations=2, mini_batches=2, max_grad_norm=100.0)
    assert scheduler.last_epoch == 0 and metrics["skipped_updates"] == 4.0 and metrics["grad_norm"] == 0.0
    assert metrics["train/skipped_nonfinite"] == 0.0  # no optimizer step ran to count it: still a number


@pytest.mark.parametrize("name", sorted(WIRED))
def test_update_counts_a_non_finite_step(acc, toy, rollouts, name):
    """A NaN in the weights makes the loss and the gradient NaN: update() skips the optimizer step and its
    metrics count it (optimizer_step gets the update's statistics)."""
    model, opt = policy(acc, toy)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    metrics, _ = wired_step(name, acc, model, opt, [*rollouts, *rollouts], num_iterations=1,
                            **({} if name == "grpo_logprob" else {"mini_batches": 1}))
    assert metrics["train/skipped_nonfinite"] == 1.0


@pytest.mark.parametrize("name", sorted(WIRED))
def test_training_batch_puts_every_tensor_on_the_given_device(rollouts, name):
    """The meta device stands for a GPU: every tensor of the batch lands on the device training_batch is
    given, the masks and rewards built from CPU tensors included."""
    device, trained = torch.device("meta"), torch.tensor([True, False])
    for normalizer in ("selected", "batch"):
        if name == "grpo_logprob":
            batch = grpo_logprob.training_batch(rollouts, torch.tensor([1.0, -1.0]), 0, device,
                                                grpo_logprob.Args(mask_truncated_completions=True))
        elif name == "raft_pp":
            batch = raft_pp.training_batch(rollouts, trained, 0, device, raft_pp.Args(normalizer=normalizer))
        else:
            batch = reinforce_rej.training_batch(rollouts, torch.tensor([1.0, -1.0]), trained, 0, device)
        assert {k: v.device.type for k, v in batch.items()} == {k: "meta" for k in batch}


def test_reinforce_rej_logs_the_shares_of_tokens_clipped_below_and_above(acc, toy, rollouts):
    """Old log-probs set apart from the policy's by log rho per completion, rho = 2, 0.5, 1, 1 with rewards
    +1, -1, +1, -1 and epsilon 0.2: the first completion's tokens are clipped above (s > 1.2, r > 0), the
    second's below (s < 0.8, r < 0), none of the others; each share is of all trained tokens (padding out)."""
    model, opt = policy(acc, toy, lr=0.0)
    four = [*rollouts, *rollouts]
    args = reinforce_rej.Args(num_generations=2, max_grad_norm=0.0, num_iterations=1, mini_batches=1)
    batch = reinforce_rej.training_batch(four, torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, dtype=torch.bool),
                                         0, acc.device)
    with torch.no_grad():
        own = token_logprobs(model, batch)
    batch["old_logprobs"] = own - torch.tensor([2.0, 0.5, 1.0, 1.0]).log()[:, None]
    metrics = reinforce_rej.update(model, opt, None, batch, args, acc)
    lengths = [len(r.completion_ids) for r in four]
    assert metrics["clip_ratio/high_mean"] == pytest.approx(lengths[0] / sum(lengths))
    assert metrics["clip_ratio/low_mean"] == pytest.approx(lengths[1] / sum(lengths))
