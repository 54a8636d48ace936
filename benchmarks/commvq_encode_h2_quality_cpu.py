"""Do float16 (``search="split_h2"``) or int16 fixed-point (``"split_dpx"``) candidate sums code real keys as well as
the exact search? (CPU, no timing.)

The GPU comparison of the key searches (``commvq_encode_h2.json``) uses random codebooks far from the keys' scale.
This takes SmolLM2's held-out pre-RoPE keys (``--heldout-tokens`` of the essays' held-out split, float32 on the CPU)
and its trained codebooks, and codes every layer with the two PyTorch references: the exact search
(:func:`pressroom.kernels.commvq_encode.encode_keys_reference`, the reference quantizer's codes) and the float16-sum
search (:func:`~pressroom.kernels.commvq_encode.encode_keys_split_h2_reference`, which rounds as the Triton kernel
does; the kernel adds TF32 dot products on the GPU). It reports per layer the fraction of (token, head) code
sequences that are identical and the relative key MSE of both. The JSON is rewritten after each layer; a rerun
skips the layers already in it. ``--search split_dpx`` compares the fixed-point sums instead (the same reference
with ``sums="i16"`` and the cache's ``key_norm_bound``: 1, or the largest pair scale of a weighted search).

    python benchmarks/commvq_encode_h2_quality_cpu.py --codebooks CB/2bit/em --bits 2 \\
        --output benchmarks/results/commvq_encode_h2_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from commvq_key_data_cpu import layer_keys
from tqdm.auto import tqdm

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.evaluation.corpora import corpus_tokens
from pressroom.evaluation.models import load_model
from pressroom.kernels.commvq_codebook import residual_decode, search_operands
from pressroom.kernels.commvq_encode import encode_keys_reference, encode_keys_split_h2_reference, unpack_codes12
from pressroom.presses.commvq_codebooks import CommVQCodebooks, model_kv_shape
from pressroom.training.commvq_em import prepare_keys


def relative_mse(packed: torch.Tensor, x: torch.Tensor, thetas: torch.Tensor) -> float:
    """``sum ||x - decoded||^2 / sum ||x||^2`` over tokens and heads (``x [N, H, D]`` as searched)."""
    err = sum(
        float((residual_decode(unpack_codes12(packed[:, h], thetas.shape[1]), thetas[h]) - x[:, h]).pow(2).sum())
        for h in range(x.shape[1])
    )
    return err / float(x.pow(2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", required=True, help="native codebooks directory (pressroom-train commvq output)")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: all")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output", required=True)
    ap.add_argument(
        "--search", default="split_h2", choices=["split_h2", "split_dpx"], help="the search set beside the exact one"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    books = CommVQCodebooks.load(args.codebooks, bits=args.bits)
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    books.validate(model.config)
    n_layers, kv_heads, _ = model_kv_shape(model.config)
    layers = list(range(n_layers)) if not args.layers else args.layers
    if any(not 0 <= i < n_layers for i in layers):
        raise SystemExit(f"--layers must be in [0, {n_layers}), got {layers}")
    ids = corpus_tokens(tok, "pg_essays", split="heldout")[: args.heldout_tokens]
    out_path = Path(args.output)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    setting = {"model": args.model, "bits": args.bits, "heldout_tokens": int(ids.numel()), "seq_len": args.seq_len,
               "codebooks": str(args.codebooks), "residuals": books.R}  # fmt: skip
    if args.search != "split_h2":  # (the split_h2 files were written before the option)
        setting["search"] = args.search
    name = f"rel_mse_{args.search}"
    if result and result.get("setting") != setting:
        raise SystemExit(f"{out_path} holds a run with other settings {result.get('setting')}; use another --output")
    result.update(
        benchmark="commvq_encode_h2_quality_cpu",
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        device=platform.processor() or "cpu",
        torch=torch.__version__,
        setting=setting,
    )
    result.setdefault("layers", {})
    for layer in tqdm(layers, desc="layers"):
        if str(layer) in result["layers"]:
            continue
        t = time.time()
        r, _ = prepare_keys(layer_keys(model, ids, layer, args.seq_len), kv_heads)  # [H, N, D], as the cache codes
        x, thetas = search_operands(r.transpose(0, 1), books.key_theta[layer].float(), books.layer_pair_weights(layer))
        x = x.contiguous()
        exact = encode_keys_reference(x, thetas)
        pw = books.layer_pair_weights(layer)
        bound = 1.0 if pw is None else float(search_operands(torch.ones_like(x[0]), thetas, pw)[0].max())
        sums = "i16" if args.search == "split_dpx" else "f16"
        h2 = encode_keys_split_h2_reference(x, thetas, sums=sums, key_norm_bound=bound)
        result["layers"][str(layer)] = {
            "codes_equal": float((exact == h2).all(-1).float().mean()),
            "rel_mse_exact": relative_mse(exact, x, thetas),
            name: relative_mse(h2, x, thetas),
            "seconds": round(time.time() - t, 1),
        }
        rows = result["layers"].values()
        result["summary"] = {
            "layers": len(rows),
            "codes_equal_mean": sum(v["codes_equal"] for v in rows) / len(rows),
            "rel_mse_exact_mean": sum(v["rel_mse_exact"] for v in rows) / len(rows),
            f"{name}_mean": sum(v[name] for v in rows) / len(rows),
        }
        atomic_write_json(out_path, result)
        print(layer, result["layers"][str(layer)], flush=True)
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
