"""The hf sampler's decode loop against transformers' `model.generate(..., output_logits=True)`.

    python bench/hf_decode.py [--toy_model data/toy/model] [--repeats 3]

Both produce what common.Sampler("hf") returns: n completions per prompt as Rollout records, with
each sampled token's log-prob under the sampled distribution, log softmax(logits / temperature):
  - loop:     common.Sampler("hf").generate (KV-cache decode loop, inverse-CDF sampling from a
              seeded torch.Generator, the log-prob of each sampled token gathered at each step)
  - generate: model.generate(do_sample=True, output_logits=True, return_dict_in_generate=True) under
              torch.manual_seed(seed), then log_softmax over the returned per-step logits [T x (B, V)]
              and a gather; top_k=0 and repetition_penalty=1 so that it samples the same distribution
Temperature 1, 16 prompts x 8 samples (128 sequences in one batch), completion tokens per second
(each side credited with the tokens it produced), median of --repeats calls after a warm-up call, on
  - toy:      the toy model (data_prep.py toy), its own prompts, natural lengths up to 64 tokens
  - 25m:      a random-weight Qwen2 model of ~25M parameters with the toy tokenizer (hidden 512,
              8 layers, head_dim 32), up to 128 tokens (random weights rarely sample EOS)
  - 25m_qwen: bench/sampler_throughput.py's random-weight ~25M Qwen2 model with Qwen's 151,936-token
              vocabulary (hidden 128, 8 layers), 4 prompts x 8 samples, up to 64 tokens: generate
              keeps every step's logits, [T, B, V] float32 (reported as *_generate_logits_MB)
The log-probs of both are checked against the training model's (common.token_logprobs) on the toy.

Ends with one line: RESULT key=value ...
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from sampler_throughput import make_big_model, time_calls  # noqa: E402

from common import Rollout, Sampler, collate, encode_prompts, load_tasks, token_logprobs, top_p_filter  # noqa: E402

MID = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=8, head_dim=32)


def generate_rollouts(model, tokenizer, eos_ids, prompt_ids, n, temperature, max_tokens, seed, top_p=1.0):
    """What Sampler("hf").generate returns, computed with model.generate(output_logits=True)."""
    from transformers import GenerationConfig

    flat = [p for p in prompt_ids for _ in range(n)]
    pad = tokenizer.pad_token_id
    b, width = len(flat), max(len(p) for p in flat)
    ids = torch.full((b, width), pad, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(flat):  # left padding, as the loop
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0,
                              max_new_tokens=max_tokens, eos_token_id=eos_ids, pad_token_id=pad,
                              output_logits=True, return_dict_in_generate=True)
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    tokens = out.sequences[:, width:]
    logps = []
    for t, logits in enumerate(out.logits):
        logp = torch.log_softmax(logits.float() / temperature, -1)
        if top_p < 1.0:
            logp = top_p_filter(logp, top_p)
        logps.append(logp.gather(1, tokens[:, t:t + 1]).squeeze(1))
    logits_bytes = sum(x.numel() * x.element_size() for x in out.logits)
    tokens_l, logps_l = tokens.tolist(), torch.stack(logps, 1).tolist()
    eos_set, rollouts = set(eos_ids), []
    for i, p in enumerate(flat):
        row = tokens_l[i]
        stop = next((j for j, t in enumerate(row) if t in eos_set), None)
        k = len(row) if stop is None else stop + 1
        rollouts.append(Rollout(list(p), row[:k], logps_l[i][:k], tokenizer.decode(row[:k], skip_special_tokens=True),
                                "length" if stop is None else "stop"))
    return [rollouts[i * n:(i + 1) * n] for i in range(len(prompt_ids))], logits_bytes


def logprob_error(model, tokenizer, groups):
    """Largest |sampler log-prob - training model's log-prob| over the sampled tokens."""
    rollouts = [r for g in groups for r in g]
    batch = collate(rollouts, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        trainer = token_logprobs(model, batch, 1.0)
    sampler = torch.zeros_like(trainer)
    for i, r in enumerate(rollouts):
        sampler[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return ((trainer - sampler).abs() * batch["completion_mask"]).max().item()


def compare(label, model, tokenizer, prompts, max_tokens, repeats, model_path=None, check=False):
    n = 8
    loop = Sampler("hf", model_path, tokenizer, model=model, hf_batch_size=len(prompts) * n)
    eos_ids = loop.eos_ids
    res = {}

    def run_loop():
        groups = loop.generate(prompts, n, 1.0, max_tokens, seed=0)
        return sum(len(r.completion_ids) for g in groups for r in g)

    def run_generate():
        groups, res[f"{label}_generate_logits_MB"] = generate_rollouts(model, tokenizer, eos_ids, prompts, n, 1.0,
                                                                       max_tokens, seed=0)
        return sum(len(r.completion_ids) for g in groups for r in g)

    res[f"{label}_loop_tok_s"] = time_calls(run_loop, repeats)
    res[f"{label}_generate_tok_s"] = time_calls(run_generate, repeats)
    res[f"{label}_generate_logits_MB"] /= 2**20
    res[f"{label}_loop_vs_generate"] = res[f"{label}_loop_tok_s"] / res[f"{label}_generate_tok_s"]
    if check:
        res[f"{label}_loop_logprob_err"] = logprob_error(model, tokenizer, loop.generate(prompts, n, 1.0, max_tokens, 0))
        res[f"{label}_generate_logprob_err"] = logprob_error(
            model, tokenizer, generate_rollouts(model, tokenizer, eos_ids, prompts, n, 1.0, max_tokens, 0)[0])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy_model", default="data/toy/model", help="toy model folder (python data_prep.py toy)")
    ap.add_argument("--toy_test", default="data/toy/test.jsonl", help="toy prompts")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    args = ap.parse_args()
    if not Path(args.toy_model).is_dir():
        raise SystemExit(f"{args.toy_model}: no toy model; build it with `python data_prep.py toy`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(args.toy_model)
    prompts = encode_prompts(tok, load_tasks(args.toy_test)[:16])
    toy = AutoModelForCausalLM.from_pretrained(args.toy_model, dtype=torch.float32)
    res = compare("toy", toy, tok, prompts, 64, args.repeats, model_path=args.toy_model, check=True)

    torch.manual_seed(0)
    mid = Qwen2ForCausalLM(Qwen2Config(**MID, vocab_size=toy.config.vocab_size, max_position_embeddings=512,
                                       tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval()
    res["25m_params_M"] = sum(p.numel() for p in mid.parameters()) / 1e6
    res.update(compare("25m", mid, tok, prompts, 128, args.repeats))
    del mid

    with tempfile.TemporaryDirectory() as tmp:
        big_path = Path(tmp) / "qwen2_25m"
        big, big_tok = make_big_model(big_path)
        big.eval()
        res["25m_qwen_params_M"] = sum(p.numel() for p in big.parameters()) / 1e6
        texts = [tok.decode(p) for p in prompts[:4]]
        big_prompts = [big_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        res.update(compare("25m_qwen", big, big_tok, big_prompts, 64, args.repeats, model_path=str(big_path)))
    for k, v in res.items():
        print(f"{k:34s} {v:12.4g}")
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in res.items()))


if __name__ == "__main__":
    main()
