"""The int16 fixed-point key search (``search="split_dpx"``): its packed pairs, its reference, the kernel against it."""

from __future__ import annotations

import os

import pytest
import torch

from pressroom.kernels.commvq_encode import (
    I16_SPAN,
    KeyTables,
    encode_keys,
    encode_keys_reference,
    encode_keys_split_h2_reference,
    encode_meta,
    normalize_keys,
    unpack_codes12,
)
from pressroom.kernels.f16x2 import pack_i16x2, unpack_i16x2
from pressroom.kernels.rope_ring import HAS_TRITON

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pressroom.kernels.f16x2 import _viaddmin2

    @triton.jit
    def _add_min_kernel(a_ptr, b_ptr, c_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, _viaddmin2(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i), False))


def _problem(seed: int, heads: int = 2, residuals: int = 3, head_dim: int = 16, n: int = 40):
    torch.manual_seed(seed)
    theta = torch.randn(heads, residuals, 128, head_dim // 2) * 0.2
    x, _ = normalize_keys(torch.randn(1, heads, n, head_dim))
    return x[0], theta


def test_int16_pairs_round_trip_and_refuse_out_of_range():
    lo = torch.tensor([-32768, -1, 0, 1, 32767, 1234])
    hi = torch.tensor([32767, 0, -5, -32768, 7, -1234])
    got_lo, got_hi = unpack_i16x2(pack_i16x2(lo, hi))
    assert torch.equal(got_lo, lo.to(torch.int32)) and torch.equal(got_hi, hi.to(torch.int32))
    with pytest.raises(ValueError, match="int16's range"):
        pack_i16x2(torch.tensor([40000]), torch.tensor([0]))
    with pytest.raises(ValueError, match="one shape"):
        pack_i16x2(torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))


def test_fixed_point_tables_keep_every_sum_inside_int16():
    _, theta = _problem(0)
    tables = KeyTables(theta)
    for bound in (1.0, 0.01, 50.0):
        packed, kq, qs = tables.split_i16_tables(bound)
        assert packed.shape == (2, 3, 64, 32) and packed.dtype == torch.int32 and kq.shape == (2, 3, 4096)
        scale, clamp = qs[:, 0], qs[:, 2]
        # the largest |Kq| plus the clamp of gq never reaches the sentinel 32767
        assert torch.all(kq.abs().flatten(0, 1).amax(-1).float() + clamp <= I16_SPAN)
        # the packed K^T holds Kq: lane j of row B is Kq[j, B] (low) and Kq[j + 32, B] (high)
        lo, hi = unpack_i16x2(packed)
        kt = kq.view(2, 3, 64, 64).transpose(-1, -2).to(torch.int32)
        assert torch.equal(lo, kt[..., :32]) and torch.equal(hi, kt[..., 32:])
        # the step covers the cross term: round(K / s) reproduces K to within half a step
        _, _, k, _ = tables.split_tables()
        assert torch.all((kq.view_as(k).float() * scale.view(2, 3, 1, 1) - k).abs() <= 0.501 * scale.view(2, 3, 1, 1))
    with pytest.raises(ValueError, match="key_norm_bound must be positive"):
        tables.split_i16_tables(0.0)


