"""How many of the 64 ``A`` could a bound prune from the split search? (CPU, SmolLM2's real keys; no timing.)

The split search (:mod:`pressroom.kernels.commvq_encode`) takes, for every row and each of the 64 ``A``, the
minimum over 64 ``B`` of ``K[A, B] + g_B``: 4,096 adds and mins per row and step, most of the key encode's time.
A lower bound on that minimum that is cheap to form would let a search skip every ``A`` whose bound
``f_A + LB_A`` already exceeds the best distance. This measures, on SmolLM2's held-out pre-RoPE keys and trained
codebooks, the ``A`` that survive such a bound against the exact best (an oracle threshold: a real search would
start from a guess and could only keep more), for ``LB_A = min over groups G of (min_{B in G} K[A, B] + min_{B in G}
g_B)`` with ``--groups`` contiguous groups of ``B`` (1 group: ``min_B K[A, B] + min_B g_B``; forming the bound costs
``64 x groups`` operations per row against 4,096 for the full minimum). Every residual step of every head is
counted, coding with the exact search as it goes. A program that codes ``--blocks`` consecutive tokens together
must evaluate every ``A`` that one of them keeps: the union per block is reported too.

    python benchmarks/commvq_encode_prune_cpu.py --codebooks CB/2bit/em --bits 2 --layers 2 15 28 \\
        --output benchmarks/results/commvq_encode_prune_cpu.json
    python benchmarks/commvq_encode_prune_cpu.py --random --bits 1 \\
        --output benchmarks/results/commvq_encode_prune_random_cpu.json

``--random``: the GPU benchmarks' random codebooks and keys (8 KV heads, head_dim 128; ``--heldout-tokens`` keys).
Every bound also reports ``practical_*``: the survivors against the exact distance of the ``A`` whose bound is
smallest, a threshold a real search can form.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from commvq_key_data_cpu import layer_keys

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.evaluation.corpora import corpus_tokens
from pressroom.evaluation.models import load_model
from pressroom.kernels.commvq_encode import KeyTables
from pressroom.presses.commvq_codebooks import CommVQCodebooks, model_kv_shape
from pressroom.training.commvq_em import prepare_keys


def survivors(
    r: torch.Tensor, tables: KeyTables, groups: list[int], blocks: list[int], b_sizes: tuple[int, ...] = ()
) -> tuple[dict[int, torch.Tensor], dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor], dict]:
    """Per bound (``groups``): the count of surviving ``A`` for every (head, row, step), and per (bound, block of
    rows) the count of ``A`` that some row of a block of consecutive tokens keeps (what a program coding the block
    together must evaluate); ``r [H, N, D]``. Third, per bound, the survivors against a threshold a search can form
    without the oracle: the exact distance of the ``A`` with the smallest bound (every ``A`` whose bound is at most
    that distance is kept, so the exact best always is). Fourth, the bound on the other side, per group of ``B``
    (``b_sizes`` consecutive ``B`` a group): ``min_{B in G} (g_B + min_A K[A, B]) + min_A f_A``, a lower bound on
    every candidate of the group, so a candidate loop could skip a (row, group) whose bound exceeds a distance it
    knows; the share of (row, group) pairs kept against the exact best (``oracle``) and against the exact distance
    of ``A0 = argmin f_A`` (``practical``: one row of ``K`` and a min over 64 per row to form)."""
    un, wn, k, _ = tables.split_tables()
    out: dict[int, list[torch.Tensor]] = {g: [] for g in groups}
    practical: dict[int, list[torch.Tensor]] = {g: [] for g in groups}
    union: dict[tuple[int, int], list[torch.Tensor]] = {(g, b): [] for g in groups for b in blocks}
    b_kept: dict[tuple[int, str], list[torch.Tensor]] = {
        (size, t): [] for size in b_sizes for t in ("oracle", "practical")
    }
    for h in range(r.shape[0]):
        res = r[h].clone()
        for step in range(tables.residuals):
            u, w, kk = tables.u[h, step], tables.w[h, step], k[h, step]  # kk [A, B]
            g = wn[h, step] - 2.0 * res @ w.T  # [N, B]
            f = un[h, step] - 2.0 * res @ u.T  # [N, A]
            tot = f + (kk[None] + g[:, None, :]).amin(-1)
            best = tot.min(-1, keepdim=True).values
            for n_groups in groups:
                kmin = kk.unflatten(1, (n_groups, -1)).amin(-1)  # [A, G]
                gmin = g.unflatten(1, (n_groups, -1)).amin(-1)  # [N, G]
                bound = f + (kmin[None] + gmin[:, None, :]).amin(-1)  # [N, A]
                keep = bound <= best
                out[n_groups].append(keep.sum(-1))
                guess = tot.gather(1, bound.argmin(-1, keepdim=True))  # the smallest bound's exact distance
                practical[n_groups].append((bound <= guess).sum(-1))
                for blk in blocks:
                    n = keep.shape[0] // blk * blk
                    union[(n_groups, blk)].append(keep[:n].unflatten(0, (-1, blk)).any(1).sum(-1))
            if b_sizes:
                a0 = f.argmin(-1, keepdim=True)
                known = (kk[a0[:, 0]] + g).amin(-1, keepdim=True) + f.gather(1, a0)  # a distance a search can form
                b_bound = g + kk.amin(0)[None] + f.amin(-1, keepdim=True)  # [N, B]
                for size in b_sizes:
                    grouped = b_bound.unflatten(1, (-1, size)).amin(-1)  # [N, 64 / size]
                    b_kept[(size, "oracle")].append((grouped <= best).float().mean(-1))
                    b_kept[(size, "practical")].append((grouped <= known).float().mean(-1))
            a = tot.argmin(-1)
            b = (kk[a] + g).argmin(-1)
            res = res - (u[a] + w[b])
    return (
        {n: torch.cat(v).float() for n, v in out.items()},
        {key: torch.cat(v).float() for key, v in union.items()},
        {n: torch.cat(v).float() for n, v in practical.items()},
        {key: torch.cat(v) for key, v in b_kept.items()},
    )


def random_problem(bits: int, tokens: int) -> tuple[torch.Tensor, KeyTables]:
    """The GPU encode benchmarks' problem (``commvq_encode_dpx.py``): random float16-exact codebooks for 8 KV heads
    of head_dim 128 and random keys normalized over the token's heads, as ``r [H, N, D]`` and its tables."""
    from commvq_encode_dpx import RESIDUALS, D, H

    g = torch.Generator().manual_seed(bits)
    theta = (torch.randn(H, RESIDUALS[bits], 128, D // 2, generator=g) * 0.1).half().float()
    raw = torch.randn(tokens, H, D, generator=g)
    x = torch.nn.functional.normalize(raw.flatten(1), dim=-1).view(tokens, H, D)
    return x.transpose(0, 1).contiguous(), KeyTables(theta)


def header(setting: dict) -> dict:
    """The JSON's fields before the layers: benchmark, command, device, versions and ``setting``."""
    return {
        "benchmark": "commvq_encode_prune_cpu",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "setting": setting,
        "layers": {},
    }


def summary(counts, unions, practical, blocks: list[int], b_kept: dict | None = None) -> dict:
    """Per bound: the survivors' mean and percentiles, the block unions' means and the practical threshold's; per
    size of the ``B`` groups (``b_group_<size>``), the mean share of (row, group) pairs kept and its 90th percentile
    over rows."""
    b_side = {}
    for (size, threshold), kept in (b_kept or {}).items():
        row = b_side.setdefault(f"b_group_{size}", {"bound_ops_per_row": 64 + 64 // size})
        row[f"{threshold}_kept_share"] = float(kept.mean())
        row[f"{threshold}_kept_share_p90"] = float(kept.quantile(0.9))
    return b_side | {
        f"groups_{n}": {
            "mean": float(c.mean()),
            "p50": float(c.quantile(0.5)),
            "p90": float(c.quantile(0.9)),
            "p99": float(c.quantile(0.99)),
            "max": float(c.max()),
            "bound_ops_per_row": 64 * n,
            **{f"block_{b}_union_mean": float(unions[(n, b)].mean()) for b in blocks},
            "practical_mean": float(practical[n].mean()),
            "practical_p90": float(practical[n].quantile(0.9)),
        }
        for n, c in counts.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", help="trained codebooks (pressroom-train commvq); or --random")
    ap.add_argument("--random", action="store_true", help="the GPU benchmarks' random codebooks and keys instead")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 64], help="rows coded together")
    ap.add_argument(
        "--b-group-sizes", type=int, nargs="*", default=[1, 4, 16], help="consecutive B a group of the B-side bound"
    )
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if any(g < 1 or 64 % g for g in args.groups):
        raise SystemExit(f"--groups must divide 64, got {args.groups}")
    if any(g < 1 or 64 % g for g in args.b_group_sizes):
        raise SystemExit(f"--b-group-sizes must divide 64, got {args.b_group_sizes}")
    b_sizes = tuple(args.b_group_sizes)
    if args.random == bool(args.codebooks):
        raise SystemExit("pass either --codebooks DIR or --random")
    if args.random:
        r, tables = random_problem(args.bits, args.heldout_tokens)
        setting = {"random": True, "bits": args.bits, "tokens": args.heldout_tokens, "residuals": tables.residuals}
        result = header(setting)
        counts, unions, practical, b_kept = survivors(r, tables, args.groups, args.blocks, b_sizes)
        result["layers"]["random"] = summary(counts, unions, practical, args.blocks, b_kept)
        atomic_write_json(args.output, result)
        print(result["layers"]["random"], flush=True)
        return 0
    books = CommVQCodebooks.load(args.codebooks, bits=args.bits)
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    books.validate(model.config)
    n_layers, kv_heads, _ = model_kv_shape(model.config)
    if any(not 0 <= i < n_layers for i in args.layers):
        raise SystemExit(f"--layers must be in [0, {n_layers})")
    ids = corpus_tokens(tok, "pg_essays", split="heldout")[: args.heldout_tokens]
    result = header(
        {
            "model": args.model,
            "bits": args.bits,
            "heldout_tokens": int(ids.numel()),
            "codebooks": str(args.codebooks),
            "residuals": books.R,
        }
    )
    for layer in args.layers:
        r, _ = prepare_keys(layer_keys(model, ids, layer, 2048), kv_heads)
        if books.layer_pair_weights(layer) is not None:
            raise SystemExit("weighted codebooks: this measures the plain search only")
        counts, unions, practical, b_kept = survivors(
            r, KeyTables(books.key_theta[layer].float()), args.groups, args.blocks, b_sizes
        )
        result["layers"][str(layer)] = summary(counts, unions, practical, args.blocks, b_kept)
        atomic_write_json(args.output, result)
        print(layer, result["layers"][str(layer)], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
