"""The CommVQ key search with int16 fixed-point candidate sums (``search="split_dpx"``) next to the float16 one
(``"split_h2"``, the default of ``encode_precision="half"``), at 128k tokens of the Llama-3.1-8B shape.

``"split_dpx"`` runs the same split search, but its 4,096 candidate sums per row and step are int16 fixed point, so
that one sm_90 DPX instruction (``VIADDMNMX``: ``min(a + b, c)`` on two int16 halves) replaces the float16 add and
min (``add.f16x2`` and ``min.f16x2``). In one run, per bit width (1 bit: R=11, 2 bits: R=21; random float16-exact
codebooks, random keys, 8 KV heads, head_dim 128):

- ``kernel_ms``: the key search alone on one chunk of ``--chunk`` tokens (normalized keys, ``key_norm_bound=1`` as
  the cache passes), for each variant of :data:`VARIANTS` (search, precision, unroll, wide lanes, L1 prefetch; or
  those named by ``--variants``, in that order), with the share of (token, head) code rows equal to the first
  variant's (``reference``) and the squared key error of the codes;
- ``layer_ms``: the whole layer's encode through the cache's own path (``CommVQLayer._encode``, ``value_refine=0``,
  ``encode_precision="half"``, chunks of ``--chunk`` tokens) for each run of ``--layer-runs`` (:data:`LAYER_RUNS`;
  default: ``split_h2``, ``split_dpx``, and ``split_h2`` with the value encoder's input or the key norms formed in
  PyTorch instead of the one-pass kernels, :mod:`pressroom.kernels.commvq_value_prep` and
  :mod:`pressroom.kernels.commvq_key_norms`, or with the value encoder's four logits per choice instead of three
  differences, :meth:`ValueCodec.head_differences`), with its kernels (``torch.profiler``; for the first run also by
  the aten operator and input shapes that launched them, ``aten_ms``), the share
  of code rows equal to the first run's (``rows_equal_to_first``) and, with the default runs, the share of value
  bytes the two value-encoder inputs (``value_prep_value_bytes_equal``) and the two encoder ends
  (``logits4_value_bytes_equal``) give alike. ``ms`` is the layer between CUDA events with the host launching
  inline (what a lone call costs); ``gpu_ms`` the same call with the host's launches run ahead behind a sleep kernel
  of about 10 ms (:func:`_timing.gpu_ms`): the GPU's time from its first kernel to its last, gaps included, as in a
  prefill where the previous layer's kernels hide this layer's launches.

``--sass`` also compiles both searches offline for sm_90 (no GPU needed) and counts the candidate loop's
instructions (``HADD2`` / ``HMNMX2`` against ``VIADDMNMX``), and describes the candidate loops of
:data:`SASS_VARIANTS` (the Triton loop and the PTX loop of ``encode_keys(asm_loop=True)``, :func:`loop_counts`);
``--sass-only`` does only that. JSON: ``--output`` (written after each part).

    python benchmarks/commvq_encode_dpx.py --sass --output $OUT/commvq_encode_dpx.json
    python benchmarks/commvq_encode_dpx.py --sass-only --output benchmarks/results/commvq_encode_asm_sass.json  # CPU
    TRITON_INTERPRET=1 python benchmarks/commvq_encode_dpx.py --smoke --output /tmp/dpx.json   # CPU, no timing value
"""

from __future__ import annotations

import argparse
import functools
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import aten_ms, gpu_ms, kernel_ms, median_ms  # noqa: E402
from commvq_encode_profile import key_sq_error  # noqa: E402

from pressroom.evaluation.atomic import atomic_write_json  # noqa: E402
from pressroom.kernels.commvq_encode import KeyTables, code_bytes, encode_keys  # noqa: E402
from pressroom.presses import commvq_cache  # noqa: E402
from pressroom.presses.commvq_cache import CommVQLayer  # noqa: E402
from pressroom.presses.commvq_codebooks import ValueCodec  # noqa: E402