def test_reference_codes_near_the_exact_search():
    """Fixed point with a step of about 1e-4: the reconstruction error within 0.1% of the exact search's."""
    x, theta = _problem(1, n=200)
    exact = encode_keys_reference(x, theta)
    dpx = encode_keys_split_h2_reference(x, theta, sums="i16", key_norm_bound=1.0)
    assert (exact == dpx).all(-1).float().mean() >= 0.95

    def err(packed):
        tables = KeyTables(theta)
        codes = unpack_codes12(packed, theta.shape[1])
        rec = torch.zeros_like(x)
        for h in range(x.shape[1]):
            for step in range(theta.shape[1]):
                c = codes[:, h, step]
                rec[:, h] += tables.u[h, step][c // 64] + tables.w[h, step][c % 64]
        return (x - rec).pow(2).sum(-1).mean().item()

    assert err(dpx) <= err(exact) * 1.001
    with pytest.raises(ValueError, match="sums must be"):
        encode_keys_split_h2_reference(x, theta, sums="i8")


@needs_interpreter
def test_split_dpx_kernel_equals_its_reference():
    """Under the interpreter (the fused add-min on unpacked halves) the kernel equals the reference bit for bit: both
    dot precisions, unrolls, lane layouts, a saturating bound, and keys divided in the kernel."""
    x, theta = _problem(2)
    ref = encode_keys_split_h2_reference(x, theta, sums="i16", key_norm_bound=1.0)
    kw = dict(use_triton=True, search="split_dpx", block_n=16, key_norm_bound=1.0)
    assert torch.equal(encode_keys(x, theta, **kw), ref)
    assert torch.equal(encode_keys(x, theta, **kw, unroll=8, wide_lanes=True), ref)
    assert torch.equal(encode_keys(x, theta, **kw, wide_lanes=True, prefetch=True), ref)
    assert torch.equal(encode_keys(x, theta, **kw, programs=2), ref)
    assert torch.equal(encode_keys(x, theta, use_triton=False, search="split_dpx", key_norm_bound=1.0), ref)
    ref16 = encode_keys_split_h2_reference(x, theta, dot_dtype=torch.float16, sums="i16", key_norm_bound=1.0)
    assert torch.equal(encode_keys(x, theta, **kw, precision="half"), ref16)
    # a bound far below the keys' norms: g_B saturates at the clamp, the kernel still equals its reference
    tight = encode_keys_split_h2_reference(x, theta, sums="i16", key_norm_bound=0.05)
    assert torch.equal(encode_keys(x, theta, **dict(kw, key_norm_bound=0.05)), tight)
    # unnormalized rows with their norms, divided in the kernel
    raw = x * (torch.rand(x.shape[0]) * 3 + 0.5)[:, None, None]
    norms = raw.flatten(1).norm(dim=-1)
    assert torch.equal(encode_keys(raw, theta, **kw, row_norms=norms), ref)


def test_native_dpx_only_where_sm90_runs_it():
    meta, _ = encode_meta(16, 3, 16, 4, 1, "split_dpx", "half", native_dpx=False)
    assert meta["I16"] and not meta["NATIVE"]
    h2, _ = encode_meta(16, 3, 16, 4, 1, "split_h2", "half", native_dpx=False)
    assert not h2["I16"] and h2["NATIVE"] == (not INTERPRET)  # the float16 pairs run on every NVIDIA GPU
    with pytest.raises(ValueError, match="precision='half' is implemented for search='split_h2' and 'split_dpx'"):
        encode_meta(16, 3, 16, 4, 1, "split", "half")


def test_one_fixed_point_table_at_a_time_and_positive_bounds_only():
    x, theta = _problem(3)
    tables = KeyTables(theta)
    first = tables.split_i16_tables(1.0)
    assert tables.split_i16_tables(1.0) is first  # a constant bound (the cache's) builds once
    tables.split_i16_tables(0.5)
    assert list(tables._i16) == [0.5]  # computed bounds that change do not pile up tables
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="key_norm_bound must be positive"):
            encode_keys(x, theta, search="split_dpx", key_norm_bound=bad, use_triton=False)
    # all-zero keys: the computed bound is floored, the codes are those of a zero residual
    zeros = torch.zeros_like(x)
    assert torch.equal(
        encode_keys(zeros, theta, search="split_dpx", use_triton=False),
        encode_keys_split_h2_reference(zeros, theta, sums="i16", key_norm_bound=1e-6),
    )


def test_dpx_native_needs_an_nvidia_sm90(monkeypatch):
    from pressroom.kernels.commvq_encode import dpx_native

    assert not dpx_native(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, native in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert dpx_native(torch.device("cuda", 0)) is native
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert not dpx_native(torch.device("cuda", 0))


@needs_interpreter
def test_emulated_add_min_wraps_like_add_s16x2():
    """The emulation (interpreter, older GPUs) wraps the int16 sums as the hardware does, so a range error in the
    tables would show in the tests instead of hiding behind 32-bit sums."""
    a_lo, a_hi = torch.tensor([30000, -5, 100, -32768]), torch.tensor([1, 32767, -200, 7])
    b_lo, b_hi = torch.tensor([5000, -7, 1, -1]), torch.tensor([2, 1, -100, 8])
    c_lo, c_hi = torch.full((4,), 32767), torch.full((4,), 32767)
    out = torch.empty(4, dtype=torch.int32)
    _add_min_kernel[(1,)](pack_i16x2(a_lo, a_hi), pack_i16x2(b_lo, b_hi), pack_i16x2(c_lo, c_hi), out, N=4)
    lo, hi = unpack_i16x2(out)

    def wrap(v):
        return ((v + 32768) % 65536) - 32768

    assert torch.equal(lo, torch.minimum(wrap(a_lo + b_lo), c_lo).to(torch.int32))  # 30000 + 5000 wraps negative
    assert torch.equal(hi, torch.minimum(wrap(a_hi + b_hi), c_hi).to(torch.int32))
    assert int(lo[0]) < 0 and int(lo[3]) == 32767  # -32768 - 1 wraps to 32767, then min with 32767
