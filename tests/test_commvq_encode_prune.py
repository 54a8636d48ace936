"""The key search that skips the ``A`` a bound rules out (``search="split_prune"``): the codes of ``split_h2``."""

from __future__ import annotations

import os

import pytest
import torch

from pressroom.kernels.commvq_encode import (
    KeyTables,
    encode_keys,
    encode_keys_split_h2_reference,
    encode_meta,
    normalize_keys,
    unpack_codes12,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def _problem(seed: int, heads: int = 2, residuals: int = 3, head_dim: int = 16, n: int = 40):
    torch.manual_seed(seed)
    theta = torch.randn(heads, residuals, 128, head_dim // 2) * 0.2
    x, _ = normalize_keys(torch.randn(1, heads, n, head_dim))
    return x[0], theta


@needs_interpreter
def test_pruned_search_equals_the_split_h2_reference():
    """Bit for bit the codes of ``encode_keys_split_h2_reference`` (float16 sums, first index on ties): both dot
    precisions, one and several programs, a last block of masked rows, keys divided in the kernel, and the
    ``split_h2`` kernel itself."""
    x, theta = _problem(0)
    kw = dict(use_triton=True, search="split_prune", block_n=16)
    ref = encode_keys_split_h2_reference(x, theta)
    assert torch.equal(encode_keys(x, theta, **kw), ref)
    assert torch.equal(encode_keys(x, theta, **kw, programs=1), ref)
    ref16 = encode_keys_split_h2_reference(x, theta, dot_dtype=torch.float16)
    got16 = encode_keys(x, theta, **kw, precision="half")
    assert torch.equal(got16, ref16)
    assert torch.equal(got16, encode_keys(x, theta, use_triton=True, search="split_h2", precision="half", block_n=16))
    raw = x * (torch.rand(x.shape[0]) * 3 + 0.5)[:, None, None]
    norms = raw.flatten(1).norm(dim=-1)
    assert torch.equal(encode_keys(raw, theta, **kw, row_norms=norms), ref)
    # the PyTorch path of the same search is the reference
    assert torch.equal(encode_keys(x, theta, use_triton=False, search="split_prune"), ref)


@needs_interpreter
def test_pruned_search_with_ties_and_nothing_to_prune():
    """Where the bound prunes nothing (all centers equal: every ``A`` ties, the first wins) and where rows repeat
    (ties between rows of one block), the codes are still the reference's."""
    x, theta = _problem(1, n=20)
    flat = torch.zeros_like(theta)
    ref = encode_keys_split_h2_reference(x, flat)
    got = encode_keys(x, flat, use_triton=True, search="split_prune", block_n=16)
    assert torch.equal(got, ref)
    assert (got[:, :, :2] == 0).all()  # code 0 (A = 0, B = 0) at every step: the first index of a full tie
    rep = x[:4].repeat(5, 1, 1)
    assert torch.equal(
        encode_keys(rep, theta, use_triton=True, search="split_prune", block_n=16),
        encode_keys_split_h2_reference(rep, theta),
    )


def test_prune_tables_and_launch_meta():
    _, theta = _problem(2)
    tables = KeyTables(theta)
    k16, kmin = tables.prune_tables()
    assert k16.dtype == torch.float16 and k16.shape == (2, 3, 64, 64) and kmin.shape == (2, 3, 64)
    assert torch.equal(k16, tables.split_tables()[2].half()) and torch.equal(kmin, k16.amin(-1))
    assert tables.prune_tables()[0] is k16  # built once
    meta, (warps, _) = encode_meta(16, 3, 64, 4, 1, "split_prune", "half", row_norms=True)
    assert meta["PAIRS"] == 32 * warps and meta["ROW_NORMS"]
    with pytest.raises(ValueError, match="asm_loop applies to the searches"):
        encode_meta(16, 3, 64, 4, 1, "split_prune", "half", asm_loop=True)
    with pytest.raises(ValueError, match="search='split' \\(float32 sums\\)"):
        KeyTables(theta * 1e3).prune_tables()


@needs_interpreter
def test_pruned_search_keeps_a_bound_met_with_equality():
    """With every ``w_B = 0`` the bound is exact (``K = 0``, ``g_B = 0``: ``LB_A = m_A + f_A``), so the best ``A``
    survives only through the ``<=`` of the test ``LB_A <= UB``: the codes are still the reference's, ``B = 0`` (the
    first of 64 tied) and ``A`` the first arg-min of ``f_A``."""
    x, theta = _problem(3, n=24)
    tables = KeyTables(theta)
    tables.w = torch.zeros_like(tables.w)
    ref = encode_keys_split_h2_reference(x, theta, tables)
    got = encode_keys(x, theta, use_triton=True, search="split_prune", block_n=16, tables=tables)
    assert torch.equal(got, ref)
    codes = unpack_codes12(got, theta.shape[1])
    assert (codes % 64 == 0).all()
    f0 = tables.split_tables()[0][:, 0][None] - 2.0 * torch.einsum("nhd,had->nha", x, tables.u[:, 0])
    assert torch.equal(codes[:, :, 0] // 64, f0.argmin(-1))
