"""Shared memory and registers of the CommVQ Triton kernels, compiled ahead of time for a GPU target without a GPU.

Triton compiles for any NVIDIA target on a CPU-only machine (the wheel ships ``ptxas``): :func:`kernel_resources`
compiles one kernel with the exact constexprs and launch options its launcher uses (each launcher exposes them:
:func:`pressroom.kernels.commvq_attention.decode_meta`, :func:`~pressroom.kernels.commvq_attention.reduce_meta`,
:func:`~pressroom.kernels.commvq_attention.key_scores_meta`, :func:`pressroom.kernels.commvq_encode.encode_meta`)
and reads the static shared memory from Triton's metadata and the registers / stack (spill) bytes per thread from
``cuobjdump --dump-resource-usage``. :func:`commvq_resource_table` does it for every default configuration of the
shapes the cache and the benchmarks use, so a test can assert that everything fits an H100 (227 KB of shared memory
per block) before a GPU ever sees it.

    python -m pressroom.kernels.commvq_resources            # prints the table (sm_90)
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

H100_SHARED_BYTES = 232448  # 227 KB: the most one block may use on sm_90 (opt-in)
SM90 = ("cuda", 90, 32)

# the pointer arguments' element types (the rest: int32 scalars, and float32 for the names in _FLOAT_ARGS)
_POINTERS = {
    "_refine_kernel": {
        "u_ptr": "*fp32",
        "w_ptr": "*fp32",
        "bits_ptr": "*u8",
        "a_ptr": "*fp32",
        "q_ptr": "*fp32",
        "gram_ptr": "*fp32",
        "sq_ptr": "*fp32",
        "coef_ptr": "*fp32",
    },
    "_decode_split_kernel": {
        "q_ptr": "*fp32",
        "codes_ptr": "*u8",
        "knorm_ptr": "*fp16",
        "vcoef_ptr": "*fp16",
        "pos_ptr": "*i32",
        "vbits_ptr": "*u8",
        "wk_ptr": "*bf16",
        "wv_ptr": "*bf16",
        "wpos_ptr": "*i32",
        "ztab_ptr": "*i32",  # *i64 for a float32 table (set by table_fp16)
        "invf_ptr": "*fp32",
        "m_ptr": "*fp32",
        "l_ptr": "*fp32",
        "acc_ptr": "*fp32",
        "accw_ptr": "*fp32",
    },
    "_decode_scores_kernel": {
        "q_ptr": "*fp32",
        "codes_ptr": "*u8",
        "knorm_ptr": "*fp16",
        "pos_ptr": "*i32",
        "wk_ptr": "*bf16",
        "wv_ptr": "*bf16",
        "wpos_ptr": "*i32",
        "ztab_ptr": "*i32",  # *i64 for a float32 table
        "invf_ptr": "*fp32",
        "s_ptr": "*fp32",
        "m_ptr": "*fp32",
        "l_ptr": "*fp32",
        "accw_ptr": "*fp32",
    },
    "_decode_values_kernel": {
        "s_ptr": "*fp32",
        "vcoef_ptr": "*fp16",
        "vbits_ptr": "*u8",
        "m_ptr": "*fp32",
        "l_ptr": "*fp32",
        "acc_ptr": "*fp32",
    },
    "_decode_reduce_kernel": {
        n: "*fp32" for n in ("m_ptr", "l_ptr", "acc_ptr", "accw_ptr", "out_bits_ptr", "out_w_ptr")
    },
    "_decode_merge_kernel": {
        n: "*fp32" for n in ("m_ptr", "l_ptr", "acc_ptr", "accw_ptr", "emb_ptr", "chs_ptr", "out_ptr")
    },
    "_key_scores_kernel": {
        "q_ptr": "*fp32",
        "lut_ptr": "*i64",
        "codes_ptr": "*u8",
        "knorm_ptr": "*fp16",
        "pos_ptr": "*i32",
        "ztab_ptr": "*i64",
        "invf_ptr": "*fp32",
        "out_ptr": "*fp32",
    },
    "_encode_kernel": {"x_ptr": "*fp32", "u_ptr": "*fp32", "w_ptr": "*fp32", "h_ptr": "*fp32", "out_ptr": "*u8"},
    "_encode_running_kernel": {
        "x_ptr": "*fp32",
        "u_ptr": "*fp32",
        "w_ptr": "*fp32",
        "h_ptr": "*fp32",
        "out_ptr": "*u8",
        "scr_ptr": "*fp32",
    },
    "_encode_split_kernel": {
        **{k: "*fp32" for k in ("x_ptr", "u_ptr", "w_ptr", "un_ptr", "wn_ptr", "k_ptr", "kt_ptr", "scr_ptr")},
        "out_ptr": "*u8",
    },
    "_encode_split_h2_kernel": {
        **{k: "*fp32" for k in ("x_ptr", "norm_ptr", "u_ptr", "w_ptr", "ud_ptr", "wd_ptr", "un_ptr", "wn_ptr")},
        "k_ptr": "*fp32",
        "kt2_ptr": "*i32",
        "qs_ptr": "*fp32",
        "scr_ptr": "*i32",
        "out_ptr": "*u8",
    },
}
_FLOAT_ARGS = {"rope_scale"}


def _signature(fn, constexprs: dict, overrides: dict | None = None) -> dict:
    pointers = dict(_POINTERS.get(fn.__name__, {}), **(overrides or {}))
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _cubin_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread from ``cuobjdump --dump-resource-usage`` (``{}`` if it is missing)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # pragma: no cover - older Triton
        tool = None
    if not tool:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    out = {}
    for key, name in (("REG", "regs"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[name] = int(m.group(1))
    return out


def kernel_resources_compiled(
    fn, constexprs: dict, num_warps: int, num_stages: int, pointers=None, target=SM90, maxnreg: int | None = None
):
    """The compiled kernel (``triton.compile``'s result: ``.asm["cubin"]``, ``.metadata``) that
    :func:`kernel_resources` describes, compiled as it says (``maxnreg``: the launch option's register cap)."""
    import triton
    from triton.backends.compiler import GPUTarget

    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    constexprs = {**defaults, **constexprs}
    sig = _signature(fn, constexprs, pointers)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget(*target), options=options)


def kernel_resources(fn, constexprs: dict, num_warps: int, num_stages: int, target=SM90, pointers=None) -> dict:
    """Compile the ``@triton.jit`` function ``fn`` for ``target`` (``(backend, arch, warp_size)``) and return
    ``{"shared": bytes, "regs": per thread, "stack_bytes": per thread (spills), "fits": shared <= 227 KB}``.

    Every pointer argument is compiled as 16-byte aligned (``tt.divisibility = 16``), as Triton specializes a launch
    on the cache's tensors (PyTorch allocations are 256-byte aligned). Without it the compile is another one: at the
    8B shape the decode scores kernel's table gathers stay 4-byte loads instead of 16-byte ``ld.global.v4`` and it
    takes 234 registers instead of 200. Integer arguments are not specialized (the launch may also mark those
    divisible by 16).

    Constexpr parameters left out of ``constexprs`` take their defaults, as in a launch (without this, Triton's
    ahead-of-time path compiles them as ``i32`` arguments, and an ``if`` on one keeps both branches).

    Raises whatever Triton raises when the kernel does not compile (the caller records it)."""
    compiled = kernel_resources_compiled(fn, constexprs, num_warps, num_stages, pointers, target)
    shared = int(compiled.metadata.shared)
    res = {"shared": shared, "fits": shared <= H100_SHARED_BYTES}
    res.update(_cubin_usage(compiled.asm["cubin"]))
    return res


# the shapes the cache and the benchmarks run: (name, KV heads, query heads, head_dim, key residuals, value bits):
# Llama-3.1-8B (R=11 at 1 bit, 21 at 2 bits), SmolLM2-135M (head_dim 64: R=5 at 1 bit, 11 at 2 bits)
SHAPES = (
    ("llama8b_1bit", 8, 32, 128, 11, 1),
    ("llama8b_2bit", 8, 32, 128, 21, 2),
    ("smollm2_1bit", 3, 9, 64, 5, 1),
    ("smollm2_2bit", 3, 9, 64, 11, 2),
)

# the decode tilings benchmarks/commvq_decode.py sweeps (block_t, nb_chunk, num_warps, num_stages) at the 8B shape
BENCHMARK_DECODE_TILINGS = (
    (32, 1024, 8, 1),
    (16, 1024, 8, 1),
    (64, 1024, 8, 1),
    (32, 512, 8, 1),
    (32, 1024, 4, 1),
    (16, 1024, 4, 1),
)
# the two-pass tilings it sweeps: (block_t, num_warps, values_block_t, nb_chunk, values_warps); the first is the default
# (the values kernel by bit planes), the second the default of the reshape expansion
BENCHMARK_TWO_PASS_TILINGS = (
    (64, 8, 32, 512, 4),
    (64, 8, 64, 256, 8),
    (64, 8, 32, 256, 4),
    (32, 4, 32, 256, 4),
    (32, 8, 32, 512, 8),
    (16, 4, 32, 256, 4),
    (32, 4, 64, 256, 8),
    (32, 4, 32, 128, 4),
    (64, 4, 32, 512, 8),
    (128, 8, 32, 512, 8),
)
# the scores kernel with on-chip table gathers (key_gather="table"): (block_t, num_warps), values side at the default
BENCHMARK_TABLE_GATHER_TILINGS = ((32, 8), (64, 8), (128, 8))
# the scores kernel with the RoPE pairs in parts (pair_parts): (pair_parts, block_t, num_warps), values side at the
# default; compiled with Triton 3.6 for sm_90 at R=11 and 21: 59 registers at (2, 64, 8), 47 at (4, 64, 8), 56 at
# (4, 64, 4), no spill, against 95 for the default (and 10 KB of shared memory for the dot operands instead of 40 KB)
BENCHMARK_PAIR_PARTS_TILINGS = ((2, 64, 8), (4, 64, 8), (4, 64, 4), (4, 128, 8), (4, 32, 4), (8, 64, 4))
# the pairs of a sweep held as several tiles (pair_chunks): (pair_parts, pair_chunks, block_t, num_warps); Triton 3.6,
# sm_90, R=11: 72 registers at (1, 4, 64, 8), 70 at (1, 4, 32, 4), 64 at (2, 2, 64, 8), 128 at (1, 4, 64, 4) and
# (1, 4, 128, 8), no spill; the code loop of (1, 4, 64, 8) is 135 instructions per two residual steps instead of 240
BENCHMARK_PAIR_CHUNK_TILINGS = (
    (1, 4, 64, 8),
    (1, 4, 32, 4),
    (1, 4, 64, 4),
    (1, 4, 128, 8),
    (1, 2, 64, 8),
    (2, 2, 64, 8),
)
# the gathers one residual step ahead (key_prefetch): (pair_parts, pair_chunks, block_t, num_warps); Triton 3.6, sm_90,
# R=11: 111 registers at (2, 1, 64, 8), 159 at (1, 1, 64, 8), 126 at (1, 4, 64, 8), 96 at (2, 2, 64, 8), no spill
BENCHMARK_PREFETCH_TILINGS = ((2, 1, 64, 8), (1, 1, 64, 8), (1, 4, 64, 8), (2, 2, 64, 8), (1, 2, 64, 8), (2, 1, 32, 4))
# the scores kernel on small token blocks, the residual loop unrolled or not (key_unroll): (block_t, num_warps, unroll).
# Register figures depend on the Triton version: with the window in its own launch, Triton 3.6 (the GPU host's) gives
# the code programs 72 registers at (32, 4) and 95 at the default (64, 8), but 254-255 at (8, 2) and (8, 2) unrolled
# (Triton 3.9 here: 128 / 182 unrolled at R=11 / R=21); timed on an H200, all four are slower than the default
# (benchmarks/results/commvq_decode_window.json)
BENCHMARK_UNROLL_TILINGS = ((8, 2, True), (8, 1, True), (8, 2, False), (16, 4, True))
# software-pipelining stages of the two-pass values kernel at its default tiling (the default is 1: none)
BENCHMARK_VALUES_STAGES = (2, 3)


# the encode tilings the benchmarks time (the defaults of encode_defaults are compiled by default_configs)
ENCODE_TILINGS = (
    dict(block_n=16, num_warps=4, search="flat", precision="ieee", a_chunk=16),
    dict(block_n=16, num_warps=8, search="nested", precision="ieee", a_chunk=16),
    dict(block_n=16, num_warps=4, search="nested", precision="ieee", a_chunk=16),
    dict(block_n=32, num_warps=8, search="nested", precision="ieee", a_chunk=16),
    dict(block_n=16, num_warps=8, search="nested", precision="tf32", a_chunk=16),
    dict(block_n=32, num_warps=8, search="nested", precision="tf32", a_chunk=16),
    dict(block_n=16, num_warps=8, search="nested", precision="ieee", a_chunk=32),
    dict(block_n=16, num_warps=4, search="running", precision="ieee", a_chunk=16),
    dict(block_n=16, num_warps=4, search="running", precision="tf32", a_chunk=16),
    dict(block_n=32, num_warps=4, search="running", precision="tf32", a_chunk=16),
    dict(block_n=32, num_warps=8, search="running", precision="tf32", a_chunk=16),
    dict(block_n=64, num_warps=8, search="running", precision="tf32", a_chunk=16),
    *(
        dict(block_n=bn, num_warps=nw, search="split", precision=p, a_chunk=16, unroll=u)
        for bn, nw, p, u in (
            (16, 4, "tf32", 4),
            (32, 4, "tf32", 4),
            (32, 8, "tf32", 4),
            (64, 4, "tf32", 4),
            (64, 8, "tf32", 4),
            (128, 8, "tf32", 4),
            (64, 8, "tf32", 8),
            (32, 8, "tf32x3", 4),
            (64, 8, "tf32x3", 4),
            (32, 8, "ieee", 4),
        )
    ),
    *(
        dict(block_n=bn, num_warps=nw, search="split_h2", precision="tf32", a_chunk=16, unroll=u)
        for bn, nw, u in ((32, 4, 4), (64, 4, 4), (64, 8, 4), (128, 4, 4), (128, 8, 4), (128, 8, 8))
    ),
)


def default_configs():
    """``(label, fn, constexprs, num_warps, num_stages, pointer overrides)`` of every CommVQ kernel as its launcher
    compiles it by default, at every shape of :data:`SHAPES` (both key-table dtypes for the decode kernel)."""
    from pressroom.kernels import commvq_attention as att
    from pressroom.kernels import commvq_encode as enc
    from pressroom.kernels import commvq_refine as ref

    out = []
    for name, h, hq, d, r, bits in SHAPES:
        nbits = h * d * bits
        for fp16 in (True, False):
            meta, opts = att.decode_meta(h, hq // h, d, r, nbits, table_fp16=fp16)
            ptr = None if fp16 else {"ztab_ptr": "*i64"}
            out.append(
                (f"decode {name} table={'fp16' if fp16 else 'fp32'}", att._decode_split_kernel, meta, *opts, ptr)
            )
        for fp16 in (True, False):
            (smeta, sopts), _ = att.two_pass_meta(
                h, hq // h, d, r, nbits, table_fp16=fp16, pair_parts=att.default_pair_parts(d)
            )
            ptr = None if fp16 else {"ztab_ptr": "*i64"}
            label = f"scores {name} table={'fp16' if fp16 else 'fp32'}"
            out.append((label, att._decode_scores_kernel, smeta, *sopts, ptr))
            if fp16:  # the window's own launch (window_launch="separate", the default)
                wmeta = att.window_launch_meta(smeta)
                out.append((f"scores-window {name}", att._decode_scores_kernel, wmeta, *sopts, ptr))
        _, (vmeta, vopts) = att.two_pass_meta(h, hq // h, d, r, nbits)
        out.append((f"values {name}", att._decode_values_kernel, vmeta, *vopts, None))
        meta, opts = att.reduce_meta(d, nbits, n_splits=att.DEFAULT_TARGET_PROGRAMS // h)
        out.append((f"reduce {name}", att._decode_reduce_kernel, meta, *opts, None))
        meta, opts = att.merge_meta(h, hq // h, d, nbits, n_splits=att.DEFAULT_TARGET_PROGRAMS // h)
        out.append((f"merge {name}", att._decode_merge_kernel, meta, *opts, None))
        for design in ("direct", "lut"):
            meta, opts = att.key_scores_meta(h, hq // h, d, r, design)
            out.append((f"key_scores {design} {name}", att._key_scores_kernel, meta, *opts, None))
        meta, warps = ref.refine_meta(nbits)
        out.append((f"refine {name}", ref._refine_kernel, meta, warps, 1, None))
        for precision in enc.PRECISIONS:  # the tiling encode_keys launches for each precision
            kw = enc.encode_defaults(precision)
            # split_h2 as the cache launches it: the raw keys divided by their norms in the kernel
            meta, opts = enc.encode_meta(
                d, r, kw["block_n"], kw["num_warps"], 1, kw["search"], precision, row_norms=kw["search"] == "split_h2"
            )
            # "half": float16 dot tables, and the center tables of float16-exact (native) codebooks
            half = {k: "*fp16" for k in ("u_ptr", "w_ptr", "ud_ptr", "wd_ptr")} if precision == "half" else None
            out.append((f"encode {name} {precision}", enc.encode_kernel(kw["search"]), meta, *opts, half))
    return out


def benchmark_configs():
    """The decode tilings of :data:`BENCHMARK_DECODE_TILINGS` at the 8B shapes, plus the key-scores block sizes and
    the encode tilings the decode benchmark times (same tuple layout as :func:`default_configs`)."""
    from pressroom.kernels import commvq_attention as att
    from pressroom.kernels import commvq_encode as enc

    out = []
    for name, h, hq, d, r, bits in SHAPES[:2]:
        for bt, nbc, nw, ns in BENCHMARK_DECODE_TILINGS:
            meta, opts = att.decode_meta(h, hq // h, d, r, h * d * bits, True, bt, nbc, nw, ns)
            out.append(
                (f"decode {name} bt={bt} nbc={nbc} warps={nw} stages={ns}", att._decode_split_kernel, meta, *opts, None)
            )
        seen = set()
        for bt, nw, vbt, nbc, vw in BENCHMARK_TWO_PASS_TILINGS[1:]:
            (smeta, sopts), (vmeta, vopts) = att.two_pass_meta(
                h, hq // h, d, r, h * d * bits, True, bt, nw, vbt, nbc, vw
            )
            for label, fn, meta, opts in (
                (f"scores {name} bt={bt} warps={nw}", att._decode_scores_kernel, smeta, sopts),
                (f"values {name} bt={vbt} nbc={nbc} warps={vw}", att._decode_values_kernel, vmeta, vopts),
            ):
                if label not in seen:  # tilings share one of their two kernels
                    seen.add(label)
                    out.append((label, fn, meta, *opts, None))
        for bt, nw in BENCHMARK_TABLE_GATHER_TILINGS:
            (smeta, sopts), _ = att.two_pass_meta(h, hq // h, d, r, h * d * bits, True, bt, nw, key_gather="table")
            out.append(
                (f"scores {name} bt={bt} warps={nw} gather=table", att._decode_scores_kernel, smeta, *sopts, None)
            )
        (smeta, sopts), _ = att.two_pass_meta(h, hq // h, d, r, h * d * bits, key_parts=2)
        out.append((f"scores {name} key_parts=2", att._decode_scores_kernel, smeta, *sopts, None))
        for pp, bt, nw in BENCHMARK_PAIR_PARTS_TILINGS:
            (smeta, sopts), _ = att.two_pass_meta(h, hq // h, d, r, h * d * bits, True, bt, nw, pair_parts=pp)
            label = f"scores {name} bt={bt} warps={nw} pair_parts={pp}"
            out.append((label, att._decode_scores_kernel, smeta, *sopts, None))
        for pp, pc, bt, nw in BENCHMARK_PAIR_CHUNK_TILINGS:
            (smeta, sopts), _ = att.two_pass_meta(
                h, hq // h, d, r, h * d * bits, True, bt, nw, pair_parts=pp, pair_chunks=pc
            )
            label = f"scores {name} bt={bt} warps={nw} pair_parts={pp} pair_chunks={pc}"
            out.append((label, att._decode_scores_kernel, smeta, *sopts, None))
        for pp, pc, bt, nw in BENCHMARK_PREFETCH_TILINGS:
            (smeta, sopts), _ = att.two_pass_meta(
                h, hq // h, d, r, h * d * bits, True, bt, nw, pair_parts=pp, pair_chunks=pc, key_prefetch=True
            )
            label = f"scores {name} bt={bt} warps={nw} pair_parts={pp} pair_chunks={pc} prefetch"
            out.append((label, att._decode_scores_kernel, smeta, *sopts, None))
        for stages in BENCHMARK_VALUES_STAGES:
            _, (vmeta, (vw, vs)) = att.two_pass_meta(h, hq // h, d, r, h * d * bits, values_stages=stages)
            out.append((f"values {name} stages={vs}", att._decode_values_kernel, vmeta, vw, vs, None))
        for bt, nw, unroll in BENCHMARK_UNROLL_TILINGS:
            (smeta, sopts), _ = att.two_pass_meta(h, hq // h, d, r, h * d * bits, True, bt, nw, key_unroll=unroll)
            label = f"scores {name} bt={bt} warps={nw}" + (" unroll" if unroll else "")
            out.append((label, att._decode_scores_kernel, smeta, *sopts, None))
        for design in ("direct", "lut"):
            meta, opts = att.key_scores_meta(h, hq // h, d, r, design, block_t=16)
            out.append((f"key_scores {design} {name} bt=16", att._key_scores_kernel, meta, *opts, None))
        for kw in ENCODE_TILINGS:
            meta, opts = enc.encode_meta(
                d, r, kw["block_n"], kw["num_warps"], 1, kw["search"], kw["precision"], kw["a_chunk"],
                kw.get("unroll", 4),
            )  # fmt: skip
            label = "encode {} block_n={block_n} warps={num_warps} {search} {precision} a_chunk={a_chunk}".format(
                name, **kw
            ) + (f" unroll={kw['unroll']}" if "unroll" in kw else "")
            out.append((label, enc.encode_kernel(kw["search"]), meta, *opts, None))
    return out


def commvq_resource_table(target=SM90, configs=None) -> list[dict]:
    """Compile every configuration of :func:`default_configs` (or ``configs``) for ``target``; one row each (a
    compile error is recorded in the row's ``error``)."""
    rows = []
    for label, fn, meta, num_warps, num_stages, ptr in configs if configs is not None else default_configs():
        row = {"config": label, "num_warps": num_warps, "num_stages": num_stages}
        row.update({k: v for k, v in meta.items() if k.startswith(("BLOCK", "NB_", "A_CHUNK"))})
        try:
            row.update(kernel_resources(fn, meta, num_warps, num_stages, target, ptr))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
    return rows


def probe_sm90() -> str | None:
    """``None`` when a trivial kernel compiles for sm_90 here, else the reason (no Triton, no ptxas, the interpreter
    replacing ``triton.jit``...)."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        kernel_resources(_probe, {"BLOCK": 32}, 1, 1, pointers={"x_ptr": "*fp32"})
    except Exception as err:
        return f"cannot compile for sm_90 here: {type(err).__name__}: {str(err)[:200]}"
    return None


def _row(index: int, benchmark: bool) -> dict:
    configs = default_configs() + (benchmark_configs() if benchmark else [])
    return commvq_resource_table(configs=[configs[index]])[0]


def main() -> None:  # pragma: no cover - a report
    """One JSON line per configuration (a first line ``{"probe": reason}`` when sm_90 is out of reach). Run without
    ``TRITON_INTERPRET=1`` (ahead-of-time compilation needs the real ``triton.jit``)."""
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description="Compile the CommVQ kernels for sm_90 and print their resources.")
    ap.add_argument("--benchmark", action="store_true", help="also the decode benchmark's tiling sweep")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    args = ap.parse_args()
    reason = probe_sm90()
    if reason is not None:
        print(json.dumps({"probe": reason}), flush=True)
        return
    n = len(default_configs()) + (len(benchmark_configs()) if args.benchmark else 0)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(_row, range(n), [args.benchmark] * n):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = [
    "BENCHMARK_DECODE_TILINGS",
    "BENCHMARK_PAIR_CHUNK_TILINGS",
    "BENCHMARK_PAIR_PARTS_TILINGS",
    "BENCHMARK_PREFETCH_TILINGS",
    "BENCHMARK_TABLE_GATHER_TILINGS",
    "BENCHMARK_TWO_PASS_TILINGS",
    "BENCHMARK_UNROLL_TILINGS",
    "BENCHMARK_VALUES_STAGES",
    "ENCODE_TILINGS",
    "H100_SHARED_BYTES",
    "SHAPES",
    "benchmark_configs",
    "commvq_resource_table",
    "default_configs",
    "kernel_resources",
    "probe_sm90",
]
