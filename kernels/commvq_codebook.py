"""RoPE-commutative key codebooks of CommVQ (Li et al., ICML 2025, arXiv 2506.18879): centers and nearest-center search.

A CommVQ key codebook for one KV head of width ``d = 2P`` (``P`` RoPE pairs) is a parameter ``theta`` of shape
``[128, P]``: for every pair ``p`` it holds 64 complex entries ``z_A = (x_A, y_A) = (theta[2A, p], theta[2A+1, p])``.
A 12-bit code ``C = 64 A + B`` selects, for every pair, the center ``z_A + i z_B``, i.e.

    X_C = x_A - y_B,    Y_C = y_A + x_B.

The 2x2 matrix of that complex number, ``[[X, -Y], [Y, X]]``, commutes with every RoPE rotation, so attention can be
computed from the codes with the query rotated instead of the keys (issue 5). The constant ``T`` (:func:`commutative_T`,
``[8192, 128]``) writes all 4096 centers as ``T @ theta``; ``T^T T`` is diagonal.

Layouts. Keys leave the projection in the ``rotate_half`` layout (pair ``i`` is ``(x_i, x_{i+d/2})``); codebooks work
in the *interleaved* layout ``[x_0, x_{d/2}, x_1, x_{d/2+1}, ...]`` (:func:`to_interleaved` / :func:`from_interleaved`),
and centers are stored interleaved: ``(X_p0, Y_p0, X_p1, Y_p1, ...)``.

Additive structure. ``center(A, B) = u_A + w_B`` with ``u_A = (x_A, y_A)`` and ``w_B = (-y_B, x_B)`` per pair
(:func:`additive_parts`), hence

    ||r - c_AB||^2 = ||r||^2 - 2 r.u_A - 2 r.w_B + H[A, B],    H[A, B] = ||u_A + w_B||^2,

so the nearest of the 4096 centers needs 128 dot products and a 64x64 table per vector, never a [N, 4096] matrix
(:func:`nearest_centers`: a Triton kernel beside :func:`nearest_centers_reference`).

Weighted search. With per-pair weights ``w_p > 0`` (e.g. the query energy of each RoPE pair: an error in a pair the
queries barely use barely moves the attention logits), the distance ``sum_p w_p |r_p - c_p|^2`` is the Euclidean
distance after scaling both coordinates of pair ``p`` by ``s_p = sqrt(w_p)``; a center is linear in
``theta[:, p]``, so the scaled centers are those of ``theta * s``. The weighted search is the plain one on
``(scale_pairs(r, s), theta * s)`` (:func:`search_operands`); its codes index the unscaled ``theta``. A per-pair
scale commutes with the pair's RoPE rotation, so the codebook stays RoPE-commutative and decoding is unchanged.

Dispatch. ``use_triton=None`` runs the Triton kernel on CUDA tensors and the reference elsewhere (or always the
reference with ``PRESSROOM_FORCE_REFERENCE=1``); ``True`` / ``False`` force one (see
:func:`pressroom.kernels.rope_ring.resolve_use_triton`).
"""

from __future__ import annotations

import torch

from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

N_ENTRIES = 64  # complex entries per pair (6 bits each for A and B)
N_CENTERS = N_ENTRIES * N_ENTRIES  # 4096 = 2**12 centers per residual step
THETA_ROWS = 2 * N_ENTRIES  # 128
_CHUNK = 8192  # rows per chunk in the PyTorch references
_SUBCHUNK = 256  # rows per in-place [rows, 64, 64] block of nearest_centers_reference (4 MB: stays in cache)


