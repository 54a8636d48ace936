"""GPU benchmark: SinkWindowCache decode latency and memory while streaming up to 1M tokens (StreamingLLM).

An 8B-shaped Llama with random weights (Llama-3.1-8B geometry: 32 layers, 32 query / 8 KV heads, head_dim 128) in
bfloat16 streams random tokens through ``SinkWindowCache(n_sink=4, window=4096)`` in chunks; at checkpoints
(4k ... 1M tokens streamed) it times single-token decode steps and reads the memory held. In the same run:

- sliding window with re-computation at the same window (the StreamingLLM paper's baseline: every new token
  re-encodes the last ``window`` tokens), per generated token;
- the full ``DynamicCache`` decode at growing contexts (memory and latency grow with the context);
- the cache's rotation/store kernels (Triton vs the PyTorch reference) and their share of a decode step.

Writes one JSON (device, versions, command line) under ``benchmarks/results/``.

    python benchmarks/sink_window_decode.py --output benchmarks/results/sink_window_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import call_ms

DEVICE = "cuda"


def cuda_ms(fn, reps: int, warmup: int = 2) -> list[float]:
    """Per-call milliseconds of ``fn`` (CUDA events on the GPU, wall clock for the CPU smoke test)."""
    return call_ms(fn, reps, warmup, cuda=DEVICE == "cuda")


def graph_ms(fn, calls: int = 20, reps: int = 10) -> float | None:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls: the kernel's device time,
    without the launch latency that a lone launch timed between events includes. ``None`` off CUDA."""
    if DEVICE != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = cuda_ms(graph.replay, reps, warmup=1)
    return statistics.median(times) / calls


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(layers: int, smoke: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32)
    if smoke:  # a CPU check of the script itself, no timing value
        shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=2 * 8)
    config = LlamaConfig(
        **shape,
        num_hidden_layers=layers,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # from_config(dtype=...) keeps the rotary inv_freq in float32, as from_pretrained does; `.to(bfloat16)` would
    # round it, and the model's RoPE would then no longer be the one its config describes.
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return model, config


def _positions(cache, n: int) -> dict:
    """In-cache positions for a SinkWindowCache (StreamingLLM's pos-shift); the model's default otherwise."""
    if not hasattr(cache, "position_ids_for"):
        return {}
    return {"position_ids": cache.position_ids_for(n).view(1, -1).to(DEVICE)}


@torch.inference_mode()
def stream_to(model, cache, seen: int, target: int, chunk: int, vocab: int, gen: torch.Generator) -> int:
    """Feed random tokens through the base model (no LM head) until ``target`` tokens have been streamed."""
    while seen < target:
        n = min(chunk, target - seen)
        ids = torch.randint(0, vocab, (1, n), device=DEVICE, generator=gen)
        model.model(input_ids=ids, past_key_values=cache, use_cache=True, **_positions(cache, n))
        seen += n
    _sync()
    return seen


@torch.inference_mode()
def decode_ms(model, cache, steps: int, vocab: int, gen: torch.Generator) -> list[float]:
    def step():
        ids = torch.randint(0, vocab, (1, 1), device=DEVICE, generator=gen)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **_positions(cache, 1))

    return cuda_ms(step, steps, warmup=3)


def graph_decode_ms(decoder, steps: int, vocab: int, gen: torch.Generator) -> list[float]:
    """Per-token milliseconds of SinkWindowDecoder steps (a replayed CUDA graph once the ring is full)."""

    def step():
        decoder.step(torch.randint(0, vocab, (1, 1), device=DEVICE, generator=gen))

    return cuda_ms(step, steps, warmup=3)


