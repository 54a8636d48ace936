"""CommVQ value codes from the value encoder's logits: the arg-max of every four-way choice, its two bits and their
packing, in one pass.

The CommVQ value encoder (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025,
arXiv 2506.18879; :class:`pressroom.presses.commvq_codebooks.ValueCodec`) ends in logits ``[..., n_e, 4]``: ``n_e``
four-way choices per token. Choice ``c`` is stored as two bits (``0 -> 10``, ``1 -> 01``, ``2 -> 11``, ``3 -> 00``,
first bit at the lower index: the reference's ``x[..., :2] += x[..., 2:3]`` on the one-hot), and the cache holds them
packed eight to a byte, least significant bit first (:func:`pressroom.kernels.commvq_encode.pack_bits`).

The arg-max of ``(l_0, l_1, l_2, l_3)`` is the arg-max of ``(0, l_1 - l_0, l_2 - l_0, l_3 - l_0)``: with
``differences=True`` the input is those three differences of every choice as three planes, ``[..., 3, n_e]`` (plane
``c - 1`` holds ``l_c - l_0``), which the encoder's last matmul can produce directly from weight differences
(:meth:`ValueCodec.head_differences`: a quarter fewer multiply-adds and logits than the four logits); the kernel
reads each plane in contiguous runs.

In PyTorch that is an arg-max over a last dimension of 4, a handful of uint8 tensor operations and a packing
reduction, each a pass over memory (:func:`value_codes_reference`). :func:`value_codes` does it in one Triton pass
that reads the logits once and writes the packed bytes (and, when asked, the unpacked bits, which the value
refinement and the postscale read). Dispatch as everywhere in pressroom: ``use_triton=None`` runs the kernel on CUDA
tensors and the reference elsewhere (or always the reference with ``PRESSROOM_FORCE_REFERENCE=1``).
"""

from __future__ import annotations

import torch

from pressroom.kernels.commvq_encode import pack_bits
from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# (rows, bytes) per program and warps: each program reads rows x bytes x 16 logits
DEFAULT_TILING = (32, 32, 4)


def choices_to_bits(choice: torch.Tensor) -> torch.Tensor:
    """Choices ``[..., n_e]`` (0..3) -> bits uint8 ``[..., 2 n_e]`` (0 -> 10, 1 -> 01, 2 -> 11, 3 -> 00)."""
    c = choice.to(torch.uint8)
    first = 1 - (c & 1)  # choices 0 and 2
    second = ((c == 1) | (c == 2)).to(torch.uint8)
    return torch.stack((first, second), dim=-1).flatten(-2)


def _check_logits(logits: torch.Tensor, differences: bool = False) -> None:
    if differences and (logits.dim() < 2 or logits.shape[-2] != 3):
        raise ValueError(
            "with differences=True logits must be [..., 3, n_e] (planes of l_c - l_0 for c = 1, 2, 3), got "
            f"{tuple(logits.shape)}."
        )
    if not differences and (logits.dim() < 2 or logits.shape[-1] != 4):
        raise ValueError(f"logits must be [..., n_e, 4] (four-way choices), got {tuple(logits.shape)}.")
    n_e = logits.shape[-1] if differences else logits.shape[-2]
    if n_e % 4:
        raise ValueError(f"n_e must be a multiple of 4 (whole bytes of bits), got {n_e}.")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}.")


