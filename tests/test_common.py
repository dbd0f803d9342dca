"""common.py: log-probs, batching, data loading, scoring, run directory."""

import ast
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import grading
from common import (Rollout, Sampler, _ChunkedLogprobEntropy, collate, collate_ids, load_tasks, lr_scheduler,
                    parse_args, prompts_for_step, shard, token_logprobs, top_p_filter)
from grading import score_completions
from conftest import REPO


# --- chunked log-probs ------------------------------------------------------------------------
def test_chunked_logprob_hand_numbers():
    # z = h W^T = [0, ln 3, 0]: p = [1/5, 3/5, 1/5]
    h = torch.tensor([[math.log(3.0), 0.0]])
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    lp, ent = _ChunkedLogprobEntropy.apply(h, w, torch.tensor([1]), 1.0, 4)
    assert math.isclose(lp.item(), math.log(3 / 5), rel_tol=1e-6)
    assert math.isclose(ent.item(), 0.4 * math.log(5) + 0.6 * math.log(5 / 3), rel_tol=1e-6)  # 0.950271
    # temperature 2: p proportional to [1, sqrt 3, 1]
    lp2, _ = _ChunkedLogprobEntropy.apply(h, w, torch.tensor([1]), 2.0, 4)
    assert math.isclose(lp2.item(), math.log(math.sqrt(3) / (2 + math.sqrt(3))), rel_tol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("terms", ["both", "logprob", "entropy"])
def test_chunked_logprob_matches_full_softmax(chunk, temperature, terms):
    """Values and gradients (of a loss on the log-probs, on the entropies, or on both) equal the plain
    full-logits computation."""
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    g_lp, g_ent = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    g_lp, g_ent = (g_lp if terms != "entropy" else 0 * g_lp), (g_ent if terms != "logprob" else 0 * g_ent)

    logp_full = torch.log_softmax(h @ w.t() / temperature, -1)
    lp_ref = logp_full.gather(1, t[:, None]).squeeze(1)
    ent_ref = -(logp_full.exp() * logp_full).sum(-1)
    gh_ref, gw_ref = torch.autograd.grad((lp_ref * g_lp + ent_ref * g_ent).sum(), (h, w))

    lp, ent = _ChunkedLogprobEntropy.apply(h, w, t, temperature, chunk)
    assert torch.allclose(lp.double(), lp_ref, atol=1e-6) and torch.allclose(ent.double(), ent_ref, atol=1e-6)
    loss = {"both": lp * g_lp + ent * g_ent, "logprob": lp * g_lp, "entropy": ent * g_ent}[terms]  # unused: None
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert torch.allclose(gh, gh_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)


def test_chunked_logprob_of_bf16_weights_upcasts_the_softmax():
    """bf16 hidden states and head (a bf16 model): the logits are rounded to bf16 by the matmul, as the model's
    own head would, but the softmax, the log-probs and the entropies are float32; the gradients come back
    in bf16, close to float32's."""
    torch.manual_seed(0)
    h32, w32, t = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    lp, ent = _ChunkedLogprobEntropy.apply(h, w, t, 0.7, 4)
    assert lp.dtype == ent.dtype == torch.float32
    ref = torch.log_softmax((h.detach() @ w.detach().t()).float() / 0.7, -1)
    assert torch.allclose(lp, ref.gather(1, t[:, None]).squeeze(1), atol=1e-5)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-5)
    gh, gw = torch.autograd.grad((lp + ent).sum(), (h, w))
    assert gh.dtype == gw.dtype == torch.bfloat16
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.t() / 0.7, -1)
    gh64, gw64 = torch.autograd.grad((ref.gather(1, t[:, None]) - (ref.exp() * ref).sum(-1, keepdim=True)).sum(),
                                     (h64, w64))
    assert torch.allclose(gh.double(), gh64, atol=0.05, rtol=0.02) and torch.allclose(gw.double(), gw64, atol=0.05,
                                                                                        rtol=0.02)


