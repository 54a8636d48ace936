"""CommVQ key encode at 128k tokens per layer (Llama-3.1-8B shape): the searches and dot precisions side by side.

The encode kernel (:func:`pressroom.kernels.commvq_encode.encode_keys`) scores the residual against the 64 ``u_A``
and 64 ``w_B`` of each step with ``tl.dot``; ``precision="ieee"`` (the default) keeps float32 and reproduces the
PyTorch reference's codes, ``"tf32"`` runs the dots on tensor cores, ``"tf32x3"`` splits float32 into three TF32
products. This times the flat search (the default), the running-minima search and the split search (per ``A`` the
minimum over ``B`` of a fixed cross-term table plus ``g_B``, then the arg-mins) at the tilings of
:data:`pressroom.kernels.commvq_resources.ENCODE_TILINGS` (median of 5 calls after a warm-up, CUDA events) on random
float16-exact codebooks and random keys. For each variant it reports the fraction of tokens whose packed codes equal
the first (flat, ieee) variant's and the mean squared reconstruction error of the codes (so a faster variant that
picks other centers on near-ties shows whether that costs anything).

    source benchmarks/gpu_env.sh && cd benchmarks && python3 commvq_encode_variants.py --output $OUT/x.json
    # only the split sweep next to the flat baselines (the file commvq_encode_split.json):
    python3 commvq_encode_variants.py --searches flat split --output $OUT/commvq_encode_split.json
    # the split search with float16 sums (split_h2) next to the float32 one (the file commvq_encode_h2.json):
    python3 commvq_encode_variants.py --tilings flat:16:4:ieee split:128:8:tf32 split_h2:64:8:tf32 ... \
        --output $OUT/commvq_encode_h2.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _timing import call_ms, kernel_ms

from pressroom.kernels.commvq_codebook import residual_decode
from pressroom.kernels.commvq_encode import (
    PAIRED_SEARCHES,
    SEARCHES,
    KeyTables,
    code_bytes,
    encode_keys,
    normalize_keys,
    unpack_codes12,
)
from pressroom.kernels.commvq_resources import ENCODE_TILINGS

H, D = 8, 128
BASELINES = (
    dict(block_n=16, num_warps=4, search="flat", precision="ieee"),
    dict(block_n=16, num_warps=8, search="flat", precision="ieee"),
    dict(block_n=16, num_warps=4, search="flat", precision="tf32"),
)


def variants(searches: list[str]) -> list[dict]:
    """The flat baselines, then the swept tilings of the other searches asked for."""
    swept = [{k: v for k, v in kw.items() if k != "a_chunk"} for kw in ENCODE_TILINGS if kw["search"] != "nested"]
    out: list[dict] = []
    for kw in (*BASELINES, *swept):
        if kw["search"] in searches and kw not in out:
            out.append(kw)
    return out


def parse_tilings(specs: list[str]) -> list[dict]:
    """``SEARCH:BLOCK_N:WARPS:PRECISION`` strings -> :func:`encode_keys` keyword sets."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 4 or parts[0] not in SEARCHES or not parts[1].isdigit() or not parts[2].isdigit():
            raise SystemExit(f"--tilings: {spec!r} is not SEARCH:BLOCK_N:WARPS:PRECISION with SEARCH in {SEARCHES}.")
        out.append(dict(block_n=int(parts[1]), num_warps=int(parts[2]), search=parts[0], precision=parts[3]))
    return out


def reconstruction_mse(packed: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, r: int) -> float:
    """Mean over tokens and heads of ||x - decoded||^2 (x is unit-norm per token over all heads)."""
    err = 0.0
    for h in range(H):
        dec = residual_decode(unpack_codes12(packed[:, h], r), theta[h])
        err += float((dec - x[:, h]).pow(2).sum(-1).mean())
    return err / H


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--searches", nargs="+", default=["flat", "running", "split"], choices=SEARCHES)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument(
        "--tilings", nargs="+", default=None, metavar="SEARCH:BLOCK_N:WARPS:PRECISION",
        help="only these variants, in this order (e.g. flat:16:4:ieee split:128:8:tf32 split_h2:64:8:tf32); the "
        "first is the one the others' codes are compared with",
    )  # fmt: skip
    ap.add_argument(
        "--key-norm-bound",
        type=float,
        default=None,
        help="passed to encode_keys for the split_h2 / split_dpx searches, as the cache passes 1.0 (default: bounded "
        "from the keys on every call, a device sync each)",
    )
    ap.add_argument(
        "--gpu-time",
        action="store_true",
        help="also each variant's kernel time on the GPU alone (torch.profiler, mean of 3 calls): kernel_ms",
    )
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    chosen = variants(args.searches) if args.tilings is None else parse_tilings(args.tilings)
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
    for bits in args.bits:
        r = {1: 11, 2: 21}[bits]
        g = torch.Generator().manual_seed(0)
        theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).cuda()
        raw = torch.randn(1, H, n, D, device="cuda")
        tables = KeyTables(theta)
        x, _ = normalize_keys(raw)
        first = None
        for kw in chosen:
            o = torch.empty(n, H, code_bytes(r), dtype=torch.uint8, device="cuda")

            paired = args.key_norm_bound and kw["search"] in PAIRED_SEARCHES
            bound = dict(key_norm_bound=args.key_norm_bound) if paired else {}

            def f(o=o, kw=kw, x=x, theta=theta, tables=tables, bound=bound):
                return encode_keys(x[0], theta, use_triton=True, tables=tables, out=o, **kw, **bound)

            try:
                ms = sorted(call_ms(f, 5, warmup=1, cuda=True))[2]
            except Exception as e:  # a tiling that fails is recorded, not fatal (and its buffer is not read)
                ms = f"failed: {e}"[:200]
            row = dict(kw, bits=bits, ms=ms, codes_equal_to_first=None, mse=None)
            if args.gpu_time and isinstance(ms, float):
                row["kernel_ms"] = kernel_ms(f, 3)
            if isinstance(ms, float):
                first = o.clone() if first is None else first  # the first variant that ran (flat, ieee by default)
                row["codes_equal_to_first"] = float((o == first).all(-1).float().mean())
                row["mse"] = reconstruction_mse(o[: 1 << 14], x[0, : 1 << 14], theta, r)  # the first 16k tokens
            out["rows"].append(row)
            print(row, flush=True)
            with open(args.output, "w") as fh:  # after every row: a time-out keeps what finished
                json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
