"""Nsight Compute profile of the CommVQ key search (``_encode_split_h2_kernel``), down to its SASS instructions.

The key search at ``search="split_h2", precision="half"`` takes about 9.8 ms per 128k tokens at 1 bit on an H200
(255 registers, two 4-warp programs per SM) and looks latency bound, but timing alone does not say where its warps
wait: in the 4,096-candidate inner loop (``HADD2`` / ``HMNMX2`` on packed float16 pairs, the loads of ``K^T`` rows
and of the scratch's ``g_B``), or in the work each residual step does around it (the two ``tl.dot``, the scratch
store and its barriers, the arg-min reductions, ``_finish_split_step``'s gathers of ``K[a_idx]`` and the center
subtraction). Per bit width (1 bit: R=11, 2 bits: R=21), this script runs ``ncu`` (``--clock-control none``, as the
device notes ask) on the last of ``--launches`` calls of ``encode_keys`` on one chunk of ``--chunk`` tokens x 8 KV
heads, head_dim 128 (random float16-exact codebooks and normalized keys drawn as ``commvq_encode_dpx.py`` draws them,
``key_norm_bound=1`` as the cache passes), writes a ``.ncu-rep`` (``--import-source no``) and reads two pages of it:

- ``kernel``: the kernel-level figures of ``commvq_scores_profile.py`` (duration, registers, occupancy, issue slots,
  warp stall reasons per issued instruction), from ``--page details``;
- ``source``: per SASS instruction, from ``--page source --print-source sass``: the warp stall samples (all, not
  issued, per reason) and instructions executed, split between the candidate loop and the rest of the kernel (and
  the rest of the residual-step loop around it), per stall reason and per opcode, and the top 15 instructions by
  stall samples with their dominant reason. The candidate loop is the SASS loop of the ``HMNMX2`` instructions: from
  the target of the backward branch that closes them (the innermost ``BRA`` to a lower address whose range holds
  them) to that branch (:func:`find_candidate_loop`).

Where the source page cannot be read, the JSON records its error and keeps the kernel-level figures; where ``ncu``
cannot read the counters at all (gVisor hosts), it records that error instead of figures.

``--sass-check`` needs no GPU nor ncu: it compiles the kernel offline for sm_90 (Triton's ptxas and cuobjdump) and
reports the candidate loop that :func:`find_candidate_loop` finds in its SASS (addresses, opcodes), to check the
attribution's loop before a GPU run.

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_encode_ncu.py --output $OUT/commvq_encode_ncu.json --keep-report   # needs ncu
    python benchmarks/commvq_encode_ncu.py --variant split_h2_half_wide --row-norms --output $OUT/x.json  # another
    python benchmarks/commvq_encode_ncu.py --child --bits 1                                        # what ncu runs
    python benchmarks/commvq_encode_ncu.py --sass-check --output /tmp/commvq_encode_ncu_sass.json  # CPU
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from commvq_scores_profile import RESIDUALS, SECTIONS, STALL_METRICS, find_ncu, parse_ncu_csv  # noqa: E402

KERNEL = "_encode_split_h2_kernel"
# the sections besides the scores profile's when --set sections (the full set holds them all): per-instruction
# counters and the warp state sampling they are attributed with
SOURCE_SECTIONS = ("SourceCounters", "InstructionStats", "ComputeWorkloadAnalysis")
MARKER = "HMNMX2"  # the candidate loop's min of packed float16 pairs


def loop_marker(variant: str) -> str:
    """The opcode that marks ``variant``'s candidate loop in sm_90 SASS: the fused add-min of ``split_dpx``
    (``VIADDMNMX``), the three-way float16 minimum ptxas makes of the PTX loop's ``min.f16x2`` pairs (``asm_loop``:
    ``VHMNMX``), else the Triton loop's ``HMNMX2``."""
    opts = variant_options(variant)
    if opts["search"] == "split_dpx":
        return "VIADDMNMX"
    return "VHMNMX" if opts.get("asm_loop") else MARKER


