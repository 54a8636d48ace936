"""Where a CommVQ layer's encode spends its time at long context, and the value side's code path side by side.

The whole layer goes through the cache's own path (``CommVQLayer._encode``: key norms, the key search fused with the
12-bit packing, the value encoder, the value codes, the postscale, the stores) for ``--tokens`` tokens of the
Llama-3.1-8B shape (8 KV heads, head_dim 128; 1 bit: R=11, 2 bits: R=21), random codebooks and value codec,
``encode_precision="tf32"``, ``value_refine=0``, in chunks of ``--blocks`` tokens. Timed side by side in one run:

- ``layer_ms``: the value codes by the Triton kernel (``pressroom.kernels.commvq_value_codes``, the default on CUDA);
- ``layer_codes_pytorch_ms``: the same layer with the codes by their PyTorch reference (``argmax`` over the four-way
  choices, the bits, ``pack_bits``: the path before the kernel);
- the kernels of each by ``torch.profiler`` (mean GPU ms per layer encode);
- the parts alone, at one chunk: the key search (``encode_keys``), the value encoder's logits (TF32 matmuls), the codes
  (kernel and PyTorch), the postscale; the key search's inner-loop unroll and persistent programs per SM;
- the key search with the previous layout of its candidate loop (``wide_lanes=False``, the same codes) and with
  float16 dot operands (``dot_dtype``: other codes; the share of (token, head) code rows that stay the same and the
  squared reconstruction error of both);
- ``values_bf16_*``: the logits in bfloat16 (autocast) instead of TF32, with the share of value bits that stay the same
  (the codes change, so this is a measurement, not the default).

CPU: ``--smoke`` runs everything on a small shape (no timing value). JSON: ``--output`` (written after each width).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import call_ms, kernel_ms  # noqa: E402

from pressroom.kernels.commvq_codebook import centers_from_theta  # noqa: E402
from pressroom.kernels.commvq_encode import (  # noqa: E402
    KeyTables,
    code_bytes,
    encode_defaults,
    encode_keys,
    unpack_codes12,
)
from pressroom.kernels.commvq_value_codes import value_codes, value_codes_reference  # noqa: E402
from pressroom.presses import commvq_cache  # noqa: E402
from pressroom.presses.commvq_cache import CommVQLayer, _matmul_tf32  # noqa: E402
from pressroom.presses.commvq_codebooks import ValueCodec  # noqa: E402

H, D = 8, 128
RESIDUALS = {1: 11, 2: 21}


def median_ms(fn, reps: int, cuda: bool) -> float:
    return sorted(call_ms(fn, reps, warmup=1, cuda=cuda))[reps // 2]


def measure_width(bits: int, n: int, blocks: list[int], reps: int, device: torch.device, cfg: dict, log, save) -> None:
    """One bit width's timings into ``cfg`` (``save`` after each part)."""
    cuda = device.type == "cuda"
    r = RESIDUALS[bits]
    g = torch.Generator().manual_seed(bits)
    theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).to(device)
    codec = ValueCodec(H * D, bits).to(device)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))
    raw = torch.randn(1, H, n, D, generator=g).to(device)
    values = torch.randn(1, H, n, D, generator=g).to(device, torch.bfloat16)
    positions = torch.arange(n, device=device)
    cfg.update(bits=bits, key_residuals=r)
    layer = CommVQLayer(theta, codec, inv_freq.to(device), D**-0.5, encode_precision="tf32", value_refine=0)
    layer.lazy_initialization(raw[:, :, :1], values[:, :, :1])
    layer.reserve(n)

    def run() -> None:
        layer.n = 0
        layer._encode(raw, values, positions)

    def pytorch_codes(logits, bits_dtype=None, use_triton=None):
        return value_codes_reference(logits, bits_dtype)

    default_block = commvq_cache.ENCODE_BLOCK
    try:
        for block in blocks:
            commvq_cache.ENCODE_BLOCK = block
            cfg[f"layer_ms_block{block}"] = median_ms(run, reps, cuda)
            kernel_codes = layer.vbits[:, :n].clone()
            cfg[f"layer_kernels_ms_block{block}"] = kernel_ms(run, 2)
            commvq_cache.value_codes = pytorch_codes
            try:
                cfg[f"layer_codes_pytorch_ms_block{block}"] = median_ms(run, reps, cuda)
                cfg[f"layer_codes_pytorch_equal_block{block}"] = bool(torch.equal(layer.vbits[:, :n], kernel_codes))
                cfg[f"layer_codes_pytorch_kernels_ms_block{block}"] = kernel_ms(run, 2)
            finally:
                commvq_cache.value_codes = value_codes
            log(
                f"{bits} bit, chunks of {block}: layer {cfg[f'layer_ms_block{block}']:.2f} ms, with the PyTorch "
                f"codes {cfg[f'layer_codes_pytorch_ms_block{block}']:.2f} ms "
                f"(same bytes: {cfg[f'layer_codes_pytorch_equal_block{block}']})"
            )
            save()
    finally:
        commvq_cache.ENCODE_BLOCK = default_block

    # the parts alone, on one chunk (the first block size)
    m = blocks[0]
    x = torch.nn.functional.normalize(raw[0, :, :m].transpose(0, 1).flatten(1), dim=-1).view(m, H, D)
    tables = KeyTables(theta)
    out = torch.empty(m, H, code_bytes(r), dtype=torch.uint8, device=device)
    key_kw = dict(use_triton=cuda or None, tables=tables, out=out, precision="tf32", key_norm_bound=1.0)
    parts = cfg["parts_ms"] = {"chunk": m}
    parts["keys"] = median_ms(lambda: encode_keys(x, theta, **key_kw), reps, cuda)
    codes = out.clone()
    # the previous layout of the candidate loop (the same codes), and float16 dot operands (other codes)
    parts["keys_one_lane"] = median_ms(lambda: encode_keys(x, theta, wide_lanes=False, **key_kw), reps, cuda)
    parts["keys_one_lane_codes_equal"] = bool(torch.equal(out, codes))
    parts["keys_dot_f16"] = median_ms(lambda: encode_keys(x, theta, dot_dtype=torch.float16, **key_kw), reps, cuda)
    parts["keys_dot_f16_rows_equal_fraction"] = (out == codes).all(-1).float().mean().item()
    sub = min(m, 4096)  # the codes' squared reconstruction error over the first tokens, both ways
    err = {}
    for label, packed in (("tf32", codes), ("dot_f16", out.clone())):
        rec = torch.zeros(sub, H, D, device=device)
        for h in range(H):
            c = unpack_codes12(packed[:sub, h], r)
            for step in range(r):
                rec[:, h] += centers_from_theta(theta[h, step])[c[:, step]]
        err[label] = (x[:sub] - rec).pow(2).sum(-1).mean().item()
    parts["keys_reconstruction_sq_error"] = err
    if cuda:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for unroll in (2, 8, 16):
            parts[f"keys_unroll{unroll}"] = median_ms(
                lambda u=unroll: encode_keys(x, theta, unroll=u, **key_kw), reps, cuda
            )
        for per_sm in (2, 4, 16):
            progs = -(-per_sm * sms // H)
            parts[f"keys_programs_{per_sm}_per_sm"] = median_ms(
                lambda p=progs: encode_keys(x, theta, programs=p, **key_kw), reps, cuda
            )
        parts["keys_tiling"] = encode_defaults("tf32")
    v = values[:, :, :m].transpose(1, 2).reshape(1, m, -1).float()
    with torch.no_grad(), _matmul_tf32(cuda):
        parts["logits"] = median_ms(lambda: codec.logits(v), reps, cuda)
        logits, prescale = codec.logits(v)
        parts["codes_kernel"] = median_ms(lambda: value_codes(logits, codec.embedding.dtype), reps, cuda)
        parts["codes_pytorch"] = median_ms(lambda: value_codes_reference(logits, codec.embedding.dtype), reps, cuda)
        packed, vbits = value_codes(logits, codec.embedding.dtype)
        parts["postscale"] = median_ms(lambda: (vbits @ codec.embedding).norm(dim=-1), reps, cuda)
        if cuda:  # the logits in bfloat16: time, and how many value bits stay the same
            with torch.autocast("cuda", dtype=torch.bfloat16):
                parts["logits_bf16_autocast"] = median_ms(lambda: codec.logits(v), reps, cuda)
                logits16, _ = codec.logits(v)
            packed16, _ = value_codes(logits16)
            same = (packed16 == packed).float().mean().item()
            parts["values_bf16_bytes_equal_fraction"] = same
    log(f"{bits} bit parts, {m} tokens: {parts}")
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--blocks", type=int, nargs="+", default=[32768, 8192], help="tokens per encode chunk")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a small shape on any device (no timing value)")
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if not cuda and not args.smoke:
        raise SystemExit("no GPU: pass --smoke for a small run on the CPU")
    n = 512 if args.smoke else args.tokens
    blocks = [256] if args.smoke else args.blocks
    reps = 1 if args.smoke else args.reps
    t0 = time.time()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if cuda or os.environ.get("TRITON_INTERPRET") else None,
        "shape": dict(tokens=n, kv_heads=H, head_dim=D, blocks=blocks, encode_precision="tf32", value_refine=0),
        "configs": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    def save() -> None:
        result["elapsed_s"] = round(time.time() - t0, 1)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.output)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    for bits in args.bits:
        result["configs"][f"{bits}bit"] = {}
        measure_width(bits, n, blocks, reps, device, result["configs"][f"{bits}bit"], log, save)
    log(f"done; JSON in {args.output}")


if __name__ == "__main__":
    main()