H, D = 8, 128
RESIDUALS = {1: 11, 2: 21}


def _shared(search: str = "split_h2", **options) -> dict:
    """``encode_keys`` options of the PTX candidate loop with ``g_B`` in shared memory (``asm_loop=True,
    shared_scratch=True``) and ``options``."""
    return dict(search=search, asm_loop=True, shared_scratch=True, **options)


# (label, encode_keys options): the first is the reference of the equal-rows share
VARIANTS = (
    ("split_h2_half", dict(search="split_h2", precision="half")),
    ("split_dpx_half", dict(search="split_dpx", precision="half")),
    ("split_dpx_half_unroll8", dict(search="split_dpx", precision="half", unroll=8)),
    ("split_dpx_half_wide", dict(search="split_dpx", precision="half", wide_lanes=True)),
    ("split_dpx_half_unroll8_wide", dict(search="split_dpx", precision="half", unroll=8, wide_lanes=True)),
    ("split_dpx_half_bn128_w8", dict(search="split_dpx", precision="half", block_n=128, num_warps=8)),
    ("split_h2_tf32", dict(search="split_h2", precision="tf32")),
    ("split_dpx_tf32", dict(search="split_dpx", precision="tf32")),
    # the L1 prefetch of each step's K^T and scratch (encode_keys(prefetch=True))
    ("split_h2_half_prefetch", dict(search="split_h2", precision="half", prefetch=True)),
    ("split_h2_half_wide", dict(search="split_h2", precision="half", wide_lanes=True)),
    ("split_h2_half_wide_prefetch", dict(search="split_h2", precision="half", wide_lanes=True, prefetch=True)),
    ("split_h2_half_unroll8_prefetch", dict(search="split_h2", precision="half", unroll=8, prefetch=True)),
    ("split_dpx_half_wide_prefetch", dict(search="split_dpx", precision="half", wide_lanes=True, prefetch=True)),
    # the candidate loop in PTX (encode_keys(asm_loop=True)): each compared with its Triton-loop twin (the label
    # before "_asm": the same search and precision at the default tiling), whose codes it must equal
    ("split_h2_half_asm", dict(search="split_h2", precision="half", asm_loop=True)),
    ("split_dpx_half_asm", dict(search="split_dpx", precision="half", asm_loop=True)),
    ("split_h2_half_asm_unroll8", dict(search="split_h2", precision="half", asm_loop=True, unroll=8)),
    ("split_dpx_half_asm_unroll8", dict(search="split_dpx", precision="half", asm_loop=True, unroll=8)),
    ("split_h2_half_asm_prefetch", dict(search="split_h2", precision="half", asm_loop=True, prefetch=True)),
    ("split_h2_half_asm_bn32_w4", dict(search="split_h2", precision="half", asm_loop=True, block_n=32, num_warps=4)),
    ("split_h2_half_asm_bn32_w2", dict(search="split_h2", precision="half", asm_loop=True, block_n=32, num_warps=2)),
    ("split_dpx_half_asm_bn32_w4", dict(search="split_dpx", precision="half", asm_loop=True, block_n=32, num_warps=4)),
    ("split_h2_half_asm_bn64_w8", dict(search="split_h2", precision="half", asm_loop=True, block_n=64, num_warps=8)),
    (
        "split_h2_half_asm_bn32_w4_r168",
        dict(search="split_h2", precision="half", asm_loop=True, block_n=32, num_warps=4, maxnreg=168),
    ),
    ("split_h2_half_asm_bn128_w8", dict(search="split_h2", precision="half", asm_loop=True, block_n=128, num_warps=8)),
    # more resident programs an SM (offline sm_90: 128 registers at 16 rows and 4 warps, no spill: four programs;
    # 8 warps capped at 128 registers: two programs of 8 warps, with spills)
    ("split_h2_half_asm_bn16_w4", dict(search="split_h2", precision="half", asm_loop=True, block_n=16, num_warps=4)),
    (
        "split_h2_half_asm_bn64_w8_r128",
        dict(search="split_h2", precision="half", asm_loop=True, block_n=64, num_warps=8, maxnreg=128),
    ),
    # g_B and the minima in shared memory (encode_keys(shared_scratch=True)): 16-bit g_B, 8 candidates a load
    ("split_h2_half_asm_shared", _shared(precision="half")),
    ("split_h2_half_asm_shared_unroll8", _shared(precision="half", unroll=8)),
    ("split_dpx_half_asm_shared", _shared("split_dpx", precision="half")),
    # with the L1 prefetch of the tables the step reads after the loop and the next step reads first
    ("split_h2_half_asm_shared_prefetch", _shared(precision="half", prefetch=True)),
    ("split_h2_half_asm_shared_unroll8_prefetch", _shared(precision="half", unroll=8, prefetch=True)),
    # register caps for more resident programs an SM (offline sm_90: no spill inside the loop): three 4-warp programs
    # at 168, two 8-warp programs at 128 (16 warps an SM against 8)
    ("split_h2_half_asm_shared_unroll8_r168", _shared(precision="half", unroll=8, maxnreg=168)),
    (
        "split_h2_half_asm_shared_unroll8_bn64_w8_r128",
        _shared(precision="half", unroll=8, block_n=64, num_warps=8, maxnreg=128),
    ),
    (
        "split_h2_half_asm_shared_unroll8_bn32_w4_r168",
        _shared(precision="half", unroll=8, block_n=32, num_warps=4, maxnreg=168),
    ),
    ("split_h2_half_asm_shared_bn16_w4", _shared(precision="half", block_n=16, num_warps=4)),
)
# (label, encode_keys options, the cache's parts run the earlier way: "value_prep" / "key_norms" for the value
# encoder's input / the tokens' key norms in PyTorch instead of their one-pass kernels, "logits4" for the value
# encoder's four logits per choice instead of three differences) of the whole layer's runs: the first is the
# reference of the equal-rows share; split_h2_value_prep_pytorch is the path before pressroom.kernels.commvq_value_prep,
# split_h2_key_norms_pytorch the one before pressroom.kernels.commvq_key_norms, split_h2_logits4 the one before
# ValueCodec.head_differences
LAYER_RUNS = (
    ("split_h2", dict(search="split_h2"), ()),
    ("split_dpx", dict(search="split_dpx"), ()),
    ("split_h2_value_prep_pytorch", dict(search="split_h2"), ("value_prep",)),
    ("split_h2_key_norms_pytorch", dict(search="split_h2"), ("key_norms",)),
    ("split_h2_logits4", dict(search="split_h2"), ("logits4",)),
    ("split_h2_prefetch", dict(search="split_h2", prefetch=True), ()),
    ("split_h2_wide_prefetch", dict(search="split_h2", wide_lanes=True, prefetch=True), ()),
    ("split_h2_asm", dict(search="split_h2", asm_loop=True), ()),
    ("split_dpx_asm", dict(search="split_dpx", asm_loop=True), ()),
    ("split_h2_asm_bn32_w4", dict(search="split_h2", asm_loop=True, block_n=32, num_warps=4), ()),
    ("split_dpx_asm_bn32_w4", dict(search="split_dpx", asm_loop=True, block_n=32, num_warps=4), ()),
    ("split_h2_asm_bn32_w4_r168", dict(search="split_h2", asm_loop=True, block_n=32, num_warps=4, maxnreg=168), ()),
    ("split_h2_asm_bn16_w4", dict(search="split_h2", asm_loop=True, block_n=16, num_warps=4), ()),
    ("split_dpx_asm_unroll8", dict(search="split_dpx", asm_loop=True, unroll=8), ()),
    ("split_h2_asm_shared", _shared(), ()),
    ("split_h2_asm_shared_unroll8", _shared(unroll=8), ()),
    ("split_dpx_asm_shared", _shared("split_dpx"), ()),
    ("split_h2_asm_shared_unroll8_prefetch", _shared(unroll=8, prefetch=True), ()),
    ("split_h2_asm_shared_unroll8_r168", _shared(unroll=8, maxnreg=168), ()),
    ("split_h2_asm_shared_unroll8_bn64_w8_r128", _shared(unroll=8, block_n=64, num_warps=8, maxnreg=128), ()),
)
DEFAULT_LAYER_RUNS = (
    "split_h2",
    "split_dpx",
    "split_h2_value_prep_pytorch",
    "split_h2_key_norms_pytorch",
    "split_h2_logits4",
)
# GPU cycles of sleep before each gpu_ms call of the whole layer: long enough (about 10 ms) for the host to launch the
# layer's four chunks (about 100 launches) while the GPU waits
LAYER_SLEEP_CYCLES = 20_000_000