TOP = 15
# keys of SassRow.samples besides the per-reason counts
TOTAL, NOT_ISSUED = "all", "not_issued"
ALL_COLUMNS = ("Warp Stall Sampling (All Samples)", "Warp Stall Sampling (All Cycles)")
NOT_ISSUED_COLUMNS = ("Warp Stall Sampling (Not-issued Samples)", "Warp Stall Sampling (Not-issued Cycles)")
EXECUTED_COLUMN = "Instructions Executed"
ADDRESS_COLUMNS = ("Address", "# Address")
REASON_PREFIXES = ("stall_", "smsp__pcsamp_warps_issue_stalled_")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")


class SassRow(NamedTuple):
    """One SASS instruction of the source page: its address (absolute in ncu, kernel-relative in cuobjdump; branch
    targets are in the same space), its text, its warp stall samples (``TOTAL``, ``NOT_ISSUED`` and one key per
    reason, e.g. ``long_sb``) and the warp-level instructions executed."""

    address: int
    sass: str
    samples: dict[str, float]
    executed: float


def opcode(sass: str) -> str:
    """The opcode with its modifiers, without the predicate: ``"@!P2 BRA 0x2f20"`` -> ``"BRA"``."""
    text = _PREDICATE.sub("", sass.strip())
    return text.split()[0].rstrip(";") if text else ""


def branch_target(sass: str) -> int | None:
    """The target address of a direct branch (``BRA`` and its modifiers: the last hex operand), else ``None``."""
    if opcode(sass).split(".")[0] != "BRA":
        return None
    targets = _HEX.findall(sass)
    return int(targets[-1], 16) if targets else None


def _number(value: str) -> float:
    try:
        return float(value.replace(",", "").strip())
    except ValueError:
        return 0.0


def _reason(column: str) -> str | None:
    """The stall reason of a per-reason sample column (``stall_long_sb`` -> ``long_sb``), ``None`` for the others
    (and for the not-issued copies)."""
    if "not issued" in column.lower() or column.endswith("_not_issued"):
        return None
    for prefix in REASON_PREFIXES:
        if column.startswith(prefix):
            return column[len(prefix) :]
    return None


def parse_source_csv(text: str) -> list[SassRow]:
    """The SASS instructions of ``ncu --import R --csv --page source --print-source sass``, by address. The table
    starts at the first row with an ``Address`` and a ``Source`` column (lines before it, such as ``Kernel Name``
    or ncu's warnings, are skipped); rows whose address is not hex are left out."""
    table = list(csv.reader(io.StringIO(text)))
    head = next((i for i, row in enumerate(table) if "Source" in row and set(row) & set(ADDRESS_COLUMNS)), None)
    if head is None:
        raise ValueError(f"no SASS table (Address, Source columns) in ncu's source page: {text[:500]!r}")
    header = [name.strip() for name in table[head]]
    col = {}
    for i, name in enumerate(header):
        col.setdefault(name, i)
    total = next((col[c] for c in ALL_COLUMNS if c in col), None)
    not_issued = next((col[c] for c in NOT_ISSUED_COLUMNS if c in col), None)
    reasons = {i: _reason(name) for i, name in enumerate(header) if _reason(name)}
    rows = []
    for row in table[head + 1 :]:
        if len(row) < len(header):
            continue
        try:
            address = int(row[next(col[c] for c in ADDRESS_COLUMNS if c in col)].strip(), 16)
        except ValueError:
            continue
        samples = {reason: _number(row[i]) for i, reason in reasons.items()}
        samples[TOTAL] = _number(row[total]) if total is not None else sum(samples.values())
        if not_issued is not None:
            samples[NOT_ISSUED] = _number(row[not_issued])
        executed = _number(row[col[EXECUTED_COLUMN]]) if EXECUTED_COLUMN in col else 0.0
        rows.append(SassRow(address, row[col["Source"]].strip(), samples, executed))
    if not rows:
        raise ValueError(f"the source page's SASS table has no instruction rows: {text[:500]!r}")
    return sorted(rows, key=lambda r: r.address)


