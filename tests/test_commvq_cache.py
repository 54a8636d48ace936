"""CommVQCache, CommVQPress and their kernels (encode with packing, decode attention from codes), on CPU.

Triton kernels run under TRITON_INTERPRET=1 (set by the test command); codebooks are random but valid (random theta,
randomly initialised value codecs), so no training run is needed.
"""

from __future__ import annotations

import os

import pytest
import torch
from kvpress import ComposedPress, KVPressTextGenerationPipeline, SnapKVPress
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pressroom.kernels.commvq_attention import (
    CodedKV,
    LayerBooks,
    auto_carveout,
    decode_attention,
    decode_attention_reference,
    resolve_pair_order,
    two_pass_meta,
)
from pressroom.kernels.commvq_codebook import centers_from_theta
from pressroom.kernels.commvq_encode import (
    KeyTables,
    code_bytes,
    encode_keys,
    encode_keys_reference,
    normalize_keys,
    pack_bits,
    pack_codes12,
    unpack_bits,
    unpack_codes12,
)
from pressroom.presses import CommVQCache, CommVQLayer, CommVQPress, cache_memory_bytes
from pressroom.presses.commvq_cache import ExactLayer, check_exact_layers
from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, model_kv_shape
from pressroom.presses.commvq_press import kept_indices

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def random_books(config, residuals: int = 3, bits: int = 2, values: bool = True, seed: int = 0) -> CommVQCodebooks:
    torch.manual_seed(seed)
    layers, heads, head_dim = model_kv_shape(config)
    theta = torch.randn(layers, heads, residuals, 128, head_dim // 2) * 0.3
    codecs = [ValueCodec(heads * head_dim, bits) for _ in range(layers)] if values else None
    return CommVQCodebooks("random", bits, residuals, head_dim, layers, heads, theta, values=codecs)


@pytest.fixture(scope="module")
def tiny():
    from pressroom.evaluation.models import load_model

    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ packing, kernels
@pytest.mark.parametrize("residuals", [1, 5, 10, 11, 21])
def test_pack_codes12_round_trip(residuals):
    codes = torch.randint(0, 4096, (3, 2, 7, residuals))
    packed = pack_codes12(codes)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == code_bytes(residuals) == (3 * residuals + 1) // 2
    assert torch.equal(unpack_codes12(packed, residuals), codes)


def test_pack_bits_round_trip():
    bits = torch.randint(0, 2, (4, 5, 96), dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.shape == (4, 5, 12)
    assert torch.equal(unpack_bits(packed), bits)
    assert int(pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]))) == 129  # least significant bit first


