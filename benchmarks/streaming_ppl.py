"""StreamingLLM streaming perplexity over all the Paul Graham essays with the embedded SmolLM2 (one GPU).

Reproduces the paper's language-modelling-on-long-streams study (Xiao et al., *Efficient Streaming Language
Models with Attention Sinks*, arXiv 2309.17453, Section 4.1 and the sink ablation of Table 2) on the ~154k tokens
of the embedded essays with SmolLM2-135M (8k context), through the exact parallel evaluator
:func:`pressroom.evaluation.streaming.parallel_streaming_perplexity` (the same per-token NLL as feeding the stream
one token at a time into a sink + window cache, without the per-token loop).

Configurations (duplicates run once):

- the full cache (true positions) up to ``--full-max-tokens`` (default 16384, twice the model's context, to show
  where it breaks);
- sinks ``--n-sink`` (4) with windows ``--windows`` (256 512 1024 2048);
- the plain sliding window without sinks (0, ``--ablation-window``) and the sink ablation ``--sinks``
  (0 1 2 4 8) at window ``--ablation-window`` (1024);
- kvpress's eviction, ``DecodingPress(StreamingLLMPress(n_sink), compression_interval=1, target_size=n_sink + w - 1)``
  kept in stream order (:class:`pressroom.presses.OrderedStreamingLLMPress`), for each ``--kvpress-windows`` ``w``
  (1024): the same tokens as ``n_sink`` sinks + window ``w``, at their original positions (``positions="original"``
  of the evaluator, tested equal to kvpress token by token).

Writes (atomically) a small JSON (``--output``, default ``benchmarks/results/streaming_ppl.json``) with, per
configuration, the perplexity, throughput, runtime, computed KV bytes and downsampled curves (cumulative
perplexity at ~200 log-spaced points, perplexity per ``--segment``-token segment), plus run metadata; a PNG beside
it (perplexity per segment vs tokens, log-y); and prints a markdown table. The JSON is rewritten after each
configuration, so an interrupted run keeps what it finished.

Usage::

    python benchmarks/streaming_ppl.py                      # on a GPU: the whole sweep, bfloat16
    python benchmarks/streaming_ppl.py --device cpu --max-tokens 600 --full-max-tokens 600 --output /tmp/x.json

On an H100 the 135M model does roughly 100k+ tokens/s through the evaluator, so the nine configurations over
~154k tokens take a few minutes including the model load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pressroom.evaluation.atomic import atomic_write_bytes

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "streaming_ppl.json"
PREFIXES = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
MAX_JSON_BYTES = 200_000


# --------------------------------------------------------------------------------------------------- args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="anything load_model accepts (default: the embedded SmolLM2)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--corpus", default="pg_essays")
    p.add_argument("--split", default="all")
    p.add_argument("--max-tokens", type=_positive, default=None, help="stream length (default: the whole corpus)")
    p.add_argument("--full-max-tokens", type=_positive, default=16384, help="stream length of the full cache")
    p.add_argument("--n-sink", type=_non_negative, default=4, help="sinks of the window sweep")
    p.add_argument("--windows", type=_positive, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--sinks", type=_non_negative, nargs="+", default=[0, 1, 2, 4, 8], help="sink ablation")
    p.add_argument("--ablation-window", type=_positive, default=1024)
    p.add_argument(
        "--kvpress-windows", type=_positive, nargs="*", default=[1024], help="kvpress eviction (original positions)"
    )
    p.add_argument("--chunk-size", type=_positive, default=None, help="queries per pass (default 2048 CUDA, 512 CPU)")
    p.add_argument("--segment", type=_positive, default=4096, help="tokens per segment of the perplexity curve")
    p.add_argument("--curve-points", type=_positive, default=200, help="points of the cumulative curve")
    p.add_argument(
        "--check-tokens",
        type=_non_negative,
        default=None,
        help="first check, on this many tokens, that the parallel evaluator equals the literal token-by-token\n"
        "procedure (4 sinks + 64, chunk 96) in the run's dtype; 0 skips (default 512 on CUDA, 0 on CPU)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON to write (default {DEFAULT_OUTPUT})")
    p.add_argument("--plot", type=Path, default=None, help="PNG to write (default: the JSON's path with .png)")
    return p.parse_args(argv)


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep in run order, duplicates removed: full cache, window sweep, sliding window, sink ablation."""
    wanted: list[tuple[int | None, int | None, str, str]] = [(None, None, "full cache", "cache")]
    wanted += [(args.n_sink, w, "window sweep", "cache") for w in args.windows]
    wanted += [(0, args.ablation_window, "sliding window", "cache")]
    wanted += [(s, args.ablation_window, "sink ablation", "cache") for s in args.sinks]
    wanted += [(args.n_sink, w, "kvpress eviction", "original") for w in args.kvpress_windows]
    seen, configs = set(), []
    for n_sink, window, group, positions in wanted:
        if (n_sink, window, positions) in seen:
            continue
        seen.add((n_sink, window, positions))
        if window is None:
            name = "full"
        elif positions == "original":
            name = f"kvpress_sink{n_sink}_win{window}"
        else:
            name = f"sink{n_sink}_win{window}"
        cfg = dict(name=name, n_sink=n_sink, window=window, group=group, positions=positions)
        if positions == "original":
            cfg["kvpress_target_size"] = n_sink + window - 1
        configs.append(cfg)
    return configs


