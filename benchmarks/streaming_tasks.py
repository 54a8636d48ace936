"""Synthetic long-context tasks: SinkWindowPress next to kvpress's StreamingLLM presses at several ratios.

Runs the evaluation harness (kvpress's pipeline, kvpress's results layout under --results-dir) for no_press and,
at each ratio, ``sink_window`` (ours), kvpress's ``StreamingLLMPress`` and ``KeyRerotationPress(StreamingLLMPress)``,
then writes the comparison as a small JSON (+ PNG) with the device, versions and command line.

    python benchmarks/streaming_tasks.py --length 2048 --n-samples 2 --output benchmarks/results/streaming_tasks.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PRESSES = ["sink_window:n_sink=4", "streaming_llm", "key_rerotation_streaming_llm"]
TASKS = ["niah_single", "niah_multikey", "niah_multiquery", "passkey"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", default="2048")
    p.add_argument("--n-samples", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--results-dir", default="results/streaming_tasks")
    p.add_argument("--output", default="benchmarks/results/streaming_tasks.json")
    args = p.parse_args(argv)
    import transformers

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.evaluation.compare import load_results, plot_scores, summary_table, to_markdown
    from pressroom.evaluation.run import EvalConfig, Runner, press_grid

    runner = Runner()
    grid = press_grid(PRESSES, args.ratios)
    started = time.time()
    dirs = []
    for press, ratio in grid:
        cfg = EvalConfig(
            model=args.model,
            data_dir=args.length,
            press_name=press,
            compression_ratio=ratio,
            tasks=args.tasks,
            n_samples=args.n_samples,
            max_new_tokens=args.max_new_tokens,
            output_dir=args.results_dir,
        )
        dirs.append(runner.run(cfg))
        print(f"{press}@{ratio:.2f} done ({time.time() - started:.0f} s)", flush=True)
    df = load_results(dirs)
    table = summary_table(df)
    print(to_markdown(table))
    out = Path(args.output)
    plot_scores(df, out.with_suffix(".png"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {
        "benchmark": "streaming_tasks",
        "command": " ".join(["benchmarks/streaming_tasks.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "context_tokens": int(args.length),
        "n_samples": args.n_samples,
        "tasks": args.tasks,
        "wall_seconds": time.time() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": json.loads(table.to_json(orient="records")),
    }
    atomic_write_json(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