def twin_of(label: str) -> str | None:
    """The Triton-loop twin of a PTX-loop label (the label before ``_asm``), whose codes it must equal; ``None``
    for the others."""
    return label.split("_asm")[0] if "_asm" in label else None


LOOP_OPS = ("HADD2", "HMNMX2", "VIADDMNMX")


def sass_counts(search: str, r: int = RESIDUALS[1]) -> dict:
    """Opcode counts of the key search compiled offline for sm_90 (``"half"``, the default tiling, keys divided in
    the kernel as the cache launches it): the candidate loop's ``LOOP_OPS`` (``HADD2`` without the ``.F32``
    conversions), ``LDG`` and all instructions."""
    from commvq_encode_ncu import offline_sass  # its compile: the same kernel, options and pointer types

    sass = offline_sass(r, f"{search}_half", row_norms=True)
    names = Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))  # with modifiers
    ops = Counter()
    for name, count in names.items():  # HADD2.F32 (a float16 -> float32 conversion) on its own
        ops[name if name.startswith(("HADD2", "HMNMX2")) else name.split(".")[0]] += count
    return {**{op: ops.get(op, 0) for op in (*LOOP_OPS, "HADD2.F32", "LDG")}, "total": sum(names.values())}


# the variants whose candidate loops --sass describes (the Triton loop and the PTX loop of each search)
SASS_VARIANTS = (
    "split_h2_half",
    "split_dpx_half",
    "split_h2_half_asm",
    "split_dpx_half_asm",
    "split_h2_half_asm_unroll8",
    "split_dpx_half_asm_unroll8",
    "split_h2_half_asm_bn32_w4",
    "split_dpx_half_asm_bn32_w4",
    "split_h2_half_asm_bn64_w8",
    "split_h2_half_asm_bn16_w4",
    "split_h2_half_asm_shared",
    "split_h2_half_asm_shared_unroll8",
    "split_dpx_half_asm_shared",
    "split_h2_half_asm_shared_bn16_w4",
    "split_h2_half_asm_shared_unroll8_prefetch",
    "split_h2_half_asm_shared_unroll8_r168",
    "split_h2_half_asm_shared_unroll8_bn64_w8_r128",
    "split_h2_half_asm_shared_unroll8_bn32_w4_r168",
)


