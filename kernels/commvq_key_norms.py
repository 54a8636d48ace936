"""CommVQ key norms in one pass: each token's keys of all KV heads together, one L2 norm a token.

CommVQ (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025, arXiv 2506.18879)
codes a token's keys divided by their joint norm over the KV heads (:func:`pressroom.kernels.commvq_encode.
normalize_keys`), and the cache keeps that norm. The cache holds the keys as ``[B, H_kv, n, D]``, so the norm reduces
over dimensions 1 and 3 around the kept one: PyTorch's reduction (:func:`key_norms_reference`) reads them at about a
quarter of the memory bandwidth of an H200 (0.41 ms a layer of 128k tokens, 8 KV heads, head_dim 128, float32:
``benchmarks/results/commvq_encode_prefetch.json``, its ``reduce_kernel``). :func:`key_norms` reads each token's
``H_kv`` rows of ``D`` contiguous values once, a few tokens a program, and sums their squares in float32.

Dispatch as everywhere in pressroom: ``use_triton=None`` runs the kernel on CUDA tensors and the reference elsewhere
(or always the reference with ``PRESSROOM_FORCE_REFERENCE=1``).
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pressroom.kernels.commvq_value_prep import _token_rows


def _check(keys: torch.Tensor) -> tuple[int, ...]:
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, kv_heads, tokens, head_dim], got {tuple(keys.shape)}.")
    if not keys.is_floating_point():
        raise ValueError(f"keys must be floating point, got {keys.dtype}.")
    return tuple(keys.shape)


def key_norms_reference(keys: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` float32: the L2 norm of each token's keys over all KV heads (``keys [B, H_kv, n, D]``)."""
    _check(keys)
    return torch.linalg.vector_norm(keys.float(), dim=(1, 3))


if HAS_TRITON:

    @triton.jit
    def _key_norms_kernel(
        k_ptr,
        out_ptr,
        n,
        stride_kb,
        stride_kh,
        stride_kn,
        H: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # ROWS tokens a program; per KV head one [ROWS, D] tile of contiguous rows, squares summed in float32
        b, rows = _token_rows(ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n)[:, None] & (cols < D)[None, :]
        base = k_ptr + b * stride_kb + rows[:, None] * stride_kn + cols[None, :]
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        for h in tl.static_range(H):
            x = tl.load(base + h * stride_kh.to(tl.int64), mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(out_ptr + b * n + rows, tl.sqrt_rn(tl.sum(acc, axis=1)), mask=rows < n)  # correctly rounded


def key_norms(keys: torch.Tensor, use_triton: bool | None = None, rows: int = 8, num_warps: int = 4) -> torch.Tensor:
    """Each token's key norm over all KV heads, in one pass.

    Parameters
    ----------
    keys : torch.Tensor
        ``[B, H_kv, n, D]``, floating point (any; summed in float32), any strides (a unit last one is read in place;
        others are made contiguous first on Triton).
    use_triton : bool or None
        Kernel choice (module docstring).
    rows, num_warps : int
        Tokens per program (a power of two) and warps.

    Returns
    -------
    torch.Tensor
        ``[B, n]`` float32. The kernel sums in another order than PyTorch (its square root correctly rounded): equal
        to :func:`key_norms_reference` to a few float32 units in the last place.

    Raises
    ------
    ValueError
        For keys not 4-D or not floating point, or ``rows`` not a power of two.
    """
    b, h, n, d = _check(keys)
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two, got {rows}.")
    if not resolve_use_triton(use_triton, keys):
        return key_norms_reference(keys)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    out = torch.empty(b, n, dtype=torch.float32, device=keys.device)
    if n == 0 or b == 0:
        return out
    _key_norms_kernel[(triton.cdiv(n, rows), b)](
        keys, out, n, keys.stride(0), keys.stride(1), keys.stride(2), H=h, D=d,
        BLOCK_D=triton.next_power_of_2(d), ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    return out


__all__ = ["key_norms", "key_norms_reference"]
