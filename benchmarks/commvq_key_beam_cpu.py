"""How much does a beam search lower CommVQ's key error? Every layer of SmolLM2, held-out essay keys (CPU).

CommVQ's key encoder is greedy: each of the ``R`` residual steps keeps the single closest of its 4,096 centers.
``key_beam`` (:func:`pressroom.kernels.commvq_beam.encode_keys_beam`) keeps the ``k`` best code sequences after every
step. This benchmark takes ``--tokens`` held-out essay tokens, and per layer the pre-RoPE keys (SmolLM2 in float32),
normalized as the cache normalizes them; it codes them with each ``--beams`` width and the given codebooks and
reports the relative key MSE (``sum ||k - k_hat||^2 / sum ||k||^2`` over tokens and heads) and the seconds the
search took (CPU, PyTorch). The JSON is rewritten after each layer; a rerun resumes after the layers already there.

    python benchmarks/commvq_key_beam_cpu.py --codebooks DIR/2bit/em \\
        --output benchmarks/results/commvq_key_beam_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from commvq_key_data_cpu import layer_keys  # noqa: E402

from pressroom.evaluation.atomic import atomic_write_json  # noqa: E402
from pressroom.evaluation.corpora import corpus_tokens  # noqa: E402
from pressroom.evaluation.models import load_model  # noqa: E402
from pressroom.kernels.commvq_beam import check_beam, encode_keys_beam  # noqa: E402
from pressroom.kernels.commvq_codebook import residual_decode  # noqa: E402
from pressroom.kernels.commvq_encode import KeyTables, unpack_codes12  # noqa: E402
from pressroom.presses.commvq_codebooks import CommVQCodebooks  # noqa: E402
from pressroom.training.commvq_em import prepare_keys  # noqa: E402


def relative_error(r: torch.Tensor, norm: torch.Tensor, thetas: torch.Tensor, packed: torch.Tensor) -> float:
    """``sum ||k - k_hat||^2 / sum ||k||^2`` of keys ``r [H, N, D] * norm [N]`` coded as ``packed [N, H, bytes]``."""
    codes = unpack_codes12(packed, thetas.shape[1])  # [N, H, R]
    num = den = 0.0
    w2 = norm.double().pow(2)
    for h in range(r.shape[0]):
        err = (r[h] - residual_decode(codes[:, h], thetas[h])).double().pow(2).sum(-1)
        num += float((err * w2).sum())
        den += float((r[h].double().pow(2).sum(-1) * w2).sum())
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", required=True, help="a CommVQ codebook directory (e.g. .../2bit/em)")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out essay tokens")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    for beam in args.beams:
        check_beam(beam)
    torch.manual_seed(0)
    books = CommVQCodebooks.load(args.codebooks, bits=args.bits)
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    books.validate(model.config)
    layers = args.layers if args.layers else list(range(books.num_layers))
    setting = {
        "model": args.model,
        "codebooks": str(args.codebooks),
        "bits": args.bits,
        "residuals": books.residuals,
        "beams": args.beams,
        "tokens": args.tokens,
        "corpus": "pg_essays (heldout split)",
    }
    result = {
        "benchmark": "commvq_key_beam_cpu",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "setting": setting,
        "layers": {},
    }
    if args.output.exists():
        old = json.loads(args.output.read_text())
        if old.get("setting") != setting:
            raise SystemExit(f"{args.output} holds another run's settings: pass another --output.")
        result["layers"] = old.get("layers", {})
    ids = corpus_tokens(tok, "pg_essays", split="heldout", max_tokens=args.tokens)
    for layer in tqdm(layers, desc="layers"):
        if str(layer) in result["layers"]:
            continue
        r, norm = prepare_keys(layer_keys(model, ids, layer, args.seq_len), books.num_kv_heads)  # [H, N, D], [N]
        thetas = books.key_theta[layer]
        tables = KeyTables(thetas)
        row = {}
        for beam in args.beams:
            t0 = time.perf_counter()
            packed = encode_keys_beam(r.transpose(0, 1), thetas, beam, tables)
            seconds = time.perf_counter() - t0
            row[str(beam)] = {"rel_mse": relative_error(r, norm, thetas, packed), "seconds": round(seconds, 2)}
        base = row[str(args.beams[0])]["rel_mse"]
        for v in row.values():
            v["vs_first"] = v["rel_mse"] / base - 1
        result["layers"][str(layer)] = row
        means = {
            b: sum(x[str(b)]["rel_mse"] for x in result["layers"].values()) / len(result["layers"]) for b in args.beams
        }
        result["mean_rel_mse"] = {str(b): m for b, m in means.items()}
        atomic_write_json(args.output, result)
        print(layer, {b: round(v["rel_mse"], 6) for b, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