def kernel_rows(config, n_sink: int, window: int, reps: int) -> list[dict]:
    from pressroom.kernels.rope_ring import ring_decode, ring_rotate_keys, ring_store
    from pressroom.presses.sink_window_cache import rope_frequencies

    inv_freq, scaling = rope_frequencies(config)
    inv_freq = inv_freq.to(DEVICE)
    cap = n_sink + window
    kv, hd = config.num_key_value_heads, config.head_dim
    raw = torch.randn(1, kv, cap, hd, device=DEVICE, dtype=torch.bfloat16)
    vals = torch.randn_like(raw)
    out = torch.empty_like(raw)
    new_k = torch.randn(1, kv, 1, hd, device=DEVICE, dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    ang = (torch.tensor([123456.0], device=DEVICE)[:, None] * inv_freq[None]).repeat(1, 2)
    cos, sin = ang.cos()[None].to(torch.bfloat16), ang.sin()[None].to(torch.bfloat16)
    rows = []
    for use_triton in (True, False):
        rot = cuda_ms(
            lambda ut=use_triton: ring_rotate_keys(
                raw,
                out,
                inv_freq,
                scaling,
                pos_base=1000,
                start=0,
                stop=cap,
                n_sink=n_sink,
                window=window,
                ring_first=17,
                logical_order=False,
                use_triton=ut,
            ),
            reps,
        )
        store = cuda_ms(
            lambda ut=use_triton: ring_store(
                new_k,
                new_v,
                cos,
                sin,
                raw,
                vals,
                seq0=123456,
                start=0,
                stop=1,
                n_sink=n_sink,
                window=window,
                use_triton=ut,
            ),
            reps,
        )

        def fused_step(ut: bool = use_triton) -> None:  # a decoding step's work per layer: store + rotate, one launch
            ring_decode(
                new_k,
                new_v,
                cos,
                sin,
                raw,
                vals,
                out,
                inv_freq,
                scaling,
                seq=123456,
                pos_base=0,
                rot_start=0,
                rot_stop=cap,
                n_sink=n_sink,
                window=window,
                ring_first=(123456 + 1 - n_sink) % window,
                use_triton=ut,
            )

        fused = cuda_ms(fused_step, reps)
        fused_graph = graph_ms(fused_step) if use_triton else None
        rows.append(
            {
                "impl": "triton" if use_triton else "pytorch_reference",
                "decode_step_kernel_ms_per_layer": statistics.median(fused),
                "decode_step_kernel_ms_per_layer_in_graph": fused_graph,
                "rotate_keys_ms_per_layer": statistics.median(rot),
                "store_ms_per_layer": statistics.median(store),
                "rotate_GBps": 2 * raw.numel() * raw.element_size() / statistics.median(rot) / 1e6,
                "shape": [1, kv, cap, hd],
            }
        )
    return rows


def plot(result: dict, path: str) -> None:
    """Per-token decode latency vs tokens streamed: SinkWindowCache (eager, CUDA graph), full cache, re-computation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sw = result["sink_window_triton"]
    x = [r["tokens_streamed"] for r in sw]
    ax.plot(x, [r["decode_ms_median"] for r in sw], "o-", label="SinkWindowCache, eager steps")
    graph = [(r["tokens_streamed"], r["graph_decode_ms_median"]) for r in sw if r.get("graph_decode_ms_median")]
    if graph:
        ax.plot(*zip(*graph), "o-", label="SinkWindowCache, SinkWindowDecoder (CUDA graph)")
    full = [r for r in result.get("full_cache", []) if not r.get("oom")]
    if full:
        ax.plot([r["context"] for r in full], [r["decode_ms_median"] for r in full], "s--", label="full DynamicCache")
    rec = result.get("recompute_window_ms_per_token")
    if rec:
        ax.axhline(rec, color="gray", ls=":", label=f"sliding window + re-computation ({result['window']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("ms per generated token")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result['device']}: 8B-shaped Llama, bf16, {result['n_sink']} sinks + window {result['window']}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--checkpoints", default="4096,16384,65536,262144,1048576")
    p.add_argument("--full-contexts", default="4096,16384,65536,131072")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--recompute-reps", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/sink_window_decode.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    p.add_argument("--plot-from", metavar="JSON", help="only draw the latency plot of a finished run (to --plot)")
    p.add_argument("--plot", default=None, help="PNG path for the latency plot (default: the output's .png)")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel timings (phase 4), to --output")
    args = p.parse_args(argv)
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), args.plot or str(Path(args.plot_from).with_suffix(".png")))
        return 0
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("sink_window_decode.py needs a CUDA GPU (or --smoke on the CPU)")
    import transformers

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.presses.sink_window_cache import SinkWindowCache, SinkWindowDecoder

    t_start = time.time()
    model, config = build_model(args.layers, args.smoke)
    vocab = config.vocab_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    result: dict = {
        "benchmark": "sink_window_decode",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": f"random-weight Llama, 8B geometry, {args.layers} layers, 32 q / 8 kv heads, head_dim 128, bf16",
        "n_sink": args.n_sink,
        "window": args.window,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }

    if args.kernels_only:
        result["kernels"] = kernel_rows(config, args.n_sink, args.window, reps=50 if DEVICE == "cuda" else 2)
        atomic_write_json(args.output, result)
        print(json.dumps(result["kernels"], indent=1))
        return 0

    # 0. The baseline first (and again at the end, to see any drift of the machine).
    ids = torch.randint(0, vocab, (1, args.window), device=DEVICE, generator=gen)
    with torch.inference_mode():
        rec = cuda_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.recompute_reps)
    result["recompute_window_ms_per_token_before"] = statistics.median(rec)
    print(f"re-computation at window {args.window}: {statistics.median(rec):.1f} ms/token", flush=True)

    # 1. SinkWindowCache: stream to each checkpoint, time decode steps there: ordinary (eager) steps, and with the
    #    Triton kernels also SinkWindowDecoder's replayed CUDA graph, on the same cache.
    for use_triton in (True, False):
        cache = SinkWindowCache(config, n_sink=args.n_sink, window=args.window, use_triton=use_triton)
        decoder = SinkWindowDecoder(model, cache, use_graph=DEVICE == "cuda") if use_triton else None
        seen, rows = 0, []
        checkpoints = [int(c) for c in args.checkpoints.split(",")]
        if not use_triton:  # the reference path only at the first and last checkpoints it reaches quickly
            checkpoints = checkpoints[:2]
        for target in checkpoints:
            t0 = time.time()
            seen = stream_to(model, cache, seen, target, args.chunk, vocab, gen)
            stream_s = time.time() - t0
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = decode_ms(model, cache, args.decode_steps, vocab, gen)
            seen += args.decode_steps + 3
            graph_ms = None
            if decoder is not None:
                with torch.inference_mode():
                    graph_ms = graph_decode_ms(decoder, args.decode_steps, vocab, gen)
                seen += args.decode_steps + 3
            rows.append(
                {
                    "tokens_streamed": target,
                    "decode_ms_median": statistics.median(ms),
                    "decode_ms_p90": sorted(ms)[int(0.9 * (len(ms) - 1))],
                    "graph_decode_ms_median": statistics.median(graph_ms) if graph_ms else None,
                    "graph_decode_ms_p90": sorted(graph_ms)[int(0.9 * (len(graph_ms) - 1))] if graph_ms else None,
                    "graph_captured": decoder.captured if decoder is not None else None,
                    "cache_bytes": cache.memory_bytes(),
                    "gpu_allocated_bytes": torch.cuda.memory_allocated() if DEVICE == "cuda" else None,
                    "gpu_peak_bytes_during_decode": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
                    "stream_seconds_to_here": stream_s,
                }
            )
            print(
                f"sink_window triton={use_triton} {target:>8} tokens: {rows[-1]['decode_ms_median']:.2f} ms/token, "
                f"graph {rows[-1]['graph_decode_ms_median'] or float('nan'):.2f} ms/token, "
                f"cache {rows[-1]['cache_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
        result["sink_window_triton" if use_triton else "sink_window_reference"] = rows
        atomic_write_json(args.output, result)  # partial results survive a time limit
        del cache, decoder
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # 2. Sliding window with re-computation: each generated token re-encodes the last `window` tokens.
    with torch.inference_mode():
        rec = cuda_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.recompute_reps)
    result["recompute_window_ms_per_token"] = statistics.median(rec)
    atomic_write_json(args.output, result)
    print(f"re-computation at window {args.window}: {statistics.median(rec):.1f} ms/token", flush=True)

    # 3. Full DynamicCache at growing contexts.
    from transformers import DynamicCache

    full = []
    for ctx in [int(c) for c in args.full_contexts.split(",")]:
        cache = DynamicCache()
        try:
            stream_to(model, cache, 0, ctx, args.chunk, vocab, gen)
            ms = decode_ms(model, cache, args.decode_steps, vocab, gen)
            full.append(
                {
                    "context": ctx,
                    "decode_ms_median": statistics.median(ms),
                    "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers),
                    "gpu_allocated_bytes": torch.cuda.memory_allocated() if DEVICE == "cuda" else None,
                }
            )
            print(f"full cache {ctx:>7}: {full[-1]['decode_ms_median']:.2f} ms/token", flush=True)
        except torch.OutOfMemoryError:
            full.append({"context": ctx, "oom": True})
        del cache
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    result["full_cache"] = full
    atomic_write_json(args.output, result)

    # 4. Kernels: Triton vs reference at the decode shape, and their share of a decode step.
    result["kernels"] = kernel_rows(config, args.n_sink, args.window, reps=50 if DEVICE == "cuda" else 2)
    tri = result["kernels"][0]
    step = result["sink_window_triton"][-1]["decode_ms_median"]
    per_step = args.layers * tri["decode_step_kernel_ms_per_layer"]
    result["kernel_ms_per_decode_step"] = per_step
    result["kernel_share_of_eager_decode_step"] = per_step / step
    graph_step = result["sink_window_triton"][-1]["graph_decode_ms_median"]
    result["kernel_share_of_graph_decode_step"] = per_step / graph_step if graph_step else None
    in_graph = tri.get("decode_step_kernel_ms_per_layer_in_graph")
    if in_graph and graph_step:  # the kernel's device time, as the replayed graph runs it
        result["kernel_ms_per_graph_decode_step"] = args.layers * in_graph
        result["kernel_share_of_graph_decode_step_device_time"] = args.layers * in_graph / graph_step
    sw = result["sink_window_triton"]
    graph = [r["graph_decode_ms_median"] for r in sw if r["graph_decode_ms_median"] is not None]
    recompute = min(result["recompute_window_ms_per_token"], result["recompute_window_ms_per_token_before"])
    result["summary"] = {
        "graph_decode_ms_first_to_last": [graph[0], graph[-1]] if graph else None,
        "graph_latency_spread_over_checkpoints": (max(graph) / min(graph) - 1) if graph else None,
        "graph_speedup_over_recompute": recompute / max(graph) if graph else None,
        "eager_latency_spread_over_checkpoints": max(r["decode_ms_median"] for r in sw)
        / min(r["decode_ms_median"] for r in sw)
        - 1,
        "decode_ms_at_first_checkpoint": sw[0]["decode_ms_median"],
        "decode_ms_at_last_checkpoint": sw[-1]["decode_ms_median"],
        "latency_change_first_to_last": sw[-1]["decode_ms_median"] / sw[0]["decode_ms_median"] - 1,
        "cache_bytes_change_first_to_last": sw[-1]["cache_bytes"] / sw[0]["cache_bytes"] - 1,
        "eager_speedup_over_recompute": recompute / sw[-1]["decode_ms_median"],
        "paper_speedup_over_recompute": 22.2,
    }
    result["wall_seconds"] = time.time() - t_start
    atomic_write_json(args.output, result)
    plot(result, args.plot or str(Path(args.output).with_suffix(".png")))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
