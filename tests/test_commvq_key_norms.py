"""Each token's key norm over all KV heads in one pass (pressroom.kernels.commvq_key_norms) against its PyTorch
reference and the cache's own use of it."""

from __future__ import annotations

import os

import pytest
import torch

from pressroom.kernels.commvq_encode import normalize_keys
from pressroom.kernels.commvq_key_norms import key_norms, key_norms_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def test_reference_is_the_norm_normalize_keys_divides_by():
    """The reference is the norm of a token's interleaved keys of all heads together, as normalize_keys takes it."""
    keys = torch.randn(2, 3, 17, 16)
    x, norms = normalize_keys(keys)
    want = key_norms_reference(keys)
    assert want.shape == (2, 17) and want.dtype == torch.float32
    torch.testing.assert_close(want, norms.reshape(want.shape), rtol=1e-6, atol=0)
    direct = keys.transpose(1, 2).flatten(2).norm(dim=-1)
    torch.testing.assert_close(want, direct, rtol=1e-6, atol=0)


@needs_interpreter
@pytest.mark.parametrize(
    ("shape", "dtype", "rows"),
    [((2, 3, 41, 16), torch.float32, 8), ((1, 8, 33, 128), torch.float32, 4), ((1, 2, 9, 80), torch.bfloat16, 8)],
)
def test_kernel_equals_the_reference(shape, dtype, rows):
    """Float32 sums in another order: equal to a few units in the last place; head_dim not a power of two, token
    counts not a multiple of the program's rows, bfloat16 keys summed in float32."""
    keys = (torch.randn(*shape) * 3).to(dtype)
    got = key_norms(keys, use_triton=True, rows=rows)
    assert got.shape == shape[:1] + shape[2:3] and got.dtype == torch.float32
    torch.testing.assert_close(got, key_norms_reference(keys), rtol=2e-6, atol=0)


@needs_interpreter
def test_kernel_reads_a_slice_in_place_and_strided_keys():
    """A slice of the cache's window (the layout _encode passes) and keys with a non-unit last stride."""
    window = torch.randn(2, 4, 60, 32)
    part = window[:, :, 13:47]
    torch.testing.assert_close(key_norms(part, use_triton=True), key_norms_reference(part), rtol=2e-6, atol=0)
    strided = torch.randn(1, 2, 10, 64)[..., ::2]
    torch.testing.assert_close(key_norms(strided, use_triton=True), key_norms_reference(strided), rtol=2e-6, atol=0)
    zero = torch.zeros(1, 2, 5, 16)  # all-zero tokens: norm 0 (the cache divides by 1 instead)
    assert torch.equal(key_norms(zero, use_triton=True), torch.zeros(1, 5))
    assert key_norms(torch.randn(1, 2, 0, 16), use_triton=True).shape == (1, 0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"keys must be \[batch, kv_heads, tokens, head_dim\]"):
        key_norms(torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="floating point"):
        key_norms(torch.ones(1, 2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows must be a power of two"):
        key_norms(torch.randn(1, 2, 3, 4), rows=6)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_the_cache_codes_with_these_norms(monkeypatch, coded_layer, use_triton):
    """The cache's encode takes the tokens' key norms from :func:`key_norms` (the kernel on the Triton path) and
    keeps them: its float16 norms are the reference's, rounded."""
    from pressroom.presses import commvq_cache
    from pressroom.presses.commvq_codebooks import ValueCodec

    calls = []

    def spy(k, use):
        calls.append(use)
        return key_norms(k, use)

    monkeypatch.setattr(commvq_cache, "key_norms", spy)
    torch.manual_seed(2)
    heads, d, n = 2, 16, 40
    theta = torch.randn(heads, 2, 128, d // 2) * 0.1
    raw, values = torch.randn(1, heads, n, d) * 3, torch.randn(1, heads, n, d)
    layer = coded_layer(theta, ValueCodec(heads * d, 1), raw, values, use_triton=use_triton)
    assert calls and all(use is use_triton for use in calls)
    assert torch.equal(layer.knorm[0, :n], key_norms_reference(raw)[0].half())
