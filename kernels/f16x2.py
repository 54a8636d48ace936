"""Packed float16 (and int16) pairs in int32 lanes: the ``f16x2`` / ``s16x2`` arithmetic the CommVQ kernels use.

Each int32 holds two float16 values (low half first). On a GPU one PTX instruction (``add.rn.f16x2``,
``min.f16x2``) works on both halves; under the Triton interpreter, which runs no PTX, the same correctly rounded
float16 operations run on the unpacked halves, so tests on the CPU see the GPU's results. ``pack_f16x2`` /
``unpack_f16x2`` are the host-side (PyTorch) layout.

Signed int16 pairs (``pack_i16x2``, ``_viaddmin2``) serve the fixed-point candidate search: ``min(a + b, c)`` per
half, which sm_90 (Hopper) runs as one DPX instruction (``VIADDMNMX``, what CUDA's ``__viaddmin_s16x2`` compiles to
from ``add.s16x2`` then ``min.s16x2``). The adds wrap on overflow, so callers keep the sums inside int16.
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def pack_f16x2(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two float tensors of one shape -> int32 with ``lo`` (rounded to float16) in the low and ``hi`` in the high
    half of each lane."""
    if lo.shape != hi.shape:
        raise ValueError(f"pack_f16x2 needs two tensors of one shape, got {tuple(lo.shape)} and {tuple(hi.shape)}.")
    a = lo.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    b = hi.to(torch.float16).view(torch.int16).to(torch.int32)
    return a | (b << 16)


def unpack_f16x2(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float16 halves (low, high) of int32 ``z``: the inverse of :func:`pack_f16x2`."""
    lo = (z & 0xFFFF).to(torch.int16).view(torch.float16)
    hi = (z >> 16).to(torch.int16).view(torch.float16)
    return lo, hi


def pack_i16x2(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two integer tensors of one shape (values in int16's range) -> int32 with ``lo`` in the low and ``hi`` in the
    high half of each lane, two's complement."""
    if lo.shape != hi.shape:
        raise ValueError(f"pack_i16x2 needs two tensors of one shape, got {tuple(lo.shape)} and {tuple(hi.shape)}.")
    for t in (lo, hi):
        if t.numel() and (int(t.min()) < -32768 or int(t.max()) > 32767):
            raise ValueError("pack_i16x2 takes values in int16's range [-32768, 32767].")
    return (lo.to(torch.int32) & 0xFFFF) | (hi.to(torch.int32) << 16)


def unpack_i16x2(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int16 halves (low, high) of int32 ``z`` as int32: the inverse of :func:`pack_i16x2`."""
    return (z << 16) >> 16, z >> 16


if HAS_TRITON:

    @triton.jit
    def _i16_halves(z):
        """The two signed int16 halves (low, high) of int32 ``z``, sign-extended to int32."""
        return (z << 16) >> 16, z >> 16

    @triton.jit
    def _i16_pack(lo, hi):
        """Two int32 tensors (values in int16's range) -> int32 lanes (low, high): inverse of :func:`_i16_halves`."""
        return (lo & 0xFFFF) | (hi << 16)

    @triton.jit
    def _viaddmin2(a, b, c, NATIVE: tl.constexpr):
        """Lane-wise ``min(a + b, c)`` of signed int16 pairs packed in int32 (sums must stay in int16's range): one
        DPX ``VIADDMNMX`` on sm_90 when ``NATIVE`` (``add.s16x2`` then ``min.s16x2``, as CUDA's
        ``__viaddmin_s16x2``), else the same on unpacked halves, the sums wrapping at 16 bits as there (the
        interpreter, which runs no PTX, and older GPUs)."""
        if NATIVE:
            return tl.inline_asm_elementwise(
                "{.reg .b32 t; add.s16x2 t, $1, $2; min.s16x2 $0, t, $3;}",
                "=r,r,r,r",
                [a, b, c],
                dtype=tl.int32,
                is_pure=True,
                pack=1,
            )
        else:
            alo, ahi = _i16_halves(a)
            blo, bhi = _i16_halves(b)
            clo, chi = _i16_halves(c)
            # the sums wrap at 16 bits, as add.s16x2 (callers keep them in range; a test would see them wrap)
            slo = ((alo + blo) << 16) >> 16
            shi = ((ahi + bhi) << 16) >> 16
            return _i16_pack(tl.minimum(slo, clo), tl.minimum(shi, chi))

    @triton.jit
    def _f16_halves(z):
        """The two float16 halves (low, high) of int32 ``z``."""
        lo = (z & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = ((z >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        return lo, hi

    @triton.jit
    def _f16_pack(lo, hi):
        """Two float16 tensors -> int32 lanes (low, high)."""
        return lo.to(tl.uint16, bitcast=True).to(tl.int32) | (hi.to(tl.uint16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _hadd2(a, b, NATIVE: tl.constexpr):
        """Lane-wise sum of two float16 pairs packed in int32, rounded to nearest: one ``add.rn.f16x2`` when
        ``NATIVE`` (compiled for a GPU), else the same correctly rounded float16 adds on unpacked halves (the
        interpreter, which runs no PTX)."""
        if NATIVE:
            return tl.inline_asm_elementwise(
                "add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            alo, ahi = _f16_halves(a)
            blo, bhi = _f16_halves(b)
            return _f16_pack(alo + blo, ahi + bhi)

    @triton.jit
    def _hmin2(a, b, NATIVE: tl.constexpr):
        """Lane-wise minimum of two float16 pairs packed in int32 (no NaNs expected): one ``min.f16x2`` when
        ``NATIVE``, else ``tl.minimum`` on the unpacked halves."""
        if NATIVE:
            return tl.inline_asm_elementwise(
                "min.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
            )
        else:
            alo, ahi = _f16_halves(a)
            blo, bhi = _f16_halves(b)
            return _f16_pack(tl.minimum(alo, blo), tl.minimum(ahi, bhi))


__all__ = ["pack_f16x2", "pack_i16x2", "unpack_f16x2", "unpack_i16x2"]
