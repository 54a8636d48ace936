"""Attention straight from CommVQ codes: a split-K (flash-decoding) Triton kernel beside its PyTorch reference.

CommVQ (Li et al., ICML 2025, arXiv 2506.18879) stores, per token ``t`` and KV head, ``R`` 12-bit codes
``C_r = 64 A_r + B_r``; for RoPE pair ``p`` the key is the complex number

    K_{t,p} = n_t * sum_r (z_{A_r,p} + i z_{B_r,p}),     z_{A,p} = theta[2A, p] + i theta[2A+1, p],

and because a center is a complex number it commutes with RoPE: the rotated key is ``K_{t,p} e^{i phi_p pos_t}``.
The score of a (rotated) query is ``q.k = sum_p Re(Q_p conj(K_{t,p} e^{i phi_p pos_t}))``. Values are coded per
token and layer (all KV heads together): ``v_t = s * c_t * (bits_t @ E)`` with the channel scale ``s``, a per-token
coefficient ``c_t = (prescale_t + eps) / (postscale_t + eps)`` and the binary codebook ``E``, so the attention output
of a query head over KV head ``g`` is ``s_g * ((sum_t p_t c_t bits_t) @ E[:, g])``: the kernel accumulates
probability-weighted bits and one small matmul per head finishes.

Kernel design (:func:`decode_attention`): one program per (split of the sequence, batch row x KV head, chunk of the
value bits). It loads the ``G`` query heads of its KV head once, then per block of tokens reads only the packed codes
(``1.5 R`` bytes per token and head), gathers two complex entries per residual and pair from the small ``theta``
table (L1/L2 resident), sums them (the key never exists in HBM), rotates once per token and pair by the token's
position, scales by ``n_t``, and runs the online softmax; the value side multiplies the ``c_t``-weighted
probabilities with the unpacked bits on tensor cores. One extra program per KV head attends to the full-precision
recent window (pre-RoPE keys rotated the same way) in the same launch. A second kernel merges the splits
(log-sum-exp) and the window. The reference's alternative (look-up tables ``q . z_A`` per query head, residual and
pair) costs ``G`` times more gathers under GQA, because the key reconstruction is not shared by the query heads of a
group; we keep the direct design.

:func:`decode_attention_reference` computes the same quantity by dequantizing every key and value and running a plain
softmax attention in float32; :func:`chunk_attention` serves several new tokens at once (a prefill chunk or a
question), dequantizing the codes block by block.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from pressroom.kernels.commvq_codebook import N_ENTRIES, THETA_ROWS, additive_parts
from pressroom.kernels.commvq_encode import unpack_bits, unpack_codes12
from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton, triton_interpreted

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from pressroom.kernels.f16x2 import _f16_halves, _hadd2

LOG2E = 1.4426950408889634


@dataclass
class CodedKV:
    """One layer's coded tokens and full-precision window, as the attention reads them.

    Attributes
    ----------
    codes : uint8 ``[B, H, cap, ceil(1.5 R)]`` packed key codes (first ``n`` tokens valid).
    knorm : ``[B, cap]`` key norms ``n_t``.
    vcoef : ``[B, cap]`` value coefficients ``c_t``.
    pos : int32 ``[B, cap]`` (one position per token) or ``[B, H, cap]`` (per head, after per-head eviction).
    vbits : uint8 ``[B, cap, n_bits / 8]`` packed value bits.
    n : number of valid coded tokens.
    wkeys : ``[B, H, wcap, D]`` pre-RoPE window keys, interleaved layout.
    wvals : ``[B, H, wcap, D]`` window values.
    wpos : int32 ``[B, wcap]`` window positions.
    nw : number of valid window tokens.
    """

    codes: torch.Tensor
    knorm: torch.Tensor
    vcoef: torch.Tensor
    pos: torch.Tensor
    vbits: torch.Tensor
    n: int
    wkeys: torch.Tensor
    wvals: torch.Tensor
    wpos: torch.Tensor
    nw: int


@dataclass
class LayerBooks:
    """One layer's codebooks in the layouts the attention reads (:meth:`build`).

    Attributes
    ----------
    theta : ``[H, R, 128, P]`` float32 key codebooks.
    ztab : ``[H, R, 64, P, 2]`` float32: ``ztab[h, r, A, p] = (theta[2A, p], theta[2A+1, p])``.
    ztab16 : the same table in float16 when that is exact (codebooks stored in float16, as the native format does),
        else ``None``; the kernel then gathers 4 instead of 8 bytes per entry.
    emb : ``[n_bits, H, D]`` float32 value codebook ``E`` split per head.
    chscale : ``[H, D]`` float32 channel scale ``s + eps``.
    inv_freq : ``[P]`` float32 RoPE inverse frequencies; ``rope_scale``: the rotary ``attention_scaling``.
    """

    theta: torch.Tensor
    ztab: torch.Tensor
    ztab16: torch.Tensor | None
    emb: torch.Tensor
    chscale: torch.Tensor
    inv_freq: torch.Tensor
    rope_scale: float

    @classmethod
    def build(
        cls,
        theta: torch.Tensor,
        embedding: torch.Tensor,
        channel_scale: torch.Tensor,
        inv_freq: torch.Tensor,
        rope_scale: float = 1.0,
        device: torch.device | str | None = None,
    ) -> LayerBooks:
        """From ``theta [H, R, 128, P]``, ``embedding [n_bits, H*D]``, ``channel_scale [H*D]`` (with ``+ eps``)."""
        if theta.dim() != 4 or theta.shape[2] != THETA_ROWS:
            raise ValueError(f"theta must be [H_kv, R, 128, P], got {tuple(theta.shape)}.")
        h, r, _, p = theta.shape
        if embedding.dim() != 2 or embedding.shape[1] != h * 2 * p:
            raise ValueError(f"value embedding must be [n_bits, {h * 2 * p}], got {tuple(embedding.shape)}.")
        if embedding.shape[0] % 8:
            raise ValueError(f"value bits per token must be a multiple of 8, got {embedding.shape[0]}.")
        theta = theta.detach().to(device=device, dtype=torch.float32).contiguous()
        ztab = theta.view(h, r, N_ENTRIES, 2, p).transpose(-1, -2).contiguous()
        emb = embedding.detach().to(device=device, dtype=torch.float32).view(-1, h, 2 * p).contiguous()
        chscale = channel_scale.detach().to(device=device, dtype=torch.float32).view(h, 2 * p).contiguous()
        inv = inv_freq.detach().to(device=device, dtype=torch.float32).contiguous()
        half = ztab.half()
        ztab16 = half.contiguous() if torch.equal(half.float(), ztab) else None
        return cls(theta, ztab, ztab16, emb, chscale, inv, float(rope_scale))

    @property
    def n_bits(self) -> int:
        return self.emb.shape[0]


# ---------------------------------------------------------------------------------------------------- dequantization
def rotate_interleaved(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotate interleaved vectors ``[..., N, D]`` by RoPE at positions ``pos`` (broadcastable to ``[..., N]``)."""
    phi = pos.float()[..., None] * inv_freq.float()  # [..., N, P]
    c, s = phi.cos() * scale, phi.sin() * scale
    xr, xi = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((xr * c - xi * s, xr * s + xi * c), dim=-1).flatten(-2)


def dequantize_keys(kv: CodedKV, books: LayerBooks, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rotated keys ``[B, H, stop-start, D]`` (float32, interleaved) of coded tokens ``start .. stop-1``.

    A key is the sum of ``2R`` rows of the layer's small additive table (``u_A + w_B`` per residual, 128 rows of
    ``D`` per residual and head), so the sum is one ``embedding_bag`` over that table: it never builds the 4096
    centers nor a ``[n, R, D]`` intermediate.
    """
    stop = kv.n if stop is None else stop
    codes = unpack_codes12(kv.codes[:, :, start:stop], books.theta.shape[1])  # [B, H, n, R]
    b, h, n, r = codes.shape
    u, w = additive_parts(books.theta)  # [H, R, 64, D] each
    table = torch.cat((u, w), dim=2).reshape(h * r * 2 * N_ENTRIES, -1)  # row (h R + r) 128 + A, then + 64 + B
    base = (torch.arange(h * r, device=codes.device).view(h, 1, r) * (2 * N_ENTRIES))[None]  # [1, H, 1, R]
    rows = torch.cat((base + (codes >> 6), base + N_ENTRIES + (codes & (N_ENTRIES - 1))), dim=-1)
    keys = torch.nn.functional.embedding_bag(rows.reshape(-1, 2 * r), table, mode="sum").view(b, h, n, table.shape[-1])
    keys = keys * kv.knorm[:, None, start:stop, None].float()
    pos = kv.pos[:, None, start:stop] if kv.pos.dim() == 2 else kv.pos[:, :, start:stop]
    return rotate_interleaved(keys, pos, books.inv_freq, books.rope_scale)


def dequantize_values(kv: CodedKV, books: LayerBooks, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Values ``[B, H, stop-start, D]`` (float32) of coded tokens ``start .. stop-1``."""
    stop = kv.n if stop is None else stop
    bits = unpack_bits(kv.vbits[:, start:stop], torch.float32)  # [B, n, n_bits]
    v = torch.einsum("bnk,khd->bhnd", bits, books.emb)
    return v * kv.vcoef[:, None, start:stop, None].float() * books.chscale[None, :, None, :]


def weighted_values(p: torch.Tensor, kv: CodedKV, books: LayerBooks) -> torch.Tensor:
    """``sum_t p_t v_t`` over the coded tokens without dequantizing them: ``s_g * ((p * c) @ bits) @ E[:, g]``.

    ``p [B, H, G, nq, n]`` float32 weights; returns ``[B, H, G, nq, D]``. The value side of the kernels' design,
    in PyTorch: ``n x n_bits`` multiply-adds per query head instead of ``n x n_bits x D`` per KV head.
    """
    bits = unpack_bits(kv.vbits[:, : kv.n], torch.float32)  # [B, n, n_bits]
    pc = p * kv.vcoef[:, None, None, None, : kv.n].float()
    acc = torch.einsum("bhgqn,bnk->bhgqk", pc, bits)
    return torch.einsum("bhgqk,khd->bhgqd", acc, books.emb) * books.chscale[None, :, None, None, :]


def window_keys(kv: CodedKV, books: LayerBooks) -> torch.Tensor:
    """Rotated window keys ``[B, H, nw, D]`` (float32, interleaved)."""
    return rotate_interleaved(kv.wkeys[:, :, : kv.nw], kv.wpos[:, None, : kv.nw], books.inv_freq, books.rope_scale)


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """``q [B, H, G, nq, D]`` (scaled), ``k, v [B, H, n, D]``: output ``[B, H, G, nq, D]`` and lse ``[B, H, G, nq]``."""
    s = torch.einsum("bhgqd,bhnd->bhgqn", q, k.float())
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp_min(-1e30)[..., None])
    return torch.einsum("bhgqn,bhnd->bhgqd", p, v.float()), lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    out = sum(o * torch.exp(lse - total.clamp_min(-1e30))[..., None] for o, lse in parts)
    return out, total


