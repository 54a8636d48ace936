"""CommVQ key coding under a query-weighted distance: its effect on attention over held-out text (CPU).

For every layer of the embedded model, the held-out essays' pre-RoPE queries, keys and values (collected here, with
queries, into ``--workdir``; resumed when present) are split into sequences of ``--seq-len`` tokens. In each, every
key except the first ``--n-sink`` (the cache keeps those exact) is coded the way :class:`CommVQCache` codes it
(normalized per token, greedy residual search, decoded times the norm) and the queries of the second half attend
causally over all keys with exact values. Reported per layer and configuration, against attention over the exact
keys: the relative error of the attention output, the mean KL divergence of the attention rows, and the keys'
relative MSE.

Configurations:

- ``--codebooks NAME=DIR`` (repeatable): native codebooks as trained; each is encoded under its own
  ``key_pair_weights`` (none: Euclidean);
- ``--powers P ...`` for the first codebook: re-encoded under query-energy weights ``energy ** P``
  (:func:`pressroom.training.commvq_em.query_pair_weights`, from ``--train-tokens`` collected training queries),
  the codebook unchanged (``0``: Euclidean).

    python benchmarks/commvq_key_weights.py --codebooks plain=PLAIN_DIR --codebooks weighted=WEIGHTED_DIR \\
        --powers 0.25 0.5 1 --workdir WORK --output benchmarks/results/commvq_key_weights_cpu.json
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_codebook import from_interleaved, residual_decode, residual_encode, search_operands
from pressroom.kernels.commvq_encode import normalize_keys
from pressroom.presses.commvq_codebooks import CommVQCodebooks
from pressroom.training.commvq import _rope, collect, load_layer
from pressroom.training.commvq_em import query_pair_weights


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the queries ``first..T`` (RoPE applied) over all keys: probs ``[Hq, Q, T]``, out."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    kk = k.repeat_interleave(group, 1).transpose(0, 1)
    vv = v.repeat_interleave(group, 1).transpose(0, 1)
    scores = q[first:].transpose(0, 1) @ kk.transpose(1, 2) / math.sqrt(d)
    mask = torch.arange(t)[None, :] <= torch.arange(first, t)[:, None]
    probs = scores.masked_fill(~mask, -math.inf).softmax(-1)
    return probs, probs @ vv


def coded_keys(k: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Pre-RoPE keys ``[T, H, d]`` through the cache's key coding (reference path) and back."""
    x, norms = normalize_keys(k.transpose(0, 1).unsqueeze(0))  # [1, T, H, d] interleaved
    xs, ts = search_operands(x[0], theta, weights)
    out = torch.stack([residual_decode(residual_encode(xs[:, h], ts[h])[0], theta[h]) for h in range(k.shape[1])], 1)
    return from_interleaved(out * norms[0, :, None, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--powers", type=float, nargs="*", default=[], help="re-encode the first codebook under these")
    ap.add_argument("--workdir", default="work/commvq_key_weights", help="collected KV (resumed)")
    ap.add_argument("--train-tokens", type=int, default=16384, help="training queries for --powers")
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    books = {}
    for spec in args.codebooks:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--codebooks takes NAME=DIR, got {spec!r}")
        books[name] = CommVQCodebooks.load(path)
    first = next(iter(books.values()))
    if any(b.key_theta.shape != first.key_theta.shape for b in books.values()):
        raise SystemExit("the --codebooks must all have the same shape (layers, heads, residuals, head_dim)")

    from pressroom.evaluation.models import load_model

    work = Path(args.workdir)
    splits = {"train": args.train_tokens, "heldout": args.heldout_tokens}
    need = [s for s in splits if not (work / "kv" / s / "meta.json").exists()]
    if need:
        model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
        for split in need:
            collect(model, tok, work, "pg_essays", split, splits[split], args.seq_len, True, args.model)
        first.validate(model.config)
        del model
    from safetensors.torch import load_file

    inv_freq = load_file(str(work / "kv" / "heldout" / "rope.safetensors"))["inv_freq"]
    layers = range(first.num_layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    heads, head_dim = first.num_kv_heads, first.head_dim
    result = {
        "benchmark": "commvq_key_weights",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "codebooks": {n: s.partition("=")[2] for n, s in zip(books, args.codebooks)},
        "heldout_tokens": args.heldout_tokens,
        "seq_len": args.seq_len,
        "n_sink": args.n_sink,
        "queries_from": "second half of each sequence",
        "layers": {},
    }
    t0 = time.time()
    for layer in tqdm(layers, desc="layers"):
        configs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {
            n: (b.key_theta[layer], b.layer_pair_weights(layer)) for n, b in books.items()
        }
        if args.powers:
            q_train, _ = load_layer(work / "kv" / "train", layer, ("q",))
            name0 = next(iter(books))
            for p in args.powers:
                w = None if p == 0 else query_pair_weights(q_train["q"], heads, head_dim, p)
                configs[f"{name0}@power{p:g}"] = (first.key_theta[layer], w)
        data, lengths = load_layer(work / "kv" / "heldout", layer, ("q", "k", "v"))
        rows: dict[str, dict[str, list[float]]] = {n: {"out": [], "kl": [], "kmse": []} for n in configs}
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            start += n
            q = data["q"][sl].float().view(n, -1, head_dim)
            k = data["k"][sl].float().view(n, heads, head_dim)
            v = data["v"][sl].float().view(n, heads, head_dim)
            pos = torch.arange(n)
            qr = _rope(q, pos, inv_freq, 1.0)
            p0, o0 = attention(qr, _rope(k, pos, inv_freq, 1.0), v, n // 2)
            for name, (theta, w) in configs.items():
                kh = coded_keys(k, theta, w)
                kh[: args.n_sink] = k[: args.n_sink]
                p1, o1 = attention(qr, _rope(kh, pos, inv_freq, 1.0), v, n // 2)
                kl = (p0 * (p0.clamp_min(1e-30).log() - p1.clamp_min(1e-30).log())).sum(-1).mean()
                rows[name]["out"].append(float(((o1 - o0) ** 2).sum() / (o0**2).sum()))
                rows[name]["kl"].append(float(kl))
                rows[name]["kmse"].append(float(((kh - k)[args.n_sink :] ** 2).sum() / (k[args.n_sink :] ** 2).sum()))
        result["layers"][str(layer)] = {n: {m: sum(x) / len(x) for m, x in r.items()} for n, r in rows.items()}
        names = next(iter(result["layers"].values())).keys()
        result["mean"] = {
            n: {
                m: sum(result["layers"][ly][n][m] for ly in result["layers"]) / len(result["layers"])
                for m in ("out", "kl", "kmse")
            }
            for n in names
        }
        result["metrics"] = {
            "out": "relative error of the attention output, sum |o - o_exact|^2 / sum |o_exact|^2",
            "kl": "mean KL(exact || coded) of the attention rows",
            "kmse": "relative MSE of the coded keys",
        }
        result["layers_done"] = len(result["layers"])
        result["elapsed_s"] = time.time() - t0
        atomic_write_json(Path(args.output), result)
    for name, m in result["mean"].items():
        print(f"{name:28s} out {m['out']:.4f}  kl {m['kl']:.4f}  key mse {m['kmse']:.4f}")


if __name__ == "__main__":
    main()
