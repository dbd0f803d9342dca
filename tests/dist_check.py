"""Run under `torchrun --nproc_per_node 2 tests/dist_check.py MODEL_DIR OUT_DIR`:
1. the gradient of the GRPO loss computed on two ranks (each with half of a batch of unequal lengths,
   DDP through accelerate, global token-mean normalizer) equals the gradient of the same loss on the
   whole batch in one process;
2. a checkpoint holds every rank's RNG state even when rank 1 writes late (the main process must not
   rename the temporary folder before all ranks have written into it)."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import Run, collate_ids, leave_process_group, token_logprobs, unwrap  # noqa: E402
from grpo_logprob import aggregate_loss, clipped_policy_loss, loss_normalizer  # noqa: E402


def batch_loss(model, pairs, advantages, loss_type, normalizer):
    batch = collate_ids(pairs, 0, "cpu")
    lp = token_logprobs(model, batch)
    token_loss, _, _ = clipped_policy_loss(lp, lp.detach(), advantages, 0.2, 0.2)
    return aggregate_loss(token_loss, batch["completion_mask"], loss_type, normalizer), batch["completion_mask"]


def main():
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, "run with torchrun --nproc_per_node 2"
    g = torch.Generator().manual_seed(0)
    # 4 sequences with very different completion lengths: the per-rank token counts differ.
    pairs = [(torch.randint(3, 200, (n,), generator=g).tolist(), torch.randint(3, 200, (c,), generator=g).tolist())
             for n, c in [(5, 2), (7, 9), (3, 4), (6, 1)]]
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0])
    for loss_type in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        reference = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        full_norm = loss_normalizer(collate_ids(pairs, 0, "cpu")["completion_mask"], loss_type, 9)
        loss, _ = batch_loss(reference, pairs, advantages, loss_type, full_norm)
        loss.backward()

        model = acc.prepare(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32))
        mine = slice(2 * rank, 2 * rank + 2)
        local_mask = collate_ids(pairs[mine], 0, "cpu")["completion_mask"]
        # what grpo_logprob.py does: global normalizer, each rank backpropagates world * its share
        norm = acc.reduce(torch.tensor(loss_normalizer(local_mask, loss_type, 9)), "sum").item()
        part, _ = batch_loss(model, pairs[mine], advantages[mine], loss_type, norm)
        acc.backward(part * world)
        for (name, p), q in zip(unwrap(model).named_parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), f"{loss_type}: gradient of {name} differs"
        acc.print(f"{loss_type}: DDP gradients equal the single-process gradients")
    check_checkpoint(acc, model)
    acc.print("DIST_CHECK_OK")
    leave_process_group(acc)  # what the training scripts do at the end (see common.py)


@dataclass
class CheckArgs:
    output_dir: str
    run_name: str = "ckpt"


def check_checkpoint(acc, model):
    acc.prepare(torch.optim.AdamW(model.parameters(), lr=1e-4))  # registered: the checkpoint holds its state too
    run = Run(CheckArgs(sys.argv[2]), acc)
    if acc.process_index == 1:  # a slow rank: its save_state starts (and ends) after rank 0's
        save_state = acc.save_state
        acc.save_state = lambda *a, **k: (time.sleep(3), save_state(*a, **k))
    run.save_checkpoint(1)
    acc.wait_for_everyone()
    folder = run.dir / "checkpoints" / "step_1"
    for rank in range(acc.num_processes):
        assert (folder / f"random_states_{rank}.pkl").exists(), f"checkpoint lacks rank {rank}'s RNG state"
    assert not list(folder.parent.glob(".tmp_*")), "a temporary checkpoint folder was left behind"
    assert run.load_latest_checkpoint()["step"] == 1
    acc.print("checkpoint: every rank's state written before the atomic rename")


if __name__ == "__main__":
    main()
