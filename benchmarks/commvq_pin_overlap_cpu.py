"""Which prefill tokens does ``CommVQPress(pin_ratio=...)`` keep exact on a needle task: the needles' values or not?

``pin_ratio`` keeps the tokens that the last ``pin_window`` prefill tokens attend to most, per layer, in full
precision (:meth:`pressroom.presses.CommVQPress.pin_scores`). On a retrieval task the question (prefilled with the
context, kvpress's ``query_aware`` protocol) attends to the needle's *key phrase* ("... magic numbers for tidy-cottage
is:"), and the model reads the *value* after it only while it writes the answer. ``pin_span`` scores a token by the
most attended of itself and the ``pin_span - 1`` tokens before it, so that what follows an attended phrase is kept
too. This benchmark measures, per layer, the share of the needles' value tokens that the pins catch, for each
``--spans`` and ``--ratios`` (SmolLM2 in float32 on the CPU, ``--samples`` contexts of ``--task`` at ``--context``
tokens, seed 0: the samples of ``commvq_needle_nll.py``). No codebook is needed: only the choice is measured.

    python benchmarks/commvq_pin_overlap_cpu.py --output benchmarks/results/commvq_pin_overlap_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from kvpress import SnapKVPress
from tqdm import tqdm
from transformers import DynamicCache

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.presses import CommVQPress


def value_positions(ids: list[int], answers: list[str], tok) -> list[int]:
    """Positions of the answers' tokens in ``ids`` (each answer's first occurrence, with or without a space)."""
    out = []
    for answer in answers:
        for cand in (
            tok(" " + answer, add_special_tokens=False).input_ids,
            tok(answer, add_special_tokens=False).input_ids,
        ):
            hits = [i for i in range(len(ids) - len(cand) + 1) if ids[i : i + len(cand)] == cand]
            if hits:
                out.extend(range(hits[0], hits[0] + len(cand)))
                break
        else:
            raise ValueError(f"answer {answer!r} not found in the context's tokens")
    return out


def window_attention(model, ctx: torch.Tensor, w: int) -> list[torch.Tensor]:
    """Per layer, the window attention ``[B, H_q, w, n - w]`` of the last ``w`` prefill queries (SnapKV's)."""
    out: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        out[module.layer_idx] = SnapKVPress.compute_window_attention(
            module, kwargs["hidden_states"], keys, w, kwargs["position_embeddings"]
        )

    layers = model.model.layers
    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(ctx, past_key_values=DynamicCache())
    finally:
        for h in handles:
            h.remove()
    return [out[i] for i in range(len(layers))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="niah_multivalue")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spans", type=int, nargs="+", default=[1, 4, 8, 12, 16])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.02])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--pin-window", type=int, default=64)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()

    from pressroom.evaluation.run import Runner
    from pressroom.evaluation.tasks import generate_tasks

    t0 = time.time()
    pipe = Runner(progress=False).pipeline(args.model, "cpu", "float32", False)
    model, tok = pipe.model, pipe.tokenizer
    df = generate_tasks(tok, [args.task], context_length=args.context, n_samples=args.samples, seed=args.seed)
    n_layers = model.config.num_hidden_layers
    caught = {(s, r): torch.zeros(n_layers) for s in args.spans for r in args.ratios}
    n_values = 0
    for _, row in tqdm(list(df.iterrows()), desc="samples"):
        inputs = pipe.preprocess(row["context"] + row["question"], [""], row["answer_prefix"], max_context_length=10**9)
        ctx = inputs["context_ids"]
        values = set(value_positions(ctx[0].tolist(), list(row["answer"]), tok))
        n_values += len(values)
        n = ctx.shape[1]
        w = min(args.pin_window, n - 1)
        attn = window_attention(model, ctx, w)
        for (span, ratio), acc in caught.items():
            press = CommVQPress(codebooks="(choice only)", window=args.window, n_sink=args.n_sink, pin_ratio=ratio,
                                pin_window=args.pin_window, pin_span=span)  # fmt: skip
            for layer, a in enumerate(attn):
                pins = set(press.pick_pins(CommVQPress.pin_scores(a, span), n, w).tolist())
                acc[layer] += len(pins & values)
    result = {
        "benchmark": "commvq_pin_overlap_cpu",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "setting": {k: v for k, v in vars(args).items() if k != "output"},
        "value_tokens": n_values,
        "share_of_value_tokens_pinned": {
            f"span{s}_ratio{r:g}": {
                "mean_over_layers": float(acc.mean() / n_values),
                "max_layer": int(acc.argmax()),
                "max_share": float(acc.max() / n_values),
                "per_layer": [round(float(x) / n_values, 4) for x in acc],
            }
            for (s, r), acc in caught.items()
        },
        "elapsed_s": round(time.time() - t0, 1),
    }
    atomic_write_json(args.output, result)
    for key, v in result["share_of_value_tokens_pinned"].items():
        print(key, round(v["mean_over_layers"], 3), "max", v["max_layer"], round(v["max_share"], 3))


if __name__ == "__main__":
    main()
