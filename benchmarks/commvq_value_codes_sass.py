"""The value-codes kernel compiled offline for sm_90 (no GPU): registers, spills, instructions and global loads, for
the four logits per choice and for the three difference planes (``value_codes(differences=True)``), as the cache
launches it (bfloat16 input, bfloat16 bits written, :data:`DEFAULT_TILING`). Needs Triton's ptxas and cuobjdump.

    python benchmarks/commvq_value_codes_sass.py --output benchmarks/results/commvq_value_codes_sass.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton import knobs

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels import commvq_value_codes as vc
from pressroom.kernels.commvq_resources import _cubin_usage, kernel_resources_compiled


def counts(differences: bool) -> dict:
    bm, bb, nw = vc.DEFAULT_TILING
    meta = dict(BLOCK_M=bm, BLOCK_B=bb, WRITE_BITS=True, DIFFS=differences)
    pointers = {"logits_ptr": "*bf16", "packed_ptr": "*u8", "bits_ptr": "*bf16"}
    compiled = kernel_resources_compiled(vc._value_codes_kernel, meta, nw, 3, pointers)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True).stdout
    ops = re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    loads = [o for o in ops if o.startswith("LDG")]
    return dict(_cubin_usage(compiled.asm["cubin"]), instructions=len(ops), global_loads=len(loads),
                load_kinds=sorted(set(loads)))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    result = dict(
        benchmark="commvq_value_codes_sass",
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=f"offline sm_90 compile on {platform.processor() or 'cpu'}",
        triton=triton.__version__,
        tiling=dict(zip(("block_m", "block_b", "num_warps"), vc.DEFAULT_TILING)),
        four_logits=counts(False),
        difference_planes=counts(True),
    )
    print(result)
    atomic_write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
