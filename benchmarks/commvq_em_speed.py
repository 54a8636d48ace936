"""GPU benchmark: CommVQ key-codebook EM, ours vs the reference's cdist iteration, at Llama-3.1-8B key shapes.

Keys of one layer of Llama-3.1-8B's shape (8 KV heads x head_dim 128, R=21 residuals for 2 bits), 1M tokens (the
reference trains on ``256 * 4096`` tokens), random data with per-channel scales (so the EM has structure to find),
prepared as CommVQ does (interleaved RoPE pairs, divided by the token's norm over all heads). In one run:

1. ``iteration``: milliseconds per EM iteration (soft E-step + hard MSE + M-step), the median of ``--iters``
   iterations after warm-up: ours (fused Triton E-step over the additive structure, all 8 heads in one launch,
   M-step from marginal statistics) vs a faithful PyTorch re-implementation of the reference's iteration
   (``torch.cdist`` to all 4096 centers, full ``[N, 4096]`` softmax, ``inv``), which runs one head at a time as
   the reference does; both per head and per layer (x 8 heads for the reference).
2. ``mse``: the first ``--mse-residuals`` residual steps of head 0, complete EM (up to 100 iterations, the
   reference's early stop), from the same initialization, ours vs the reference: best MSE per step and time.
0. ``estep`` (first, when asked): the E-step kernel alone on the same data at the first iteration's temperature,
   each design and launch of ``--estep-grid``; outputs checked against the PyTorch reference E-step on the first
   ``--check-rows`` rows of every head (codes agree up to near-ties, ``pa``/``pb`` within ``1e-4``). The fastest
   configuration that passes is then used by the other phases (recorded as ``estep_options``).
3. ``full_layer`` (ours only): all 21 residuals of all 8 heads, the complete per-layer job, wall time.

Each phase writes the JSON (atomic) so a time-out keeps what finished.

    python benchmarks/commvq_em_speed.py --output $OUT/commvq_em_speed.json
    TRITON_INTERPRET=1 python benchmarks/commvq_em_speed.py --smoke --output /tmp/commvq_em_speed_smoke.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_keys(n: int, heads: int, head_dim: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from pressroom.training.commvq_em import prepare_keys

    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.logspace(-1, 0.7, heads * head_dim, device=device)[torch.randperm(heads * head_dim, device=device)]
    keys = torch.randn(n, heads * head_dim, device=device, generator=gen) * scale
    keys += 2.0 * torch.randn(1, heads * head_dim, device=device, generator=gen)  # an offset, as real keys have
    return prepare_keys(keys, heads)


def time_ours(
    r, norm, iters: int, device: str, use_triton: bool | None, estep_options: dict | None = None
) -> list[float]:
    """Milliseconds of each of our EM iterations (all heads at once), through ``fit_step_em``'s own loop."""
    from pressroom.training.commvq_em import EMConfig, fit_step_em

    stamps: list[float] = []

    def on_iteration(_step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    cfg = EMConfig(n_steps=iters + 2, tol=-math.inf)  # no early stop: time exactly iters + 2 iterations
    fit_step_em(r, norm, 1.0, cfg, torch.Generator().manual_seed(0), use_triton, on_iteration, estep_options)
    deltas = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    return deltas[1:]  # the first one includes compilation / warm-up


def time_reference(r1, norm, iters: int, device: str) -> list[float]:
    """Milliseconds of each reference iteration on one head ``r1 [N, d]``."""
    from pressroom.kernels.commvq_codebook import N_CENTERS
    from pressroom.training.commvq_em import reference_em_step

    idx = torch.randint(0, r1.shape[0], (N_CENTERS,), generator=torch.Generator().manual_seed(0)).to(r1.device)
    centers = r1[idx]
    nrm = norm.view(-1, 1)
    times = []
    for i in range(iters + 1):
        sync(device)
        t0 = time.perf_counter()
        centers, _, mse = reference_em_step(r1, nrm, centers, 1e-3 * 0.97**i)
        float(mse)  # the reference reads the loss every iteration (its early stop)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times[1:]


def estep_sweep(r, args, device: str, use_triton: bool | None, result: dict, save) -> dict | None:
    """Time ``em_estep`` alone per entry of ``--estep-grid``; return the fastest passing entry's options.

    Rows are independent in the E-step, so the first ``--check-rows`` rows of each head's output are compared with
    :func:`em_estep_reference` run on those rows alone.
    """
    from pressroom.kernels.commvq_codebook import em_estep, em_estep_reference
    from pressroom.training.commvq_em import EMConfig, initial_theta, temperature_at

    theta = initial_theta(r, torch.Generator().manual_seed(0))
    temp = temperature_at(0, EMConfig(), 1.0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    check = min(args.check_rows, r.shape[1])
    ref_codes, _, ref_pa, ref_pb = em_estep_reference(r[:, :check], theta, temp)
    rows = []
    for entry in args.estep_grid.split(","):
        design, block_n, warps, per_sm = entry.split(":")
        opts = {"design": design, "block_n": int(block_n), "num_warps": int(warps)}
        opts["programs"] = -(-int(per_sm) * sms // r.shape[0])
        row: dict = {"entry": entry, **opts}
        try:
            out = em_estep(r, theta, temp, use_triton, **opts)  # compile + warm-up
            times = []
            for _ in range(args.iters):
                sync(device)
                t0 = time.perf_counter()
                em_estep(r, theta, temp, use_triton, **opts)
                sync(device)
                times.append(1e3 * (time.perf_counter() - t0))
            row["ms"] = statistics.median(times)
            row["check_rows_per_head"] = check
            row["codes_equal_to_reference"] = float((out[0][:, :check] == ref_codes).float().mean())
            row["max_abs_diff_to_reference"] = {
                "pa": float((out[2][:, :check] - ref_pa).abs().max()),
                "pb": float((out[3][:, :check] - ref_pb).abs().max()),
            }
            worst = max(row["max_abs_diff_to_reference"].values())
            row["passes"] = row["codes_equal_to_reference"] > 0.99 and worst < 1e-4
        except Exception as exc:  # noqa: BLE001 - a launch that fails is a result, recorded
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(row, flush=True)
        rows.append(row)
        result["estep"] = {"temperature": temp, "rows": rows}
        save()
    timed = [row for row in rows if row.get("passes")]
    if not timed:
        return None
    best = min(timed, key=lambda row: row["ms"])
    result["estep_options"] = {k: best[k] for k in ("design", "block_n", "num_warps", "programs")}
    save()
    return result["estep_options"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--residuals", type=int, default=21)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (phase 1)")
    p.add_argument("--mse-residuals", type=int, default=2, help="residual steps compared in phase 2 (head 0)")
    p.add_argument("--em-steps", type=int, default=100, help="EM iterations per residual (reference: 100)")
    p.add_argument("--phases", default="iteration,mse,full_layer", help="of estep,iteration,mse,full_layer")
    p.add_argument(
        "--estep-grid",
        default="two_pass:32:4:4,three_pass:32:4:4,three_pass:16:2:8,three_pass:16:2:4,three_pass:16:2:16,"
        "three_pass:32:2:8,three_pass:16:1:8,three_pass:8:1:16",
        help="design:block_n:num_warps:programs-per-SM entries timed by the estep phase",
    )
    p.add_argument("--check-rows", type=int, default=1 << 16, help="rows per head checked against the reference")
    p.add_argument("--output", required=True)
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the script"
    )
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    use_triton = None  # CUDA: the Triton kernels
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
        use_triton = True
        args.tokens, args.heads, args.head_dim, args.residuals, args.iters, args.em_steps = 64, 2, 16, 2, 1, 2
    elif not torch.cuda.is_available():
        sys.exit("commvq_em_speed.py needs a CUDA GPU (or --smoke on the CPU with TRITON_INTERPRET=1)")
    import transformers
    import triton

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.kernels.commvq_codebook import centers_from_theta, nearest_centers
    from pressroom.training.commvq_em import EMConfig, fit_keys_em, fit_step_em, reference_fit_step

    phases = set(args.phases.split(","))
    result: dict = {
        "benchmark": "commvq_em_speed",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test, Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "shape": {
            "tokens": args.tokens,
            "kv_heads": args.heads,
            "head_dim": args.head_dim,
            "residuals": args.residuals,
        },
        "data": "random keys, per-channel scales log-spaced 0.1..5 plus a per-channel offset, normalized as CommVQ",
    }
    t_start = time.time()
    r, norm = make_keys(args.tokens, args.heads, args.head_dim, device)
    sync(device)

    def save() -> None:
        result["wall_s"] = time.time() - t_start
        atomic_write_json(args.output, result)

    estep_options: dict | None = None
    if "estep" in phases:
        estep_options = estep_sweep(r, args, device, use_triton, result, save)

    if "iteration" in phases:
        ours = time_ours(r, norm, args.iters, device, use_triton, estep_options)
        ref = time_reference(r[0], norm, args.iters, device)
        ours_ms, ref_ms = statistics.median(ours), statistics.median(ref)
        result["iteration"] = {
            "ours_ms_per_iteration_all_heads": ours_ms,
            "ours_ms_per_iteration_per_head": ours_ms / args.heads,
            "reference_ms_per_iteration_per_head": ref_ms,
            "reference_ms_per_iteration_all_heads": ref_ms * args.heads,
            "speedup": ref_ms * args.heads / ours_ms,
            "ours_samples_ms": ours,
            "reference_samples_ms": ref,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        }
        print(f"EM iteration, {args.heads} heads x {args.tokens} tokens: ours {ours_ms:.1f} ms, "
              f"reference {ref_ms * args.heads:.1f} ms ({ref_ms:.1f} per head): {ref_ms * args.heads / ours_ms:.1f}x",
              flush=True)  # fmt: skip
        save()

    if "mse" in phases:
        cfg = EMConfig(n_steps=args.em_steps)
        rows = []
        res_o, res_r = r[:1].clone(), r[0].clone()
        t_scale = 1.0
        gen_o, gen_r = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for i in range(args.mse_residuals):
            sync(device)
            t0 = time.perf_counter()
            theta_o, best_o, it_o = fit_step_em(res_o, norm, t_scale, cfg, gen_o, use_triton, None, estep_options)
            sync(device)
            t1 = time.perf_counter()
            theta_r, best_r, it_r = reference_fit_step(res_r, norm, t_scale, cfg, gen_r)
            sync(device)
            t2 = time.perf_counter()
            if i % cfg.scale_every == 0:
                t_scale /= 10.0
            res_o = res_o - centers_from_theta(theta_o)[0][nearest_centers(res_o[0], theta_o[0], use_triton)].unsqueeze(
                0
            )
            theta_r = theta_r.to(r.device).float()
            res_r = res_r - centers_from_theta(theta_r)[nearest_centers(res_r, theta_r, use_triton)]
            rows.append({
                "residual": i, "ours_best_mse": float(best_o[0]), "reference_best_mse": float(best_r),
                "ours_iterations": int(it_o[0]), "reference_iterations": int(it_r),
                "ours_s": t1 - t0, "reference_s": t2 - t1,
            })  # fmt: skip
            print(rows[-1], flush=True)
            result["mse"] = {"head": 0, "rows": rows, "em_steps": args.em_steps}
            save()

    if "full_layer" in phases:
        sync(device)
        t0 = time.perf_counter()
        thetas, mse = fit_keys_em(r, norm, args.residuals, EMConfig(n_steps=args.em_steps), use_triton, print)
        sync(device)
        initial = float((r.pow(2).sum(-1) * norm.pow(2)).sum(1).mean() / (r.shape[1] * r.shape[2]))
        result["full_layer"] = {
            "ours_s": time.perf_counter() - t0,
            "mse_after_each_residual_mean_over_heads": mse.mean(0).tolist(),
            "mse_before": initial,
            "relative_mse_final": float(mse[:, -1].mean()) / initial,
        }
        print(
            f"full layer ({args.heads} heads, R={args.residuals}): {result['full_layer']['ours_s']:.1f} s", flush=True
        )
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
