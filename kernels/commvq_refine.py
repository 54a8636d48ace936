"""CommVQ value-bit refinement: greedy bit flips that lower each token's reconstruction error (Triton, PyTorch).

CommVQ (Li et al., ICML 2025, arXiv 2506.18879) codes a value ``v`` (all KV heads of a token, ``F`` channels) as
``n_bits`` bits ``b`` decoded through a learned binary codebook: ``v_hat = c (b @ E')`` with ``E' [n_bits, F]`` (the
codebook times the channel scale) and one coefficient ``c`` per token. The paper's encoder (an MLP) picks ``b`` in one
shot. Refinement (our addition) then searches around its choice: with the least-squares ``c``, a token's error is

    err(b) = |v|^2 - <v, y>^2 / |y|^2,        y = b @ E',

so the best single flip of bit ``i`` is the one maximising ``(a + d_i u_i)^2 / (q + 2 d_i w_i + |E'_i|^2)`` over ``i``
(``d_i = +1`` turns the bit on, ``-1`` off), where ``a = <v, y>``, ``q = |y|^2``, ``u = v @ E'^T`` (fixed) and
``w = y @ E'^T``. Each step flips that bit when it lowers the error and updates ``a``, ``q`` and ``w`` (one row of the
Gram matrix ``E' E'^T``), so a step costs ``O(n_bits)`` per token and the error never rises. The search stops when no
token of a block can improve, or after ``steps`` flips; it returns the bits and ``c = a / q``.

:func:`refine_value_bits` runs the Triton kernel on CUDA and :func:`refine_value_bits_reference` elsewhere; both
start from the same state (``u``, ``w``, ``a``, ``q``, computed in PyTorch) and run the same float32 updates in the
same order, so under the interpreter the kernel reproduces the reference's bits exactly. The coefficient may come out
negative (the least-squares one, as with ``steps=0``).
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_TINY = 1e-30
_MIN_GAIN = 1e-6  # a flip must lower the error by this relative amount (no moves on rounding noise)
_BLOCK_ROWS = 512  # tokens per block of the PyTorch reference ([512, n_bits] float32 states stay in cache)


def _check(x: torch.Tensor, bits: torch.Tensor, emb: torch.Tensor, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine steps must be an int >= 0, got {steps!r}.")
    if emb.dim() != 2:
        raise ValueError(f"the channel embedding must be [n_bits, feat_dim], got {tuple(emb.shape)}.")
    if x.dim() != 2 or x.shape[1] != emb.shape[1]:
        raise ValueError(f"values must be [tokens, {emb.shape[1]}], got {tuple(x.shape)}.")
    if bits.shape != (x.shape[0], emb.shape[0]):
        raise ValueError(f"bits must be [{x.shape[0]}, {emb.shape[0]}], got {tuple(bits.shape)}.")
    if bits.numel() and bool(((bits != 0) & (bits != 1)).any()):
        raise ValueError("bits must be 0 or 1 (unpacked, one per code bit).")


def _start(x: torch.Tensor, bits: torch.Tensor, emb: torch.Tensor):
    """The search's starting state: ``b`` (float32), ``u = x E'^T``, ``w = b G``, ``a = <x, y>``, ``q = |y|^2``,
    ``G = E' E'^T`` and ``diag(G)``."""
    ep = emb.float()
    gram = ep @ ep.T
    b = bits.float()
    u, w = x.float() @ ep.T, b @ gram
    return b, u, w, (b * u).sum(-1), (b * w).sum(-1), gram, gram.diagonal().contiguous()


def _coef(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(q > 0, a / q.clamp_min(_TINY), torch.zeros_like(a))


def refine_value_bits_reference(
    x: torch.Tensor, bits: torch.Tensor, emb: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`refine_value_bits`.

    A token whose best flip does not lower its error keeps its state for good (the next step would see the same
    numbers), so each block of ``_BLOCK_ROWS`` tokens drops its finished tokens as it goes: the same float32 updates
    on fewer, cache-resident rows, hence the same bits.
    """
    _check(x, bits, emb, steps)
    with torch.no_grad():
        b, u, w, a, q, gram, sq = _start(x, bits, emb)  # a = <v, y>, q = |y|^2
        b = b.clone()
        for start in range(0, x.shape[0], _BLOCK_ROWS):
            _refine_rows(b, u, w, a, q, gram, sq, torch.arange(start, min(start + _BLOCK_ROWS, x.shape[0])), steps)
    return b.to(torch.uint8), _coef(a, q)[:, None]


def _refine_rows(b, u, w, a, q, gram, sq, rows: torch.Tensor, steps: int) -> None:
    """Refine tokens ``rows`` in place in ``b``, ``a`` and ``q`` (``u`` and ``w`` are read).

    The products by ``d = 1 - 2b`` (+-1) and by 2 are exact, so the fused forms below (``addcmul``) round as the
    plain expressions of the kernel do; the chosen flip's ``a`` and ``q`` are recomputed for its bit alone.
    """
    d, uu, ww, aa, qq = 1.0 - 2.0 * b[rows], u[rows], w[rows], a[rows], q[rows]
    for _ in range(steps):
        gain = torch.addcmul(aa[:, None], d, uu).square_()  # (a + d u)^2
        gain.div_(torch.addcmul(qq[:, None], d, ww, value=2.0).add_(sq).clamp_min_(_TINY))  # the error: |v|^2 - gain
        best, i = gain.max(-1)
        move = best > aa * aa / qq.clamp_min(_TINY) * (1 + _MIN_GAIN)
        done = ~move
        if bool(done.any()):  # final: write back, then continue with the others
            b[rows[done]], a[rows[done]], q[rows[done]] = (1.0 - d[done]) * 0.5, aa[done], qq[done]
            if not bool(move.any()):
                return
            rows, d, uu, ww, aa, qq, i = (t[move] for t in (rows, d, uu, ww, aa, qq, i))
        r = torch.arange(rows.shape[0], device=rows.device)
        di = d[r, i]
        aa = aa + di * uu[r, i]
        qq = qq + 2.0 * di * ww[r, i] + sq[i]
        ww.addcmul_(di[:, None], gram[i])
        d[r, i] = -di
    b[rows], a[rows], q[rows] = (1.0 - d) * 0.5, aa, qq


