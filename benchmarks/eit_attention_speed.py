"""GPU benchmark: the EIT student's keep-mask attention (flex_attention) vs SDPA with a dense 4D mask.

Eviction-invariant training runs the student under a KV-keep mask (``pressroom.kernels.keep_attention``): query
``i`` sees key ``j`` iff ``j <= i and (keep[j] or i < split)``. At 8k tokens and keep ratio 0.3, 8B-shaped
attention (32 query / 8 KV heads, head_dim 128, bf16, batch 1), in one run:

- ``sdpa_dense_bool`` / ``sdpa_dense_additive``: the baseline, ``F.scaled_dot_product_attention`` with the
  materialised ``[1, 1, L, L]`` mask (bool, and additive bf16 as transformers builds it);
- ``flex_compact`` (ours, what training uses): causal SDPA (flash) for the prefill queries, compiled flex_attention
  over the kept keys gathered into a compacted KV for the others;
- ``flex_masked``: one compiled flex_attention over all keys with the keep mask as ``mask_mod``;
- ``sdpa_causal``: full causal attention with no eviction (flash; the teacher's cost), for scale.

Each is timed forward and forward+backward (training), for ``split = 0`` (the plain keep mask: every query sees only
kept keys) and ``split = 0.75 L`` (training's prefill + continuation layout); outputs are checked against the
dense-mask SDPA. The building of the block masks (once per training step, shared by all layers) is timed apart.
A last phase times the Triton KV-compaction kernel of AnchorPress against ``torch.gather``. Partial JSON is written
after each phase.

    python benchmarks/eit_attention_speed.py --output $OUT/eit_attention_speed.json
    TRITON_INTERPRET=1 python benchmarks/eit_attention_speed.py --smoke --output /tmp/eit_speed_smoke.json  # CPU
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import call_ms

DEVICE = "cuda"


def timed_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds per call (CUDA events on the GPU, wall clock on the CPU)."""
    return statistics.median(call_ms(fn, reps, warmup, cuda=DEVICE == "cuda"))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write(path: Path, result: dict) -> None:
    from pressroom.evaluation.atomic import atomic_write_json

    atomic_write_json(path, result, indent=1)


def attention_phase(cfg: dict, split_frac: float, reps: int, keep_ratio: float) -> dict:
    from pressroom.kernels.keep_attention import KeepMask, keep_attention_flex

    batch, hq, hkv, seq_len, dim = cfg["batch"], cfg["q_heads"], cfg["kv_heads"], cfg["seq_len"], cfg["head_dim"]
    dtype = cfg["dtype"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, hq, seq_len, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq_len, dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq_len, dim, generator=gen).to(DEVICE, dtype)
    split = int(split_frac * seq_len)
    keep = torch.rand(batch, seq_len, generator=gen) < keep_ratio
    keep[:, :4] = True  # sinks: every query sees a key
    keep[:, split:] = True if split > 0 else keep[:, split:]
    keep = keep.to(DEVICE)
    kept_frac = float(keep[:, : split or seq_len].float().mean())
    k_gqa, v_gqa = k, v
    groups = hq // hkv
    mask_holder = {}

    def build_masks():
        m = KeepMask(keep, split)
        m.block_mask(True)
        m.block_mask(False)
        mask_holder["m"] = m

    build_ms = timed_ms(build_masks, reps=max(3, reps // 4), warmup=2)
    mask = mask_holder["m"]
    dense_bool = mask.dense()
    dense_add = torch.zeros(dense_bool.shape, dtype=dtype, device=DEVICE).masked_fill(~dense_bool, float("-inf"))

    def sdpa_dense(m):
        # K/V are passed already expanded to the query heads (what transformers' SDPA path does with a mask, and
        # what lets SDPA use its memory-efficient kernel); the expansion itself is not timed
        return lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m)

    variants = {
        "sdpa_dense_bool": sdpa_dense(dense_bool),
        "sdpa_dense_additive": sdpa_dense(dense_add),
        "flex_compact": lambda q_, k_, v_: keep_attention_flex(q_, k_, v_, mask, compact=True),
        "flex_masked": lambda q_, k_, v_: keep_attention_flex(q_, k_, v_, mask, compact=False),
        "sdpa_causal": lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=True, enable_gqa=groups > 1
        ),
    }
    out: dict = {
        "split": split,
        "keep_ratio": keep_ratio,
        "kept_fraction_measured": kept_frac,
        "mask_build_ms": build_ms,
    }
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with torch.no_grad():
        ref = variants["sdpa_dense_bool"](q, k_rep, v_rep).float()
    for name, fn in variants.items():
        entry: dict = {}
        k, v = (k_rep, v_rep) if name.startswith("sdpa_dense") else (k_gqa, v_gqa)
        try:
            with torch.no_grad():
                got = fn(q, k, v).float()
                if name != "sdpa_causal":
                    entry["max_abs_diff_vs_dense"] = float((got - ref).abs().max())
                entry["forward_ms"] = timed_ms(lambda fn=fn, k=k, v=v: fn(q, k, v), reps)
            if DEVICE == "cpu" and name.startswith("flex"):
                entry["forward_backward_ms"] = None  # flex_attention has no CPU backward (training uses the reference)
                out[name] = entry
                continue
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            grad = torch.randn_like(qg)

            def fwd_bwd(fn=fn, qg=qg, kg=kg, vg=vg, grad=grad):
                o = fn(qg, kg, vg)
                o.backward(grad)
                qg.grad = kg.grad = vg.grad = None

            entry["forward_backward_ms"] = timed_ms(fwd_bwd, reps)
        except Exception as err:  # record the failure of one variant (e.g. a memory limit), keep the others
            entry["error"] = f"{type(err).__name__}: {err}"[:500]
        out[name] = entry
    base = out["sdpa_dense_bool"]
    for name in ("flex_compact", "flex_masked", "sdpa_causal"):
        for kind in ("forward_ms", "forward_backward_ms"):
            if base.get(kind) and out[name].get(kind):
                out[name][f"speedup_{kind[:-3]}_vs_sdpa_dense_bool"] = base[kind] / out[name][kind]
    return out


