"""CommVQ key encoding by beam search over the residual steps (our addition to the paper's greedy encoder).

CommVQ (Li et al., ICML 2025, arXiv 2506.18879) codes a normalized key with ``R`` greedy residual steps: each step
keeps the one center of its 4,096 closest to what is left. The greedy choice is not the best sequence of codes.
:func:`encode_keys_beam` keeps the ``beam`` best partial sequences after every step instead: per step it scores each
kept sequence's residual against the step's 4,096 centers ``u_A + w_B``
(:func:`pressroom.kernels.commvq_codebook.additive_parts`) and keeps the ``beam`` lowest squared errors over all
``beam x 4096`` extensions; at the end the sequence with the lowest error wins. The codes keep the cache's format
(12-bit codes, :func:`pressroom.kernels.commvq_encode.pack_codes12`), so decoding, the decode kernels and the
codebooks are unchanged; ``beam=1`` is the greedy search.

A candidate's error is split as in the split search, ``||r||^2 + f_A + (K[A, B] + g_B)`` with ``f_A = ||u_A||^2 - 2
r . u_A``, ``g_B = ||w_B||^2 - 2 r . w_B`` and ``K = 2 u_A . w_B``: two ``[rows, 64]`` products per kept sequence,
then 4,096 sums, never the ``[rows, 4096, D]`` centers. The sums of a chunk of rows are held as one float32 ``[rows,
beam, 4096]`` tensor per head (``row_chunk`` rows at a time), so this is plain PyTorch on every device: no Triton
kernel yet, and about ``beam`` times the greedy search's arithmetic plus a top-``beam`` selection per row and step.

Measured on SmolLM2's held-out keys (CPU, 2 bits, the 1,000-step codebooks, 4,096 essay tokens,
``benchmarks/results/commvq_key_beam_cpu.json``): the relative key error of six layers falls by 10% / 18% / 23% on
average at ``beam`` 2 / 4 / 8 (layer 18: 0.00807 greedy, 0.00639 at 4). The needle answers' likelihood did not gain
from it (``benchmarks/results/commvq_needle_nll_cpu_beam4.json``: every layer coded, +3.59 nats over exact at 4
against +3.49 greedy), so it is off by default.
"""

from __future__ import annotations

import torch

from pressroom.kernels.commvq_encode import KeyTables, _check_encode, code_bytes, pack_codes12

MAX_BEAM = 64
CENTERS = 4096  # per residual step: u_A + w_B for A, B in 0..63
# float32 elements of one chunk's candidate sums ([rows, beam, 4096] per head), about 256 MB
_CHUNK_ELEMENTS = 1 << 26


def check_beam(beam: object) -> int:
    """``beam`` as an int in ``[1, MAX_BEAM]``, else ``ValueError``."""
    if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
        raise ValueError(
            f"key_beam must be an int from 1 (the paper's greedy search) to {MAX_BEAM} (kept code sequences per "
            f"key), got {beam!r}."
        )
    return beam


def beam_search_head(x: torch.Tensor, tables: KeyTables, head: int, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search of one head: normalized keys ``[n, D]`` -> ``(codes [n, R] int64, squared error [n] float32)``.

    ``tables``: the layer's :class:`~pressroom.kernels.commvq_encode.KeyTables` on ``x``'s device. Ties keep the
    lower (sequence, code) index, so ``beam=1`` takes the first arg-min as the greedy search does.
    """
    n, d = x.shape
    r_steps = tables.residuals
    u, w = tables.u[head], tables.w[head]  # [R, 64, D]
    un, wn = u.pow(2).sum(-1), w.pow(2).sum(-1)  # [R, 64]
    cross = 2.0 * u @ w.transpose(-1, -2)  # [R, 64, 64]: K[A, B]
    res = x.float()[:, None, :]  # [n, k, D]: k kept sequences (1 before the first step)
    err = res.pow(2).sum(-1)  # [n, k]
    codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
    rows = torch.arange(n, device=x.device)[:, None]
    for step in range(r_steps):
        k = res.shape[1]
        f = un[step] - 2.0 * res @ u[step].T  # [n, k, 64]
        g = wn[step] - 2.0 * res @ w[step].T
        total = (err[..., None, None] + f[..., :, None]) + (cross[step] + g[..., None, :])  # [n, k, 64, 64]
        keep = min(beam, k * CENTERS)
        best, idx = total.view(n, k * CENTERS).topk(keep, dim=1, largest=False, sorted=True)
        src, code = idx // CENTERS, idx % CENTERS
        res = res[rows, src] - (u[step][code // 64] + w[step][code % 64])
        codes = torch.cat((codes[rows, src], code[..., None]), dim=-1)
        err = best
    # the errors carried as sums of parts; the final choice is made on the residuals themselves
    final = res.pow(2).sum(-1)  # [n, k]
    pick = final.argmin(1)
    return codes[rows[:, 0], pick], final[rows[:, 0], pick]


def encode_keys_beam(
    x: torch.Tensor,
    thetas: torch.Tensor,
    beam: int,
    tables: KeyTables | None = None,
    out: torch.Tensor | None = None,
    row_norms: torch.Tensor | None = None,
    row_chunk: int | None = None,
) -> torch.Tensor:
    """Beam-search residual encoding of normalized keys, packed: ``[N, H_kv, D]`` -> uint8 ``[N, H_kv, ceil(1.5 R)]``.

    Parameters
    ----------
    x : torch.Tensor
        Normalized pre-RoPE keys, interleaved, ``[N, H_kv, D]`` (or unnormalized with ``row_norms``).
    thetas : torch.Tensor
        The layer's key codebooks ``[H_kv, R, 128, D/2]``.
    beam : int
        Code sequences kept per key after each step (1: the greedy search; at most :data:`MAX_BEAM`).
    tables : KeyTables, optional
        Precomputed tables of ``thetas`` on ``x``'s device.
    out : torch.Tensor, optional
        Where to write the packed codes.
    row_norms : torch.Tensor, optional
        ``[N]``: code ``x / row_norms[:, None, None]``.
    row_chunk : int, optional
        Rows searched at once (default: a ``[rows, beam, 4096]`` float32 block of about 256 MB per head).
    """
    n, h, _, r = _check_encode(x, thetas)
    beam = check_beam(beam)
    if row_norms is not None:
        if row_norms.shape != (n,):
            raise ValueError(f"row_norms must be [N] = [{n}], got {tuple(row_norms.shape)}.")
        x = x / row_norms.to(x.device, torch.float32)[:, None, None]
    if tables is None:
        tables = KeyTables(thetas.to(x.device))
    if out is None:
        out = torch.empty(n, h, code_bytes(r), dtype=torch.uint8, device=x.device)
    if row_chunk is None:
        row_chunk = max(1, _CHUNK_ELEMENTS // (beam * CENTERS))
    if row_chunk < 1:
        raise ValueError(f"row_chunk must be >= 1, got {row_chunk}.")
    for s in range(0, n, row_chunk):
        e = min(n, s + row_chunk)
        for head in range(h):
            codes, _ = beam_search_head(x[s:e, head], tables, head, beam)
            out[s:e, head] = pack_codes12(codes)
    return out


__all__ = ["MAX_BEAM", "beam_search_head", "check_beam", "encode_keys_beam"]
