"""``pressroom-eval``: evaluate presses on the embedded model (or any model), compute perplexity, compare runs.

With no arguments it runs the main job: the embedded SmolLM2 on a small synthetic long-context benchmark
(a few tasks x a few samples at about 2k tokens) with the default press set, then prints the comparison table
and writes it, with a plot, under ``./results/``.

Subcommands: ``run``, ``ppl``, ``compare``, ``tasks``; for clusters ``plan``, ``run-task``, ``status``, ``aggregate``
(:mod:`pressroom.evaluation.manifest_cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_TASKS = ["niah_single", "niah_multikey", "vt", "passkey"]
DEFAULT_KVPRESS_PRESSES = ["streaming_llm", "snapkv", "knorm"]
DEFAULT_RATIO = 0.5
DEMO_SAMPLES = 2
DEMO_LENGTH = "2048"
DEMO_MAX_NEW_TOKENS = 32  # enough for every demo answer (string match), keeps the CPU demo within 10 minutes


def default_presses() -> list[str]:
    """The main job's press set: kvpress's StreamingLLM, SnapKV and Knorm, then every pressroom press that needs no
    trained artifact (``requires_artifacts``, e.g. CommVQ's codebooks, must be asked for by name)."""
    from pressroom.presses import PRESSES

    ours = sorted(name for name, cls in PRESSES.items() if not getattr(cls, "requires_artifacts", False))
    return DEFAULT_KVPRESS_PRESSES + ours


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny-llama/qwen3/mistral, a Hub id or dir")
    p.add_argument("--press", nargs="+", default=None, help="press specs, e.g. snapkv 'sink_window:window=512'")
    p.add_argument("--ratio", nargs="+", type=float, default=[DEFAULT_RATIO], help="compression ratios")
    p.add_argument("--dataset", default="synthetic", help="synthetic, or a kvpress Hub dataset (ruler, ...)")
    p.add_argument("--data-dir", default=None, help="synthetic: context length in tokens (2048); Hub: data_dir")
    p.add_argument("--tasks", nargs="+", default=None, help="synthetic tasks (default: all)")
    p.add_argument("--n-samples", type=int, default=2, help="synthetic samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-context-length", type=int, default=None)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--query-aware", action="store_true", help="kvpress's query_aware: compress context + question")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--output-dir", default="./results")
    p.add_argument("--no-baseline", action="store_true", help="do not add the no_press baseline run")


def _run_grid(args: argparse.Namespace) -> Path:
    from pressroom.evaluation.compare import compare
    from pressroom.evaluation.run import EvalConfig, Runner, press_grid

    presses = args.press if args.press is not None else default_presses()
    grid = press_grid(presses, args.ratio, baseline=not args.no_baseline)
    runner = Runner()
    configs = [
        EvalConfig(
            dataset=args.dataset,
            data_dir=args.data_dir,
            model=args.model,
            press_name=press,
            compression_ratio=ratio,
            tasks=args.tasks,
            n_samples=args.n_samples,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            max_context_length=args.max_context_length,
            fraction=args.fraction,
            query_aware=args.query_aware,
            device=args.device,
            dtype=args.dtype,
            output_dir=args.output_dir,
        )
        for press, ratio in grid
    ]
    from tqdm.auto import tqdm

    dirs = [runner.run(cfg) for cfg in tqdm(configs, desc="runs")]
    print()
    compare(dirs, output_dir=args.output_dir)
    return Path(args.output_dir)


def cmd_run(args: argparse.Namespace) -> int:
    _run_grid(args)
    return 0


def cmd_main_job(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ns = argparse.Namespace(
        model="smollm2",
        press=None,
        ratio=[DEFAULT_RATIO],
        dataset="synthetic",
        data_dir=DEMO_LENGTH,
        tasks=DEFAULT_TASKS,
        n_samples=DEMO_SAMPLES,
        seed=0,
        max_new_tokens=DEMO_MAX_NEW_TOKENS,
        max_context_length=None,
        fraction=1.0,
        query_aware=False,
        device=None,
        dtype=None,
        output_dir=args.output_dir,
        no_baseline=False,
    )
    print(
        f"pressroom-eval: SmolLM2-135M-Instruct, {len(DEFAULT_TASKS)} synthetic tasks x {DEMO_SAMPLES} samples"
        f" at {DEMO_LENGTH} tokens,"
        f" presses: no_press + {', '.join(default_presses())} at {DEFAULT_RATIO}"
    )
    out = _run_grid(ns)
    print(f"\nResults and plots under {out.resolve()} ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from pressroom.evaluation.perplexity import run_perplexity
    from pressroom.evaluation.press_registry import make_press, press_label

    press = make_press(args.press, args.ratio)
    label = press_label(args.press)
    output = args.output or str(
        Path(args.output_dir) / f"ppl__{args.corpus}__{args.split}__{args.model.replace('/', '--')}__{label}__"
        f"{args.ratio:.2f}__{args.mode}__{args.max_tokens}.json"
    )
    result = run_perplexity(
        model_name=args.model,
        press=press,
        corpus=args.corpus,
        split=args.split,
        max_tokens=args.max_tokens,
        mode=args.mode,
        chunk_size=args.chunk_size,
        output=output,
        device=args.device,
        dtype=args.dtype,
        press_name=label,
        compression_ratio=args.ratio,
    )
    print(
        f"perplexity {result.perplexity:.3f} over {result.tokens} tokens, {result.tokens_per_second:.1f} tok/s, "
        f"KV bytes held {result.kv_bytes} -> {output}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pressroom.evaluation.compare import run_from_args

    run_from_args(args, " ".join(["pressroom-eval", *args.argv]))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from pressroom.evaluation.models import load_model, smollm2_tokenizer
    from pressroom.evaluation.tasks import generate_tasks, write_tasks

    tokenizer = smollm2_tokenizer() if args.model == "smollm2" else load_model(args.model)[1]
    df = generate_tasks(
        tokenizer,
        tasks=args.tasks,
        context_length=args.length,
        n_samples=args.n_samples,
        depth=args.depth,
        seed=args.seed,
    )
    write_tasks(df, args.output)
    print(f"wrote {len(df)} rows ({df['task'].nunique()} tasks) to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pressroom-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="./results", help="main job: where results go")
    sub = parser.add_subparsers(dest="command")

    p_run = sub.add_parser("run", help="evaluate presses x ratios on a dataset (kvpress's results layout)")
    _add_run_args(p_run)
    p_run.set_defaults(func=cmd_run)

    p_ppl = sub.add_parser("ppl", help="streaming perplexity over a long text with a press")
    p_ppl.add_argument("--model", default="smollm2")
    p_ppl.add_argument("--press", default="no_press")
    p_ppl.add_argument("--ratio", type=float, default=0.0)
    p_ppl.add_argument("--corpus", default="pg_essays")
    p_ppl.add_argument("--split", default="heldout")
    p_ppl.add_argument("--max-tokens", type=int, default=2048)
    p_ppl.add_argument("--mode", choices=["streaming", "chunked"], default="streaming")
    p_ppl.add_argument("--chunk-size", type=int, default=512)
    p_ppl.add_argument("--device", default=None)
    p_ppl.add_argument("--dtype", default=None)
    p_ppl.add_argument("--output", default=None, help="JSON path (default: under --output-dir)")
    p_ppl.add_argument("--output-dir", default="./results")
    p_ppl.set_defaults(func=cmd_ppl)

    p_cmp = sub.add_parser(
        "compare",
        help="one table (markdown + CSV) and plots from result directories; --paired: the gap of two runs on the "
        "same questions, with a paired bootstrap interval",
    )
    from pressroom.evaluation.compare_options import add_arguments

    add_arguments(p_cmp)
    p_cmp.set_defaults(func=cmd_compare)

    p_tasks = sub.add_parser("tasks", help="write generated synthetic tasks to a file (.jsonl, .csv, .parquet)")
    p_tasks.add_argument("output")
    p_tasks.add_argument("--model", default="smollm2", help="whose tokenizer measures the length")
    p_tasks.add_argument("--tasks", nargs="+", default=None)
    p_tasks.add_argument("--length", type=int, default=2048)
    p_tasks.add_argument("--n-samples", type=int, default=1)
    p_tasks.add_argument("--depth", type=float, default=None)
    p_tasks.add_argument("--seed", type=int, default=0)
    p_tasks.set_defaults(func=cmd_tasks)

    from pressroom.evaluation.manifest_cli import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    func = getattr(args, "func", cmd_main_job)
    try:
        return func(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        print(f"pressroom-eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
