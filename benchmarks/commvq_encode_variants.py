"""CommVQ key encode at 128k tokens per layer (Llama-3.1-8B shape): float32 (ieee) vs TF32 dot products.

The encode kernel (:func:`pressroom.kernels.commvq_encode.encode_keys`) scores the residual against the 64 ``u_A``
and 64 ``w_B`` of each step with ``tl.dot``; ``precision="ieee"`` (the default) keeps float32 and reproduces the
PyTorch reference's codes, ``precision="tf32"`` runs the dots on tensor cores. This times the flat search and the
running-minima search (``search="running"``) at a few tilings in both precisions (median of 5 calls after a
warm-up, CUDA events) on random float16-exact codebooks and random keys, and reports the fraction of tokens whose
packed codes equal the first (ieee) variant's.

    source benchmarks/gpu_env.sh && cd benchmarks && python3 commvq_encode_variants.py --output $OUT/x.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import call_ms

from pressroom.kernels.commvq_encode import KeyTables, code_bytes, encode_keys, normalize_keys

H, D = 8, 128
VARIANTS = (
    dict(block_n=16, num_warps=4, search="flat", precision="ieee"),
    dict(block_n=16, num_warps=8, search="flat", precision="ieee"),
    dict(block_n=16, num_warps=4, search="flat", precision="tf32"),
    dict(block_n=16, num_warps=4, search="running", precision="ieee"),
    dict(block_n=32, num_warps=4, search="running", precision="ieee"),
    dict(block_n=32, num_warps=8, search="running", precision="ieee"),
    dict(block_n=64, num_warps=8, search="running", precision="ieee"),
    dict(block_n=16, num_warps=4, search="running", precision="tf32"),
    dict(block_n=32, num_warps=4, search="running", precision="tf32"),
    dict(block_n=32, num_warps=8, search="running", precision="tf32"),
    dict(block_n=64, num_warps=8, search="running", precision="tf32"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("commvq_encode_variants.py times GPU kernels: run it on a CUDA machine.")
    n = args.tokens
    import triton

    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tokens": n,
        "command": " ".join(sys.argv),
        "rows": [],
    }
    for bits, r in ((1, 11), (2, 21)):
        g = torch.Generator().manual_seed(0)
        theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).cuda()
        raw = torch.randn(1, H, n, D, device="cuda")
        tables = KeyTables(theta)
        x, _ = normalize_keys(raw)
        first = None
        for kw in VARIANTS:
            o = torch.empty(n, H, code_bytes(r), dtype=torch.uint8, device="cuda")

            def f(o=o, kw=kw, x=x, theta=theta, tables=tables):
                return encode_keys(x[0], theta, use_triton=True, tables=tables, out=o, **kw)

            try:
                ms = sorted(call_ms(f, 5, warmup=1, cuda=True))[2]
            except Exception as e:  # a tiling that fails is recorded, not fatal
                ms = f"failed: {e}"[:200]
            first = o.clone() if first is None else first
            row = dict(kw, bits=bits, ms=ms, codes_equal_to_first=float((o == first).all(-1).float().mean()))
            out["rows"].append(row)
            print(row, flush=True)
            with open(args.output, "w") as fh:  # after every row: a time-out keeps what finished
                json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
