"""RoPE ring-buffer kernels for :class:`pressroom.presses.SinkWindowCache` (StreamingLLM, arXiv 2309.17453).

The cache keeps, per batch row and KV head, a ring of ``n_sink + window`` slots holding keys *before* RoPE and their
values, and rotates the keys to their current positions when the model reads them. Three kernels, each beside a
plain-PyTorch reference with the same semantics:

- :func:`ring_store`: un-rotate new keys (the exact inverse of the rotation the model applied, from the cos/sin it
  used, in float32) and write them and their values into the ring slots their stream indices map to; optionally
  also copy the keys, as rotated by the model, into the same slots of a workspace.
- :func:`ring_rotate_keys`: read raw keys from the ring and write them rotated (float32 math) to their positions
  into an output tensor, in physical (ring) order or in logical order (sinks, then the window oldest to newest).
- :func:`ring_decode`: one decoding step in one launch: re-rotate the workspace rows whose position moved and
  store one new token (the cache's hot path).

Slot map. The token with stream index ``seq`` lives in slot ``seq`` if ``seq < n_sink`` (the attention sinks), else
in slot ``n_sink + (seq - n_sink) % window`` (the rolling window). ``ring_first`` is the ring index (``0 ..
window-1``) of the window token at logical index ``n_sink``; the logical index of every other slot follows.

Positions. Slot ``i`` in logical order is rotated to position ``pos_base + i``; the angle is computed as the
transformers RoPE does it: ``float32(position) * inv_freq`` (float32), then ``cos``/``sin`` times
``attention_scaling``, and ``k * cos + rotate_half(k) * sin``.

Dispatch. ``use_triton=None`` (auto) runs the Triton kernel on CUDA tensors and the reference elsewhere, or always
the reference when the environment variable ``PRESSROOM_FORCE_REFERENCE=1`` is set; ``True`` / ``False`` force one
(``True`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional (absent on macOS / Windows): the references below always work.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False

FORCE_REFERENCE_ENV = "PRESSROOM_FORCE_REFERENCE"
_ROWS = 4  # rows (tokens / slots) per Triton program


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), so that CPU tensors work."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_use_triton(use_triton: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for ``tensors``.

    Parameters
    ----------
    use_triton : bool or None
        ``None``: Triton when every tensor is on CUDA and ``PRESSROOM_FORCE_REFERENCE`` is not ``1``.
        ``True`` / ``False``: forced.
    *tensors : torch.Tensor
        The kernel's tensor arguments.

    Raises
    ------
    ValueError
        ``use_triton=True`` without Triton, or on CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if use_triton is None:
        if os.environ.get(FORCE_REFERENCE_ENV, "0") == "1":
            return False
        return HAS_TRITON and all(t.is_cuda for t in tensors)
    if use_triton:
        if not HAS_TRITON:
            raise ValueError("use_triton=True but Triton is not installed; use use_triton=None or False.")
        if not all(t.is_cuda for t in tensors) and not triton_interpreted():
            raise ValueError(
                "use_triton=True needs CUDA tensors, or TRITON_INTERPRET=1 set before Triton is imported (CPU)."
            )
    return bool(use_triton)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_ring(raw_keys: torch.Tensor, n_sink: int, window: int) -> tuple[int, int, int, int]:
    if raw_keys.dim() != 4:
        raise ValueError(f"ring buffers must be [batch, kv_heads, slots, head_dim], got shape {tuple(raw_keys.shape)}.")
    batch, heads, slots, head_dim = raw_keys.shape
    if n_sink < 0 or window < 1 or slots != n_sink + window:
        raise ValueError(f"ring of {slots} slots does not match n_sink={n_sink} + window={window}.")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    return batch, heads, slots, head_dim


def _slots_for(seq: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    return torch.where(seq < n_sink, seq, n_sink + (seq - n_sink).remainder(window))


def _check_store(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    seq0: int,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    rotated_out: torch.Tensor | None,
) -> None:
    batch, heads, _, head_dim = _check_ring(raw_keys, n_sink, window)
    if value_buf.shape != raw_keys.shape or (rotated_out is not None and rotated_out.shape != raw_keys.shape):
        raise ValueError("value and workspace buffers must have the shape of the key ring.")
    if keys.dim() != 4 or keys.shape[0] != batch or keys.shape[1] != heads or keys.shape[3] != head_dim:
        raise ValueError(f"keys {tuple(keys.shape)} do not fit the ring {tuple(raw_keys.shape)}.")
    if values.shape != keys.shape:
        raise ValueError(f"values {tuple(values.shape)} and keys {tuple(keys.shape)} differ in shape.")
    n_tok = keys.shape[2]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (n_tok, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(f"cos/sin must be [batch or 1, {n_tok}, {head_dim}], got {tuple(cos.shape)}.")
    if not 0 <= start <= stop <= n_tok:
        raise ValueError(f"token range [{start}, {stop}) is outside [0, {n_tok}).")
    if seq0 + start < 0:
        raise ValueError(f"stream indices must be >= 0, got seq0={seq0}.")
    first_window = max(seq0 + start, n_sink)
    if seq0 + stop - first_window > window:
        raise ValueError(
            f"tokens [{seq0 + start}, {seq0 + stop}) would write {seq0 + stop - first_window} window slots of "
            f"{window}: store only the tokens that survive."
        )


def ring_store_reference(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    *,
    seq0: int,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    rotated_out: torch.Tensor | None = None,
    validate: bool = True,
) -> None:
    """Plain-PyTorch :func:`ring_store` (same semantics)."""
    if validate:
        _check_store(keys, values, cos, sin, raw_keys, value_buf, seq0, start, stop, n_sink, window, rotated_out)
    if stop <= start:
        return
    k = keys[:, :, start:stop].float()
    c = cos[:, start:stop].float().unsqueeze(1)
    s = sin[:, start:stop].float().unsqueeze(1)
    raw = (k * c - _rotate_half(k) * s) / (c * c + s * s)
    seq = torch.arange(seq0 + start, seq0 + stop, device=raw_keys.device)
    slots = _slots_for(seq, n_sink, window)
    raw_keys.index_copy_(2, slots, raw.to(raw_keys.dtype))
    value_buf.index_copy_(2, slots, values[:, :, start:stop].to(value_buf.dtype))
    if rotated_out is not None:
        rotated_out.index_copy_(2, slots, keys[:, :, start:stop].to(rotated_out.dtype))


def _check_rotate(
    raw_keys: torch.Tensor,
    out: torch.Tensor,
    inv_freq: torch.Tensor,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
    logical_order: bool,
) -> None:
    batch, heads, slots, head_dim = _check_ring(raw_keys, n_sink, window)
    if out.dim() != 4 or out.shape[0] != batch or out.shape[1] != heads or out.shape[3] != head_dim:
        raise ValueError(f"out {tuple(out.shape)} does not fit the ring {tuple(raw_keys.shape)}.")
    if inv_freq.dim() != 1 or 2 * inv_freq.numel() != head_dim:
        raise ValueError(f"inv_freq must have head_dim // 2 = {head_dim // 2} entries, got {tuple(inv_freq.shape)}.")
    if not 0 <= start <= stop <= out.shape[2] or stop > slots:
        raise ValueError(f"range [{start}, {stop}) is outside the output ({out.shape[2]}) or the ring ({slots}).")
    if not 0 <= ring_first < window:
        raise ValueError(f"ring_first={ring_first} is outside [0, {window}).")
    if not logical_order and out.shape[2] != slots:
        raise ValueError("physical order needs an output with one row per ring slot.")


def _rotation(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float):
    # exactly as transformers' rotary embeddings: float32 positions times float32 inv_freq, cos/sin, times scaling
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def ring_rotate_keys_reference(
    raw_keys: torch.Tensor,
    out: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    *,
    pos_base: int,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
    logical_order: bool,
    validate: bool = True,
) -> None:
    """Plain-PyTorch :func:`ring_rotate_keys` (same semantics)."""
    if validate:
        _check_rotate(raw_keys, out, inv_freq, start, stop, n_sink, window, ring_first, logical_order)
    if stop <= start:
        return
    idx = torch.arange(start, stop, device=raw_keys.device)
    if logical_order:
        logical = idx
        phys = torch.where(idx < n_sink, idx, n_sink + (ring_first + idx - n_sink).remainder(window))
    else:
        phys = idx
        logical = torch.where(idx < n_sink, idx, n_sink + (idx - n_sink - ring_first).remainder(window))
    cos, sin = _rotation(pos_base + logical, inv_freq, attention_scaling)
    k = raw_keys.index_select(2, phys).float()
    out[:, :, start:stop] = (k * cos + _rotate_half(k) * sin).to(out.dtype)


def _check_decode(
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    workspace: torch.Tensor,
    inv_freq: torch.Tensor,
    seq: int,
    rot_start: int,
    rot_stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
) -> None:
    if key.dim() != 4 or key.shape[2] != 1:
        raise ValueError(f"ring_decode stores one token: keys must be [batch, kv_heads, 1, head_dim], got {key.shape}.")
    _check_store(key, value, cos, sin, raw_keys, value_buf, seq, 0, 1, n_sink, window, workspace)
    _check_rotate(raw_keys, workspace, inv_freq, rot_start, rot_stop, n_sink, window, ring_first, False)


def ring_decode_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    workspace: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    *,
    seq: int,
    pos_base: int,
    rot_start: int,
    rot_stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
    validate: bool = True,
) -> None:
    """Plain-PyTorch :func:`ring_decode` (same semantics): a rotation, then a store."""
    if validate:
        _check_decode(
            key,
            value,
            cos,
            sin,
            raw_keys,
            value_buf,
            workspace,
            inv_freq,
            seq,
            rot_start,
            rot_stop,
            n_sink,
            window,
            ring_first,
        )
    ring_rotate_keys_reference(
        raw_keys,
        workspace,
        inv_freq,
        attention_scaling,
        pos_base=pos_base,
        start=rot_start,
        stop=rot_stop,
        n_sink=n_sink,
        window=window,
        ring_first=ring_first,
        logical_order=False,
        validate=False,
    )
    ring_store_reference(
        key,
        value,
        cos,
        sin,
        raw_keys,
        value_buf,
        seq0=seq,
        start=0,
        stop=1,
        n_sink=n_sink,
        window=window,
        rotated_out=workspace,
        validate=False,
    )


if HAS_TRITON:
    # Integer arguments that change from call to call are not specialised (Triton would otherwise compile a variant
    # per combination of "divisible by 16" / "equal to 1" as a stream advances).
    @triton.jit(do_not_specialize=["start", "stop", "seq0"])
    def _ring_store_kernel(
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        raw_ptr,
        vbuf_ptr,
        rot_ptr,
        heads,
        start,
        stop,
        seq0,
        n_sink,
        window,
        s_kb,
        s_kh,
        s_kt,
        s_vb,
        s_vh,
        s_vt,
        s_cb,
        s_ct,
        s_sb,
        s_st,
        s_rb,
        s_rh,
        s_rs,
        s_bb,
        s_bh,
        s_bs,
        s_wb,
        s_wh,
        s_ws,
        HALF: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        WRITE_ROT: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        t = start + pid_t * ROWS + tl.arange(0, ROWS)
        row_ok = t < stop
        seq = seq0 + t
        slot = tl.where(seq < n_sink, seq, n_sink + ((seq - n_sink) % window + window) % window).to(tl.int64)
        t64 = t.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (d < HALF)[None, :]

        k_row = k_ptr + b * s_kb + h * s_kh + t64[:, None] * s_kt + d[None, :]
        k1 = tl.load(k_row, mask=m, other=0.0)
        k2 = tl.load(k_row + HALF, mask=m, other=0.0)
        c_row = cos_ptr + b * s_cb + t64[:, None] * s_ct + d[None, :]
        s_row = sin_ptr + b * s_sb + t64[:, None] * s_st + d[None, :]
        c1 = tl.load(c_row, mask=m, other=1.0).to(tl.float32)
        c2 = tl.load(c_row + HALF, mask=m, other=1.0).to(tl.float32)
        s1 = tl.load(s_row, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + HALF, mask=m, other=0.0).to(tl.float32)
        kf1 = k1.to(tl.float32)
        kf2 = k2.to(tl.float32)
        x1 = (kf1 * c1 + kf2 * s1) / (c1 * c1 + s1 * s1)
        x2 = (kf2 * c2 - kf1 * s2) / (c2 * c2 + s2 * s2)

        r_row = raw_ptr + b * s_rb + h * s_rh + slot[:, None] * s_rs + d[None, :]
        tl.store(r_row, x1.to(raw_ptr.dtype.element_ty), mask=m)
        tl.store(r_row + HALF, x2.to(raw_ptr.dtype.element_ty), mask=m)

        v_row = v_ptr + b * s_vb + h * s_vh + t64[:, None] * s_vt + d[None, :]
        vb_row = vbuf_ptr + b * s_bb + h * s_bh + slot[:, None] * s_bs + d[None, :]
        tl.store(vb_row, tl.load(v_row, mask=m, other=0.0).to(vbuf_ptr.dtype.element_ty), mask=m)
        tl.store(vb_row + HALF, tl.load(v_row + HALF, mask=m, other=0.0).to(vbuf_ptr.dtype.element_ty), mask=m)

        if WRITE_ROT:
            w_row = rot_ptr + b * s_wb + h * s_wh + slot[:, None] * s_ws + d[None, :]
            tl.store(w_row, k1.to(rot_ptr.dtype.element_ty), mask=m)
            tl.store(w_row + HALF, k2.to(rot_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rotate_rows(src, dst, inv_ptr, pos, row_ok, d, d_ok, scaling, HALF: tl.constexpr):
        """Rotate rows of un-rotated keys (``src``: ``[ROWS, BLOCK_D]`` pointers to the first half of each row) to
        the positions ``pos`` (float32 angles, times ``scaling``, as the model's rotary embedding) into ``dst``."""
        m = row_ok[:, None] & d_ok[None, :]
        inv = tl.load(inv_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        ang = pos.to(tl.float32)[:, None] * inv[None, :]
        c = tl.cos(ang) * scaling
        s = tl.sin(ang) * scaling
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["start", "stop", "pos_base", "ring_first"])
    def _ring_rotate_kernel(
        raw_ptr,
        out_ptr,
        inv_ptr,
        heads,
        start,
        stop,
        pos_base,
        n_sink,
        window,
        ring_first,
        scaling,
        s_rb,
        s_rh,
        s_rs,
        s_ob,
        s_oh,
        s_os,
        HALF: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        LOGICAL: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        idx = start + pid_r * ROWS + tl.arange(0, ROWS)
        row_ok = idx < stop
        # ((x % w) + w) % w: a non-negative remainder under both C (GPU) and floor (interpreter) semantics
        if LOGICAL:
            logical = idx
            phys = tl.where(idx < n_sink, idx, n_sink + ((ring_first + idx - n_sink) % window + window) % window)
        else:
            phys = idx
            logical = tl.where(idx < n_sink, idx, n_sink + ((idx - n_sink - ring_first) % window + window) % window)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        src = raw_ptr + b * s_rb + h * s_rh + phys.to(tl.int64)[:, None] * s_rs + d[None, :]
        dst = out_ptr + b * s_ob + h * s_oh + idx.to(tl.int64)[:, None] * s_os + d[None, :]
        _rotate_rows(src, dst, inv_ptr, pos_base + logical, row_ok, d, d_ok, scaling, HALF)

    @triton.jit(do_not_specialize=["slot", "rot_start", "rot_stop", "pos_base", "ring_first"])
    def _ring_decode_kernel(
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        raw_ptr,
        vbuf_ptr,
        ws_ptr,
        inv_ptr,
        seq_ptr,
        heads,
        slot,
        rot_start,
        rot_stop,
        pos_base,
        n_sink,
        window,
        ring_first,
        scaling,
        s_kb,
        s_kh,
        s_vb,
        s_vh,
        s_cb,
        s_sb,
        s_rb,
        s_rh,
        s_rs,
        s_bb,
        s_bh,
        s_bs,
        s_wb,
        s_wh,
        s_ws,
        HALF: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        SEQ_FROM_PTR: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        if SEQ_FROM_PTR:  # steady state (ring full), stream index read on the device: CUDA-graph replayable
            seq_dev = tl.load(seq_ptr)
            slot = (n_sink + (seq_dev - n_sink) % window).to(tl.int32)
            ring_first = ((seq_dev + 1 - n_sink) % window).to(tl.int32)
        if pid == 0:  # store the new token: raw key, value, and the model's rotated key into the workspace
            k_row = k_ptr + b * s_kb + h * s_kh + d
            k1 = tl.load(k_row, mask=d_ok, other=0.0)
            k2 = tl.load(k_row + HALF, mask=d_ok, other=0.0)
            c1 = tl.load(cos_ptr + b * s_cb + d, mask=d_ok, other=1.0).to(tl.float32)
            c2 = tl.load(cos_ptr + b * s_cb + HALF + d, mask=d_ok, other=1.0).to(tl.float32)
            s1 = tl.load(sin_ptr + b * s_sb + d, mask=d_ok, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + b * s_sb + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
            kf1 = k1.to(tl.float32)
            kf2 = k2.to(tl.float32)
            x1 = (kf1 * c1 + kf2 * s1) / (c1 * c1 + s1 * s1)
            x2 = (kf2 * c2 - kf1 * s2) / (c2 * c2 + s2 * s2)
            slot64 = slot.to(tl.int64)
            r_row = raw_ptr + b * s_rb + h * s_rh + slot64 * s_rs + d
            tl.store(r_row, x1.to(raw_ptr.dtype.element_ty), mask=d_ok)
            tl.store(r_row + HALF, x2.to(raw_ptr.dtype.element_ty), mask=d_ok)
            v_row = v_ptr + b * s_vb + h * s_vh + d
            vb_row = vbuf_ptr + b * s_bb + h * s_bh + slot64 * s_bs + d
            tl.store(vb_row, tl.load(v_row, mask=d_ok, other=0.0).to(vbuf_ptr.dtype.element_ty), mask=d_ok)
            tl.store(
                vb_row + HALF, tl.load(v_row + HALF, mask=d_ok, other=0.0).to(vbuf_ptr.dtype.element_ty), mask=d_ok
            )
            w_row = ws_ptr + b * s_wb + h * s_wh + slot64 * s_ws + d
            tl.store(w_row, k1.to(ws_ptr.dtype.element_ty), mask=d_ok)
            tl.store(w_row + HALF, k2.to(ws_ptr.dtype.element_ty), mask=d_ok)
        else:  # re-rotate ring rows whose position moved (all but the new token's slot)
            idx = rot_start + (pid - 1) * ROWS + tl.arange(0, ROWS)
            row_ok = (idx < rot_stop) & (idx != slot)
            logical = tl.where(idx < n_sink, idx, n_sink + ((idx - n_sink - ring_first) % window + window) % window)
            idx64 = idx.to(tl.int64)
            src = raw_ptr + b * s_rb + h * s_rh + idx64[:, None] * s_rs + d[None, :]
            dst = ws_ptr + b * s_wb + h * s_wh + idx64[:, None] * s_ws + d[None, :]
            _rotate_rows(src, dst, inv_ptr, pos_base + logical, row_ok, d, d_ok, scaling, HALF)


def _check_contiguous_rows(*buffers: torch.Tensor | None) -> None:
    for buf in buffers:
        if buf is not None and buf.stride(-1) != 1:
            raise ValueError("ring buffers and outputs need a contiguous last dimension.")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def ring_store(
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    *,
    seq0: int,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    rotated_out: torch.Tensor | None = None,
    use_triton: bool | None = None,
    validate: bool = True,
) -> None:
    """Un-rotate new keys and write them, with their values, into their ring slots.

    Parameters
    ----------
    keys, values : torch.Tensor
        ``[batch, kv_heads, n_tokens, head_dim]``: the new tokens, keys already rotated by the model (any strides
        with a contiguous last dimension).
    cos, sin : torch.Tensor
        ``[batch or 1, n_tokens, head_dim]``: the rotation the model applied (its ``position_embeddings``). The
        inverse ``(k * cos - rotate_half(k) * sin) / (cos**2 + sin**2)`` is computed in float32, so it also undoes
        ``attention_scaling`` and the rounding of cos/sin to the model dtype.
    raw_keys, value_buf : torch.Tensor
        ``[batch, kv_heads, n_sink + window, head_dim]``: the ring (pre-RoPE keys) and its values; written in place.
    seq0 : int
        Stream index of token 0 of ``keys``.
    start, stop : int
        Only tokens ``start .. stop-1`` are written (to slot ``slot(seq0 + t)``, see the module docstring); they
        must map to distinct slots (at most ``window`` of them past the sinks).
    n_sink, window : int
        Ring geometry.
    rotated_out : torch.Tensor, optional
        A workspace shaped like ``raw_keys``: the keys as given (rotated) are also copied into their slots there.
    use_triton : bool, optional
        ``None``: auto (see :func:`resolve_use_triton`).
    validate : bool
        Check the arguments (and resolve ``use_triton``). ``False`` is for callers that checked their buffers once
        and pass ``use_triton`` as a bool (the cache's decoding loop).
    """
    if validate:
        tensors = [t for t in (keys, values, cos, sin, raw_keys, value_buf, rotated_out) if t is not None]
        use_triton = resolve_use_triton(use_triton, *tensors)
    if not use_triton:
        ring_store_reference(
            keys,
            values,
            cos,
            sin,
            raw_keys,
            value_buf,
            seq0=seq0,
            start=start,
            stop=stop,
            n_sink=n_sink,
            window=window,
            rotated_out=rotated_out,
            validate=validate,
        )
        return
    if validate:
        _check_store(keys, values, cos, sin, raw_keys, value_buf, seq0, start, stop, n_sink, window, rotated_out)
        _check_contiguous_rows(raw_keys, value_buf, rotated_out)
    if stop <= start:
        return
    keys, values, cos, sin = (_last_dim_contiguous(t) for t in (keys, values, cos, sin))
    batch, heads, _, head_dim = raw_keys.shape
    half = head_dim // 2
    rot = rotated_out if rotated_out is not None else raw_keys
    grid = (triton.cdiv(stop - start, _ROWS), batch * heads)
    _ring_store_kernel[grid](
        keys,
        values,
        cos,
        sin,
        raw_keys,
        value_buf,
        rot,
        heads,
        start,
        stop,
        seq0,
        n_sink,
        window,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        _batch_stride(cos),
        cos.stride(1),
        _batch_stride(sin),
        sin.stride(1),
        raw_keys.stride(0),
        raw_keys.stride(1),
        raw_keys.stride(2),
        value_buf.stride(0),
        value_buf.stride(1),
        value_buf.stride(2),
        rot.stride(0),
        rot.stride(1),
        rot.stride(2),
        HALF=half,
        BLOCK_D=triton.next_power_of_2(half),
        ROWS=_ROWS,
        WRITE_ROT=rotated_out is not None,
        num_warps=1 if half <= 32 else 2,
    )


def ring_rotate_keys(
    raw_keys: torch.Tensor,
    out: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    *,
    pos_base: int,
    start: int,
    stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
    logical_order: bool,
    use_triton: bool | None = None,
    validate: bool = True,
) -> None:
    """Write ring keys rotated to their positions (float32 math) into ``out``.

    Parameters
    ----------
    raw_keys : torch.Tensor
        ``[batch, kv_heads, n_sink + window, head_dim]``: pre-RoPE keys.
    out : torch.Tensor
        ``[batch, kv_heads, n_out, head_dim]``, any float dtype, contiguous last dimension; rows ``start ..
        stop-1`` are written.
    inv_freq : torch.Tensor
        ``[head_dim // 2]`` float32 inverse frequencies (the model's rotary ``inv_freq``).
    attention_scaling : float
        Factor applied to cos and sin (the rotary embedding's ``attention_scaling``; 1.0 for default RoPE).
    pos_base : int
        Position of logical index 0; logical index ``i`` is rotated to ``pos_base + i``.
    start, stop : int
        Rows of ``out`` to write: logical indices when ``logical_order`` (read from their physical slots), else
        physical slots (``out`` then has ``n_sink + window`` rows, in ring order).
    n_sink, window, ring_first : int
        Ring geometry; ``ring_first`` is the ring index of the window token at logical index ``n_sink``.
    logical_order : bool
        Output order (see ``start, stop``).
    use_triton : bool, optional
        ``None``: auto (see :func:`resolve_use_triton`).
    validate : bool
        As in :func:`ring_store` (with ``False``, ``inv_freq`` must be float32 on the ring's device).
    """
    if validate:
        use_triton = resolve_use_triton(use_triton, raw_keys, out, inv_freq)
    if not use_triton:
        ring_rotate_keys_reference(
            raw_keys,
            out,
            inv_freq,
            attention_scaling,
            pos_base=pos_base,
            start=start,
            stop=stop,
            n_sink=n_sink,
            window=window,
            ring_first=ring_first,
            logical_order=logical_order,
            validate=validate,
        )
        return
    if validate:
        _check_rotate(raw_keys, out, inv_freq, start, stop, n_sink, window, ring_first, logical_order)
        _check_contiguous_rows(raw_keys, out)
        inv_freq = inv_freq.to(device=raw_keys.device, dtype=torch.float32).contiguous()
    if stop <= start:
        return
    batch, heads, _, head_dim = raw_keys.shape
    half = head_dim // 2
    grid = (triton.cdiv(stop - start, _ROWS), batch * heads)
    _ring_rotate_kernel[grid](
        raw_keys,
        out,
        inv_freq,
        heads,
        start,
        stop,
        pos_base,
        n_sink,
        window,
        ring_first,
        float(attention_scaling),
        raw_keys.stride(0),
        raw_keys.stride(1),
        raw_keys.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HALF=half,
        BLOCK_D=triton.next_power_of_2(half),
        ROWS=_ROWS,
        LOGICAL=bool(logical_order),
        num_warps=1 if half <= 32 else 2,
    )


def ring_decode(
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    workspace: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    *,
    seq: int,
    pos_base: int,
    rot_start: int,
    rot_stop: int,
    n_sink: int,
    window: int,
    ring_first: int,
    use_triton: bool | None = None,
    validate: bool = True,
) -> None:
    """One decoding step in one launch: :func:`ring_store` of one token plus :func:`ring_rotate_keys` in ring order.

    Re-rotates the workspace rows ``rot_start .. rot_stop-1`` (physical slots; logical index from ``ring_first``)
    to ``pos_base + logical``, except the slot of the new token, then stores the token with stream index ``seq``:
    its un-rotated key into ``raw_keys``, its value into ``value_buf`` and its key as given (rotated by the model)
    into ``workspace``. Equivalent to the rotation followed by the store.

    Parameters
    ----------
    key, value : torch.Tensor
        ``[batch, kv_heads, 1, head_dim]``.
    cos, sin : torch.Tensor
        ``[batch or 1, 1, head_dim]``: the model's rotation of the new key.
    raw_keys, value_buf, workspace : torch.Tensor
        ``[batch, kv_heads, n_sink + window, head_dim]``.
    inv_freq : torch.Tensor
        ``[head_dim // 2]`` float32.
    attention_scaling : float
        cos/sin factor of the rotary embedding.
    seq, pos_base, rot_start, rot_stop, n_sink, window, ring_first : int
        As in :func:`ring_store` / :func:`ring_rotate_keys` (``seq`` is the store's ``seq0``).
    use_triton, validate :
        As in :func:`ring_store`.
    """
    if validate:
        use_triton = resolve_use_triton(use_triton, key, value, cos, sin, raw_keys, value_buf, workspace, inv_freq)
    if not use_triton:
        ring_decode_reference(
            key,
            value,
            cos,
            sin,
            raw_keys,
            value_buf,
            workspace,
            inv_freq,
            attention_scaling,
            seq=seq,
            pos_base=pos_base,
            rot_start=rot_start,
            rot_stop=rot_stop,
            n_sink=n_sink,
            window=window,
            ring_first=ring_first,
            validate=validate,
        )
        return
    if validate:
        _check_decode(
            key,
            value,
            cos,
            sin,
            raw_keys,
            value_buf,
            workspace,
            inv_freq,
            seq,
            rot_start,
            rot_stop,
            n_sink,
            window,
            ring_first,
        )
        _check_contiguous_rows(raw_keys, value_buf, workspace)
        inv_freq = inv_freq.to(device=raw_keys.device, dtype=torch.float32).contiguous()
    _launch_ring_decode(
        key,
        value,
        cos,
        sin,
        raw_keys,
        value_buf,
        workspace,
        inv_freq,
        attention_scaling,
        seq_ptr=None,
        slot=seq if seq < n_sink else n_sink + (seq - n_sink) % window,
        rot_start=rot_start,
        rot_stop=rot_stop,
        pos_base=pos_base,
        n_sink=n_sink,
        window=window,
        ring_first=ring_first,
    )


def _launch_ring_decode(
    key,
    value,
    cos,
    sin,
    raw_keys,
    value_buf,
    workspace,
    inv_freq,
    attention_scaling,
    *,
    seq_ptr,
    slot,
    rot_start,
    rot_stop,
    pos_base,
    n_sink,
    window,
    ring_first,
) -> None:
    """Launch ``_ring_decode_kernel``; ``seq_ptr`` (a device tensor) makes it read the stream index on the device
    (then ``slot`` and ``ring_first`` are derived from it, steady state only)."""
    key, value, cos, sin = (_last_dim_contiguous(t) for t in (key, value, cos, sin))
    batch, heads, _, head_dim = raw_keys.shape
    half = head_dim // 2
    grid = (1 + triton.cdiv(max(rot_stop - rot_start, 0), _ROWS), batch * heads)
    _ring_decode_kernel[grid](
        key,
        value,
        cos,
        sin,
        raw_keys,
        value_buf,
        workspace,
        inv_freq,
        seq_ptr if seq_ptr is not None else inv_freq,  # unused when SEQ_FROM_PTR is False
        heads,
        slot,
        rot_start,
        rot_stop,
        pos_base,
        n_sink,
        window,
        ring_first,
        float(attention_scaling),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        _batch_stride(cos),
        _batch_stride(sin),
        raw_keys.stride(0),
        raw_keys.stride(1),
        raw_keys.stride(2),
        value_buf.stride(0),
        value_buf.stride(1),
        value_buf.stride(2),
        workspace.stride(0),
        workspace.stride(1),
        workspace.stride(2),
        HALF=half,
        BLOCK_D=triton.next_power_of_2(half),
        ROWS=_ROWS,
        SEQ_FROM_PTR=seq_ptr is not None,
        num_warps=1 if half <= 32 else 2,
    )


def _steady_ring_first(seq: int, n_sink: int, window: int) -> int:
    """Ring index of the oldest window token after a steady-state step with stream index ``seq`` (the kernel's
    ``SEQ_FROM_PTR`` branch computes the same)."""
    return (seq + 1 - n_sink) % window


def ring_decode_steady(
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    raw_keys: torch.Tensor,
    value_buf: torch.Tensor,
    workspace: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    *,
    seq: torch.Tensor,
    n_sink: int,
    window: int,
    use_triton: bool | None = None,
) -> None:
    """:func:`ring_decode` in the steady state, with the stream index read on the device: CUDA-graph replayable.

    Once the ring is full (``seq >= n_sink + window - 1``) and positions are assigned inside the cache, a decoding
    step always rotates every slot to ``0 .. n_sink + window - 1`` (``pos_base = 0``); only the new token's slot and
    the ring's oldest slot move, and both follow from ``seq``. Reading ``seq`` from a device tensor (``int64``,
    one element) lets one captured CUDA graph serve every later step: the caller sets ``seq`` before each replay.

    Parameters
    ----------
    seq : torch.Tensor
        One-element ``int64`` tensor on the buffers' device: the stream index of the new token.
    Other parameters
        As in :func:`ring_decode`.
    """
    if not isinstance(seq, torch.Tensor) or seq.numel() != 1 or seq.dtype != torch.int64:
        raise ValueError("ring_decode_steady needs `seq` as a one-element int64 tensor on the buffers' device.")
    capacity = n_sink + window
    use_triton = resolve_use_triton(use_triton, key, value, cos, sin, raw_keys, value_buf, workspace, inv_freq)
    if not use_triton:
        seq_int = int(seq.reshape(()).item())
        if seq_int < capacity - 1:
            raise ValueError(f"ring_decode_steady needs a full ring: seq {seq_int} < n_sink + window - 1.")
        ring_decode_reference(
            key,
            value,
            cos,
            sin,
            raw_keys,
            value_buf,
            workspace,
            inv_freq,
            attention_scaling,
            seq=seq_int,
            pos_base=0,
            rot_start=0,
            rot_stop=capacity,
            n_sink=n_sink,
            window=window,
            ring_first=_steady_ring_first(seq_int, n_sink, window),
            validate=False,
        )
        return
    if seq.device != raw_keys.device:
        raise ValueError(f"seq is on {seq.device}, the ring on {raw_keys.device}.")
    _launch_ring_decode(
        key,
        value,
        cos,
        sin,
        raw_keys,
        value_buf,
        workspace,
        inv_freq,
        attention_scaling,
        seq_ptr=seq,
        slot=0,
        rot_start=0,
        rot_stop=capacity,
        pos_base=0,
        n_sink=n_sink,
        window=window,
        ring_first=0,
    )


__all__ = [
    "FORCE_REFERENCE_ENV",
    "HAS_TRITON",
    "resolve_use_triton",
    "ring_decode",
    "ring_decode_reference",
    "ring_decode_steady",
    "ring_rotate_keys",
    "ring_rotate_keys_reference",
    "ring_store",
    "ring_store_reference",
    "triton_interpreted",
]