def loop_counts(variant: str, r: int) -> dict:
    """The candidate loop of ``variant`` (a :data:`VARIANTS` label) compiled offline for sm_90 as the cache launches
    it (the variant's tiling, else the default; keys divided in the kernel; its ``maxnreg`` cap if it has one, and
    then the spill code with the rest of the step): its opcodes
    (one pass: ``unroll`` candidates ``B`` for the thread's rows and lane), the instructions of the residual step
    around it (``step_rest``: once per step), the passes per step and the dynamic count per step and thread they give
    (``per_step``), per step and row (``per_row_step``: ``per_step`` times the program's threads over its rows, the
    measure that compares tilings), and the registers and stack bytes per thread."""
    from commvq_encode_ncu import (
        cubin_sass,
        find_candidate_loop,
        loop_marker,
        offline_compile,
        parse_cuobjdump_sass,
        split_by_loop,
    )

    from pressroom.kernels.commvq_encode import encode_defaults
    from pressroom.kernels.commvq_resources import _cubin_usage

    marker = loop_marker(variant)
    cubin = offline_compile(r, variant, row_norms=True, with_cap=True).asm["cubin"]
    rows = parse_cuobjdump_sass(cubin_sass(cubin))
    info = split_by_loop(rows, find_candidate_loop(rows, marker), marker)
    loop, rest = info["loop"], info["regions"]["step_loop_rest"]["instructions"]
    opts = dict(VARIANTS)[variant]
    passes = 64 // opts.get("unroll", 4)
    tiling = dict(encode_defaults(opts["precision"], opts["search"]), **opts)  # the variant's tiling, if it has one
    return dict(
        loop_opcodes=loop["opcodes"],
        loop_instructions=loop["instructions"],
        step_rest=rest,
        loop_passes_per_step=passes,
        per_step=rest + passes * loop["instructions"],
        per_row_step=(rest + passes * loop["instructions"]) * 32 * tiling["num_warps"] // tiling["block_n"],
        rows_per_thread=tiling["block_n"] // tiling["num_warps"],
        **_cubin_usage(cubin),  # registers and stack bytes per thread
    )


