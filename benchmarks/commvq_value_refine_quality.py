"""Value coding error of trained CommVQ codecs: the encoder alone, refinement, least-squares codebook rounds.

For every layer of a native codebook directory (``--codebooks``, e.g. ``2bit/em`` from ``pressroom-train commvq``)
and the KV collected by ``pressroom-train commvq collect`` (``--kv``, holding ``train/`` and ``heldout/``), the
held-out relative MSE ``sum ||v - v_hat||^2 / sum ||v||^2`` of the values:

- ``encoder``: the encoder's bits decoded as the reference does (``value_refine=0``);
- ``refined``: those bits after ``--steps`` greedy flips with the least-squares coefficient (``value_refine``);
- ``refined_by_steps``: the refined error for each of ``--sweep-steps`` (0: the least-squares coefficient alone);
- the same two after ``--rounds`` least-squares codebook rounds on ``--train-tokens`` training values
  (:func:`pressroom.training.commvq.polish_value_codebook`, what ``--value-ls-rounds`` does in training).

Runs on the CPU (PyTorch paths); JSON after every layer (``--output``).

    python benchmarks/commvq_value_refine_quality.py --codebooks 2bit/em --kv work/kv --output out.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.presses.commvq_codebooks import CommVQCodebooks
from pressroom.training.commvq import load_layer, polish_value_codebook


def errors(codec, v: torch.Tensor, steps: int) -> tuple[float, float]:
    with torch.no_grad():
        bits, pre = codec.encode(v)
        enc = float(((codec.decode(bits, pre) - v) ** 2).sum() / (v**2).sum())
        bits, coef = codec.refine(v, bits, steps)
        ref = float(((coef * (bits.float() @ codec.channel_embedding()) - v) ** 2).sum() / (v**2).sum())
    return enc, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", required=True)
    ap.add_argument("--kv", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep-steps", type=int, nargs="*", default=[0, 4, 16, 64, 256])
    args = ap.parse_args()
    for split in ("train", "heldout"):
        if not (args.kv / split).is_dir():
            raise SystemExit(f"{args.kv / split} is missing: run `pressroom-train commvq collect --split {split}`.")
    books = CommVQCodebooks.load(args.codebooks)
    if books.values is None:
        raise SystemExit(f"{args.codebooks} holds no value codecs.")
    t0 = time.perf_counter()
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": books.model_name,
        "bits": books.bits,
        "steps": args.steps,
        "rounds": args.rounds,
        "train_tokens": args.train_tokens,
        "heldout_tokens": args.heldout_tokens,
        "layers": [],
    }
    for layer in range(books.num_layers):
        train, _ = load_layer(args.kv / "train", layer, ("v",), args.train_tokens)
        held, _ = load_layer(args.kv / "heldout", layer, ("v",), args.heldout_tokens)
        codec = books.values[layer].float().eval()
        row = {"layer": layer}
        row["encoder"], row["refined"] = errors(codec, held["v"].float(), args.steps)
        row["refined_by_steps"] = {str(k): errors(codec, held["v"].float(), k)[1] for k in args.sweep_steps}
        row["ls_train"] = polish_value_codebook(codec, train["v"].float(), args.rounds, args.steps)
        row["encoder_ls"], row["refined_ls"] = errors(codec, held["v"].float(), args.steps)
        result["layers"].append(row)
        for k in ("encoder", "refined", "encoder_ls", "refined_ls"):
            result[f"mean_{k}"] = sum(r[k] for r in result["layers"]) / len(result["layers"])
        result["mean_refined_by_steps"] = {
            k: sum(r["refined_by_steps"][k] for r in result["layers"]) / len(result["layers"])
            for k in row["refined_by_steps"]
        }
        result["elapsed_s"] = time.perf_counter() - t0
        atomic_write_json(args.output, result)
        print(layer, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}, flush=True)


if __name__ == "__main__":
    main()
