"""Held-out perplexity under eviction: AnchorPress next to kvpress's presses, with or without an EIT adapter.

The held-out essays are cut into windows of ``--context + --continuation`` tokens; each context is prefilled under
the press (kvpress's way: compressed after the prefill) and the continuation is scored over the compressed cache
(:func:`pressroom.training.eit.evicted_perplexity`). Runs on the CPU or a GPU; one JSON written after each press.

    python benchmarks/eit_evicted_ppl.py --output benchmarks/results/eit_evicted_ppl_cpu.json       # SmolLM2, CPU
    python benchmarks/eit_evicted_ppl.py --adapter DIR/final --output $OUT/eit_evicted_ppl_eit.json  # with EIT
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--adapter", default=None, help="EIT adapter directory for AnchorPress (loaded into the model)")
    p.add_argument("--presses", nargs="+", default=["anchor", "snapkv", "streaming_llm", "knorm"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    args = p.parse_args(argv)

    import transformers

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import load_model
    from pressroom.evaluation.press_registry import make_press
    from pressroom.presses import AnchorPress
    from pressroom.training.eit import evicted_perplexity

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = corpus_tokens(tokenizer, "pg_essays", "heldout")
    result: dict = {
        "benchmark": "eit_evicted_ppl",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
        "dtype": str(model.dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": importlib.metadata.version("kvpress"),
        "args": vars(args),
        "results": [],
    }
    specs = [("no_press", 0.0)]
    if args.adapter:  # the adapter alone (full cache) first: it loads the adapter into the model
        specs.append((f"anchor:adapter={args.adapter}", 0.0))
    for name in args.presses:
        spec = f"anchor:adapter={args.adapter}" if name == "anchor" and args.adapter else name
        specs += [(spec, r) for r in args.ratios]
    for spec, ratio in specs:
        press = make_press(spec, ratio)
        if isinstance(press, AnchorPress) and press.tokenizer is None:
            press.tokenizer = tokenizer
        t0 = time.perf_counter()
        res = evicted_perplexity(model, ids, press, args.context, args.continuation, max_windows=args.windows)
        res.update({"press": spec.split(":")[0], "spec": spec, "ratio": ratio, "seconds": time.perf_counter() - t0})
        result["results"].append(res)
        atomic_write_json(Path(args.output), result, indent=1)
        label = spec.split(":")[0]
        print(f"{label:14s} {ratio:.2f}  ppl {res['perplexity']:9.3f}  kv {res['kv_tokens']:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
