"""The value encoder's input in one pass (pressroom.kernels.commvq_value_prep) against its PyTorch reference and the
codec's own path."""

from __future__ import annotations

import os

import pytest
import torch

from pressroom.kernels.commvq_value_prep import value_prep, value_prep_reference
from pressroom.presses.commvq_codebooks import ValueCodec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def _codec(heads: int = 3, head_dim: int = 16, bits: int = 2, seed: int = 0) -> ValueCodec:
    torch.manual_seed(seed)
    codec = ValueCodec(heads * head_dim, bits)
    with torch.no_grad():
        codec.scale.copy_(torch.rand(heads * head_dim) + 0.5)
        codec.norm1.weight.copy_(torch.randn(heads * head_dim))
        codec.norm1.bias.copy_(torch.randn(heads * head_dim))
    return codec


def _prep(codec: ValueCodec, values: torch.Tensor, dtype: torch.dtype, **kw):
    n = codec.norm1
    return value_prep(values, codec.scale, codec.eps, n.weight, n.bias, n.eps, dtype, **kw)


def test_reference_is_the_codecs_own_encoder_input():
    """head(value_prep) is the codec's logits(v) on the values as the cache holds them ([B, H, n, D])."""
    codec = _codec()
    values = torch.randn(2, 3, 40, 16)[:, :, 7:30]  # a slice of the window, as the cache codes it
    v = values.transpose(1, 2).reshape(2, 23, 48)
    with torch.no_grad():
        want, want_pre = codec.logits(v)
        y, pre = _prep(codec, values, torch.float32, use_triton=False)
        assert torch.equal(pre, want_pre)
        assert torch.equal(codec.head(y), want)


@needs_interpreter
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_kernel_equals_the_reference(rows):
    codec = _codec(seed=1)
    values = torch.randn(2, 3, 50, 16)[:, :, 3:40].to(torch.bfloat16)  # strided, bfloat16 as the model's
    n = codec.norm1
    for dtype in (torch.float32, torch.bfloat16):
        y, pre = _prep(codec, values, dtype, use_triton=True, rows=rows)
        want, want_pre = value_prep_reference(values, codec.scale, codec.eps, n.weight, n.bias, n.eps, dtype)
        assert y.dtype == dtype and y.shape == (2, 37, 48) and pre.shape == (2, 37, 1)
        torch.testing.assert_close(pre, want_pre, rtol=1e-6, atol=0)
        if dtype == torch.float32:  # float32 sums in another order
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        else:  # then rounded to bfloat16: one unit in the last place apart at most (plus float32 slack near zero)
            ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
            assert torch.all((y.float() - want.float()).abs() <= ulp + 1e-5)


def test_half_cache_codes_values_as_the_codecs_own_path():
    """encode_precision="half" off Triton: the value bits and coefficients equal those of ValueCodec.logits on the
    float32 values under the same bfloat16 autocast (the path before value_prep)."""
    from pressroom.kernels.commvq_value_codes import value_codes

    codec = _codec(seed=2)
    values = torch.randn(1, 3, 24, 16)
    v = values.transpose(1, 2).reshape(1, 24, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        old_logits, old_pre = codec.logits(v)
        y, pre = _prep(codec, values, torch.bfloat16, use_triton=False)
        new_logits = codec.head(y)
    assert torch.equal(pre, old_pre)
    assert torch.equal(new_logits, old_logits)
    assert torch.equal(value_codes(new_logits, torch.uint8, False)[0], value_codes(old_logits, torch.uint8, False)[0])


def test_bad_input_is_refused():
    codec = _codec()
    n = codec.norm1
    with pytest.raises(ValueError, match=r"values must be \[batch, kv_heads, tokens, head_dim\]"):
        value_prep(torch.randn(3, 40, 16), codec.scale, codec.eps, n.weight, n.bias, n.eps)
    with pytest.raises(ValueError, match=r"scale must be \[kv_heads \* head_dim\] = \[32\]"):
        value_prep(torch.randn(1, 2, 5, 16), codec.scale, codec.eps, n.weight[:32], n.bias[:32], n.eps)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        value_prep(torch.randn(1, 3, 5, 16), codec.scale, codec.eps, n.weight, n.bias, n.eps, rows=3)
