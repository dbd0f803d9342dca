"""Colocated vLLM under several processes, as the training scripts run it.

    torchrun --nproc_per_node 2 tests/dist_vllm.py MODEL_DIR TP
    accelerate launch --config_file configs/fsdp2.yaml --num_processes 2 tests/dist_vllm.py MODEL_DIR TP

Each process builds the scripts' Sampler (one engine per process in the launcher's process group:
vLLM's "external_launcher"; with TP = 2 the two processes share one tensor-parallel engine) and
checks, on every rank, with its own prompts:
1. the engine reports external_launcher;
2. vLLM's per-token log-probs equal the training model's within 1e-3 (float32);
3. after an optimizer step on the (DDP- or FSDP-wrapped) training model and a weight push, vLLM's
   greedy output equals greedy decoding by a plain transformers model built from the trainer's full
   weights as accelerate gathers them (accelerator.get_state_dict, independent of the push's own
   gathering), so the push is proven for sharded parameters too.
Prints DIST_VLLM_OK at the end.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (Sampler, collate, encode_prompts, leave_process_group, load_model, load_tasks, make_accelerator,  # noqa: E402
                    token_logprobs, unwrap)


def main():
    model_dir, tp = sys.argv[1], int(sys.argv[2])
    acc = make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    sampler = Sampler("vllm", model_dir, tok, model=unwrap(model), accelerator=acc, max_model_len=256,
                      gpu_memory_utilization=0.2, tensor_parallel_size=tp, dtype="float32", seed=0)
    executor = sampler.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    assert executor == "external_launcher", executor  # one engine per process, in torchrun's process group
    rows = load_tasks(Path(model_dir).parent / "test.jsonl")[:8]
    prompts = encode_prompts(tok, rows[rank::world])  # different prompts on each rank

    # 2. log-probs of sampled tokens: vLLM vs the training model, on this rank
    groups = sampler.generate(prompts, n=4, temperature=1.0, max_tokens=24, seed=1)
    batch = collate([r for g in groups for r in g], tok.pad_token_id, acc.device)
    with torch.no_grad():
        ours = token_logprobs(model, batch)
    gap = (ours - batch["sampler_logprobs"]).abs()[batch["completion_mask"].bool()].max().item()
    assert gap < 1e-3, f"rank {rank}: max |vLLM - trainer| log-prob difference {gap:.2e}"
    print(f"rank {rank}: log-probs agree (max gap {gap:.1e}, tp {tp}, {acc.distributed_type.name})", flush=True)

    # 3. an update that surely changes greedy outputs, a push, and greedy equality with the trainer
    before = [g[0].completion_ids for g in sampler.generate(prompts, 1, 0.0, 24, seed=0)]
    batch = collate([r for g in sampler.generate(prompts, 2, 1.5, 24, seed=5) for r in g], tok.pad_token_id, acc.device)
    acc.backward(-token_logprobs(model, batch).sum())
    optimizer.step()
    optimizer.zero_grad()
    sampler.push_weights(unwrap(model))
    after = [g[0].completion_ids for g in sampler.generate(prompts, 1, 0.0, 24, seed=0)]
    state = [acc.get_state_dict(model)]  # full weights, on the main process at least (FSDP gathers there)
    torch.distributed.broadcast_object_list(state, src=0)
    trainer = load_model(model_dir, "float32", acc, frozen=True)  # whole, also under DeepSpeed ZeRO-3
    missing, unexpected = trainer.load_state_dict({k: v.cpu() for k, v in state[0].items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    expected = []
    for p in prompts:
        out = trainer.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        expected.append(out[0, len(p):].tolist())
    assert expected != before, f"rank {rank}: the update did not change greedy outputs; nothing would be proven"
    assert after == expected, f"rank {rank}: vLLM's greedy output after the push differs from the trainer's"
    print(f"rank {rank}: after an update and a push, vLLM's greedy output equals the trainer's", flush=True)
    acc.wait_for_everyone()
    acc.print("DIST_VLLM_OK")
    leave_process_group(acc)


if __name__ == "__main__":
    main()