@pytest.mark.parametrize("autocast", [None, torch.float16, torch.bfloat16])
def test_chunked_logprob_backward_recomputes_the_logits_under_the_forwards_autocast(monkeypatch, autocast):
    """accelerate's --mixed_precision autocasts the forward only (the loss's backward runs outside it), so the
    backward re-enters the forward's autocast setting to recompute the same logits it subtracts lse from."""
    seen, real = [], _ChunkedLogprobEntropy._backward

    def spy(ctx, *grads):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(ctx, *grads)

    monkeypatch.setattr(_ChunkedLogprobEntropy, "_backward", staticmethod(spy))
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        lp, _ = _ChunkedLogprobEntropy.apply(h, w, torch.tensor([0, 1, 2]), 1.0, 2)
    lp.sum().backward()
    assert seen == [(autocast is not None, autocast or torch.get_autocast_dtype("cpu"))]
    assert h.grad.dtype == w.grad.dtype == torch.float32


def _toy_model(toy):
    tok = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model", dtype=torch.float32)
    return tok, model


def test_token_logprobs_equal_full_logits_on_padded_batch(toy):
    tok, model = _toy_model(toy)
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18]), ([19, 20, 21], [22])]
    batch = collate_ids(pairs, tok.pad_token_id, "cpu")
    lp, ent = token_logprobs(model, batch, temperature=0.8, chunk_size=2, with_entropy=True)
    assert lp.shape == (3, 5)
    for i, (p, c) in enumerate(pairs):  # each sequence alone, no padding, full logits
        logits = model(torch.tensor([p + c])).logits[0].float() / 0.8
        ref = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None]).squeeze(1)
        assert torch.allclose(lp[i, :len(c)], ref, atol=1e-5)
        assert torch.all(lp[i, len(c):] == 0)  # padding positions are zero, not garbage
    assert torch.all(ent[batch["completion_mask"].bool()] > 0)


def test_token_logprobs_of_a_zero3_head_go_through_the_models_own_head(toy, monkeypatch):
    """Under DeepSpeed ZeRO-3 the head's weight exists only inside the model's forward, so a head whose weight
    is a partition (ds_id) takes the model's own logits from the shortest prompt's end on: the same log-probs
    and entropies as the chunked head, padding 0."""
    tok, model = _toy_model(toy)
    batch = collate_ids([([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18]), ([19, 20, 21], [22])],
                        tok.pad_token_id, "cpu")
    chunked = token_logprobs(model, batch, temperature=0.8, chunk_size=2, with_entropy=True)
    calls, real = [], common._logprobs_from_logits
    monkeypatch.setattr(common, "_logprobs_from_logits", lambda *a: calls.append(a) or real(*a))
    model.get_output_embeddings().weight.ds_id = 0
    zero3 = token_logprobs(model, batch, temperature=0.8, chunk_size=2, with_entropy=True)
    assert len(calls) == 1
    for a, b in zip(chunked, zero3):
        assert torch.allclose(a, b, atol=1e-5) and torch.all(b[batch["completion_mask"] == 0] == 0)
    assert torch.allclose(token_logprobs(model, batch, temperature=0.8), chunked[0], atol=1e-5)


def test_token_logprobs_gradient_matches_full_logits(toy):
    tok, model = _toy_model(toy)
    batch = collate_ids([([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14])], tok.pad_token_id, "cpu")
    token_logprobs(model, batch, chunk_size=1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for p, c in [([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14])]:
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        total = total + logp[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None]).sum()
    total.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


# --- sampler (transformers backend) -----------------------------------------------------------
def test_hf_sampler_logprobs_and_records(toy):
    tok, model = _toy_model(toy)
    rows = load_tasks(toy / "test.jsonl")[:3]
    sampler = Sampler("hf", str(toy / "model"), tok, model=model, hf_batch_size=4)
    groups = sampler.generate(common.encode_prompts(tok, rows), n=2, temperature=0.9, max_tokens=12, seed=3)
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    flat = [r for g in groups for r in g]
    for r in flat:
        assert len(r.completion_ids) == len(r.logprobs) <= 12
        assert r.finish_reason == ("stop" if r.completion_ids[-1] == tok.eos_token_id else "length")
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
    lp = token_logprobs(model, collate(flat, tok.pad_token_id, "cpu"), temperature=0.9)
    for i, r in enumerate(flat):
        assert torch.allclose(lp[i, :len(r.logprobs)], torch.tensor(r.logprobs), atol=1e-4)
    # same seed, same samples (what makes resumed runs reproducible)
    again = sampler.generate(common.encode_prompts(tok, rows), n=2, temperature=0.9, max_tokens=12, seed=3)
    assert [r.completion_ids for g in again for r in g] == [r.completion_ids for r in flat]


