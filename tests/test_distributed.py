"""Several processes as our users run them: torchrun / accelerate launch with DDP or FSDP2 (gloo on CPU),
colocated vLLM engines (external_launcher, tensor parallel 1 and 2)."""

import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
from common import read_jsonl
from conftest import REPO, free_port, run_script, torchrun

def launch_config(name: str = "fsdp2") -> list[str]:
    """One of the repo's launch configs with 2 processes on CPU (float32, so the results compare exactly)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / f"{name}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]


CASES = ["grpo_token-mean", "grpo_seq-mean-token-mean", "grpo_seq-mean-token-sum-norm", "raft++",
         "raft_token-mean_batch", "reinforce_rej", "reinforce_token-mean", "prime"]
needs_vllm = pytest.mark.skipif(not common.vllm_available(), reason="vLLM is not installed (bash install.sh)")


@pytest.fixture(scope="module")
def one_process_updates(toy, tmp_path_factory):
    """Every script's update on the whole fixed batch, in one process (tests/dist_update.py)."""
    out = tmp_path_factory.mktemp("updates")
    run_script(["tests/dist_update.py", str(toy / "model"), str(out)])
    return out


@pytest.mark.parametrize("launch", ["ddp", "fsdp2", "zero3"])
def test_update_on_two_processes_equals_one_process(toy, one_process_updates, launch):
    """Each script's own update (normalizer over processes, loss scaled by the process count,
    micro- and mini-batches, filtered prompts, a rank that keeps nothing, skipped steps, PRIME's
    whitening and PRM) with two processes holding half the batch leaves the weights of one process
    holding all of it. Also: a checkpoint written by two processes (one of them late) holds both
    ranks' states, and loading it restores the weights (DDP, FSDP2 and DeepSpeed ZeRO-3; ZeRO-3 runs
    every script but prime.py, which refuses DeepSpeed when it trains a PRM); and under DDP and FSDP2 a
    NaN advantage on one process skips the optimizer step on both, leaving every rank's weights (shards)
    unchanged (DeepSpeed's engine steps inside backward: counted, not skipped)."""
    out = run_script(["tests/dist_update.py", str(toy / "model"), str(one_process_updates)],
                     launcher=torchrun() if launch == "ddp" else launch_config(launch), timeout=600)
    assert "DIST_UPDATE_OK" in out.stdout and "weights restored" in out.stdout
    for rank in (0, 1) if launch != "zero3" else ():  # NaN advantage on rank 1: both skip, both keep weights
        assert f"rank {rank}: the non-finite step was skipped, weights unchanged, counted once" in out.stdout
    suffix = {"ddp": "", "fsdp2": "_fsdp", "zero3": "_zero3"}[launch]
    initial = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    for case in [c for c in CASES if not (launch == "zero3" and c == "prime")]:
        one = torch.load(one_process_updates / f"{case}_world1.pt")
        two = torch.load(one_process_updates / f"{case}_world2{suffix}.pt")
        for a, b in zip(one, two):
            moved = max((a[k] - initial[k]).abs().max().item() for k in a if k in initial)
            assert moved > 1e-4, f"{case}: the update barely moved the weights; the comparison would prove little"
            worst = max((a[k] - b[k]).abs().max().item() for k in a)
            assert worst < 1e-5, f"{case} ({launch}): weights differ by {worst:.2e} between one and two processes"


@needs_vllm
@pytest.mark.parametrize("tp,launch", [(2, "ddp"), (1, "fsdp2"), (1, "zero3")])
def test_colocated_vllm_on_every_rank(toy, tp, launch):
    """external_launcher engines, one per process (tp 1) or shared by both (tp 2): log-probs equal the
    trainer's within 1e-3 on every rank, and after an update and a push (FSDP2: gathered one parameter at
    a time) every rank's greedy output equals the trainer's."""
    out = run_script(["tests/dist_vllm.py", str(toy / "model"), str(tp)],
                     launcher=torchrun() if launch == "ddp" else launch_config(launch), timeout=600)
    assert "DIST_VLLM_OK" in out.stdout
    for rank in (0, 1):
        assert f"rank {rank}: log-probs agree" in out.stdout
        assert f"rank {rank}: after an update and a push, vLLM's greedy output equals the trainer's" in out.stdout


def grpo_cmd(toy, out, name, *extra):
    return ["grpo_logprob.py", "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
            "--test_file", str(toy / "test.jsonl"), "--output_dir", str(out), "--run_name", name,
            "--sampler", "vllm", "--total_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
            "--max_completion_length", "48", "--eval_limit", "9", "--save_every", "0", *extra]


