"""GPU evaluation: the embedded model before and after EIT, AnchorPress next to kvpress's SnapKV, StreamingLLM, Knorm.

On the synthetic long-context tasks (``pressroom.evaluation.tasks``, haystacks from the *held-out* essays, default
4096 tokens) through kvpress's pipeline (``pressroom.evaluation.run.Runner``, kvpress's results layout under
``--runs-dir``), and on held-out perplexity under eviction (``pressroom.training.eit.evicted_perplexity``):

- untrained model: the full cache; ``anchor`` (AnchorPress), ``snapkv``, ``streaming_llm``, ``knorm`` at each ratio;
- model + EIT adapter (``--adapter``, the ``final/`` folder of ``pressroom-train eit train`` or of
  ``benchmarks/eit_train_smollm2.py``): AnchorPress with the adapter at ratio 0 (the adapter alone, full cache)
  and at each ratio; ``--eit-baselines`` also runs kvpress's presses on the adapted model.

``--query-modes`` (default both): ``agnostic`` is kvpress's default protocol (the press compresses the context alone,
then the question is asked: no press can know which needle will be asked for); ``aware`` is kvpress's
``query_aware`` evaluation mode (the question is appended to the context before compression, as SnapKV's paper
evaluates). The held-out perplexity does not depend on the mode and is computed once per press and ratio.

The adapted model is a separate model instance (a second ``Runner``): AnchorPress loads the adapter into the model
it is applied to. One JSON (device, versions, command, every score and perplexity, and the targets: fraction of
the full-cache score kept by EIT+AnchorPress at 0.75, and the best kvpress press at 0.75) written after each run.

    python benchmarks/eit_eval.py --adapter $OUT/eit_smollm2/final --output $OUT/eit_eval.json
    TRITON_INTERPRET=1 python benchmarks/eit_eval.py --smoke --adapter /tmp/eit_smoke/eit_smollm2/final \\
        --output /tmp/eit_smoke/eit_eval.json                                                      # CPU check
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch

KVPRESS_BASELINES = ["snapkv", "streaming_llm", "knorm"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSON results file")
    p.add_argument("--adapter", required=True, help="EIT adapter directory (adapter_config.json inside)")
    p.add_argument("--runs-dir", default=None, help="kvpress-layout run directories (default: eit_eval_runs/ beside)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default="4096", help="synthetic context length in tokens")
    p.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "passkey", "vt"])
    p.add_argument("--n-samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--baselines", nargs="+", default=KVPRESS_BASELINES)
    p.add_argument("--eit-baselines", action="store_true", help="also run kvpress's presses on the adapted model")
    p.add_argument("--query-modes", nargs="+", default=["agnostic", "aware"], choices=["agnostic", "aware"])
    p.add_argument(
        "--reuse-base",
        default=None,
        help="an earlier eit_eval JSON of the same settings: its untrained-model runs are copied, not run again",
    )
    p.add_argument("--n-recent", type=int, default=64)
    p.add_argument("--ppl-context", type=int, default=2048)
    p.add_argument("--ppl-continuation", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    p.add_argument("--allow-cpu", action="store_true", help="run the real evaluation on the CPU (slow; no timings)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.data_dir, args.n_samples, args.max_new_tokens = "tiny-llama", "512", 1, 4
        args.tasks, args.ratios, args.n_recent = ["niah_single", "passkey"], [0.5, 0.75], 8
        args.ppl_context, args.ppl_continuation, args.ppl_windows = 80, 16, 2  # kvpress SnapKV needs > 64 tokens
    elif not torch.cuda.is_available() and not args.allow_cpu:
        print("needs a CUDA GPU (or --smoke, or --allow-cpu for a slow real run on the CPU)", file=sys.stderr)
        return 2
    adapter = str(Path(args.adapter).resolve())
    if not (Path(adapter) / "adapter_config.json").is_file():
        print(f"{adapter} has no adapter_config.json: pass the final/ folder of an EIT run", file=sys.stderr)
        return 2
    import transformers

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.press_registry import make_press
    from pressroom.evaluation.run import EvalConfig, Runner
    from pressroom.presses import AnchorPress
    from pressroom.training.eit import evicted_perplexity

    out = Path(args.output)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.parent / "eit_eval_runs"
    result: dict = {
        "benchmark": "eit_eval",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else ("cpu (smoke: no timing value)" if args.smoke else "cpu"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": transformers.__version__,
        "kvpress": _version("kvpress"),
        "peft": _version("peft"),
        "args": vars(args),
        "runs": [],
    }

    def save() -> None:
        atomic_write_json(out, result, indent=1)

    save()
    anchor = f"anchor:n_recent={args.n_recent}"
    anchor_eit = f"anchor:adapter={adapter},n_recent={args.n_recent}"
    base_grid = [("no_press", 0.0)] + [(spec, r) for spec in [anchor, *args.baselines] for r in args.ratios]
    # the first EIT run loads the adapter into the second Runner's model, where it stays for the later runs
    eit_grid = [(anchor_eit, 0.0)] + [(anchor_eit, r) for r in args.ratios]
    if args.eit_baselines:
        eit_grid += [(f"{spec}", r) for spec in args.baselines for r in args.ratios]

    grids = [("base", base_grid), ("eit", eit_grid)]
    if args.reuse_base:
        # the untrained model's runs do not depend on the adapter: take them from an earlier run of the same settings
        same = ("model", "data_dir", "tasks", "n_samples", "max_new_tokens", "ratios", "baselines", "n_recent")
        same += ("ppl_context", "ppl_continuation", "ppl_windows")
        prev = json.loads(Path(args.reuse_base).read_text())
        diff = {k: (prev["args"].get(k), getattr(args, k)) for k in same if prev["args"].get(k) != getattr(args, k)}
        if diff:
            print(f"--reuse-base {args.reuse_base} was run with other settings {diff}", file=sys.stderr)
            return 2
        modes = set(args.query_modes)
        reused = [r for r in prev["runs"] if r["model"] == "base" and r.get("query_mode", "agnostic") in modes]
        have = {(r.get("query_mode", "agnostic"), r["spec"], r["ratio"]) for r in reused}
        missing = [(m, spec, r) for m in args.query_modes for spec, r in base_grid if (m, spec, r) not in have]
        if missing:
            print(f"--reuse-base {args.reuse_base} lacks the base runs {missing}", file=sys.stderr)
            return 2
        result["runs"] += [{**r, "query_mode": r.get("query_mode", "agnostic"), "reused": True} for r in reused]
        result["base_runs_from"] = {"file": args.reuse_base, "command": prev["command"], "device": prev["device"]}
        grids = [("eit", eit_grid)]
    for model_kind, grid in grids:
        runner = Runner(progress=False)
        ids = None
        ppl_done: dict[tuple[str, float], dict] = {}
        for mode, (spec, ratio) in [(m, g) for m in args.query_modes for g in grid]:
            t0 = time.perf_counter()
            cfg = EvalConfig(
                query_aware=mode == "aware",
                dataset="synthetic",
                data_dir=args.data_dir,
                model=args.model,
                press_name=spec,
                compression_ratio=ratio,
                tasks=args.tasks,
                n_samples=args.n_samples,
                max_new_tokens=args.max_new_tokens,
                output_dir=str(runs_dir / model_kind),
            )
            pipe = runner.pipeline(cfg.model, cfg.device, cfg.dtype, False)
            press = make_press(spec, ratio)
            if isinstance(press, AnchorPress) and press.tokenizer is None:
                press.tokenizer = pipe.tokenizer  # separators and special tokens from the pipeline's tokenizer
            run_dir = runner.run(cfg, press=press)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            stats = json.loads((run_dir / "stats.json").read_text())
            scores = {task: m["string_match"] for task, m in metrics.items()}
            if ids is None:
                ids = corpus_tokens(pipe.tokenizer, "pg_essays", "heldout")
            if (spec, ratio) not in ppl_done:
                ppl_done[spec, ratio] = evicted_perplexity(
                    pipe.model, ids, press, args.ppl_context, args.ppl_continuation, max_windows=args.ppl_windows
                )
            ppl = ppl_done[spec, ratio]
            entry = {
                "model": model_kind,
                "query_mode": mode,
                "press": spec.split(":")[0] if not spec.startswith("anchor") else "anchor",
                "spec": spec,
                "ratio": ratio,
                "scores": scores,
                "average": sum(scores.values()) / max(1, len(scores)),
                "heldout_evicted_ppl": ppl["perplexity"],
                "ppl_kv_tokens": ppl["kv_tokens"],
                "kv_bytes": stats["kv_bytes"],
                "kv_bytes_full": stats["kv_bytes_full"],
                "prefill_seconds": stats["prefill_seconds"],
                "decode_seconds_per_token": stats["decode_seconds_per_token"],
                "run_dir": str(run_dir),
                "wall_seconds": time.perf_counter() - t0,
            }
            result["runs"].append(entry)
            save()
            print(
                f"{model_kind:4s} {mode:8s} {entry['press']:14s} {ratio:.2f}  score {entry['average']:6.2f}  "
                f"ppl {entry['heldout_evicted_ppl']:8.3f}  ({entry['wall_seconds']:.1f} s)",
                flush=True,
            )
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    targets: dict = {}
    for mode in args.query_modes:
        runs = [r for r in result["runs"] if r["query_mode"] == mode]
        full = next(r for r in runs if r["model"] == "base" and r["press"] == "no_press")
        t: dict = {"full_cache_average": full["average"], "full_cache_ppl": full["heldout_evicted_ppl"]}
        for ratio in args.ratios:

            def find(kind: str, ratio: float = ratio, runs: list = runs) -> dict | None:
                return next(
                    (r for r in runs if r["model"] == kind and r["press"] == "anchor" and r["ratio"] == ratio), None
                )

            eit_r, base_r = find("eit"), find("base")
            kv = [r for r in runs if r["model"] == "base" and r["press"] in args.baselines and r["ratio"] == ratio]
            best = max(kv, key=lambda r: r["average"]) if kv else None
            t[f"{ratio:.2f}"] = {
                "eit_anchor_average": eit_r and eit_r["average"],
                "eit_anchor_fraction_of_full": eit_r
                and (eit_r["average"] / full["average"] if full["average"] else None),
                "untrained_anchor_average": base_r and base_r["average"],
                "best_kvpress": best and {"press": best["press"], "average": best["average"]},
                "eit_beats_every_kvpress": bool(eit_r and kv and all(eit_r["average"] > r["average"] for r in kv)),
                "eit_anchor_ppl": eit_r and eit_r["heldout_evicted_ppl"],
                "untrained_anchor_ppl": base_r and base_r["heldout_evicted_ppl"],
            }
        targets[f"query_{mode}"] = t
    result["targets"] = targets
    save()
    print(json.dumps(targets, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
