"""GPU memory per process for colocated training + vLLM, from the models' shapes (a formula, not a measurement).

    python bench/memory_table.py [--gpu_gb 80] [--gpus 8] [--vllm_share 0.3]

Per GPU, with N parameters, G GPUs and bf16 mixed precision (accelerate --mixed_precision bf16:
float32 master weights, float32 gradients, AdamW's two float32 moments):
    weights   4 N / S      gradients 4 N / S      AdamW 8 N / S
with S = 1 for DDP (every GPU holds everything) and S = G for FSDP and ZeRO-3 (fully sharded).
A frozen reference model (KL loss, the KL metric of raft_pp/reinforce_rej, PRIME's reference) adds
2 N in bf16 on every GPU (it is not sharded). The colocated vLLM engine takes --vllm_gpu_memory_utilization
of the GPU: its bf16 weights 2 N / TP, and the KV cache fills the rest of that share, at
    2 (K and V) x layers x kv_heads x head_dim x 2 bytes / TP   per token.
What is left is for activations (not counted here: they depend on micro-batch size, sequence length and
gradient checkpointing) and the CUDA context (about 1 GB). Ends with a RESULT line.
"""

import argparse

# Published configurations (config.json of each hub model).
MODELS = {
    "Qwen2.5-0.5B": dict(params=0.494e9, layers=24, kv_heads=2, head_dim=64),
    "Qwen2.5-Math-1.5B": dict(params=1.544e9, layers=28, kv_heads=2, head_dim=128),
    "Qwen2.5-Math-7B": dict(params=7.616e9, layers=28, kv_heads=4, head_dim=128),
}
GB = 1e9


def per_gpu(model: dict, strategy: str, gpus: int, gpu_gb: float, vllm_share: float, tp: int, frozen: bool) -> dict:
    n = model["params"]
    shards = 1 if strategy == "DDP" else gpus
    row = {"weights": 4 * n / shards / GB, "gradients": 4 * n / shards / GB, "adamw": 8 * n / shards / GB,
           "frozen_ref": 2 * n / GB if frozen else 0.0, "vllm_share": vllm_share * gpu_gb,
           "vllm_weights": 2 * n / tp / GB}
    row["kv_cache"] = max(row["vllm_share"] - row["vllm_weights"], 0.0)
    kv_per_token = 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * 2 / tp
    row["kv_tokens"] = row["kv_cache"] * GB / kv_per_token
    row["left"] = gpu_gb - row["weights"] - row["gradients"] - row["adamw"] - row["frozen_ref"] - row["vllm_share"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu_gb", type=float, default=80.0, help="memory of one GPU, GB")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (processes) sharing the sharded state")
    parser.add_argument("--vllm_share", type=float, default=0.3, help="--vllm_gpu_memory_utilization")
    parser.add_argument("--tp", type=int, default=1, help="--vllm_tensor_parallel_size")
    parser.add_argument("--frozen_ref", action="store_true", help="count a frozen bf16 reference model")
    args = parser.parse_args()
    print(f"GB per GPU: {args.gpus} x {args.gpu_gb:.0f} GB, bf16 mixed precision, vLLM share {args.vllm_share}, "
          f"tensor parallel {args.tp}{', frozen reference' if args.frozen_ref else ''}\n")
    print("| model | strategy | weights | gradients | AdamW | frozen ref | vLLM share (weights + KV) | KV cache tokens | left for activations |")
    print("|---|---|---|---|---|---|---|---|---|")
    result = []
    for name, model in MODELS.items():
        for strategy in ("DDP", "FSDP", "ZeRO-3"):
            r = per_gpu(model, strategy, args.gpus, args.gpu_gb, args.vllm_share, args.tp, args.frozen_ref)
            left = f"{r['left']:.1f}" if r["left"] > 0 else f"**{r['left']:.1f} (does not fit)**"
            print(f"| {name} | {strategy} | {r['weights']:.1f} | {r['gradients']:.1f} | {r['adamw']:.1f} | "
                  f"{r['frozen_ref']:.1f} | {r['vllm_share']:.1f} ({r['vllm_weights']:.1f} + {r['kv_cache']:.1f}) | "
                  f"{r['kv_tokens'] / 1e3:.0f}k | {left} |")
            result.append(f"{name.split('-')[-1].lower()}_{strategy.lower().replace('-', '')}_left_gb={r['left']:.1f}")
    print("\nRESULT " + " ".join(result))


if __name__ == "__main__":
    main()
