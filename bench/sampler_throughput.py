"""Sampling throughput of our samplers against bare vLLM, and peak memory of the log-prob pass.

    python bench/sampler_throughput.py [--toy_model data/toy/model]

Part 1, completion tokens per second at temperature 1, 128 sequences (16 prompts x 8 samples),
measured after a warm-up call, median of --repeats calls, all in this one process:
  - ours/vllm:  common.Sampler("vllm").generate (per-prompt seeds, log-probs, Rollout records)
  - ours/hf:    common.Sampler("hf").generate (transformers model, KV-cache decode loop)
  - bare vllm:  vllm.LLM.generate with the same SamplingParams and nothing else (the peer)
on the toy model (its own prompts, natural lengths up to 64 tokens) and on a random-weight
Qwen2-shaped model of about 25M parameters (Qwen's 151,936-token vocabulary) with up to 128
completion tokens (random weights almost never sample EOS, so nearly all run to 128; each backend
is credited with the tokens it actually produced).

Part 2, peak memory of the training log-prob pass (forward + backward of common.token_logprobs)
on the 25M model for 8 sequences x 512 tokens (256 prompt + 256 completion), against the size of
the full float32 logits [8, 512, 151936]; and the same for the plain full-logits computation.
Each is measured in a fresh subprocess as the rise of peak RSS over the RSS before the pass.
The model body's own activations (independent of the vocabulary) are measured alone too, and
subtracted, so `*_logprob_extra_*` is what the log-prob computation itself costs.

Ends with one line: RESULT key=value ...
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

BIG = dict(vocab_size=151936, hidden_size=128, intermediate_size=1024, num_hidden_layers=8,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def make_big_model(path: Path):
    """Random-weight Qwen2-shaped model (~25M parameters, tied embeddings) and a byte-level BPE
    tokenizer with Qwen's 151,936-entry vocabulary (bytes + chat markers + filler tokens, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(alphabet))}
    vocab.update({f"tok{i}": i for i in range(len(vocab), BIG["vocab_size"])})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(**BIG, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path)


def time_calls(fn, repeats):
    fn()  # warm-up (vLLM compiles and allocates on its first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        times.append((time.perf_counter() - t0, tokens))
    dt, tokens = sorted(times)[len(times) // 2]
    return tokens / dt


def throughput(model_dir: Path, tok, prompts, max_tokens, repeats, label):
    """Tokens/s of our two samplers and of bare vLLM; each counts the tokens it really produced."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from common import Sampler

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours_vllm = Sampler("vllm", str(model_dir), tok, gpu_memory_utilization=0.3, dtype="float32")
    ours_hf = Sampler("hf", str(model_dir), tok, model=model, hf_batch_size=128)
    n = 8

    def run_ours(sampler):
        groups = sampler.generate(prompts, n, 1.0, max_tokens, seed=0)
        return sum(len(r.completion_ids) for g in groups for r in g)

    def run_bare():
        params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, logprobs=0)
                  for i in range(len(prompts))]
        outs = ours_vllm.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.token_ids) for out in outs for o in out.outputs)

    result = {
        f"{label}_ours_vllm_tok_s": time_calls(lambda: run_ours(ours_vllm), repeats),
        f"{label}_bare_vllm_tok_s": time_calls(run_bare, repeats),
        f"{label}_ours_hf_tok_s": time_calls(lambda: run_ours(ours_hf), repeats),
    }
    del ours_vllm
    return result


# --- part 2: memory ---------------------------------------------------------------------------
MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM
from common import collate_ids, token_logprobs
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
g = torch.Generator().manual_seed(0)
pairs = [(torch.randint(0, 151936, (256,), generator=g).tolist(), torch.randint(0, 151936, (256,), generator=g).tolist()) for _ in range(8)]
batch = collate_ids(pairs, 0, "cpu")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def high_water_mark():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = rss()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak: model loading spikes must not count
    f.write("5")
if sys.argv[3] == "body":  # the model body alone, no LM head: what every variant pays anyway
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=torch.empty(0, dtype=torch.long), output_hidden_states=True)
    lp = out.hidden_states[-1]
elif sys.argv[3] == "ours":
    lp = token_logprobs(model, batch)
else:  # plain: full logits, then log_softmax and gather (what most trainers do)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[torch.arange(8)[:, None], batch["logits_index"]], -1).gather(-1, batch["completion_ids"][..., None])
lp.sum().backward()
peak = high_water_mark()
print(json.dumps({"extra": peak - before, "before": before}))
"""


def peak_memory(model_dir: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(Path(__file__).resolve().parent.parent),
                          str(model_dir), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy_model", default="data/toy/model", help="toy model folder (python data_prep.py toy)")
    ap.add_argument("--toy_test", default="data/toy/test.jsonl", help="toy prompts")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend (median reported)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    import common
    from common import encode_prompts, load_tasks

    tok = AutoTokenizer.from_pretrained(args.toy_model)
    prompts = encode_prompts(tok, load_tasks(args.toy_test)[:16])
    res = {}
    res.update(throughput(Path(args.toy_model), tok, prompts, 64, args.repeats, "toy"))
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "qwen2_25m"
        model, big_tok = make_big_model(big)
        res["big_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        del model
        texts = [common.render_prompt(tok, r["prompt"]) for r in load_tasks(args.toy_test)[:16]]
        big_prompts = [big_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        res.update(throughput(big, big_tok, big_prompts, 128, args.repeats, "big"))
        full_logits = 8 * 512 * 151936 * 4
        res["logits_fp32_MB"] = full_logits / 2**20
        res["body_pass_peak_MB"] = peak_memory(big, "body") / 2**20
        res["ours_pass_peak_MB"] = peak_memory(big, "ours") / 2**20
        res["plain_pass_peak_MB"] = peak_memory(big, "plain") / 2**20
        # the log-prob pass proper: what the LM head + log-softmax add on top of the model body
        res["ours_logprob_extra_MB"] = res["ours_pass_peak_MB"] - res["body_pass_peak_MB"]
        res["plain_logprob_extra_MB"] = res["plain_pass_peak_MB"] - res["body_pass_peak_MB"]
    for size in ("toy", "big"):
        res[f"{size}_ours_vllm_vs_bare"] = res[f"{size}_ours_vllm_tok_s"] / res[f"{size}_bare_vllm_tok_s"]
        res[f"{size}_ours_vllm_vs_hf"] = res[f"{size}_ours_vllm_tok_s"] / res[f"{size}_ours_hf_tok_s"]
    res["ours_logprob_extra_vs_logits"] = res["ours_logprob_extra_MB"] / res["logits_fp32_MB"]
    res["plain_logprob_extra_vs_logits"] = res["plain_logprob_extra_MB"] / res["logits_fp32_MB"]
    for k, v in res.items():
        print(f"{k:32s} {v:12.3f}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
