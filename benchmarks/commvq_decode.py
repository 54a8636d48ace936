# ruff: noqa: B023
"""CommVQ decode attention and encode per layer at long context, next to fp16 SDPA and the reference's decode path.

One layer of a Llama-3.1-8B-shaped model (32 query / 8 KV heads, head_dim 128, batch 1) holding ``--tokens`` coded
tokens (default 131072) plus a 128-token full-precision window:

- ours: :func:`pressroom.kernels.commvq_attention.decode_attention` at 1 bit (R=11 key residuals, 1 value bit per
  element) and 2 bits (R=21, 2 value bits), both designs (``two_pass``: scores kernel + values kernel over all query
  heads; ``fused``: one split-K kernel per KV head), each over a small tiling sweep, + reduce + per-head value matmul;
- fp16 SDPA (bf16 keys/values of the same length, ``enable_gqa``);
- transformers' ``QuantizedCache(backend="hqq")`` at the same bits holding the same keys and values: one decode step
  = ``update`` with a new token (it returns the dequantized cache) + SDPA (``--skip-hqq`` to leave it out);
- a faithful PyTorch re-implementation of the CommVQ reference's decode path (``commvq/compress_triton.py``: a
  look-up table ``q . center`` per query head, residual and pair, gathers summed over residuals, RoPE per token,
  PyTorch softmax, probability-weighted value bits, matmul with the value codebook), in token chunks;
- encode per layer for ``--tokens`` tokens: keys (normalize + fused residual search and 12-bit packing, Triton) and
  values (the value encoder MLP + postscale + bit packing);
- KV bytes per token, everything included (codes, value bits, key norm, value coefficient, position).

Codes, norms and bits are random (timing does not depend on their values); a correctness check against the PyTorch
reference runs on a 4096-token slice first. Writes JSON after every phase (``--output``).

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_decode.py --output $OUT/commvq_decode.json
    TRITON_INTERPRET=1 python benchmarks/commvq_decode.py --smoke --output /tmp/commvq_decode_smoke.json   # CPU
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _timing import gpu_ms, kernel_ms, median_ms

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_attention import (
    DESIGNS,
    CodedKV,
    LayerBooks,
    decode_attention,
    decode_attention_reference,
)
from pressroom.kernels.commvq_encode import (
    PRECISIONS,
    KeyTables,
    code_bytes,
    encode_defaults,
    encode_keys,
    normalize_keys,
    pack_bits,
)
from pressroom.kernels.commvq_resources import (
    BENCHMARK_DECODE_TILINGS,
    BENCHMARK_PAIR_CHUNK_TILINGS,
    BENCHMARK_PAIR_PARTS_TILINGS,
    BENCHMARK_PREFETCH_TILINGS,
    BENCHMARK_TABLE_GATHER_TILINGS,
    BENCHMARK_TWO_PASS_TILINGS,
    BENCHMARK_UNROLL_TILINGS,
    BENCHMARK_VALUES_STAGES,
    ENCODE_TILINGS,
)
from pressroom.presses import commvq_cache
from pressroom.presses.commvq_cache import CommVQLayer, _matmul_tf32
from pressroom.presses.commvq_codebooks import ValueCodec

HQ, H, D, WINDOW = 32, 8, 128, 128
CONFIGS = ((1, 11), (2, 21))  # (bits, key residuals)


def timed_ms(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds per call (CUDA events on the GPU, wall clock on the CPU)."""
    return median_ms(fn, reps, device.type == "cuda")


