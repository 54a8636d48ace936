# ruff: noqa: B023
"""CommVQ value refinement (greedy bit flips after the value encoder): the Triton kernel next to its PyTorch reference.

:func:`pressroom.kernels.commvq_refine.refine_value_bits` at the value shapes of the cache's encode: Llama-3.1-8B
(8 KV heads x head_dim 128 = 1024 channels; 1024 bits per token at 1 bit, 2048 at 2 bits) for ``--tokens`` tokens
(default 131072, one layer's prefill at 128k) and SmolLM2-135M (192 channels, 384 bits at 2 bits) for 4096 tokens,
both in chunks of 8192 tokens as :class:`pressroom.presses.CommVQLayer` encodes them, ``--steps`` flips at most
(the cache's default, 64). Inputs are random (a random codebook times a random channel scale; values and starting
bits random), so most tokens keep improving for many steps: an upper bound for real values, whose search converges
sooner. Reported per shape: median milliseconds of each implementation (CUDA events; the reference once, the kernel
over ``--reps`` calls after a warm-up), the relative reconstruction error before and after (both implementations),
and the fraction of tokens whose bits the two agree on (float32 rounding on the GPU can break near-ties the other
way; the CPU test checks exact equality under the interpreter).

    source benchmarks/gpu_env.sh && python3 benchmarks/commvq_value_refine.py --output $OUT/commvq_value_refine.json
    TRITON_INTERPRET=1 python benchmarks/commvq_value_refine.py --smoke --output /tmp/refine_smoke.json   # CPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _timing import call_ms, median_ms

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_refine import refine_value_bits, refine_value_bits_reference

CHUNK = 8192  # CommVQLayer's ENCODE_BLOCK before it became 32768
SHAPES = (  # (name, channels, bits per token, tokens: None = --tokens)
    ("llama8b_1bit", 1024, 1024, None),
    ("llama8b_2bit", 1024, 2048, None),
    ("smollm2_2bit", 192, 384, 4096),
)


def rel_err(x: torch.Tensor, bits: torch.Tensor, coef: torch.Tensor, emb: torch.Tensor) -> float:
    return float(((x - coef * (bits.float() @ emb)) ** 2).sum() / (x**2).sum())


def chunked(fn, x, bits, emb, steps):
    outs = [fn(x[s : s + CHUNK], bits[s : s + CHUNK], emb, steps) for s in range(0, x.shape[0], CHUNK)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    import triton

    t0 = time.perf_counter()
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "steps": args.steps,
        "chunk_tokens": CHUNK,
        "smoke": args.smoke,
        "shapes": {},
    }
    for name, feat, nbits, tokens in SHAPES[-1:] if args.smoke else SHAPES:
        n = 64 if args.smoke else tokens or args.tokens
        g = torch.Generator().manual_seed(0)
        emb = (torch.randn(nbits, feat, generator=g) * (torch.rand(feat, generator=g) + 0.5)).to(device)
        x = torch.randn(n, feat, generator=g).to(device)
        bits = torch.randint(0, 2, (n, nbits), generator=g, dtype=torch.uint8).to(device)
        row = {"channels": feat, "bits_per_token": nbits, "tokens": n}
        b0, c0 = chunked(refine_value_bits_reference, x, bits, emb, 0)
        row["rel_err_start"] = rel_err(x, b0, c0, emb)

        def ours():
            return chunked(lambda *a: refine_value_bits(*a, use_triton=True), x, bits, emb, args.steps)

        def reference():
            return chunked(refine_value_bits_reference, x, bits, emb, args.steps)

        ob, oc = ours()
        rb, rc = reference()
        row["rel_err_triton"] = rel_err(x, ob, oc, emb)
        row["rel_err_reference"] = rel_err(x, rb, rc, emb)
        row["tokens_same_bits"] = float((ob == rb).all(-1).float().mean())
        row["mean_flips"] = float((rb != bits).sum(-1).float().mean())
        row["triton_ms"] = median_ms(ours, 1 if args.smoke else args.reps, cuda)
        row["reference_ms"] = call_ms(reference, 1, warmup=0, cuda=cuda)[0]
        row["speedup"] = row["reference_ms"] / row["triton_ms"]
        result["shapes"][name] = row
        result["elapsed_s"] = time.perf_counter() - t0
        atomic_write_json(Path(args.output), result)
        print(name, row, flush=True)


if __name__ == "__main__":
    main()
