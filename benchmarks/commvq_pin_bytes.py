"""KV bytes that SmolLM2's CommVQ cache holds per prefill with and without pinned tokens (``pin_ratio``), bf16.

The needle runs' ``stats.json`` records ``kv_bytes`` (``cache_memory_bytes`` after the prefill, averaged over the
contexts); where a GPU run's stats did not come back, this gives the same figure on the CPU: one
:class:`~pressroom.presses.CommVQLayer` built as :class:`~pressroom.presses.CommVQPress` builds it (2 bits, 4 sinks,
window 128), filled by ``load_prefill`` with bfloat16 keys and values of ``--tokens`` tokens and the press's pin count
(``pin_count``; the pinned positions are drawn at random: the bytes do not depend on which), times the model's layers
(every layer has the same shape). The values are random: the bytes depend on the shapes only.

    python benchmarks/commvq_pin_bytes.py --codebooks .codebooks/v1000/pressroom-cb/2bit/em \
        --output benchmarks/results/commvq_pin_bytes_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.evaluation.models import load_model
from pressroom.presses import CommVQPress
from pressroom.presses.commvq_cache import CommVQLayer
from pressroom.presses.commvq_codebooks import CommVQCodebooks
from pressroom.presses.sink_window_cache import rope_frequencies


def layer_bytes(books: CommVQCodebooks, config, tokens: int, pin_ratio: float, pin_span: int) -> tuple[int, int]:
    """(pinned tokens per layer, bytes one layer holds after a ``tokens``-token prefill, marked)."""
    press = CommVQPress(books, bits=books.bits, n_sink=4, pin_ratio=pin_ratio, pin_span=pin_span)
    inv_freq, scaling = rope_frequencies(config)
    w = min(press.pin_window, tokens - 1)
    k = press.pin_count(tokens, w)
    layer = CommVQLayer(
        books.key_theta[0],
        books.values[0],
        inv_freq,
        scaling,
        window=press.window,
        n_sink=press.n_sink,
        pair_weights=books.layer_pair_weights(0),
    )
    h, d = books.num_kv_heads, books.head_dim
    keys = torch.randn(1, h, tokens, d, dtype=torch.bfloat16)
    values = torch.randn(1, h, tokens, d, dtype=torch.bfloat16)
    angles = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    lo, hi = press._pin_range(tokens, w)
    pin = (torch.randperm(hi - lo)[:k].sort().values + lo) if k > 0 else None
    layer.load_prefill(keys, values, emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16), pin=pin)
    layer.mark()
    return k, layer.memory_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codebooks", required=True, help="a native codebook directory (e.g. .../2bit/em)")
    p.add_argument("--tokens", type=int, default=4138, help="prefill tokens (the 4k needle contexts average 4,138)")
    p.add_argument("--pin-ratio", type=float, nargs="+", default=[0.0, 0.01, 0.02])
    p.add_argument("--pin-span", type=int, default=12)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if not Path(args.codebooks).exists():
        p.error(f"--codebooks {args.codebooks} does not exist: pass the output of pressroom-train commvq.")
    model, _ = load_model("smollm2", device="cpu")
    books = CommVQCodebooks.load(args.codebooks)
    books.validate(model.config)
    fp16 = 2 * args.tokens * books.num_kv_heads * books.head_dim * 2 * books.num_layers
    result = {
        "benchmark": "commvq_pin_bytes",
        "command": " ".join(["python", Path(__file__).name, *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "model": "smollm2",
        "bits": books.bits,
        "tokens": args.tokens,
        "layers": books.num_layers,
        "fp16_bytes": fp16,
        "pins": {},
    }
    for ratio in args.pin_ratio:
        k, b = layer_bytes(books, model.config, args.tokens, ratio, args.pin_span)
        total = b * books.num_layers
        result["pins"][str(ratio)] = {"pinned_per_layer": k, "kv_bytes": total, "fraction_of_fp16": total / fp16}
        print(ratio, result["pins"][str(ratio)], flush=True)
    atomic_write_json(Path(args.output), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
