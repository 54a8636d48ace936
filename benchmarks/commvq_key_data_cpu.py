"""Does the CommVQ key codebook need more training tokens? Train against held-out error for one layer (CPU).

Our SmolLM2 codebooks are trained on 32,768 essay tokens: 8 tokens per center of each residual step's 4,096, where
the CommVQ reference's EM uses up to about 1M tokens (256 per center). This benchmark takes one layer's pre-RoPE keys
(all of the essays' train split and ``--heldout-tokens`` of the held-out split, SmolLM2 in float32 on the CPU),
fits the residual EM (``pressroom.training.commvq_em.fit_keys_em``, PyTorch path) on the first ``N`` training tokens
for each ``--train-tokens`` value, and reports the relative key MSE on those ``N`` tokens and on the held-out
tokens. A train error well below the held-out one says that the codebooks overfit and more data would lower the
held-out error. The JSON is rewritten after each size; a rerun skips the sizes already in it.

    python benchmarks/commvq_key_data_cpu.py --layer 4 --train-tokens 8192 32768 0 --em-steps 10 \\
        --output benchmarks/results/commvq_key_data_cpu.json
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

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.evaluation.corpora import corpus_tokens
from pressroom.evaluation.models import load_model
from pressroom.presses.commvq_codebooks import model_kv_shape
from pressroom.training.commvq_em import EMConfig, fit_keys_em, key_relative_mse, prepare_keys


def layer_keys(model, ids: torch.Tensor, layer: int, seq_len: int) -> torch.Tensor:
    """Pre-RoPE keys ``[N, H * d]`` (float32) of ``layer`` over ``ids``, in independent ``seq_len`` pieces."""
    from kvpress.utils import get_prerope_key_states

    out: list[torch.Tensor] = []
    attn = model.model.layers[layer].self_attn

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        out.append(get_prerope_key_states(module, hidden)[0].transpose(0, 1).flatten(1).float())
        raise _Stop  # nothing after this layer is needed

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in tqdm(range(0, ids.numel(), seq_len), desc=f"keys of layer {layer}", leave=False):
            with torch.no_grad():
                try:
                    model.model(input_ids=ids[s : s + seq_len].view(1, -1), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(out)


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, nargs="+", default=[8192, 32768, 0], help="0: the whole train split")
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--residuals", type=int, default=11, help="R (11: SmolLM2 at 2 bits)")
    ap.add_argument("--em-steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    layers, kv_heads, _ = model_kv_shape(model.config)
    if not 0 <= args.layer < layers:
        raise SystemExit(f"--layer must be in [0, {layers}), got {args.layer}")
    train_ids = corpus_tokens(tok, "pg_essays", split="train")
    held_ids = corpus_tokens(tok, "pg_essays", split="heldout")[: args.heldout_tokens]
    sizes = [n if n > 0 else train_ids.numel() for n in args.train_tokens]
    if any(n > train_ids.numel() for n in sizes):
        raise SystemExit(f"--train-tokens: the train split has {train_ids.numel()} tokens")
    out_path = Path(args.output)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    setting = {"model": args.model, "layer": args.layer, "residuals": args.residuals, "em_steps": args.em_steps,
               "heldout_tokens": int(held_ids.numel()), "seq_len": args.seq_len}  # fmt: skip
    if result and result.get("setting") != setting:
        raise SystemExit(f"{out_path} holds a run with other settings {result.get('setting')}; use another --output")
    result.update(
        benchmark="commvq_key_data_cpu",
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        device=platform.processor() or "cpu",
        torch=torch.__version__,
        setting=setting,
        corpus="pg_essays (train split for the codebooks, heldout split for the error)",
        train_split_tokens=int(train_ids.numel()),
    )
    result.setdefault("runs", {})
    t0 = time.time()
    k_train = layer_keys(model, train_ids[: max(sizes)], args.layer, args.seq_len)
    k_held = layer_keys(model, held_ids, args.layer, args.seq_len)
    r_train, n_train = prepare_keys(k_train, kv_heads)
    r_held, n_held = prepare_keys(k_held, kv_heads)
    result["collect_s"] = round(time.time() - t0, 1)
    cfg = EMConfig(n_steps=args.em_steps)
    for n in tqdm(sizes, desc="train sizes"):
        if str(n) in result["runs"]:
            continue
        t = time.time()
        thetas, mse = fit_keys_em(r_train[:, :n], n_train[:n], args.residuals, cfg, use_triton=False)
        train = key_relative_mse(r_train[:, :n], n_train[:n], thetas, use_triton=False)
        held = key_relative_mse(r_held, n_held, thetas, use_triton=False)
        result["runs"][str(n)] = {
            "train_tokens": n,
            "tokens_per_center": n / 4096,
            "train_rel_mse": train.tolist(),
            "heldout_rel_mse": held.tolist(),
            "train_rel_mse_mean": float(train.mean()),
            "heldout_rel_mse_mean": float(held.mean()),
            "seconds": round(time.time() - t, 1),
        }
        atomic_write_json(out_path, result)
        print(f"N={n}: train {float(train.mean()):.5f}, held-out {float(held.mean()):.5f}", flush=True)


if __name__ == "__main__":
    main()