def value_codes_reference(
    logits: torch.Tensor, bits_dtype: torch.dtype | None = None, differences: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch :func:`value_codes`: ``logits.argmax(-1)`` (the first of equal maxima), its bits, packed
    (``differences``: the arg-max of ``[0, d_1, d_2, d_3]`` from the planes ``[..., 3, n_e]``)."""
    _check_logits(logits, differences)
    if differences:
        d = logits.transpose(-1, -2)
        logits = torch.cat((torch.zeros_like(d[..., :1]), d), dim=-1)
    bits = choices_to_bits(logits.argmax(-1))
    return pack_bits(bits), None if bits_dtype is None else bits.to(bits_dtype)


if HAS_TRITON:

    @triton.jit
    def _value_codes_kernel(
        logits_ptr,
        packed_ptr,
        bits_ptr,
        n_rows,
        n_bytes,
        stride_l,
        stride_p,
        stride_b,
        BLOCK_M: tl.constexpr,
        BLOCK_B: tl.constexpr,
        WRITE_BITS: tl.constexpr,
        DIFFS: tl.constexpr = False,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        roff = rows.to(tl.int64)  # row offsets in 64 bits: a batch of long chunks passes 2**31 logits
        byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < n_rows
        bmask = byte < n_bytes
        if DIFFS:  # three planes of n_e = 4 n_bytes differences d_c = l_c - l_0 (l_0 - l_0 = 0 is not read)
            e = tl.program_id(1) * BLOCK_B * 4 + tl.arange(0, BLOCK_B * 4)
            dmask = rmask[:, None] & (e < n_bytes * 4)[None, :]
            at = logits_ptr + roff[:, None] * stride_l + e[None, :]
            best = tl.zeros((BLOCK_M, BLOCK_B * 4), tl.float32)
            choice = tl.zeros((BLOCK_M, BLOCK_B * 4), tl.int32)
            for c in tl.static_range(1, 4):  # strictly greater: the first of equal maxima, as torch.argmax
                d = tl.load(at + (c - 1) * n_bytes * 4, mask=dmask, other=0.0).to(tl.float32)
                choice = tl.where(d > best, c, choice)
                best = tl.maximum(best, d)
        else:
            # a byte holds 4 choices of 4 logits: [rows, bytes, 16] -> [rows, 4 bytes' choices, 4]
            k = tl.arange(0, 16)
            mask = rmask[:, None, None] & bmask[None, :, None]
            ptrs = logits_ptr + roff[:, None, None] * stride_l + byte[None, :, None] * 16 + k[None, None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            x = tl.reshape(x, (BLOCK_M, BLOCK_B * 4, 4))
            choice = tl.argmax(x, axis=2, tie_break_left=True).to(tl.int32)  # the first of equal maxima, as torch
        first = 1 - (choice & 1)
        second = ((choice == 1) | (choice == 2)).to(tl.int32)
        pair = tl.reshape(first | (second << 1), (BLOCK_M, BLOCK_B, 4))  # choice q of a byte: bits 2q, 2q + 1
        q = tl.arange(0, 4)
        packed = tl.sum(pair << (2 * q)[None, None, :], axis=2)
        pmask = rmask[:, None] & bmask[None, :]
        tl.store(packed_ptr + roff[:, None] * stride_p + byte[None, :], packed.to(tl.uint8), mask=pmask)
        if WRITE_BITS:
            bits = tl.reshape(tl.join(first, second), (BLOCK_M, BLOCK_B * 8))
            col = tl.program_id(1) * BLOCK_B * 8 + tl.arange(0, BLOCK_B * 8)
            bptrs = bits_ptr + roff[:, None] * stride_b + col[None, :]
            tl.store(bptrs, bits.to(bits_ptr.dtype.element_ty), mask=rmask[:, None] & (col < n_bytes * 8)[None, :])


def value_codes(
    logits: torch.Tensor,
    bits_dtype: torch.dtype | None = None,
    use_triton: bool | None = None,
    block_m: int | None = None,
    block_b: int | None = None,
    num_warps: int | None = None,
    differences: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed value codes (and optionally the bits) from the value encoder's logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., n_e, 4]`` floating point (``n_e`` a multiple of 4), e.g. :meth:`ValueCodec.logits`; with
        ``differences``, the planes ``[..., 3, n_e]``: ``l_c - l_0`` for ``c = 1, 2, 3``
        (:meth:`ValueCodec.head_differences`).
    bits_dtype : torch.dtype, optional
        Also return the unpacked bits ``[..., 2 n_e]`` (0/1) in this dtype (``torch.uint8`` for the refinement, the
        postscale matmul's dtype otherwise: bfloat16 under the cache's ``encode_precision="half"``, else the value
        codebook's); ``None``: only the packed bytes.
    use_triton : bool or None
        Kernel choice (module docstring).
    block_m, block_b, num_warps : int, optional
        Kernel tiling: rows and output bytes per program (powers of two), warps; default :data:`DEFAULT_TILING`.
    differences : bool
        ``logits`` are the three differences per choice: the choice is the arg-max of ``[0, d_1, d_2, d_3]`` (the
        same choice as the four logits' in exact arithmetic; the first of equal maxima, so ``d_c = 0`` picks 0).

    Returns
    -------
    tuple
        ``packed`` uint8 ``[..., n_e / 4]`` (as :func:`pressroom.kernels.commvq_encode.pack_bits` of the bits) and
        the bits or ``None``. The choice is the first of equal maxima, as ``torch.argmax``; NaN logits are not
        expected (the kernel and ``torch.argmax`` may then disagree).

    Raises
    ------
    ValueError
        If ``logits`` is not ``[..., n_e, 4]`` (``[..., 3, n_e]`` with ``differences``) with ``n_e`` a multiple of
        4, or a tiling is not a power of two.
    """
    _check_logits(logits, differences)
    if not resolve_use_triton(use_triton, logits):
        return value_codes_reference(logits, bits_dtype, differences)
    bm, bb, nw = DEFAULT_TILING
    bm, bb, nw = block_m or bm, block_b or bb, num_warps or nw
    for name, v in (("block_m", bm), ("block_b", bb)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}.")
    lead, n_e = logits.shape[:-2], logits.shape[-1] if differences else logits.shape[-2]
    flat = logits.reshape(-1, n_e * (3 if differences else 4))
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n_rows, n_bytes = flat.shape[0], n_e // 4
    packed = torch.empty(n_rows, n_bytes, dtype=torch.uint8, device=logits.device)
    bits = None if bits_dtype is None else torch.empty(n_rows, 2 * n_e, dtype=bits_dtype, device=logits.device)
    if n_rows:
        grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_bytes, bb))
        _value_codes_kernel[grid](
            flat, packed, packed if bits is None else bits, n_rows, n_bytes, flat.stride(0), packed.stride(0),
            0 if bits is None else bits.stride(0), BLOCK_M=bm, BLOCK_B=bb, WRITE_BITS=bits is not None,
            DIFFS=differences, num_warps=nw,
        )  # fmt: skip
    packed = packed.reshape(*lead, n_bytes)
    return packed, None if bits is None else bits.reshape(*lead, 2 * n_e)


__all__ = ["DEFAULT_TILING", "choices_to_bits", "value_codes", "value_codes_reference"]