def commutative_T(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The constant ``T`` [8192, 128] with ``centers = T @ theta`` (rows ``2C``: X, ``2C+1``: Y of code ``C``).

    For ``C = 64 A + B``: ``T[2C, 2A] = 1``, ``T[2C, 2B+1] = -1``, ``T[2C+1, 2B] = 1``, ``T[2C+1, 2A+1] = 1``
    (the reference's ``XAB = XA - YB``, ``YAB = XB + YA``).
    """
    codes = torch.arange(N_CENTERS, device=device)
    a, b = codes // N_ENTRIES, codes % N_ENTRIES
    t = torch.zeros(2 * N_CENTERS, THETA_ROWS, device=device, dtype=dtype)
    t[2 * codes, 2 * a] = 1
    t[2 * codes, 2 * b + 1] = -1
    t[2 * codes + 1, 2 * b] = 1
    t[2 * codes + 1, 2 * a + 1] = 1
    return t


def _check_theta(theta: torch.Tensor) -> None:
    if theta.dim() < 2 or theta.shape[-2] != THETA_ROWS:
        raise ValueError(f"theta must be [..., {THETA_ROWS}, head_dim/2], got shape {tuple(theta.shape)}.")


def additive_parts(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, w)``, each ``[..., 64, 2P]`` interleaved, with ``center(A, B) = u[A] + w[B]``.

    ``u_A = (x_A, y_A)`` and ``w_B = (-y_B, x_B)`` per pair, where ``(x_A, y_A) = (theta[2A], theta[2A+1])``.
    """
    _check_theta(theta)
    x = theta[..., 0::2, :]  # [..., 64, P]
    y = theta[..., 1::2, :]
    u = torch.stack((x, y), dim=-1).flatten(-2)
    w = torch.stack((-y, x), dim=-1).flatten(-2)
    return u, w


def centers_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """All 4096 centers ``[..., 4096, 2P]`` (interleaved) of ``theta [..., 128, P]``; row ``64 A + B`` is u_A + w_B."""
    u, w = additive_parts(theta)
    return (u.unsqueeze(-2) + w.unsqueeze(-3)).flatten(-3, -2)


def to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` layout -> interleaved pairs over the last dim (one head): ``[x_0, x_{d/2}, x_1, ...]``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}.")
    return x.unflatten(-1, (2, d // 2)).transpose(-1, -2).flatten(-2)


def from_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs -> ``rotate_half`` layout over the last dim (one head); inverse of :func:`to_interleaved`."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}.")
    return x.unflatten(-1, (d // 2, 2)).transpose(-1, -2).flatten(-2)


def scale_pairs(x: torch.Tensor, pair_scale: torch.Tensor) -> torch.Tensor:
    """Interleaved vectors ``x [..., 2P]`` with both coordinates of pair ``p`` multiplied by ``pair_scale[..., p]``."""
    if pair_scale.shape[-1] * 2 != x.shape[-1]:
        raise ValueError(f"pair_scale [..., {pair_scale.shape[-1]}] does not fit vectors [..., {x.shape[-1]}].")
    return x * pair_scale.to(x.dtype).repeat_interleave(2, dim=-1)


def check_pair_weights(pair_weights: torch.Tensor, shape: tuple[int, ...], name: str = "pair_weights") -> torch.Tensor:
    """``pair_weights`` as float32 after checking its ``shape`` (e.g. ``[H_kv, head_dim/2]``) and that every weight is
    finite and positive; ``name`` is the one the error messages use."""
    weights = pair_weights.float()
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)}, got {list(weights.shape)}.")
    if not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
        raise ValueError(f"{name} must be finite and positive (a weight per RoPE pair).")
    return weights


def search_operands(
    x: torch.Tensor, thetas: torch.Tensor, pair_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, thetas)`` for the nearest-center search under per-pair weights (module docstring, weighted search).

    ``x [..., H, 2P]`` interleaved (the head axis second to last), ``thetas [H, R, 128, P]``, ``pair_weights [H, P]``
    (positive) or ``None`` (the Euclidean search: both returned as given).
    """
    if pair_weights is None:
        return x, thetas
    weights = check_pair_weights(pair_weights.to(thetas.device), (thetas.shape[0], thetas.shape[-1]))
    scale = weights.sqrt()
    return scale_pairs(x, scale.to(x.device)), thetas * scale[:, None, None, :]


def _prepare(
    r: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Check shapes; return fp32 ``(r [G, N, D], u [G, 64, D], w, H [G, 64, 64], batched)``.

    ``H[A, B] = ||u_A + w_B||^2``. One problem is ``r [N, D]`` with ``theta [128, P]``; ``G`` independent problems
    (e.g. the KV heads of a layer) are ``r [G, N, D]`` with ``theta [G, 128, P]``.
    """
    _check_theta(theta)
    batched = r.dim() == 3
    if theta.dim() != (3 if batched else 2) or (batched and theta.shape[0] != r.shape[0]):
        raise ValueError(
            f"theta must be [128, P] for vectors [N, 2P], or [G, 128, P] for [G, N, 2P]; got theta "
            f"{tuple(theta.shape)} and vectors {tuple(r.shape)}."
        )
    if r.dim() not in (2, 3) or r.shape[-1] != 2 * theta.shape[-1]:
        raise ValueError(
            f"vectors must be [N, {2 * theta.shape[-1]}] for theta {tuple(theta.shape)}, got {tuple(r.shape)}."
        )
    if not batched:
        r, theta = r.unsqueeze(0), theta.unsqueeze(0)
    theta = theta.to(device=r.device, dtype=torch.float32)
    u, w = additive_parts(theta)
    h = (u.unsqueeze(2) + w.unsqueeze(1)).pow(2).sum(-1)  # [G, 64, 64]
    return r.float().contiguous(), u.contiguous(), w.contiguous(), h.contiguous(), batched


def nearest_centers_reference(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`nearest_centers`: chunked, additive structure, first index on ties."""
    r, u, w, h, batched = _prepare(r, theta)
    out = torch.empty(r.shape[:2], dtype=torch.int64, device=r.device)
    for g in range(r.shape[0]):
        for s in range(0, r.shape[1], _CHUNK):
            rc = r[g, s : s + _CHUNK]
            ru, rw = (rc @ u[g].T).mul_(-2.0), (rc @ w[g].T).mul_(-2.0)
            # d2 - ||r||^2 = h - 2 (r.u_A + r.w_B), on cache-sized blocks of rows; the same float32 values as that
            # expression, since scaling by -2 is exact: -2x - 2y = -2 (x + y) and h + (-2z) = h - 2z, bit for bit
            for t in range(0, rc.shape[0], _SUBCHUNK):
                val = torch.add(ru[t : t + _SUBCHUNK, :, None], rw[t : t + _SUBCHUNK, None, :]).add_(h[g])
                out[g, s + t : s + t + _SUBCHUNK] = val.flatten(1).argmin(dim=1)
    return out if batched else out[0]


if HAS_TRITON:

    @triton.jit
    def _nearest_kernel(
        r_ptr,
        u_ptr,
        w_ptr,
        h_ptr,
        out_ptr,
        n_rows,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)
        r_ptr += g * n_rows * D
        u_ptr += g * K * D
        w_ptr += g * K * D
        h_ptr += g * K * K
        out_ptr += g * n_rows
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        ks = tl.arange(0, K)
        rmask = rows < n_rows
        dmask = cols < D
        r = tl.load(r_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w_t = tl.load(w_ptr + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)  # [BLOCK_D, K]
        rw = tl.dot(r, w_t, input_precision="ieee")  # [BLOCK_N, K]: r . w_B
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        for a in range(K):
            ua = tl.load(u_ptr + a * D + cols, mask=dmask, other=0.0)
            ra = tl.sum(r * ua[None, :], axis=1)  # r . u_A
            h = tl.load(h_ptr + a * K + ks)
            val = h[None, :] - 2.0 * (ra[:, None] + rw)
            m = tl.min(val, axis=1)
            i = tl.argmin(val, axis=1)
            upd = m < best
            best = tl.where(upd, m, best)
            best_idx = tl.where(upd, a * K + i, best_idx)
        tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=rmask)


def _nearest_triton(r: torch.Tensor, u: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    groups, n, d = r.shape
    out = torch.empty(groups, n, dtype=torch.int64, device=r.device)
    if n == 0:
        return out
    block_n = 64
    grid = (triton.cdiv(n, block_n), groups)
    _nearest_kernel[grid](r, u, w, h, out, n, D=d, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), K=64)
    return out


def nearest_centers(r: torch.Tensor, theta: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """Code (``64 A + B``, int64 ``[N]``) of the center of ``theta`` nearest to each row of ``r``.

    Parameters
    ----------
    r : torch.Tensor
        ``[N, 2P]`` vectors in the interleaved layout (any float dtype; computed in float32), or ``[G, N, 2P]`` for
        ``G`` independent problems (codes ``[G, N]``).
    theta : torch.Tensor
        ``[128, P]`` codebook parameter (``[G, 128, P]`` with batched vectors).
    use_triton : bool or None
        Kernel choice (module docstring).

    Notes
    -----
    Uses the additive structure: per row, 64 dot products with ``u``, 64 with ``w`` and a 64x64 table; no
    ``[N, 4096]`` matrix is ever held (the reference holds at most a chunk of 8192 rows).
    """
    if not resolve_use_triton(use_triton, r):
        return nearest_centers_reference(r, theta)
    r, u, w, h, batched = _prepare(r, theta)
    out = _nearest_triton(r, u, w, h)
    return out if batched else out[0]


def residual_encode(
    r: torch.Tensor, thetas: torch.Tensor, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual quantization: codes ``[N, R]`` (int64) and the final residual ``[N, 2P]`` (float32).

    Step ``i`` codes the residual left by steps ``0 .. i-1`` with ``thetas[i]`` ([R, 128, P]).
    """
    _check_theta(thetas)
    if thetas.dim() != 3:
        raise ValueError(f"thetas must be [R, 128, P], got shape {tuple(thetas.shape)}.")
    res = r.float().clone()
    centers = centers_from_theta(thetas.to(device=r.device, dtype=torch.float32))  # [R, 4096, 2P]
    codes = torch.empty(r.shape[0], thetas.shape[0], dtype=torch.int64, device=r.device)
    for i in range(thetas.shape[0]):
        codes[:, i] = nearest_centers(res, thetas[i], use_triton=use_triton)
        res -= centers[i][codes[:, i]]
    return codes, res


def residual_decode(codes: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Sum over residual steps of the selected centers: ``[N, R]`` codes -> ``[N, 2P]`` float32 (interleaved)."""
    _check_theta(thetas)
    if thetas.dim() != 3 or codes.dim() != 2 or codes.shape[1] != thetas.shape[0]:
        raise ValueError(f"codes {tuple(codes.shape)} must be [N, R] for thetas {tuple(thetas.shape)} ([R, 128, P]).")
    centers = centers_from_theta(thetas.to(device=codes.device, dtype=torch.float32))
    out = torch.zeros(codes.shape[0], centers.shape[-1], dtype=torch.float32, device=codes.device)
    for i in range(thetas.shape[0]):
        out += centers[i][codes[:, i].long()]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Soft E-step of the codebook EM (training): soft assignments softmax(-||r - c||/temperature) over the 4096 centers,
# reduced on the fly to the M-step's sufficient statistics, never held as a [N, 4096] matrix.


def em_estep_reference(
    r: torch.Tensor, theta: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`em_estep` (chunks of 8192 rows)."""
    r, u, w, h, batched = _prepare(r, theta)
    groups, n, _ = r.shape
    codes = torch.empty(groups, n, dtype=torch.int64, device=r.device)
    pa = torch.empty(groups, n, N_ENTRIES, dtype=torch.float32, device=r.device)
    pb = torch.empty_like(pa)
    counts = torch.zeros(groups, N_CENTERS, dtype=torch.float32, device=r.device)
    for g in range(groups):
        for s in range(0, n, _CHUNK):
            rc = r[g, s : s + _CHUNK]
            val = h[g].unsqueeze(0) - 2.0 * ((rc @ u[g].T).unsqueeze(2) + (rc @ w[g].T).unsqueeze(1))  # d2 - |r|^2
            codes[g, s : s + _CHUNK] = val.flatten(1).argmin(dim=1)
            dist = (val + rc.pow(2).sum(1).view(-1, 1, 1)).clamp_min(0).sqrt()
            p = torch.softmax(-dist.flatten(1) / temperature, dim=1).view(-1, N_ENTRIES, N_ENTRIES)
            pa[g, s : s + _CHUNK] = p.sum(2)
            pb[g, s : s + _CHUNK] = p.sum(1)
            counts[g] += p.sum(0).flatten()
    if not batched:
        return codes[0], counts[0], pa[0], pb[0]
    return codes, counts, pa, pb


if HAS_TRITON:

    @triton.jit
    def _estep_kernel(
        r_ptr,
        u_ptr,
        w_ptr,
        h_ptr,
        codes_ptr,
        pa_ptr,
        pb_ptr,
        part_ptr,
        n_rows,
        n_blocks,
        inv_temp,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        g = tl.program_id(1).to(tl.int64)
        r_ptr += g * n_rows * D
        u_ptr += g * K * D
        w_ptr += g * K * D
        h_ptr += g * K * K
        codes_ptr += g * n_rows
        pa_ptr += g * n_rows * K
        pb_ptr += g * n_rows * K
        part_ptr += g * n_prog * K * K
        cols = tl.arange(0, BLOCK_D)
        ks = tl.arange(0, K)
        dmask = cols < D
        w_t = tl.load(w_ptr + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)  # [BLOCK_D, K]
        part = part_ptr + pid * K * K  # this program's partial column sums of the soft assignments
        for blk in range(pid, n_blocks, n_prog):
            rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < n_rows
            r = tl.load(r_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            rr = tl.sum(r * r, axis=1)
            rw = tl.dot(r, w_t, input_precision="ieee")
            # pass 1: hard arg-min and the online softmax normalizer over the 64 x 64 centers
            best = tl.full((BLOCK_N,), float("inf"), tl.float32)
            best_idx = tl.zeros((BLOCK_N,), tl.int32)
            m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            s = tl.zeros((BLOCK_N,), tl.float32)
            for a in range(K):
                ua = tl.load(u_ptr + a * D + cols, mask=dmask, other=0.0)
                ra = tl.sum(r * ua[None, :], axis=1)
                h = tl.load(h_ptr + a * K + ks)
                val = h[None, :] - 2.0 * (ra[:, None] + rw)
                vmin = tl.min(val, axis=1)
                vidx = tl.argmin(val, axis=1)
                upd = vmin < best
                best = tl.where(upd, vmin, best)
                best_idx = tl.where(upd, a * K + vidx, best_idx)
                z = -tl.sqrt(tl.maximum(val + rr[:, None], 0.0)) * inv_temp
                m_new = tl.maximum(m, tl.max(z, axis=1))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
                m = m_new
            # pass 2: normalized probabilities, reduced to marginals (rows) and column sums (centers)
            inv_s = tl.where(rmask, 1.0 / s, 0.0)
            pb_acc = tl.zeros((BLOCK_N, K), tl.float32)
            for a in range(K):
                ua = tl.load(u_ptr + a * D + cols, mask=dmask, other=0.0)
                ra = tl.sum(r * ua[None, :], axis=1)
                h = tl.load(h_ptr + a * K + ks)
                val = h[None, :] - 2.0 * (ra[:, None] + rw)
                z = -tl.sqrt(tl.maximum(val + rr[:, None], 0.0)) * inv_temp
                p = tl.exp(z - m[:, None]) * inv_s[:, None]
                tl.store(pa_ptr + rows * K + a, tl.sum(p, axis=1), mask=rmask)
                pb_acc += p
                col = tl.load(part + a * K + ks)
                tl.store(part + a * K + ks, col + tl.sum(p, axis=0))
            tl.store(pb_ptr + rows[:, None] * K + ks[None, :], pb_acc, mask=rmask[:, None])
            tl.store(codes_ptr + rows, best_idx.to(tl.int64), mask=rmask)


if HAS_TRITON:

    @triton.jit
    def _estep3_kernel(
        ru_ptr,
        rw_ptr,
        rr_ptr,
        h_ptr,
        codes_ptr,
        pa_ptr,
        pb_ptr,
        part_ptr,
        n_rows,
        n_out,
        n_blocks,
        inv_temp,
        BLOCK_N: tl.constexpr,
        K: tl.constexpr,
    ):
        # The dot products r.u_A, r.w_B and ||r||^2 come precomputed (one GEMM each), so the loops over A hold
        # [BLOCK_N, 64] tiles only and do no cross-lane reduction except where a row sum is the output (pa).
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        g = tl.program_id(1).to(tl.int64)
        ru_ptr += g * n_rows * K
        rw_ptr += g * n_rows * K
        rr_ptr += g * n_rows
        h_ptr += g * K * K
        codes_ptr += g * n_out  # outputs: a slice of rows of [G, n_out, ...] tensors
        pa_ptr += g * n_out * K
        pb_ptr += g * n_out * K
        part_ptr += g * n_prog * K * K
        ks = tl.arange(0, K)
        part = part_ptr + pid * K * K  # this program's partial column sums of the soft assignments
        for blk in range(pid, n_blocks, n_prog):
            rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < n_rows
            rw = tl.load(rw_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None], other=0.0)
            rr = tl.load(rr_ptr + rows, mask=rmask, other=0.0)
            # pass 1 (no special functions): per (row, B) the smallest value over A and its first A
            best = tl.full((BLOCK_N, K), float("inf"), tl.float32)
            best_a = tl.zeros((BLOCK_N, K), tl.int32)
            for a in range(K):
                ra = tl.load(ru_ptr + rows * K + a, mask=rmask, other=0.0)
                h = tl.load(h_ptr + a * K + ks)
                val = h[None, :] - 2.0 * (ra[:, None] + rw)
                upd = val < best
                best = tl.where(upd, val, best)
                best_a = tl.where(upd, a, best_a)
            vmin = tl.min(best, axis=1)
            # first code (64 A + B) among the minima: the reference's arg-min over the flattened 4096
            best_idx = tl.min(tl.where(best == vmin[:, None], best_a * K + ks[None, :], K * K), axis=1)
            m = -tl.sqrt(tl.maximum(vmin + rr, 0.0)) * inv_temp  # the largest logit, at the nearest center
            # pass 2: the softmax normalizer; its per-(row, B) partial sums are pb before normalization
            sb = tl.zeros((BLOCK_N, K), tl.float32)
            for a in range(K):
                ra = tl.load(ru_ptr + rows * K + a, mask=rmask, other=0.0)
                h = tl.load(h_ptr + a * K + ks)
                val = h[None, :] - 2.0 * (ra[:, None] + rw)
                sb += tl.exp(-tl.sqrt(tl.maximum(val + rr[:, None], 0.0)) * inv_temp - m[:, None])
            inv_s = tl.where(rmask, 1.0 / tl.sum(sb, axis=1), 0.0)
            tl.store(pb_ptr + rows[:, None] * K + ks[None, :], sb * inv_s[:, None], mask=rmask[:, None])
            tl.store(codes_ptr + rows, best_idx.to(tl.int64), mask=rmask)
            # pass 3: normalized probabilities, reduced to the A marginals (rows) and column sums (centers)
            for a in range(K):
                ra = tl.load(ru_ptr + rows * K + a, mask=rmask, other=0.0)
                h = tl.load(h_ptr + a * K + ks)
                val = h[None, :] - 2.0 * (ra[:, None] + rw)
                z = -tl.sqrt(tl.maximum(val + rr[:, None], 0.0)) * inv_temp
                p = tl.exp(z - m[:, None]) * inv_s[:, None]
                tl.store(pa_ptr + rows * K + a, tl.sum(p, axis=1), mask=rmask)
                col = tl.load(part + a * K + ks)
                tl.store(part + a * K + ks, col + tl.sum(p, axis=0))


ESTEP_DESIGNS = ("three_pass", "two_pass")


def em_estep(
    r: torch.Tensor,
    theta: torch.Tensor,
    temperature: float,
    use_triton: bool | None = None,
    programs: int | None = None,
    design: str = "three_pass",
    block_n: int = 16,
    num_warps: int = 2,
    chunk_rows: int = 1 << 18,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft E-step of CommVQ's codebook EM over the centers of ``theta``, reduced to sufficient statistics.

    With ``p[n, C] = softmax_C(-||r_n - c_C|| / temperature)`` (the reference's soft assignment; Euclidean distance,
    not squared), returns

    - ``codes`` int64 ``[N]``: the hard arg-min (nearest center);
    - ``counts`` float32 ``[4096]``: ``sum_n p[n, C]``;
    - ``pa``, ``pb`` float32 ``[N, 64]``: marginals ``sum_B p[n, 64A+B]`` and ``sum_A p[n, 64A+B]``.

    Batched: ``r [G, N, 2P]`` with ``theta [G, 128, P]`` gives ``[G, ...]`` outputs (one launch for all heads).

    The M-step needs only these: ``T^T s`` of the weighted sums ``s_C = sum_n p[n, C] r_n`` is a function of
    ``pa^T r`` and ``pb^T r`` (:func:`theta_from_stats`). The Triton kernels keep each row's 4096 probabilities in
    registers and accumulate column sums per program without atomics (deterministic). Designs:

    - ``"three_pass"`` (default): ``r.u_A``, ``r.w_B`` and ``||r||^2`` are computed first, ``chunk_rows`` rows at a
      time (one float32 GEMM each, ``2 x 64`` floats per row of scratch). Then one kernel makes three passes over
      ``A`` with ``[block_n, 64]`` tiles. Pass 1 finds the nearest center with running per-``B`` minima, without
      special functions. That gives the largest logit exactly, so pass 2 sums ``exp`` without rescaling, and its
      per-``B`` sums are ``pb``. Pass 3 reduces the normalized probabilities to ``pa`` and the counts.
    - ``"two_pass"``: the earlier kernel, kept for comparison. It reads ``r`` itself (a dot product per ``A``) and
      runs an online softmax with per-``A`` row reductions.

    ``programs``, ``block_n``, ``num_warps`` set the launch (persistent programs per head, rows per tile, warps).
    The defaults (16 programs per SM over all heads, 16 rows, 2 warps) were the fastest of the launches timed on an
    H100 (``benchmarks/commvq_em_speed.py``, phase ``estep``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if design not in ESTEP_DESIGNS:
        raise ValueError(f"design must be one of {ESTEP_DESIGNS}, got {design!r}.")
    if block_n < 1 or block_n & (block_n - 1) or chunk_rows < 1:
        raise ValueError(f"block_n must be a power of two and chunk_rows >= 1, got {block_n} and {chunk_rows}.")
    if not resolve_use_triton(use_triton, r):
        return em_estep_reference(r, theta, temperature)
    r, u, w, h, batched = _prepare(r, theta)
    groups, n, d = r.shape
    codes = torch.empty(groups, n, dtype=torch.int64, device=r.device)
    pa = torch.empty(groups, n, N_ENTRIES, dtype=torch.float32, device=r.device)
    pb = torch.empty_like(pa)
    counts = torch.zeros(groups, N_CENTERS, dtype=torch.float32, device=r.device)
    if programs is None:
        sms = torch.cuda.get_device_properties(r.device).multi_processor_count if r.is_cuda else 2
        programs = triton.cdiv(16 * sms, groups)
    step = n if design == "two_pass" else chunk_rows
    for s in range(0, n, step):
        e = min(n, s + step)
        n_blocks = triton.cdiv(e - s, block_n)
        progs = max(1, min(programs, n_blocks))
        part = torch.zeros(groups, progs, N_CENTERS, dtype=torch.float32, device=r.device)
        if design == "two_pass":
            _estep_kernel[(progs, groups)](
                r, u, w, h, codes, pa, pb, part, n, n_blocks, 1.0 / temperature,
                D=d, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), K=N_ENTRIES, num_warps=num_warps,
            )  # fmt: skip
        else:
            rc = r[:, s:e]
            ru = torch.matmul(rc, u.transpose(1, 2)).contiguous()  # [G, c, 64]
            rw = torch.matmul(rc, w.transpose(1, 2)).contiguous()
            rr = rc.pow(2).sum(-1).contiguous()
            _estep3_kernel[(progs, groups)](
                ru, rw, rr, h, codes[:, s:], pa[:, s:], pb[:, s:], part, e - s, n, n_blocks, 1.0 / temperature,
                BLOCK_N=block_n, K=N_ENTRIES, num_warps=num_warps,
            )  # fmt: skip
        counts += part.sum(1)
    if not batched:
        return codes[0], counts[0], pa[0], pb[0]
    return codes, counts, pa, pb


def stats_TtS(sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:  # noqa: N802 - T as in the paper
    """``T^T s`` ``[128, P]`` from the marginal weighted sums ``sa = pa^T r``, ``sb = pb^T r`` (``[64, 2P]``).

    ``sum_C s_C . c_C = sum_A sa_A . u_A + sum_B sb_B . w_B``, so row ``2k`` (``x_k``) is ``sa_k.X + sb_k.Y`` and row
    ``2k+1`` (``y_k``) is ``sa_k.Y - sb_k.X`` per pair.
    """
    sx, sy = sa[..., 0::2], sa[..., 1::2]
    bx, by = sb[..., 0::2], sb[..., 1::2]
    return torch.stack((sx + by, sy - bx), dim=-2).flatten(-3, -2)


def theta_from_stats(counts: torch.Tensor, tts: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Closed-form M-step: ``theta = (T^T N T)^{-1} T^T s`` (weighted least squares through ``T``).

    ``counts`` [4096] (or [G, 4096]) are the soft counts ``N_C`` (plus ``eps`` as in the reference, for both
    coordinates of each center); ``tts`` [128, P] (or [G, 128, P]) is ``T^T s`` (:func:`stats_TtS`). The normal
    matrix is built in closed form from ``N[A, B]`` instead of through the 8192-row ``T``: with rows ``x_k = 2k``,
    ``y_k = 2k+1``, ``M[x_k, x_k] = M[y_k, y_k] = sum_B N[k, B] + sum_A N[A, k]`` and
    ``M[x_a, y_b] = M[y_b, x_a] = N[b, a] - N[a, b]``, zero elsewhere. Solved in float64.
    """
    n = (counts.double() + eps).unflatten(-1, (N_ENTRIES, N_ENTRIES))  # [..., A, B]
    diag = n.sum(-1) + n.sum(-2)  # [..., 64]
    cross = n.transpose(-1, -2) - n  # [..., a, b] = N[b, a] - N[a, b]
    mat = torch.zeros(*n.shape[:-2], THETA_ROWS, THETA_ROWS, dtype=torch.float64, device=n.device)
    idx = torch.arange(N_ENTRIES, device=n.device)
    mat[..., 2 * idx, 2 * idx] = diag
    mat[..., 2 * idx + 1, 2 * idx + 1] = diag
    mat[..., 0::2, 1::2] = cross
    mat[..., 1::2, 0::2] = cross.transpose(-1, -2)
    return torch.linalg.solve(mat, tts.double()).float()
