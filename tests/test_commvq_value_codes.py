"""The value codes kernel (arg-max of the encoder's four-way choices, their bits, packed) against its reference."""

from __future__ import annotations

import os

import pytest
import torch

from pressroom.kernels.commvq_encode import pack_bits, unpack_bits
from pressroom.kernels.commvq_value_codes import choices_to_bits, value_codes, value_codes_reference
from pressroom.presses.commvq_codebooks import ValueCodec

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")


def test_reference_is_the_codecs_one_hot_mapping():
    """The reference's bits are the codec's training mapping (one-hot choices through choices_to_bits), packed."""
    logits = torch.randn(3, 7, 16, 4)
    packed, bits = value_codes_reference(logits, torch.float32)
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), 4).float()
    assert torch.equal(bits, ValueCodec.choices_to_bits(onehot))
    assert torch.equal(packed, pack_bits(bits))
    assert torch.equal(unpack_bits(packed), bits.to(torch.uint8))
    assert torch.equal(choices_to_bits(torch.tensor([0, 1, 2, 3])), torch.tensor([1, 0, 0, 1, 1, 1, 0, 0]).byte())


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 512, 4), (2, 37, 1024, 4), (3, 4, 4)])
def test_kernel_equals_reference(shape, dtype):
    """Bit for bit, ragged tiles included, with exact ties (the first of equal maxima wins, as torch.argmax)."""
    x = _ties(shape, dtype)
    for bits_dtype in (None, torch.uint8, torch.float32):
        packed, bits = value_codes(x, bits_dtype, use_triton=True)
        ref_packed, ref_bits = value_codes_reference(x, bits_dtype)
        assert packed.shape == ref_packed.shape == (*shape[:-2], shape[-2] // 4)
        assert torch.equal(packed, ref_packed)
        assert (bits is None and ref_bits is None) or (bits.dtype == bits_dtype and torch.equal(bits, ref_bits))
    small, _ = value_codes(x, use_triton=True, block_m=16, block_b=8, num_warps=2)
    assert torch.equal(small, ref_packed)


def _ties(shape, dtype):
    """Logits with many exact ties (rounded, repeated) in ``dtype``."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).round(decimals=1)
    x[..., 0, 1] = x[..., 0, 0]
    x[..., 1, :] = 0.5
    return x.to(dtype)


def test_differences_give_the_four_logits_codes():
    """Exact differences (integer logits) pick the same choices as the four logits, ties included (the first of
    equal maxima either way)."""
    logits = torch.randint(-3, 4, (6, 64, 4)).float()
    d = (logits[..., 1:] - logits[..., :1]).transpose(-1, -2)  # planes [..., 3, n_e]
    for bits_dtype in (None, torch.uint8):
        four = value_codes_reference(logits, bits_dtype)
        diff = value_codes_reference(d, bits_dtype, differences=True)
        assert torch.equal(four[0], diff[0])
        assert (four[1] is None and diff[1] is None) or torch.equal(four[1], diff[1])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 512), (2, 37, 3, 1024), (3, 3, 4)])
def test_kernel_equals_reference_differences(shape, dtype):
    """``differences=True`` (planes ``[..., 3, n_e]``): bit for bit, ragged tiles, ties between differences and
    zero differences (ties with choice 0) included."""
    x = _ties(shape, dtype)
    x[..., 1, 2] = x[..., 2, 2]
    x[..., :, 3] = 0.0
    for bits_dtype in (None, torch.uint8, torch.float32):
        packed, bits = value_codes(x, bits_dtype, use_triton=True, differences=True)
        ref_packed, ref_bits = value_codes_reference(x, bits_dtype, differences=True)
        assert packed.shape == (*shape[:-2], shape[-1] // 4)
        assert torch.equal(packed, ref_packed)
        assert (bits is None and ref_bits is None) or torch.equal(bits, ref_bits)
    small, _ = value_codes(x, use_triton=True, block_m=16, block_b=8, num_warps=2, differences=True)
    assert torch.equal(small, ref_packed)


def test_value_codes_errors():
    with pytest.raises(ValueError, match=r"logits must be \[..., n_e, 4\]"):
        value_codes(torch.randn(4, 16, 3), use_triton=False)
    with pytest.raises(ValueError, match="n_e must be a multiple of 4"):
        value_codes(torch.randn(4, 6, 4), use_triton=False)
    with pytest.raises(ValueError, match=r"with differences=True logits must be \[..., 3, n_e\]"):
        value_codes(torch.randn(4, 16, 3), use_triton=False, differences=True)
    with pytest.raises(ValueError, match="n_e must be a multiple of 4"):
        value_codes(torch.randn(4, 3, 6), use_triton=False, differences=True)
    with pytest.raises(ValueError, match="floating point"):
        value_codes(torch.zeros(4, 8, 4, dtype=torch.int32), use_triton=False)
    if INTERPRET:
        with pytest.raises(ValueError, match="block_m must be a power of two"):
            value_codes(torch.randn(4, 8, 4), use_triton=True, block_m=24)
