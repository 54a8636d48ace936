"""GPU benchmark: eviction-invariant training (EIT) of the embedded SmolLM2-135M-Instruct within a time budget.

1. Held-out perplexity under eviction *before* training: essays of the held-out split cut into windows of
   ``ppl_context + ppl_continuation`` tokens; the context is prefilled under AnchorPress (or the full cache) in
   kvpress's way, the continuation scored over the compressed cache
   (:func:`pressroom.training.eit.evicted_perplexity`).
2. Calibration: a few training steps at the final keep ratio (this also compiles the flex_attention kernels) give
   the seconds per step, hence the number of steps that fit in ``--budget-seconds``.
3. Training (``pressroom.training.eit.train``; the essays' *train* split only): curriculum keep ratio
   ``keep_start -> keep_end``, LoRA r=64 on q/k/v/o, CE + lambda*KL against the full-KV teacher. The adapter goes to
   ``--adapter-dir`` (default: ``eit_smollm2/`` next to ``--output``, i.e. under ``$OUT``), ``final/`` and
   ``best/`` in it (``best/``: the lowest validation perplexity at keep ratio 0.25 on train-split sequences kept
   aside; it is the adapter evaluated and exported).
4. The same held-out perplexities *after* training, with a fresh model and ``AnchorPress(adapter=.../best)``, and
   the adapter with the full cache (no eviction).

Records tokens/s, peak GPU memory, the loss curve and the perplexities in one JSON, written after each phase.

    python benchmarks/eit_train_smollm2.py --output $OUT/eit_train_smollm2.json            # adapter: $OUT/eit_smollm2
    TRITON_INTERPRET=1 python benchmarks/eit_train_smollm2.py --smoke --output /tmp/eit_train_smoke.json   # CPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def evicted_ppls(model_name: str, ratios: list[float], args, adapter: str | None, smoke: bool) -> dict:
    """Held-out perplexity under AnchorPress at each ratio (+ the full cache), with or without the adapter."""
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import load_model
    from pressroom.presses import AnchorPress
    from pressroom.training.eit import evicted_perplexity

    model, tokenizer = load_model(model_name)
    ids = corpus_tokens(tokenizer, "pg_essays", "heldout")
    out: dict = {}
    # the adapter is loaded by the first press that names it, and stays in this model instance
    configs = [("full_cache", None)] if adapter is None else [("adapter_full_cache", 0.0)]
    configs += [(f"anchor_{r:.2f}", r) for r in ratios]
    for name, ratio in configs:
        press = None
        if ratio is not None:
            press = AnchorPress(compression_ratio=ratio, n_recent=args.n_recent, tokenizer=tokenizer, adapter=adapter)
        t0 = time.perf_counter()
        res = evicted_perplexity(
            model, ids, press, args.ppl_context, args.ppl_continuation, max_windows=args.ppl_windows, progress=False
        )
        res["seconds"] = time.perf_counter() - t0
        out[name] = res
        print(f"  {name}: ppl {res['perplexity']:.3f} (kv tokens {res['kv_tokens']:.0f})", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def export_adapter(final: Path, dest: Path) -> dict:
    """Copy the adapter's config and its weights cast to bf16 (small enough to come back from a GPU job)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(final / "adapter_config.json", dest / "adapter_config.json")
    weights = {
        k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(final / "adapter_model.safetensors")).items()
    }
    save_file(weights, str(dest / "adapter_model.safetensors"))
    return {"path": str(dest), "bytes": (dest / "adapter_model.safetensors").stat().st_size, "dtype": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSON results file")
    p.add_argument("--adapter-dir", default=None, help="where training writes (default: eit_smollm2/ beside --output)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budget-seconds", type=float, default=150.0, help="training time (steps calibrated to fit)")
    p.add_argument("--max-steps", type=int, default=None, help="fix the step count instead of calibrating")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lambda-kl", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--keep-schedule", default="curriculum")
    p.add_argument("--keep-start", type=float, default=0.9)
    p.add_argument("--keep-end", type=float, default=0.2)
    p.add_argument("--n-recent", type=int, default=64)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--ppl-context", type=int, default=2048)
    p.add_argument("--ppl-continuation", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=12)
    p.add_argument(
        "--export-adapter",
        default=None,
        help="also write adapter_config.json + the adapter weights in bf16 (2 small files) to this directory",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_len, args.continuation, args.batch_size = "tiny-llama", 64, 16, 1
        args.ppl_context, args.ppl_continuation, args.ppl_windows, args.n_recent = 48, 16, 2, 8
        args.budget_seconds, args.lora_r = 20.0, 8
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    import transformers

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.training.eit import EITConfig, train

    out = Path(args.output)
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else out.parent / "eit_smollm2"
    result: dict = {
        "benchmark": "eit_train_smollm2",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke: no timing value)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "args": vars(args),
        "phases": {},
    }

    def save() -> None:
        atomic_write_json(out, result, indent=1)

    save()
    t0 = time.perf_counter()
    print("held-out perplexity under eviction, before EIT", flush=True)
    result["phases"]["ppl_before"] = evicted_ppls(args.model, args.ratios, args, None, args.smoke)
    result["phases"]["ppl_before"]["wall_seconds"] = time.perf_counter() - t0
    save()

    common = dict(
        model=args.model,
        seq_len=args.seq_len,
        continuation=args.continuation,
        batch_size=args.batch_size,
        lr=args.lr,
        lambda_kl=args.lambda_kl,
        lora_r=args.lora_r,
        n_recent=args.n_recent,
        keep_start=args.keep_start,
        keep_end=args.keep_end,
        warmup_steps=10,
    )
    steps = args.max_steps
    if steps is None:
        t0 = time.perf_counter()
        calib_dir = adapter_dir.parent / ".eit_calibration"
        shutil.rmtree(calib_dir, ignore_errors=True)
        n_calib = 6
        calib = EITConfig(
            **{**common, "keep_start": args.keep_end},
            output=str(calib_dir),
            max_steps=n_calib,
            keep_schedule="fixed",
            save_every=10**6,
            eval_every=n_calib,  # also compiles the validation (no-grad) path
        )
        train(calib, progress=False)
        log = json.loads((calib_dir / "train_log.json").read_text())
        step_s = statistics.median(h["seconds"] for h in log["history"][2:])
        steps = max(10, int(args.budget_seconds / step_s))
        result["phases"]["calibration"] = {
            "steps": n_calib,
            "seconds_per_step": step_s,
            "wall_seconds": time.perf_counter() - t0,
            "history": log["history"],
        }
        shutil.rmtree(calib_dir, ignore_errors=True)
        save()
        print(f"calibration: {step_s:.3f} s/step -> {steps} steps", flush=True)

    t0 = time.perf_counter()
    shutil.rmtree(adapter_dir, ignore_errors=True)
    cfg = EITConfig(
        **common,
        output=str(adapter_dir),
        max_steps=steps,
        keep_schedule=args.keep_schedule,
        save_every=max(1, steps // 2),
        eval_every=max(1, steps // 10),
        max_seconds=args.budget_seconds * 1.25,
    )
    final = train(cfg, progress=False)
    log = json.loads((adapter_dir / "train_log.json").read_text())
    # the adapter evaluated and exported: best/ (lowest validation perplexity at the fixed selection keep ratio, on
    # train-split sequences kept aside), final/ when there is none
    chosen = adapter_dir / "best" if (adapter_dir / "best" / "adapter_config.json").is_file() else Path(final)
    result["phases"]["training"] = {
        "steps": log["step"],
        "planned_steps": steps,
        "stopped_by_time": log.get("stopped_by_time"),
        "tokens": log["tokens"],
        "train_seconds": log["train_seconds"],
        "tokens_per_second": log["tokens_per_second"],
        "peak_memory_bytes": log["peak_memory_bytes"],
        "wall_seconds": time.perf_counter() - t0,
        "loss_curve": [{k: h[k] for k in ("step", "keep_ratio", "loss", "ce", "kl")} for h in log["history"]],
        "validation": log["val"],
        "best": log.get("best"),
        "adapter": str(chosen),
        "final_adapter": str(final),
        "config": log["config"],
    }
    save()
    print(
        f"trained {log['step']} steps, {log['tokens_per_second']:.0f} tokens/s, "
        f"peak {(log['peak_memory_bytes'] or 0) / 2**30:.1f} GiB -> {chosen} (best: {log.get('best')})",
        flush=True,
    )

    if args.export_adapter:
        result["phases"]["training"]["exported_adapter"] = export_adapter(chosen, Path(args.export_adapter))
        save()

    t0 = time.perf_counter()
    print("held-out perplexity under eviction, after EIT", flush=True)
    result["phases"]["ppl_after"] = evicted_ppls(args.model, args.ratios, args, str(chosen), args.smoke)
    result["phases"]["ppl_after"]["wall_seconds"] = time.perf_counter() - t0
    before, after = result["phases"]["ppl_before"], result["phases"]["ppl_after"]
    result["summary"] = {
        name: {"before": before[name]["perplexity"], "after": after[name]["perplexity"]}
        for name in before
        if name in after and isinstance(before[name], dict)
    }
    result["summary"]["full_cache"] = {
        "before": before["full_cache"]["perplexity"],
        "after_adapter": after["adapter_full_cache"]["perplexity"],
    }
    save()
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