def test_top_p_filter_keeps_smallest_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = top_p_filter(logp, 0.75).exp()  # 0.5 + 0.3 is the first prefix reaching 0.75
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    out = top_p_filter(logp, 0.85).exp()
    assert torch.allclose(out, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    # at the edge: 0.5 + 0.375 is exactly 0.875 (exact in binary), so the nucleus ends there, as vLLM's does
    edge = torch.log(torch.tensor([[0.125, 0.5, 0.375]]))
    assert torch.allclose(top_p_filter(edge, 0.875).exp(), torch.tensor([[0.0, 4 / 7, 3 / 7]]), atol=1e-6)
    # the vocabulary is the last dimension: each row its own nucleus
    rows = torch.log(torch.tensor([[0.5, 0.375, 0.125], [0.125, 0.625, 0.25]]))
    assert torch.allclose(top_p_filter(rows, 0.8).exp(), torch.tensor([[4 / 7, 3 / 7, 0.0], [0.0, 5 / 7, 2 / 7]]),
                          atol=1e-6)


def test_full_named_parameters_of_plain_fsdp_and_deepspeed_models(monkeypatch):
    """The (name, tensor) pairs the push hands vLLM: FSDP1's wrapper prefixes go from the names, an FSDP2
    DTensor gives its full tensor, a DeepSpeed ZeRO-3 partition is gathered one parameter at a time and
    copied (the engine frees or reuses the gathered buffer when the context ends), and none keeps a graph."""
    import deepspeed

    inner, block, model = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    block.proj = torch.nn.Linear(2, 1, bias=False)
    inner.head, inner._checkpoint_wrapped_module, model._fsdp_wrapped_module = torch.nn.Linear(2, 2), block, inner
    model.plain = torch.nn.Linear(1, 1, bias=False)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtensor = model.plain.weight  # as an FSDP2 DTensor: its local shard differs from the full tensor
    dtensor.full_tensor = lambda: torch.full((1, 1), 7.0, requires_grad=True) * 1
    partitioned = block.proj.weight  # as a ZeRO-3 partition: its 2 values exist only when gathered
    partitioned.ds_id, full = 0, torch.tensor([[5.0, 6.0]])
    partitioned.data = torch.empty(0)
    gathered = []

    class Gathered:  # deepspeed.zero.GatheredParameters: the full tensor inside, the buffer reused after
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            gathered.extend(self.params)
            self.params[0].data = full.clone()

        def __exit__(self, *exc):
            self.params[0].data.zero_()
            self.params[0].data = torch.empty(0)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    pairs = list(common.full_named_parameters(model))
    assert [n for n, _ in pairs] == ["head.weight", "head.bias", "proj.weight", "plain.weight"]
    assert torch.equal(pairs[0][1], values["_fsdp_wrapped_module.head.weight"])
    assert torch.equal(pairs[1][1], values["_fsdp_wrapped_module.head.bias"])
    assert torch.equal(pairs[2][1], full) and gathered == [partitioned]
    assert torch.equal(pairs[3][1], torch.full((1, 1), 7.0))
    assert not any(t.requires_grad for _, t in pairs)


# --- batching and data ------------------------------------------------------------------------
def test_collate_layout():
    rollouts = [Rollout([1, 2, 3], [4, 5], [-0.1, -0.2], "", "stop"), Rollout([6], [7, 8, 9], [-1, -2, -3], "", "length")]
    b = collate(rollouts, pad_id=0, device="cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["completion_ids"].tolist() == [[4, 5, 0], [7, 8, 9]]
    assert b["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["logits_index"][0, :2].tolist() == [2, 3] and b["logits_index"][1].tolist() == [0, 1, 2]
    assert b["truncated"].tolist() == [False, True]
    assert torch.allclose(b["sampler_logprobs"], torch.tensor([[-0.1, -0.2, 0.0], [-1.0, -2.0, -3.0]]))
    # completions that are all empty still get one (masked) column
    empty = collate_ids([([1, 2], []), ([3], [])], pad_id=0, device="cpu")
    assert empty["completion_ids"].tolist() == [[0], [0]] and empty["completion_mask"].tolist() == [[0.0], [0.0]]
    assert empty["logits_index"].tolist() == [[1], [0]] and empty["input_ids"].tolist() == [[1, 2], [3, 0]]


def test_prompts_for_step_is_a_function_of_the_step():
    rows = [{"id": i} for i in range(10)]
    ids = [r["id"] for s in range(1, 6) for r in prompts_for_step(rows, s, 4, seed=1)]
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))  # epochs
    assert ids[10:20] != ids[:10]  # reshuffled each epoch
    assert [r["id"] for r in prompts_for_step(rows, 3, 4, seed=1)] == ids[8:12]


def test_shard_keeps_prompts_whole_and_mini_batches_the_same_for_any_process_count():
    assert shard(list(range(6)), 1, 2) == [1, 3, 5]
    # the j-th half of every rank's share, together, is the j-th half of the whole list
    prompts = list(range(8))
    for world in (1, 2, 4):
        shares = [shard(prompts, r, world) for r in range(world)]
        for j in range(2):
            together = sorted(p for share in shares for p in share[j * len(share) // 2:(j + 1) * len(share) // 2])
            assert together == prompts[j * 4:(j + 1) * 4], (world, j)
    with pytest.raises(SystemExit, match=r"^5 prompts cannot be split evenly over 2 processes; make the number of "
                                         r"prompts per step a multiple of the process count\.$"):
        shard(list(range(5)), 0, 2)


def test_jsonl_round_trip_and_one_sentence_per_bad_line(tmp_path):
    out = tmp_path / "sub" / "x.jsonl"
    common.write_jsonl([{"a": 1}, {"b": "é"}], out)  # atomic: written next to it, then renamed
    assert common.read_jsonl(out) == [{"a": 1}, {"b": "é"}] and not (tmp_path / "sub" / "x.jsonl.tmp").exists()
    out.write_bytes(b'{"a": 1}\n\n[1\n"\\ud800"\n{"b": "\xff"}\n2\n')
    errors = []
    assert common.read_jsonl(out, errors, numbered=True) == [(1, {"a": 1}), (6, 2)]  # line 2 is blank
    assert errors == [f"{out}:3: not valid JSON (Expecting ',' delimiter)", f"{out}:4: not UTF-8 text",
                      f"{out}:5: not UTF-8 text"]
    with pytest.raises(SystemExit, match=r"x.jsonl:3: not valid JSON \(Expecting ',' delimiter\); fix or delete"):
        common.read_jsonl(out)
    with pytest.raises(SystemExit, match=r"missing.jsonl: no such file"):
        common.read_jsonl(tmp_path / "missing.jsonl")


def test_load_tasks_reports_file_and_line(tmp_path):
    good = {"id": "a", "task": "toy", "prompt": [{"role": "user", "content": "x"}], "answer": "1"}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"d.jsonl:2: not valid JSON"):
        load_tasks(p)
    p.write_text(json.dumps({"id": "a", "task": "toy", "prompt": []}) + "\n")
    with pytest.raises(SystemExit, match=r"d.jsonl:1: missing field\(s\) \['answer'\]"):
        load_tasks(p)
    with pytest.raises(SystemExit, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")


# --- step statistics ----------------------------------------------------------------------------
class OneProcess:
    num_processes, device = 1, torch.device("cpu")


class TwoProcesses:
    """An accelerator of 2 processes whose other process holds `tables` (one list of values per all-reduce, in
    the order asked): reduce combines this process's values with them by the op it is asked for."""

    def __init__(self, *tables: list[float]):
        self.num_processes, self.device, self.tables, self.ops = 2, torch.device("cpu"), tables, []

    def reduce(self, values, op):
        theirs = torch.tensor(self.tables[len(self.ops)], dtype=values.dtype)
        self.ops.append(op)
        return values + theirs if op == "sum" else torch.maximum(values, theirs)


def test_step_stats_add_sums_max_keeps_the_largest_and_reduce_combines_processes():
    stats = common.StepStats()
    stats.add(loss=torch.tensor(1.5, requires_grad=True) * 1, tokens=3)
    stats.add(loss=0.25, tokens=torch.tensor(2))
    stats.max(peak=-4.0)
    stats.max(peak=torch.tensor(-2.5))
    stats.max(peak=-3.0)
    assert not stats.sums["loss"].requires_grad  # detached: a step's statistics keep no graph alive
    assert stats.reduce(OneProcess()) == {"loss": 1.75, "tokens": 5.0, "peak": -2.5}
    two = TwoProcesses([1.0, 4.0], [7.0])  # the other process: loss 1, 4 tokens (sums, by name); peak 7 (maxes)
    assert stats.reduce(two) == {"loss": 2.75, "tokens": 9.0, "peak": 7.0} and two.ops == ["sum", "max"]
    assert common.StepStats().reduce(two) == {}  # nothing measured: no all-reduce either
    assert two.ops == ["sum", "max"]
    only_max = common.StepStats()
    only_max.max(peak=1.0)
    assert only_max.reduce(TwoProcesses([3.0])) == {"peak": 3.0}  # no sums: the maxima still reduced


def test_logprob_gap_hand_numbers():
    """|trainer - sampler| over the sampled tokens only: gaps 0.5, 0.25 | 1.0 (the padded token's 9 is masked)."""
    stats = common.StepStats()
    trainer = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], requires_grad=True)
    common.add_logprob_gap(stats, trainer, torch.tensor([[-1.5, -2.25], [-1.5, 0.0]]),
                           torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    totals = stats.reduce(OneProcess())
    assert totals == {"gap_sum": 1.75, "gap_tokens": 3.0, "gap_max": 1.0}
    assert common.logprob_gap_metrics(totals) == {"sampler/logprob_gap_mean": 1.75 / 3, "sampler/logprob_gap_max": 1.0}
    one_token = {"gap_sum": 0.5, "gap_tokens": 1.0, "gap_max": 0.5}  # the floor of 1 token does not dilute it
    assert common.logprob_gap_metrics(one_token)["sampler/logprob_gap_mean"] == 0.5
    assert common.logprob_gap_metrics({"gap_sum": 0.0, "gap_tokens": 0.0, "gap_max": 0.0}) == {
        "sampler/logprob_gap_mean": 0.0, "sampler/logprob_gap_max": 0.0}  # no token: 0, not a division by 0
    assert common.logprob_gap_metrics({"loss": 1.0}) == {}  # never measured
    empty = common.StepStats()
    common.add_logprob_gap(empty, torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0))
    assert empty.maxes["gap_max"].item() == 0.0


# --- scoring ----------------------------------------------------------------------------------
def _row(task, answer, **meta):
    return {"id": "x", "task": task, "prompt": [], "answer": answer, "metadata": meta}


def test_score_completions_per_task():
    rows = [_row("toy", "7"), _row("gsm8k", "1234", answer_style="boxed"),
            _row("countdown", "1 + 2", nums=[1, 2], target=3), _row("poem", "gold")]
    texts = ["3 + 4 = 7\n</think>\n<answer>7</answer>", "so \\boxed{1,234}", "x</think><answer>2 + 1</answer>",
             "lines</think><answer>a poem</answer>"]
    scores, errors = score_completions(rows, texts)
    assert [s.correct for s in scores] == [1.0, 1.0, 1.0, None] and errors == 0
    assert [s.format for s in scores] == [1.0, 1.0, 1.0, 1.0]


def test_a_crashing_scorer_scores_zero_and_is_counted(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("scorer crashed")

    monkeypatch.setattr(grading, "countdown_correct", boom)
    rows = [_row("countdown", "1 + 2", nums=[1, 2], target=3), _row("toy", "7")]
    scores, errors = score_completions(rows, ["</think><answer>1 + 2</answer>", "</think><answer>7</answer>"])
    assert errors == 1 and scores[0].correct == 0.0 and scores[1].correct == 1.0


def test_a_row_whose_answer_cannot_be_read_scores_zero_and_is_counted():
    rows = [_row("math", "7", answer_style="xml"), _row("toy", "7"), _row("math", "8", answer_style="json")]
    scores, errors = score_completions(rows, ["\\boxed{7}", "r</think><answer>7</answer>", "\\boxed{8}"])
    assert errors == 2
    assert [(s.pred, s.format, s.correct) for s in scores] == [(None, 0.0, 0.0), ("7", 1.0, 1.0), (None, 0.0, 0.0)]


def test_math_rows_get_the_callers_time_budget_and_a_crashed_batch_scores_zero(monkeypatch):
    budgets = []

    def spy(pairs, timeout):
        budgets.append(timeout)
        return [True] * len(pairs), 1

    monkeypatch.setattr(grading, "answers_match_many", spy)
    rows, texts = [_row("math", "7"), _row("math", "8")], ["\\boxed{7}", "\\boxed{9}"]
    assert score_completions(rows, texts, timeout=2.5)[1] == 1  # the batch's own failures are counted
    score_completions(rows, texts)
    assert budgets == [2.5, 5.0]

    def boom(pairs, timeout):
        raise RuntimeError("grader pool gone")

    monkeypatch.setattr(grading, "answers_match_many", boom)
    countdown = _row("countdown", "1 + 2", nums=[1, 2], target=3)  # not graded by answers_match_many
    scores, errors = score_completions([countdown, *rows], ["r</think><answer>2 + 1</answer>", *texts])
    assert errors == 2 and [s.correct for s in scores] == [1.0, 0.0, 0.0]


def test_poem_rows_are_scored_with_their_beginning_and_form_and_a_crash_scores_zero(monkeypatch):
    gold, ending = "the sky is blue\nthe sea is too", "the sky is grey\nthe sea is too"
    text = f"r</think><answer>{ending}</answer>"
    rows = [_row("poem", gold, poem_start="a\nb", form="sonnet"), _row("poem", gold, form="sonnet")]
    scores, errors = score_completions(rows, [text, text])
    assert errors == 0
    assert scores[0].poem == grading.poem_components(ending, gold, "a\nb", "sonnet")
    assert scores[1].poem == grading.poem_components(ending, gold, "", "sonnet")  # no beginning given
    # form: 1 - |lines - 14| / 14, with the beginning's 2 lines and without them
    assert [s.poem["form"] for s in scores] == [pytest.approx(1 - 10 / 14), pytest.approx(1 - 12 / 14)]

    real = grading.poem_components

    def crash_on_text(generated, *rest):
        if generated is not None:
            raise RuntimeError("CMUdict lookup failed")
        return real(generated, *rest)

    monkeypatch.setattr(grading, "poem_components", crash_on_text)
    scores, errors = score_completions(rows[:1], [text])
    assert errors == 1 and scores[0].poem == real(None, "", "", "") and scores[0].poem["reward"] == 0.0



def test_code_rows_score_their_sandbox_results_and_a_row_without_tests_earns_nothing(monkeypatch):
    from sandbox import CodeResult

    results = [CodeResult([]), CodeResult(["pass", "timeout", "skipped"]), CodeResult(["pass", "crash"]),
               CodeResult(["pass", "pass"])]
    monkeypatch.setattr(grading, "run_code_tests_many", lambda jobs: results[:len(jobs)])
    rows = [_row("code", "", tests={}) for _ in results]
    scores, errors = score_completions(rows, ["```python\nprint(1)\n```"] * len(rows))
    assert [s.correct for s in scores] == [0.0, 0.0, 0.0, 1.0]  # no tests: no reward
    assert [s.tests_passed for s in scores] == [0.0, pytest.approx(1 / 3), 0.5, 1.0]
    assert [s.timed_out for s in scores] == [False, True, False, False]
    assert errors == 1
    monkeypatch.setattr(grading, "run_code_tests_many", lambda jobs: [CodeResult(["crash"])] * len(jobs))
    assert score_completions(rows[:3], ["print(1)"] * 3)[1] == 3  # each program's crash counted

# --- flags ------------------------------------------------------------------------------------
def test_parse_args_reads_help_and_types():
    from grpo_logprob import Args

    args = parse_args(Args, ["--learning_rate", "0.01", "--resume", "--reward", "correct=1", "--loss_type",
                             "seq-mean-token-sum-norm", "--num_generations", "3"])
    assert args.learning_rate == 0.01 and args.resume is True and args.reward == "correct=1"
    assert args.loss_type == "seq-mean-token-sum-norm" and args.num_generations == 3
    assert parse_args(Args, ["--no-vllm_sleep"]).vllm_sleep is False  # both spellings of the negation
    assert parse_args(Args, ["--no_vllm_sleep"]).vllm_sleep is False
    assert parse_args(Args, []) == Args()


@pytest.mark.parametrize("script", ["grpo_logprob", "raft_pp", "reinforce_rej", "prime"])
def test_help_shows_every_flag_with_its_help_text(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    args_cls = importlib.import_module(script).Args
    with pytest.raises(SystemExit) as stop:
        parse_args(args_cls, ["--help"])
    assert stop.value.code == 0
    shown = " ".join(re.sub("[\u2500-\u257f]", " ", capsys.readouterr().out).split())  # box drawing aside
    helps = {}
    for cls in reversed(args_cls.__mro__[:-1]):  # common.RunArgs, then the script's Args (its overrides win)
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        helps.update({node.target.id: " ".join(doc.value.value.split()) for node, doc in zip(body, body[1:])
                      if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)})
    assert set(helps) == {f.name for f in dataclasses.fields(args_cls)}, "every Args field has a help string"
    missing = [name for name, text in helps.items() if f"--{name}" not in shown or text not in shown]
    assert not missing, f"{script}.py --help lacks these flags or their help text: {missing}"


@pytest.mark.parametrize("cmd, message", [
    (["raft_pp.py", "--loss_type", "nonsense"],
     "invalid choice 'nonsense' for argument '--loss_type'. Expected one of ('seq-mean-token-mean', 'token-mean')."),
    (["prime.py", "--granularity", "step"],
     "invalid choice 'step' for argument '--granularity'. Expected one of ('token', 'whole')."),
])
def test_parser_refuses_a_bad_choice_with_the_allowed_values(cmd, message):
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "60"})  # a narrow terminal
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in " ".join(re.sub("[\u2500-\u257f]", " ", proc.stderr).split()), proc.stderr


