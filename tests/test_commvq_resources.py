"""The CommVQ Triton kernels fit an H100 (sm_90: 227 KB of shared memory per block) at their default tilings.

Compiles each kernel ahead of time for sm_90 on the CPU (Triton ships ptxas), in a subprocess without
``TRITON_INTERPRET`` (:mod:`pressroom.kernels.commvq_resources`): the decode split kernel (both key-table dtypes),
the reduce kernel, the key-scores kernel (direct and LUT designs) and the encode kernel at the shapes the cache and
the benchmarks use (Llama-3.1-8B: 8 KV / 32 query heads, head_dim 128, R=11 and R=21; SmolLM2-135M: 3 KV / 9 query
heads, head_dim 64, R=5 and R=11), plus the decode benchmark's tiling sweep. A 16 KB margin below the limit covers
other Triton versions' layouts (the first H100 run used Triton 3.6). Skipped, with the reason printed, where Triton
cannot compile for sm_90 here. Compiled kernels land in Triton's cache: a cold run takes minutes, a rerun seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pressroom.kernels.rope_ring import HAS_TRITON

MARGIN = 16 * 1024
LIMIT = 232448  # 227 KB (pressroom.kernels.commvq_resources.H100_SHARED_BYTES)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture(scope="module")
def table() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "pressroom.kernels.commvq_resources", "--benchmark", "--jobs", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if rows and "probe" in rows[0]:
        print(f"test_commvq_resources skipped: {rows[0]['probe']}")
        pytest.skip(rows[0]["probe"])
    assert proc.returncode == 0 and rows, proc.stderr[-3000:]
    for row in rows:
        print(json.dumps(row))
    return {row["config"]: row for row in rows}


def test_every_commvq_kernel_fits_h100(table):
    from pressroom.kernels.commvq_resources import benchmark_configs, default_configs

    labels = [c[0] for c in default_configs() + benchmark_configs()]
    assert sorted(table) == sorted(labels)
    errors = {k: v["error"] for k, v in table.items() if "error" in v}
    assert not errors, errors
    over = {k: v["shared"] for k, v in table.items() if v["shared"] > LIMIT - MARGIN}
    assert not over, f"shared memory over {LIMIT - MARGIN} bytes: {over}"


def test_decode_default_does_not_spill(table):
    """The decode kernel at its default tiling keeps its state in registers at the 8B shape (R=11 and R=21): at most
    a few bytes of stack (the unrolled residual loop used to spill 1-3 KB per thread)."""
    for name in ("llama8b_1bit", "llama8b_2bit"):
        row = table[f"decode {name} table=fp16"]
        if "stack_bytes" not in row:
            pytest.skip("cuobjdump is not available: no register figures")
        assert row["stack_bytes"] <= 64, row


def test_two_pass_scores_code_programs_stay_lean(table):
    """The two-pass scores kernel's code programs at the default tiling (the window in its own launch) hold no spill
    and at most 128 registers per thread, so two 8-warp programs fit an SM. With the window's program compiled in,
    Triton 3.6 (the GPU host's) gave 255 registers and a 200-byte spill frame: 2 programs of 4 warps per SM
    (ncu, ``benchmarks/results/commvq_scores_profile.json``)."""
    for name in ("llama8b_1bit", "llama8b_2bit"):
        row = table[f"scores {name} table=fp16"]
        if "stack_bytes" not in row:
            pytest.skip("cuobjdump is not available: no register figures")
        assert row["stack_bytes"] == 0 and row["regs"] <= 128, row


_PREFETCH_PROBE = """
import json
from pressroom.kernels import commvq_encode
from pressroom.kernels.commvq_resources import kernel_resources_compiled
half = {k: "*fp16" for k in ("ud_ptr", "wd_ptr", "u_ptr", "w_ptr")}
out = {}
for prefetch in (False, True):
    meta, (nw, ns) = commvq_encode.encode_meta(128, 11, 64, 4, 1, "split_h2", "half", row_norms=True, prefetch=prefetch)
    meta["NATIVE"] = True
    c = kernel_resources_compiled(commvq_encode.encode_kernel("split_h2"), meta, nw, ns, half)
    out[str(prefetch)] = c.asm["ptx"].count("prefetch.global.L1")
print(json.dumps(out))
"""


def test_encode_prefetch_compiles_to_l1_prefetches(sm90_probe):
    """``encode_keys(prefetch=True)`` puts two ``prefetch.global.L1`` in the sm_90 PTX of the key search (the
    step's ``K^T`` and the scratch; not removed as dead code), the default none."""
    counts = sm90_probe(_PREFETCH_PROBE)
    assert counts["False"] == 0 and counts["True"] >= 2, counts  # K^T and scratch (one or more per thread each)