def parse_cuobjdump_sass(text: str) -> list[SassRow]:
    """The instructions of ``cuobjdump -sass`` (``/*3c30*/  @!P2 BRA 0x2f20 ;``), without counts."""
    rows = [
        SassRow(int(m.group(1), 16), m.group(2).strip(), {}, 0.0)
        for m in re.finditer(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", text, re.MULTILINE)
    ]
    return sorted(rows, key=lambda r: r.address)


def loops(rows: list[SassRow]) -> list[tuple[int, int]]:
    """``(target, branch address)`` of every backward branch (a ``BRA`` to a lower address): the loops' ranges."""
    out = []
    for row in rows:
        target = branch_target(row.sass)
        if target is not None and target < row.address:
            out.append((target, row.address))
    return out


def _inside(address: int, loop: tuple[int, int]) -> bool:
    return loop[0] <= address <= loop[1]


def find_candidate_loop(rows: list[SassRow], marker: str = MARKER) -> tuple[int, int]:
    """The candidate loop's address range ``(start, end)``, both included: for each ``marker`` instruction the
    innermost loop that holds it (the backward branch with the smallest range around it); of those, the one with
    the most ``marker`` instructions executed, then the most of them in the code, then the smallest.

    Raises ``ValueError`` when there is no ``marker`` instruction, or none inside a loop."""
    marks = [row for row in rows if opcode(row.sass).split(".")[0] == marker]
    if not marks:
        raise ValueError(f"no {marker} instruction in the {len(rows)} SASS rows: not the split_h2 key search?")
    ranges = loops(rows)
    candidates = set()
    for row in marks:
        around = [lp for lp in ranges if _inside(row.address, lp)]
        if around:
            candidates.add(min(around, key=lambda lp: lp[1] - lp[0]))
    if not candidates:
        raise ValueError(
            f"none of the {len(marks)} {marker} instructions is inside a loop (no backward BRA around them; "
            f"{len(ranges)} backward branches): is the candidate loop unrolled?"
        )

    def score(lp: tuple[int, int]) -> tuple:
        inside = [row for row in marks if _inside(row.address, lp)]
        return sum(row.executed for row in inside), len(inside), -(lp[1] - lp[0])

    return max(sorted(candidates), key=score)


def _reasons(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k not in (TOTAL, NOT_ISSUED)}


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def top_instructions(rows: list[SassRow], n: int = TOP, loop: tuple[int, int] | None = None) -> list[dict]:
    """The ``n`` instructions with the most stall samples (those with none left out): address (and offset from the
    kernel's first instruction, as cuobjdump numbers them), SASS, samples and their share of the kernel's, the
    dominant stall reason and the three largest, instructions executed, and whether it is in ``loop``."""
    total = sum(row.samples.get(TOTAL, 0.0) for row in rows)
    base = rows[0].address if rows else 0
    ranked = sorted(rows, key=lambda r: (-r.samples.get(TOTAL, 0.0), r.address))
    out = []
    for row in ranked[:n]:
        samples = row.samples.get(TOTAL, 0.0)
        if samples <= 0:
            break
        reasons = sorted(_reasons(row.samples).items(), key=lambda kv: (-kv[1], kv[0]))
        item = dict(
            address=hex(row.address),
            offset=hex(row.address - base),
            sass=row.sass,
            samples=samples,
            share=_share(samples, total),
            not_issued=row.samples.get(NOT_ISSUED),
            stall=reasons[0][0] if reasons and reasons[0][1] > 0 else None,
            reasons={k: v for k, v in reasons[:3] if v > 0},
            executed=row.executed,
        )
        if loop is not None:
            item["in_loop"] = _inside(row.address, loop)
        out.append(item)
    return out


def _sums(rows: list[SassRow]) -> dict:
    samples = sum(row.samples.get(TOTAL, 0.0) for row in rows)
    not_issued = sum(row.samples.get(NOT_ISSUED, 0.0) for row in rows)
    return dict(instructions=len(rows), samples=samples, not_issued=not_issued, executed=sum(r.executed for r in rows))


def split_by_loop(rows: list[SassRow], loop: tuple[int, int], marker: str = MARKER) -> dict:
    """Where the samples and the executed instructions fall: in ``loop`` or not (with shares), per stall reason and
    per opcode (samples), and by region: the loop, the rest of the innermost loop around it (the residual step), the
    rest of the kernel. ``loop`` also describes the range found: its addresses, its instructions, its opcodes and
    how many ``marker`` instructions lie outside it."""
    inside = [row for row in rows if _inside(row.address, loop)]
    outside = [row for row in rows if not _inside(row.address, loop)]
    base = rows[0].address
    ops_in = Counter(opcode(row.sass) for row in inside)
    loop_info = dict(
        start=hex(loop[0]),
        end=hex(loop[1]),
        start_offset=hex(loop[0] - base),
        end_offset=hex(loop[1] - base),
        instructions=len(inside),
        opcodes=dict(ops_in.most_common()),
        marker=marker,
        marker_outside=sum(opcode(row.sass).split(".")[0] == marker for row in outside),
    )
    s_in, s_out = _sums(inside), _sums(outside)
    total = _sums(rows)
    result = dict(
        loop=loop_info,
        samples=dict(
            total=total["samples"],
            in_loop=s_in["samples"],
            outside=s_out["samples"],
            in_loop_share=_share(s_in["samples"], total["samples"]),
            not_issued_in_loop=s_in["not_issued"],
            not_issued_outside=s_out["not_issued"],
            not_issued_in_loop_share=_share(s_in["not_issued"], total["not_issued"]),
        ),
        executed=dict(
            total=total["executed"],
            in_loop=s_in["executed"],
            outside=s_out["executed"],
            in_loop_share=_share(s_in["executed"], total["executed"]),
        ),
    )
    reasons: dict[str, dict] = defaultdict(lambda: dict(in_loop=0.0, outside=0.0))
    for part, group in (("in_loop", inside), ("outside", outside)):
        for row in group:
            for reason, value in _reasons(row.samples).items():
                reasons[reason][part] += value
    for value in reasons.values():
        value["in_loop_share"] = _share(value["in_loop"], value["in_loop"] + value["outside"])
    result["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -(kv[1]["in_loop"] + kv[1]["outside"])))
    by_op = {}
    for part, group in (("in_loop", inside), ("outside", outside)):
        counts: Counter = Counter()
        for row in group:
            counts[opcode(row.sass).split(".")[0]] += row.samples.get(TOTAL, 0.0)
        by_op[part] = {op: value for op, value in counts.most_common(12) if value > 0}
    result["samples_by_opcode"] = by_op
    # the residual step around the loop: the innermost other loop that holds it
    around = [lp for lp in loops(rows) if lp != loop and lp[0] <= loop[0] and loop[1] <= lp[1]]
    if around:
        step = min(around, key=lambda lp: lp[1] - lp[0])
        rest = [row for row in outside if _inside(row.address, step)]
        regions = dict(candidate_loop=s_in, step_loop_rest=_sums(rest))
        regions["kernel_rest"] = _sums([row for row in outside if not _inside(row.address, step)])
        for value in regions.values():
            value["samples_share"] = _share(value["samples"], total["samples"])
            value["executed_share"] = _share(value["executed"], total["executed"])
        result["regions"] = dict(step_loop=dict(start=hex(step[0]), end=hex(step[1])), **regions)
    return result


def attribute(rows: list[SassRow], n: int = TOP, marker: str = MARKER) -> dict:
    """:func:`split_by_loop` and :func:`top_instructions` of the source page's rows; without a ``marker`` loop, the
    top instructions and the loop finder's error (``loop_error``)."""
    out = dict(instructions=len(rows), samples_total=sum(row.samples.get(TOTAL, 0.0) for row in rows))
    try:
        loop = find_candidate_loop(rows, marker)
    except ValueError as err:
        out.update(loop_error=str(err), top=top_instructions(rows, n))
        return out
    out.update(split_by_loop(rows, loop, marker))
    out["top"] = top_instructions(rows, n, loop)
    return out


def variant_options(variant: str) -> dict:
    """``encode_keys`` options of a ``commvq_encode_dpx.VARIANTS`` label whose kernel is :data:`KERNEL`."""
    from commvq_encode_dpx import VARIANTS

    opts = dict(VARIANTS).get(variant)
    if opts is None or opts.get("search") not in ("split_h2", "split_dpx"):
        names = [k for k, v in VARIANTS if v.get("search") in ("split_h2", "split_dpx")]
        raise SystemExit(f"--variant must be one of {names}, got {variant!r}")
    return opts


def child(
    bits: int, chunk: int, tokens: int, launches: int, variant: str = "split_h2_half", row_norms: bool = False
) -> None:
    """Encode one chunk ``launches`` times as ``commvq_encode_dpx.py`` times the key search (ncu profiles the last
    launch): its random codebooks and keys (the first ``chunk`` of ``tokens`` drawn, normalized over the token's
    heads), its tables and output buffer, ``key_norm_bound=1``, with ``variant``'s options. ``row_norms``: the raw keys
    and their norms instead, divided in the kernel as the cache launches it."""
    import torch
    from commvq_encode_dpx import D, H

    from pressroom.kernels.commvq_encode import KeyTables, code_bytes, encode_keys

    device = torch.device("cuda")
    r = RESIDUALS[bits]
    g = torch.Generator().manual_seed(bits)
    theta = ((torch.randn(H, r, 128, D // 2, generator=g) * 0.1).half().float()).to(device)
    raw = torch.randn(1, H, tokens, D, generator=g)[:, :, :chunk].to(device)
    flat = raw[0].transpose(0, 1).flatten(1)
    tables = KeyTables(theta)
    out = torch.empty(chunk, H, code_bytes(r), dtype=torch.uint8, device=device)
    opts = variant_options(variant)
    if row_norms:
        norms = {"row_norms": flat.norm(dim=-1)}
        xm = flat.view(chunk, H, D)
    else:
        norms, xm = {}, torch.nn.functional.normalize(flat, dim=-1).view(chunk, H, D)
    for _ in range(launches):
        encode_keys(xm, theta, use_triton=True, tables=tables, out=out, key_norm_bound=1.0, **opts, **norms)
    torch.cuda.synchronize()


def offline_compile(r: int, variant: str = "split_h2_half", row_norms: bool = False, with_cap: bool = False):
    """The key search compiled offline for sm_90 as :func:`child` launches it (the variant's options at the default
    tiling; ``row_norms``: keys divided in the kernel; ``with_cap``: with the variant's ``maxnreg``, else without):
    ``triton.compile``'s result; needs Triton's ptxas, no GPU."""
    from pressroom.kernels import commvq_encode
    from pressroom.kernels.commvq_resources import kernel_resources_compiled

    opts = dict(variant_options(variant))
    cap = opts.pop("maxnreg", None)  # a launch option
    search, precision = opts.pop("search"), opts.pop("precision")
    tiling = commvq_encode.encode_defaults(precision, search)
    tiling.update({k: opts.pop(k) for k in ("block_n", "num_warps") if k in opts})
    meta, (num_warps, num_stages) = commvq_encode.encode_meta(
        128, r, tiling["block_n"], tiling["num_warps"], 1, search, precision, row_norms=row_norms, **opts
    )
    meta["NATIVE"] = True  # what a launch on sm_90 compiles
    half = {k: "*fp16" for k in ("ud_ptr", "wd_ptr", "u_ptr", "w_ptr")}
    return kernel_resources_compiled(
        commvq_encode.encode_kernel(search), meta, num_warps, num_stages, half, maxnreg=cap if with_cap else None
    )


def cubin_sass(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (Triton's cuobjdump)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stderr[-500:]}")
    return proc.stdout


def offline_sass(r: int, variant: str = "split_h2_half", row_norms: bool = False) -> str:
    """``cuobjdump -sass`` of :func:`offline_compile`'s kernel; needs Triton's ptxas and cuobjdump, no GPU."""
    return cubin_sass(offline_compile(r, variant, row_norms).asm["cubin"])


def sass_check(bits_list: list[int], variant: str = "split_h2_half", row_norms: bool = False) -> dict:
    """The candidate loop that :func:`find_candidate_loop` finds in the offline sm_90 compile, per bit width."""
    out = {}
    for bits in bits_list:
        try:
            rows = parse_cuobjdump_sass(offline_sass(RESIDUALS[bits], variant, row_norms))
            marker = loop_marker(variant)
            loop = find_candidate_loop(rows, marker)
            info = split_by_loop(rows, loop, marker)
            out[f"{bits}bit"] = dict(instructions=len(rows), loop=info["loop"], regions=info.get("regions"))
        except Exception as err:  # recorded, the other bit width still runs
            out[f"{bits}bit"] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
    return out


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _fail(what: str, proc: subprocess.CompletedProcess) -> RuntimeError:
    return RuntimeError(f"{what}: ncu exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")


def profile(ncu: str, bits: int, args, workdir: Path) -> dict:
    """One bit width: ncu writes ``workdir/encode_{bits}bit.ncu-rep``, its details and source pages are written next
    to it as CSV and parsed (their errors recorded, the profile's raised)."""
    base = workdir / f"encode_{bits}bit"
    report = base.with_suffix(".ncu-rep")
    if args.set == "full":
        collect = ["--set", "full"]
    else:
        collect = [a for s in SECTIONS + SOURCE_SECTIONS for a in ("--section", s)]
    if args.sampling_interval is not None:
        collect += ["--warp-sampling-interval", str(args.sampling_interval)]
    cmd = [
        ncu, "--clock-control", "none", "--kernel-name", f"regex:{KERNEL}", "--launch-skip", str(args.launches - 1),
        "--launch-count", "1", "--import-source", "no", "-f", "-o", str(base), *collect,
        sys.executable, str(Path(__file__).resolve()), "--child", "--bits", str(bits), "--chunk", str(args.chunk),
        "--tokens", str(args.tokens), "--launches", str(args.launches), "--variant", args.variant,
        *(["--row-norms"] if args.row_norms else []),
    ]  # fmt: skip
    result: dict = dict(residuals=RESIDUALS[bits], ncu_command=" ".join(cmd[1:]))
    proc = _run(cmd[:1] + ["--metrics", STALL_METRICS] + cmd[1:], args.timeout_s)
    if proc.returncode != 0 or not report.exists():  # without the stall metrics
        result["stall_metrics_error"] = (proc.stderr or proc.stdout)[-400:]
        proc = _run(cmd, args.timeout_s)
    if proc.returncode != 0 or not report.exists():
        raise _fail("profile", proc)
    try:
        details = _run([ncu, "--import", str(report), "--csv", "--page", "details"], args.timeout_s)
        base.with_name(base.name + "_details.csv").write_text(details.stdout)
        if details.returncode != 0:
            raise _fail("details page", details)
        result["kernel"] = parse_ncu_csv(details.stdout)
    except Exception as err:  # recorded, the source page still runs
        result["kernel"] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
    try:
        source = _run(
            [ncu, "--import", str(report), "--csv", "--page", "source", "--print-source", "sass"],
            args.timeout_s,
        )
        base.with_name(base.name + "_sass.csv").write_text(source.stdout)
        if source.returncode != 0:
            raise _fail("source page", source)
        rows = parse_source_csv(source.stdout)
        result["source"] = attribute(rows, TOP, loop_marker(args.variant))
        if not any(_reasons(row.samples) for row in rows):  # no per-reason columns recognized: keep the header
            header = next((line for line in source.stdout.splitlines() if '"Address"' in line), "")
            result["source"]["no_reason_columns"] = header[:3000]
    except Exception as err:  # recorded, the kernel-level figures stay
        result["source"] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="JSON path (parent mode and --sass-check)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--chunk", type=int, default=32768, help="tokens encoded per launch (the cache's chunk)")
    ap.add_argument("--tokens", type=int, default=131072, help="random keys drawn (commvq_encode_dpx.py's default)")
    ap.add_argument("--launches", type=int, default=3, help="encode_keys calls per process; the last one is profiled")
    ap.add_argument(
        "--set",
        choices=["full", "sections"],
        default="full",
        help="ncu's full section set, or the scores profile's sections plus SourceCounters (fewer replay passes)",
    )
    ap.add_argument("--sampling-interval", type=int, help="ncu --warp-sampling-interval (0-31; default: ncu's auto)")
    ap.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the ncu executable")
    ap.add_argument("--keep-report", action="store_true", help="copy the .ncu-rep and the CSVs next to the JSON")
    ap.add_argument("--timeout-s", type=int, default=480, help="per ncu run")
    ap.add_argument("--sass-check", action="store_true", help="no GPU: the loop found in an offline sm_90 compile")
    ap.add_argument(
        "--variant",
        default="split_h2_half",
        help="a commvq_encode_dpx.py VARIANTS label of this kernel (e.g. split_h2_half_wide, split_h2_half_prefetch)",
    )
    ap.add_argument("--row-norms", action="store_true", help="raw keys divided in the kernel, as the cache launches it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.launches < 1 or not 0 < args.chunk <= args.tokens:
        raise SystemExit("--launches must be >= 1 and --chunk between 1 and --tokens")
    if args.child:
        child(args.bits[0], args.chunk, args.tokens, args.launches, args.variant, args.row_norms)
        return
    if args.sass_check:
        os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: a real compile
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        import triton

        from pressroom.evaluation.atomic import atomic_write_json

        result = dict(
            benchmark="commvq_encode_ncu --sass-check",
            triton=triton.__version__,
            **sass_check(args.bits, args.variant, args.row_norms),
        )
        if args.output:
            atomic_write_json(Path(args.output), result)
        print(json.dumps(result, indent=1))
        return
    if not args.output:
        raise SystemExit("--output is required (the JSON to write)")
    from pressroom.evaluation.atomic import atomic_write_json

    ncu = find_ncu(args.ncu)
    import torch
    import triton

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "commvq_encode_ncu",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ncu": subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:],
        "kernel": KERNEL,
        "variant": args.variant,
        "options": dict(
            variant_options(args.variant),
            key_norm_bound=1.0,
            row_norms=args.row_norms,
            chunk=args.chunk,
            tokens=args.tokens,
            launches=args.launches,
        ),
        "ncu_set": args.set,
        "profiles": {},
    }
    for bits in args.bits:
        key = f"{bits}bit"
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result["profiles"][key] = profile(ncu, bits, args, Path(tmp))
            except Exception as err:  # recorded, the other bit width still runs
                result["profiles"][key] = {"error": f"{type(err).__name__}: {str(err)[:800]}"}
            if args.keep_report:
                for path in sorted(Path(tmp).iterdir()):
                    kept = output.with_name(f"{output.stem}_{path.name}")
                    shutil.copyfile(path, kept)
                    result["profiles"][key].setdefault("files", []).append(kept.name)
        result["profiles"][key]["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(output, result)
        print(key, json.dumps(result["profiles"][key])[:600], flush=True)


if __name__ == "__main__":
    main()