def decode_attention_reference(q: torch.Tensor, kv: CodedKV, books: LayerBooks, scaling: float) -> torch.Tensor:
    """Plain-PyTorch attention of one new token over the dequantized cache (codes + window), float32.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, D]`` rotated queries, interleaved layout.
    scaling : float
        Softmax scale (``1/sqrt(D)`` for most models).

    Returns
    -------
    torch.Tensor
        ``[B, Hq, D]`` float32 (values keep the model's layout; only keys and queries are interleaved).
    """
    b, hq, d = q.shape
    h = kv.codes.shape[1]
    qg = q.float().view(b, h, hq // h, 1, d) * scaling
    s = torch.cat(
        (
            torch.einsum("bhgqd,bhnd->bhgqn", qg, dequantize_keys(kv, books)),
            torch.einsum("bhgqd,bhnd->bhgqn", qg, window_keys(kv, books)),
        ),
        dim=-1,
    )
    p = torch.softmax(s, dim=-1)
    out = weighted_values(p[..., : kv.n], kv, books)
    out = out + torch.einsum("bhgqn,bhnd->bhgqd", p[..., kv.n :], kv.wvals[:, :, : kv.nw].float())
    return out.reshape(b, hq, d)


def chunk_attention(
    q: torch.Tensor,
    kv: CodedKV,
    books: LayerBooks,
    scaling: float,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    new_pos: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """Attention of ``nq`` new tokens over the coded tokens, the window and themselves (causal), float32.

    ``q [B, Hq, nq, D]`` rotated, interleaved; ``new_keys`` pre-RoPE interleaved ``[B, H, nq, D]``; ``new_pos`` int
    ``[nq]``. The coded tokens are dequantized ``block`` at a time (never the whole prefix at once), so the peak holds
    one block of float32 keys/values for one layer. Returns ``[B, Hq, nq, D]`` float32.
    """
    b, hq, nq, d = q.shape
    h = kv.codes.shape[1]
    qg = q.float().view(b, h, hq // h, nq, d) * scaling
    if block is None:
        block = max(256, (1 << 27) // max(1, hq * nq))
    parts = []
    for s in range(0, kv.n, block):
        e = min(kv.n, s + block)
        parts.append(_attend_lse(qg, dequantize_keys(kv, books, s, e), dequantize_values(kv, books, s, e)))
    keys = torch.cat(
        (window_keys(kv, books), rotate_interleaved(new_keys, new_pos[None, None], books.inv_freq, books.rope_scale)),
        dim=2,
    )
    values = torch.cat((kv.wvals[:, :, : kv.nw].float(), new_values.float()), dim=2)
    causal = torch.ones(nq, kv.nw + nq, dtype=torch.bool, device=q.device)
    causal[:, kv.nw :] = torch.tril(causal[:, kv.nw :])
    parts.append(_attend_lse(qg, keys, values, causal))
    out, _ = _merge(parts)
    return out.reshape(b, hq, nq, d)


# ---------------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:

    @triton.jit
    def _add_center(
        kx, ky, ztab_ptr, g, r, code, pp, pmask, R: tl.constexpr, P: tl.constexpr, TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr = False,
    ):  # fmt: skip
        """``(kx, ky) += z_A + i z_B`` of code ``64 A + B`` of residual ``r``: one gather per entry, ``(x, y)`` of
        ``z_A`` and of ``z_B`` packed in one int64 (float32 table) or int32 (float16 table). ``GATHER_TABLE``: the
        residual's whole ``[64, P]`` table is loaded once (coalesced) and both entries are gathered from it on chip
        (``tl.gather``) instead of from global memory row by row."""
        if GATHER_TABLE:
            ks = tl.arange(0, 64)
            tab = tl.load(ztab_ptr + ((g * R + r) * 64 + ks)[:, None] * P + pp[None, :], mask=pmask[None, :], other=0)
            zero = tl.zeros_like(pp)[None, :]
            za = tl.gather(tab, (code >> 6)[:, None] + zero, 0)
            zb = tl.gather(tab, (code & 63)[:, None] + zero, 0)
        else:
            za = tl.load(
                ztab_ptr + (((g * R + r) * 64 + (code >> 6)) * P)[:, None] + pp[None, :], mask=pmask[None, :], other=0
            )
            zb = tl.load(
                ztab_ptr + (((g * R + r) * 64 + (code & 63)) * P)[:, None] + pp[None, :], mask=pmask[None, :], other=0
            )
        if TABLE_FP16:  # (x, y) as two float16 in one int32: half the bytes, L1-resident at R=11
            xa = (za & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            ya = ((za >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            xb = (zb & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            yb = ((zb >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            xa = (za & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            ya = (za >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
            xb = (zb & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            yb = (zb >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        return kx + (xa - yb), ky + (ya + xb)

    @triton.jit
    def _add_center_h2(
        sa, sb, ztab_ptr, g, r, code, pp, pmask, R: tl.constexpr, P: tl.constexpr, NATIVE: tl.constexpr
    ):  # fmt: skip
        """Float16 accumulation (``key_accum="fp16"``): ``sa += z_A`` and ``sb += z_B`` of code ``64 A + B`` of
        residual ``r``, each ``(x, y)`` pair one packed ``f16x2`` add on the gathered int32 entry (the key is
        ``sa + i sb``, formed once per token in float32 by :func:`_h2_key`)."""
        row = (g * R + r) * 64
        za = tl.load(ztab_ptr + ((row + (code >> 6)) * P)[:, None] + pp[None, :], mask=pmask[None, :], other=0)
        zb = tl.load(ztab_ptr + ((row + (code & 63)) * P)[:, None] + pp[None, :], mask=pmask[None, :], other=0)
        return _hadd2(sa, za, NATIVE), _hadd2(sb, zb, NATIVE)

    @triton.jit
    def _h2_key(sa, sb):
        """``(kx, ky)`` float32 of the key ``sa + i sb`` from the two packed float16 sums."""
        ax, ay = _f16_halves(sa)
        bx, by = _f16_halves(sb)
        return ax.to(tl.float32) - by.to(tl.float32), ay.to(tl.float32) + bx.to(tl.float32)

    @triton.jit
    def _add_code(
        k0, k1, ztab_ptr, g, r, code, pp, pmask, R: tl.constexpr, P: tl.constexpr, TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr, ACC_FP16: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """One code's entries into the key's accumulators: packed float16 sums ``(sum z_A, sum z_B)`` when
        ``ACC_FP16`` (:func:`_add_center_h2`), else the float32 ``(x, y)`` (:func:`_add_center`)."""
        if ACC_FP16:
            return _add_center_h2(k0, k1, ztab_ptr, g, r, code, pp, pmask, R, P, NATIVE)
        else:
            return _add_center(k0, k1, ztab_ptr, g, r, code, pp, pmask, R, P, TABLE_FP16, GATHER_TABLE)

    @triton.jit
    def _mask_if(mask, cond):
        """``mask`` where the scalar ``cond`` holds, else all off (a runtime or a constant ``cond``)."""
        return tl.where(cond, mask, tl.zeros_like(mask))

    @triton.jit
    def _code_pair_bytes(crow, j, tmask, R: tl.constexpr):
        """The three bytes ``3 j .. 3 j + 2`` of each token's code row ``crow`` (codes ``2 j`` and ``2 j + 1``, 12
        bits each; the third byte only when ``2 j + 1 < R``, else 0), as int32."""
        b0 = tl.load(crow + 3 * j, mask=tmask, other=0).to(tl.int32)
        b1 = tl.load(crow + 3 * j + 1, mask=tmask, other=0).to(tl.int32)
        b2 = tl.load(crow + 3 * j + 2, mask=_mask_if(tmask, 2 * j + 1 < R), other=0).to(tl.int32)
        return b0, b1, b2

    @triton.jit
    def _add_code_pair_bytes(
        k0, k1, b0, b1, b2, ztab_ptr, g, j, pp, pmask, R: tl.constexpr, P: tl.constexpr, TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr, ACC_FP16: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """The codes ``2 j`` and ``2 j + 1`` of the bytes ``b0, b1, b2`` (:func:`_code_pair_bytes`; the second code
        only when ``2 j + 1 < R``) into the key's accumulators (:func:`_add_code`)."""
        k0, k1 = _add_code(
            k0, k1, ztab_ptr, g, 2 * j, b0 | ((b1 & 15) << 8), pp, pmask, R, P, TABLE_FP16, GATHER_TABLE, ACC_FP16,
            NATIVE,
        )  # fmt: skip
        if 2 * j + 1 < R:
            k0, k1 = _add_code(
                k0, k1, ztab_ptr, g, 2 * j + 1, (b1 >> 4) | (b2 << 4), pp, pmask, R, P, TABLE_FP16, GATHER_TABLE,
                ACC_FP16, NATIVE,
            )  # fmt: skip
        return k0, k1

    @triton.jit
    def _add_code_pair(
        k0, k1, crow, tmask, ztab_ptr, g, j, pp, pmask, R: tl.constexpr, P: tl.constexpr, TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr, ACC_FP16: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """The codes ``2 j`` and ``2 j + 1`` of each token's row ``crow`` into the key's accumulators: their bytes
        (:func:`_code_pair_bytes`) and :func:`_add_code_pair_bytes`."""
        b0, b1, b2 = _code_pair_bytes(crow, j, tmask, R)
        return _add_code_pair_bytes(
            k0, k1, b0, b1, b2, ztab_ptr, g, j, pp, pmask, R, P, TABLE_FP16, GATHER_TABLE, ACC_FP16, NATIVE
        )

    @triton.jit
    def _rope_cos_sin(phi, FAST: tl.constexpr, NATIVE: tl.constexpr):
        """``cos(phi), sin(phi)`` of the RoPE angles. ``FAST``: ``phi`` reduced to about ``[-pi, pi]`` with two FMAs
        (``2 pi`` split in a float32 head and tail: the reduction adds under 1e-6 rad up to 2^24 rad) and then the
        hardware approximations (``sin.approx``/``cos.approx``, absolute error about 5e-7 there) when
        ``NATIVE``, ``tl.cos``/``tl.sin`` of the reduced angle in the interpreter; else ``tl.cos``/``tl.sin``
        (libdevice, exact to float32 rounding, with a slow path past ``|phi| ~ 1e5`` rad)."""
        if FAST:
            k = tl.floor(phi * 0.15915494309189535 + 0.5)
            red = tl.fma(-k, 6.2831854820251465, phi)
            red = tl.fma(-k, -1.7484555314695172e-07, red)
            if NATIVE:
                return libdevice.fast_cosf(red), libdevice.fast_sinf(red)
            else:
                return tl.cos(red), tl.sin(red)
        else:
            return tl.cos(phi), tl.sin(phi)

    @triton.jit
    def _group_queries(
        q_ptr, invf_ptr, b, g, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_P: tl.constexpr, p0=0,
    ):  # fmt: skip
        """The ``G`` (pre-scaled, interleaved) query heads of KV head ``g`` of batch row ``b`` as ``(x, y)`` pair
        halves ``[BLOCK_G, BLOCK_P]`` (the pairs ``p0 .. p0 + BLOCK_P``), their row mask and head indices, the pair
        indices and the RoPE frequencies."""
        rows = tl.arange(0, BLOCK_G)
        rmask = rows < G
        pp = p0 + tl.arange(0, BLOCK_P)
        pmask = pp < P
        hq = g * G + rows
        q_base = q_ptr + (b * H * G + hq)[:, None] * (2 * P)
        qx = tl.load(q_base + 2 * pp[None, :], mask=rmask[:, None] & pmask[None, :], other=0.0)
        qy = tl.load(q_base + 2 * pp[None, :] + 1, mask=rmask[:, None] & pmask[None, :], other=0.0)
        invf = tl.load(invf_ptr + pp, mask=pmask, other=0.0)
        return rmask, pp, pmask, hq, qx, qy, invf

    @triton.jit
    def _code_block_scores(
        qx,
        qy,
        invf,
        codes_ptr,
        knorm_ptr,
        pos_ptr,
        ztab_ptr,
        b,
        g,
        tok,
        tmask,
        pp,
        pmask,
        rope_scale,
        j0,
        j1,
        s_cb,
        s_ch,
        s_cn,
        s_kb,
        s_pb,
        s_ph,
        R: tl.constexpr,
        P: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        USE_DOT: tl.constexpr,
        TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr = False,
        ACC_FP16: tl.constexpr = False,
        FAST_ROPE: tl.constexpr = False,
        NATIVE: tl.constexpr = False,
        UNROLL: tl.constexpr = False,
        CODE_PREFETCH: tl.constexpr = False,
    ):
        """Scores ``[BLOCK_G, BLOCK_T]`` of the (pre-scaled) queries of KV head ``g`` against the coded tokens ``tok``:
        each key is summed from its codes' table entries, rotated to its position and scaled by its norm (the key never
        exists in HBM); ``-inf`` where ``tmask`` is off. Only the residual pairs ``j0 <= j < j1`` (codes ``2j`` and
        ``2j + 1``) are summed: the score is linear in the key, so parts of the residuals give partial scores.
        ``ACC_FP16`` (float16 table only): the entries are summed as packed float16 pairs (:func:`_add_center_h2`);
        ``FAST_ROPE``: see :func:`_rope_cos_sin`; ``CODE_PREFETCH`` (runtime loop only): the next residual pair's code
        bytes are loaded before this pair's gathers, so that the gathers' addresses never wait on a code load."""
        crow = codes_ptr + b * s_cb + g * s_ch + tok * s_cn
        # a runtime loop over residual pairs (two codes in three bytes): a fully unrolled loop over R lets ptxas hoist
        # all 2 R gathers (8 registers each per thread at BLOCK_T=32, P=64) and spill
        if ACC_FP16:  # two packed float16 sums (z_A and z_B entries), see _add_code
            k0 = tl.zeros((BLOCK_T, BLOCK_P), tl.int32)  # float16 (0, 0)
            k1 = tl.zeros((BLOCK_T, BLOCK_P), tl.int32)
        else:  # the key's (x, y) in float32
            k0 = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)
            k1 = tl.zeros((BLOCK_T, BLOCK_P), tl.float32)
        if UNROLL:  # every residual pair in one straight block: all code loads and gathers may be in flight at once
            for j in tl.static_range((R + 1) // 2):
                k0, k1 = _add_code_pair(
                    k0, k1, crow, tmask, ztab_ptr, g, j, pp, pmask, R, P, TABLE_FP16, GATHER_TABLE, ACC_FP16, NATIVE
                )
        elif CODE_PREFETCH:  # the bytes of pair j + 1 in flight while pair j's entries are gathered and added
            n0, n1, n2 = _code_pair_bytes(crow, j0, _mask_if(tmask, j0 < j1), R)
            for j in range(j0, j1):
                c0, c1, c2 = n0, n1, n2
                n0, n1, n2 = _code_pair_bytes(crow, j + 1, _mask_if(tmask, j + 1 < j1), R)
                k0, k1 = _add_code_pair_bytes(
                    k0, k1, c0, c1, c2, ztab_ptr, g, j, pp, pmask, R, P, TABLE_FP16, GATHER_TABLE, ACC_FP16, NATIVE
                )
        else:
            for j in range(j0, j1):
                k0, k1 = _add_code_pair(
                    k0, k1, crow, tmask, ztab_ptr, g, j, pp, pmask, R, P, TABLE_FP16, GATHER_TABLE, ACC_FP16, NATIVE
                )
        if ACC_FP16:
            kx, ky = _h2_key(k0, k1)
        else:
            kx, ky = k0, k1
        pos = tl.load(pos_ptr + b * s_pb + g * s_ph + tok, mask=tmask, other=0).to(tl.float32)
        phi = pos[:, None] * invf[None, :]
        cs, sn = _rope_cos_sin(phi, FAST_ROPE, NATIVE)
        rx = kx * cs - ky * sn
        ry = kx * sn + ky * cs
        nrm = tl.load(knorm_ptr + b * s_kb + tok, mask=tmask, other=0.0).to(tl.float32) * rope_scale
        if USE_DOT:  # tensor cores (tf32 inputs, float32 accumulation)
            sc = tl.dot(qx, tl.trans(rx)) + tl.dot(qy, tl.trans(ry))
        else:
            sc = tl.sum(qx[:, None, :] * rx[None, :, :] + qy[:, None, :] * ry[None, :, :], axis=2)
        sc = sc * nrm[None, :]
        return tl.where(tmask[None, :], sc, float("-inf"))

    @triton.jit
    def _add_code_chunks(
        a0, a1, a2, a3, b0, b1, b2, b3, ztab_ptr, g, r, code, p0, lanes, R: tl.constexpr, P: tl.constexpr,
        CH: tl.constexpr, NCH: tl.constexpr, NATIVE: tl.constexpr,
    ):  # fmt: skip
        """:func:`_add_center_h2` over ``NCH`` tiles of ``CH`` pairs each (pairs ``p0 + c CH + lanes``): every tile
        has the same layout, so a thread holds the same token row in all of them and computes the row's two table
        addresses once for its ``NCH`` loads of each entry (constant offsets), instead of once per 4 pairs."""
        row = (g * R + r) * 64
        pa = ztab_ptr + ((row + (code >> 6)) * P + p0)[:, None] + lanes[None, :]
        pb = ztab_ptr + ((row + (code & 63)) * P + p0)[:, None] + lanes[None, :]
        a0 = _hadd2(a0, tl.load(pa), NATIVE)
        b0 = _hadd2(b0, tl.load(pb), NATIVE)
        if NCH > 1:
            a1 = _hadd2(a1, tl.load(pa + CH), NATIVE)
            b1 = _hadd2(b1, tl.load(pb + CH), NATIVE)
        if NCH > 2:
            a2 = _hadd2(a2, tl.load(pa + 2 * CH), NATIVE)
            b2 = _hadd2(b2, tl.load(pb + 2 * CH), NATIVE)
            a3 = _hadd2(a3, tl.load(pa + 3 * CH), NATIVE)
            b3 = _hadd2(b3, tl.load(pb + 3 * CH), NATIVE)
        return a0, a1, a2, a3, b0, b1, b2, b3

    @triton.jit
    def _code_at(crow, r, tmask):
        """The 12-bit code of residual ``r`` of each token row ``crow`` (codes ``2 j`` and ``2 j + 1`` in the three
        bytes ``3 j .. 3 j + 2``: the even one is the low 12 bits, the odd one the high 12)."""
        first = 3 * (r // 2) + (r % 2)
        lo = tl.load(crow + first, mask=tmask, other=0).to(tl.int32)
        hi = tl.load(crow + first + 1, mask=tmask, other=0).to(tl.int32)
        sh = (r % 2) * 4
        return ((lo >> sh) | (hi << (8 - sh))) & 4095

    @triton.jit
    def _gather_chunks(ztab_ptr, g, r, code, p0, lanes, R: tl.constexpr, P: tl.constexpr, CH: tl.constexpr,
                       NCH: tl.constexpr):  # fmt: skip
        """The ``z_A`` and ``z_B`` entries (packed float16 pairs) of code ``64 A + B`` of residual ``r`` in ``NCH``
        tiles of ``CH`` pairs (unused tiles: the first one again, never read)."""
        row = (g * R + r) * 64
        pa = ztab_ptr + ((row + (code >> 6)) * P + p0)[:, None] + lanes[None, :]
        pb = ztab_ptr + ((row + (code & 63)) * P + p0)[:, None] + lanes[None, :]
        a0 = tl.load(pa)
        b0 = tl.load(pb)
        a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
        if NCH > 1:
            a1 = tl.load(pa + CH)
            b1 = tl.load(pb + CH)
        if NCH > 2:
            a2 = tl.load(pa + 2 * CH)
            b2 = tl.load(pb + 2 * CH)
            a3 = tl.load(pa + 3 * CH)
            b3 = tl.load(pb + 3 * CH)
        return a0, a1, a2, a3, b0, b1, b2, b3

    @triton.jit
    def _chunk_scores(
        sa, sb, pos, q_ptr, qrow, rmask, invf_ptr, pc, FAST_ROPE: tl.constexpr, NATIVE: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):  # fmt: skip
        """Partial scores ``[BLOCK_G, BLOCK_T]`` over the pairs ``pc`` of one tile: the key from its packed float16
        sums (:func:`_h2_key`), rotated to the tokens' positions, dotted with the query heads' same pairs."""
        kx, ky = _h2_key(sa, sb)
        invf = tl.load(invf_ptr + pc)
        cs, sn = _rope_cos_sin(pos[:, None] * invf[None, :], FAST_ROPE, NATIVE)
        rx = kx * cs - ky * sn
        ry = kx * sn + ky * cs
        qmask = rmask[:, None] & (pc >= 0)[None, :]
        qx = tl.load(q_ptr + qrow[:, None] + 2 * pc[None, :], mask=qmask, other=0.0)
        qy = tl.load(q_ptr + qrow[:, None] + 2 * pc[None, :] + 1, mask=qmask, other=0.0)
        if USE_DOT:
            return tl.dot(qx, tl.trans(rx)) + tl.dot(qy, tl.trans(ry))
        else:
            return tl.sum(qx[:, None, :] * rx[None, :, :] + qy[:, None, :] * ry[None, :, :], axis=2)

    @triton.jit
    def _code_block_scores_chunked(
        q_ptr, qrow, rmask, invf_ptr, codes_ptr, knorm_ptr, pos_ptr, ztab_ptr, b, g, tok, tmask, p0, rope_scale,
        s_cb, s_ch, s_cn, s_kb, s_pb, s_ph, R: tl.constexpr, P: tl.constexpr, BLOCK_T: tl.constexpr,
        CH: tl.constexpr, NCH: tl.constexpr, USE_DOT: tl.constexpr, FAST_ROPE: tl.constexpr, NATIVE: tl.constexpr,
        PREFETCH: tl.constexpr = False,
    ):  # fmt: skip
        """:func:`_code_block_scores` (float16 sums, global gathers) over the pairs ``p0 .. p0 + NCH CH`` held as
        ``NCH`` tiles of ``CH`` pairs (``pair_chunks``, see :func:`_add_code_chunks`). ``PREFETCH``: one residual
        step per iteration, whose gathers are issued before the previous step's entries are added, so that two
        steps' loads are in flight at once (``key_prefetch``)."""
        crow = codes_ptr + b * s_cb + g * s_ch + tok * s_cn
        lanes = tl.arange(0, CH)
        a0 = tl.zeros((BLOCK_T, CH), tl.int32)  # float16 (0, 0)
        a1 = tl.zeros((BLOCK_T, CH), tl.int32)
        a2 = tl.zeros((BLOCK_T, CH), tl.int32)
        a3 = tl.zeros((BLOCK_T, CH), tl.int32)
        b0 = tl.zeros((BLOCK_T, CH), tl.int32)
        b1 = tl.zeros((BLOCK_T, CH), tl.int32)
        b2 = tl.zeros((BLOCK_T, CH), tl.int32)
        b3 = tl.zeros((BLOCK_T, CH), tl.int32)
        if PREFETCH:
            za0, za1, za2, za3, zb0, zb1, zb2, zb3 = _gather_chunks(
                ztab_ptr, g, 0, _code_at(crow, 0, tmask), p0, lanes, R, P, CH, NCH
            )
            for r in range(1, R):
                na0, na1, na2, na3, nb0, nb1, nb2, nb3 = _gather_chunks(
                    ztab_ptr, g, r, _code_at(crow, r, tmask), p0, lanes, R, P, CH, NCH
                )
                a0, b0 = _hadd2(a0, za0, NATIVE), _hadd2(b0, zb0, NATIVE)
                if NCH > 1:
                    a1, b1 = _hadd2(a1, za1, NATIVE), _hadd2(b1, zb1, NATIVE)
                if NCH > 2:
                    a2, b2 = _hadd2(a2, za2, NATIVE), _hadd2(b2, zb2, NATIVE)
                    a3, b3 = _hadd2(a3, za3, NATIVE), _hadd2(b3, zb3, NATIVE)
                za0, za1, za2, za3, zb0, zb1, zb2, zb3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
            a0, b0 = _hadd2(a0, za0, NATIVE), _hadd2(b0, zb0, NATIVE)
            if NCH > 1:
                a1, b1 = _hadd2(a1, za1, NATIVE), _hadd2(b1, zb1, NATIVE)
            if NCH > 2:
                a2, b2 = _hadd2(a2, za2, NATIVE), _hadd2(b2, zb2, NATIVE)
                a3, b3 = _hadd2(a3, za3, NATIVE), _hadd2(b3, zb3, NATIVE)
        else:
            for j in range((R + 1) // 2):
                c0 = tl.load(crow + 3 * j, mask=tmask, other=0).to(tl.int32)
                c1 = tl.load(crow + 3 * j + 1, mask=tmask, other=0).to(tl.int32)
                a0, a1, a2, a3, b0, b1, b2, b3 = _add_code_chunks(
                    a0, a1, a2, a3, b0, b1, b2, b3, ztab_ptr, g, 2 * j, c0 | ((c1 & 15) << 8), p0, lanes, R, P,
                    CH, NCH, NATIVE,
                )  # fmt: skip
                if 2 * j + 1 < R:
                    c2 = tl.load(crow + 3 * j + 2, mask=tmask, other=0).to(tl.int32)
                    a0, a1, a2, a3, b0, b1, b2, b3 = _add_code_chunks(
                        a0, a1, a2, a3, b0, b1, b2, b3, ztab_ptr, g, 2 * j + 1, (c1 >> 4) | (c2 << 4), p0, lanes,
                        R, P, CH, NCH, NATIVE,
                    )  # fmt: skip
        pos = tl.load(pos_ptr + b * s_pb + g * s_ph + tok, mask=tmask, other=0).to(tl.float32)
        sc = _chunk_scores(a0, b0, pos, q_ptr, qrow, rmask, invf_ptr, p0 + lanes, FAST_ROPE, NATIVE, USE_DOT)
        if NCH > 1:
            sc += _chunk_scores(a1, b1, pos, q_ptr, qrow, rmask, invf_ptr, p0 + CH + lanes, FAST_ROPE, NATIVE, USE_DOT)
        if NCH > 2:
            sc += _chunk_scores(
                a2, b2, pos, q_ptr, qrow, rmask, invf_ptr, p0 + 2 * CH + lanes, FAST_ROPE, NATIVE, USE_DOT
            )
            sc += _chunk_scores(
                a3, b3, pos, q_ptr, qrow, rmask, invf_ptr, p0 + 3 * CH + lanes, FAST_ROPE, NATIVE, USE_DOT
            )
        nrm = tl.load(knorm_ptr + b * s_kb + tok, mask=tmask, other=0.0).to(tl.float32) * rope_scale
        sc = sc * nrm[None, :]
        return tl.where(tmask[None, :], sc, float("-inf"))

    @triton.jit
    def _window_attention(
        qx,
        qy,
        invf,
        wk_ptr,
        wv_ptr,
        wpos_ptr,
        b,
        g,
        n_win,
        rope_scale,
        s_wb,
        s_wh,
        s_wn,
        s_wvb,
        s_wvh,
        s_wvn,
        s_wpb,
        pp,
        pmask,
        P: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        """Online softmax of the (pre-scaled) queries of KV head ``g`` over the full-precision window (pre-RoPE keys
        rotated here): returns the running max, the sum and the unnormalized output ``[BLOCK_G, BLOCK_D]``. Scores in
        float32 (``ieee`` dots: a ``[G, T, P]`` broadcast would hold ``BLOCK_G * BLOCK_T * P`` values in registers)."""
        tt = tl.arange(0, BLOCK_T)
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < 2 * P
        m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        accw = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        for t0 in range(0, n_win, BLOCK_T):
            tok = t0 + tt
            tmask = tok < n_win
            wrow = wk_ptr + b * s_wb + g * s_wh + tok[:, None] * s_wn + 2 * pp[None, :]
            kx = tl.load(wrow, mask=tmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
            ky = tl.load(wrow + 1, mask=tmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
            pos = tl.load(wpos_ptr + b * s_wpb + tok, mask=tmask, other=0).to(tl.float32)
            phi = pos[:, None] * invf[None, :]
            cs = tl.cos(phi) * rope_scale
            sn = tl.sin(phi) * rope_scale
            rx = kx * cs - ky * sn
            ry = kx * sn + ky * cs
            if USE_DOT:
                sc = tl.dot(qx, tl.trans(rx), input_precision="ieee") + tl.dot(qy, tl.trans(ry), input_precision="ieee")
            else:
                sc = tl.sum(qx[:, None, :] * rx[None, :, :] + qy[:, None, :] * ry[None, :, :], axis=2)
            sc = tl.where(tmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                wv_ptr + b * s_wvb + g * s_wvh + tok[:, None] * s_wvn + dd[None, :],
                mask=tmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            accw = accw * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        return m_i, l_i, accw

    @triton.jit
    def _softmax_block(m_i, l_i, sc, coef):
        """One block of the online softmax over coded tokens: the base-2 scores ``sc [rows, BLOCK_T]`` update the
        running max and sum; returns the probabilities weighted by the tokens' value coefficients ``coef [BLOCK_T]``
        in float16 (the dot's left operand), the rescaling factor of the accumulator, the new max and the new sum."""
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        return (p * coef[None, :]).to(tl.float16), alpha, m_new, l_i

    @triton.jit
    def _block_scores(s_row, rmask, vcoef_ptr, b, t0, stop, s_kb, BLOCK_T: tl.constexpr):
        """The values kernel's scores ``[rows, BLOCK_T]`` (``-inf`` past ``stop``) and value coefficients
        ``[BLOCK_T]`` of the block of tokens from ``t0``."""
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < stop
        sc = tl.load(s_row + tok[None, :], mask=rmask[:, None] & tmask[None, :], other=float("-inf"))
        coef = tl.load(vcoef_ptr + b * s_kb + tok, mask=tmask, other=0.0).to(tl.float32)
        return sc, coef

    @triton.jit
    def _value_bytes(vbits_ptr, b, tok, tmask, nbyte, nbytemask, s_vb, s_vn):
        """The packed value bits ``[BLOCK_T, n bytes]`` (uint8) of the tokens ``tok`` (bytes ``nbyte``)."""
        return tl.load(
            vbits_ptr + b * s_vb + tok[:, None] * s_vn + nbyte[None, :],
            mask=tmask[:, None] & nbytemask[None, :],
            other=0,
        )

    @triton.jit
    def _accumulate_bits(
        acc,
        m_i,
        l_i,
        sc,
        vcoef_ptr,
        vbits_ptr,
        b,
        tok,
        tmask,
        nbyte,
        nbytemask,
        s_kb,
        s_vb,
        s_vn,
        BLOCK_T: tl.constexpr,
        NB_CHUNK: tl.constexpr,
        BITS_JOIN: tl.constexpr = False,
    ):
        """One block of the online softmax over coded tokens (:func:`_softmax_block`): the ``c_t``-weighted
        probabilities times the tokens' value bits ``[BLOCK_T, NB_CHUNK]`` go into ``acc`` on tensor cores. Each byte
        is loaded once and expanded to 8 bits in registers: by shifts and a reshape of a ``[..., 8]`` tensor (Triton
        spreads the 8 bits of a byte over 8 threads: one ``I2F`` and one 2-byte shared-memory store per bit on the way
        to the dot), or, ``BITS_JOIN``, as nested ``tl.join`` of the 8 masked bits, each already the ``float16`` bit
        pattern of 0 or 1 (``(byte & 2^i) * (0x3C00 >> i)``): the 8 bits stay in their thread and reach shared memory
        in one 16-byte store."""
        coef = tl.load(vcoef_ptr + b * s_kb + tok, mask=tmask, other=0.0).to(tl.float32)
        pw, alpha, m_new, l_i = _softmax_block(m_i, l_i, sc, coef)
        byte = _value_bytes(vbits_ptr, b, tok, tmask, nbyte, nbytemask, s_vb, s_vn).to(tl.int32)
        if BITS_JOIN:
            # tl.join adds a last dimension, so the innermost join is the slowest of the three: bits i and i + 4,
            # then i and i + 2, then i and i + 1, and the reshape puts bit 4 a + 2 b + c at [a, b, c]
            bits = tl.join(
                tl.join(
                    tl.join((byte & 1) * 0x3C00, (byte & 16) * 0x3C0), tl.join((byte & 4) * 0xF00, (byte & 64) * 0xF0)
                ),
                tl.join(
                    tl.join((byte & 2) * 0x1E00, (byte & 32) * 0x1E0), tl.join((byte & 8) * 0x780, (byte & 128) * 0x78)
                ),
            )
            bits = tl.reshape(bits.to(tl.int16), (BLOCK_T, NB_CHUNK)).to(tl.float16, bitcast=True)
        else:
            bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
            bits = tl.reshape(bits, (BLOCK_T, NB_CHUNK)).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(pw, bits, out_dtype=tl.float32)
        return acc, m_new, l_i

    @triton.jit
    def _bit_f16(byte, K: tl.constexpr):
        """Bit ``K`` (0..7) of each byte as a float16 0 or 1, without a conversion instruction: ``byte & 2^K`` times
        ``0x3C00 >> K`` is the bit pattern of float16 1.0 (``0x3C00``) or 0."""
        return ((byte & (1 << K)) * (0x3C00 >> K)).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _bit_planes(byte, NATIVE: tl.constexpr):
        """The 8 bit planes of the uint8 ``byte`` as float16 0/1 tensors of its shape (bit 0 first). ``NATIVE``: one
        inline-PTX block per 4 bytes of a thread: two ``prmt`` spread bytes 0, 1 (and 2, 3) to the two 16-bit halves
        of a register, then per bit one ``and`` with ``0x00010001 << k`` and one multiply by ``0x3C00 >> k`` give two
        packed float16 0/1 at once (34 instructions per 32 bits); else :func:`_bit_f16` of each bit (the
        interpreter, which runs no PTX)."""
        if NATIVE:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 z, lo, hi, t;
                mov.b32 z, 0;
                prmt.b32 lo, $16, z, 0x4140;
                prmt.b32 hi, $16, z, 0x4342;
                and.b32 t, lo, 0x00010001; mul.lo.u32 $0, t, 0x3C00;
                and.b32 t, hi, 0x00010001; mul.lo.u32 $1, t, 0x3C00;
                and.b32 t, lo, 0x00020002; mul.lo.u32 $2, t, 0x1E00;
                and.b32 t, hi, 0x00020002; mul.lo.u32 $3, t, 0x1E00;
                and.b32 t, lo, 0x00040004; mul.lo.u32 $4, t, 0x0F00;
                and.b32 t, hi, 0x00040004; mul.lo.u32 $5, t, 0x0F00;
                and.b32 t, lo, 0x00080008; mul.lo.u32 $6, t, 0x0780;
                and.b32 t, hi, 0x00080008; mul.lo.u32 $7, t, 0x0780;
                and.b32 t, lo, 0x00100010; mul.lo.u32 $8, t, 0x03C0;
                and.b32 t, hi, 0x00100010; mul.lo.u32 $9, t, 0x03C0;
                and.b32 t, lo, 0x00200020; mul.lo.u32 $10, t, 0x01E0;
                and.b32 t, hi, 0x00200020; mul.lo.u32 $11, t, 0x01E0;
                and.b32 t, lo, 0x00400040; mul.lo.u32 $12, t, 0x00F0;
                and.b32 t, hi, 0x00400040; mul.lo.u32 $13, t, 0x00F0;
                and.b32 t, lo, 0x00800080; mul.lo.u32 $14, t, 0x0078;
                and.b32 t, hi, 0x00800080; mul.lo.u32 $15, t, 0x0078;
                }""",
                "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r",
                [byte],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
                is_pure=True,
                pack=4,
            )
        else:
            b = byte.to(tl.int32)
            return (
                _bit_f16(b, 0), _bit_f16(b, 1), _bit_f16(b, 2), _bit_f16(b, 3), _bit_f16(b, 4), _bit_f16(b, 5),
                _bit_f16(b, 6), _bit_f16(b, 7),
            )  # fmt: skip

    @triton.jit
    def _plane_dot(acc, alpha, pwt, plane):
        """``value_bits="planes"``: the transposed accumulator ``[n bytes, rows]`` of one bit position of every byte,
        rescaled, plus that bit plane ``[n bytes, BLOCK_T]`` (float16 0/1) times the transposed probabilities ``pwt
        [BLOCK_T, rows]``: the plane keeps the bytes' layout (no reshape, no bit spread over threads), and the bytes are
        the dot's long side (Triton puts all warps of a program on it when several dots share an operand)."""
        return acc * alpha[None, :] + tl.dot(plane, pwt, out_dtype=tl.float32)

    @triton.jit
    def _decode_split_kernel(
        q_ptr,  # [B, Hq, D] fp32 interleaved, pre-multiplied by scaling * log2(e)
        codes_ptr,
        knorm_ptr,
        vcoef_ptr,
        pos_ptr,
        vbits_ptr,
        wk_ptr,
        wv_ptr,
        wpos_ptr,
        ztab_ptr,
        invf_ptr,
        m_ptr,  # [B, Hq, S+1] fp32
        l_ptr,  # [B, Hq, S+1] fp32
        acc_ptr,  # [B, Hq, S, NBITS] fp32
        accw_ptr,  # [B, Hq, D] fp32
        n_codes,
        n_win,
        n_splits,
        split_size,
        rope_scale,
        s_cb,
        s_ch,
        s_cn,
        s_kb,
        s_vb,
        s_vn,
        s_pb,
        s_ph,
        s_wb,
        s_wh,
        s_wn,
        s_wvb,
        s_wvh,
        s_wvn,
        s_wpb,
        H: tl.constexpr,
        G: tl.constexpr,
        P: tl.constexpr,
        R: tl.constexpr,
        NBITS: tl.constexpr,
        NB_CHUNK: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
        TABLE_FP16: tl.constexpr,
        ACC_FP16: tl.constexpr = False,
        FAST_ROPE: tl.constexpr = False,
        NATIVE: tl.constexpr = False,
    ):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        nbc = tl.program_id(2)
        b = bh // H
        g = bh % H
        rmask, pp, pmask, hq, qx, qy, invf = _group_queries(q_ptr, invf_ptr, b, g, H, G, P, BLOCK_G, BLOCK_P)
        m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        tt = tl.arange(0, BLOCK_T)
        stat_off = (b * H * G + hq) * (n_splits + 1) + split
        if split < n_splits:
            nb = nbc * NB_CHUNK + tl.arange(0, NB_CHUNK)
            nbmask = nb < NBITS
            nbyte = nbc * (NB_CHUNK // 8) + tl.arange(0, NB_CHUNK // 8)
            nbytemask = nbyte < NBITS // 8
            acc = tl.zeros((BLOCK_G, NB_CHUNK), tl.float32)
            start = split * split_size
            stop = tl.minimum(start + split_size, n_codes)
            for t0 in range(start, stop, BLOCK_T):
                tok = t0 + tt
                tmask = tok < stop
                sc = _code_block_scores(
                    qx,
                    qy,
                    invf,
                    codes_ptr,
                    knorm_ptr,
                    pos_ptr,
                    ztab_ptr,
                    b,
                    g,
                    tok,
                    tmask,
                    pp,
                    pmask,
                    rope_scale,
                    0,
                    (R + 1) // 2,
                    s_cb,
                    s_ch,
                    s_cn,
                    s_kb,
                    s_pb,
                    s_ph,
                    R,
                    P,
                    BLOCK_T,
                    BLOCK_P,
                    USE_DOT,
                    TABLE_FP16,
                    False,
                    ACC_FP16,
                    FAST_ROPE,
                    NATIVE,
                )
                acc, m_i, l_i = _accumulate_bits(
                    acc, m_i, l_i, sc, vcoef_ptr, vbits_ptr, b, tok, tmask, nbyte, nbytemask, s_kb, s_vb, s_vn,
                    BLOCK_T, NB_CHUNK,
                )  # fmt: skip
            acc_off = ((b * H * G + hq) * n_splits + split)[:, None] * NBITS + nb[None, :]
            tl.store(acc_ptr + acc_off, acc, mask=rmask[:, None] & nbmask[None, :])
            if nbc == 0:
                tl.store(m_ptr + stat_off, m_i, mask=rmask)
                tl.store(l_ptr + stat_off, l_i, mask=rmask)
        elif nbc == 0:
            dd = tl.arange(0, BLOCK_D)
            dmask = dd < 2 * P
            m_i, l_i, accw = _window_attention(
                qx,
                qy,
                invf,
                wk_ptr,
                wv_ptr,
                wpos_ptr,
                b,
                g,
                n_win,
                rope_scale,
                s_wb,
                s_wh,
                s_wn,
                s_wvb,
                s_wvh,
                s_wvn,
                s_wpb,
                pp,
                pmask,
                P,
                BLOCK_G,
                BLOCK_T,
                BLOCK_D,
                USE_DOT,
            )
            tl.store(m_ptr + stat_off, m_i, mask=rmask)
            tl.store(l_ptr + stat_off, l_i, mask=rmask)
            w_off = (b * H * G + hq)[:, None] * (2 * P) + dd[None, :]
            tl.store(accw_ptr + w_off, accw, mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _decode_reduce_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        accw_ptr,
        out_bits_ptr,  # [B*Hq, NBITS]
        out_w_ptr,  # [B*Hq, D]
        n_splits,
        NBITS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        NB_CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLIT_TILE: tl.constexpr,
    ):
        row = tl.program_id(0)
        nbc = tl.program_id(1)
        ss = tl.arange(0, BLOCK_S)
        smask = ss <= n_splits  # the last entry is the window
        m = tl.load(m_ptr + row * (n_splits + 1) + ss, mask=smask, other=-1.0e30)
        lv = tl.load(l_ptr + row * (n_splits + 1) + ss, mask=smask, other=0.0)
        mx = tl.max(m, axis=0)
        wgt = tl.exp2(m - mx)
        total = tl.sum(lv * wgt, axis=0)
        wgt = wgt / total
        nb = nbc * NB_CHUNK + tl.arange(0, NB_CHUNK)
        nbmask = nb < NBITS
        acc = tl.zeros((NB_CHUNK,), tl.float32)
        inv_total = 1.0 / total
        # SPLIT_TILE splits per step, their loads issued together (one split per step serialised ~130 memory latencies
        # at 1 bit and 128k tokens); each split's weight from its own maximum, masked splits weigh 0
        st = tl.arange(0, SPLIT_TILE)
        for s0 in range(0, n_splits, SPLIT_TILE):
            s = s0 + st
            sm = s < n_splits
            ws = tl.exp2(tl.load(m_ptr + row * (n_splits + 1) + s, mask=sm, other=-1.0e30) - mx) * inv_total
            tile = tl.load(
                acc_ptr + (row * n_splits + s)[:, None] * NBITS + nb[None, :],
                mask=sm[:, None] & nbmask[None, :],
                other=0.0,
            )
            acc += tl.sum(ws[:, None] * tile, axis=0)
        tl.store(out_bits_ptr + row * NBITS + nb, acc, mask=nbmask)
        if nbc == 0:
            dd = tl.arange(0, BLOCK_D)
            dmask = dd < D
            ww = tl.sum(tl.where(ss == n_splits, wgt, 0.0), axis=0)
            aw = tl.load(accw_ptr + row * D + dd, mask=dmask, other=0.0)
            tl.store(out_w_ptr + row * D + dd, aw * ww, mask=dmask)

    @triton.jit
    def _decode_merge_kernel(
        m_ptr,  # [B*Hq, S+1] fp32 base-2 running maxima (entry S: the window)
        l_ptr,  # [B*Hq, S+1] fp32 sums of exp2
        acc_ptr,  # [B*Hq, S, NBITS] fp32 probability-weighted value bits per split
        accw_ptr,  # [B*Hq, D] fp32 the window's weighted values
        emb_ptr,  # [NBITS, H, D] fp32 value codebook per KV head
        chs_ptr,  # [H, D] fp32 channel scale
        out_ptr,  # [B*Hq, D] fp32
        n_splits,
        H: tl.constexpr,
        G: tl.constexpr,
        NBITS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr,
        KC: tl.constexpr,
        BLOCK_DO: tl.constexpr,
    ):
        """``merge="fused"``: the log-sum-exp merge of the splits and the window, the weighted bits times the value
        codebook and the channel scale, in one launch. One program per (batch row, KV head, ``BLOCK_DO`` output
        channels) merges the bits of the head's ``G`` query heads ``KC`` at a time (``BLOCK_S`` splits per load)
        and multiplies them into the output right away: the merged bits never go to memory."""
        bh = tl.program_id(0)
        dc = tl.program_id(1)
        b = bh // H
        g = bh % H
        gg = tl.arange(0, BLOCK_G)
        gmask = gg < G
        row = b * H * G + g * G + gg
        # the splits' weights exp2(m - max) / sum(l exp2(m - max)), BLOCK_S splits at a time (entry n_splits: window)
        mx = tl.full((BLOCK_G,), -1.0e30, tl.float32)
        total = tl.zeros((BLOCK_G,), tl.float32)
        for s0 in range(0, n_splits + 1, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            st_off = row[:, None] * (n_splits + 1) + ss[None, :]
            st_mask = gmask[:, None] & (ss <= n_splits)[None, :]
            m = tl.load(m_ptr + st_off, mask=st_mask, other=-1.0e30)
            lv = tl.load(l_ptr + st_off, mask=st_mask, other=0.0)
            new_mx = tl.maximum(mx, tl.max(m, axis=1))
            total = total * tl.exp2(mx - new_mx) + tl.sum(lv * tl.exp2(m - new_mx[:, None]), axis=1)
            mx = new_mx
        total = tl.where(gmask, total, 1.0)
        dd = dc * BLOCK_DO + tl.arange(0, BLOCK_DO)
        dmask = dd < D
        out = tl.zeros((BLOCK_G, BLOCK_DO), tl.float32)
        for k0 in range(0, NBITS, KC):
            kk = k0 + tl.arange(0, KC)
            kmask = kk < NBITS
            merged = tl.zeros((BLOCK_G, KC), tl.float32)
            for s0 in range(0, n_splits, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                smask = gmask[:, None] & (ss < n_splits)[None, :]
                m = tl.load(m_ptr + row[:, None] * (n_splits + 1) + ss[None, :], mask=smask, other=-1.0e30)
                wgt = tl.exp2(m - mx[:, None]) / total[:, None]  # [BLOCK_G, BLOCK_S]
                a_row = (row[:, None] * n_splits + ss[None, :]).to(tl.int64) * NBITS
                a = tl.load(
                    acc_ptr + a_row[:, :, None] + kk[None, None, :],
                    mask=smask[:, :, None] & kmask[None, None, :],
                    other=0.0,
                )
                merged += tl.sum(wgt[:, :, None] * a, axis=1)
            e = tl.load(
                emb_ptr + (kk[:, None] * H + g) * D + dd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0
            )
            out += tl.sum(merged[:, :, None] * e[None, :, :], axis=1)
        chs = tl.load(chs_ptr + g * D + dd, mask=dmask, other=0.0)
        m_w = tl.load(m_ptr + row * (n_splits + 1) + n_splits, mask=gmask, other=-1.0e30)
        ww = tl.exp2(m_w - mx) / total  # the window's weight per query head
        o_off = row[:, None] * D + dd[None, :]
        o_mask = gmask[:, None] & dmask[None, :]
        aw = tl.load(accw_ptr + o_off, mask=o_mask, other=0.0)
        tl.store(out_ptr + o_off, out * chs[None, :] + aw * ww[:, None], mask=o_mask)

    @triton.jit
    def _scores_window(
        qx, qy, invf, wk_ptr, wv_ptr, wpos_ptr, m_ptr, l_ptr, accw_ptr, b, g, hq, rmask, n_win, n_splits, rope_scale,
        s_wb, s_wh, s_wn, s_wvb, s_wvh, s_wvn, s_wpb, pp, pmask, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """The window's program of the scores kernel: its online-softmax state (entry ``n_splits`` of ``m`` / ``l``)
        and unnormalized output ``accw``, in blocks of ``BLOCK_W`` (>= 16: tensor-core dots) tokens."""
        m_i, l_i, accw = _window_attention(
            qx, qy, invf, wk_ptr, wv_ptr, wpos_ptr, b, g, n_win, rope_scale, s_wb, s_wh, s_wn, s_wvb, s_wvh,
            s_wvn, s_wpb, pp, pmask, P, BLOCK_G, BLOCK_W, BLOCK_D, P >= 16,
        )  # fmt: skip
        stat_off = (b * H * G + hq) * (n_splits + 1) + n_splits
        tl.store(m_ptr + stat_off, m_i, mask=rmask)
        tl.store(l_ptr + stat_off, l_i, mask=rmask)
        dd = tl.arange(0, BLOCK_D)
        w_off = (b * H * G + hq)[:, None] * (2 * P) + dd[None, :]
        tl.store(accw_ptr + w_off, accw, mask=rmask[:, None] & (dd < 2 * P)[None, :])

    @triton.jit
    def _decode_scores_kernel(
        q_ptr,  # [B, Hq, D] fp32 interleaved, pre-multiplied by scaling * log2(e)
        codes_ptr,
        knorm_ptr,
        pos_ptr,
        wk_ptr,
        wv_ptr,
        wpos_ptr,
        ztab_ptr,
        invf_ptr,
        s_ptr,  # [B, Hq, n_codes] fp32: base-2 scores of the coded tokens
        m_ptr,  # [B, Hq, S+1] fp32 (this kernel writes the window's entry S)
        l_ptr,
        accw_ptr,  # [B, Hq, D] fp32
        n_codes,
        n_win,
        n_splits,
        n_code_progs,
        tokens_per_prog,
        rope_scale,
        s_cb,
        s_ch,
        s_cn,
        s_kb,
        s_pb,
        s_ph,
        s_wb,
        s_wh,
        s_wn,
        s_wvb,
        s_wvh,
        s_wvn,
        s_wpb,
        H: tl.constexpr,
        G: tl.constexpr,
        P: tl.constexpr,
        R: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
        TABLE_FP16: tl.constexpr,
        GATHER_TABLE: tl.constexpr = False,
        R_PARTS: tl.constexpr = 1,
        ACC_FP16: tl.constexpr = False,
        FAST_ROPE: tl.constexpr = False,
        NATIVE: tl.constexpr = False,
        UNROLL_R: tl.constexpr = False,
        BLOCK_W: tl.constexpr = 32,
        PROGRAMS: tl.constexpr = 0,
        PAIR_PARTS: tl.constexpr = 1,
        PAIR_CHUNKS: tl.constexpr = 1,
        PREFETCH: tl.constexpr = False,
        CODE_PREFETCH: tl.constexpr = False,
        PAIRS_INNER: tl.constexpr = False,
    ):
        # PROGRAMS: 0, one grid for both (the window's program after the code programs); 1, the code programs only;
        # 2, the window's program only. Apart, the code programs compile without the window's dots and accumulators:
        # on sm_90 (Triton 3.6) at 32 tokens / 4 warps, 72 registers instead of 255 and a 200-byte spill frame
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        g = bh % H
        rmask, pp, pmask, hq, qx, qy, invf = _group_queries(q_ptr, invf_ptr, b, g, H, G, P, BLOCK_G, BLOCK_P)
        if PROGRAMS == 2:
            _scores_window(
                qx, qy, invf, wk_ptr, wv_ptr, wpos_ptr, m_ptr, l_ptr, accw_ptr, b, g, hq, rmask, n_win, n_splits,
                rope_scale, s_wb, s_wh, s_wn, s_wvb, s_wvh, s_wvn, s_wpb, pp, pmask, H, G, P, BLOCK_G, BLOCK_W, BLOCK_D,
            )  # fmt: skip
        elif blk < n_code_progs * R_PARTS:
            # R_PARTS > 1: the residual pairs are split in parts, one program per part and token range, the part
            # slowest in the grid (programs resident together read one part's tables); partial scores are added
            part = blk // n_code_progs
            blk = blk % n_code_progs
            n_pairs: tl.constexpr = (R + 1) // 2
            per_part: tl.constexpr = (n_pairs + R_PARTS - 1) // R_PARTS
            j0 = part * per_part
            j1 = tl.minimum(j0 + per_part, n_pairs)
            start = blk * tokens_per_prog
            stop = tl.minimum(start + tokens_per_prog, n_codes)
            out_row = s_ptr + (b * H * G + hq).to(tl.int64)[:, None] * n_codes
            # PAIR_PARTS > 1: the RoPE pairs in PAIR_PARTS chunks of BLOCK_P, one sweep of the token range per chunk,
            # so the program reads 1 / PAIR_PARTS of its head's tables at a time (L1-resident); the score is a sum
            # over pairs, so each sweep adds its partial scores to the previous ones (same program, fixed order).
            # PAIRS_INNER: all parts of a block's pairs before the next block instead (no partial scores through
            # memory, the block's code bytes L1-hot for the later parts; the whole tables in use at a time)
            if PAIRS_INNER:
                for t0 in range(start, stop, BLOCK_T):
                    tok = t0 + tl.arange(0, BLOCK_T)
                    tmask = tok < stop
                    sc = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
                    for chunk in tl.static_range(PAIR_PARTS):
                        rmask, pp, pmask, hq, qx, qy, invf = _group_queries(
                            q_ptr, invf_ptr, b, g, H, G, P, BLOCK_G, BLOCK_P, chunk * BLOCK_P
                        )
                        sc += _code_block_scores(
                            qx, qy, invf, codes_ptr, knorm_ptr, pos_ptr, ztab_ptr, b, g, tok, tmask, pp, pmask,
                            rope_scale, j0, j1, s_cb, s_ch, s_cn, s_kb, s_pb, s_ph, R, P, BLOCK_T, BLOCK_P, USE_DOT,
                            TABLE_FP16, GATHER_TABLE, ACC_FP16, FAST_ROPE, NATIVE, UNROLL_R, CODE_PREFETCH,
                        )  # fmt: skip
                    tl.store(out_row + tok[None, :], sc, mask=rmask[:, None] & tmask[None, :])
            else:
                for chunk in range(PAIR_PARTS):
                    if PAIR_PARTS > 1:
                        rmask, pp, pmask, hq, qx, qy, invf = _group_queries(
                            q_ptr, invf_ptr, b, g, H, G, P, BLOCK_G, BLOCK_P, chunk * BLOCK_P
                        )
                        tl.debug_barrier()  # the previous sweep's stores before this sweep's loads
                    for t0 in range(start, stop, BLOCK_T):
                        tok = t0 + tl.arange(0, BLOCK_T)
                        tmask = tok < stop
                        smask = rmask[:, None] & tmask[None, :]
                        if PAIR_CHUNKS > 1 or PREFETCH:  # BLOCK_P pairs as PAIR_CHUNKS tiles (float16, global)
                            sc = _code_block_scores_chunked(
                                q_ptr, (b * H * G + hq) * (2 * P), rmask, invf_ptr, codes_ptr, knorm_ptr, pos_ptr,
                                ztab_ptr, b, g, tok, tmask, chunk * BLOCK_P, rope_scale, s_cb, s_ch, s_cn, s_kb, s_pb,
                                s_ph, R, P, BLOCK_T, BLOCK_P // PAIR_CHUNKS, PAIR_CHUNKS, USE_DOT, FAST_ROPE, NATIVE,
                                PREFETCH,
                            )  # fmt: skip
                        else:
                            sc = _code_block_scores(
                                qx, qy, invf, codes_ptr, knorm_ptr, pos_ptr, ztab_ptr, b, g, tok, tmask, pp, pmask,
                                rope_scale, j0, j1, s_cb, s_ch, s_cn, s_kb, s_pb, s_ph, R, P, BLOCK_T, BLOCK_P, USE_DOT,
                                TABLE_FP16, GATHER_TABLE, ACC_FP16, FAST_ROPE, NATIVE, UNROLL_R, CODE_PREFETCH,
                            )  # fmt: skip
                        if PAIR_PARTS > 1 and chunk > 0:
                            sc += tl.load(out_row + tok[None, :], mask=smask, other=0.0)
                        if R_PARTS == 1:
                            tl.store(out_row + tok[None, :], sc, mask=smask)
                        else:  # two parts: (0 + a) + b == (0 + b) + a, so the order of the two adds does not matter
                            tl.atomic_add(out_row + tok[None, :], sc, mask=smask, sem="relaxed")
        elif PROGRAMS == 0:
            _scores_window(
                qx, qy, invf, wk_ptr, wv_ptr, wpos_ptr, m_ptr, l_ptr, accw_ptr, b, g, hq, rmask, n_win, n_splits,
                rope_scale, s_wb, s_wh, s_wn, s_wvb, s_wvh, s_wvn, s_wpb, pp, pmask, H, G, P, BLOCK_G, BLOCK_W, BLOCK_D,
            )  # fmt: skip

    @triton.jit
    def _decode_values_kernel(
        s_ptr,  # [B, Hq, n_codes] fp32 base-2 scores
        vcoef_ptr,
        vbits_ptr,
        m_ptr,  # [B, Hq, S+1] fp32
        l_ptr,
        acc_ptr,  # [B, Hq, S, NBITS] fp32
        n_codes,
        n_splits,
        split_size,
        s_kb,
        s_vb,
        s_vn,
        HQ: tl.constexpr,
        NBITS: tl.constexpr,
        NB_CHUNK: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BITS_JOIN: tl.constexpr = False,
        BITS_PLANES: tl.constexpr = False,
        NATIVE: tl.constexpr = False,
        VALUES_PREFETCH: tl.constexpr = False,
    ):
        split = tl.program_id(0)
        b = tl.program_id(1)
        nbc = tl.program_id(2)
        rows = tl.arange(0, BLOCK_HQ)
        rmask = rows < HQ
        nbyte = nbc * (NB_CHUNK // 8) + tl.arange(0, NB_CHUNK // 8)
        nbytemask = nbyte < NBITS // 8
        m_i = tl.full((BLOCK_HQ,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_HQ,), tl.float32)
        start = split * split_size
        stop = tl.minimum(start + split_size, n_codes)
        s_row = s_ptr + (b * HQ + rows).to(tl.int64)[:, None] * n_codes
        acc_row = ((b * HQ + rows) * n_splits + split)[:, None] * NBITS
        if BITS_PLANES:  # one accumulator [bytes, rows] per bit position k of a byte: bit 8 j + k is a_k[j, :]
            a0 = tl.zeros((NB_CHUNK // 8, BLOCK_HQ), tl.float32)
            a1 = tl.zeros_like(a0)
            a2 = tl.zeros_like(a0)
            a3 = tl.zeros_like(a0)
            a4 = tl.zeros_like(a0)
            a5 = tl.zeros_like(a0)
            a6 = tl.zeros_like(a0)
            a7 = tl.zeros_like(a0)
            # VALUES_PREFETCH: the next block's scores and coefficients are loaded before this block's math (the
            # bytes are not carried over: a loop-carried byte tile makes Triton build the planes in a blocked layout
            # and pass them through shared memory)
            if VALUES_PREFETCH:
                sc, coef = _block_scores(s_row, rmask, vcoef_ptr, b, start, stop, s_kb, BLOCK_T)
            for t0 in range(start, stop, BLOCK_T):
                if VALUES_PREFETCH:
                    sc_n, coef_n = _block_scores(s_row, rmask, vcoef_ptr, b, t0 + BLOCK_T, stop, s_kb, BLOCK_T)
                else:
                    sc, coef = _block_scores(s_row, rmask, vcoef_ptr, b, t0, stop, s_kb, BLOCK_T)
                tok = t0 + tl.arange(0, BLOCK_T)
                byte = _value_bytes(vbits_ptr, b, tok, tok < stop, nbyte, nbytemask, s_vb, s_vn)
                pw, alpha, m_i, l_i = _softmax_block(m_i, l_i, sc, coef)
                pwt = tl.trans(pw)
                byte_t = tl.trans(byte)
                p0, p1, p2, p3, p4, p5, p6, p7 = _bit_planes(byte_t, NATIVE)
                a0 = _plane_dot(a0, alpha, pwt, p0)
                a1 = _plane_dot(a1, alpha, pwt, p1)
                a2 = _plane_dot(a2, alpha, pwt, p2)
                a3 = _plane_dot(a3, alpha, pwt, p3)
                a4 = _plane_dot(a4, alpha, pwt, p4)
                a5 = _plane_dot(a5, alpha, pwt, p5)
                a6 = _plane_dot(a6, alpha, pwt, p6)
                a7 = _plane_dot(a7, alpha, pwt, p7)
                if VALUES_PREFETCH:
                    sc, coef = sc_n, coef_n
            # the 8 planes joined in their thread, bit k of byte j of a head at [j, head, k] (the outermost join
            # picks bit 0 of k, the innermost bit 2), so each thread writes a head's 8 bits of a byte as 32
            # contiguous bytes (two 16-byte stores) instead of 8 strided 4-byte ones
            ab = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7)))
            ab = tl.reshape(ab, (NB_CHUNK // 8, BLOCK_HQ, 8))
            omask = (nbytemask[:, None] & rmask[None, :])[:, :, None]
            col = (tl.trans(acc_row) + 8 * nbyte[:, None])[:, :, None] + tl.arange(0, 8)[None, None, :]
            tl.store(acc_ptr + col, ab, mask=omask)
        else:
            acc = tl.zeros((BLOCK_HQ, NB_CHUNK), tl.float32)
            for t0 in range(start, stop, BLOCK_T):
                tok = t0 + tl.arange(0, BLOCK_T)
                tmask = tok < stop
                sc = tl.load(s_row + tok[None, :], mask=rmask[:, None] & tmask[None, :], other=float("-inf"))
                acc, m_i, l_i = _accumulate_bits(
                    acc, m_i, l_i, sc, vcoef_ptr, vbits_ptr, b, tok, tmask, nbyte, nbytemask, s_kb, s_vb, s_vn,
                    BLOCK_T, NB_CHUNK, BITS_JOIN,
                )  # fmt: skip
            nb = nbc * NB_CHUNK + tl.arange(0, NB_CHUNK)
            tl.store(acc_ptr + acc_row + nb[None, :], acc, mask=rmask[:, None] & (nb < NBITS)[None, :])
        if nbc == 0:
            stat_off = (b * HQ + rows) * (n_splits + 1) + split
            tl.store(m_ptr + stat_off, m_i, mask=rmask)
            tl.store(l_ptr + stat_off, l_i, mask=rmask)


def _split_size(n: int, bh: int, block_t: int, target_programs: int) -> int:
    """Tokens per split: enough splits to fill the GPU (``target_programs``), a multiple of ``block_t``."""
    if n == 0:
        return block_t
    splits = max(1, min(math.ceil(n / block_t), math.ceil(target_programs / max(1, bh))))
    size = math.ceil(n / splits)
    return math.ceil(size / block_t) * block_t


DEFAULT_TARGET_PROGRAMS = 1024


# the merge kernel's value bits per program: 128 (8 programs per query head at 1 bit) measured 0.6507 ms against
# 0.6585 ms for 1024 at 1 bit, 1.0334 against 1.0389 ms at 2 bits (H200, commvq_decode_value_bits.json)
DEFAULT_REDUCE_NB_CHUNK = 128


def _default_nb_chunk(nbits: int, cap: int = 1024) -> int:
    """Value bits per program: all of them (at least 16, a power of two) up to ``cap``."""
    return min(max(triton.next_power_of_2(nbits), 16), cap)


KEY_ACCUMS = ("auto", "fp16", "fp32")
ROPE_TRIGS = ("fast", "libdevice")


def _key_math(key_accum: str, rope_trig: str, table_fp16: bool, key_gather: str = "global") -> tuple[bool, bool]:
    """``(ACC_FP16, FAST_ROPE)`` of the key side, checked (see :func:`decode_attention`)."""
    if key_accum not in KEY_ACCUMS:
        raise ValueError(f"key_accum must be one of {KEY_ACCUMS}, got {key_accum!r}.")
    if rope_trig not in ROPE_TRIGS:
        raise ValueError(f"rope_trig must be one of {ROPE_TRIGS}, got {rope_trig!r}.")
    if key_accum == "fp16":
        if not table_fp16:
            raise ValueError(
                "key_accum='fp16' sums the float16 copy of the key codebooks, which needs codebooks exact in float16 "
                "(stored in float16, as the native format does) and key_table='auto'; use key_accum='fp32' or 'auto'."
            )
        if key_gather != "global":
            raise ValueError(f"key_accum='fp16' is implemented for key_gather='global' only, got {key_gather!r}.")
    acc_fp16 = key_accum == "fp16" or (key_accum == "auto" and table_fp16 and key_gather == "global")
    return acc_fp16, rope_trig == "fast"


def _key_side_meta(
    h: int,
    g: int,
    d: int,
    r: int,
    table_fp16: bool,
    block_t: int,
    key_accum: str = "auto",
    rope_trig: str = "fast",
    key_gather: str = "global",
) -> dict:
    """Constexprs of the key side (codes -> scores, window) shared by the fused and the scores kernels. ``NATIVE``:
    compiled for a GPU (inline PTX, hardware approximations), off in the interpreter, which emulates them."""
    p = d // 2
    acc_fp16, fast_rope = _key_math(key_accum, rope_trig, table_fp16, key_gather)
    return dict(
        H=h,
        G=g,
        P=p,
        R=r,
        BLOCK_G=max(16, triton.next_power_of_2(g)),
        BLOCK_T=block_t,
        BLOCK_P=triton.next_power_of_2(p),
        BLOCK_D=triton.next_power_of_2(d),
        USE_DOT=p >= 16,
        TABLE_FP16=bool(table_fp16),
        ACC_FP16=acc_fp16,
        FAST_ROPE=fast_rope,
        NATIVE=not triton_interpreted(),
    )


def decode_meta(
    h: int,
    g: int,
    d: int,
    r: int,
    nbits: int,
    table_fp16: bool = True,
    block_t: int = 32,
    nb_chunk: int | None = None,
    num_warps: int = 8,
    num_stages: int = 1,
    key_accum: str = "auto",
    rope_trig: str = "fast",
) -> tuple[dict, tuple[int, int]]:
    """The decode kernel's constexprs and ``(num_warps, num_stages)`` for ``h`` KV heads of ``g`` query heads, head
    dim ``d``, ``r`` key residuals and ``nbits`` value bits per token (what :func:`decode_attention` launches; the
    resource test compiles exactly this).

    ``num_stages=1`` by default: software pipelining stages the theta gathers in shared memory (with the residual
    loop unrolled: ``2 R`` double-buffered ``BLOCK_T x P`` tiles, 435 KB at ``R = 11``, far over the H100's 227 KB);
    the gathers hit L1 anyway. Compiled for sm_90 (``python -m pressroom.kernels.commvq_resources``), the defaults
    (``BLOCK_T=32``, ``NB_CHUNK=1024``, 8 warps) take 73 KB of shared memory and 254 / 236 registers at R=11 / R=21,
    with a 32-byte stack frame and no spill; 4 warps take 255 registers and a 96-byte frame (figures of the compile
    that matches a launch: 16-byte-aligned pointers; an earlier unaligned compile reported 1.6 KB of spills)."""
    meta = _key_side_meta(h, g, d, r, table_fp16, block_t, key_accum, rope_trig)
    meta.update(NBITS=nbits, NB_CHUNK=nb_chunk or _default_nb_chunk(nbits))
    return meta, (num_warps, num_stages)


DESIGNS = ("two_pass", "fused")
PAIR_ORDERS = ("sweeps", "blocks")


def resolve_pair_order(
    pair_order: str | None,
    design: str = "two_pass",
    pair_chunks: int = 1,
    key_prefetch: bool = False,
    key_parts: int = 1,
) -> str:
    """``pair_order=None`` (the default): ``"blocks"`` where it applies (``design="two_pass"``, ``pair_chunks=1``,
    ``key_prefetch=False``, ``key_parts=1``), ``"sweeps"`` otherwise; a given order is returned as it is."""
    if pair_order is not None:
        return pair_order
    applies = design == "two_pass" and pair_chunks == 1 and not key_prefetch and key_parts == 1
    return "blocks" if applies else "sweeps"


PAIR_PARTS = (1, 2, 4, 8)
PAIR_CHUNKS = (1, 2, 4)
KEY_GATHERS = ("global", "table")
WINDOW_LAUNCHES = ("separate", "shared")
# the scores kernel's PROGRAMS constexpr per window_launch (2: the window's own launch)
WINDOW_PROGRAMS = {"shared": 0, "separate": 1}


def _check_key_side(
    key_gather: str,
    key_parts: int,
    key_unroll: bool = False,
    window_launch: str = "separate",
    pair_parts: int = 1,
    pair_chunks: int = 1,
    key_prefetch: bool = False,
    code_prefetch: bool = False,
    pair_order: str | None = None,
    design: str = "two_pass",
) -> None:
    """The two-pass scores kernel's options (see :func:`decode_attention`)."""
    pair_order = resolve_pair_order(pair_order, design, pair_chunks, key_prefetch, key_parts)
    if pair_chunks not in PAIR_CHUNKS:
        raise ValueError(f"pair_chunks must be one of {PAIR_CHUNKS}, got {pair_chunks}.")
    for name, on in (("pair_chunks > 1", pair_chunks > 1), ("key_prefetch=True", key_prefetch)):
        if on and (key_gather != "global" or key_parts != 1 or key_unroll):
            raise ValueError(f"{name} is implemented for key_gather='global', key_parts=1 and key_unroll=False only.")
    if pair_parts not in PAIR_PARTS:
        raise ValueError(f"pair_parts must be one of {PAIR_PARTS}, got {pair_parts}.")
    if pair_parts > 1 and key_parts != 1:
        raise ValueError("pair_parts > 1 splits the RoPE pairs of every residual step; it needs key_parts=1.")
    if pair_parts > 1 and window_launch != "separate":
        raise ValueError("pair_parts > 1 needs window_launch='separate' (the window's program reads all the pairs).")
    if window_launch not in WINDOW_LAUNCHES:
        raise ValueError(f"window_launch must be one of {WINDOW_LAUNCHES}, got {window_launch!r}.")
    if key_gather not in KEY_GATHERS:
        raise ValueError(f"key_gather must be one of {KEY_GATHERS}, got {key_gather!r}.")
    if key_parts not in (1, 2):
        raise ValueError(f"key_parts must be 1 or 2, got {key_parts}.")
    if key_unroll and key_parts != 1:
        raise ValueError("key_unroll=True unrolls all the residual steps in one program; it needs key_parts=1.")
    if code_prefetch and (design != "two_pass" or key_unroll or pair_chunks > 1 or key_prefetch):
        raise ValueError(
            "code_prefetch=True is implemented for design='two_pass' with key_unroll=False, pair_chunks=1 and "
            "key_prefetch=False."
        )
    if pair_order not in PAIR_ORDERS:
        raise ValueError(f"pair_order must be one of {PAIR_ORDERS}, got {pair_order!r}.")
    if pair_order != "sweeps" and design != "two_pass":
        raise ValueError(f"pair_order={pair_order!r} is a setting of design='two_pass' only.")
    if pair_order == "blocks" and (pair_chunks > 1 or key_prefetch or key_parts > 1):
        raise ValueError("pair_order='blocks' needs pair_chunks=1, key_prefetch=False and key_parts=1.")


# the two-pass defaults measured fastest on an H200 at 128k tokens, 1 and 2 bits, as GPU time of a CUDA-graph replay
# with a cold L2: 4096 score programs, the pairs in two sweeps (pair_parts=2, where the pairs split in two power-of-two
# halves) and the dense value-codebook product, with the values kernel at 64 tokens / 8 warps: 0.660 / 1.036 ms against
# 0.768 / 1.250 ms for the previous defaults (2048 programs, one sweep, per-head product, values 32 / 4) in the same
# run (benchmarks/results/commvq_decode_defaults.json)
DEFAULT_SCORE_PROGRAMS = 4096
DEFAULT_VALUE_PRODUCT = "dense"
VALUE_BITS = ("reshape", "join", "planes")
# the values kernel's bits as planes (with the next block's scores prefetched) by default: the reshape path's output
# (bit for bit at the same tiling; to float32 rounding at each one's own), 0.052 against 0.103 ms for the values
# kernel at 1 bit and 0.101 against 0.196 ms at 2 bits on an H200 (benchmarks/results/commvq_decode_split_tile.json,
# commvq_decode_planes_prefetch.json)
DEFAULT_VALUE_BITS = "planes"
# the values kernel's default tiling per value_bits, (tokens per block, value bits per program, warps): each the
# fastest measured for its expansion (planes: commvq_decode_planes.json; reshape: commvq_decode_pairs2.json)
VALUES_TILINGS = {"planes": (32, 512, 4), "reshape": (64, 256, 8), "join": (64, 256, 8)}


def _check_value_bits(value_bits: str) -> None:
    if value_bits not in VALUE_BITS:
        raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {value_bits!r}.")


def _values_tiling(value_bits: str, values_block_t: int | None, values_warps: int | None) -> tuple[int, int, int]:
    """``(tokens per block, the default cap on value bits per program, warps)`` of the values kernel: the given
    ones, ``VALUES_TILINGS[value_bits]`` where ``None``; checked."""
    default_bt, default_nbc, default_warps = VALUES_TILINGS[value_bits]
    block_t = default_bt if values_block_t is None else values_block_t
    warps = default_warps if values_warps is None else values_warps
    if block_t < 1 or warps < 1:
        raise ValueError(f"values_block_t and values_warps must be >= 1, got {block_t} and {warps}.")
    return block_t, default_nbc, warps


def default_pair_parts(d: int, key_parts: int = 1, window_launch: str = "separate") -> int:
    """``pair_parts=None``: 2 when the ``d / 2`` RoPE pairs split in two power-of-two halves (and the options allow
    it: ``key_parts=1``, the window in its own launch), else 1."""
    half = d // 2 // 2
    ok = d % 4 == 0 and half >= 1 and not half & (half - 1) and key_parts == 1 and window_launch == "separate"
    return 2 if ok else 1


# the two-pass scores kernel's default tiling: the fastest at 1 and 2 bits on an H200 once the window has its own
# launch (benchmarks/results/commvq_decode_window.json: 0.996 / 1.428 ms against 1.075 / 1.919 ms at 32 tokens, 4 warps)
TWO_PASS_BLOCK_T = 64
TWO_PASS_WARPS = 8


def two_pass_meta(
    h: int,
    g: int,
    d: int,
    r: int,
    nbits: int,
    table_fp16: bool = True,
    block_t: int = TWO_PASS_BLOCK_T,
    num_warps: int = TWO_PASS_WARPS,
    values_block_t: int | None = None,
    nb_chunk: int | None = None,
    values_warps: int | None = None,
    num_stages: int = 1,
    key_gather: str = "global",
    key_parts: int = 1,
    key_accum: str = "auto",
    rope_trig: str = "fast",
    key_unroll: bool = False,
    values_stages: int | None = None,
    window_launch: str = "separate",
    pair_parts: int = 1,
    pair_chunks: int = 1,
    key_prefetch: bool = False,
    value_bits: str = DEFAULT_VALUE_BITS,
    values_prefetch: bool | None = None,
    code_prefetch: bool = False,
    pair_order: str | None = None,
) -> tuple[tuple[dict, tuple[int, int]], tuple[dict, tuple[int, int]]]:
    """Constexprs and ``(num_warps, num_stages)`` of the two kernels of ``design="two_pass"`` (see
    :func:`decode_attention`): ``(scores, values)``, each ``(meta, (num_warps, num_stages))``; the values kernel
    takes ``values_stages`` (default: ``num_stages``), and its tiling (``values_block_t``, ``nb_chunk``,
    ``values_warps``) defaults to ``VALUES_TILINGS[value_bits]``, ``values_prefetch`` to ``value_bits == "planes"``.
    With ``window_launch="separate"`` the scores meta is that of the code programs (``PROGRAMS=1``); the window's
    launch takes :func:`window_launch_meta` of it."""
    _check_key_side(
        key_gather, key_parts, key_unroll, window_launch, pair_parts, pair_chunks, key_prefetch, code_prefetch,
        pair_order,
    )  # fmt: skip
    split = pair_parts * pair_chunks
    if split > 1 and (d // 2) % split:
        raise ValueError(
            f"pair_parts={pair_parts} x pair_chunks={pair_chunks} does not divide the {d // 2} RoPE pairs of "
            f"head_dim {d}."
        )
    tile = d // 2 // split
    if (split > 1 or key_prefetch) and tile & (tile - 1):  # these tiles hold exactly their pairs (no pair mask)
        raise ValueError(
            f"pair_parts={pair_parts} x pair_chunks={pair_chunks}{' with key_prefetch' if key_prefetch else ''} must "
            f"leave a power of two of pairs per tile, got {tile}."
        )
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}.")
    if values_stages is not None and values_stages < 1:
        raise ValueError(f"values_stages must be >= 1, got {values_stages}.")
    _check_value_bits(value_bits)
    values_block_t, default_nbc, values_warps = _values_tiling(value_bits, values_block_t, values_warps)
    if values_prefetch is None:
        values_prefetch = value_bits == "planes"
    scores = _key_side_meta(h, g, d, r, table_fp16, block_t, key_accum, rope_trig, key_gather)
    if key_gather == "table":
        scores["GATHER_TABLE"] = True
    if key_parts > 1:
        scores["R_PARTS"] = key_parts
    if key_unroll:
        scores["UNROLL_R"] = True
    # tensor-core dots need 16 tokens a block (Triton 3.6 rejects a dot with N = 8); the window keeps its dots in
    # blocks of at least 16 tokens
    scores["USE_DOT"] = scores["USE_DOT"] and block_t >= 16
    scores["BLOCK_W"] = max(16, block_t)
    scores["PROGRAMS"] = WINDOW_PROGRAMS[window_launch]
    if (pair_chunks > 1 or key_prefetch) and not scores["ACC_FP16"]:
        raise ValueError(
            "pair_chunks > 1 and key_prefetch=True sum the float16 table (key_accum 'auto' or 'fp16' with native "
            "codebooks)."
        )
    if key_prefetch:
        scores["PREFETCH"] = True
    scores["CODE_PREFETCH"] = bool(code_prefetch)
    pair_order = resolve_pair_order(pair_order, "two_pass", pair_chunks, key_prefetch, key_parts)
    scores["PAIRS_INNER"] = pair_order == "blocks" and pair_parts > 1
    if split > 1:  # the code programs' tiles hold tile pairs of one part (a dot needs 16 of them)
        scores.update(
            PAIR_PARTS=pair_parts,
            PAIR_CHUNKS=pair_chunks,
            BLOCK_P=tile * pair_chunks,
            USE_DOT=scores["USE_DOT"] and tile >= 16,
        )
    values = dict(
        HQ=h * g,
        NBITS=nbits,
        NB_CHUNK=nb_chunk or _default_nb_chunk(nbits, default_nbc),
        BLOCK_HQ=max(16, triton.next_power_of_2(h * g)),
        BLOCK_T=values_block_t,
        BITS_JOIN=value_bits == "join",
        BITS_PLANES=value_bits == "planes",
        NATIVE=not triton_interpreted(),
    )
    if values_prefetch and value_bits != "planes":
        raise ValueError("values_prefetch=True is implemented for value_bits='planes' only.")
    values["VALUES_PREFETCH"] = values_prefetch
    if value_bits == "planes":  # a plane's dot needs 16 bytes (128 bits) per program
        if nb_chunk is not None and nb_chunk < 128:
            raise ValueError(f"value_bits='planes' needs nb_chunk >= 128 (16 bytes per bit plane), got {nb_chunk}.")
        values["NB_CHUNK"] = max(values["NB_CHUNK"], 128)
    return (scores, (num_warps, num_stages)), (values, (values_warps, values_stages or num_stages))


def window_launch_meta(scores: dict) -> dict:
    """The constexprs of the window's own launch of the scores kernel (``window_launch="separate"``), from those of
    the code programs (:func:`two_pass_meta`): all the pairs in one tile."""
    return {
        **scores,
        "PROGRAMS": 2,
        "PAIR_PARTS": 1,
        "PAIR_CHUNKS": 1,
        "PREFETCH": False,
        "BLOCK_P": scores["BLOCK_D"] // 2,
    }


DEFAULT_REDUCE_SPLIT_TILE = 16


def _check_split_tile(split_tile: int) -> None:
    ok = isinstance(split_tile, int) and not isinstance(split_tile, bool) and 1 <= split_tile <= 64
    if not ok or split_tile & (split_tile - 1):
        raise ValueError(f"reduce_split_tile must be a power of two from 1 to 64, got {split_tile!r}.")


def reduce_meta(
    d: int, nbits: int, n_splits: int, nb_chunk: int | None = None, split_tile: int = DEFAULT_REDUCE_SPLIT_TILE
) -> tuple[dict, tuple[int, int]]:
    """The reduce kernel's constexprs and ``(num_warps, num_stages)`` (see :func:`decode_meta`)."""
    _check_split_tile(split_tile)
    meta = dict(
        NBITS=nbits,
        D=d,
        BLOCK_S=triton.next_power_of_2(n_splits + 1),
        NB_CHUNK=nb_chunk or _default_nb_chunk(nbits, DEFAULT_REDUCE_NB_CHUNK),
        BLOCK_D=triton.next_power_of_2(d),
        SPLIT_TILE=split_tile,
    )
    return meta, (4, 1)


MERGES = ("separate", "fused")
VALUE_PRODUCTS = ("einsum", "dense")


def merge_meta(
    h: int, g: int, d: int, nbits: int, n_splits: int, block_do: int = 32, kc: int = 16, num_warps: int = 4
) -> tuple[dict, tuple[int, int]]:
    """The fused merge kernel's constexprs and ``(num_warps, num_stages)`` (``merge="fused"`` of
    :func:`decode_attention`): ``kc`` value bits per step, ``block_do`` output channels per program."""
    meta = dict(
        H=h,
        G=g,
        NBITS=nbits,
        D=d,
        BLOCK_G=triton.next_power_of_2(g),
        BLOCK_S=min(triton.next_power_of_2(n_splits + 1), 32),
        KC=kc,
        BLOCK_DO=min(block_do, triton.next_power_of_2(d)),
    )
    return meta, (num_warps, 1)


def decode_attention(
    q: torch.Tensor,
    kv: CodedKV,
    books: LayerBooks,
    scaling: float,
    use_triton: bool | None = None,
    block_t: int | None = None,
    nb_chunk: int | None = None,
    target_programs: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    design: str = "two_pass",
    values_block_t: int | None = None,
    values_warps: int | None = None,
    score_programs: int = DEFAULT_SCORE_PROGRAMS,
    key_table: str = "auto",
    key_gather: str = "global",
    key_parts: int = 1,
    key_accum: str = "auto",
    rope_trig: str = "fast",
    key_unroll: bool = False,
    values_stages: int | None = None,
    merge: str = "separate",
    window_launch: str = "separate",
    pair_parts: int | None = None,
    pair_chunks: int = 1,
    key_prefetch: bool = False,
    value_product: str = DEFAULT_VALUE_PRODUCT,
    reduce_nb_chunk: int | None = None,
    value_bits: str = DEFAULT_VALUE_BITS,
    values_prefetch: bool | None = None,
    scores_carveout: int | str | None = "auto",
    code_prefetch: bool = False,
    reduce_split_tile: int = DEFAULT_REDUCE_SPLIT_TILE,
    scores_maxnreg: int | None = None,
    pair_order: str | None = None,
) -> torch.Tensor:
    """Attention of one new token (per batch row) over coded tokens + window, read straight from the codes.

    Two designs (the same result up to float32 rounding and the float16 probabilities of the value side):

    - ``"two_pass"`` (default): a scores kernel (one program per block of tokens and KV head: keys from the codes,
      rotated, dotted with the ``G`` query heads; base-2 scores to a float32 buffer of ``4 Hq`` bytes per token, plus
      the window in one extra program per KV head), then a values kernel per split of the sequence that reads the
      scores of **all** ``Hq`` query heads of a batch row and unpacks each token's value bits once for all of them
      (value codes are shared by the KV heads), one ``[Hq, BLOCK_T] x [BLOCK_T, NB_CHUNK]`` tensor-core product per
      block; then the log-sum-exp merge.
    - ``"fused"``: one split-K kernel per KV head does both (its value side unpacks each token's bits once per KV
      head and multiplies ``G``-row tiles padded to 16).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Hq, D]`` rotated queries in the interleaved layout.
    kv : CodedKV
        The layer's coded tokens and window (the new token already in the window).
    books : LayerBooks
        The layer's codebooks.
    scaling : float
        Softmax scale.
    use_triton : bool or None
        ``None``: the kernel on CUDA, :func:`decode_attention_reference` elsewhere.
    block_t, nb_chunk, target_programs, num_warps, num_stages : int or None
        Kernel tiling: tokens per block of the key side (default 64 two-pass, 32 fused), value bits per program
        (default ``min(n_bits, 1024)`` fused; two-pass ``min(n_bits, 512)`` with the planes, ``min(n_bits, 256)``
        otherwise, see ``VALUES_TILINGS``), the number of programs the split count of the value side aims at
        (default: twice the GPU's SM count two-pass, 1024 fused), warps per program of the key side (default 8),
        software-pipelining stages (1: none, see :func:`decode_meta`). The two-pass defaults (64 tokens, 8 warps;
        values 32 tokens, 512 bits, 4 warps by planes, 64 tokens, 256 bits, 8 warps by reshape; 264 value programs
        on a 132-SM GPU) are the fastest tilings of ``benchmarks/commvq_decode.py`` at 1 and 2 bits on an H200
        (``benchmarks/results/commvq_decode_pairs2.json``, ``commvq_decode_planes.json``).
    design : str
        ``"two_pass"`` or ``"fused"`` (above).
    values_block_t, values_warps, score_programs : int or None
        Two-pass only: tokens per block and warps of the values kernel (default ``None``: ``VALUES_TILINGS`` of
        ``value_bits``); programs the scores kernel aims at (default
        4096, with ``pair_parts`` and ``value_product`` the defaults measured fastest in
        ``benchmarks/results/commvq_decode_prefetch.json``).
    values_stages : int or None
        Two-pass only: software-pipelining stages of the values kernel (default ``num_stages``). With 2 or 3, Triton
        stages each block's scores and value bytes in shared memory with ``cp.async`` while the previous block is
        multiplied (compiled for sm_90 at the 8B shape: 22.1 / 26.1 KB of shared memory, no spill). On an H200 it
        made no measurable difference (1.07-1.10 ms against 1.07 ms at 1 bit, ``commvq_decode_window.json``).
    key_table : str
        ``"auto"``: gather ``theta`` from its float16 copy when that is exact (codebooks stored in float16), else
        float32; ``"fp32"``: always the float32 table (8 bytes per entry, no unpacking).
    key_gather : str
        Two-pass only. ``"global"``: each token's table entries are gathered from global memory (L1 / L2), two
        ``P``-entry rows per residual and token; ``"table"``: per block of ``block_t`` tokens and residual the whole
        ``[64, P]`` table is loaded once and the entries gathered on chip (``tl.gather``), which reads
        ``64 / (2 block_t)`` as many table bytes from the cache hierarchy.
    key_parts : int
        Two-pass only. ``2``: the residual steps are split in two halves scored by separate programs (the half
        slowest in the grid, so that programs resident together read half of the tables) whose partial scores are
        added in the scores buffer (two float adds onto zero: deterministic); ``1``: one program per token range.
    key_unroll : bool
        Two-pass only. ``True``: the loop over residual steps is unrolled, so that all of a block's code loads and
        table gathers can be in flight together (one memory latency per block of tokens instead of one per pair of
        residual steps); meant for small ``block_t``. On an H200 at 128k tokens and 1 bit it was slower: 2.20 ms at
        ``block_t=8, num_warps=2``, 1.52 ms at 8 tokens and 1 warp, against 1.00 ms for the default
        (``benchmarks/results/commvq_decode_window.json``). ``False`` (default): a runtime loop.
    key_accum : str
        How the ``2 R`` table entries of a key are summed. ``"fp16"``: as packed float16 pairs, one ``add.rn.f16x2``
        per entry for both halves of a RoPE pair (a third of the float32 path's instructions); each add rounds to
        float16, so a key carries a relative error of about ``2^-11 sqrt(2 R)`` (under 0.3% at ``R = 21``, against
        the codes' own 10%); needs the exact float16 table and ``key_gather="global"``. ``"fp32"``: unpacked and
        summed in float32. ``"auto"`` (default): ``"fp16"`` where it applies, else ``"fp32"``.
    value_product : str
        With ``merge="separate"``: how the merged weighted bits meet the value codebook. ``"dense"`` (default): one
        ``[B Hq, n_bits] x [n_bits, H D]`` matmul, ``H`` times the arithmetic, of which each query head keeps its KV
        head's block; ``"einsum"``: one ``[G, n_bits] x [n_bits, D]`` product per KV head (a batched matmul, for
        which cuBLAS picks a slow batched GEMV: 0.072 ms against 0.011 ms for the dense product at 2 bits on an H200,
        ``commvq_decode_pair_chunks.json``).
    value_bits : str
        Two-pass only: how the values kernel expands each byte of value bits into the ``float16`` 0/1 operand of
        its tensor-core dot. ``"reshape"``: shifts and a reshape, after which Triton holds one bit per
        thread (one ``I2F`` and one 2-byte shared-memory store per bit on sm_90); ``"join"``: the 8 bits as nested
        ``tl.join`` of masked integer products, so they stay in one thread and go to shared memory in one 16-byte
        store. Fewer instructions, yet slower on an H200: the values kernel took 0.144 ms against 0.105 ms at 1 bit,
        0.278 against 0.203 ms at 2 bits (``benchmarks/results/commvq_decode_value_bits.json``). ``"planes"``: one
        transposed accumulator ``[nb_chunk / 8, Hq]`` per bit position of a byte, each bit plane built (inline PTX: two
        float16 0/1 per ``and`` + multiply) straight in the register operand of a wgmma, no reshape (default); needs
        ``nb_chunk >= 128``. The reshape path's output to float32 rounding on an H200; there the values kernel took
        0.085 against 0.103 ms at 1 bit and 0.134 against 0.196 ms at 2 bits (32 tokens, 512 bits, 4 warps,
        ``values_prefetch``; ``benchmarks/results/commvq_decode_planes_prefetch.json``), and 0.052 / 0.101 ms once
        each thread stores its 8 planes' values of a byte together (``commvq_decode_split_tile.json``).
    values_prefetch : bool or None
        With ``value_bits="planes"``: the values kernel loads the next block's scores and coefficients before this
        block's math (register double buffering). Default ``None``: on with the planes, off otherwise.
    scores_maxnreg : int or None
        Two-pass, CUDA only: a cap on the registers per thread of the scores kernel's launch that holds the code
        programs (with ``window_launch="shared"`` the window's program too; Triton's ``maxnreg``; ``None``, the
        default: no cap). Fewer registers let more programs share an SM (at the default tiling, compiled offline for
        sm_90: 57 registers, 4 programs; 48 allow 5, with a 72-byte spill frame). Slower on
        an H200 at 128k tokens: 0.624 (48) and 0.717 ms (40) against 0.595 ms at 1 bit, 1.016 / 1.174 against 0.936
        ms at 2 bits (``benchmarks/results/commvq_decode_maxnreg.json``). The output does not depend on it.
    code_prefetch : bool
        Two-pass only. ``True``: each scores program loads the next residual pair's code bytes before gathering
        this pair's table entries, so the gathers' addresses never wait on a code load (the same arithmetic in the
        same order; compiled offline for sm_90 at the default tiling, 64 registers instead of 57, still 4 programs an
        SM). Slower on an H200 at 128k tokens: 0.633 against 0.602 ms at 1 bit, 0.944 against 0.933 ms at 2 bits
        (GPU time, graph replay; ``benchmarks/results/commvq_decode_codes.json``). ``False`` (default): each pair's
        bytes right before its gathers.
    scores_carveout : int, str or None
        Two-pass only, CUDA only: the shared-memory carveout the scores kernel asks the driver for, as a percentage
        of the SM's shared-memory capacity (:func:`set_carveout`); the rest of the SM's 256 KB is L1, where the key
        tables' rows are gathered from (176 KB per KV head at 1 bit and head_dim 128, float16). ``"auto"``
        (default): the smallest carveout that keeps the occupancy the kernel's registers allow
        (:func:`auto_carveout`: 100 KB at the default tiling on an H200, where the driver picked 132 KB; L1 hit rate
        and time in ``benchmarks/results/commvq_scores_profile_carveout.json`` and
        ``commvq_decode_carveout.json``); ``0``: as much L1 as one program's shared memory allows, which there cut
        the occupancy to one program per SM and was 1.4x slower; ``None``: the driver's choice. Applies from the
        launch after the kernel's first one (the compiled kernel's handle exists only then); the output does not
        depend on it.
    reduce_nb_chunk : int or None
        With ``merge="separate"``: value bits per program of the merge kernel (a power of two >= 16; default
        ``min(n_bits, 128)``): one program per query head and chunk, so smaller chunks mean more programs.
    reduce_split_tile : int
        With ``merge="separate"``: splits the merge kernel weighs and adds per step (a power of two, 1 to 64; default
        16), their loads issued together; 1 adds one split at a time, which serialises one memory latency per split
        (132 of them at 1 bit and 128k tokens on a 132-SM GPU). Deterministic; the order of the float32 adds differs
        with the tile.
    merge : str
        How the splits are combined. ``"separate"`` (default): a merge kernel writes the weighted value bits per query
        head (one program per head and 128 bits), then PyTorch multiplies them by the value codebook per KV head,
        scales the channels and adds the window (about five launches). ``"fused"``: one kernel does all of it, one
        program per batch row, KV head and 32 output channels, and the merged bits never go to memory. On an H200
        it is slower (1.29 ms against 1.07 ms at 1 bit: 0.18 ms in the merge kernel against 0.08 ms for the separate
        merge and product, ``commvq_decode_window.json``).
    window_launch : str
        Two-pass only: where the window's program runs. ``"separate"`` (default): its own launch of the scores kernel
        (one program per KV head), so the code programs are compiled without the window's tensor-core dots and
        ``[16, D]`` accumulator: on sm_90 with Triton 3.6, at 32 tokens and 4 warps, 72 registers and no spill
        instead of 255 registers and a 200-byte spill frame, which allowed only 2 programs per SM (95 registers at
        the default 64 / 8). ``"shared"``: one launch, the window's program after the code programs.
    pair_parts : int or None
        Two-pass only (1, 2, 4 or 8; default ``None``: 2 where the pairs split in two power-of-two halves with the
        other options at their defaults, else 1, see :func:`default_pair_parts`). Each scores program sweeps its
        token range ``pair_parts`` times, each time over one ``1 / pair_parts`` of the RoPE pairs, adding the
        partial scores (the score is a sum over pairs; the same program adds them in a fixed order, so the result is
        deterministic). The tables a program reads at a
        time shrink by the same factor (at 1 bit and head_dim 128: 176 KB per KV head in float16, 44 KB with 4
        parts), so that the programs sharing an SM find their table rows in L1 instead of L2. Needs
        ``key_parts=1`` and ``window_launch="separate"``; the pairs per part must be a power of two. On an H200 at
        128k tokens (GPU time, graph replay, ``benchmarks/results/commvq_decode_prefetch.json``) 2 parts cut the
        step from 0.79 to 0.74 ms at 1 bit and from 1.26 to 1.20 ms at 2 bits; 4 and 8 parts are slower
        (``commvq_decode_pair_parts.json``).
    pair_order : str or None
        Two-pass only, with ``pair_parts > 1``. ``"sweeps"``: each scores program sweeps its token range once per part
        of the pairs, adding each sweep's partial scores to those in memory. ``"blocks"``: all the parts of a block's
        pairs, one after the other, before the next block; the partial scores stay in registers and the block's code
        bytes are L1-hot for the later parts, but the program reads its head's whole tables at a time. The same sums
        (bit for bit in the interpreter; on an H200 the same error against the reference, 0.15103 at 1 bit and 0.31859
        at 2 bits). ``"blocks"`` needs ``pair_chunks=1``, ``key_prefetch=False`` and ``key_parts=1``; ``None``
        (default) takes it where those hold (:func:`resolve_pair_order`), ``"sweeps"`` elsewhere. On an H200 at 128k
        tokens (GPU time, graph replay, cold L2): 0.579 against 0.594 ms at 1 bit, 0.925 against 0.931 ms at 2 bits
        (``benchmarks/results/commvq_decode_pair_order_check.json``; 0.577 / 0.590 and 0.930 / 0.937 ms in the run
        before, ``commvq_decode_pair_order.json``).
    pair_chunks : int
        Two-pass only (1, 2 or 4; default 1). The pairs a scores program sums are held as ``pair_chunks`` tiles of
        ``P / (pair_parts pair_chunks)`` pairs instead of one ``[block_t, P]`` tile. Triton lays each tile out alike,
        so a thread holds one token's row in every tile, and computes that row's table addresses (and unpacks its
        codes) once for all its pairs instead of once per 4 pairs. Needs the float16 sums (``key_accum``),
        ``key_gather="global"``, ``key_parts=1`` and ``key_unroll=False``.
    key_prefetch : bool
        Two-pass only (default ``False``). The scores programs run one residual step per loop iteration and issue
        its table gathers before adding the previous step's entries, so that two steps' loads are in flight at once
        (register double buffering) instead of each iteration waiting for its own loads. Same requirements as
        ``pair_chunks > 1``; combines with it.
    rope_trig : str
        ``"fast"`` (default): each angle reduced to about ``[-pi, pi]`` with two FMAs, then the hardware ``sin``/``cos``
        approximations (absolute error about 1e-6); ``"libdevice"``: ``tl.cos``/``tl.sin`` of the full angle
        (float32-exact, with a slow path past about 1e5 rad, i.e. at long contexts). Both use the float32 angle
        ``pos * inv_freq`` that transformers' RoPE uses.

    Returns
    -------
    torch.Tensor
        ``[B, Hq, D]`` float32 attention output (values in the model's layout).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}.")
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}.")
    if pair_parts is None:
        pair_parts = default_pair_parts(q.shape[-1], key_parts, window_launch) if design == "two_pass" else 1
    if key_table not in ("auto", "fp32"):
        raise ValueError(f"key_table must be 'auto' or 'fp32', got {key_table!r}.")
    _check_key_side(
        key_gather, key_parts, key_unroll, window_launch, pair_parts, pair_chunks, key_prefetch, code_prefetch,
        pair_order, design,
    )  # fmt: skip
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}.")
    if value_product not in VALUE_PRODUCTS:
        raise ValueError(f"value_product must be one of {VALUE_PRODUCTS}, got {value_product!r}.")
    _check_value_bits(value_bits)
    if reduce_nb_chunk is not None and (reduce_nb_chunk < 16 or reduce_nb_chunk & (reduce_nb_chunk - 1)):
        raise ValueError(f"reduce_nb_chunk must be a power of two >= 16, got {reduce_nb_chunk}.")
    if values_prefetch and design != "two_pass":
        raise ValueError("values_prefetch=True is a setting of design='two_pass' only (its values kernel).")
    _check_carveout(scores_carveout)
    _check_split_tile(reduce_split_tile)
    _values_tiling(value_bits, values_block_t, values_warps)  # its checks, before any launch
    if scores_maxnreg is not None and (
        isinstance(scores_maxnreg, bool) or not isinstance(scores_maxnreg, int) or not 16 <= scores_maxnreg <= 255
    ):
        raise ValueError(f"scores_maxnreg must be None or a register count from 16 to 255, got {scores_maxnreg!r}.")
    if scores_maxnreg is not None and design != "two_pass":
        raise ValueError("scores_maxnreg is a setting of design='two_pass' only (its scores kernel).")
    if isinstance(scores_carveout, int) and design != "two_pass":
        raise ValueError("scores_carveout is a setting of design='two_pass' only (its scores kernel).")
    if values_stages is not None and design != "two_pass":
        raise ValueError("values_stages is a setting of design='two_pass' only (its values kernel).")
    if key_unroll and design != "two_pass":
        raise ValueError("key_unroll=True is implemented for design='two_pass' only.")
    if key_gather != "global" and design != "two_pass":
        raise ValueError(f"key_gather={key_gather!r} is implemented for design='two_pass' only.")
    if key_parts != 1 and design != "two_pass":
        raise ValueError(f"key_parts={key_parts} is implemented for design='two_pass' only.")
    if pair_parts != 1 and design != "two_pass":
        raise ValueError(f"pair_parts={pair_parts} is implemented for design='two_pass' only.")
    if pair_chunks != 1 and design != "two_pass":
        raise ValueError(f"pair_chunks={pair_chunks} is implemented for design='two_pass' only.")
    fp16 = books.ztab16 is not None and key_table == "auto"
    _key_math(key_accum, rope_trig, fp16, key_gather)
    if num_warps is None:
        num_warps = TWO_PASS_WARPS if design == "two_pass" else 8
    if block_t is None:
        block_t = TWO_PASS_BLOCK_T if design == "two_pass" else 32
    if not resolve_use_triton(use_triton, q, kv.codes):
        return decode_attention_reference(q, kv, books, scaling)
    b, hq, d = q.shape
    h = kv.codes.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} KV heads.")
    g = hq // h
    nbits = books.n_bits
    dev = q.device
    qs = (q.float() * (scaling * LOG2E)).contiguous()
    accw = torch.empty(b, hq, d, device=dev, dtype=torch.float32)
    pos = kv.pos
    s_pb, s_ph = (pos.stride(0), 0) if pos.dim() == 2 else (pos.stride(0), pos.stride(1))
    ztab = books.ztab16.view(torch.int32) if fp16 else books.ztab.view(torch.int64)
    if design == "two_pass":
        m, lsum, acc, n_splits = _two_pass(
            qs, kv, books, ztab, fp16, accw, s_pb, s_ph, block_t, num_warps, num_stages, values_block_t, nb_chunk,
            values_warps, target_programs or 2 * _sm_count(dev), score_programs, key_gather, key_parts, key_accum,
            rope_trig, key_unroll, values_stages, window_launch, pair_parts, pair_chunks, key_prefetch, value_bits,
            values_prefetch, scores_carveout, code_prefetch, scores_maxnreg, pair_order,
        )  # fmt: skip
    else:
        m, lsum, acc, n_splits = _fused(
            qs,
            kv,
            books,
            ztab,
            fp16,
            accw,
            s_pb,
            s_ph,
            block_t,
            nb_chunk,
            num_warps,
            num_stages,
            target_programs or DEFAULT_TARGET_PROGRAMS,
            key_accum,
            rope_trig,
        )
    if merge == "fused":
        mmeta, (mwarps, mstages) = merge_meta(h, hq // h, d, nbits, n_splits)
        out = torch.empty(b, hq, d, device=dev, dtype=torch.float32)
        _decode_merge_kernel[(b * h, triton.cdiv(d, mmeta["BLOCK_DO"]))](
            m, lsum, acc, accw, books.emb, books.chscale, out, n_splits, **mmeta, num_warps=mwarps, num_stages=mstages
        )
        return out
    rmeta, (rwarps, rstages) = reduce_meta(d, nbits, n_splits, reduce_nb_chunk, reduce_split_tile)
    n_rbc = triton.cdiv(nbits, rmeta["NB_CHUNK"])
    out_bits = torch.empty(b * hq, nbits, device=dev, dtype=torch.float32)
    out_w = torch.empty(b * hq, d, device=dev, dtype=torch.float32)
    _decode_reduce_kernel[(b * hq, n_rbc)](
        m,
        lsum,
        acc,
        accw,
        out_bits,
        out_w,
        n_splits,
        **rmeta,
        num_warps=rwarps,
        num_stages=rstages,
    )
    if value_product == "einsum":  # one small matmul per KV head: (weighted bits) @ E[:, head]
        out = torch.einsum("bhgk,khd->bhgd", out_bits.view(b, h, g, nbits), books.emb)
    else:  # one [b Hq, n_bits] x [n_bits, H D] matmul, of which each head keeps its own KV head's block
        out = (out_bits @ books.emb.view(nbits, h * d)).view(b, h, g, h, d)
        out = torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2)
    out = out * books.chscale[None, :, None]  # the channel scale
    return out.reshape(b, hq, d) + out_w.view(b, hq, d)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); 132 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# CUfunction_attribute CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (cuda.h): the percentage of the SM's
# shared-memory capacity a kernel prefers as shared memory, the rest of the 256 KB going to L1; -1: the driver's default
_CARVEOUT_ATTRIBUTE = 9
# CUdevice_attribute: shared memory (bytes) and 32-bit registers per multiprocessor
_SM_SHARED_ATTRIBUTE = 81
_SM_REGS_ATTRIBUTE = 82
_SM_THREADS_ATTRIBUTE = 39
_SM_BLOCKS_ATTRIBUTE = 106
_RESERVED_SHARED = 1024  # shared memory the system reserves per resident block (sm_80 and later)
# CUfunction handle -> the carveout we set on it (a handle is a loaded kernel's address: Triton keeps its kernels
# loaded for the process's life, so a handle is not reused for another kernel)
_carveouts: dict[int, int] = {}
_sm_limits: dict[int, tuple[int, int, int, int]] = {}  # device -> (registers, shared bytes, warps, blocks) an SM


def _check_carveout(carveout: int | str | None, name: str = "scores_carveout") -> None:
    if carveout is None or carveout == "auto":
        return
    if isinstance(carveout, bool) or not isinstance(carveout, int) or not 0 <= carveout <= 100:
        raise ValueError(f"{name} must be 'auto', None (the driver's choice) or a percentage 0..100, got {carveout!r}.")


def auto_carveout(
    n_regs: int,
    shared: int,
    num_warps: int,
    sm_regs: int = 65536,
    sm_shared: int = 233472,
    sm_warps: int = 64,
    sm_blocks: int = 32,
) -> int:
    """The smallest carveout (percent of ``sm_shared``) that keeps the occupancy registers allow: ``blocks =
    sm_regs // (registers of one block)`` (warp allocations in 256-register units), at most ``sm_warps // num_warps``
    and ``sm_blocks`` (the SM's limits; sm_90's by default), each with its ``shared`` bytes and the system's 1 KB; the
    driver rounds a carveout up to a supported size (on sm_90 0, 8, 16, 32, 64, 100, 132, 164, 196 or 228 KB), the
    rest of the SM's 256 KB being L1. The scores kernel's default tiling on the H200 (61 registers as Nsight Compute
    reports them, 20 KB, 8 warps) gets 37% (100 KB, 4 blocks; L1 156 KB against the driver's 124 KB)."""
    per_warp = -(-n_regs * 32 // 256) * 256
    blocks = max(1, min(sm_regs // max(1, per_warp * num_warps), sm_warps // num_warps, sm_blocks))
    return min(100, -(-100 * blocks * (shared + _RESERVED_SHARED) // sm_shared))


def set_carveout(compiled, carveout: int | str | None, device: int | None = None) -> None:
    """Ask the driver for a shared-memory carveout (``cuFuncSetAttribute``) for a compiled Triton kernel: ``carveout``
    is the percentage of the SM's shared-memory capacity (228 KB on an H100) the kernel prefers as shared memory, the
    rest of the unified 256 KB being L1; ``"auto"``: :func:`auto_carveout` of the kernel's registers and shared
    memory, ``0``: as much L1 as one program's shared memory allows (which may cost occupancy), ``None``: the
    driver's default (reset if we set one before). A hint: the driver rounds it up to a supported size. Takes effect
    from the next launch; a no-op in the interpreter. ``device``: the CUDA device index whose limits ``"auto"`` reads
    (default: the current device)."""
    fn = getattr(compiled, "function", None)
    if fn is None or triton_interpreted():
        return
    if carveout == "auto":
        dev = torch.cuda.current_device() if device is None else device
        if dev not in _sm_limits:
            regs, shared, threads, blocks = (
                _device_attribute(a, dev)
                for a in (_SM_REGS_ATTRIBUTE, _SM_SHARED_ATTRIBUTE, _SM_THREADS_ATTRIBUTE, _SM_BLOCKS_ATTRIBUTE)
            )
            _sm_limits[dev] = (regs, shared, threads // 32, blocks)
        value = auto_carveout(compiled.n_regs, int(compiled.metadata.shared), compiled.metadata.num_warps,
                              *_sm_limits[dev])  # fmt: skip
    else:
        value = -1 if carveout is None else int(carveout)
    if _carveouts.get(fn, -1) == value:
        return
    err = _libcuda().cuFuncSetAttribute(ctypes.c_void_p(fn), ctypes.c_int(_CARVEOUT_ATTRIBUTE), ctypes.c_int(value))
    if err:
        raise RuntimeError(f"cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT={value}) failed with CUresult {err}.")
    _carveouts[fn] = value


def _device_attribute(attribute: int, device: int) -> int:
    out = ctypes.c_int()
    err = _libcuda().cuDeviceGetAttribute(ctypes.byref(out), ctypes.c_int(attribute), ctypes.c_int(device))
    if err:
        raise RuntimeError(f"cuDeviceGetAttribute({attribute}) failed with CUresult {err}.")
    return out.value


@functools.cache
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuFuncSetAttribute.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    lib.cuFuncSetAttribute.restype = ctypes.c_int
    lib.cuDeviceGetAttribute.argtypes = (ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int)
    lib.cuDeviceGetAttribute.restype = ctypes.c_int
    return lib


def _scores_launch(
    n_progs, bh, qs, kv, ztab, books, scores, m, lsum, accw, n_splits, n_code_progs, per_prog, s_pb, s_ph, meta, sw, ss,
    carveout=None, maxnreg=None,
):  # fmt: skip
    """One launch of the two-pass scores kernel over ``(n_progs, bh)`` programs (``meta["PROGRAMS"]`` says which);
    ``carveout``: :func:`set_carveout` of the compiled kernel (applies from the next launch on); ``maxnreg``: ptxas's
    register cap (Triton's ``maxnreg`` option), ``None`` for none."""
    compiled = _decode_scores_kernel[(n_progs, bh)](
        qs,
        kv.codes,
        kv.knorm,
        kv.pos,
        kv.wkeys,
        kv.wvals,
        kv.wpos,
        ztab,
        books.inv_freq,
        scores,
        m,
        lsum,
        accw,
        kv.n,
        kv.nw,
        n_splits,
        n_code_progs,
        per_prog,
        books.rope_scale,
        kv.codes.stride(0),
        kv.codes.stride(1),
        kv.codes.stride(2),
        kv.knorm.stride(0),
        s_pb,
        s_ph,
        kv.wkeys.stride(0),
        kv.wkeys.stride(1),
        kv.wkeys.stride(2),
        kv.wvals.stride(0),
        kv.wvals.stride(1),
        kv.wvals.stride(2),
        kv.wpos.stride(0),
        **meta,
        num_warps=sw,
        num_stages=ss,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    set_carveout(compiled, carveout, qs.device.index)


def _two_pass(
    qs, kv, books, ztab, fp16, accw, s_pb, s_ph, block_t, num_warps, num_stages, values_block_t, nb_chunk, values_warps,
    target_programs, score_programs, key_gather="global", key_parts=1, key_accum="auto", rope_trig="fast",
    key_unroll=False, values_stages=None, window_launch="separate", pair_parts=1, pair_chunks=1, key_prefetch=False,
    value_bits=DEFAULT_VALUE_BITS, values_prefetch=None, scores_carveout="auto", code_prefetch=False,
    scores_maxnreg=None, pair_order=None,
):  # fmt: skip
    """Launch the scores and values kernels of ``design="two_pass"``; returns ``(m, l, acc, n_splits)``."""
    b, hq, d = qs.shape
    h = kv.codes.shape[1]
    nbits = books.n_bits
    (smeta, (sw, ss)), (vmeta, (vw, vs)) = two_pass_meta(
        h, hq // h, d, books.theta.shape[1], nbits, fp16, block_t, num_warps, values_block_t,
        nb_chunk, values_warps, num_stages, key_gather, key_parts, key_accum, rope_trig, key_unroll, values_stages,
        window_launch, pair_parts, pair_chunks, key_prefetch, value_bits, values_prefetch, code_prefetch, pair_order,
    )  # fmt: skip
    n_nbc = triton.cdiv(nbits, vmeta["NB_CHUNK"])
    split = _split_size(kv.n, b * n_nbc, vmeta["BLOCK_T"], target_programs)
    n_splits = triton.cdiv(kv.n, split) if kv.n else 0
    per_prog = _split_size(kv.n, b * h, block_t, score_programs)
    n_code_progs = triton.cdiv(kv.n, per_prog) if kv.n else 0
    dev = qs.device
    m = torch.empty(b, hq, n_splits + 1, device=dev, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, hq, max(n_splits, 1), nbits, device=dev, dtype=torch.float32)
    alloc = torch.zeros if key_parts > 1 else torch.empty  # partial scores are added onto zeros
    scores = alloc(b, hq, max(kv.n, 1), device=dev, dtype=torch.float32)
    n_code = n_code_progs * key_parts
    # separate: the code programs, then the window's program per KV head in its own launch (PROGRAMS=2)
    if smeta["PROGRAMS"] == 1:
        launches = [(n_code, smeta), (1, window_launch_meta(smeta))]
    else:
        launches = [(n_code + 1, smeta)]
    for n_progs, meta in launches:
        if n_progs:
            _scores_launch(
                n_progs, b * h, qs, kv, ztab, books, scores, m, lsum, accw, n_splits, n_code_progs, per_prog, s_pb,
                s_ph, meta, sw, ss, scores_carveout, scores_maxnreg if meta["PROGRAMS"] != 2 else None,
            )  # fmt: skip
    if n_splits:
        _decode_values_kernel[(n_splits, b, n_nbc)](
            scores,
            kv.vcoef,
            kv.vbits,
            m,
            lsum,
            acc,
            kv.n,
            n_splits,
            split,
            kv.knorm.stride(0),
            kv.vbits.stride(0),
            kv.vbits.stride(1),
            **vmeta,
            num_warps=vw,
            num_stages=vs,
        )
    return m, lsum, acc, n_splits


def _fused(
    qs, kv, books, ztab, fp16, accw, s_pb, s_ph, block_t, nb_chunk, num_warps, num_stages, target_programs,
    key_accum="auto", rope_trig="fast",
):  # fmt: skip
    """Launch the split-K kernel of ``design="fused"``; returns ``(m, l, acc, n_splits)``."""
    b, hq, d = qs.shape
    h = kv.codes.shape[1]
    nbits = books.n_bits
    meta, (num_warps, num_stages) = decode_meta(
        h, hq // h, d, books.theta.shape[1], nbits, fp16, block_t, nb_chunk, num_warps, num_stages, key_accum,
        rope_trig,
    )  # fmt: skip
    n_nbc = triton.cdiv(nbits, meta["NB_CHUNK"])
    split = _split_size(kv.n, b * h * n_nbc, block_t, target_programs)
    n_splits = triton.cdiv(kv.n, split) if kv.n else 0
    dev = qs.device
    m = torch.empty(b, hq, n_splits + 1, device=dev, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, hq, max(n_splits, 1), nbits, device=dev, dtype=torch.float32)
    _decode_split_kernel[(n_splits + 1, b * h, n_nbc)](
        qs,
        kv.codes,
        kv.knorm,
        kv.vcoef,
        kv.pos,
        kv.vbits,
        kv.wkeys,
        kv.wvals,
        kv.wpos,
        ztab,
        books.inv_freq,
        m,
        lsum,
        acc,
        accw,
        kv.n,
        kv.nw,
        n_splits,
        split,
        books.rope_scale,
        kv.codes.stride(0),
        kv.codes.stride(1),
        kv.codes.stride(2),
        kv.knorm.stride(0),
        kv.vbits.stride(0),
        kv.vbits.stride(1),
        s_pb,
        s_ph,
        kv.wkeys.stride(0),
        kv.wkeys.stride(1),
        kv.wkeys.stride(2),
        kv.wvals.stride(0),
        kv.wvals.stride(1),
        kv.wvals.stride(2),
        kv.wpos.stride(0),
        **meta,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return m, lsum, acc, n_splits


# ---------------------------------------------------------------------------------------------------- key-side designs
def key_scores_reference(q: torch.Tensor, kv: CodedKV, books: LayerBooks) -> torch.Tensor:
    """Scores ``q . k_t`` ``[B, Hq, n]`` (no scaling) of every coded token, from the dequantized keys (float32)."""
    b, hq, d = q.shape
    h = kv.codes.shape[1]
    keys = dequantize_keys(kv, books)  # [B, H, n, D]
    return torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, h, hq // h, d), keys).reshape(b, hq, -1)


def key_luts(q: torch.Tensor, books: LayerBooks) -> torch.Tensor:
    """The reference's look-up tables: ``Q_p conj(z_{e,p})`` for every query head, residual, entry and pair,
    ``[B, Hq, R, 64, P, 2]`` float32 (real, imaginary); the B part of a code uses ``(imag, -real)`` of the same
    entry, since ``Q conj(i z) = -i Q conj(z)``."""
    b, hq, d = q.shape
    h, r, _, p = books.theta.shape
    qq = q.float().view(b, h, hq // h, 1, 1, p, 2)
    x, y = books.theta[:, :, 0::2, :], books.theta[:, :, 1::2, :]  # [H, R, 64, P]
    x, y = x[None, :, None], y[None, :, None]
    re = qq[..., 0] * x + qq[..., 1] * y
    im = qq[..., 1] * x - qq[..., 0] * y
    return torch.stack((re, im), dim=-1).reshape(b, hq, r, N_ENTRIES, p, 2).contiguous()


if HAS_TRITON:

    @triton.jit
    def _key_scores_kernel(
        q_ptr,  # [B, Hq, D] float32 interleaved
        lut_ptr,  # [B, Hq, R, 64, P] int64 (two float32): the LUT design
        codes_ptr,
        knorm_ptr,
        pos_ptr,
        ztab_ptr,  # [H, R, 64, P] int64: the direct design
        invf_ptr,
        out_ptr,  # [B, Hq, n] float32
        n_codes,
        rope_scale,
        s_cb,
        s_ch,
        s_cn,
        s_kb,
        s_pb,
        s_ph,
        H: tl.constexpr,
        G: tl.constexpr,
        P: tl.constexpr,
        R: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        LUT: tl.constexpr,
    ):
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        g = bh % H
        rows = tl.arange(0, BLOCK_G)
        rmask = rows < G
        pp = tl.arange(0, P)
        tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = tok < n_codes
        hq = g * G + rows
        crow = codes_ptr + b * s_cb + g * s_ch + tok * s_cn
        pos = tl.load(pos_ptr + b * s_pb + g * s_ph + tok, mask=tmask, other=0).to(tl.float32)
        invf = tl.load(invf_ptr + pp)
        phi = pos[:, None] * invf[None, :]
        cs = tl.cos(phi)
        sn = tl.sin(phi)
        nrm = tl.load(knorm_ptr + b * s_kb + tok, mask=tmask, other=0.0).to(tl.float32) * rope_scale
        if LUT:
            sr = tl.zeros((BLOCK_G, BLOCK_T, P), tl.float32)
            si = tl.zeros((BLOCK_G, BLOCK_T, P), tl.float32)
        else:
            kx = tl.zeros((BLOCK_T, P), tl.float32)
            ky = tl.zeros((BLOCK_T, P), tl.float32)
        # a runtime loop (an unrolled one lets ptxas hoist every residual's gathers and spill): code r starts at byte
        # 3r // 2, on the low nibble for even r and the high one for odd r
        for r in range(R):
            byte0 = (3 * r) // 2
            lo = tl.load(crow + byte0, mask=tmask, other=0).to(tl.int32)
            hi = tl.load(crow + byte0 + 1, mask=tmask, other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> (4 * (r % 2))) & 4095
            if LUT:  # G gathers per entry (one per query head of the group)
                base = ((b * H * G + hq) * R + r) * 64  # [BLOCK_G]
                la = tl.load(
                    lut_ptr + ((base[:, None] + (code >> 6)[None, :]) * P)[:, :, None] + pp[None, None, :],
                    mask=rmask[:, None, None],
                    other=0,
                )
                lb = tl.load(
                    lut_ptr + ((base[:, None] + (code & 63)[None, :]) * P)[:, :, None] + pp[None, None, :],
                    mask=rmask[:, None, None],
                    other=0,
                )
                sr += (la & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                sr += (lb >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                si += (la >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                si -= (lb & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            else:  # one gather per entry, shared by the G query heads
                za = tl.load(ztab_ptr + (((g * R + r) * 64 + (code >> 6)) * P)[:, None] + pp[None, :])
                zb = tl.load(ztab_ptr + (((g * R + r) * 64 + (code & 63)) * P)[:, None] + pp[None, :])
                kx += (za & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                kx -= (zb >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                ky += (za >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                ky += (zb & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        if LUT:  # Re(S e^{-i phi}) summed over pairs
            sc = tl.sum(sr * cs[None, :, :] + si * sn[None, :, :], axis=2)
        else:
            rx = kx * cs - ky * sn
            ry = kx * sn + ky * cs
            q_base = q_ptr + (b * H * G + hq)[:, None] * (2 * P)
            qx = tl.load(q_base + 2 * pp[None, :], mask=rmask[:, None], other=0.0)
            qy = tl.load(q_base + 2 * pp[None, :] + 1, mask=rmask[:, None], other=0.0)
            sc = tl.sum(qx[:, None, :] * rx[None, :, :] + qy[:, None, :] * ry[None, :, :], axis=2)
        sc = sc * nrm[None, :]
        tl.store(out_ptr + (b * H * G + hq)[:, None] * n_codes + tok[None, :], sc, mask=rmask[:, None] & tmask[None, :])


def key_scores_meta(
    h: int,
    g: int,
    d: int,
    r: int,
    design: str = "direct",
    block_t: int = 32,
    num_warps: int | None = None,
    num_stages: int = 1,
) -> tuple[dict, tuple[int, int]]:
    """The key-scores kernel's constexprs and ``(num_warps, num_stages)`` (see :func:`decode_meta`); default warps:
    4 for the direct design, 8 for the LUT one (its ``G x BLOCK_T x P`` float32 accumulators need the registers)."""
    num_warps = num_warps or (8 if design == "lut" else 4)
    meta = dict(H=h, G=g, P=d // 2, R=r, BLOCK_G=triton.next_power_of_2(g), BLOCK_T=block_t, LUT=design == "lut")
    return meta, (num_warps, num_stages)


def key_scores(
    q: torch.Tensor,
    kv: CodedKV,
    books: LayerBooks,
    design: str = "direct",
    use_triton: bool | None = None,
    block_t: int = 32,
    num_warps: int | None = None,
    luts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[B, Hq, n]`` of every coded token by one of the two key-side designs (for comparing them).

    ``design="direct"``: per token, gather two entries per residual and pair of ``theta`` (shared by the ``G`` query
    heads of a KV head), sum, rotate by the position, dot with the queries (what :func:`decode_attention` does).
    ``design="lut"``: the reference's design, look-up tables ``Q_p conj(z_e)`` per query head (:func:`key_luts`,
    pass ``luts`` to reuse them), two gathers per residual, pair *and query head*, summed, rotated, reduced.
    Both equal :func:`key_scores_reference` up to float32 rounding.
    """
    if design not in ("direct", "lut"):
        raise ValueError(f"design must be 'direct' or 'lut', got {design!r}.")
    if not resolve_use_triton(use_triton, q, kv.codes):
        return key_scores_reference(q, kv, books)
    b, hq, d = q.shape
    h = kv.codes.shape[1]
    g = hq // h
    p = d // 2
    if p & (p - 1):
        raise ValueError(f"key_scores needs a power-of-two head_dim/2, got {p}.")
    out = torch.empty(b, hq, kv.n, device=q.device, dtype=torch.float32)
    if kv.n == 0:
        return out
    lut = None
    if design == "lut":
        lut = (luts if luts is not None else key_luts(q, books)).view(torch.int64)
    pos = kv.pos
    s_pb, s_ph = (pos.stride(0), 0) if pos.dim() == 2 else (pos.stride(0), pos.stride(1))
    ztab = books.ztab.view(torch.int64)
    meta, (num_warps, num_stages) = key_scores_meta(h, g, d, books.theta.shape[1], design, block_t, num_warps)
    _key_scores_kernel[(triton.cdiv(kv.n, block_t), b * h)](
        q.float().contiguous(),
        lut if lut is not None else ztab,
        kv.codes,
        kv.knorm,
        pos,
        ztab,
        books.inv_freq,
        out,
        kv.n,
        books.rope_scale,
        kv.codes.stride(0),
        kv.codes.stride(1),
        kv.codes.stride(2),
        kv.knorm.stride(0),
        s_pb,
        s_ph,
        **meta,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


__all__ = [
    "DESIGNS",
    "KEY_ACCUMS",
    "KEY_GATHERS",
    "ROPE_TRIGS",
    "CodedKV",
    "LayerBooks",
    "chunk_attention",
    "decode_attention",
    "decode_attention_reference",
    "decode_meta",
    "two_pass_meta",
    "dequantize_keys",
    "dequantize_values",
    "key_luts",
    "key_scores",
    "key_scores_meta",
    "key_scores_reference",
    "reduce_meta",
    "merge_meta",
    "MERGES",
    "VALUE_BITS",
    "VALUE_PRODUCTS",
    "default_pair_parts",
    "resolve_pair_order",
    "PAIR_ORDERS",
    "rotate_interleaved",
    "window_keys",
]
