"""Capacity: a Llama-3.1-8B-shaped random-weight model holds a 1M-token context in a 1-bit CommVQCache on one H100.

The fp16 cache of 1M tokens would need 128 GB (32 layers x 8 KV heads x 128 x 2 x 2 bytes per token); at 1 bit the
CommVQ cache holds 272 bytes per token and layer. Phases (JSON written after each):

1. model: ``AutoModelForCausalLM.from_config(Llama-3.1-8B config, dtype=bfloat16)`` (random weights), random but
   valid 1-bit codebooks (R=11 key residuals, 1 value bit per element, random value codecs).
2. chunked prefill through the model: ``--prefill-tokens`` tokens (default 8192) in chunks of ``--chunk`` into the
   CommVQCache (every chunk attends to the codes of the previous ones, dequantized a block at a time; then it is
   coded), with its throughput and peak memory.
3. fill: the rest of the context up to ``--tokens`` (default 1,048,576) coded directly into every layer a chunk at a
   time (random pre-RoPE keys / values; a full quadratic prefill of 1M tokens is hours of attention on any GPU and is
   not what this measures), with progress per chunk; it stops early (recorded) if ``--budget-s`` would be
   exceeded: encode time, bytes held (``memory_bytes()``) against the arithmetic, peak memory.
4. decode: ``--decode`` tokens generated greedily from the 1M-token cache (attention from the codes, Triton), per-token
   latency and peak memory.

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_capacity.py --output $OUT/commvq_capacity.json
    TRITON_INTERPRET=1 python benchmarks/commvq_capacity.py --smoke --output /tmp/commvq_capacity_smoke.json  # CPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_encode import code_bytes
from pressroom.presses.commvq_cache import CommVQCache
from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, model_kv_shape


def llama8b_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=1000,
            max_position_embeddings=1 << 21,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="tokens prefilled through the model (<= 16k)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--fill-chunk", type=int, default=65536)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="wall-clock budget: the fill stops early (recorded in the JSON) when its projected end would leave less "
        "than the decode phase needs",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.tokens, args.prefill_tokens, args.chunk, args.fill_chunk, args.decode = 600, 96, 48, 256, 2
    import transformers
    import triton
    from transformers import AutoModelForCausalLM

    result: dict = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "tokens": args.tokens,
    }
    out = Path(args.output)

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - T0
        atomic_write_json(out, result)

    log(
        f"device {result['device']}, torch {torch.__version__}, triton {triton.__version__}; "
        f"target {args.tokens} tokens"
    )

    # 1. model and codebooks
    torch.manual_seed(0)
    cfg = llama8b_config(args.smoke)
    cfg._attn_implementation = "sdpa"
    t = time.perf_counter()
    with torch.device(device):  # initialise the random weights on the GPU (CPU init of 8B parameters is slow)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if args.smoke else torch.bfloat16).eval()
    sync(device)
    layers, heads, head_dim = model_kv_shape(cfg)
    residuals = 11 if head_dim == 128 else 2
    books = CommVQCodebooks(
        "random-llama-8b-shape",
        1,
        residuals,
        head_dim,
        layers,
        heads,
        torch.randn(layers, heads, residuals, 128, head_dim // 2) * 0.05,
        values=[ValueCodec(heads * head_dim, 1) for _ in range(layers)],
    )
    cache = CommVQCache(cfg, books, bits=1, window=128, rotary_emb=model.model.rotary_emb)
    fp16_per_token = layers * heads * head_dim * 2 * 2
    per_token = layers * (heads * code_bytes(residuals) + heads * head_dim // 8 + 2 + 2 + 4)
    result["model"] = {"layers": layers, "kv_heads": heads, "head_dim": head_dim, "key_residuals": residuals}
    result["model_seconds"] = time.perf_counter() - t
    result["bytes_per_token_all_layers"] = {"commvq_1bit": per_token, "fp16": fp16_per_token}
    result["fp16_cache_gb_at_tokens"] = fp16_per_token * args.tokens / 1e9
    result["model_load_peak_gb"] = peak_gb(device)
    result["phase"] = "model"
    save()
    log(f"model: {result['model_seconds']:.1f} s, peak {result['model_load_peak_gb']} GB")

    # 2. chunked prefill through the model (the first chunk also compiles the encode kernel)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill_tokens), device=device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, args.prefill_tokens, args.chunk):
            tc = time.perf_counter()
            model.model(input_ids=ids[:, s : s + args.chunk], past_key_values=cache)
            sync(device)
            log(f"prefill chunk {s}..{min(args.prefill_tokens, s + args.chunk)}: {time.perf_counter() - tc:.2f} s")
    sync(device)
    dt = time.perf_counter() - t
    result["chunked_prefill"] = {
        "tokens": args.prefill_tokens,
        "chunk": args.chunk,
        "seconds": dt,
        "tokens_per_s": args.prefill_tokens / dt,
        "peak_gb": peak_gb(device),
        "cache_bytes": cache.memory_bytes(),
    }
    result["phase"] = "chunked_prefill"
    save()
    log(f"chunked prefill: {args.prefill_tokens} tokens in {dt:.1f} s, peak {peak_gb(device)} GB")

    # 3. fill to the full context, a chunk at a time (stops early, recorded, if the budget would be exceeded)
    cache.reserve(args.tokens)
    g = torch.Generator(device=device).manual_seed(1)  # random KV made on the device (CPU randn would dominate)
    pos0 = cache.get_seq_length()
    decode_reserve_s = 30.0  # what the decode phase may need (compile + steps at 1M tokens)
    stopped_early = None
    sync(device)
    t = time.perf_counter()
    s = pos0
    with torch.no_grad():
        while s < args.tokens:
            m = min(args.fill_chunk, args.tokens - s)
            tc = time.perf_counter()
            positions = torch.arange(s, s + m, device=device)
            for layer in cache.layers:
                k = torch.randn(1, heads, m, head_dim, generator=g, device=device, dtype=model.dtype) * 2
                v = torch.randn(1, heads, m, head_dim, generator=g, device=device, dtype=model.dtype)
                layer.append_prerope(k, v, positions)
            sync(device)
            s += m
            step = time.perf_counter() - tc
            rate = (s - pos0) / (time.perf_counter() - t)
            log(f"fill {s}/{args.tokens} tokens: chunk {step:.2f} s, {rate:.0f} tokens/s over all layers")
            remaining = (args.tokens - s) / rate
            if s < args.tokens and time.perf_counter() - T0 + remaining + decode_reserve_s > args.budget_s:
                stopped_early = (
                    f"stopped at {s} tokens: the rest ({args.tokens - s}) would take ~{remaining:.0f} s more at "
                    f"{rate:.0f} tokens/s, over --budget-s {args.budget_s}"
                )
                log(stopped_early)
                break
    sync(device)
    dt = time.perf_counter() - t
    held = cache.memory_bytes()
    result["fill"] = {
        "tokens_coded": s - pos0,
        "seconds": dt,
        "seconds_per_layer_per_128k": dt / layers * 131072 / max(1, s - pos0),
        "peak_gb": peak_gb(device),
        "stopped_early": stopped_early,
    }
    result["context_tokens"] = cache.get_seq_length()
    result["cache_bytes_held"] = held
    result["cache_gb_held"] = held / 1e9
    result["codebook_bytes"] = cache.codebook_bytes()
    result["fp16_over_commvq"] = fp16_per_token * cache.get_seq_length() / held
    result["phase"] = "fill"
    save()
    log(
        f"fill: {s - pos0} tokens coded in {dt:.1f} s; context {result['context_tokens']} tokens, cache "
        f"{held / 1e9:.2f} GB held (fp16 would be {fp16_per_token * result['context_tokens'] / 1e9:.1f} GB)"
    )

    # 4. decode from the cache
    nxt = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
    times = []
    tokens = []
    with torch.no_grad():
        for i in range(args.decode):
            sync(device)
            tc = time.perf_counter()
            logits = model(input_ids=nxt, past_key_values=cache).logits
            nxt = logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - tc)
            tokens.append(int(nxt))
            log(f"decode step {i}: {1e3 * times[-1]:.1f} ms")
    result["decode"] = {
        "tokens": args.decode,
        "context_tokens_after": cache.get_seq_length(),
        "ms_per_token_median": 1e3 * sorted(times)[len(times) // 2],
        "ms_per_token_first": 1e3 * times[0],
        "peak_gb": peak_gb(device),
        "finite_logits": bool(torch.isfinite(logits).all()),
        "generated": tokens,
    }
    result["total_peak_gb"] = peak_gb(device)
    result["phase"] = "decode"
    save()
    log(
        f"decode: {args.decode} tokens, median {result['decode']['ms_per_token_median']:.1f} ms/token, "
        f"peak {result['total_peak_gb']} GB; JSON in {out}"
    )


if __name__ == "__main__":
    main()
