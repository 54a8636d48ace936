"""Where a CommVQ layer's encode spends its time at long context: encode_precision "tf32" and "half" side by side.

The whole layer goes through the cache's own path (``CommVQLayer._encode``: key norms, the key search fused with the
12-bit packing, the value encoder, the value codes, the postscale, the stores) for ``--tokens`` tokens of the
Llama-3.1-8B shape (8 KV heads, head_dim 128; 1 bit: R=11, 2 bits: R=21), random codebooks and value codec,
``value_refine=0``, in chunks of ``--blocks`` tokens. Per chunk size, in one run:

- ``layer_tf32_ms`` / ``layer_half_ms``: the layer at ``encode_precision="tf32"`` (TF32 dots and value encoder) and
  ``"half"`` (float16 dot operands, bfloat16 value encoder), each with its kernels by ``torch.profiler``; the share of
  (token, head) key code rows and of value bytes that ``"half"`` codes as ``"tf32"`` does, and both codes' errors
  over the first 4,096 tokens (squared key error of the normalized keys, relative value error);
- ``layer_tf32_codes_pytorch_ms``: the ``"tf32"`` layer with its value codes by the PyTorch reference (``argmax`` over
  the four-way choices, the bits, ``pack_bits``: the path before ``pressroom.kernels.commvq_value_codes``);
- ``parts_ms``: the parts alone on one chunk: the key search at each precision, each also with the running minima of
  its candidate loop four lanes a thread (``wide_lanes=True``), ``"half"`` with the chosen centers gathered from
  float32 tables instead of the float16 ones that these float16-exact codebooks allow; ``"half"`` with a register
  cap (``maxnreg``) and other tilings (:data:`MAXNREG_VARIANTS`, each with the share of code rows equal to the
  default's); the value encoder's logits and postscale at each precision; the value codes (kernel and PyTorch).

CPU: ``--smoke`` runs everything on a small shape (no timing value). JSON: ``--output`` (written after each part).
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
from _timing import kernel_ms, median_ms  # noqa: E402

from pressroom.kernels.commvq_codebook import centers_from_theta  # noqa: E402
from pressroom.kernels.commvq_encode import (  # noqa: E402
    KeyTables,
    code_bytes,
    encode_defaults,
    encode_keys,
    unpack_bits,
    unpack_codes12,
)
from pressroom.kernels.commvq_value_codes import value_codes, value_codes_reference  # noqa: E402
from pressroom.presses import commvq_cache  # noqa: E402
from pressroom.presses.commvq_cache import CommVQLayer, _value_matmuls  # noqa: E402
from pressroom.presses.commvq_codebooks import ValueCodec  # noqa: E402

H, D = 8, 128
RESIDUALS = {1: 11, 2: 21}
# the "half" key search with a register cap: (block_n, num_warps, maxnreg), maxnreg None = the compiler's choice.
# Triton 3.6 for sm_90, R = 11 / 21 (65,536 registers, 64 warps per SM): the default (64, 4) takes 255 registers (2
# programs per SM), 168 fits 3 with ~460 bytes of spill stores, 128 fits 4 with ~750; (16, 2) takes 238 / 236 (4
# programs of 2 warps), 168 fits 6 without spills, 128 fits 8 with ~200 bytes; (16, 4) takes 128 / 118 uncapped (4
# programs of 4 warps, no spills): the most resident warps without a spill
MAXNREG_VARIANTS = (
    (64, 4, 168),
    (64, 4, 128),
    (16, 2, None),
    (16, 2, 168),
    (16, 2, 128),
    (16, 4, None),
)


def key_sq_error(x: torch.Tensor, packed: torch.Tensor, theta: torch.Tensor) -> float:
    """Mean squared error of normalized keys ``x [m, H, D]`` against their decoded codes ``packed [m, H, bytes]``."""
    rec = torch.zeros_like(x)
    r = theta.shape[1]
    for h in range(x.shape[1]):
        c = unpack_codes12(packed[:, h], r)
        for step in range(r):
            rec[:, h] += centers_from_theta(theta[h, step])[c[:, step]]
    return (x - rec).pow(2).sum(-1).mean().item()


def value_rel_error(v: torch.Tensor, vbits: torch.Tensor, vcoef: torch.Tensor, codec: ValueCodec) -> float:
    """Relative squared error of values ``v [m, feat]`` decoded from packed bits and coefficients."""
    rec = vcoef.float()[:, None] * (unpack_bits(vbits, torch.float32) @ codec.channel_embedding())
    return ((v - rec).pow(2).sum() / v.pow(2).sum()).item()


def measure_width(bits: int, n: int, blocks: list[int], reps: int, device: torch.device, cfg: dict, log, save) -> None:
    """One bit width's timings into ``cfg`` (``save`` after each part)."""
    cuda = device.type == "cuda"
    r = RESIDUALS[bits]
    g = torch.Generator().manual_seed(bits)
    theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).to(device)
    codec = ValueCodec(H * D, bits).to(device)
    inv_freq = (1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))).to(device)
    raw = torch.randn(1, H, n, D, generator=g).to(device)
    values = torch.randn(1, H, n, D, generator=g).to(device, torch.bfloat16)
    positions = torch.arange(n, device=device)
    cfg.update(bits=bits, key_residuals=r)
    layers = {}
    for precision in ("tf32", "half"):
        layer = CommVQLayer(theta, codec, inv_freq, D**-0.5, encode_precision=precision, value_refine=0)
        layer.lazy_initialization(raw[:, :, :1], values[:, :, :1])
        layer.reserve(n)
        layers[precision] = layer

    def runner(layer: CommVQLayer):
        def run() -> None:
            layer.n = 0
            layer._encode(raw, values, positions)

        return run

    def pytorch_codes(logits, bits_dtype=None, use_triton=None):
        return value_codes_reference(logits, bits_dtype)

    # the codes' quality over the first tokens: normalized keys and values as the layer saw them
    sub = min(n, 4096)
    # (the layer takes raw as interleaved keys already: no layout change)
    x = torch.nn.functional.normalize(raw[0, :, :sub].transpose(0, 1).flatten(1), dim=-1).view(sub, H, D)
    v = values[0, :, :sub].transpose(0, 1).reshape(sub, -1).float()
    default_block = commvq_cache.ENCODE_BLOCK
    try:
        for block in blocks:
            commvq_cache.ENCODE_BLOCK = block
            row = cfg[f"block{block}"] = {}
            for precision, layer in layers.items():
                run = runner(layer)
                row[f"layer_{precision}_ms"] = median_ms(run, reps, cuda)
                row[f"layer_{precision}_kernels_ms"] = kernel_ms(run, 2)
                row[f"key_sq_error_{precision}"] = key_sq_error(x, layer.codes[0, :, :sub].transpose(0, 1), theta)
                row[f"value_rel_error_{precision}"] = value_rel_error(
                    v, layer.vbits[0, :sub], layer.vcoef[0, :sub], codec
                )
            tf32, half = layers["tf32"], layers["half"]
            row["half_key_rows_equal_fraction"] = (
                (tf32.codes[:, :, :n] == half.codes[:, :, :n]).all(-1).float().mean().item()
            )
            row["half_value_bytes_equal_fraction"] = (tf32.vbits[:, :n] == half.vbits[:, :n]).float().mean().item()
            kernel_codes = tf32.vbits[:, :n].clone()
            commvq_cache.value_codes = pytorch_codes  # the path before the value codes kernel
            try:
                row["layer_tf32_codes_pytorch_ms"] = median_ms(runner(tf32), reps, cuda)
                row["layer_tf32_codes_pytorch_equal"] = bool(torch.equal(tf32.vbits[:, :n], kernel_codes))
                row["layer_tf32_codes_pytorch_kernels_ms"] = kernel_ms(runner(tf32), 2)
            finally:
                commvq_cache.value_codes = value_codes
            log(
                f"{bits} bit, chunks of {block}: tf32 {row['layer_tf32_ms']:.2f} ms, half {row['layer_half_ms']:.2f} "
                f"ms, tf32 with the PyTorch codes {row['layer_tf32_codes_pytorch_ms']:.2f} ms; "
                + ", ".join(f"{k} {v:.5g}" for k, v in row.items() if "error" in k or "fraction" in k)
            )
            save()
    finally:
        commvq_cache.ENCODE_BLOCK = default_block

    # the parts alone, on one chunk (the first block size)
    m = blocks[0]
    xm = torch.nn.functional.normalize(raw[0, :, :m].transpose(0, 1).flatten(1), dim=-1).view(m, H, D)
    tables = KeyTables(theta)
    out = torch.empty(m, H, code_bytes(r), dtype=torch.uint8, device=device)
    key_kw = dict(use_triton=cuda or None, tables=tables, out=out, key_norm_bound=1.0)
    parts = cfg["parts_ms"] = {"chunk": m}
    variants = (
        ("keys_tf32", {}),
        ("keys_tf32_wide_lanes", dict(wide_lanes=True)),
        ("keys_half", {}),
        ("keys_half_wide_lanes", dict(wide_lanes=True)),
    )
    for label, kw in variants:
        precision = "half" if label.startswith("keys_half") else "tf32"
        parts[label] = median_ms(
            lambda kw=kw, p=precision: encode_keys(xm, theta, precision=p, **kw, **key_kw), reps, cuda
        )
    parts["key_center_tables_half"] = str(tables.center_tables()[0].dtype)
    # "half" with the centers gathered from the float32 tables (as for codebooks float16 cannot hold)
    f32_tables = KeyTables(theta)
    f32_tables._exact16 = False
    kw32 = dict(key_kw, tables=f32_tables, precision="half")
    parts["keys_half_centers_f32"] = median_ms(lambda: encode_keys(xm, theta, **kw32), reps, cuda)
    # register caps and tilings of the "half" key search, next to keys_half (its default tiling, no cap)
    default = encode_defaults("half")
    parts["keys_half_tiling"] = dict(block_n=default["block_n"], num_warps=default["num_warps"], maxnreg=None)
    want = encode_keys(xm, theta, precision="half", **key_kw).clone()
    timed = {}
    for block_n, num_warps, maxnreg in MAXNREG_VARIANTS:
        label = f"keys_half_bn{block_n}_w{num_warps}" + ("" if maxnreg is None else f"_maxnreg{maxnreg}")
        tiling = dict(block_n=block_n, num_warps=num_warps, maxnreg=maxnreg)
        parts[f"{label}_tiling"] = tiling
        try:
            parts[label] = median_ms(
                lambda t=tiling: encode_keys(xm, theta, precision="half", **t, **key_kw), reps, cuda
            )
        except Exception as err:  # a cap ptxas cannot compile under: recorded, the other parts still run
            parts[label] = None
            parts[f"{label}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        parts[f"{label}_rows_equal_fraction"] = (out == want).all(-1).float().mean().item()
        timed[label] = parts[label]
    log(
        f"{bits} bit, half key search: default {parts['keys_half']:.3f} ms; "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in timed.items())
    )
    save()
    vm = values[:, :, :m].transpose(1, 2).reshape(1, m, -1).float()
    with torch.no_grad():
        for precision in ("tf32", "half"):
            with _value_matmuls(precision, device):
                parts[f"logits_{precision}"] = median_ms(lambda: codec.logits(vm), reps, cuda)
                logits, _ = codec.logits(vm)
                _, vbits = value_codes(logits, codec.embedding.dtype)
                parts[f"postscale_{precision}"] = median_ms(
                    lambda b=vbits: (b @ codec.embedding).norm(dim=-1), reps, cuda
                )
        parts["codes_kernel"] = median_ms(lambda: value_codes(logits, codec.embedding.dtype), reps, cuda)
        parts["codes_pytorch"] = median_ms(lambda: value_codes_reference(logits, codec.embedding.dtype), reps, cuda)
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
        "shape": dict(
            tokens=n, kv_heads=H, head_dim=D, blocks=blocks, encode_precisions=["tf32", "half"], value_refine=0
        ),
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
