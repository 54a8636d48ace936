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


def test_head_differences_are_the_logits_differences():
    """float32: l_c - l_0 from the weight differences equal the four logits' differences up to rounding, and pick
    the same choices away from near-ties."""
    codec = _codec(seed=3)
    y = torch.randn(64, 48)
    with torch.no_grad():
        logits = codec.head(y)
        d = codec.head_differences(y)
    assert d.shape == (64, 3, codec.n_e) and d.dtype == torch.float32
    d = d.transpose(-1, -2)
    torch.testing.assert_close(d, logits[..., 1:] - logits[..., :1], rtol=1e-4, atol=1e-5)
    choice_d = torch.cat((torch.zeros_like(d[..., :1]), d), -1).argmax(-1)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(choice_d[clear], logits.argmax(-1)[clear])


def test_head_differences_in_bfloat16_keep_the_choices():
    """Under the cache's bfloat16 autocast the differences' choices agree with the four bfloat16 logits' as closely
    as those agree with the float32 encoder (near-ties apart)."""
    codec = _codec(seed=4, heads=4, head_dim=32)
    y = torch.randn(512, 128)
    with torch.no_grad():
        exact = codec.head(y).argmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            four = codec.head(y.bfloat16()).argmax(-1)
            d = codec.head_differences(y.bfloat16())
    assert d.dtype == torch.bfloat16
    d = d.transpose(-1, -2)
    diff = torch.cat((torch.zeros_like(d[..., :1]), d), -1).argmax(-1)
    agree, four_exact = (diff == four).float().mean(), (four == exact).float().mean()
    assert agree > 0.99 and (diff == exact).float().mean() > four_exact - 0.005


def test_cast_weights_are_kept_until_a_parameter_changes():
    codec = _codec(seed=5)
    y = torch.randn(8, 48, dtype=torch.bfloat16)
    first = codec._cast_weights("head_differences", y)
    assert all(t.dtype == torch.bfloat16 for t in first)
    assert codec._cast_weights("head_differences", y)[2] is first[2]  # kept
    assert codec._cast_weights("head_differences", y.float())[2].dtype == torch.float32  # per dtype
    with torch.no_grad():
        before = codec.head_differences(y.float())
        codec.out.weight[5].add_(0.5)  # in place (a new version): choice 1 of the second n_e
        after = codec.head_differences(y.float())
    want = codec.out.weight.float().view(codec.n_e, 4, -1)
    kept = codec._cast_weights("head_differences", y.float())[2]
    torch.testing.assert_close(kept.view(3, codec.n_e, -1), (want[:, 1:] - want[:, :1]).transpose(0, 1))
    changed = (after != before).view(-1, 3 * codec.n_e).any(0).nonzero().flatten().tolist()
    assert changed == [1]  # only d_1 of the second n_e (plane 0)
    with pytest.raises(ValueError, match="feat_dim=48"):
        codec.head_differences(torch.randn(2, 40))


def test_half_layer_differences_against_four_logits(monkeypatch, coded_layer):
    """The cache's encode_precision="half" path with the logit differences (the default) against the four logits:
    the same value bytes away from near-ties, coefficients as close."""
    from pressroom.presses import commvq_cache

    h, d, n = 2, 64, 96
    codec = _codec(heads=h, head_dim=d, bits=1, seed=6)
    theta = (torch.randn(h, 2, 128, d // 2) * 0.1).half().float()
    keys, values = torch.randn(1, h, n, d), torch.randn(1, h, n, d, dtype=torch.bfloat16)
    out = {}
    for differences in (False, True):
        monkeypatch.setattr(commvq_cache, "VALUE_DIFFERENCES", differences)
        layer = coded_layer(theta, codec, keys, values, encode_precision="half", value_refine=0)
        out[differences] = (layer.vbits[:, :n].clone(), layer.vcoef[:, :n].float().clone(), layer.codes.clone())
    assert torch.equal(out[True][2], out[False][2])  # the keys do not change
    same = (out[True][0] == out[False][0]).float().mean()
    assert 0.95 < same < 1.0  # the same bytes but where a near-tie went the other way
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0.05, atol=0)