# --- learning-rate schedule ---------------------------------------------------------------------
def _lr_factors(schedule, warmup, total):
    """The learning rate of optimizer steps 0..total as a multiple of the base rate."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, schedule, warmup, total)
    factors = []
    for _ in range(total + 1):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_lr_schedule_hand_numbers():
    c1, c3 = (2 + math.sqrt(2)) / 4, (2 - math.sqrt(2)) / 4  # 0.5 (1 + cos(pi/4)), 0.5 (1 + cos(3 pi/4))
    assert _lr_factors("constant", 0, 4) == [1.0] * 5
    assert _lr_factors("cosine", 0, 4) == pytest.approx([1.0, c1, 0.5, c3, 0.0], abs=1e-15)
    # warmup from 0: step/warmup, then the cosine over the steps after the warmup
    assert _lr_factors("constant", 2, 6) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert _lr_factors("cosine", 2, 6) == pytest.approx([0.0, 0.5, 1.0, c1, 0.5, c3, 0.0], abs=1e-15)


# --- run directory ----------------------------------------------------------------------------
def test_checkpoints_are_atomic_rotated_and_restore_weights_and_optimizer(tmp_path):
    import copy

    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)

    def train_step():  # moves the weights and AdamW's moments and step count
        model(torch.randn(4, 2)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    @dataclasses.dataclass
    class A:
        output_dir: str = str(tmp_path)
        run_name: str = "r"

    run = common.Run(A(), acc)
    for step in (1, 2, 3):
        train_step()
        run.log(step, {"loss": float(step)})
        run.save_checkpoint(step, keep=2)
    weights = copy.deepcopy(model.state_dict())
    optimizer = copy.deepcopy(opt.state_dict())
    ckpts = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert ckpts == ["step_2", "step_3"]  # rotated, and no .tmp_ folder left behind
    run.log(4, {"loss": 4.0})  # logged after the last checkpoint: a resumed run must drop it
    train_step()
    assert not torch.equal(model.weight, weights["weight"])
    state = run.load_latest_checkpoint()
    assert state["step"] == 3 and [m["step"] for m in run.read_metrics()] == [1, 2, 3]
    # step 3's weights and optimizer state are back, exactly
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    restored = opt.state_dict()
    assert restored["param_groups"] == optimizer["param_groups"]
    assert restored["state"].keys() == optimizer["state"].keys()
    for i, moments in optimizer["state"].items():
        assert moments.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(restored["state"][i][k], v) for k, v in moments.items())
    assert optimizer["state"][0]["step"].item() == 3  # the state of step 3, not of step 4
    with pytest.raises(SystemExit, match="already holds a run"):
        common.Run(A(), acc)


def test_vllm_push_noise_filter_drops_only_the_expected_lines():
    import logging

    noise = common._VllmPushNoise()

    def passes(message, *args, tied=False):
        noise.tied = tied
        return noise.filter(logging.LogRecord("vllm", logging.WARNING, "x.py", 1, message, args, None))

    assert not passes("%s: Failed to load weights", "RotaryEmbedding")
    assert not passes("%s: Failed to load weights", "MRotaryEmbedding")
    assert not passes("%s: Failed to load weights", "ParallelLMHead", tied=True)
    assert passes("%s: Failed to load weights", "ParallelLMHead", tied=False)  # untied: a real failure
    assert passes("%s: Failed to load weights", "QKVParallelLinear", tied=True)
    assert not passes("Reloading and processing weights took %.2f seconds", 0.01)
    assert not passes("Successfully reset prefix cache")
    assert passes("Failed to reset prefix cache because some blocks (3) are not freed yet")


def test_jsonable_writes_strict_json_values():
    import numpy as np

    value = {"a": float("nan"), "b": [torch.tensor(2.0), np.float32(0.5), float("inf")], "c": {"d": np.int64(3)}, "e": "x"}
    assert common.jsonable(value) == {"a": None, "b": [2.0, 0.5, None], "c": {"d": 3}, "e": "x"}


@pytest.mark.parametrize("script", ["grpo_logprob", "raft_pp", "reinforce_rej", "prime"])
def test_the_engine_is_awake_whenever_it_samples_or_takes_weights(script, toy, tmp_path, monkeypatch):
    """With --vllm_sleep on a GPU the engine sleeps during the update; sampling, evaluating or pushing
    weights into a sleeping engine fails there. On CPU sleep is a no-op, so here it is tracked for the
    hf sampler too: two steps with an evaluation after each (prime.py's filter may keep nothing, so a
    step without an update is covered) must never use the sampler while it sleeps, and sleep every step."""
    events = []

    def sleep(self):
        self.sleeping = True
        events.append("sleep")

    def wake_up(self):
        self.sleeping = False

    def awake(method):
        def wrapped(self, *a, **k):
            assert not self.sleeping, f"{method.__name__} on a sleeping engine"
            return method(self, *a, **k)
        return wrapped

    monkeypatch.setattr(Sampler, "sleep", sleep)
    monkeypatch.setattr(Sampler, "wake_up", wake_up)
    monkeypatch.setattr(Sampler, "generate", awake(Sampler.generate))
    monkeypatch.setattr(Sampler, "push_weights", awake(Sampler.push_weights))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--model", str(toy / "model"), "--train_file",
                                      str(toy / "train.jsonl"), "--test_file", str(toy / "test.jsonl"),
                                      "--output_dir", str(tmp_path), "--run_name", "r", "--sampler", "hf",
                                      "--total_steps", "2", "--eval_every", "1", "--eval_limit", "4",
                                      "--prompts_per_step", "2", "--num_generations", "2",
                                      "--max_completion_length", "16", "--save_every", "0"])
    module.main()
    assert events.count("sleep") >= 2
