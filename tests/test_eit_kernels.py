"""KV compaction kernel and keep-mask attention (EIT) vs their references and a dense-mask SDPA, on the CPU.

The Triton kernel runs under ``TRITON_INTERPRET=1``; flex_attention runs its eager (unfused) path on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported, when this file runs alone

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pressroom.kernels import kv_compact as kv_compact_mod  # noqa: E402
from pressroom.kernels.keep_attention import (  # noqa: E402
    KeepMask,
    keep_attention,
    keep_attention_flex,
    keep_attention_reference,
    keep_mask_dense,
)
from pressroom.kernels.kv_compact import kv_compact, kv_compact_reference  # noqa: E402


def _interpreted() -> bool:
    if not kv_compact_mod.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kv_compact_mod._kv_compact_kernel, InterpretedFunction)


DEVICE = "cuda" if torch.cuda.is_available() and not _interpreted() else "cpu"
needs_triton = pytest.mark.skipif(
    not kv_compact_mod.HAS_TRITON or (DEVICE == "cpu" and not _interpreted()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before Triton is imported",
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compact_triton_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    batch, heads, seq_len, dim = 2, 3, 37, 16
    # keys as the model hands them: [B, H, L, D] views of [B, L, H, D]
    keys = torch.randn(batch, seq_len, heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    values = torch.randn(batch, heads, seq_len, dim, generator=gen).to(DEVICE, dtype)
    n_kept = 19
    idx = torch.stack([torch.randperm(seq_len, generator=gen)[:n_kept].sort().values for _ in range(batch * heads)])
    idx = idx.view(batch, heads, n_kept).to(DEVICE)
    k_ref, v_ref = kv_compact_reference(keys, values, idx)
    k_tri, v_tri = kv_compact(keys, values, idx, use_triton=True)
    assert k_tri.is_contiguous() and v_tri.is_contiguous()
    assert torch.equal(k_tri, k_ref) and torch.equal(v_tri, v_ref)
    # int32 indices, and what the rows are
    k32, _ = kv_compact(keys, values, idx.int(), use_triton=True)
    assert torch.equal(k32, k_ref)
    assert torch.equal(k_ref[1, 2, 5], keys[1, 2, idx[1, 2, 5]])


def test_kv_compact_errors():
    keys = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\)"):
        kv_compact(keys, keys, torch.full((1, 2, 3), 8))
    with pytest.raises(ValueError, match="indices must be"):
        kv_compact(keys, keys, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="int32 or int64"):
        kv_compact(keys, keys, torch.zeros(1, 2, 3))


def _qkv(batch=2, heads=4, kv_heads=2, seq_len=48, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    return q, k, v


def _sdpa_dense(q, k, v, mask: KeepMask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())


@pytest.mark.parametrize("split", [0, 20, 48])
def test_keep_attention_paths_equal_dense_sdpa(split):
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 48, generator=gen) < 0.3
    keep[:, 0] = True  # a sink: no query is left without a key (dense SDPA would give NaN)
    keep[:, split:] |= torch.rand(2, 48 - split, generator=gen) < 0.5
    mask = KeepMask(keep, split)
    expected = _sdpa_dense(q, k, v, mask)
    for out in (
        keep_attention_reference(q, k, v, mask, chunk=16),
        keep_attention_flex(q, k, v, mask, compact=True),
        keep_attention_flex(q, k, v, mask, compact=False),
        keep_attention(q, k, v, mask),
    ):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_keep_mask_dense_semantics_and_empty_rows():
    keep = torch.tensor([[False, True, False, True]])
    dense = keep_mask_dense(keep, split=2)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(dense, expected)
    # query 0 after the split sees no key at all: zero output on every path
    q, k, v = _qkv(batch=1, seq_len=4)
    mask = KeepMask(keep, 0)
    ref = keep_attention_reference(q, k, v, mask)
    flex = keep_attention_flex(q, k, v, mask)
    assert torch.all(ref[:, :, 0] == 0) and torch.all(flex[:, :, 0] == 0)
    torch.testing.assert_close(flex, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="split"):
        KeepMask(keep, 5)
    with pytest.raises(ValueError, match="bool"):
        KeepMask(keep.long(), 0)
