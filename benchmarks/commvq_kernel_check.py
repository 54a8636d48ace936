"""GPU check: the whole CommVQCache path with the Triton kernels equals the PyTorch references, at SmolLM2's shapes.

A random-weight Llama with SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, head_dim 64, RoPE theta
100000; ``--layers`` layers, default 4) and random (but valid) CommVQ codebooks at 1 bit (R=5) and 2 bits (R=11).
For each bit width the same token stream runs three times: ``CommVQCache`` with the Triton kernels (encode with
packing, window flushes, decode attention from codes), with the PyTorch references (``use_triton=False``), and in
``mode="dequantize"`` (the model's own attention over the dequantized cache). A ``--prefill``-token prompt is coded
after its prefill, then ``--decode`` tokens are fed one at a time (each window flush codes a chunk). The JSON records
the largest logit difference (kernels vs references, kernels vs dequantized) relative to the logits' scale, per bit
width, and whether the coded key bytes are identical.

It needs no model download (random weights, the SmolLM2 tokenizer is not used) and runs in about a minute:

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_kernel_check.py --output $OUT/commvq_kernel_check.json
    TRITON_INTERPRET=1 python benchmarks/commvq_kernel_check.py --smoke --output /tmp/commvq_kernel_check.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=160)
    ap.add_argument("--window", type=int, default=128, help="full-precision window of the cache")
    ap.add_argument("--n-sink", type=int, default=4, help="first tokens kept in full precision")
    ap.add_argument("--smoke", action="store_true", help="small CPU run through the Triton interpreter")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.prefill, args.decode, args.window = 1, 96, 12, 16
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    import transformers
    import triton
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.presses import CommVQCache
    from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, residuals_for_bits

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    if args.smoke:
        config.hidden_size, config.intermediate_size = 192, 256  # head_dim 64 kept: 3 query heads, 3 KV heads
        config.num_attention_heads = 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    ids = torch.randint(10, config.vocab_size, (1, args.prefill + args.decode), device=device)
    result: dict = {
        "benchmark": "commvq_kernel_check",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "shape": {"layers": args.layers, "q_heads": config.num_attention_heads, "kv_heads": kv_heads, "head_dim": 64},
        "prefill": args.prefill,
        "decode": args.decode,
        "window": args.window,
        "n_sink": args.n_sink,
        "bits": {},
    }
    for bits in (1, 2):
        t0 = time.perf_counter()
        r = residuals_for_bits(bits, head_dim)
        gen = torch.Generator().manual_seed(bits)
        theta = (torch.randn(args.layers, kv_heads, r, 128, head_dim // 2, generator=gen) * 0.1).half().float()
        books = CommVQCodebooks(
            "random",
            bits,
            r,
            head_dim,
            args.layers,
            kv_heads,
            theta,
            values=[ValueCodec(kv_heads * head_dim, bits) for _ in range(args.layers)],
        )
        runs = {}
        for name, kw in (
            ("kernels", {"mode": "codes", "use_triton": True}),
            ("references", {"mode": "codes", "use_triton": False}),
            ("dequantized", {"mode": "dequantize", "use_triton": False}),
        ):
            cache = CommVQCache(
                config,
                books,
                bits=bits,
                window=args.window,
                n_sink=args.n_sink,
                rotary_emb=model.model.rotary_emb,
                **kw,
            )
            with torch.no_grad():
                logits = [model(ids[:, : args.prefill], past_key_values=cache).logits[:, -1:]]
                for t in range(args.prefill, args.prefill + args.decode):
                    logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
            runs[name] = (torch.cat(logits, dim=1).float(), cache)
        ref, ref_cache = runs["references"]
        scale = float(ref.abs().max())
        ker, ker_cache = runs["kernels"]
        deq, _ = runs["dequantized"]
        n_coded = int(ker_cache.layers[0].n)
        same_codes = all(
            torch.equal(a.codes[..., : a.n, :], b.codes[..., : b.n, :]) and a.n == b.n
            for a, b in zip(ker_cache.layers, ref_cache.layers)
        )
        code_match = sum(
            float((a.codes[..., : a.n, :] == b.codes[..., : b.n, :]).float().mean())
            for a, b in zip(ker_cache.layers, ref_cache.layers)
        ) / len(ker_cache.layers)
        result["bits"][str(bits)] = {
            "residuals": r,
            "coded_tokens_layer0": n_coded,
            "logit_scale": scale,
            "kernels_vs_references_max_rel": float((ker - ref).abs().max()) / scale,
            "kernels_vs_dequantized_max_rel": float((ker - deq).abs().max()) / scale,
            "references_vs_dequantized_max_rel": float((ref - deq).abs().max()) / scale,
            "argmax_agreement_kernels_vs_references": float((ker.argmax(-1) == ref.argmax(-1)).float().mean()),
            "identical_key_codes": same_codes,
            "key_code_byte_agreement": code_match,
            "seconds": time.perf_counter() - t0,
        }
        print(bits, result["bits"][str(bits)], flush=True)
        atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
