"""Token-by-token streaming perplexity through the real caches, next to the exact parallel evaluator.

On the same tokens (the essays, one token per forward, the cache never reset):

- ``SinkWindowCache`` (n_sink 4, window W): the cache itself, measured bytes;
- ``pressroom.evaluation.streaming.parallel_streaming_perplexity`` with the same (n_sink, W): must give the same
  NLL per token (this checks the evaluator used for the 154k-token sweep against the real cache);
- kvpress's ``DecodingPress(StreamingLLMPress)`` compressing to n_sink + W tokens every step (original positions
  kept, as kvpress does), as shipped, and with :class:`pressroom.presses.OrderedStreamingLLMPress` (the kept tokens
  left in stream order); the parallel evaluator with ``positions="original"`` and window W + 1 must give the
  ordered one's NLL per token (kvpress's ``topk`` reorders the cache, so the shipped press evicts other tokens);
- the full ``DynamicCache``.

Writes a small JSON (per-config perplexity, tokens/s, KV bytes, max |NLL difference| to the parallel evaluator,
segment perplexities) with the device, versions and command line.

    python benchmarks/streaming_crosscheck.py --tokens 2048 --window 1020 --output benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--segment", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--output", default="benchmarks/results/streaming_crosscheck.json")
    args = p.parse_args(argv)
    import kvpress
    import transformers
    from kvpress import DecodingPress, StreamingLLMPress

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import load_model
    from pressroom.evaluation.perplexity import streaming_perplexity
    from pressroom.evaluation.streaming import parallel_streaming_perplexity
    from pressroom.presses import OrderedStreamingLLMPress, SinkWindowCache

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = corpus_tokens(tokenizer, "pg_essays", "all", max_tokens=args.tokens).to(model.device)
    capacity = args.n_sink + args.window
    runs = {}

    def record(name: str, res, extra: dict | None = None) -> None:
        nll = torch.tensor(res.nll, dtype=torch.float64)
        seg = [float(nll[i : i + args.segment].mean().exp()) for i in range(0, len(nll), args.segment)]
        runs[name] = {
            "perplexity": res.perplexity,
            "tokens": res.tokens,
            "tokens_per_second": res.tokens_per_second,
            "kv_bytes": res.kv_bytes,
            "kv_bytes_max": res.kv_bytes_max,
            "segment_perplexity": seg,
            **(extra or {}),
        }
        print(
            f"{name:<40} ppl {res.perplexity:8.3f}  {res.tokens_per_second:7.1f} tok/s  KV {res.kv_bytes} B", flush=True
        )

    parallel = parallel_streaming_perplexity(model, ids, n_sink=args.n_sink, window=args.window, progress=False)
    record("parallel evaluator (sink window)", parallel, {"kv_bytes_note": "computed, not measured"})
    cache = SinkWindowCache(model.config, n_sink=args.n_sink, window=args.window)
    res = streaming_perplexity(model, ids, cache=cache, mode="streaming", progress=False)
    diff = max(abs(a - b) for a, b in zip(res.nll, parallel.nll))
    record("SinkWindowCache, token by token", res, {"max_abs_nll_diff_to_parallel": diff})
    original = parallel_streaming_perplexity(
        model, ids, n_sink=args.n_sink, window=args.window + 1, progress=False, positions="original"
    )
    record("parallel evaluator (original positions, window W + 1)", original, {"kv_bytes_note": "computed"})
    for base in (StreamingLLMPress, OrderedStreamingLLMPress):
        label = base.__name__
        press = DecodingPress(base_press=base(n_sink=args.n_sink), compression_interval=1, target_size=capacity)
        res = streaming_perplexity(model, ids, press=press, mode="streaming", progress=False)
        diff = max(abs(a - b) for a, b in zip(res.nll, original.nll))
        record(
            f"kvpress DecodingPress({label}), target {capacity}",
            res,
            {"max_abs_nll_diff_to_parallel_original_positions": diff},
        )
    res = streaming_perplexity(model, ids, mode="streaming", progress=False)
    record("full DynamicCache, token by token", res)

    out = {
        "benchmark": "streaming_crosscheck",
        "command": " ".join(["benchmarks/streaming_crosscheck.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(model.dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "tokens": args.tokens,
        "n_sink": args.n_sink,
        "window": args.window,
        "segment": args.segment,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    atomic_write_json(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