def make_layer(n: int, bits: int, r: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    nbits = H * D * bits
    theta = (torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()  # float16, as native codebooks
    codec = ValueCodec(H * D, bits)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))
    books = LayerBooks.build(theta, codec.embedding, codec.scale + codec.eps, inv_freq, 1.0, device=device)
    kv = CodedKV(
        torch.randint(0, 256, (1, H, n, code_bytes(r)), dtype=torch.uint8, generator=g).to(device),
        (torch.rand(1, n, generator=g) * 4 + 8).half().to(device),
        (torch.rand(1, n, generator=g) + 0.5).half().to(device),
        torch.arange(n, dtype=torch.int32)[None].to(device),
        torch.randint(0, 256, (1, n, nbits // 8), dtype=torch.uint8, generator=g).to(device),
        n,
        torch.randn(1, H, WINDOW, D, generator=g).to(device, torch.bfloat16),
        torch.randn(1, H, WINDOW, D, generator=g).to(device, torch.bfloat16),
        torch.arange(n, n + WINDOW, dtype=torch.int32)[None].to(device),
        WINDOW,
    )
    return kv, books, theta.to(device), codec.to(device)


def reference_decode_path(q, kv: CodedKV, theta, codec: ValueCodec, inv_freq, scaling, chunk: int = 16384):
    """The CommVQ reference's decode path, re-implemented in PyTorch (LUT of q . centers, gathers, RoPE per token,
    PyTorch softmax, weighted value bits @ codebook)."""
    from pressroom.kernels.commvq_encode import unpack_bits, unpack_codes12

    g = HQ // H
    r = theta.shape[1]
    p = D // 2
    # centers as 2x2 matrices per (head, residual, entry, pair): [[x, y], [-y, x]] as the reference builds them
    x = theta[:, :, 0::2, :]  # [H, R, 64, P]
    y = theta[:, :, 1::2, :]
    qh = q.view(H, g, p, 2)  # interleaved query pairs
    # LUT[h, g, r, entry, p] = Q_p conj(z_entry,p) as (re, im), for the A part; the B part uses i z_B:
    # Q conj(i z) = -i Q conj(z), i.e. (im, -re) of the same table
    qx, qy = qh[:, :, None, None, :, 0], qh[:, :, None, None, :, 1]
    lut_a = torch.stack((qx * x[:, None] + qy * y[:, None], qy * x[:, None] - qx * y[:, None]), dim=-1)
    lut_b = torch.stack((lut_a[..., 1], -lut_a[..., 0]), dim=-1)
    scores = []
    n = kv.n
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        codes = unpack_codes12(kv.codes[0, :, s:e], r)  # [H, n, R]
        a, b = codes >> 6, codes & 63
        acc = torch.zeros(H, g, e - s, p, 2, device=q.device)
        for step in range(r):
            ia = a[:, None, :, step, None, None].expand(H, g, e - s, p, 2)
            ib = b[:, None, :, step, None, None].expand(H, g, e - s, p, 2)
            acc += lut_a[:, :, step].gather(2, ia) + lut_b[:, :, step].gather(2, ib)
        phi = kv.pos[0, s:e].float()[:, None] * inv_freq[None]
        c, sn = phi.cos(), phi.sin()
        sc = (acc[..., 0] * c + acc[..., 1] * sn).sum(-1) * kv.knorm[0, s:e].float()  # Re(Q conj(K e^{i phi}))
        scores.append(sc.view(HQ, e - s))
    scores = torch.cat(scores, dim=-1) * scaling  # (the coded tokens only; the reference has no separate window)
    probs = torch.softmax(scores.float(), dim=-1)
    bits = unpack_bits(kv.vbits[0, :n], torch.bfloat16)  # [n, NB]
    weighted = (probs * kv.vcoef[0, :n].float()).to(torch.bfloat16) @ bits  # [HQ, NB]
    out = weighted.float().view(H, g, -1) @ codec.embedding.view(-1, H, D).transpose(0, 1)
    return (out * (codec.scale + codec.eps).view(H, 1, D)).view(HQ, D)


SWEEPS = {  # fused design: (block_t, nb_chunk, num_warps, num_stages); the first is the design's default
    "none": [(32, 1024, 8, 1)],
    "small": list(BENCHMARK_DECODE_TILINGS),  # each compiled for sm_90 by tests/test_commvq_resources.py
}
SWEEPS["two_pass"] = SWEEPS["none"]  # every two-pass tiling, the fused design at its default only
SWEEPS["full"] = SWEEPS["small"] + [
    (bt, nbc, nw, ns)
    for bt in (16, 32, 64)
    for nbc in (512, 1024)
    for nw in (4, 8)
    for ns in (1,)
    if (bt, nbc, nw, ns) not in SWEEPS["small"]
]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def failed(err: Exception, device: torch.device) -> str:
    """What the benchmark records for a call that raised (after freeing what it left on the GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return f"failed: {type(err).__name__}: {str(err)[:300]}"


def attempt(fn, reps: int, device: torch.device) -> float | str:
    """:func:`timed_ms`, or ``"failed: ..."`` when the call raises (a tiling out of shared memory, a compile error,
    out of memory): the benchmark records it and goes on."""
    try:
        return timed_ms(fn, reps, device)
    except Exception as err:
        return failed(err, device)


def hqq_decode_ms(kf, vf, qf, bits: int, reps: int, device: torch.device) -> float | str:
    """One decode step of one layer through transformers' ``QuantizedCache(backend="hqq")`` holding the keys and
    values ``kf``/``vf`` (``[1, H, n, D]``, prefilled through the cache): ``update`` with one new token (returns the
    dequantized cache) then SDPA; ``"failed: ..."`` when HQQ is missing or the call raises."""
    try:
        from transformers import LlamaConfig, QuantizedCache

        _, h, _, d = kf.shape
        hq = qf.shape[1]
        config = LlamaConfig(
            hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=h, num_hidden_layers=1, head_dim=d
        )
        cache = QuantizedCache(backend="hqq", config=config, nbits=bits, residual_length=128, q_group_size=64)
        with torch.no_grad():
            cache.update(kf, vf, 0)
        k1, v1 = kf[:, :, :1].clone(), vf[:, :, :1].clone()

        def step():
            keys, values = cache.update(k1, v1, 0)
            return torch.nn.functional.scaled_dot_product_attention(qf, keys, values, enable_gqa=True)

        with torch.no_grad():
            return timed_ms(step, reps, device)
    except Exception as err:
        return failed(err, device)


def fmt(ms) -> str:
    return f"{ms:.4f} ms" if isinstance(ms, float) else str(ms)


# encode_keys keyword arguments: its default, then the tilings compiled for sm_90 by tests/test_commvq_resources.py
ENCODE_VARIANTS = [dict(block_n=16, num_warps=4, search="flat", precision="ieee", a_chunk=16), *ENCODE_TILINGS[1:]]


# the key side's arithmetic (decode_attention's key_accum, rope_trig): the default first, then the alternatives
KEY_MATH = (("auto", "fast"), ("fp32", "fast"), ("auto", "libdevice"), ("fp32", "libdevice"))


# value_bits="planes" variants of --key-side planes (decode_attention keywords over the default's): a plane's
# accumulator is [nb_chunk / 8, Hq], so nb_chunk / 8 = 16 x values_warps puts one 16-row slice on each warp; the
# first run (benchmarks/results/commvq_decode_planes.json) found 32 tokens / 512 bits / 4 warps / 264 programs best
VALUE_PLANES_TILINGS = (
    dict(values_block_t=32, nb_chunk=512, values_warps=4, target_programs=264, values_prefetch=False),
    dict(values_block_t=32, nb_chunk=512, values_warps=4, target_programs=264, values_prefetch=True),
    dict(values_block_t=32, nb_chunk=512, values_warps=4, target_programs=264, values_prefetch=False, values_stages=2),
    dict(values_block_t=32, nb_chunk=512, values_warps=4, target_programs=264, values_prefetch=False, values_stages=3),
    dict(values_block_t=32, nb_chunk=1024, values_warps=8, target_programs=132, values_prefetch=False),
    dict(values_block_t=32, nb_chunk=1024, values_warps=8, target_programs=132, values_prefetch=True),
    dict(values_block_t=32, nb_chunk=1024, values_warps=8, target_programs=264, values_prefetch=True),
    dict(values_block_t=16, nb_chunk=512, values_warps=4, target_programs=264, values_prefetch=True),
    dict(values_block_t=32, nb_chunk=512, values_warps=4, target_programs=528, values_prefetch=True),
)


# --key-side carveout: the scores kernel's preferred shared-memory carveout (percent of 228 KB; None: the driver's;
# "auto", the default: the least that keeps the register occupancy) at the default tiling (64 tokens, 8 warps: 20 KB
# of shared memory, 4 programs an SM) and at 32 tokens / 4 warps. A first run (commvq_decode_carveout_first.json)
# found 0 (one program an SM) 1.4x slower, 100 (L1 28 KB) 1.1x slower, 30 (100 KB) the fastest
SCORES_CARVEOUTS = (None, 27, 30, 45)
CARVEOUT_TILINGS = (
    *((64, 8, c) for c in SCORES_CARVEOUTS),
    (32, 4, None),
    (32, 4, "auto"),
)


def variants(
    sweep: str,
    smoke: bool,
    key_side: tuple[str, ...] = ("table", "parts"),
    key_math: bool = True,
    values_stages: tuple[int, ...] = (),
) -> list[dict]:
    """decode_attention keyword arguments to time: the two-pass tilings, then the fused ones."""
    two_pass = BENCHMARK_TWO_PASS_TILINGS[:1] if smoke or sweep == "none" else BENCHMARK_TWO_PASS_TILINGS
    out = [
        dict(
            design="two_pass",
            block_t=bt,
            num_warps=nw,
            values_block_t=vbt,
            nb_chunk=nbc,
            values_warps=vw,
            target_programs=264,
            score_programs=4096,
        )
        for bt, nw, vbt, nbc, vw in two_pass
    ]
    # the previous defaults (one sweep of the pairs, the per-head value product, 2048 score programs, values 32 tokens
    # / 4 warps, merge chunks of 1024 bits; target_programs 264, as the benchmark timed it, where the library then
    # defaulted to the SM count)
    out.insert(
        1,
        dict(
            out[0],
            score_programs=2048,
            pair_parts=1,
            value_product="einsum",
            value_bits="reshape",
            values_block_t=32,
            nb_chunk=256,
            values_warps=4,
            reduce_nb_chunk=1024,
            scores_carveout=None,
            reduce_split_tile=1,
            pair_order="sweeps",
        ),
    )
    # the values kernel's bits expanded by reshape and joined in their thread, each at the reshape's tiling, the
    # driver's carveout and the one-split-at-a-time merge: the reshape row is the defaults before this session's
    # planes / carveout / merge tiles (runs before that change timed it with the tiled merge)
    reshape = dict(
        values_block_t=64, nb_chunk=256, values_warps=8, scores_carveout=None, reduce_split_tile=1, pair_order="sweeps"
    )
    out.insert(2, dict(out[0], value_bits="reshape", **reshape))
    out.insert(3, dict(out[0], value_bits="join", **reshape))
    # the scores kernel gathering from a per-block copy of each residual's table (values side at the default)
    if "table" in key_side:
        out += [
            dict(out[0], block_t=bt, num_warps=nw, key_gather="table")
            for bt, nw in (BENCHMARK_TABLE_GATHER_TILINGS[:1] if smoke else BENCHMARK_TABLE_GATHER_TILINGS)
        ]
    if "parts" in key_side:  # the residual steps scored in two halves by separate programs
        out += [dict(out[0], key_parts=2)]
    if "pairs" in key_side:  # each program sweeps its tokens once per part of the RoPE pairs (tables L1-resident)
        out += [
            dict(out[0], block_t=bt, num_warps=nw, pair_parts=pp)
            for pp, bt, nw in (BENCHMARK_PAIR_PARTS_TILINGS[:1] if smoke else BENCHMARK_PAIR_PARTS_TILINGS)
        ]
    if "chunks" in key_side:  # the pairs of a sweep as several tiles: a row's table addresses computed once
        out += [
            dict(out[0], block_t=bt, num_warps=nw, pair_parts=pp, pair_chunks=pc)
            for pp, pc, bt, nw in (BENCHMARK_PAIR_CHUNK_TILINGS[:1] if smoke else BENCHMARK_PAIR_CHUNK_TILINGS)
        ]
    if "prefetch" in key_side:  # gathers one residual step ahead (register double buffering), dense value product
        out += [
            dict(out[0], block_t=bt, num_warps=nw, pair_parts=pp, pair_chunks=pc, key_prefetch=True)
            for pp, pc, bt, nw in (BENCHMARK_PREFETCH_TILINGS[:1] if smoke else BENCHMARK_PREFETCH_TILINGS)
        ]
        out += [dict(out[0], pair_parts=2), dict(out[0], pair_parts=2, value_product="dense")]
    if "pairs2" in key_side:  # pair_parts=2 with the dense value product and 4096 score programs, other tilings
        base = dict(out[0], pair_parts=2, value_product="dense", score_programs=4096)
        out += [dict(base, block_t=bt, num_warps=nw) for bt, nw in ((64, 8), (128, 8), (64, 4), (32, 4), (128, 16))]
    if "unroll" in key_side:  # small token blocks, with and without the residual loop unrolled
        out += [
            dict(out[0], block_t=bt, num_warps=nw, key_unroll=u)
            for bt, nw, u in (BENCHMARK_UNROLL_TILINGS[:1] if smoke else BENCHMARK_UNROLL_TILINGS)
        ]
    if "planes" in key_side:  # the values kernel by bit planes, in the tilings of VALUE_PLANES_TILINGS
        out += [
            dict(out[0], value_bits="planes", **v)
            for v in (VALUE_PLANES_TILINGS[:1] if smoke else VALUE_PLANES_TILINGS)
        ]
    if "codes" in key_side:  # the code bytes loaded ahead; the merge one split at a time; other program counts
        out += [
            dict(out[0], code_prefetch=True),
            dict(out[0], reduce_split_tile=1),
            dict(out[0], score_programs=8192),
            dict(out[0], values_block_t=32, nb_chunk=1024, values_warps=8),
        ]
    if "splits" in key_side:  # more value programs (splits) now that the merge reads 16 splits per step
        out += [dict(out[0], target_programs=tp) for tp in (396, 528, 792)]
        out += [
            dict(out[0], target_programs=528, values_block_t=16),
            dict(out[0], target_programs=528, score_programs=8192),
        ]
    if "order" in key_side:  # one sweep of the token range per part of the pairs (the default before "blocks")
        out += [dict(out[0], pair_order="sweeps"), dict(out[0], score_programs=8192)]
    if "maxnreg" in key_side:  # the scores kernel's register cap: more programs an SM, some spills
        out += [dict(out[0], scores_maxnreg=r) for r in (48, 40)]
        out += [
            dict(out[0], scores_maxnreg=48, scores_carveout=None),
            dict(out[0], scores_maxnreg=48, block_t=32, num_warps=4),
        ]
    if "carveout" in key_side:  # the scores kernel's shared-memory carveout (the rest of the SM's 256 KB is L1)
        tilings = CARVEOUT_TILINGS[:1] if smoke else CARVEOUT_TILINGS
        out += [dict(out[0], block_t=bt, num_warps=nw, scores_carveout=c) for bt, nw, c in tilings]
    out += [dict(out[0], values_stages=vs) for vs in values_stages]  # the values kernel software-pipelined
    if "merge" in key_side:  # one kernel for the merge, the value-codebook product and the window
        out += [dict(out[0], merge="fused")]
    if "window" in key_side:  # the window's program in the code programs' launch (the previous default)
        out += [dict(out[0], window_launch="shared")]
    if key_math:  # float32 sums of the key entries and/or libdevice trig (the previous defaults)
        out += [dict(out[0], key_accum=a, rope_trig=t) for a, t in KEY_MATH[1:]]
    out += [
        dict(design="fused", block_t=bt, nb_chunk=nbc, num_warps=nw, num_stages=ns, target_programs=1024)
        for bt, nbc, nw, ns in SWEEPS["none" if smoke else sweep]
    ]
    return out


def _speed(e: dict) -> float:
    """A sweep entry's figure of merit: its GPU time (graph replay, cold L2) when timed, else its eager call."""
    return e["gpu_ms"] if isinstance(e.get("gpu_ms"), float) else e["ms"]


# the merge kernel's bit chunks of --values-sweep (default: min(n_bits, 128))
REDUCE_CHUNKS = (64, 256, 1024)
# the two-pass values kernel's tilings of --values-sweep: (values_block_t, nb_chunk, values_warps)
VALUES_TILINGS = ((64, 256, 8), (32, 512, 8), (64, 512, 8), (16, 256, 4), (32, 128, 4), (32, 256, 4), (128, 256, 8))


def attempt_gpu(fn, reps: int, device: torch.device, **kw) -> float | str:
    """Median of :func:`_timing.gpu_ms`, or ``"failed: ..."``."""
    try:
        return sorted(gpu_ms(fn, reps, **kw))[reps // 2]
    except Exception as err:
        return failed(err, device)


def gpu_time(cfg: dict, q, kv: CodedKV, books: LayerBooks, scaling: float, reps: int, device: torch.device) -> None:
    """``cfg["gpu_time_ms"]``: SDPA over the same number of bf16 tokens, the default two-pass call and the best of the
    sweep (by GPU time when the sweep has it, else by the eager call), each as GPU time without host overhead, eager
    and as a CUDA-graph replay, L2 warm and flushed."""
    n = kv.n + kv.nw
    kf = torch.randn(1, H, n, D, device=device, dtype=torch.bfloat16)
    vf = torch.randn_like(kf)
    qf = torch.randn(1, HQ, 1, D, device=device, dtype=torch.bfloat16)
    best = cfg.get("ours_best_gpu_tiling") or cfg["ours_best_tiling"] or cfg["decode_sweep"][0]
    best_kw = {k: v for k, v in best.items() if k not in ("ms", "gpu_ms")}
    calls = {
        "sdpa_bf16": lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True),
        "ours_default": lambda: decode_attention(q, kv, books, scaling, True),
        "ours_best": lambda: decode_attention(q, kv, books, scaling, True, **best_kw),
    }
    out = cfg["gpu_time_ms"] = {"best_tiling": best}
    for label, fn in calls.items():
        for graph in (False, True):
            for flush in (False, True):
                key = f"{label}_{'graph' if graph else 'eager'}_{'cold_l2' if flush else 'warm_l2'}"
                out[key] = attempt_gpu(fn, reps, device, graph=graph, flush_l2=flush)
                log(f"gpu time {key}: {fmt(out[key])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="bit widths to run")
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default="small", help="decode tilings to time")
    ap.add_argument("--skip-key-scores", action="store_true", help="skip the two key-side designs in isolation")
    ap.add_argument("--skip-reference-path", action="store_true", help="skip the PyTorch reference decode path")
    ap.add_argument("--skip-encode", action="store_true", help="skip the encode timings")
    ap.add_argument(
        "--encode-sweep",
        choices=["all", "defaults"],
        default="all",
        help="encode_keys variants: the swept tilings, or only encode_keys' default for each precision",
    )
    ap.add_argument(
        "--encode-blocks",
        type=int,
        nargs="+",
        default=[8192],
        help="tokens per chunk for the whole-layer encode timing (CommVQLayer's ENCODE_BLOCK: 32768 over the batch)",
    )
    ap.add_argument("--skip-hqq", action="store_true", help="skip transformers' QuantizedCache (HQQ) decode step")
    ap.add_argument(
        "--key-side",
        nargs="*",
        choices=[
            "table",
            "parts",
            "pairs",
            "pairs2",
            "chunks",
            "prefetch",
            "unroll",
            "merge",
            "window",
            "planes",
            "carveout",
            "codes",
            "splits",
            "maxnreg",
            "order",
        ],
        default=["table", "parts", "pairs", "chunks", "prefetch", "unroll", "merge", "window"],
        help="two-pass alternatives timed next to the default: on-chip table gathers, residuals in two parts, "
        "RoPE pairs in parts (pair_parts) and in tiles (pair_chunks), gathers one step ahead (key_prefetch), "
        "small token blocks with the residual loop "
        "unrolled, the fused merge, the window in the code launch, the values kernel by bit planes (value_bits), "
        "the scores kernel's shared-memory carveout (scores_carveout), the code bytes loaded ahead "
        "(code_prefetch) and the merge one split at a time (reduce_split_tile=1), more value programs (splits), "
        "the scores kernel's register cap (scores_maxnreg), the pairs' parts per block (pair_order)",
    )
    ap.add_argument(
        "--values-sweep",
        action="store_true",
        help="also time the values kernel's tilings (VALUES_TILINGS) under the best two-pass scores tiling",
    )
    ap.add_argument(
        "--gpu-time",
        action="store_true",
        help="also time SDPA, the default and the best two-pass variant as GPU time without host overhead (eager "
        "and CUDA-graph replay), with the L2 cache warm and flushed (benchmarks/_timing.py gpu_ms)",
    )
    ap.add_argument(
        "--values-stages",
        type=int,
        nargs="*",
        default=list(BENCHMARK_VALUES_STAGES),
        help="software-pipelining stages of the two-pass values kernel timed next to the default (1)",
    )
    ap.add_argument(
        "--skip-key-math",
        action="store_true",
        help="skip the key-side arithmetic alternatives (float32 sums, libdevice trig) timed next to the default",
    )
    ap.add_argument(
        "--full-check",
        action="store_true",
        help="also check every key-side arithmetic against the float32 reference over all --tokens (large angles)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    n = 32 if args.smoke else args.tokens
    reps = 1 if args.smoke else args.reps
    import transformers
    import triton

    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "shape": {"tokens": n, "q_heads": HQ, "kv_heads": H, "head_dim": D, "batch": 1, "window": WINDOW},
        "smoke": args.smoke,
        "sweep": args.sweep,
        "configs": {},
    }
    out_path = Path(args.output)

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - T0
        atomic_write_json(out_path, result)

    scaling = D**-0.5
    log(f"device {result['device']}, torch {torch.__version__}, triton {triton.__version__}, {n} tokens")

    # fp16 SDPA baseline
    kf = torch.randn(1, H, n + WINDOW, D, device=device, dtype=torch.bfloat16)
    vf = torch.randn_like(kf)
    qf = torch.randn(1, HQ, 1, D, device=device, dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True)  # noqa: E731
    result["sdpa_bf16_ms"] = attempt(sdpa, reps, device)
    result["fp16_bytes_per_token"] = H * D * 2 * 2
    # transformers' QuantizedCache (HQQ backend) at the same bits: one decode step of one layer = the cache update
    # (it dequantizes the whole cache and returns it) + SDPA over it, as a model's attention layer does
    if not args.skip_hqq:
        result["hqq_quantized_cache"] = {}
        for bits in args.bits:
            result["hqq_quantized_cache"][f"{bits}bit"] = hqq_decode_ms(kf, vf, qf, bits, reps, device)
            save()
            log(f"QuantizedCache(hqq) {bits} bit, update + sdpa: {fmt(result['hqq_quantized_cache'][f'{bits}bit'])}")
    kf = vf = None
    save()
    log(f"sdpa bf16: {fmt(result['sdpa_bf16_ms'])}")

    for bits, r in (c for c in CONFIGS if c[0] in args.bits):
        name = f"{bits}bit"
        cfg = result["configs"][name] = {"bits": bits, "key_residuals": r}
        kv, books, theta, codec = make_layer(n, bits, r, device)
        cfg["key_table"] = "float16" if books.ztab16 is not None else "float32"
        q = torch.randn(1, HQ, D, device=device)
        log(f"{name}: layer built (R={r}, key table {cfg['key_table']})")
        # correctness on a slice, at the default tiling
        m = min(n, 4096)
        sub = CodedKV(kv.codes, kv.knorm, kv.vcoef, kv.pos, kv.vbits, m, kv.wkeys, kv.wvals, kv.wpos, kv.nw)
        ref = decode_attention_reference(q, sub, books, scaling)
        for design in DESIGNS:
            key = "check_max_abs_err" if design == "two_pass" else f"check_max_abs_err_{design}"
            try:
                ours = decode_attention(q, sub, books, scaling, use_triton=True, design=design)
                cfg[key] = float((ours - ref).abs().max())
            except Exception as err:
                cfg[key] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        for label, kw in (
            ("table_gather", dict(key_gather="table")),
            ("key_parts_2", dict(key_parts=2)),
            ("pair_parts_4", dict(pair_parts=4)),
            ("pair_chunks_4", dict(pair_chunks=4)),
            ("value_product_dense", dict(value_product="dense")),
            ("key_prefetch", dict(key_prefetch=True, pair_parts=2)),
            ("key_unroll", dict(key_unroll=True, block_t=8, num_warps=2)),
            ("merge_fused", dict(merge="fused")),
            ("value_bits_reshape", dict(value_bits="reshape")),
            ("pair_order_sweeps", dict(pair_order="sweeps")),
            ("value_bits_planes_no_prefetch", dict(value_bits="planes", values_prefetch=False)),
            ("value_bits_planes_32_1024", dict(value_bits="planes", values_block_t=32, nb_chunk=1024, values_warps=8)),
        ):
            try:
                ours = decode_attention(q, sub, books, scaling, use_triton=True, **kw)
                cfg[f"check_max_abs_err_{label}"] = float((ours - ref).abs().max())
            except Exception as err:
                cfg[f"check_max_abs_err_{label}"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        cfg["check_ref_max_abs"] = float(ref.abs().max())
        try:  # the bit planes (inline PTX on the GPU, the default) against the reshape expansion: the same operand,
            # summed in another order (each at its own tiling)
            planes = decode_attention(q, sub, books, scaling, use_triton=True)
            base = decode_attention(q, sub, books, scaling, use_triton=True, value_bits="reshape")
            cfg["check_planes_vs_reshape_max_abs_diff"] = float((planes - base).abs().max())
        except Exception as err:
            cfg["check_planes_vs_reshape_max_abs_diff"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        if args.full_check:  # every position up to --tokens: the fast trig's range reduction at large angles
            ref = decode_attention_reference(q, kv, books, scaling)
            cfg["full_check"] = {"tokens": n, "ref_max_abs": float(ref.abs().max())}
            for acc, trig in KEY_MATH:
                try:
                    ours = decode_attention(q, kv, books, scaling, use_triton=True, key_accum=acc, rope_trig=trig)
                    cfg["full_check"][f"{acc}_{trig}_max_abs_err"] = float((ours - ref).abs().max())
                except Exception as err:
                    cfg["full_check"][f"{acc}_{trig}_max_abs_err"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            log(f"{name} full check: {cfg['full_check']}")
            ref = None
        sub.nw = 0
        with torch.no_grad():
            lut = reference_decode_path(q[0], sub, theta, codec, books.inv_freq, scaling)
        cfg["check_reference_path_max_abs_err"] = float(  # bf16 weights in the reference path
            (lut - decode_attention_reference(q, sub, books, scaling)[0]).abs().max()
        )
        save()
        log(
            f"{name} check ({m} tokens): kernel vs reference max abs err {cfg['check_max_abs_err']} "
            f"(reference max abs {cfg['check_ref_max_abs']:.4g}); reference path err "
            f"{cfg['check_reference_path_max_abs_err']:.3g}"
        )
        # the tiling sweep of both designs (the best is reported as ours_ms; all are kept, failures included)
        cfg["decode_sweep"] = []

        def run_variant(e: dict) -> None:
            kw = {k: v for k, v in e.items() if k not in ("ms", "gpu_ms")}
            e["ms"] = attempt(lambda: decode_attention(q, kv, books, scaling, True, **kw), reps, device)
            if args.gpu_time and device.type == "cuda" and isinstance(e["ms"], float):
                # GPU time of a CUDA-graph replay with a cold L2 (no host overhead): steadier than the eager call
                e["gpu_ms"] = attempt_gpu(
                    lambda: decode_attention(q, kv, books, scaling, True, **kw), reps, device, graph=True, flush_l2=True
                )
            cfg["decode_sweep"].append(e)
            save()
            log(f"{name} decode {kw}: {fmt(e['ms'])} (graph, cold L2: {fmt(e.get('gpu_ms'))})")

        for variant in variants(
            args.sweep, args.smoke, tuple(args.key_side), not args.skip_key_math, tuple(args.values_stages)
        ):
            run_variant(variant)
        for design in DESIGNS:
            timings = [e for e in cfg["decode_sweep"] if e["design"] == design and isinstance(e["ms"], float)]
            if not timings or args.smoke:
                continue
            best = min(timings, key=_speed)
            # split counts are runtime arguments (no compile)
            for tp in (132, 264, 512, 2048, 4096) if design == "fused" else (132, 264, 528, 2048):
                run_variant(dict(best, target_programs=tp))
            if design == "two_pass":
                best = min(
                    (e for e in cfg["decode_sweep"] if e["design"] == design and isinstance(e["ms"], float)),
                    key=_speed,
                )
                for sp in (512, 1024, 4096, 8192):
                    run_variant(dict(best, score_programs=sp))
                run_variant(dict(best, key_table="fp32"))
                if args.values_sweep:  # the values kernel's tilings under the best scores tiling
                    best = min(
                        (e for e in cfg["decode_sweep"] if e["design"] == design and isinstance(e["ms"], float)),
                        key=_speed,
                    )
                    for vbt, nbc, vw in VALUES_TILINGS:
                        run_variant(dict(best, values_block_t=vbt, nb_chunk=nbc, values_warps=vw))
                    run_variant(dict(best, value_product="dense"))
                    for rnc in REDUCE_CHUNKS:  # the merge kernel in smaller bit chunks (more programs)
                        run_variant(dict(best, reduce_nb_chunk=rnc))
        for design in DESIGNS:
            timings = [e for e in cfg["decode_sweep"] if e["design"] == design and isinstance(e["ms"], float)]
            cfg[f"{design}_best_ms"] = min(e["ms"] for e in timings) if timings else None
        timings = [e for e in cfg["decode_sweep"] if isinstance(e["ms"], float)]
        best = min(timings, key=lambda e: e["ms"]) if timings else None
        gpu_timed = [e for e in cfg["decode_sweep"] if isinstance(e.get("gpu_ms"), float)]
        if gpu_timed:  # the best by GPU time (graph replay, cold L2), the steadier figure
            cfg["ours_best_gpu_tiling"] = min(gpu_timed, key=lambda e: e["gpu_ms"])
        cfg["ours_ms"] = best["ms"] if best else None
        cfg["ours_best_tiling"] = best
        # where the time goes: per-kernel GPU time of the default launch and of the best one (torch.profiler)
        if device.type == "cuda":
            cfg["kernel_breakdown_ms"] = {}
            fused_merge = next((e for e in cfg["decode_sweep"] if e.get("merge") == "fused"), None)
            best_gpu = cfg.get("ours_best_gpu_tiling")
            for label, e in (
                ("default", cfg["decode_sweep"][0]),
                ("best", best),
                ("best_gpu", best_gpu),
                ("merge_fused", fused_merge),
            ):
                if e is None:
                    continue
                kw = {k: v for k, v in e.items() if k not in ("ms", "gpu_ms")}
                try:
                    cfg["kernel_breakdown_ms"][label] = kernel_ms(
                        lambda: decode_attention(q, kv, books, scaling, True, **kw), reps
                    )
                except Exception as err:
                    cfg["kernel_breakdown_ms"][label] = failed(err, device)
            log(f"{name} kernel breakdown: {cfg['kernel_breakdown_ms']}")
        save()
        log(f"{name} decode: best {fmt(cfg['ours_ms'])} (sdpa {fmt(result['sdpa_bf16_ms'])})")
        if args.gpu_time and device.type == "cuda":
            gpu_time(cfg, q, kv, books, scaling, reps, device)
            save()
        # the two key-side designs in isolation (scores of every coded token, no softmax / values)
        if not args.skip_key_scores:
            from pressroom.kernels.commvq_attention import key_luts, key_scores

            cfg["key_scores_ms"] = {}
            luts = key_luts(q, books)
            for design in ("direct", "lut"):
                best_ms = None
                for bt in (32,) if args.smoke else (16, 32):
                    ms = attempt(
                        lambda: key_scores(q, kv, books, design=design, use_triton=True, block_t=bt, luts=luts),
                        reps,
                        device,
                    )
                    cfg["key_scores_ms"][f"{design}_bt{bt}"] = ms
                    log(f"{name} key scores {design} block_t={bt}: {fmt(ms)}")
                    if isinstance(ms, float):
                        best_ms = ms if best_ms is None else min(best_ms, ms)
                cfg["key_scores_ms"][design] = best_ms
                save()
            luts = None
        if not args.skip_reference_path:
            cfg["reference_path_pytorch_ms"] = attempt(
                lambda: reference_decode_path(q[0], kv, theta, codec, books.inv_freq, scaling),
                max(1, reps // 4),
                device,
            )
            save()
            log(f"{name} reference decode path (PyTorch): {fmt(cfg['reference_path_pytorch_ms'])}")
        # encode per layer: keys (fused search + packing) and values (encoder MLP + postscale + packing)
        if not args.skip_encode:
            raw = torch.randn(1, H, n, D, device=device)
            tables = KeyTables(theta)
            codes_out = torch.empty(n, H, code_bytes(r), dtype=torch.uint8, device=device)

            def enc_keys(**kw):
                x, _ = normalize_keys(raw)
                encode_keys(x[0], theta, use_triton=True, tables=tables, out=codes_out, **kw)

            vals = torch.randn(1, n, H * D, device=device)

            def enc_values():
                for s in range(0, n, 16384):
                    v = vals[:, s : s + 16384]
                    bits_, pre = codec.encode(v)
                    post = codec.postscale(bits_)
                    pack_bits(bits_), (pre + codec.eps) / (post + codec.eps)

            cfg["encode_keys_sweep"] = []
            first_codes = None
            if args.encode_sweep == "defaults":
                enc_variants = [dict(encode_defaults(p), precision=p) for p in PRECISIONS]
            else:
                enc_variants = ENCODE_VARIANTS
            for kw in enc_variants[:1] if args.smoke else enc_variants:
                ms = attempt(lambda: enc_keys(**kw), max(1, reps // 4), device)
                e = dict(kw, ms=ms)
                if isinstance(ms, float):  # the codes of the last call, against the first variant's (flat, ieee)
                    if first_codes is None:
                        first_codes = codes_out.clone()
                    e["codes_equal_to_first"] = float((codes_out == first_codes).all(-1).float().mean())
                cfg["encode_keys_sweep"].append(e)
                save()
                log(f"{name} encode keys {kw}: {fmt(ms)} (same codes as the first: {e.get('codes_equal_to_first')})")
            ok = [e for e in cfg["encode_keys_sweep"] if isinstance(e["ms"], float)]
            cfg["encode_keys_ms"] = min(e["ms"] for e in ok) if ok else None
            cfg["encode_values_ms"] = attempt(enc_values, max(1, reps // 4), device)
            if device.type == "cuda":  # the same encoder with TF32 matmuls (tensor cores), next to float32
                tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = True
                try:
                    cfg["encode_values_tf32_ms"] = attempt(enc_values, max(1, reps // 4), device)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = tf32

                def enc_values_bf16():  # the encoder's matmuls in bfloat16 (autocast); bits and norms as before
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        enc_values()

                cfg["encode_values_bf16_ms"] = attempt(enc_values_bf16, max(1, reps // 4), device)

                # the value encoder in TF32 (encode_precision="tf32"), then 64 flips on the PyTorch path or the
                # Triton kernel (CommVQLayer's CUDA default), on 16384-token chunks
                def enc_values_refined(steps: int = 64, use_triton: bool = False):
                    for s in range(0, n, 16384):
                        v = vals[:, s : s + 16384]
                        with _matmul_tf32(True):
                            bits_, _ = codec.encode(v)
                        bits_, coef = codec.refine(v, bits_, steps, use_triton=use_triton)
                        pack_bits(bits_)

                # random values and codec: every token may use all 64 flips (real values converge sooner)
                cfg["encode_values_tf32_refine64_ms"] = attempt(enc_values_refined, max(1, reps // 4), device)
                cfg["encode_values_tf32_refine64_triton_ms"] = attempt(
                    lambda: enc_values_refined(use_triton=True), max(1, reps // 4), device
                )

                # the cache's own path for a whole layer (CommVQLayer._encode: norms, key search and packing, value
                # encoder, refinement on its CUDA default (the Triton kernel), packing), all n tokens in its chunks
                def layer_encode(precision: str, refine: int, block: int) -> tuple[float | str, int]:
                    """Milliseconds and peak bytes allocated beyond the inputs, encoding ``block`` tokens at a time
                    (the module's ENCODE_BLOCK, which _encode reads at each call, set for this timing only)."""
                    layer = CommVQLayer(
                        theta, codec, books.inv_freq, scaling, encode_precision=precision, value_refine=refine
                    )
                    layer.lazy_initialization(raw[:, :, :1], raw[:, :, :1])
                    layer.reserve(n)
                    values_h = vals.view(1, n, H, D).transpose(1, 2)
                    positions = torch.arange(n, device=device)

                    def run() -> None:
                        layer.n = 0
                        layer._encode(raw, values_h, positions)

                    default_block = commvq_cache.ENCODE_BLOCK
                    commvq_cache.ENCODE_BLOCK = block
                    try:
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        ms = attempt(run, max(1, reps // 4), device)
                        return ms, torch.cuda.max_memory_allocated() - base
                    finally:
                        commvq_cache.ENCODE_BLOCK = default_block

                cfg["encode_layer_ms"], cfg["encode_layer_peak_extra_bytes"] = {}, {}
                for block in args.encode_blocks:
                    for p, k in (("tf32", 0), ("tf32", 64), ("ieee", 64)):
                        key = f"{p}_refine{k}" + ("" if block == commvq_cache.ENCODE_BLOCK else f"_block{block}")
                        cfg["encode_layer_ms"][key], cfg["encode_layer_peak_extra_bytes"][key] = layer_encode(
                            p, k, block
                        )
                        save()
                log(f"{name} encode, whole layer (CommVQLayer._encode): {cfg['encode_layer_ms']}")
            vms = cfg["encode_values_ms"]

            def keys_ms(precision: str) -> float | None:  # the fastest key encode timed at this precision
                times = [e["ms"] for e in ok if e.get("precision", "ieee") == precision]
                return min(times) if times else None

            def total(keys: float | None, values) -> float | None:
                return keys + values if keys is not None and isinstance(values, float) else None

            # the whole layer's encode at one precision for both halves (float32 / TF32), never mixed
            cfg["encode_total_ms"] = total(keys_ms("ieee"), vms)
            cfg["encode_total_tf32_ms"] = total(keys_ms("tf32"), cfg.get("encode_values_tf32_ms"))
            save()
            log(f"{name} encode values: {fmt(vms)}; encode total {fmt(cfg['encode_total_ms'])}")
            raw = vals = None
        per_token = H * code_bytes(r) + H * D * bits // 8 + 2 + 2 + 4
        cfg["bytes_per_token"] = per_token
        cfg["fraction_of_fp16"] = per_token / result["fp16_bytes_per_token"]
        cfg["target_fraction"] = 1 / 7 if bits == 2 else 1 / 12
        ref_ms = cfg.get("reference_path_pytorch_ms")
        cfg["speedup_vs_reference_path"] = (
            ref_ms / cfg["ours_ms"] if isinstance(ref_ms, float) and isinstance(cfg["ours_ms"], float) else None
        )
        save()
        log(f"{name}: {per_token} bytes per token ({cfg['fraction_of_fp16']:.4f} of fp16)")
        kv = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    log(f"done; JSON in {out_path}")


if __name__ == "__main__":
    main()
