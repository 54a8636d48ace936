"""CommVQ value encoder input in one pass: the cache's values, scaled, normalized and layer-normed.

The CommVQ value encoder (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025,
arXiv 2506.18879; :class:`pressroom.presses.commvq_codebooks.ValueCodec`) takes a token's values of all KV heads
together (``F = H_kv * head_dim`` features), divides them by a per-channel ``scale``, then by their norm
(``prescale``, which the cache keeps), and runs ``LayerNorm -> Linear -> GELU -> Linear``. In PyTorch the part
before the first ``Linear`` is six passes over memory: the values' transpose and cast to float32, the division, the
norm, the second division, the layer norm and (under bfloat16 autocast) the cast for the matmul
(:func:`value_prep_reference`). :func:`value_prep` does it in one Triton pass that reads the values where the cache
has them (``[B, H, n, D]``, any strides with a unit last one) and writes the layer norm's output in the matmul's
dtype and ``prescale`` in float32.

Dispatch as everywhere in pressroom: ``use_triton=None`` runs the kernel on CUDA tensors and the reference elsewhere
(or always the reference with ``PRESSROOM_FORCE_REFERENCE=1``).
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def _check(values: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[int, ...]:
    if values.dim() != 4:
        raise ValueError(f"values must be [batch, kv_heads, tokens, head_dim], got {tuple(values.shape)}.")
    b, h, n, d = values.shape
    for name, t in (("scale", scale), ("weight", weight), ("bias", bias)):
        if t.shape != (h * d,):
            raise ValueError(f"{name} must be [kv_heads * head_dim] = [{h * d}], got {tuple(t.shape)}.")
    return b, h, n, d


def values_by_token(values: torch.Tensor) -> torch.Tensor:
    """The cache's values ``[B, H_kv, n, head_dim]`` as float32 ``[B, n, H_kv * head_dim]`` (a token's heads together),
    the cast and the transpose in one pass."""
    b, h, n, d = values.shape
    v = torch.empty(b, n, h, d, dtype=torch.float32, device=values.device)
    v.copy_(values.transpose(1, 2))
    return v.view(b, n, h * d)


def normalized_features(
    v: torch.Tensor, scale: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor, ln_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value encoder's steps before its first matmul on ``v [..., F]``: ``x = v / (scale + eps)``, ``prescale =
    ||x||`` ``[..., 1]``, ``y = LayerNorm(x / (prescale + eps))``; returns ``(y, prescale)`` (differentiable: the
    codec's own forward, :meth:`pressroom.presses.commvq_codebooks.ValueCodec.logits`)."""
    x = v / (scale + eps)
    prescale = x.norm(dim=-1, keepdim=True)
    y = torch.nn.functional.layer_norm(x / (prescale + eps), (v.shape[-1],), weight, bias, ln_eps)
    return y, prescale


def value_prep_reference(
    values: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_eps: float,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`value_prep`: ``x = v / (scale + eps)``, ``prescale = ||x||``, ``y = LayerNorm(x /
    (prescale + eps))`` in float32, then cast to ``out_dtype``."""
    _check(values, scale, weight, bias)
    params = (scale.float(), eps, weight.float(), bias.float(), ln_eps)
    y, prescale = normalized_features(values_by_token(values), *params)
    return y.to(out_dtype), prescale


if HAS_TRITON:

    @triton.jit
    def _token_rows(ROWS: tl.constexpr):
        """A program's batch index and its ``ROWS`` token indices (program ids 1 and 0), 64-bit: a long prompt's
        ``[B, H, n, D]`` cache tensors pass 2^31 elements."""
        b = tl.program_id(1).to(tl.int64)
        return b, tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)

    @triton.jit
    def _value_prep_kernel(
        v_ptr,
        scale_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        p_ptr,
        n,
        stride_vb,
        stride_vh,
        stride_vn,
        eps,
        ln_eps,
        D: tl.constexpr,
        F: tl.constexpr,
        BLOCK_F: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # ROWS tokens per program, all F = H * D features of each: head f // D, element f % D
        b, rows = _token_rows(ROWS)
        f = tl.arange(0, BLOCK_F).to(tl.int64)
        rmask = rows < n
        fmask = f < F
        mask = rmask[:, None] & fmask[None, :]
        src = v_ptr + b * stride_vb + (f // D)[None, :] * stride_vh + rows[:, None] * stride_vn + (f % D)[None, :]
        v = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x = v / (tl.load(scale_ptr + f, mask=fmask, other=1.0)[None, :] + eps)
        prescale = tl.sqrt(tl.sum(x * x, axis=1))
        x = x / (prescale[:, None] + eps)
        mean = tl.sum(x, axis=1) / F
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / F
        y = xc / tl.sqrt(var + ln_eps)[:, None]
        y = y * tl.load(w_ptr + f, mask=fmask, other=0.0)[None, :] + tl.load(b_ptr + f, mask=fmask, other=0.0)[None, :]
        out = b * n * F + rows[:, None] * F + f[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + b * n + rows, prescale, mask=rmask)


def value_prep(
    values: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    ln_eps: float,
    out_dtype: torch.dtype = torch.float32,
    use_triton: bool | None = None,
    rows: int = 4,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value encoder's input from the cache's values, in one pass.

    Parameters
    ----------
    values : torch.Tensor
        ``[B, H_kv, n, head_dim]`` (any dtype; strides free but the last, which must be 1 on Triton).
    scale : torch.Tensor
        The codec's per-channel scale ``[H_kv * head_dim]``.
    eps : float
        The codec's ``eps`` (added to ``scale`` and to the norm before dividing).
    weight, bias : torch.Tensor
        The encoder's ``LayerNorm`` parameters ``[H_kv * head_dim]``.
    ln_eps : float
        The ``LayerNorm``'s epsilon.
    out_dtype : torch.dtype
        Of the layer norm's output (``torch.bfloat16`` for the bfloat16 encoder of ``encode_precision="half"``).
    use_triton : bool or None
        Kernel choice (module docstring).
    rows, num_warps : int
        Tokens per program (a power of two) and warps.

    Returns
    -------
    tuple of torch.Tensor
        ``y [B, n, H_kv * head_dim]`` in ``out_dtype`` and ``prescale [B, n, 1]`` float32. The kernel sums in
        float32 in another order than PyTorch (and a GPU's square root and division are not the correctly rounded
        ones): :func:`value_prep_reference` to a few float32 units in the last place, then rounded to
        ``out_dtype``.

    Raises
    ------
    ValueError
        For values not 4-D, parameters not ``[H_kv * head_dim]``, or ``rows`` not a power of two.
    """
    b, h, n, d = _check(values, scale, weight, bias)
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two, got {rows}.")
    if not resolve_use_triton(use_triton, values):
        return value_prep_reference(values, scale, eps, weight, bias, ln_eps, out_dtype)
    if values.stride(-1) != 1:
        values = values.contiguous()
    f = h * d
    y = torch.empty(b, n, f, dtype=out_dtype, device=values.device)
    prescale = torch.empty(b, n, 1, dtype=torch.float32, device=values.device)
    if n == 0 or b == 0:
        return y, prescale
    params = [t.float().contiguous() for t in (scale, weight, bias)]
    _value_prep_kernel[(triton.cdiv(n, rows), b)](
        values, *params, y, prescale, n, values.stride(0), values.stride(1), values.stride(2), float(eps),
        float(ln_eps), D=d, F=f, BLOCK_F=triton.next_power_of_2(f), ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    return y, prescale


__all__ = ["normalized_features", "value_prep", "value_prep_reference", "values_by_token"]