# --------------------------------------------------------------------------------------------------- curves


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def summarize(nll: list[float], segment: int, points: int) -> dict[str, Any]:
    """Downsampled curves of one run: cumulative perplexity (log-spaced), per-segment and prefix perplexities."""
    x = np.asarray(nll, dtype=np.float64)
    n = x.size
    csum = np.cumsum(x)
    idx = np.unique(np.geomspace(1, n, num=min(points, n)).round().astype(np.int64))  # 1-based token counts
    seg_ends = list(range(segment, n, segment)) + [n]
    seg_starts = [0, *seg_ends[:-1]]
    return {
        "cumulative": {
            "tokens": idx.tolist(),
            "perplexity": [round(_ppl(csum[i - 1] / i), 4) for i in idx],
        },
        "segments": {
            "size": segment,
            "end": seg_ends,
            "perplexity": [round(_ppl(x[a:b].mean()), 4) for a, b in zip(seg_starts, seg_ends)],
        },
        # over the first p tokens of the stream, i.e. its first p - 1 predictions
        "prefix_perplexity": {str(p): round(_ppl(csum[p - 2] / (p - 1)), 4) for p in PREFIXES if p - 1 <= n},
    }


# --------------------------------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> None:
    data = (json.dumps(payload, indent=1) + "\n").encode()
    if len(data) > MAX_JSON_BYTES:
        print(f"warning: {path} is {len(data) / 1e3:.0f} kB (> {MAX_JSON_BYTES / 1e3:.0f} kB)", file=sys.stderr)
    atomic_write_bytes(path, data)


