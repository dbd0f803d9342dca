"""Several processes as our users run them: torchrun / accelerate launch with DDP or FSDP2 (gloo on CPU),
colocated vLLM engines (external_launcher, tensor parallel 1 and 2)."""

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
from common import read_jsonl
from conftest import REPO, free_port, run_script, torchrun
from dist_update import CASES

def launch_config(name: str = "fsdp2") -> list[str]:
    """One of the repo's launch configs with 2 processes on CPU (float32, so the results compare exactly)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / f"{name}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]


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
    whitening, PRM and the released code's batch-wide scaling) with two processes holding half the batch
    leaves the weights of one process holding all of it. Also: a checkpoint written by two processes (one
    of them late) holds both ranks' states, and loading it restores the weights (DDP, FSDP2 and DeepSpeed ZeRO-3; ZeRO-3 runs
    every script but prime.py, which refuses DeepSpeed when it trains a PRM); and under DDP and FSDP2 a
    NaN advantage on one process skips the optimizer step on both, leaving every rank's weights (shards)
    unchanged (DeepSpeed's engine steps inside backward: counted, not skipped)."""
    out = run_script(["tests/dist_update.py", str(toy / "model"), str(one_process_updates)],
                     launcher=torchrun() if launch == "ddp" else launch_config(launch))
    assert "DIST_UPDATE_OK" in out.stdout and "weights restored" in out.stdout
    for rank in (0, 1) if launch != "zero3" else ():  # NaN advantage on rank 1: both skip, both keep weights
        assert f"rank {rank}: the non-finite step was skipped, weights unchanged, counted once" in out.stdout
    suffix = {"ddp": "", "fsdp2": "_fsdp", "zero3": "_zero3"}[launch]
    initial = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    for case in [c for c in CASES if not (launch == "zero3" and c.startswith("prime"))]:
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
                     launcher=torchrun() if launch == "ddp" else launch_config(launch))
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
# the paths where two processes meet: a reward scale over the whole batch, a frozen KL reference, two
# optimizer steps per batch in micro-batches, evaluation with several samples; a learning rate that
# changes the step-2 samples
WHOLE_RUN = ["--log_rollouts_every", "1", "--scale_rewards", "batch", "--beta", "0.04", "--num_iterations", "2",
             "--micro_batch_size", "4", "--eval_num_samples", "2", "--learning_rate", "1e-3"]
SAME_SAMPLES = ["tests/harness.py", "--same_samples"]  # each prompt sampled with a seed of its own


def metrics_of(run):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)} for m in read_jsonl(run / "metrics.jsonl")]


def close(a, b) -> bool:
    """Equal, or floats within 1e-5 (relative, or absolute for the log-prob gaps near 0): sums over two processes
    are added in another order."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    return a == b


@needs_vllm
def test_whole_grpo_run_on_two_processes_equals_one_process_and_resumes(toy, tmp_path):
    """grpo_logprob.py with colocated vLLM, 2 steps: on two processes (torchrun) and on one, with the same global
    batch. Each process samples with a seed of its own, so by design the two runs draw different samples; given
    the same samples (tests/harness.py --same_samples seeds each prompt alike) everything else is equal: every
    metric (timings and memory aside) within 1e-5, the rollouts (so the step-2 samples after an update and a weight
    push too), the evaluations, and the final weights within 1e-5. And the two-process run stopped after step 1
    and resumed equals it exactly."""
    run_script(SAME_SAMPLES + grpo_cmd(toy, tmp_path, "two", *WHOLE_RUN), launcher=torchrun())
    run_script(SAME_SAMPLES + grpo_cmd(toy, tmp_path, "one", *WHOLE_RUN))
    run_script(SAME_SAMPLES + grpo_cmd(toy, tmp_path, "resumed", *WHOLE_RUN, "--stop_at_step", "1"), launcher=torchrun())
    run_script(SAME_SAMPLES + grpo_cmd(toy, tmp_path, "resumed", *WHOLE_RUN, "--resume"), launcher=torchrun())
    one, two = tmp_path / "one", tmp_path / "two"

    assert [m["step"] for m in metrics_of(two)] == [0, 1, 2] and metrics_of(two) == metrics_of(tmp_path / "resumed")
    assert read_jsonl(two / "rollouts.jsonl") == read_jsonl(tmp_path / "resumed" / "rollouts.jsonl")
    for m1, m2 in zip(metrics_of(one), metrics_of(two), strict=True):
        assert m1.keys() == m2.keys()
        assert all(close(m1[k], m2[k]) for k in m1), {k: (m1[k], m2[k]) for k in m1 if not close(m1[k], m2[k])}

    def by_sample(records):  # one process logs prompts in order, two gather their shares: compare as sets
        return sorted(records, key=lambda r: (r.get("step", 0), r["id"], json.dumps(r, sort_keys=True)))

    rollouts = read_jsonl(one / "rollouts.jsonl")
    assert len(rollouts) == 2 * 4 * 4 and by_sample(rollouts) == by_sample(read_jsonl(two / "rollouts.jsonl"))
    assert len({r["completion"] for r in rollouts}) > 8  # sampled, not greedy copies
    for name in ("step_000000.jsonl", "step_000002.jsonl"):
        assert by_sample(read_jsonl(one / "eval" / name)) == by_sample(read_jsonl(two / "eval" / name)), name
    # an odd eval count: the ranks' shares differ in size (5 and 4), and all are gathered
    step0, step1 = metrics_of(two)[:2]
    assert step0["eval/num_problems"] == 9 and step0["eval/gold_logprob"] < 0
    assert step1["num_tokens"] > 0 and step1["kl"] > 0
    assert 0 <= step1["sampler/logprob_gap_mean"] <= step1["sampler/logprob_gap_max"] < 1e-3
    initial = load_file(toy / "model" / "model.safetensors")
    final_one, final_two = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max((final_one[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # the runs trained
    assert max((final_one[k] - final_two[k]).abs().max().item() for k in initial) < 1e-5
    shutil.rmtree(two)


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

    run_script(cmd("straight", "--save_every", "0"), launcher=launch_config(launch))
    run_script(cmd("resumed", "--stop_at_step", "1"), launcher=launch_config(launch))
    run_script(cmd("resumed", "--resume"), launcher=launch_config(launch))

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