@needs_interpreter
@pytest.mark.parametrize(
    ("search", "a_chunk"), [("flat", 16), ("nested", 16), ("nested", 32), ("running", 16), ("split", 16)]
)
def test_encode_kernel_equals_reference_quantizer(search, a_chunk):
    torch.manual_seed(1)
    heads, residuals, head_dim = 2, 3, 16
    theta = torch.randn(heads, residuals, 128, head_dim // 2) * 0.2
    x, norms = normalize_keys(torch.randn(1, heads, 45, head_dim))
    assert torch.allclose(x.flatten(2).norm(dim=-1), torch.ones(1, 45), atol=1e-5)
    ref = encode_keys_reference(x[0], theta)
    tri = encode_keys(x[0], theta, use_triton=True, search=search, a_chunk=a_chunk)
    assert torch.equal(ref, tri)
    if search in ("running", "split"):  # 3 tiles over 2 persistent programs: one program does two
        assert torch.equal(ref, encode_keys(x[0], theta, use_triton=True, search=search, programs=2))
    # exact ties (two equal rows of theta: equal centers) go to the first index, as torch.argmin does. Inputs on a
    # coarse dyadic grid make every distance exact in float32 whatever the summation order (numpy's and torch's
    # matmuls round differently on different CPUs), so the ties are ties in both and only the tie-break is tested
    tied = (theta * 16).round() / 16
    tied[:, :, 2 * 9 : 2 * 9 + 2] = tied[:, :, 2 * 3 : 2 * 3 + 2]  # entry 9 = entry 3
    xg = (x[0] * 8).round() / 8
    ref_tied = encode_keys_reference(xg, tied)
    assert torch.equal(ref_tied, encode_keys(xg, tied, use_triton=True, search=search, a_chunk=a_chunk))
    first = unpack_codes12(ref_tied, residuals)[:, :, 0]  # [tokens, heads]: the first step's codes
    # u_9 = u_3 and w_9 = w_3: the tie was met and went to 3, for A and for B
    a, b = first // 64, first % 64
    assert (a == 3).any() and (b == 3).any() and not ((a == 9) | (b == 9)).any()
    # fixed inputs: a vector that is exactly one center, then a sum of centers, is coded exactly
    from pressroom.kernels.commvq_codebook import centers_from_theta, residual_decode

    centers = centers_from_theta(theta[0])  # [R, 4096, D]
    exact = centers[0, [7, 4000, 123]].unsqueeze(1).repeat(1, heads, 1)
    codes = unpack_codes12(encode_keys(exact, theta, use_triton=True, search=search), residuals)[:, 0]
    assert codes[:, 0].tolist() == [7, 4000, 123]
    # the decoded residual sum approximates the input better than the first step alone
    dec = residual_decode(unpack_codes12(tri[:, 0], residuals), theta[0])
    first = centers[0][unpack_codes12(tri[:, 0], residuals)[:, 0]]
    assert (dec - x[0, :, 0]).pow(2).sum() < (first - x[0, :, 0]).pow(2).sum()


@needs_interpreter
@pytest.mark.parametrize(("unroll", "block_n", "precision"), [(1, 16, "ieee"), (8, 32, "tf32x3")])
def test_split_search_picks_a_nearest_center(unroll, block_n, precision):
    """The split search (min over B without indices, then arg-mins) codes every step with a nearest center: its
    distance equals the smallest of the 4,096 (float64) up to float32 rounding, and the codes equal the reference
    quantizer's on these inputs."""
    from pressroom.kernels.commvq_codebook import centers_from_theta

    torch.manual_seed(3)
    heads, residuals, head_dim, n = 2, 2, 32, 150
    theta = torch.randn(heads, residuals, 128, head_dim // 2) * 0.15
    x, _ = normalize_keys(torch.randn(1, heads, n, head_dim))
    packed = encode_keys(x[0], theta, use_triton=True, search="split", unroll=unroll, block_n=block_n,
                         precision=precision)  # fmt: skip
    assert torch.equal(packed, encode_keys_reference(x[0], theta))
    for h in range(heads):
        codes = unpack_codes12(packed[:, h], residuals)
        res = x[0, :, h].double()
        for r in range(residuals):
            centers = centers_from_theta(theta[h, r].double())
            d2 = torch.cdist(res, centers).pow(2)
            picked = d2.gather(1, codes[:, r : r + 1])[:, 0]
            assert torch.all(picked <= d2.min(1).values + 1e-5)
            res = res - centers[codes[:, r]]
    with pytest.raises(ValueError, match="unroll must divide 64"):
        encode_keys(x[0], theta, use_triton=True, search="split", unroll=3)


def test_encode_defaults_pick_the_search_by_precision():
    from pressroom.kernels.commvq_encode import encode_defaults

    assert encode_defaults() == dict(search="flat", block_n=16, num_warps=4)
    assert encode_defaults("tf32") == dict(search="split_h2", block_n=64, num_warps=4)
    assert encode_defaults("tf32", "split") == dict(search="split", block_n=128, num_warps=8)
    assert encode_defaults("tf32x3")["search"] == "split"
    assert encode_defaults("ieee", "split")["block_n"] == 128
    with pytest.raises(ValueError, match="precision must be one of"):
        encode_defaults("fp8")
    with pytest.raises(ValueError, match="search must be one of"):
        encode_defaults("ieee", "greedy")


@needs_interpreter
def test_tf32_encode_runs_the_split_h2_search_by_default():
    from pressroom.kernels.commvq_encode import encode_keys_split_h2_reference

    torch.manual_seed(4)
    theta = torch.randn(2, 2, 128, 8) * 0.2
    x, _ = normalize_keys(torch.randn(1, 2, 40, 16))
    ref = encode_keys_split_h2_reference(x[0], theta)
    assert torch.equal(encode_keys(x[0], theta, use_triton=True, precision="tf32"), ref)
    assert torch.equal(encode_keys(x[0], theta, use_triton=False, precision="tf32"), ref)  # the reference off Triton


@needs_interpreter
def test_split_h2_search_equals_its_reference_and_codes_near_nearest():
    """float16 candidate sums: the kernel (interpreter: the same float16 roundings on unpacked halves) equals its
    PyTorch reference bit for bit, ties go to the first index, and every step's center is within float16 rounding
    of the nearest one."""
    from pressroom.kernels.commvq_encode import encode_keys_split_h2_reference

    torch.manual_seed(5)
    heads, residuals, head_dim, n = 2, 2, 16, 40
    theta = torch.randn(heads, residuals, 128, head_dim // 2) * 0.2
    x, _ = normalize_keys(torch.randn(1, heads, n, head_dim))
    ref = encode_keys_split_h2_reference(x[0], theta)
    assert torch.equal(encode_keys(x[0], theta, use_triton=True, search="split_h2", block_n=16, unroll=8), ref)
    assert torch.equal(encode_keys(x[0], theta, use_triton=True, search="split_h2", block_n=16, programs=2), ref)
    wide = encode_keys(x[0], theta, use_triton=True, search="split_h2", block_n=16, wide_lanes=True)
    assert torch.equal(wide, ref)  # the running minima four adjacent lanes a thread
    prefetched = encode_keys(x[0], theta, use_triton=True, search="split_h2", block_n=16, prefetch=True)
    assert torch.equal(prefetched, ref)  # no PTX under the interpreter: the option's path; the GPU's codes are
    # compared with the default's by benchmarks/commvq_encode_dpx.py (rows_equal_to_first)
    with pytest.raises(ValueError, match="prefetch applies to"):
        encode_keys(x[0], theta, use_triton=True, search="split", block_n=16, prefetch=True)
    # float16-exact codebooks (as the native ones): the chosen centers are gathered from float16 tables, same codes
    theta16 = theta.half().float()
    assert KeyTables(theta16).center_tables()[0].dtype == torch.float16
    assert KeyTables(theta).center_tables()[0].dtype == torch.float32
    ref_t16 = encode_keys_split_h2_reference(x[0], theta16, dot_dtype=torch.float16)
    assert torch.equal(encode_keys(x[0], theta16, use_triton=True, precision="half", block_n=16), ref_t16)
    # unnormalized rows with their norms: divided in the kernel as PyTorch divides (then the same search)
    raw = x[0] * (torch.rand(n) * 3 + 0.5)[:, None, None]
    norms = raw.flatten(1).norm(dim=-1)
    divided = encode_keys_split_h2_reference(raw / norms[:, None, None], theta)
    for use_triton in (True, False):
        kw = dict(search="split_h2", block_n=16, row_norms=norms, use_triton=use_triton)
        assert torch.equal(encode_keys(raw, theta, **kw), divided)
        assert torch.equal(
            encode_keys(raw, theta, **dict(kw, search="split")),
            encode_keys(raw / norms[:, None, None], theta, search="split", use_triton=use_triton, block_n=16),
        )
    with pytest.raises(ValueError, match=r"row_norms must be \[N\]"):
        encode_keys(raw, theta, search="split_h2", row_norms=norms[:-1], use_triton=True)
    # float16 dot operands: the kernel rounds the residual and the tables as its reference does
    ref16 = encode_keys_split_h2_reference(x[0], theta, dot_dtype=torch.float16)
    kw16 = dict(block_n=16, precision="half")  # split_h2 by default
    assert torch.equal(encode_keys(x[0], theta, use_triton=True, **kw16), ref16)
    assert torch.equal(encode_keys(x[0], theta, use_triton=False, **kw16), ref16)
    assert (ref16 == ref).all(-1).float().mean() >= 0.9
    with pytest.raises(ValueError, match="precision='half' is implemented for search='split_h2'"):
        encode_keys(x[0], theta, use_triton=True, search="split", precision="half")
    with pytest.raises(ValueError, match="precision='half' is implemented for search='split_h2'"):
        encode_keys(x[0], theta, use_triton=False, search="flat", precision="half")
    with pytest.raises(ValueError, match="the dot tables are float32 or torch.float16"):
        KeyTables(theta).dot_tables(torch.bfloat16)
    exact = encode_keys_reference(x[0], theta)
    assert (ref == exact).all(-1).float().mean() >= 0.9  # near-ties aside, the exact search's codes
    for h in range(heads):
        codes = unpack_codes12(ref[:, h], residuals)
        res = x[0, :, h].double()
        for r in range(residuals):
            centers = centers_from_theta(theta[h, r].double())
            d2 = torch.cdist(res, centers).pow(2)
            picked = d2.gather(1, codes[:, r : r + 1])[:, 0]
            assert torch.all(picked <= d2.min(1).values + 4e-3)  # float16: ~1e-3 relative on sums of order 1
            res = res - centers[codes[:, r]]
    # exact ties on a dyadic grid (every sum exact in float16 and float32): the first index, as torch.argmin
    tied = (theta * 16).round() / 16
    tied[:, :, 2 * 9 : 2 * 9 + 2] = tied[:, :, 2 * 3 : 2 * 3 + 2]  # entry 9 = entry 3
    xg = (x[0] * 8).round() / 8
    packed = encode_keys(xg, tied, use_triton=True, search="split_h2", block_n=16)
    assert torch.equal(packed, encode_keys_split_h2_reference(xg, tied))
    assert torch.equal(packed, encode_keys_reference(xg, tied))
    first = unpack_codes12(packed, residuals)[:, :, 0]
    a, b = first // 64, first % 64
    assert (a == 3).any() and (b == 3).any() and not ((a == 9) | (b == 9)).any()


@needs_interpreter
def test_split_h2_differs_from_exact_only_on_float16_near_ties():
    """Keys placed between their two nearest centers (different A), within float16 rounding of the tie: the float16
    sums pick the other center for some of them, exactly as the reference rounds, and never a farther one."""
    from pressroom.kernels.commvq_encode import encode_keys_split_h2_reference

    torch.manual_seed(0)
    theta = torch.randn(1, 1, 128, 8) * 0.2
    centers = centers_from_theta(theta[0])[0]  # [4096, 16]
    pts = torch.randn(200, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    top = torch.cdist(pts, centers).topk(2, largest=False).indices
    pairs = [(i, j) for i, j in top.tolist() if i // 64 != j // 64][:16]
    x = torch.stack(
        [(centers[i] + centers[j]) / 2 + e * (centers[j] - centers[i]) for i, j in pairs for e in (-2e-4, 0.0, 2e-4)]
    )
    x = x[:, None, :]  # [48, 1, 16]
    h2 = encode_keys_split_h2_reference(x, theta)
    exact = encode_keys_reference(x, theta)
    assert (h2 != exact).any()  # float16 sums break some near-ties the other way
    assert torch.equal(encode_keys(x, theta, use_triton=True, search="split_h2", block_n=16), h2)
    d2 = torch.cdist(x[:, 0].double(), centers.double()).pow(2)
    picked = d2.gather(1, unpack_codes12(h2[:, 0], 1))[:, 0]
    assert torch.all(picked <= d2.min(1).values + 1e-3)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_split_h2_refuses_what_float16_cannot_hold(use_triton):
    theta = torch.randn(1, 1, 128, 8) * 0.2
    x, _ = normalize_keys(torch.randn(1, 1, 20, 16))
    with pytest.raises(ValueError, match="codebooks reach"):
        KeyTables(theta * 1000).split_h2_table()
    with pytest.raises(ValueError, match="codebooks reach"):
        encode_keys(x[0], theta * 1000, use_triton=use_triton, search="split_h2")
    with pytest.raises(ValueError, match="normalized keys"):  # checked on both paths, before any coding
        encode_keys(x[0] * 1e5, theta, use_triton=use_triton, search="split_h2")
    with pytest.raises(ValueError, match="normalized keys"):
        encode_keys(x[0], theta, use_triton=use_triton, search="split_h2", key_norm_bound=1e5)
    encode_keys(x[0], theta, use_triton=use_triton, search="split_h2", key_norm_bound=1.0)  # in range: codes


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_encode_maxnreg_keeps_the_codes_and_refuses_bad_caps(use_triton):
    """A register cap (``maxnreg``: a compile option, which the interpreter and the PyTorch path accept and ignore)
    gives the same codes as the uncapped launch; caps ptxas would not honour as asked are refused on every path."""
    torch.manual_seed(6)
    theta = (torch.randn(2, 2, 128, 8) * 0.2).half().float()  # float16-exact, as the native codebooks
    x, _ = normalize_keys(torch.randn(1, 2, 40, 16))
    for precision in ("half", "tf32"):  # split_h2, the search the cap is for
        kw = dict(use_triton=use_triton, precision=precision, block_n=16, key_norm_bound=1.0)
        want = encode_keys(x[0], theta, **kw)
        for cap in (168, 128):
            assert torch.equal(encode_keys(x[0], theta, maxnreg=cap, **kw), want)
    flat = dict(use_triton=use_triton, block_n=16)  # the other kernels take it too
    assert torch.equal(encode_keys(x[0], theta, maxnreg=128, **flat), encode_keys(x[0], theta, **flat))
    for bad in (0, 16, 100, 255, 256, 128.0, True, "128"):
        with pytest.raises(ValueError, match="maxnreg must be None or a multiple of 8 from 24 to 248"):
            encode_keys(x[0], theta, use_triton=use_triton, precision="half", maxnreg=bad)


def test_f16x2_pack_round_trip():
    from pressroom.kernels.f16x2 import pack_f16x2, unpack_f16x2

    lo, hi = torch.tensor([1.0, -2.5, 65504.0, 0.1]), torch.tensor([float("inf"), 3.0, -0.0, -7.25])
    z = pack_f16x2(lo, hi)
    assert z.dtype == torch.int32
    back_lo, back_hi = unpack_f16x2(z)
    assert torch.equal(back_lo, lo.half()) and torch.equal(back_hi, hi.half())
    assert int(pack_f16x2(torch.tensor([0.0]), torch.tensor([float("inf")]))) == 0x7C000000
    with pytest.raises(ValueError, match="one shape"):
        pack_f16x2(lo, hi[:2])


def _coded(batch, heads, head_dim, residuals, n, nw, nbits, per_head_pos=False, fp16_theta=False, seed=0):
    torch.manual_seed(seed)
    p = head_dim // 2
    theta = torch.randn(heads, residuals, 128, p) * 0.3
    if fp16_theta:
        theta = theta.half().float()
    books = LayerBooks.build(
        theta,
        torch.randn(nbits, heads * head_dim) * 0.2,
        torch.rand(heads * head_dim) + 0.5,
        1.0 / (10000 ** (torch.arange(p) / p)),
        1.0,
    )
    pos = torch.randperm(4 * n)[:n].to(torch.int32)
    pos = pos.view(1, 1, n).repeat(batch, heads, 1) if per_head_pos else pos.view(1, n).repeat(batch, 1)
    if per_head_pos:
        pos[:, 1] = torch.randperm(4 * n)[:n].to(torch.int32)
    kv = CodedKV(
        pack_codes12(torch.randint(0, 4096, (batch, heads, n + 5, residuals))),
        (torch.rand(batch, n + 5) * 3 + 1).half(),
        (torch.rand(batch, n + 5) + 0.5).half(),
        torch.cat((pos, torch.zeros_like(pos[..., :5])), dim=-1),
        pack_bits(torch.randint(0, 2, (batch, n + 5, nbits))),
        n,
        torch.randn(batch, heads, 8, head_dim),
        torch.randn(batch, heads, 8, head_dim),
        torch.arange(4 * n, 4 * n + 8, dtype=torch.int32)[None].repeat(batch, 1),
        nw,
    )
    return kv, books


@needs_interpreter
@pytest.mark.parametrize(
    "design",
    [
        "two_pass",
        "fused",
        "two_pass_table",
        "two_pass_parts",
        "two_pass_pairs",
        "two_pass_unroll",
        "two_pass_window_shared",
        "two_pass_bt8",
        "two_pass_stages",
        "two_pass_merge",
        "fused_merge",
    ],
)
@pytest.mark.parametrize(
    ("per_head_pos", "head_dim", "fp16_theta"), [(False, 16, False), (True, 16, True), (False, 32, False)]
)
def test_decode_attention_kernel_equals_dequantized_attention(per_head_pos, head_dim, fp16_theta, design):
    """Both designs, and the two-pass one with on-chip table gathers, split residuals, split RoPE pairs, the unrolled
    residual loop
    (an odd R: the last pair holds one code), the window in the code programs' launch (default: its own), 8-token
    blocks, the pipelined values kernel, the fused merge (which also equals the
    separate merge to float32 rounding). Tolerance: 2e-3 relative to the output's scale
    (the kernels weight value bits in float16; head_dim >= 32 also computes scores with tl.dot, tf32 on a GPU, float32
    in the interpreter)."""
    gather = {
        "two_pass_table": dict(key_gather="table"),
        "two_pass_parts": dict(key_parts=2),
        "two_pass_pairs": dict(pair_parts=2),
        "two_pass_unroll": dict(key_unroll=True),
        "two_pass_window_shared": dict(window_launch="shared"),
        "two_pass_bt8": dict(block_t=8, key_unroll=True),  # no tensor-core dots on 8 tokens; window in 16s
        "two_pass_stages": dict(values_stages=3),  # pipelining: the same program (the interpreter ignores stages)
        "two_pass_merge": dict(merge="fused"),
        "fused_merge": dict(merge="fused"),
    }.get(design, {})
    tiling = dict(design="fused" if design.startswith("fused") else "two_pass", block_t=16, target_programs=8)
    tiling.update(values_block_t=16)
    tiling.update(score_programs=8, **gather)
    batch, heads, group, residuals = 2, 2, 3, 3
    kv, books = _coded(
        batch,
        heads,
        head_dim,
        residuals,
        n=70,
        nw=5,
        nbits=2 * heads * head_dim,
        per_head_pos=per_head_pos,
        fp16_theta=fp16_theta,
    )
    assert (books.ztab16 is not None) == fp16_theta  # the float16 table is used exactly when it is exact
    q = torch.randn(batch, heads * group, head_dim)
    ref = decode_attention_reference(q, kv, books, 0.3)
    out = decode_attention(q, kv, books, 0.3, use_triton=True, **tiling)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 2e-3 * ref.abs().max()
    if design.endswith("_merge"):
        separate = decode_attention(q, kv, books, 0.3, use_triton=True, **dict(tiling, merge="separate"))
        assert (out - separate).abs().max() <= 1e-5 * ref.abs().max()
    if fp16_theta:  # the float32 table, or float32 sums of the float16 one, give the same result
        out32 = decode_attention(q, kv, books, 0.3, use_triton=True, key_table="fp32", **tiling)
        out16 = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp32", **tiling)
        assert (out32 - out16).abs().max() <= 1e-5 * ref.abs().max()
        assert (out32 - ref).abs().max() <= 2e-3 * ref.abs().max()
    # no coded token (only the window) and no window (only codes)
    for n, nw in ((0, 5), (70, 0)):
        kv.n, kv.nw = n, nw
        ref = decode_attention_reference(q, kv, books, 0.3)
        out = decode_attention(q, kv, books, 0.3, use_triton=True, **tiling)
        assert (out - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
@pytest.mark.parametrize("design", ["two_pass", "fused"])
def test_fp16_key_sums_are_exact_where_float16_is(design):
    """``key_accum="fp16"`` adds packed float16 pairs: with table entries on a 2^-6 grid and small enough that every
    partial sum is a float16, the sums are exact, so the result equals the float32 sums (1e-5 relative: only the
    order of float32 operations differs). This checks which half of which entry goes where (x, y of z_A and z_B)."""
    tiling = dict(design=design, block_t=16, target_programs=8, values_block_t=16, score_programs=8)
    kv, books = _coded(1, 2, 32, 5, n=40, nw=3, nbits=2 * 2 * 32, fp16_theta=True)
    grid = (books.theta * 64).round() / 64
    books = LayerBooks.build(grid, books.emb.reshape(books.n_bits, -1), books.chscale.reshape(-1), books.inv_freq)
    assert books.ztab16 is not None
    q = torch.randn(1, 4, 32)
    exact = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp32", **tiling)
    half = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp16", **tiling)
    assert (half - exact).abs().max() <= 1e-5 * exact.abs().max()


@needs_interpreter
def test_fp16_key_sums_error_is_small_at_r21():
    """Random codebooks at R = 21 (2 bits at head_dim 128): the float16 sums move the output by under 1e-3 of its
    scale (each of the 21 adds rounds to float16: relative 2^-11 per add)."""
    kv, books = _coded(1, 1, 32, 21, n=64, nw=0, nbits=32, fp16_theta=True)
    q = torch.randn(1, 2, 32)
    tiling = dict(block_t=16, target_programs=4, values_block_t=16, score_programs=4)
    exact = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp32", **tiling)
    half = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp16", **tiling)
    err = (half - exact).abs().max() / exact.abs().max()
    assert 0 < err <= 1e-3


@needs_interpreter
@pytest.mark.parametrize("design", ["direct", "lut"])
def test_key_score_designs_equal_reference(design):
    """Both key-side designs (direct gathers of theta; the reference's per-query-head LUTs): tolerance 1e-5 relative."""
    from pressroom.kernels.commvq_attention import key_scores, key_scores_reference

    kv, books = _coded(1, 2, 16, 3, n=50, nw=0, nbits=32, per_head_pos=True)
    q = torch.randn(1, 6, 16)
    ref = key_scores_reference(q, kv, books)
    out = key_scores(q, kv, books, design=design, use_triton=True, block_t=16)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ the cache
def test_window_only_equals_full_cache(tiny):
    """While every token is still in the full-precision window, the cache is exactly the model's own cache."""
    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 12))
    cache = CommVQCache(model.config, books, window=64, flush_chunk=16)
    full = DynamicCache()
    with torch.no_grad():
        a = model(ids, past_key_values=cache).logits
        b = model(ids, past_key_values=full).logits
        assert torch.allclose(a, b, atol=1e-5)
        for t in range(3):
            nxt = torch.tensor([[7 + t]])
            a = model(nxt, past_key_values=cache).logits
            b = model(nxt, past_key_values=full).logits
            assert torch.allclose(a, b, atol=1e-4)
    assert cache.layers[0].n == 0 and cache.layers[0].nw == 15


def test_flush_at_chunk_boundary_and_memory_bytes(tiny):
    model, _ = tiny
    books = random_books(model.config, residuals=3, bits=1)
    cache = CommVQCache(model.config, books, window=8, flush_chunk=4, mode="dequantize", n_sink=0)
    layer = cache.layers[0]
    with torch.no_grad():
        model(torch.randint(5, 1000, (1, 6)), past_key_values=cache)
        assert (layer.n, layer.nw) == (0, 6)
        states = []
        for t in range(8):
            model(torch.tensor([[11 + t]]), past_key_values=cache)
            states.append((layer.n, layer.nw))
    # 7, 8 tokens fit; the 9th flushes the oldest 4 (one chunk); 13th again
    assert states == [(0, 7), (0, 8), (4, 5), (4, 6), (4, 7), (4, 8), (8, 5), (8, 6)]
    layers, heads, head_dim = model_kv_shape(model.config)
    cache.reserve(layer.cap)  # no-op; capacity is what is held
    cap = layer.cap
    per_layer = (
        heads * cap * code_bytes(3)  # key codes
        + cap * heads * head_dim * 1 // 8  # value bits (1 bit per element)
        + cap * (2 + 2 + 4)  # norm, value coefficient (float16), position (int32)
        + 2 * heads * 8 * head_dim * 4  # window keys + values (float32 model)
        + 8 * 4  # window positions
    )
    assert cache.memory_bytes() == layers * per_layer


def test_value_refine_lowers_every_tokens_error():
    """``ValueCodec.refine``: 0 steps keeps the bits and gives the least-squares coefficient; each token's error with
    the refined bits is never above its error with the encoder's bits, and lower on average."""
    torch.manual_seed(0)
    codec = ValueCodec(48, 2).eval()
    codec.scale.copy_(torch.rand(48) + 0.5)
    v = torch.randn(300, 48) * codec.scale
    bits, _ = codec.encode(v)
    e = codec.channel_embedding()

    def err(b, c):
        return ((v - c * (b.float() @ e)) ** 2).sum(-1)

    same, coef0 = codec.refine(v, bits, 0)
    assert torch.equal(same, bits) and same.dtype == torch.uint8
    torch.testing.assert_close(coef0, codec.least_squares_coef(v, bits))
    for steps in (1, 16):  # also after one step: tokens that start with <v, y> < 0 (negative coefficient) included
        refined, coef = codec.refine(v, bits, steps)
        assert refined.shape == bits.shape and coef.shape == (300, 1)
        assert ((refined != bits).sum(-1) <= steps).all()
        assert (err(refined, coef) <= err(bits, coef0) * (1 + 1e-5)).all()
    assert (coef0 < 0).any()
    assert err(refined, coef).mean() < 0.9 * err(bits, coef0).mean()
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        codec.refine(v, bits, -1)
    with pytest.raises(ValueError, match="bits must be"):
        codec.refine(v, bits[:, :-8], 4)
    with pytest.raises(ValueError, match="bits must be 0 or 1"):
        codec.refine(v, bits * 2, 4)


@needs_interpreter
@pytest.mark.parametrize("rope_trig", ["fast", "libdevice"])
def test_rope_trig_at_long_context_positions(rope_trig):
    """Positions up to about 1.5M (angles past 1e6 rad for the highest frequency): both trig paths equal the float32
    reference (2e-3 of the output scale, as the other decode tests)."""
    kv, books = _coded(1, 2, 32, 3, n=48, nw=4, nbits=2 * 2 * 32)
    kv.pos[:, :48] = torch.randint(1_000_000, 1_500_000, (48,), dtype=torch.int32).sort().values
    kv.wpos[:] = torch.arange(1_500_000, 1_500_008, dtype=torch.int32)
    q = torch.randn(1, 4, 32)
    ref = decode_attention_reference(q, kv, books, 0.3)
    tiling = dict(block_t=16, target_programs=4, values_block_t=16, score_programs=4)
    out = decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp32", rope_trig=rope_trig, **tiling)
    assert (out - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
@pytest.mark.parametrize(("n_bits", "feat", "steps"), [(48, 24, 40), (384, 192, 300), (64, 32, 0)])
def test_refine_kernel_equals_reference(n_bits, feat, steps):
    """The Triton refine kernel runs the reference's float32 updates in the same order: the same bits and the same
    coefficient (1e-6 relative), on bit counts that are and are not powers of two, with tail blocks of tokens."""
    from pressroom.kernels.commvq_refine import refine_value_bits, refine_value_bits_reference

    torch.manual_seed(n_bits)
    emb = torch.randn(n_bits, feat) * 0.3
    x = torch.randn(37, feat)
    bits = torch.randint(0, 2, (37, n_bits), dtype=torch.uint8)
    ref_bits, ref_coef = refine_value_bits_reference(x, bits, emb, steps)
    out_bits, out_coef = refine_value_bits(x, bits, emb, steps, use_triton=True)
    assert out_bits.dtype == torch.uint8 and out_coef.shape == (37, 1)
    assert torch.equal(out_bits, ref_bits)
    torch.testing.assert_close(out_coef, ref_coef, rtol=1e-6, atol=1e-7)
    if steps:
        assert (ref_bits != bits).any()


def test_value_refine_in_the_cache(tiny):
    """``value_refine=0`` stores the reference's coding (values equal ``codec.decode(*codec.encode(v))`` up to the
    float16 coefficient); the default refinement codes the same prompt with a lower value error; bad values raise."""
    model, _ = tiny
    books = random_books(model.config, residuals=3, bits=2)
    ids = torch.randint(5, 1000, (1, 40))
    with torch.no_grad():
        plain = DynamicCache()
        model(ids, past_key_values=plain)
        errors = {}
        for steps in (0, 64):
            cache = CommVQCache(model.config, books, window=8, mode="dequantize", n_sink=0, value_refine=steps)
            model(ids, past_key_values=cache)
            layer = cache.layers[1]
            v = plain.layers[1].values[:, :, : layer.n].transpose(1, 2).flatten(2)  # the coded tokens
            got = layer.values[:, :, : layer.n].transpose(1, 2).flatten(2)
            errors[steps] = float(((got - v) ** 2).sum())
            if steps == 0:
                codec = books.values[1]
                torch.testing.assert_close(got, codec.decode(*codec.encode(v)), rtol=2e-3, atol=2e-3)
    assert errors[64] < errors[0]
    if INTERPRET:  # use_triton=True: the refine kernel codes the same bits as the PyTorch path
        kernel = CommVQCache(model.config, books, window=8, mode="dequantize", n_sink=0, use_triton=True)
        torch_path = CommVQCache(model.config, books, window=8, mode="dequantize", n_sink=0, use_triton=False)
        with torch.no_grad():
            model(ids, past_key_values=kernel)
            model(ids, past_key_values=torch_path)
        assert torch.equal(kernel.layers[1].vbits, torch_path.layers[1].vbits)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="value_refine must be an int"):
            CommVQCache(model.config, books, value_refine=bad)
        with pytest.raises(ValueError, match="value_refine must be an int"):
            CommVQPress(codebooks=books, value_refine=bad)


def _weighted_greedy_codes(x: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Brute force: per step, the center of all 4096 minimizing ``sum_p w_p |r_p - c_p|^2`` (``x [n, D]``)."""
    res, codes = x.clone(), []
    w = weights.repeat_interleave(2)
    for step in centers_from_theta(theta):  # [R, 4096, D]
        code = (((res[:, None, :] - step[None]) ** 2) * w).sum(-1).argmin(-1)
        res -= step[code]
        codes.append(code)
    return torch.stack(codes, -1)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_weighted_key_search_in_the_cache(tiny, use_triton):
    """Codebooks with ``key_pair_weights``: the cache codes each key by the greedy search under the weighted distance
    (brute force over all centers, unscaled theta), on the reference and the kernel path; equal weights give the
    Euclidean codes; weights that do not fit the layer raise."""
    model, _ = tiny
    plain = random_books(model.config, residuals=3, bits=2)
    layers, heads, head_dim = model_kv_shape(model.config)
    torch.manual_seed(1)
    weights = torch.rand(layers, heads, head_dim // 2) * 4 + 0.05
    fields = ("random", 2, 3, head_dim, layers, heads, plain.key_theta)
    weighted = CommVQCodebooks(*fields, values=plain.values, key_pair_weights=weights)
    uniform = CommVQCodebooks(*fields, values=plain.values, key_pair_weights=torch.full_like(weights, 3.0))
    keys = torch.randn(1, heads, 24, head_dim) * torch.linspace(0.2, 2.0, head_dim)
    values, pos = torch.randn(1, heads, 24, head_dim), torch.arange(100, 124)
    codes = {}
    for name, books in (("plain", plain), ("weighted", weighted), ("uniform", uniform)):
        cache = CommVQCache(model.config, books, window=4, n_sink=0, use_triton=use_triton)
        with torch.no_grad():
            model(torch.randint(5, 1000, (1, 6)), past_key_values=cache)
        layer = cache.layers[1]
        start = layer.n
        layer.append_prerope(keys, values, pos)
        codes[name] = unpack_codes12(layer.codes[0, :, start : layer.n], 3)  # [H, 24, R]
        # the encoder's scaled tables are constants: a DynamicCache holding these layers (what CommVQPress makes)
        # is measured by its KV state alone, as the cache reports it
        holder = DynamicCache()
        holder.layers = list(cache.layers)
        assert cache_memory_bytes(holder) == cache.memory_bytes()
    x, _ = normalize_keys(keys)  # [1, 24, H, D], interleaved
    for h in range(heads):
        want = _weighted_greedy_codes(x[0, :, h], plain.key_theta[1, h], weights[1, h])
        assert torch.equal(codes["weighted"][h].long(), want)
    assert torch.equal(codes["uniform"], codes["plain"]) and not torch.equal(codes["weighted"], codes["plain"])
    with pytest.raises(ValueError, match="pair_weights must be"):
        CommVQLayer(plain.key_theta[0], plain.values[0], torch.ones(head_dim // 2), pair_weights=weights[0, :, :4])
    with pytest.raises(ValueError, match="finite and positive"):
        CommVQLayer(plain.key_theta[0], plain.values[0], torch.ones(head_dim // 2), pair_weights=-weights[0])


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
@pytest.mark.parametrize("precision", ["tf32", "half"])
def test_tf32_cache_codes_keys_with_float16_sums(tiny, use_triton, precision):
    """encode_precision="tf32" / "half": the cache codes keys by the split search with float16 sums on both paths
    (the kernel under the interpreter, its PyTorch reference off Triton; "half" with float16 dot operands), also
    under a weighted search, whose scaled keys stay inside the float16 range check; values are coded too."""
    from pressroom.kernels.commvq_codebook import search_operands
    from pressroom.kernels.commvq_encode import encode_keys_split_h2_reference

    model, _ = tiny
    plain = random_books(model.config, residuals=2, bits=1)
    layers, heads, head_dim = model_kv_shape(model.config)
    weights = torch.rand(layers, heads, head_dim // 2, generator=torch.Generator().manual_seed(2)) * 4 + 0.05
    weighted = CommVQCodebooks(
        "random", 1, 2, head_dim, layers, heads, plain.key_theta, values=plain.values, key_pair_weights=weights
    )
    torch.manual_seed(3)
    keys, values, pos = torch.randn(1, heads, 20, head_dim), torch.randn(1, heads, 20, head_dim), torch.arange(20)
    x, _ = normalize_keys(keys)
    for books, pw in ((plain, None), (weighted, weights[1])):
        cache = CommVQCache(model.config, books, window=4, n_sink=0, use_triton=use_triton, encode_precision=precision)
        with torch.no_grad():
            model(torch.randint(5, 1000, (1, 6)), past_key_values=cache)
        layer = cache.layers[1]
        start = layer.n
        layer.append_prerope(keys, values, pos)
        xs, theta = search_operands(x[0], plain.key_theta[1], pw)
        dot = torch.float16 if precision == "half" else None
        want = encode_keys_split_h2_reference(xs, theta, dot_dtype=dot)  # [20, H, bytes]
        assert torch.equal(layer.codes[0, :, start : layer.n], want.transpose(0, 1))
        assert torch.isfinite(layer.vcoef[0, start : layer.n].float()).all()


def test_sink_tokens_stay_in_full_precision(tiny):
    """n_sink: the first tokens never leave the window; the recent part flushes as without sinks."""
    model, _ = tiny
    books = random_books(model.config, residuals=3, bits=1)
    ids = torch.randint(5, 1000, (1, 30))
    cache = CommVQCache(model.config, books, window=8, flush_chunk=4, mode="dequantize", n_sink=3)
    plain = CommVQCache(model.config, books, window=8, flush_chunk=4, mode="dequantize", n_sink=0)
    full = DynamicCache()
    layer = cache.layers[0]
    with torch.no_grad():
        model(ids[:, :14], past_key_values=cache)
        model(ids[:, :14], past_key_values=plain)
        model(ids[:, :14], past_key_values=full)
        for t in range(14, 30):
            model(ids[:, t : t + 1], past_key_values=cache)
            model(ids[:, t : t + 1], past_key_values=plain)
            model(ids[:, t : t + 1], past_key_values=full)
    assert layer.nsink == 3 and layer.wpos[0, :3].tolist() == [0, 1, 2]
    assert layer.n + layer.nw == 30 and layer.nw - 3 <= 8 and layer.n == plain.layers[0].n - 4
    assert sorted(layer.pos[0, : layer.n].tolist()) == list(range(3, 3 + layer.n))
    # the sinks' keys and values are the model's own (full precision)
    keys, values = layer._dequantized()
    sink_at = layer.n  # dequantized order: coded tokens, then the window (sinks first)
    assert torch.allclose(values[:, :, sink_at : sink_at + 3], full.layers[0].values[:, :, :3], atol=1e-6)
    assert torch.allclose(keys[:, :, sink_at : sink_at + 3], full.layers[0].keys[:, :, :3], atol=1e-5)
    # memory: the window buffers hold window + n_sink tokens
    assert cache.memory_bytes() - plain.memory_bytes() >= 0
    with pytest.raises(ValueError, match="n_sink"):
        CommVQCache(model.config, books, n_sink=-1)
    with pytest.raises(ValueError, match="n_sink"):
        CommVQPress(codebooks=books, bits=1, n_sink=1.5)


@pytest.mark.parametrize("use_triton", [None, pytest.param(True, marks=needs_interpreter)])
def test_codes_mode_equals_dequantized_mode(tiny, use_triton):
    """Attention straight from the codes (wrapped sdpa) == the model's attention over dequantized keys/values; with
    ``use_triton=True`` the decode steps run the Triton kernels at their defaults (the values by bit planes, the
    merge in split tiles), whose float16 probabilities on the value side leave a small difference."""
    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 20))
    logits = {}
    for mode in ("codes", "dequantize"):
        kw = {"use_triton": use_triton} if mode == "codes" and use_triton else {}
        cache = CommVQCache(model.config, books, window=8, flush_chunk=4, mode=mode, **kw)
        out = []
        with torch.no_grad():
            out.append(model(ids[:, :14], past_key_values=cache).logits)
            out.append(model(ids[:, 14:17], past_key_values=cache).logits)  # a chunk after codes exist
            for t in range(17, 20):
                out.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
        logits[mode] = torch.cat(out, dim=1)
        assert cache.layers[0].n > 0
    tol = 2e-3 if use_triton else 1e-5
    assert torch.allclose(logits["codes"], logits["dequantize"], atol=tol, rtol=tol)


def test_generate_on_tiny_models(tiny_model):
    model, _ = tiny_model
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 24))
    cache = CommVQCache(model.config, books, window=8, flush_chunk=4)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6, do_sample=False
    )
    assert out.shape[1] == 30
    assert cache.get_seq_length() == 29
    assert cache.layers[0].n + cache.layers[0].nw == 29 and cache.layers[0].n >= 16


# ------------------------------------------------------------------------------------------------ the press
def test_press_in_model_generate(tiny):
    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 40))
    cache = DynamicCache()
    with CommVQPress(codebooks=books, window=16)(model):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5, do_sample=False
        )
    assert out.shape[1] == 45
    layer = cache.layers[0]
    assert isinstance(layer, CommVQLayer) and layer.n > 0 and layer.n + layer.nw == 44


def _pipe(tiny):
    model, tokenizer = tiny
    return KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)


def test_press_in_pipeline_with_several_questions(tiny, tmp_path):
    model, _ = tiny
    books = random_books(model.config)
    books.save_native(tmp_path / "books")
    press = CommVQPress(codebooks=str(tmp_path / "books"), bits=2, window=16, flush_chunk=8)
    pipe = _pipe(tiny)
    context = "The quick brown fox jumps over the lazy dog. " * 8
    questions = ["What jumps?", "Who is lazy?"]
    both = pipe(context, questions=questions, press=press, max_new_tokens=5)["answers"]
    single = [pipe(context, question=q, press=press, max_new_tokens=5)["answer"] for q in questions]
    assert both == single


def test_press_with_commvq_cache_in_pipeline(tiny):
    """cache=CommVQCache(...): the context is coded while it is prefilled (chunk path), the press only marks."""
    model, _ = tiny
    books = random_books(model.config)
    pipe = _pipe(tiny)
    context = "A red cat sat on a blue mat near the old door. " * 6
    press = CommVQPress(codebooks=books, window=16)
    cache = CommVQCache(model.config, books, window=16)
    both = pipe(context, questions=["Where?", "Who?"], press=press, cache=cache, max_new_tokens=4)["answers"]
    assert len(both) == 2 and cache.layers[0].n > 0
    seen = cache.get_seq_length()
    again = pipe(
        context, question="Who?", press=press, cache=CommVQCache(model.config, books, window=16), max_new_tokens=4
    )["answer"]
    assert again == both[1] and cache.get_seq_length() == seen  # restored to the context after each answer


def test_press_composed_with_snapkv(tiny):
    model, _ = tiny
    books = random_books(model.config)
    seen = {}

    class Spy(CommVQPress):
        def forward_hook(self, module, input, kwargs, output):
            out = super().forward_hook(module, input, kwargs, output)
            layer = kwargs["past_key_values"].layers[module.layer_idx]
            if isinstance(layer, CommVQLayer):
                seen[module.layer_idx] = (layer.n, layer.per_head_pos, kwargs["hidden_states"].shape[1])
            return out

    press = ComposedPress([SnapKVPress(compression_ratio=0.5), Spy(codebooks=books, window=16)])
    context = "One two three four five six seven eight nine ten. " * 6
    answer = _pipe(tiny)(context, question="Count?", press=press, max_new_tokens=4)["answer"]
    assert isinstance(answer, str)
    n, per_head, q_len = seen[0]
    assert per_head and n == int(q_len * (1 - 0.5))  # what SnapKV kept, all of it coded with per-head positions


def test_kept_indices_recovers_per_head_selection():
    torch.manual_seed(0)
    full = torch.randn(2, 3, 50, 16)
    idx = torch.stack([torch.stack([torch.randperm(50)[:20].sort().values for _ in range(3)]) for _ in range(2)])
    kept = full.gather(2, idx[..., None].expand(-1, -1, -1, 16))
    assert torch.equal(kept_indices(full, kept), idx)
    with pytest.raises(ValueError, match="positions"):
        kept_indices(full, kept + 1.0)


def test_wrong_codebooks_raise(tiny, tmp_path):
    model, _ = tiny
    cfg = model.config
    with pytest.raises(ValueError, match="needs codebooks"):
        CommVQPress()
    with pytest.raises(ValueError, match="bits must be 1 or 2"):
        CommVQPress(codebooks="x", bits=3)
    with pytest.raises(FileNotFoundError):
        CommVQCache(cfg, str(tmp_path / "missing"))
    wrong = random_books(cfg)
    wrong.num_layers += 1
    wrong.key_theta = torch.cat((wrong.key_theta, wrong.key_theta[:1]))
    wrong.values = wrong.values + wrong.values[:1]
    with pytest.raises(ValueError, match="layers"):
        CommVQCache(cfg, wrong)
    with pytest.raises(ValueError, match="keys only"):
        CommVQCache(cfg, random_books(cfg, values=False))
    with pytest.raises(ValueError, match="1-bit"):
        CommVQCache(cfg, random_books(cfg, bits=1), bits=2)
    with pytest.raises(ValueError, match="encode_precision must be one of"):
        CommVQPress(codebooks="x", encode_precision="bf16")
    with pytest.raises(ValueError, match="encode_precision must be one of"):
        CommVQCache(cfg, random_books(cfg), encode_precision="fp8")
    assert CommVQCache(cfg, random_books(cfg), encode_precision="tf32").layers[0].encode_precision == "tf32"
    press = CommVQPress(codebooks=wrong, window=16)
    with pytest.raises(ValueError, match="do not fit"):
        _pipe(tiny)("Some context here.", question="Q?", press=press, max_new_tokens=2)


@needs_interpreter
def test_fused_merge_over_many_splits_equals_the_separate_merge():
    """38 splits: the fused merge reads them 32 at a time (two chunks, the second partial) plus the window; the
    separate merge adds them 16 at a time by default (the third step partial), one at a time with
    reduce_split_tile=1: the same to float32 rounding."""
    torch.manual_seed(5)
    kv, books = _coded(2, 2, 16, 2, n=600, nw=7, nbits=2 * 2 * 16)
    q = torch.randn(2, 6, 16)
    tiling = dict(use_triton=True, block_t=16, values_block_t=16, target_programs=128, score_programs=8)
    ref = decode_attention_reference(q, kv, books, 0.3)
    fused = decode_attention(q, kv, books, 0.3, merge="fused", **tiling)
    separate = decode_attention(q, kv, books, 0.3, **tiling)
    assert (fused - separate).abs().max() <= 1e-5 * ref.abs().max()
    assert (fused - ref).abs().max() <= 2e-3 * ref.abs().max()
    one_by_one = decode_attention(q, kv, books, 0.3, reduce_split_tile=1, **tiling)
    assert (one_by_one - separate).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(ValueError, match="reduce_split_tile must be a power of two from 1 to 64"):
        decode_attention(q, kv, books, 0.3, reduce_split_tile=12, **tiling)


@needs_interpreter
@pytest.mark.parametrize(
    ("pair_parts", "pair_chunks", "prefetch"),
    [(2, 1, False), (4, 1, False), (1, 2, False), (1, 4, False), (2, 2, False), (1, 1, True), (1, 4, True)],
)
def test_decode_pair_parts_equal_one_sweep(pair_parts, pair_chunks, prefetch):
    """RoPE pairs split in sweeps (pair_parts) and / or tiles (pair_chunks) at head_dim 64 (32 pairs: tiles of 16
    scored with tensor-core dots, tiles of 8 without): the same attention as one sweep over one tile of all pairs, to
    float32 rounding of the partial sums; with key_prefetch (gathers one residual step ahead; R=3, odd), the same."""
    kv, books = _coded(1, 2, 64, 3, n=150, nw=3, nbits=2 * 64, fp16_theta=True)
    q = torch.randn(1, 4, 64)
    tiling = dict(block_t=32, target_programs=4, score_programs=4, values_block_t=16)
    ref = decode_attention_reference(q, kv, books, 0.3)
    one = decode_attention(q, kv, books, 0.3, use_triton=True, pair_parts=1, **tiling)
    split = decode_attention(
        q, kv, books, 0.3, use_triton=True, pair_parts=pair_parts, pair_chunks=pair_chunks, key_prefetch=prefetch,
        **tiling,
    )  # fmt: skip
    assert (split - one).abs().max() <= 1e-4 * ref.abs().max()
    assert (split - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
@pytest.mark.parametrize(("residuals", "pair_parts"), [(3, 2), (4, 2), (3, 1)])
def test_decode_code_prefetch_is_the_same_arithmetic(residuals, pair_parts):
    """Code bytes loaded one residual pair ahead change when loads are issued, not what is summed: the output bit for
    bit of the in-order loads, with an odd and an even number of residuals, one and two sweeps of the pairs and 5
    blocks per program (the last one masked)."""
    kv, books = _coded(1, 2, 64, residuals, n=150, nw=3, nbits=2 * 64, fp16_theta=True)
    q = torch.randn(1, 4, 64)
    tiling = dict(block_t=32, target_programs=4, score_programs=2, values_block_t=16, pair_parts=pair_parts)
    ahead = decode_attention(q, kv, books, 0.3, use_triton=True, code_prefetch=True, **tiling)
    in_order = decode_attention(q, kv, books, 0.3, use_triton=True, code_prefetch=False, **tiling)
    assert torch.equal(ahead, in_order)
    ref = decode_attention_reference(q, kv, books, 0.3)
    assert (ahead - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
@pytest.mark.parametrize("pair_parts", [2, 4])
def test_decode_pair_order_blocks_equals_sweeps(pair_parts):
    """All parts of a block's pairs before the next block (partial scores in registers) against one sweep of the
    token range per part (partial scores through memory): the same sums, bit for bit; and the option's limits."""
    kv, books = _coded(1, 2, 64, 3, n=150, nw=3, nbits=2 * 64, fp16_theta=True)
    q = torch.randn(1, 4, 64)
    tiling = dict(block_t=32, target_programs=4, score_programs=2, values_block_t=16, pair_parts=pair_parts)
    blocks = decode_attention(q, kv, books, 0.3, use_triton=True, pair_order="blocks", **tiling)
    sweeps = decode_attention(q, kv, books, 0.3, use_triton=True, pair_order="sweeps", **tiling)
    assert torch.equal(blocks, sweeps)
    # "blocks" is the default where it applies, "sweeps" elsewhere
    assert torch.equal(decode_attention(q, kv, books, 0.3, use_triton=True, **tiling), blocks)
    assert resolve_pair_order(None) == "blocks" and resolve_pair_order("sweeps") == "sweeps"
    for other in (dict(design="fused"), dict(pair_chunks=2), dict(key_prefetch=True), dict(key_parts=2)):
        assert resolve_pair_order(None, **other) == "sweeps"
    ref = decode_attention_reference(q, kv, books, 0.3)
    assert (blocks - ref).abs().max() <= 2e-3 * ref.abs().max()
    # batch 2, per-head positions (after per-head eviction), an even residual count
    kv2, books2 = _coded(2, 2, 64, 4, n=70, nw=2, nbits=2 * 64, per_head_pos=True, fp16_theta=True, seed=3)
    q2 = torch.randn(2, 4, 64)
    blocks2 = decode_attention(q2, kv2, books2, 0.3, use_triton=True, pair_order="blocks", **tiling)
    sweeps2 = decode_attention(q2, kv2, books2, 0.3, use_triton=True, pair_order="sweeps", **tiling)
    assert torch.equal(blocks2, sweeps2)
    with pytest.raises(ValueError, match="pair_order must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_order="tokens", **tiling)
    with pytest.raises(ValueError, match="pair_order='blocks' needs pair_chunks=1"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_order="blocks", key_prefetch=True, **tiling)
    with pytest.raises(ValueError, match="pair_order='blocks' needs pair_chunks=1"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_order="blocks", pair_chunks=2, **tiling)
    with pytest.raises(ValueError, match="pair_order='blocks' is a setting of design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, design="fused", pair_order="blocks")


@needs_interpreter
def test_decode_value_product_dense_equals_einsum():
    """The value codebook product as one dense matmul (each query head keeping its KV head's block) after a merge in
    several bit chunks, batch 2, 2 KV heads of 3 query heads: the per-head product, to float32 rounding."""
    kv, books = _coded(2, 2, 16, 2, n=40, nw=3, nbits=2 * 2 * 16)
    q = torch.randn(2, 6, 16)
    tiling = dict(block_t=16, target_programs=4, score_programs=4, values_block_t=16)
    per_head = decode_attention(q, kv, books, 0.3, use_triton=True, **tiling)
    dense = decode_attention(
        q, kv, books, 0.3, use_triton=True, value_product="dense", reduce_nb_chunk=16, **tiling
    )  # the merge in chunks of 16 of the 64 bits
    assert (dense - per_head).abs().max() <= 1e-5 * per_head.abs().max()
    ref = decode_attention_reference(q, kv, books, 0.3)
    assert (dense - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
def test_decode_value_bits_join_equals_reshape():
    """The values kernel's two bit expansions build the same float16 0/1 operand: the same output bit for bit, in
    two chunks of 32 of the 64 value bits and blocks of 16 tokens (the last one partly masked)."""
    kv, books = _coded(2, 2, 16, 2, n=40, nw=3, nbits=2 * 2 * 16)
    q = torch.randn(2, 6, 16)
    tiling = dict(block_t=16, target_programs=4, score_programs=4, values_block_t=16, nb_chunk=32)
    join = decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="join", **tiling)
    reshape = decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="reshape", **tiling)
    assert torch.equal(join, reshape)
    ref = decode_attention_reference(q, kv, books, 0.3)
    assert (join - ref).abs().max() <= 2e-3 * ref.abs().max()


@needs_interpreter
def test_decode_value_bits_planes_equals_reshape():
    """The bit-plane values kernel (the default: one accumulator per bit position of a byte, the 8 written back
    together to the byte's 8 columns) gives the reshape expansion's output: 320 value bits in three chunks of 128 (the
    last one partly masked), blocks of 16 tokens; and its chunks must hold 16 bytes."""
    kv, books = _coded(2, 2, 16, 2, n=40, nw=3, nbits=320)
    q = torch.randn(2, 6, 16)
    tiling = dict(block_t=16, target_programs=4, score_programs=4, values_block_t=16, nb_chunk=128)
    planes = decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="planes", values_prefetch=False, **tiling)
    reshape = decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="reshape", **tiling)
    assert torch.equal(planes, reshape)  # the same operand and sums at the same tiling
    ref = decode_attention_reference(q, kv, books, 0.3)
    assert (planes - ref).abs().max() <= 2e-3 * ref.abs().max()
    prefetch = decode_attention(
        q, kv, books, 0.3, use_triton=True, value_bits="planes", values_prefetch=True, **tiling
    )  # the next block's loads issued before this block's math: the same sums in the same order
    assert torch.equal(prefetch, planes)
    default = decode_attention(q, kv, books, 0.3, use_triton=True, **tiling)  # planes, prefetch on
    assert torch.equal(default, prefetch)
    with pytest.raises(ValueError, match="values_prefetch=True is implemented for value_bits='planes' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="reshape", values_prefetch=True, **tiling)
    with pytest.raises(ValueError, match="value_bits='planes' needs nb_chunk >= 128"):
        decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="planes", **dict(tiling, nb_chunk=64))


def test_auto_carveout_keeps_the_register_occupancy_with_the_least_shared_memory():
    """The scores kernel's default tiling on sm_90 (61 registers, 20 KB, 8 warps): registers allow 4 programs an SM,
    so the carveout must hold 4 x (20 KB + the system's 1 KB) of the SM's 228 KB, and no more than the next
    supported size above it (100 KB) is asked for."""
    sm_shared = 233472
    pct = auto_carveout(61, 20480, 8, 65536, sm_shared)
    assert 4 * (20480 + 1024) <= pct * sm_shared / 100 <= 100 * 1024
    assert pct == 37
    # 255 registers x 8 warps fill the register file with one program: its shared memory only
    assert auto_carveout(255, 82944, 8) == 36
    # 4 warps of 56 registers: 9 programs by registers, 9 x 13 KB
    assert auto_carveout(56, 12288, 4) == 52
    # more shared memory than the SM has: capped at 100
    assert auto_carveout(32, 100000, 4) == 100


def test_set_carveout_asks_the_driver_once_per_value(monkeypatch):
    """set_carveout with a stand-in for libcuda: "auto" resolves from the kernel's registers and shared memory and
    the SM's limits (read once per device), a repeated value is not set again, None resets to the driver's default
    (-1), and a driver error is raised."""
    import ctypes
    from types import SimpleNamespace

    from pressroom.kernels import commvq_attention as att

    limits = {82: 65536, 81: 233472, 39: 2048, 106: 32}
    calls = []

    class FakeCuda:
        err = 0

        def cuFuncSetAttribute(self, fn, attribute, value):  # noqa: N802 (the driver's name)
            calls.append((fn.value, attribute.value, value.value))
            return self.err

        def cuDeviceGetAttribute(self, out, attribute, device):  # noqa: N802
            calls.append(("device", attribute.value, device.value))
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = limits[attribute.value]
            return 0

    fake = FakeCuda()
    monkeypatch.setattr(att, "_libcuda", lambda: fake)
    monkeypatch.setattr(att, "triton_interpreted", lambda: False)
    monkeypatch.setattr(att, "_carveouts", {})
    monkeypatch.setattr(att, "_sm_limits", {})
    kernel = SimpleNamespace(function=1234, n_regs=61, metadata=SimpleNamespace(shared=20480, num_warps=8))
    att.set_carveout(kernel, "auto", 0)
    assert [c for c in calls if c[0] == 1234] == [(1234, 9, 37)]
    assert sorted(c[1] for c in calls if c[0] == "device") == [39, 81, 82, 106]
    calls.clear()
    att.set_carveout(kernel, "auto", 0)  # cached: neither the device nor the kernel asked again
    att.set_carveout(kernel, 37, 0)
    assert calls == []
    att.set_carveout(kernel, None, 0)
    att.set_carveout(kernel, None, 0)
    att.set_carveout(kernel, 30, 0)
    assert calls == [(1234, 9, -1), (1234, 9, 30)]
    att.set_carveout(SimpleNamespace(function=None), 30)  # not loaded yet: nothing to set
    fake.err = 1
    with pytest.raises(RuntimeError, match="PREFERRED_SHARED_MEMORY_CARVEOUT=0"):
        att.set_carveout(kernel, 0, 0)


def test_decode_scores_carveout_is_validated():
    kv, books = _coded(1, 2, 16, 2, n=8, nw=2, nbits=2 * 2 * 16)
    q = torch.randn(1, 4, 16)
    for bad in (101, -1, "max", True, 37.5):
        with pytest.raises(ValueError, match="scores_carveout must be 'auto', None"):
            decode_attention(q, kv, books, 0.3, scores_carveout=bad)
    with pytest.raises(ValueError, match="scores_carveout is a setting of design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, design="fused", scores_carveout=30)
    for bad in (8, 256, "48", True):
        with pytest.raises(ValueError, match="scores_maxnreg must be None or a register count from 16 to 255"):
            decode_attention(q, kv, books, 0.3, scores_maxnreg=bad)
    with pytest.raises(ValueError, match="scores_maxnreg is a setting of design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, design="fused", scores_maxnreg=48)
    for bad in (12, 0, 128, True, 16.0):  # checked on every path, before any launch
        with pytest.raises(ValueError, match="reduce_split_tile must be a power of two from 1 to 64"):
            decode_attention(q, kv, books, 0.3, reduce_split_tile=bad)
    with pytest.raises(ValueError, match="code_prefetch=True is implemented for design='two_pass' with"):
        decode_attention(q, kv, books, 0.3, design="fused", code_prefetch=True)
    with pytest.raises(ValueError, match="code_prefetch=True is implemented for design='two_pass' with"):
        decode_attention(q, kv, books, 0.3, code_prefetch=True, key_unroll=True)
    with pytest.raises(ValueError, match="values_block_t and values_warps must be >= 1"):
        decode_attention(q, kv, books, 0.3, values_block_t=0)
    for ok in ("auto", None, 0, 100):  # accepted (a hint to the driver; set_carveout is tested above)
        decode_attention(q, kv, books, 0.3, scores_carveout=ok)


def test_decode_key_gather_is_validated():
    kv, books = _coded(1, 2, 16, 2, n=8, nw=2, nbits=2 * 2 * 16)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="key_gather must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_gather="smem")
    with pytest.raises(ValueError, match="design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, design="fused", key_gather="table")
    with pytest.raises(ValueError, match="key_parts must be 1 or 2"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_parts=3)
    with pytest.raises(ValueError, match="needs key_parts=1"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_unroll=True, key_parts=2)
    with pytest.raises(ValueError, match="window_launch must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, window_launch="together")
    with pytest.raises(ValueError, match="pair_parts must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_parts=3)
    with pytest.raises(ValueError, match="it needs key_parts=1"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_parts=2, key_parts=2)
    with pytest.raises(ValueError, match="needs window_launch='separate'"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_parts=2, window_launch="shared")
    with pytest.raises(ValueError, match="does not divide the 12 RoPE pairs"):
        two_pass_meta(2, 2, 24, 2, 96, pair_parts=8)
    with pytest.raises(ValueError, match="power of two of pairs per tile, got 3"):
        two_pass_meta(2, 2, 24, 2, 96, pair_parts=4)
    with pytest.raises(ValueError, match="with key_prefetch must leave a power of two of pairs per tile, got 12"):
        two_pass_meta(2, 2, 24, 2, 96, key_prefetch=True)
    two_pass_meta(2, 2, 24, 2, 96)  # 12 pairs in one masked tile: the default path takes any head_dim
    with pytest.raises(ValueError, match="design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, design="fused", pair_parts=2)
    with pytest.raises(ValueError, match="reduce_nb_chunk must be a power of two >= 16"):
        decode_attention(q, kv, books, 0.3, use_triton=True, reduce_nb_chunk=24)
    with pytest.raises(ValueError, match="value_product must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, value_product="bmm")
    with pytest.raises(ValueError, match="value_bits must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, value_bits="shift")
    with pytest.raises(ValueError, match="pair_chunks must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_chunks=8)
    with pytest.raises(ValueError, match="pair_chunks > 1 is implemented for key_gather='global'"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_chunks=2, key_gather="table")
    with pytest.raises(ValueError, match="pair_chunks > 1 and key_prefetch=True sum the float16 table"):
        decode_attention(q, kv, books, 0.3, use_triton=True, pair_chunks=2, key_accum="fp32")
    with pytest.raises(ValueError, match="key_prefetch=True is implemented for key_gather='global'"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_prefetch=True, key_parts=2)
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        decode_attention(q, kv, books, 0.3, use_triton=True, block_t=24)
    with pytest.raises(ValueError, match="key_unroll=True is implemented for design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, design="fused", key_unroll=True)
    with pytest.raises(ValueError, match="merge must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, merge="atomic")
    with pytest.raises(ValueError, match="values_stages must be >= 1"):
        decode_attention(q, kv, books, 0.3, use_triton=True, values_stages=0)
    with pytest.raises(ValueError, match="design='two_pass' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, design="fused", values_stages=2)
    with pytest.raises(ValueError, match="key_accum must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="bf16")
    with pytest.raises(ValueError, match="rope_trig must be one of"):
        decode_attention(q, kv, books, 0.3, use_triton=True, rope_trig="approx")
    with pytest.raises(ValueError, match="needs codebooks exact in float16"):  # this theta is not
        decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp16")
    kv, books = _coded(1, 2, 16, 2, n=8, nw=2, nbits=2 * 2 * 16, fp16_theta=True)
    with pytest.raises(ValueError, match="key_gather='global' only"):
        decode_attention(q, kv, books, 0.3, use_triton=True, key_accum="fp16", key_gather="table")


def test_value_encoder_tf32_scope_restores_the_global_setting():
    from pressroom.presses.commvq_cache import _matmul_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    with _matmul_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RuntimeError), _matmul_tf32(True):
        raise RuntimeError("an error inside the block")
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with _matmul_tf32(False):
        assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("coded", ["keys", "values"])
def test_ablation_press_codes_one_side_only(tiny, coded):
    """CommVQAblationPress keeps one side exact and the other equal to the CommVQ layer's own reconstruction."""
    from pressroom.presses.commvq_ablation_press import CommVQAblationPress

    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 40))
    with torch.no_grad():
        plain = DynamicCache()
        model(ids, past_key_values=plain)
        coded_cache = DynamicCache()
        with CommVQPress(codebooks=books, window=8, n_sink=2)(model):
            model(ids, past_key_values=coded_cache)
        ablated = DynamicCache()
        with CommVQAblationPress(codebooks=books, window=8, n_sink=2, coded=coded)(model):
            model(ids, past_key_values=ablated)
    for i, layer in enumerate(ablated.layers):
        assert type(layer) is DynamicLayer
        exact = (plain.layers[i].keys, plain.layers[i].values)
        cl = coded_cache.layers[i]  # its tensors list the coded tokens, then the window slots (sinks first)
        order = torch.cat((cl.pos[0, : cl.n], cl.wpos[0, : cl.nw])).long().argsort()
        recon = (cl.keys[:, :, order], cl.values[:, :, order])
        side = 0 if coded == "keys" else 1
        got = (layer.keys, layer.values)
        assert torch.equal(got[1 - side], exact[1 - side])  # the other side is untouched
        assert torch.allclose(got[side].float(), recon[side].float(), atol=1e-5)  # the coded side is CommVQ's
        assert not torch.allclose(got[side].float(), exact[side].float(), atol=1e-3)  # ... and differs
        # sinks and the full-precision window are exact on the coded side too
        assert torch.allclose(got[side][:, :, :2].float(), exact[side][:, :, :2].float(), atol=1e-5)
        recent = cl.nw - cl.nsink  # the window after the prefill (flushed in chunks: at most 8)
        assert 0 < recent <= 8 and cl.nsink == 2
        assert torch.allclose(got[side][:, :, -recent:].float(), exact[side][:, :, -recent:].float(), atol=1e-5)
    with pytest.raises(ValueError, match="coded must be one of"):
        CommVQAblationPress(codebooks=books, coded="all")
    with pytest.raises(ValueError, match="layers must be layer indices"):
        CommVQAblationPress(codebooks=books, layers=(0, -1))


def test_ablation_press_codes_both_sides_of_the_chosen_layers(tiny):
    """coded="both" on some layers: those hold CommVQ's reconstruction of keys and values, the others stay exact."""
    from pressroom.presses.commvq_ablation_press import CommVQAblationPress

    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 40))
    with torch.no_grad():
        plain, everywhere, some = DynamicCache(), DynamicCache(), DynamicCache()
        model(ids, past_key_values=plain)
        with CommVQAblationPress(codebooks=books, window=8, n_sink=2, coded="both")(model):
            model(ids, past_key_values=everywhere)
        with CommVQAblationPress(codebooks=books, window=8, n_sink=2, coded="both", layers=(1,))(model):
            model(ids, past_key_values=some)
    for i in range(len(plain.layers)):
        want = everywhere.layers[i] if i == 1 else plain.layers[i]
        assert torch.equal(some.layers[i].keys, want.keys) and torch.equal(some.layers[i].values, want.values)
        differs = not torch.allclose(everywhere.layers[i].keys, plain.layers[i].keys, atol=1e-3)
        assert differs and not torch.allclose(everywhere.layers[i].values, plain.layers[i].values, atol=1e-3)


def test_ablation_press_in_pipeline_with_several_questions(tiny):
    from pressroom.presses import CommVQAblationPress

    model, _ = tiny
    press = CommVQAblationPress(codebooks=random_books(model.config), window=16, coded="values")
    pipe = _pipe(tiny)
    context = "The quick brown fox jumps over the lazy dog. " * 8
    questions = ["What jumps?", "Who is lazy?"]
    both = pipe(context, questions=questions, press=press, max_new_tokens=5)["answers"]
    assert both == [pipe(context, question=q, press=press, max_new_tokens=5)["answer"] for q in questions]


# ------------------------------------------------------------------------------------------------ exact layers
@pytest.mark.parametrize("exact", [0, 1])
def test_exact_layers_codes_mode_equals_dequantized_mode(tiny, exact):
    """A full-precision layer beside coded ones: its attention from the coded layers' window masks (codes mode:
    prefill, a chunk after codes exist, decode steps) equals the model's attention with full masks (dequantize
    mode); layer 0 exact also gives the masks' sizes from the coded layer."""
    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 20))
    logits, caches = {}, {}
    for mode in ("codes", "dequantize"):
        cache = CommVQCache(model.config, books, window=8, flush_chunk=4, mode=mode, exact_layers=exact)
        out = []
        with torch.no_grad():
            out.append(model(ids[:, :14], past_key_values=cache).logits)
            out.append(model(ids[:, 14:17], past_key_values=cache).logits)
            for t in range(17, 20):
                out.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
        logits[mode], caches[mode] = torch.cat(out, dim=1), cache
        assert isinstance(cache.layers[exact], ExactLayer) and isinstance(cache.layers[1 - exact], CommVQLayer)
        assert cache.layers[exact].get_seq_length() == 20 and cache.layers[1 - exact].n > 0
    assert torch.allclose(logits["codes"], logits["dequantize"], atol=1e-5, rtol=1e-5)
    plain = CommVQCache(model.config, books, window=8, flush_chunk=4)
    with torch.no_grad():
        model(ids[:, :14], past_key_values=plain)
        other = model(ids[:, 14:17], past_key_values=plain).logits
    assert not torch.allclose(other, logits["codes"][:, 14:17], atol=1e-3)  # the exact layer changed the outputs


def test_exact_layer_holds_the_models_keys_and_reports_its_bytes(tiny):
    model, _ = tiny
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 30))
    cache = CommVQCache(model.config, books, window=8, flush_chunk=4, exact_layers=(0,))
    dense = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=dense)
    exact = cache.layers[0]
    assert torch.equal(exact.keys, dense.layers[0].keys) and torch.equal(exact.values, dense.layers[0].values)
    cap = exact._k.shape[2]
    assert cap >= 30
    per_token = 2 * exact.keys.shape[1] * exact.keys.shape[-1] * exact.keys.element_size()
    assert exact.memory_bytes() == cap * per_token
    assert cache.memory_bytes() == exact.memory_bytes() + cache.layers[1].memory_bytes()
    assert cache_memory_bytes(cache) == cache.memory_bytes()


def test_exact_layers_in_the_pipeline_and_composed(tiny):
    """The press keeps the named layers in full precision: answers to several questions equal one-by-one answers
    (the exact layer restored after each), and with SnapKV in front the exact layer holds what SnapKV kept."""
    model, _ = tiny
    books = random_books(model.config)
    pipe = _pipe(tiny)
    context = "The quick brown fox jumps over the lazy dog. " * 8
    press = CommVQPress(codebooks=books, bits=2, window=16, flush_chunk=8, exact_layers="1")
    assert press.exact_layers == (1,)
    questions = ["What jumps?", "Who is lazy?"]
    both = pipe(context, questions=questions, press=press, max_new_tokens=5)["answers"]
    single = [pipe(context, question=q, press=press, max_new_tokens=5)["answer"] for q in questions]
    assert both == single
    seen = {}

    class Spy(CommVQPress):
        def forward_hook(self, module, input, kwargs, output):
            out = super().forward_hook(module, input, kwargs, output)
            seen[module.layer_idx] = (kwargs["past_key_values"].layers[module.layer_idx], kwargs["hidden_states"])
            return out

    composed = ComposedPress([SnapKVPress(compression_ratio=0.5), Spy(codebooks=books, window=16, exact_layers=1)])
    assert isinstance(_pipe(tiny)(context, question="Count?", press=composed, max_new_tokens=4)["answer"], str)
    layer, hidden = seen[1]
    assert isinstance(layer, ExactLayer) and layer._mark == int(hidden.shape[1] * 0.5)
    assert isinstance(seen[0][0], CommVQLayer)


def test_exact_layers_are_validated(tiny):
    model, _ = tiny
    books = random_books(model.config)
    assert check_exact_layers("1+0") == (0, 1) and check_exact_layers(None) == () and check_exact_layers([1, 1]) == (1,)
    for bad in (-1, 1.5, True, "a+b", ["1"]):
        with pytest.raises(ValueError, match="exact_layers"):
            check_exact_layers(bad)
    with pytest.raises(ValueError, match="out of range"):
        CommVQCache(model.config, books, exact_layers=2)
    with pytest.raises(ValueError, match="nothing would be coded"):
        CommVQCache(model.config, books, exact_layers=(0, 1))
    with pytest.raises(ValueError, match="exact_layers"):
        CommVQPress(codebooks=books, exact_layers=-3)


def test_exact_layers_in_model_generate(tiny_model):
    """``model.generate`` with a cache holding a full-precision layer: it holds every token, the coded one codes."""
    model, _ = tiny_model
    books = random_books(model.config)
    ids = torch.randint(5, 1000, (1, 24))
    cache = CommVQCache(model.config, books, window=8, flush_chunk=4, exact_layers=(1,))
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6, do_sample=False
    )
    assert out.shape[1] == 30 and cache.get_seq_length() == 29
    assert isinstance(cache.layers[1], ExactLayer) and cache.layers[1].get_seq_length() == 29
    assert cache.layers[0].n >= 16


def test_exact_layer_cache_is_freed_without_the_garbage_collector(tiny):
    """The exact layer refers to its cache weakly: dropping the cache frees every layer at once (no reference cycle
    holding the coded layers' device tables until a full collection)."""
    import gc
    import weakref

    model, _ = tiny
    books = random_books(model.config)
    gc.collect()
    gc.disable()
    try:
        cache = CommVQCache(model.config, books, window=8, flush_chunk=4, exact_layers=1)
        with torch.no_grad():
            model(torch.randint(5, 1000, (1, 20)), past_key_values=cache)
        coded = weakref.ref(cache.layers[0])
        del cache
        assert coded() is None
    finally:
        gc.enable()


def test_exact_layer_assignment_truncates_only_prefixes_and_crops_as_coded_layers():
    torch.manual_seed(0)
    layer = ExactLayer("dequantize")
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    layer.append(k, v)
    layer.mark()
    layer.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    layer.keys = layer.keys[:, :, :10]  # kvpress removing an answer: a prefix view
    layer.values = layer.values[:, :, :10]
    assert layer.get_seq_length() == 10 and torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    layer.keys = layer.keys[:, :, ::2]  # not a prefix: copied; the held length waits for the values
    assert torch.equal(layer.keys, k[:, :, ::2]) and torch.equal(layer.values, v[:, :, :5])
    assert layer._mark is None  # the marked context is gone
    with pytest.raises(ValueError, match="do not fit"):
        layer.values = torch.randn(1, 3, 5, 4)
    other = ExactLayer("dequantize")
    other.append(k, v)
    other.mark()
    other.append(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="crops only back to its marked context"):
        other.crop(5)
    other.crop(10)
    assert other.get_seq_length() == 10 and torch.equal(other.keys, k)