def write_plot(path: Path, payload: dict[str, Any]) -> None:
    """Perplexity per segment vs tokens, one line per configuration, log-y; the model's context marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(9, 5))
    for run in payload["runs"]:
        seg = run["segments"]
        label = f"{run['label']}: {run['perplexity']:.2f}"
        style = "--" if run["window"] is None else (":" if run.get("positions") == "original" else "-")
        ax.plot(seg["end"], seg["perplexity"], style, marker=".", markersize=3, linewidth=1.2, label=label)
    context = payload["metadata"].get("model_context")
    longest = max(run["tokens"] for run in payload["runs"])
    if context and context < longest:
        ax.axvline(context, color="grey", linestyle=":", linewidth=1)
        ax.text(context, 0.98, " model context", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("tokens")
    ax.set_ylabel(f"perplexity per {payload['metadata']['segment']}-token segment")
    meta = payload["metadata"]
    ax.set_title(f"StreamingLLM on {meta['corpus']} ({meta['stream_tokens']} tokens), {meta['model']}, {meta['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def markdown_table(runs: list[dict[str, Any]]) -> str:
    prefixes = [p for p in (8192, 16384) if any(str(p) in r["prefix_perplexity"] for r in runs)]
    head = ["config", "n_sink", "window", "tokens", "perplexity", *[f"ppl@{p // 1024}k" for p in prefixes]]
    head += ["tokens/s", "runtime (s)", "KV MiB (computed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["label"], "-" if r["n_sink"] is None else str(r["n_sink"]), str(r["window"] or "all")]
        cells += [str(r["tokens"]), f"{r['perplexity']:.3f}"]
        cells += [f"{r['prefix_perplexity'][str(p)]:.3f}" if str(p) in r["prefix_perplexity"] else "" for p in prefixes]
        cells += [f"{r['tokens_per_second']:.0f}", f"{r['runtime_seconds']:.1f}", f"{r['kv_bytes'] / 2**20:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import SMOLLM2_CONTEXT, load_model, model_label
    from pressroom.evaluation.perplexity import streaming_perplexity
    from pressroom.evaluation.streaming import parallel_streaming_perplexity, reference_streaming_nll

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plot_path = args.plot or args.output.with_suffix(".png")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    chunk = args.chunk_size or (2048 if device.type == "cuda" else 512)
    ids = corpus_tokens(tokenizer, args.corpus, args.split)
    total = ids.numel()
    n_stream = min(total, args.max_tokens or total)
    n_full = min(total, args.full_max_tokens)
    context = getattr(model.config, "max_position_embeddings", None) or SMOLLM2_CONTEXT
    print(
        f"loaded {args.model} ({dtype}) on {_device_name(device)} and {total} tokens of {args.corpus}:{args.split} "
        f"in {time.perf_counter() - t0:.1f} s; streams of {n_stream} tokens (full cache: {n_full}), chunk {chunk}",
        flush=True,
    )
    payload: dict[str, Any] = {
        "kind": "streaming_perplexity_sweep",
        "metadata": {
            "paper": "https://arxiv.org/abs/2309.17453",
            "evaluator": "pressroom.evaluation.streaming.parallel_streaming_perplexity (exact, parallel)",
            "model": model_label(args.model),
            "model_context": context,
            "corpus": args.corpus,
            "split": args.split,
            "corpus_tokens": total,
            "stream_tokens": n_stream,
            "full_cache_tokens": n_full,
            "chunk_size": chunk,
            "segment": args.segment,
            "device": _device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
            "command": shlex.join([sys.executable, *sys.argv]),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "kv_bytes_note": "computed, not measured: 2 * layers * kv_heads * head_dim * min(T-1, n_sink+window) "
            "* itemsize, what a sink+window cache of that capacity holds",
        },
        "runs": [],
    }
    n_check = args.check_tokens if args.check_tokens is not None else (512 if device.type == "cuda" else 0)
    if n_check >= 2:
        t1 = time.perf_counter()
        reference = reference_streaming_nll(model, ids[:n_check], 4, 64)
        t_ref = time.perf_counter() - t1
        result = parallel_streaming_perplexity(model, ids, 4, 64, chunk_size=96, max_tokens=n_check, progress=False)
        diff = float((torch.tensor(result.nll) - reference).abs().max())
        # The model's own rounding noise in this dtype: its full cache fed one token at a time vs in one pass.
        one_by_one = streaming_perplexity(model, ids, mode="streaming", max_tokens=n_check, progress=False)
        one_pass = streaming_perplexity(
            model, ids, mode="chunked", chunk_size=n_check, max_tokens=n_check, progress=False
        )
        noise = float((torch.tensor(one_by_one.nll) - torch.tensor(one_pass.nll)).abs().max())
        payload["metadata"]["equivalence_check"] = {
            "tokens": n_check,
            "n_sink": 4,
            "window": 64,
            "chunk_size": 96,
            "max_abs_nll_diff": diff,
            "mean_nll_parallel": float(np.mean(result.nll)),
            "mean_nll_reference": float(reference.mean()),
            "reference_tokens_per_second": round((n_check - 1) / t_ref, 1),
            "noise_floor_max_abs_nll_diff": noise,
            "noise_floor_note": "full cache, DynamicCache, one token per pass vs one pass, same dtype",
        }
        print(
            f"equivalence check on {n_check} tokens (4 sinks + 64): max |NLL parallel - token by token| = {diff:.2e} "
            f"(token by token: {(n_check - 1) / t_ref:.0f} tokens/s); the model's own noise in {dtype}: {noise:.2e}",
            flush=True,
        )
    configs = configurations(args)
    for k, cfg in enumerate(configs, 1):
        n_tokens = n_full if cfg["window"] is None else n_stream
        label = "full cache" if cfg["window"] is None else f"{cfg['n_sink']} sinks + {cfg['window']}"
        if cfg["positions"] == "original":
            label = f"kvpress DecodingPress(StreamingLLM), target {cfg['kvpress_target_size']}, original positions"
        print(f"[{k}/{len(configs)}] {label} ({cfg['group']}) over {n_tokens} tokens ...", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = parallel_streaming_perplexity(
            model,
            ids,
            cfg["n_sink"],
            cfg["window"],
            chunk_size=chunk,
            max_tokens=n_tokens,
            progress=False,
            positions=cfg["positions"],
        )
        run = {
            **cfg,
            "label": label,
            "tokens": result.tokens,
            "perplexity": round(result.perplexity, 4),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "runtime_seconds": round(result.runtime_seconds, 3),
            "kv_bytes": result.kv_bytes,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            **summarize(result.nll, args.segment, args.curve_points),
        }
        payload["runs"].append(run)
        payload["metadata"]["total_runtime_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(args.output, payload)
        print(
            f"    perplexity {result.perplexity:.3f}, {result.tokens_per_second:.0f} tokens/s, "
            f"{result.runtime_seconds:.1f} s, KV {result.kv_bytes / 2**20:.1f} MiB (computed)",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_plot(plot_path, payload)
    print(f"\nwrote {args.output} and {plot_path} in {time.perf_counter() - t0:.1f} s\n")
    print(markdown_table(payload["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
