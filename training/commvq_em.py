"""Key codebook training for CommVQ (Li et al., ICML 2025, arXiv 2506.18879): EM, end-to-end, and the reference EM.

All functions work on the keys of one layer, prepared by :func:`prepare_keys`: per token, the pre-RoPE key vectors
of all KV heads are reordered to the interleaved pair layout and divided together by their L2 norm (kept, one per
token), so each head's part ``r [N, head_dim]`` has norm <= 1. Errors are reported as the reference does: the mean
over tokens and elements of ``((r - r_hat) * norm)^2``, i.e. in the keys' own scale.

- :func:`fit_keys_em`: the paper's EM, residual by residual (each step its own ``theta``), all heads of the layer
  at once: soft E-step ``softmax(-||r - c|| / temperature)`` (fused Triton kernel, never a ``[N, 4096]`` matrix),
  closed-form M-step (weighted least squares through ``T``) from sufficient statistics, temperature decayed
  exponentially from ``1e-3 * s`` to ``1e-5 * s`` over 100 iterations with ``s`` divided by 10 after residuals
  0, 4, 8, ... (as in the reference), the reference's early stop, and the best iterate kept.
- :func:`reference_em_step`: a faithful PyTorch re-implementation of the reference's iteration (``cdist`` against
  all 4096 centers, full ``[N, 4096]`` soft assignments, ``inv``), the speed baseline and a cross-check.
- :func:`fit_keys_e2e`: an end-to-end alternative: all ``R`` thetas learned jointly through ``T`` with
  straight-through hard Gumbel-softmax code choices, Adam, cosine schedule, gradient clipping at 1.0, loss =
  reconstruction + 0.25 x commitment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pressroom.kernels.commvq_codebook import (
    N_CENTERS,
    centers_from_theta,
    commutative_T,
    em_estep,
    nearest_centers,
    scale_pairs,
    search_operands,
    stats_TtS,
    theta_from_stats,
    to_interleaved,
)


def prepare_keys(keys: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys ``[N, H * head_dim]`` (rotate_half layout) -> ``(r [H, N, head_dim], norm [N])``.

    ``r`` is interleaved per head and divided by the token's norm over all heads (the reference's normalization).
    """
    n, feat = keys.shape
    if feat % num_kv_heads:
        raise ValueError(f"key width {feat} is not a multiple of {num_kv_heads} KV heads.")
    x = to_interleaved(keys.float().view(n, num_kv_heads, feat // num_kv_heads))
    norm = x.flatten(1).norm(dim=1)
    r = x / norm.clamp_min(1e-12).view(n, 1, 1)
    return r.transpose(0, 1).contiguous(), norm


DEFAULT_KEY_QUERY_WEIGHT = 0.0  # query_pair_weights' power; 0: the paper's Euclidean key distance


def query_pair_weights(queries: torch.Tensor, num_kv_heads: int, head_dim: int, power: float) -> torch.Tensor:
    """Per-RoPE-pair weights of the key distance from pre-RoPE queries: ``[N, H_q * head_dim]`` -> ``[H_kv, P]``.

    Our addition to CommVQ. A key error ``e`` moves a logit by ``q . R e``; over the relative rotations ``R`` of RoPE
    the pairs decouple and pair ``p`` contributes ``|q_p|^2 |e_p|^2 / 2`` on average, so a key search that spends its
    bits where the queries look weighs pair ``p`` by the queries' mean energy ``E|q_p|^2`` (the query heads of the
    KV head's group pooled, normalized to mean 1 per KV head). ``power`` tempers it: ``w_p = energy_p ** power``
    (``0``: the paper's Euclidean distance, the default). Measured on SmolLM2 at 2 bits
    (``benchmarks/results/commvq_key_weights_cpu.json``, 30 layers, held-out essays): codebooks trained and encoded
    at 0.5 lower the attention-output error from 0.0235 to 0.0161 and the attention KL from 0.0315 to 0.0195
    (power 1 over-weights the few pairs that dominate the energy: 0.0294); but the 4k needle score was 42.5 against
    46.7 for the Euclidean codebooks on the same path (12 samples per task, ``commvq_quality_2bit_qw05.json`` and
    ``commvq_quality_2bit_refine_ablation.json``), so it is not the default.
    Queries are in the model's ``rotate_half`` layout (pair ``p`` is channels ``p`` and ``p + head_dim/2``).
    """
    if not math.isfinite(power) or power < 0:
        raise ValueError(f"the query weight power must be a finite number >= 0, got {power}.")
    n, feat = queries.shape
    if head_dim % 2 or feat % head_dim or (feat // head_dim) % num_kv_heads:
        raise ValueError(
            f"queries of width {feat} are not whole heads of {head_dim} grouped over {num_kv_heads} KV heads."
        )
    if n == 0:
        raise ValueError("no queries to weigh the key distance with (empty collection).")
    heads = feat // head_dim
    energy = queries.float().view(n, heads, 2, head_dim // 2).pow(2).sum(2).mean(0)  # [H_q, P]
    energy = energy.view(num_kv_heads, heads // num_kv_heads, -1).mean(1)
    energy = energy / energy.mean(-1, keepdim=True).clamp_min(1e-30)
    return energy.clamp_min(1e-6).pow(power)


def key_relative_mse(
    r: torch.Tensor,
    norm: torch.Tensor,
    thetas: torch.Tensor,
    use_triton: bool | None = None,
    pair_weights: torch.Tensor | None = None,
):
    """Relative MSE of residual quantization per head: ``sum ||k - k_hat||^2 / sum ||k||^2`` (``[H]``).

    ``r [H, N, d]`` and ``norm [N]`` from :func:`prepare_keys`; ``thetas [H, R, 128, P]``; ``pair_weights [H, P]``:
    the codes are searched under that distance (as the cache encodes), the error is the plain one.
    """
    thetas = thetas.to(r.device).float()
    rs, thetas = search_operands(r.float().transpose(0, 1), thetas, pair_weights)
    res = rs.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # never the caller's r
    centers = centers_from_theta(thetas)  # [H, R, 4096, d]
    for i in range(thetas.shape[1]):
        codes = nearest_centers(res, thetas[:, i], use_triton=use_triton)
        res -= torch.gather(centers[:, i], 1, codes.unsqueeze(-1).expand(-1, -1, res.shape[-1]))
    if pair_weights is not None:  # back to the keys' own scale
        res = scale_pairs(res, pair_weights.to(res.device).float().rsqrt()[:, None, :])
    w2 = norm.float().pow(2).view(1, -1)
    return (res.pow(2).sum(-1) * w2).sum(1) / (r.float().pow(2).sum(-1) * w2).sum(1)


# ----------------------------------------------------------------------------------------------------------- EM
@dataclass
class EMConfig:
    """EM hyper-parameters (defaults: the reference's ``quantize_key_cache.py``)."""

    n_steps: int = 100
    initial_temp: float = 1e-3
    final_temp: float = 1e-5
    tol: float = 1e-5  # stop when an iterate is no better than the best but within tol of it
    scale_every: int = 4  # the temperature scale is divided by 10 after residuals 0, 4, 8, ...
    seed: int = 0


def temperature_at(step: int, cfg: EMConfig, t_scale: float) -> float:
    """Exponential schedule from ``initial_temp * t_scale`` to ``final_temp * t_scale`` over ``n_steps``."""
    t0, t1 = cfg.initial_temp * t_scale, cfg.final_temp * t_scale
    progress = step / max(1, cfg.n_steps - 1)
    return t0 * (t1 / t0) ** progress


def _gather_centers(centers: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``centers [G, 4096, d]``, ``codes [G, N]`` -> ``[G, N, d]``."""
    return torch.gather(centers, 1, codes.unsqueeze(-1).expand(-1, -1, centers.shape[-1]))


def _weighted_mse(res: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Reference error ``mean(((r - c) * norm)^2)`` per group: ``res [G, N, d]``, ``w2 [N]`` -> ``[G]``."""
    return (res.pow(2).sum(-1) * w2.view(1, -1)).sum(1) / (res.shape[1] * res.shape[2])


def _tts_full(s: torch.Tensor) -> torch.Tensor:
    """``T^T s`` from full weighted sums ``s [G, 4096, d]`` (interleaved) -> ``[G, 128, P]``."""
    g, c, d = s.shape
    flat = s.view(g, c, d // 2, 2).transpose(2, 3).reshape(g, 2 * c, d // 2)  # rows 2C: X, 2C+1: Y
    return commutative_T(s.device).T @ flat


def initial_theta(r: torch.Tensor, generator: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    """The reference's initialization: 4096 random vectors as centers, a soft E-step at temperature 1, an M-step.

    ``r [G, N, d]`` -> ``theta [G, 128, P]``. Chunked: no ``[N, 4096]`` matrix is held.
    """
    groups, n, d = r.shape
    idx = torch.randint(0, n, (N_CENTERS,), generator=generator, device="cpu").to(r.device)
    counts = torch.zeros(groups, N_CENTERS, device=r.device)
    sums = torch.zeros(groups, N_CENTERS, d, device=r.device)
    for g in range(groups):
        centers = r[g, idx]
        for s in range(0, n, chunk):
            p = torch.softmax(-torch.cdist(r[g, s : s + chunk], centers), dim=1)
            counts[g] += p.sum(0)
            sums[g] += p.T @ r[g, s : s + chunk]
    return theta_from_stats(counts, _tts_full(sums))


def weighted_sums(p: torch.Tensor, r: torch.Tensor, max_chunks: int = 64, min_chunk: int = 16384) -> torch.Tensor:
    """``p^T r`` for ``p [G, N, K]``, ``r [G, N, d]`` -> ``[G, K, d]`` (float32), split over ``N`` when ``N`` is long.

    The output is tiny and the reduction long (N ~ 1M): one batched GEMM per head leaves most of the GPU idle (30 ms
    per call on an H100 at 8 x 1M x 64 x 128), so ``N`` is cut into up to ``max_chunks`` equal chunks of at least
    ``min_chunk`` tokens, multiplied as one larger batch and summed (float32 throughout; only the summation order
    changes). Shorter inputs take the plain product.
    """
    g, n, k = p.shape
    chunks = min(max_chunks, n // max(1, min_chunk))
    while chunks > 1 and n % chunks:
        chunks -= 1
    if chunks <= 1:
        return p.transpose(1, 2) @ r
    d = r.shape[-1]
    part = torch.bmm(p.reshape(g * chunks, n // chunks, k).transpose(1, 2), r.reshape(g * chunks, n // chunks, d))
    return part.view(g, chunks, k, d).sum(1)


def fit_step_em(
    r: torch.Tensor,
    norm: torch.Tensor,
    t_scale: float,
    cfg: EMConfig,
    generator: torch.Generator,
    use_triton: bool | None = None,
    on_iteration: Callable[[int], None] | None = None,
    estep_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One residual step of EM for ``G`` heads at once.

    Returns ``(theta [G, 128, P], best_mse [G], iterations [G])``; each head keeps its best iterate and stops by the
    reference's rule (an iterate no better than the best but within ``tol`` of it) on its own. ``estep_options``
    are passed to :func:`~pressroom.kernels.commvq_codebook.em_estep` (design and launch settings).
    """
    groups = r.shape[0]
    w2 = norm.float().pow(2)
    theta = initial_theta(r, generator)
    best = torch.full((groups,), math.inf, device=r.device)
    best_theta = theta.clone()
    active = torch.ones(groups, dtype=torch.bool, device=r.device)
    iters = torch.zeros(groups, dtype=torch.long)
    for step in range(cfg.n_steps):
        temp = temperature_at(step, cfg, t_scale)
        codes, counts, pa, pb = em_estep(r, theta, temp, use_triton=use_triton, **(estep_options or {}))
        mse = _weighted_mse(r - _gather_centers(centers_from_theta(theta), codes), w2)
        improved = active & (mse < best)
        stop = active & ~improved & ((mse - best) < cfg.tol)
        best = torch.where(improved, mse, best)
        best_theta[improved] = theta[improved]
        iters[active.cpu()] += 1
        active &= ~stop
        if on_iteration is not None:
            on_iteration(step)
        if not bool(active.any()):
            break
        tts = stats_TtS(weighted_sums(pa, r), weighted_sums(pb, r))
        theta = torch.where(active.view(-1, 1, 1), theta_from_stats(counts, tts), theta)
    return best_theta, best, iters


def fit_keys_em(
    r: torch.Tensor,
    norm: torch.Tensor,
    residuals: int,
    cfg: EMConfig | None = None,
    use_triton: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual EM for the heads of one layer: ``r [H, N, d]``, ``norm [N]`` -> ``(thetas [H, R, 128, P],
    mse [H, R])`` where ``mse[:, i]`` is the error after step ``i`` (the reference's ``mse_loss``)."""
    cfg = cfg or EMConfig()
    generator = torch.Generator().manual_seed(cfg.seed)
    res = r.float().clone()
    w2 = norm.float().pow(2)
    thetas, mses = [], []
    t_scale = 1.0
    for i in range(residuals):
        theta, _, iters = fit_step_em(res, norm, t_scale, cfg, generator, use_triton)
        if i % cfg.scale_every == 0:
            t_scale /= 10.0
        codes = nearest_centers(res, theta, use_triton=use_triton)
        res -= _gather_centers(centers_from_theta(theta), codes)
        thetas.append(theta)
        mses.append(_weighted_mse(res, w2))
        if progress is not None:
            progress(f"residual {i + 1}/{residuals}: mse {mses[-1].mean().item():.3e}, EM iterations {iters.tolist()}")
    return torch.stack(thetas, 1).cpu(), torch.stack(mses, 1).cpu()


# ------------------------------------------------------------------------------ the reference's iteration (baseline)
def reference_em_step(
    r: torch.Tensor, norm: torch.Tensor, centers: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One iteration of the reference's EM, written as it does it: ``cdist`` to all 4096 centers, the full
    ``[N, 4096]`` softmax, hard arg-min MSE, then ``M_step`` (weighted means, ``inv(T^T N T) T^T N``).

    ``r [N, d]`` (one head), ``norm [N, 1]``, ``centers [4096, d]`` -> ``(new_centers, new_theta, hard_mse)``.
    """
    t = commutative_T(r.device, r.dtype)
    dist = torch.cdist(r, centers)
    soft = F.softmax(-dist / temperature, dim=1)
    hard = torch.argmin(dist, dim=1)
    mse = torch.mean((r * norm - centers[hard] * norm) ** 2)
    del dist
    n_t = torch.sum(soft, dim=0).unsqueeze(-1).repeat(1, 2) + 1e-8
    m = torch.matmul(soft.T, r) / n_t[:, :1]
    del soft
    n_t = n_t.flatten().unsqueeze(0)
    mat = (t.T * n_t) @ t
    a_mat = (torch.linalg.inv(mat) @ t.T) * n_t
    b_mat = m.view(N_CENTERS, r.shape[1] // 2, 2).permute(0, 2, 1).flatten(0, 1)
    theta = a_mat @ b_mat
    new_centers = (t @ theta).view(N_CENTERS, 2, r.shape[1] // 2).permute(0, 2, 1).flatten(1)
    return new_centers, theta, mse


def reference_fit_step(
    r: torch.Tensor, norm: torch.Tensor, t_scale: float, cfg: EMConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reference's ``run_em_algorithm`` for one head (``r [N, d]``, ``norm [N]``): ``(theta, best_mse, iters)``."""
    norm = norm.float().view(-1, 1)
    idx = torch.randint(0, r.shape[0], (N_CENTERS,), generator=generator, device="cpu").to(r.device)
    centers = r[idx]
    centers, theta, _ = reference_em_step(r, norm, centers, 1.0)
    best, best_theta, iters = math.inf, theta, 0
    for step in range(cfg.n_steps):
        new_centers, new_theta, mse = reference_em_step(r, norm, centers, temperature_at(step, cfg, t_scale))
        iters += 1
        if mse < best:
            best, best_theta = mse.item(), theta
        elif (mse - best) < cfg.tol:
            break
        centers, theta = new_centers, new_theta
    return best_theta, torch.tensor(best), iters


# ---------------------------------------------------------------------------------------------------------- E2E
@dataclass
class E2EConfig:
    """End-to-end key codebook training (an alternative to EM)."""

    steps: int = 2000
    batch: int = 2048
    lr: float = 1e-2  # SmolLM2 layer 0 (CPU, 40 steps): 2e-2 took the loss from 1.28 to 0.27
    tau_start: float = 1.0
    tau_end: float = 0.05
    commitment: float = 0.25
    grad_clip: float = 1.0
    seed: int = 0


def greedy_init(r: torch.Tensor, residuals: int, generator: torch.Generator, use_triton: bool | None = None):
    """Initial thetas ``[G, R, 128, P]``: the reference's initialization (one M-step) residual by residual."""
    res = r.float().clone()
    thetas = []
    for _ in range(residuals):
        theta = initial_theta(res, generator)
        res -= _gather_centers(centers_from_theta(theta), nearest_centers(res, theta, use_triton=use_triton))
        thetas.append(theta)
    return torch.stack(thetas, 1)


def e2e_loss(
    x: torch.Tensor, w2: torch.Tensor, thetas: torch.Tensor, tau: float, commitment: float, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of the end-to-end objective on a batch ``x [G, B, d]`` (weights ``w2 [B]`` = squared token norms).

    Per residual step ``i``: logits ``-||res_i - c||^2 / (tau * e_i)`` (``e_i`` = the step's mean residual energy,
    detached, so ``tau`` means the same at every step), a hard Gumbel-softmax choice with the straight-through
    gradient, ``q_i = choice @ centers_i(theta_i)`` (``theta`` enters through ``T``), ``res_{i+1} = res_i - q_i``.
    ``recon = mean(w2 * ||x - sum_i q_i||^2) / d``, ``commit = sum_i mean(w2 * ||res_i - sg(q_i)||^2) / d`` (pulls
    each step's input toward its chosen center), loss = ``recon + commitment * commit``.
    Returns ``(loss, recon, commit)``.
    """
    d = x.shape[-1]
    centers = centers_from_theta(thetas)  # [G, R, 4096, d]
    res = x
    commit = x.new_zeros(())
    w = w2.view(1, -1)
    for i in range(thetas.shape[1]):
        c = centers[:, i]
        d2 = res.pow(2).sum(-1, keepdim=True) - 2 * res @ c.transpose(1, 2) + c.pow(2).sum(-1).unsqueeze(1)
        energy = res.detach().pow(2).sum(-1).mean().clamp_min(1e-12)
        choice = F.gumbel_softmax(-d2 / (tau * energy), tau=1.0, hard=hard, dim=-1)
        q = choice @ c
        commit = commit + ((res - q.detach()).pow(2).sum(-1) * w).mean() / d
        res = res - q
    recon = (res.pow(2).sum(-1) * w).mean() / d
    return recon + commitment * commit, recon, commit


def fit_keys_e2e(
    r: torch.Tensor,
    norm: torch.Tensor,
    residuals: int,
    cfg: E2EConfig | None = None,
    use_triton: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """End-to-end training of all ``R`` thetas of every head of a layer jointly.

    Returns ``(thetas [H, R, 128, P], mse [H, R] after each greedy residual step on the training keys, loss
    history)``. Adam, cosine learning-rate schedule, gradient norm clipped at ``grad_clip``, Gumbel temperature
    decayed exponentially from ``tau_start`` to ``tau_end``.
    """
    cfg = cfg or E2EConfig()
    generator = torch.Generator().manual_seed(cfg.seed)
    r = r.float()
    thetas = torch.nn.Parameter(greedy_init(r, residuals, generator, use_triton))
    opt = torch.optim.Adam([thetas], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    w2 = norm.float().pow(2)
    n = r.shape[1]
    history = []
    torch.manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=generator).to(r.device)
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
        loss, recon, _ = e2e_loss(r[:, idx], w2[idx], thetas, tau, cfg.commitment)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([thetas], cfg.grad_clip)
        opt.step()
        sched.step()
        history.append(loss.item())
        if progress is not None and (step + 1) % max(1, cfg.steps // 10) == 0:
            progress(f"step {step + 1}/{cfg.steps}: loss {loss.item():.3e} recon {recon.item():.3e}")
    thetas = thetas.detach()
    res = r.clone()
    mses = []
    for i in range(residuals):
        codes = nearest_centers(res, thetas[:, i], use_triton=use_triton)
        res -= _gather_centers(centers_from_theta(thetas[:, i]), codes)
        mses.append(_weighted_mse(res, w2))
    return thetas.cpu(), torch.stack(mses, 1).cpu(), history
