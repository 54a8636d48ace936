"""KV compaction: gather the kept keys and values of every (batch, KV head) into one contiguous compacted cache.

Used by :class:`pressroom.presses.AnchorPress` (anchor eviction, cf. SepLLM, arXiv 2412.12094) after it has chosen,
per batch row and KV head, which ``n_kept`` positions of the prefilled cache survive. One launch reads the kept
rows of both the keys and the values and writes them, in the order of ``indices``, into freshly allocated
contiguous ``[batch, kv_heads, n_kept, head_dim]`` tensors (what the cache then holds: the evicted rows are gone).

:func:`kv_compact` dispatches like every pressroom kernel: ``use_triton=None`` runs the Triton kernel on CUDA
tensors and :func:`kv_compact_reference` (``torch.gather``) elsewhere, or always the reference when
``PRESSROOM_FORCE_REFERENCE=1``; ``True`` / ``False`` force one (``True`` on CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_ROWS = 16  # kept rows per Triton program


def _check(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, kv_heads, seq_len, head_dim], got shape {tuple(keys.shape)}.")
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"values {tuple(values.shape)} do not match keys {tuple(keys.shape)} on the first 3 dims.")
    if indices.dim() != 3 or indices.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"indices must be [batch, kv_heads, n_kept] = [{keys.shape[0]}, {keys.shape[1]}, n], "
            f"got shape {tuple(indices.shape)}."
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}.")
    if indices.device != keys.device or values.device != keys.device:
        raise ValueError("keys, values and indices must be on the same device.")


def kv_compact_reference(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`kv_compact` (``torch.gather`` along the sequence axis)."""
    if validate:
        _check(keys, values, indices)
    idx = indices.long()
    k_out = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])).contiguous()
    v_out = values.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])).contiguous()
    return k_out, v_out


if HAS_TRITON:

    @triton.jit
    def _kv_compact_kernel(
        k_ptr,
        v_ptr,
        idx_ptr,
        ko_ptr,
        vo_ptr,
        heads,
        n_kept,
        seq_len,
        s_kb,
        s_kh,
        s_kt,
        s_vb,
        s_vh,
        s_vt,
        s_ib,
        s_ih,
        s_it,
        s_ob,
        s_oh,
        s_ot,
        s_pb,
        s_ph,
        s_pt,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        r = pid_r * ROWS + tl.arange(0, ROWS)
        r_ok = r < n_kept
        r64 = r.to(tl.int64)
        src = tl.load(idx_ptr + b * s_ib + h * s_ih + r64 * s_it, mask=r_ok, other=0).to(tl.int64)
        r_ok = r_ok & (src >= 0) & (src < seq_len)  # out-of-range indices are caught on the host; never read them

        dk = tl.arange(0, BLOCK_DK)
        mk = r_ok[:, None] & (dk < DK)[None, :]
        k = tl.load(k_ptr + b * s_kb + h * s_kh + src[:, None] * s_kt + dk[None, :], mask=mk, other=0.0)
        tl.store(ko_ptr + b * s_ob + h * s_oh + r64[:, None] * s_ot + dk[None, :], k, mask=mk)

        dv = tl.arange(0, BLOCK_DV)
        mv = r_ok[:, None] & (dv < DV)[None, :]
        v = tl.load(v_ptr + b * s_vb + h * s_vh + src[:, None] * s_vt + dv[None, :], mask=mv, other=0.0)
        tl.store(vo_ptr + b * s_pb + h * s_ph + r64[:, None] * s_pt + dv[None, :], v, mask=mv)


def kv_compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    use_triton: bool | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept rows of ``keys`` and ``values`` into new contiguous tensors.

    Parameters
    ----------
    keys, values : torch.Tensor
        ``[batch, kv_heads, seq_len, head_dim]`` (any strides with a contiguous last dimension; values may have
        another head_dim).
    indices : torch.Tensor
        ``[batch, kv_heads, n_kept]`` int32/int64 positions in ``[0, seq_len)``: row ``i`` of the output of
        ``(b, h)`` is row ``indices[b, h, i]`` of the input (pass them sorted to keep the original order).
    use_triton : bool, optional
        ``None``: the Triton kernel on CUDA, the reference elsewhere (see
        :func:`pressroom.kernels.rope_ring.resolve_use_triton`).
    validate : bool
        Check shapes and that every index is in range.

    Returns
    -------
    (keys, values)
        ``[batch, kv_heads, n_kept, head_dim]`` contiguous, in the input dtypes.

    Raises
    ------
    ValueError
        Mismatched shapes or devices, or an index outside ``[0, seq_len)`` (with ``validate``).
    """
    if validate:
        _check(keys, values, indices)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= keys.shape[2]):
            raise ValueError(
                f"indices must be in [0, {keys.shape[2]}), got [{int(indices.min())}, {int(indices.max())}]."
            )
        use_triton = resolve_use_triton(use_triton, keys, values, indices)
    if not use_triton:
        return kv_compact_reference(keys, values, indices, validate=False)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()
    batch, heads, seq_len, dk = keys.shape
    dv = values.shape[-1]
    n_kept = indices.shape[-1]
    k_out = torch.empty(batch, heads, n_kept, dk, dtype=keys.dtype, device=keys.device)
    v_out = torch.empty(batch, heads, n_kept, dv, dtype=values.dtype, device=values.device)
    if n_kept == 0 or batch * heads == 0:
        return k_out, v_out
    grid = (triton.cdiv(n_kept, _ROWS), batch * heads)
    _kv_compact_kernel[grid](
        keys,
        values,
        indices,
        k_out,
        v_out,
        heads,
        n_kept,
        seq_len,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        indices.stride(0),
        indices.stride(1),
        indices.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        v_out.stride(0),
        v_out.stride(1),
        v_out.stride(2),
        DK=dk,
        DV=dv,
        BLOCK_DK=triton.next_power_of_2(dk),
        BLOCK_DV=triton.next_power_of_2(dv),
        ROWS=_ROWS,
        num_warps=2 if max(dk, dv) <= 64 else 4,
    )
    return k_out, v_out


__all__ = ["kv_compact", "kv_compact_reference"]