if HAS_TRITON:

    @triton.jit
    def _refine_kernel(
        u_ptr,  # [N, NB] float32: <v, E'_i>
        w_ptr,  # [N, NB] float32: <y, E'_i>
        bits_ptr,  # [N, NB] uint8 (in and out)
        a_ptr,  # [N] float32: <v, y>
        q_ptr,  # [N] float32: |y|^2
        gram_ptr,  # [NB, NB] float32
        sq_ptr,  # [NB] float32: |E'_i|^2
        coef_ptr,  # [N] float32 (out)
        n,
        nb,
        steps,
        BLOCK_N: tl.constexpr,
        BLOCK_NB: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_NB)
        rmask = rows < n
        cmask = cols < nb
        m2 = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * nb + cols[None, :]
        u = tl.load(u_ptr + off, mask=m2, other=0.0)
        w = tl.load(w_ptr + off, mask=m2, other=0.0)
        b = tl.load(bits_ptr + off, mask=m2, other=0).to(tl.float32)
        sq = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        q = tl.load(q_ptr + rows, mask=rmask, other=0.0)
        step = 0
        active = tl.max(rmask.to(tl.int32), axis=0) > 0
        while (step < steps) & active:
            d = 1.0 - 2.0 * b
            a2 = a[:, None] + d * u
            q2 = q[:, None] + 2.0 * d * w + sq[None, :]
            gain = tl.where(cmask[None, :], a2 * a2 / tl.maximum(q2, 1e-30), -1.0)
            best = tl.max(gain, axis=1)
            i = tl.argmax(gain, axis=1)
            move = (best > a * a / tl.maximum(q, 1e-30) * (1 + 1e-6)) & rmask
            active = tl.max(move.to(tl.int32), axis=0) > 0
            sel = (cols[None, :] == i[:, None]) & move[:, None]
            di = tl.sum(tl.where(sel, d, 0.0), axis=1)
            a = tl.where(move, tl.sum(tl.where(sel, a2, 0.0), axis=1), a)
            q = tl.where(move, tl.sum(tl.where(sel, q2, 0.0), axis=1), q)
            grow = gram_ptr + i.to(tl.int64)[:, None] * nb + cols[None, :]
            g = tl.load(grow, mask=move[:, None] & cmask[None, :], other=0.0)
            w = tl.where(move[:, None], w + di[:, None] * g, w)
            b = tl.where(sel, 1.0 - b, b)
            step += 1
        tl.store(bits_ptr + off, b.to(tl.uint8), mask=m2)
        tl.store(coef_ptr + rows, tl.where(q > 0, a / tl.maximum(q, 1e-30), 0.0), mask=rmask)


def refine_meta(n_bits: int) -> tuple[dict, int]:
    """Constexprs and warps of the refine kernel for ``n_bits`` bits per token: tiles of about 4096 elements (each
    of ``u``, ``w``, the bits and the step's temporaries stays in registers), 8 warps."""
    block_nb = triton.next_power_of_2(n_bits)
    return {"BLOCK_N": max(1, 4096 // block_nb), "BLOCK_NB": block_nb}, 8


def refine_value_bits(
    x: torch.Tensor, bits: torch.Tensor, emb: torch.Tensor, steps: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy bit flips from ``bits`` that lower each token's error ``min_c |x - c (bits @ emb)|^2`` (see the module).

    Parameters
    ----------
    x : torch.Tensor
        Values ``[N, F]``.
    bits : torch.Tensor
        Starting bits ``[N, n_bits]`` (0/1, any dtype).
    emb : torch.Tensor
        ``E' [n_bits, F]``: what a bit adds to the decoded value before the token's coefficient.
    steps : int
        At most this many flips per token (``0``: the bits as given, with the least-squares coefficient).
    use_triton : bool or None
        ``None``: the kernel on CUDA, :func:`refine_value_bits_reference` elsewhere.

    Returns
    -------
    tuple of torch.Tensor
        Bits (uint8 ``[N, n_bits]``) and the least-squares coefficient ``[N, 1]`` (float32).
    """
    if not resolve_use_triton(use_triton, x, bits, emb):
        return refine_value_bits_reference(x, bits, emb, steps)
    _check(x, bits, emb, steps)
    n, nb = bits.shape
    with torch.no_grad():
        b, u, w, a, q, gram, sq = _start(x, bits, emb)
        out = b.to(torch.uint8).contiguous()
        coef = torch.empty(n, device=x.device, dtype=torch.float32)
        if n:
            meta, warps = refine_meta(nb)
            _refine_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
                u.contiguous(),
                w.contiguous(),
                out,
                a.contiguous(),
                q.contiguous(),
                gram.contiguous(),
                sq,
                coef,
                n,
                nb,
                steps,
                **meta,
                num_warps=warps,
            )
    return out, coef[:, None]


__all__ = ["refine_meta", "refine_value_bits", "refine_value_bits_reference"]