def compaction_phase(reps: int, smoke: bool) -> dict:
    from pressroom.kernels.kv_compact import kv_compact, kv_compact_reference

    batch, heads, seq_len, dim = (1, 2, 64, 16) if smoke else (1, 8, 32768, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    keys = torch.randn(batch, heads, seq_len, dim, device=DEVICE, dtype=dtype)
    values = torch.randn_like(keys)
    n_kept = seq_len // 4
    idx = torch.rand(batch, heads, seq_len, device=DEVICE).topk(n_kept, dim=-1).indices.sort(-1).values
    k1, v1 = kv_compact(keys, values, idx, use_triton=True)
    k2, v2 = kv_compact_reference(keys, values, idx)
    equal = bool(torch.equal(k1, k2) and torch.equal(v1, v2))
    tri = timed_ms(lambda: kv_compact(keys, values, idx, use_triton=True, validate=False), reps)
    ref = timed_ms(lambda: kv_compact_reference(keys, values, idx, validate=False), reps)
    moved = 2 * 2 * batch * heads * n_kept * dim * keys.element_size()  # read + write, keys and values
    return {
        "shape": [batch, heads, seq_len, dim],
        "n_kept": n_kept,
        "dtype": str(dtype),
        "equal_to_reference": equal,
        "triton_ms": tri,
        "torch_gather_ms": ref,
        "speedup": ref / tri,
        "triton_GBps": moved / tri / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager flex: checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        DEVICE = "cpu"
        cfg = dict(batch=1, q_heads=4, kv_heads=2, seq_len=64, head_dim=16, dtype=torch.float32)
        reps = 2
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        cfg = dict(batch=1, q_heads=32, kv_heads=8, seq_len=args.seq_len, head_dim=128, dtype=torch.bfloat16)
        reps = args.reps
    out = Path(args.output)
    import transformers
    import triton  # noqa: F401  (version below)

    result: dict = {
        "benchmark": "eit_attention_speed",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke: no timing value)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": transformers.__version__,
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
        "keep_ratio": args.keep_ratio,
        "phases": {},
    }
    write(out, result)
    for split_frac in (0.0, 0.75):
        t0 = time.perf_counter()
        result["phases"][f"split_{split_frac}"] = attention_phase(cfg, split_frac, reps, args.keep_ratio)
        result["phases"][f"split_{split_frac}"]["wall_seconds"] = time.perf_counter() - t0
        write(out, result)
        print(json.dumps({f"split_{split_frac}": result["phases"][f"split_{split_frac}"]}, indent=1), flush=True)
    result["phases"]["kv_compact"] = compaction_phase(reps, args.smoke)
    write(out, result)
    print(json.dumps({"kv_compact": result["phases"]["kv_compact"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