def _without_use_triton(args: tuple) -> tuple:
    """The cache's positional ``value_prep`` arguments without its last, ``use_triton`` (the benchmark chooses)."""
    if len(args) != 8:
        raise RuntimeError(f"CommVQLayer._encode now calls value_prep with {len(args)} positional arguments, not 8")
    return args[:-1]


def measure(
    bits: int,
    n: int,
    chunk: int,
    reps: int,
    device: torch.device,
    cfg: dict,
    log,
    save,
    layer_only: bool = False,
    variants: tuple = VARIANTS,
    layer_runs: tuple = tuple(r for r in LAYER_RUNS if r[0] in DEFAULT_LAYER_RUNS),
) -> None:
    cuda = device.type == "cuda"
    r = RESIDUALS[bits]
    g = torch.Generator().manual_seed(bits)
    theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).to(device)
    raw = torch.randn(1, H, n, D, generator=g).to(device)
    values = torch.randn(1, H, n, D, generator=g).to(device, torch.bfloat16)
    cfg.update(bits=bits, key_residuals=r)
    # the key search alone on one chunk
    xm = torch.nn.functional.normalize(raw[0, :, :chunk].transpose(0, 1).flatten(1), dim=-1).view(chunk, H, D)
    tables = KeyTables(theta)
    out = torch.empty(chunk, H, code_bytes(r), dtype=torch.uint8, device=device)
    kw = dict(use_triton=cuda or None, tables=tables, out=out, key_norm_bound=1.0)
    rows, first, codes_by_label = {}, None, {}
    sub = min(chunk, 4096)
    for label, opts in () if layer_only else variants:
        run = functools.partial(encode_keys, xm, theta, **opts, **kw)
        try:
            ms = median_ms(run, reps, cuda)
        except Exception as err:  # a variant that fails is recorded, the others still run
            rows[label] = dict(opts, error=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        first = out.clone() if first is None else first
        codes_by_label[label] = out.clone()
        twin = twin_of(label)
        if twin in codes_by_label:  # the PTX loop against the Triton loop of the same search and precision
            opts = dict(opts, rows_equal_to_twin=(out == codes_by_label[twin]).all(-1).float().mean().item(), twin=twin)
        rows[label] = dict(
            opts,
            ms=ms,
            rows_equal_to_first=(out == first).all(-1).float().mean().item(),
            key_sq_error=key_sq_error(xm[:sub], out[:sub], theta),
        )
        twin_eq = f", equal to {opts['twin']} {opts['rows_equal_to_twin']:.4f}" if "twin" in opts else ""
        log(f"{bits} bit, {label}: {ms:.3f} ms, rows equal {rows[label]['rows_equal_to_first']:.4f}{twin_eq}")
    if not layer_only:
        reference = next((label for label, row in rows.items() if "error" not in row), None)
        cfg["kernel_ms"] = dict(chunk=chunk, reference=reference, variants=rows)
        save()
    # the whole layer through the cache's path, "half", with each search
    codec = ValueCodec(H * D, bits).to(device)
    inv_freq = (1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))).to(device)
    positions = torch.arange(n, device=device)
    layer = CommVQLayer(theta, codec, inv_freq, D**-0.5, encode_precision="half", value_refine=0)
    layer.lazy_initialization(raw[:, :, :1], values[:, :, :1])
    layer.reserve(n)

    def run_layer() -> None:
        layer.n = 0
        layer._encode(raw, values, positions)

    default_block, default_encode = commvq_cache.ENCODE_BLOCK, commvq_cache.encode_keys
    default_prep, default_norms = commvq_cache.value_prep, commvq_cache.key_norms
    default_differences, default_ptx = commvq_cache.VALUE_DIFFERENCES, commvq_cache.PTX_KEY_OPTIONS
    commvq_cache.PTX_KEY_OPTIONS = {}  # each run's options are all of encode_keys' options (its default: none)
    layer_rows, codes, vbits = {}, {}, {}

    def save_layer() -> None:
        cfg["layer_ms"] = dict(tokens=n, chunk=chunk, encode_precision="half", value_refine=0, **layer_rows)
        save()

    try:
        commvq_cache.ENCODE_BLOCK = chunk
        for label, opts, pytorch in layer_runs:
            prep = functools.partial(default_prep, use_triton=False) if "value_prep" in pytorch else default_prep
            commvq_cache.encode_keys = functools.partial(default_encode, **opts)
            commvq_cache.value_prep = lambda *a, prep=prep: prep(*_without_use_triton(a))
            commvq_cache.key_norms = (lambda k, _: default_norms(k, False)) if "key_norms" in pytorch else default_norms
            commvq_cache.VALUE_DIFFERENCES = "logits4" not in pytorch
            layer_rows[label] = dict(ms=median_ms(run_layer, reps, cuda), kernels_ms=kernel_ms(run_layer, 2))
            if label == layer_runs[0][0]:  # which PyTorch calls the first run's kernels come from (ops, shapes)
                layer_rows[label]["aten_ms"] = aten_ms(run_layer, 1)
            if cuda:  # the host's launches hidden (LAYER_SLEEP_CYCLES: about 10 ms of GPU sleep before each call)
                layer_rows[label]["gpu_ms"] = sorted(gpu_ms(run_layer, reps, sleep_cycles=LAYER_SLEEP_CYCLES))[
                    reps // 2
                ]
            codes[label], vbits[label] = layer.codes[:, :, :n].clone(), layer.vbits[:, :n].clone()
            log(f"{bits} bit, whole layer, {label}: {layer_rows[label]['ms']:.2f} ms")
            save_layer()  # after each run (a run cut short keeps the ones before it)
    finally:
        commvq_cache.ENCODE_BLOCK, commvq_cache.encode_keys = default_block, default_encode
        commvq_cache.value_prep, commvq_cache.key_norms = default_prep, default_norms
        commvq_cache.VALUE_DIFFERENCES, commvq_cache.PTX_KEY_OPTIONS = default_differences, default_ptx
    first = layer_runs[0][0]
    for label in codes:  # the code rows of each run equal to the first run's
        if label != first:
            layer_rows[label]["rows_equal_to_first"] = (codes[label] == codes[first]).all(-1).float().mean().item()
    for label in codes:  # a PTX loop's codes against its Triton-loop twin's
        twin = twin_of(label)
        if twin in codes:
            layer_rows[label].update(
                twin=twin, rows_equal_to_twin=(codes[label] == codes[twin]).all(-1).float().mean().item()
            )
    if "split_dpx" in codes and first == "split_h2":  # the key of earlier files
        layer_rows["rows_equal"] = layer_rows["split_dpx"]["rows_equal_to_first"]
    # the value bytes split_h2 shares with the value_prep kernel's PyTorch reference (bfloat16 roundings of sums taken
    # in another order may flip a near-tied choice) and with the four logits instead of three differences
    for key, other in (
        ("value_prep_value_bytes_equal", "split_h2_value_prep_pytorch"),
        ("logits4_value_bytes_equal", "split_h2_logits4"),
    ):
        if other in vbits and "split_h2" in vbits:
            layer_rows[key] = (vbits["split_h2"] == vbits[other]).float().mean().item()
    save_layer()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=32768, help="tokens per encode chunk (and of the kernel-alone runs)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sass", action="store_true", help="also count the sm_90 instructions (offline compile)")
    ap.add_argument("--sass-only", action="store_true", help="only the offline sm_90 counts (--sass), no GPU needed")
    ap.add_argument("--layer-only", action="store_true", help="only the whole layer (no key-search variants)")
    ap.add_argument("--smoke", action="store_true", help="a small shape on any device (no timing value)")
    ap.add_argument(
        "--variants", nargs="+", choices=[v[0] for v in VARIANTS], help="key-search variants to time (default: all)"
    )
    ap.add_argument(
        "--layer-runs",
        nargs="+",
        choices=[r[0] for r in LAYER_RUNS],
        default=list(DEFAULT_LAYER_RUNS),
        help="whole-layer runs (the first is the reference of the equal-rows shares)",
    )
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    for name, chosen in (("--variants", args.variants or []), ("--layer-runs", args.layer_runs)):
        if len(set(chosen)) != len(chosen):
            ap.error(f"{name} names a label twice: {chosen}")
    if args.layer_only and args.variants:
        ap.error("--layer-only times no key-search variant: drop --variants")
    by_label, runs_by_label = dict(VARIANTS), {r[0]: r for r in LAYER_RUNS}
    # in the order named: the first is the reference of the equal-rows shares
    variants = VARIANTS if args.variants is None else tuple((v, by_label[v]) for v in args.variants)
    layer_runs = tuple(runs_by_label[r] for r in args.layer_runs)
    args.sass = args.sass or args.sass_only
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke and not args.sass_only:
        raise SystemExit("no GPU: pass --smoke for a small run on the CPU, or --sass-only for the offline counts")
    n, chunk, reps = (256, 128, 1) if args.smoke else (args.tokens, args.chunk, args.reps)
    if chunk < 1 or n % chunk:
        raise SystemExit(f"--tokens ({n}) must be a positive multiple of --chunk ({chunk})")
    import triton

    t0 = time.time()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": args.smoke,
        "shape": dict(tokens=n, kv_heads=H, head_dim=D, chunk=chunk),
        "configs": {},
    }

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    def save() -> None:
        result["elapsed_s"] = round(time.time() - t0, 1)
        atomic_write_json(args.output, result)

    if args.sass:
        try:
            result["sass_sm90"] = {s: sass_counts(s) for s in ("split_h2", "split_dpx")}
        except Exception as err:  # no ptxas / cuobjdump here: recorded, the timings still run
            result["sass_sm90"] = f"{type(err).__name__}: {str(err)[:300]}"
        log(f"sm_90 instructions: {result['sass_sm90']}")
        loops = {}
        for bits in args.bits:
            for v in SASS_VARIANTS:
                try:
                    loops[f"{bits}bit {v}"] = loop_counts(v, RESIDUALS[bits])
                except Exception as err:  # recorded, the others still run
                    loops[f"{bits}bit {v}"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                log(f"{bits} bit {v}: {loops[f'{bits}bit {v}']}")
        result["sass_sm90_loops"] = loops
        save()
    if args.sass_only:
        log(f"done (--sass-only); JSON in {args.output}")
        return 0
    for bits in args.bits:
        result["configs"][f"{bits}bit"] = {}
        measure(
            bits,
            n,
            chunk,
            reps,
            device,
            result["configs"][f"{bits}bit"],
            log,
            save,
            args.layer_only,
            variants,
            layer_runs,
        )
    log(f"done; JSON in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
