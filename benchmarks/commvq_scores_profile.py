"""Nsight Compute counters of the CommVQ decode scores kernel at 128k tokens (Llama-3.1-8B shape, one layer).

The scores kernel is most of the decode time (0.66 of 1.07 ms at 1 bit on an H200,
``benchmarks/results/commvq_decode_key_math.json``), and varying its tiling moved it little. Timing alone cannot tell
whether it waits on the table gathers' L1 misses (the per-head table is 180 KB at R=11, 344 KB at R=21), on the
dependent code-byte load each residual step starts with, or on issue slots. This script runs ``ncu`` (``--clock-control
none``, as the device notes ask) on one launch of ``_decode_scores_kernel`` per variant (the default tiling, small
token blocks, the unrolled residual loop) and keeps, per variant, the duration, achieved occupancy, registers, L1 and
L2 hit rates, the issue-slot and memory throughput figures and the top warp stall reasons, in one JSON.

    python benchmarks/commvq_scores_profile.py --output $OUT/commvq_scores_profile.json            # needs ncu
    python benchmarks/commvq_scores_profile.py --child --bits 1 --variant default                    # what ncu runs

Where ``ncu`` cannot read the counters (gVisor hosts), the JSON records its error instead of figures.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# decode_attention keyword arguments of each profiled variant (all two-pass; the first is the default)
VARIANTS = {
    "default": {},
    "window_shared": dict(window_launch="shared"),
    "bt32_w8": dict(block_t=32, num_warps=8),
    "bt16_w4": dict(block_t=16, num_warps=4),
    "bt8_w2": dict(block_t=8, num_warps=2),
    "bt8_w2_unroll": dict(block_t=8, num_warps=2, key_unroll=True),
    "bt8_w1_unroll": dict(block_t=8, num_warps=1, key_unroll=True),
    # the shared-memory carveout (scores_carveout, percent of 228 KB; the default "auto": 37% at this tiling): None
    # is the driver's choice, 0 leaves the most L1 for the table gathers
    "carveout_driver": dict(scores_carveout=None),
    "carveout0": dict(scores_carveout=0),
    "carveout45": dict(scores_carveout=45),
    "carveout100": dict(scores_carveout=100),
    "bt32_w4_carveout0": dict(block_t=32, num_warps=4, scores_carveout=0),
}
RESIDUALS = {1: 11, 2: 21}
# warp stall reasons, in warps per issued instruction (the run is retried without them where ncu rejects the regex)
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_METRICS = f"regex:^{STALL_PREFIX}.*_per_issue_active\\.ratio$"
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis", "WarpStateStats", "SchedulerStats")
# (section, metric name) pairs kept in the JSON; every metric is also in the raw CSV next to it when --keep-csv
KEEP = (
    "Duration",
    "Registers Per Thread",
    "Achieved Occupancy",
    "Theoretical Occupancy",
    "Block Limit Registers",
    "Block Limit Shared Mem",
    "Shared Memory Configuration Size",
    "Dynamic Shared Memory Per Block",
    "L1/TEX Hit Rate",
    "L2 Hit Rate",
    "Memory Throughput",
    "Compute (SM) Throughput",
    "L1/TEX Cache Throughput",
    "L2 Cache Throughput",
    "DRAM Throughput",
    "Issue Slots Busy",
    "Issued Warp Per Scheduler",
    "No Eligible",
    "Active Warps Per Scheduler",
    "Eligible Warps Per Scheduler",
    "Warp Cycles Per Issued Instruction",
)


def child(bits: int, variant: str, tokens: int, launches: int) -> None:
    """Build the layer and call decode_attention ``launches`` times (ncu profiles the last call's code launch)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from commvq_decode import HQ, make_layer

    from pressroom.kernels.commvq_attention import decode_attention

    kv, books, _, _ = make_layer(tokens, bits, RESIDUALS[bits], torch.device("cuda"))
    q = torch.randn(1, HQ, kv.wkeys.shape[-1], device="cuda")
    for _ in range(launches):
        decode_attention(q, kv, books, 0.088, use_triton=True, **VARIANTS[variant])
    torch.cuda.synchronize()


def find_ncu(name: str) -> str:
    """The path of the ``ncu`` executable ``name``, or ``SystemExit`` saying how to point to it."""
    ncu = shutil.which(name)
    if ncu is None:
        raise SystemExit(f"{name!r} is not on the PATH: this script needs Nsight Compute (set --ncu or NCU)")
    return ncu


def parse_ncu_csv(text: str) -> dict:
    """``{metric name: value}`` (value as float where it parses, with the unit kept in ``units``) of the kept metrics
    and the warp stall breakdown from ``ncu --csv --page details``."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError(f"no CSV table in ncu's output: {text[-500:]!r}")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    out, units, stalls = {}, {}, {}
    for row in rows:
        name, unit, value = row.get("Metric Name", ""), row.get("Metric Unit", ""), row.get("Metric Value", "")
        try:
            num = float(value.replace(",", ""))
        except ValueError:
            num = value
        if name in KEEP:
            out[name], units[name] = num, unit
        if name.startswith(STALL_PREFIX):
            stalls[name[len(STALL_PREFIX) :].split("_per_issue_active")[0]] = num
    out["units"] = units
    if stalls:
        out["stalls"] = stalls
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="JSON path (parent mode)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--launches", type=int, default=3, help="decode calls per process; the last one is profiled")
    ap.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the ncu executable")
    ap.add_argument("--keep-csv", action="store_true", help="write each variant's full ncu CSV next to the JSON")
    ap.add_argument("--timeout-s", type=int, default=240, help="per ncu run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.bits[0], args.variant[0], args.tokens, args.launches)
        return
    if not args.output:
        raise SystemExit("--output is required (the JSON to write)")
    from pressroom.evaluation.atomic import atomic_write_json

    ncu = find_ncu(args.ncu)
    import torch
    import triton

    output = Path(args.output)
    result = {
        "benchmark": "commvq_scores_profile",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ncu": subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:],
        "tokens": args.tokens,
        "variants": {k: VARIANTS[k] for k in args.variant},
        "profiles": {},
    }
    for bits in args.bits:
        for variant in args.variant:
            key = f"{bits}bit/{variant}"
            # two scores launches per call unless the window shares the code programs' launch: skip to the last
            # call's code launch
            per_call = 1 if VARIANTS[variant].get("window_launch") == "shared" else 2
            skip = (args.launches - 1) * per_call
            cmd = [
                ncu, "--clock-control", "none", "--kernel-name", "regex:_decode_scores_kernel",
                "--launch-skip", str(skip), "--launch-count", "1", "--csv", "--page", "details",
                *[a for s in SECTIONS for a in ("--section", s)],
                sys.executable, str(Path(__file__).resolve()), "--child", "--bits", str(bits), "--variant", variant,
                "--tokens", str(args.tokens), "--launches", str(args.launches),
            ]  # fmt: skip
            t0 = time.time()
            try:
                proc = subprocess.run(cmd[:1] + ["--metrics", STALL_METRICS] + cmd[1:], capture_output=True, text=True,
                                      timeout=args.timeout_s)  # fmt: skip
                if proc.returncode != 0:  # without the stall metrics
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
                if args.keep_csv:
                    output.with_name(f"{output.stem}_{bits}bit_{variant}.csv").write_text(proc.stdout)
                if proc.returncode != 0:
                    raise RuntimeError(f"ncu exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
                result["profiles"][key] = parse_ncu_csv(proc.stdout)
            except Exception as err:  # recorded, the other variants still run
                result["profiles"][key] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
            result["profiles"][key]["wall_s"] = round(time.time() - t0, 1)
            atomic_write_json(output, result)
            print(key, json.dumps(result["profiles"][key])[:400], flush=True)


if __name__ == "__main__":
    main()