TIMING_KEYS = ("time/", "tokens_per_second", "memory/")


@needs_vllm
def test_grpo_two_processes_vllm_resume_equals_straight(toy, tmp_path):
    """Two processes with colocated vLLM: 2 steps straight == 1 step, stop, --resume, 1 more (every
    metric but timings and memory, and the rollouts)."""
    run_script(grpo_cmd(toy, tmp_path, "straight", "--log_rollouts_every", "1"), launcher=torchrun())
    run_script(grpo_cmd(toy, tmp_path, "resumed", "--log_rollouts_every", "1", "--stop_at_step", "1"),
               launcher=torchrun())
    run_script(grpo_cmd(toy, tmp_path, "resumed", "--log_rollouts_every", "1", "--resume"), launcher=torchrun())

    def strip(m):
        return {k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}

    straight = [strip(m) for m in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    resumed = [strip(m) for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert [m["step"] for m in straight] == [0, 1, 2] and straight == resumed
    assert read_jsonl(tmp_path / "straight" / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")
    # an odd eval count: the ranks' shares differ in size (5 and 4), and all are gathered
    assert straight[0]["eval/num_problems"] == 9 and straight[0]["eval/gold_logprob"] < 0
    assert len(read_jsonl(tmp_path / "straight" / "eval" / "step_000002.jsonl")) == 9
    step = straight[1]
    assert step["num_tokens"] > 0 and 0 <= step["sampler/logprob_gap_mean"] <= step["sampler/logprob_gap_max"] < 1e-3
    assert (tmp_path / "straight" / "final" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "straight")


SHARDED_RUNS = {"raft_pp.py": ["--kl_coef", "0.01"],  # a frozen KL reference next to the sharded policy
                "prime.py": ["--filter_low", "0", "--filter_high", "1"]}  # policy, PRM (both clipped), reference


@needs_vllm
@pytest.mark.parametrize("script,launch", [("raft_pp.py", "zero3"), ("prime.py", "fsdp2")])
def test_sharded_runs_with_vllm_resume_equal_straight(toy, tmp_path, script, launch):
    """The scripts as users launch them on a GPU node (accelerate launch with a sharded config, colocated
    vLLM, frozen models, gradient clipping, checkpoints): 2 steps straight == 1 step, stop, --resume, 1
    more (every metric but timings and memory, the rollouts of both processes)."""
    def cmd(name, *extra):
        return [script, "--model", str(toy / "model"), "--train_file", str(toy / "train.jsonl"),
                "--test_file", str(toy / "test.jsonl"), "--output_dir", str(tmp_path), "--run_name", name,
                "--sampler", "vllm", "--total_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
                "--max_completion_length", "48", "--eval_limit", "6", "--temperature", "0.5",
                "--log_rollouts_every", "1", *SHARDED_RUNS[script], *extra]

    run_script(cmd("straight", "--save_every", "0"), launcher=launch_config(launch), timeout=600)
    run_script(cmd("resumed", "--stop_at_step", "1"), launcher=launch_config(launch), timeout=600)
    run_script(cmd("resumed", "--resume"), launcher=launch_config(launch), timeout=600)

    def strip(name):
        return [{k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}
                for m in read_jsonl(tmp_path / name / "metrics.jsonl")]

    assert [m["step"] for m in strip("resumed")] == [0, 1, 2] and strip("straight") == strip("resumed")
    step1, step2 = strip("straight")[1:]
    assert step1["grad_norm"] > 0, step1  # step 1 trained: the resumed run must have restored its weights
    if script == "raft_pp.py":
        assert step2["kl"] > 0  # the frozen reference and the policy differ after a step
    else:
        assert step2["grad_norm"] > 0 and "prm/loss" in step1 and "prm/loss" in step2
    assert read_jsonl(tmp_path / "straight" / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")
    assert (tmp_path / "straight" / "final" / "model.safetensors").exists()


@needs_vllm
def test_bad_tensor_parallel_size_stops_with_one_sentence(toy, tmp_path):
    with pytest.raises(AssertionError) as e:
        run_script(grpo_cmd(toy, tmp_path, "badtp", "--vllm_tensor_parallel_size", "3"), launcher=torchrun())
    assert "--vllm_tensor_parallel_size 3 must divide the number of processes (2)" in str(e.value)
    assert "[rank0]: Traceback" not in str(e.value)  # torchrun's own report of a failed child is not ours
