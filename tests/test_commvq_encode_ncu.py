"""The key-search profile's SASS attribution (``benchmarks/commvq_encode_ncu.py``) on synthetic ncu source pages: the
CSV parsing, the candidate loop found from its backward branch, the in-loop / out-of-loop split, the top
instructions; and, where Triton can compile for sm_90 here, the loop it finds in the real kernel's SASS."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import commvq_encode_ncu as prof  # noqa: E402

BASE = 0x7F0000000000
HEADER = (
    '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
    '"Instructions Executed","stall_long_sb","stall_wait","stall_barrier","stall_long_sb (Not Issued)"'
)
# (offset, SASS, all samples, not issued, executed, long_sb, wait, barrier): a prologue, the residual-step loop
# (0x10 .. 0x80) around the candidate loop (0x30 .. 0x60, closed by @!P0 BRA 0x30), a forward branch, the exit and
# the trailing self-branch
INSTRUCTIONS = (
    (0x00, "MOV R1, c[0x0][0x28]", 2, 2, 1, 0, 2, 0),
    (0x10, "HMMA.16816.F32 R8, R12, R16, R8", 5, 5, 10, 0, 5, 0),
    (0x20, "BAR.SYNC.DEFER_BLOCKING 0x0", 30, 30, 10, 0, 0, 30),
    (0x30, "LDG.E R4, desc[UR4][R2.64]", 40, 39, 100, 40, 0, 0),
    (0x40, "HADD2 R5, R4, R6", 10, 8, 100, 0, 10, 0),
    (0x50, "HMNMX2 R7, R7, R5, PT", 20, 18, 100, 5, 15, 0),
    (0x60, "@!P0 BRA {0x30}", 3, 2, 100, 0, 3, 0),
    (0x70, "@P2 BRA {0x90}", 0, 0, 10, 0, 0, 0),
    (0x78, "SHFL.BFLY PT, R9, R8, 0x1, 0x1f", 8, 8, 10, 0, 8, 0),
    (0x80, "@P1 BRA {0x10}", 1, 1, 10, 0, 1, 0),
    (0x90, "EXIT", 0, 0, 1, 0, 0, 0),
    (0xA0, "BRA {0xa0}", 0, 0, 0, 0, 0, 0),
)


def _sass(text: str) -> str:
    """``{0x30}`` as the absolute address ``BASE + 0x30``, as ncu prints branch targets."""
    return re.sub(r"\{(0x[0-9a-f]+)\}", lambda m: hex(BASE + int(m.group(1), 16)), text)


def source_csv(instructions=INSTRUCTIONS) -> str:
    lines = ["==PROF== Connected to process 1234", '"Kernel Name","_encode_split_h2_kernel"', HEADER]
    for off, sass, *counts in instructions:
        lines.append(",".join(f'"{v}"' for v in (hex(BASE + off), _sass(sass), *counts, 0)))
    return "\n".join(lines) + "\n"


@pytest.fixture
def rows():
    return prof.parse_source_csv(source_csv())


def test_opcode_and_branch_target():
    assert prof.opcode("@!P2 BRA 0x2f20") == "BRA"
    assert prof.opcode("HMNMX2 R1, R2, R3, PT") == "HMNMX2"
    assert prof.opcode("@PT HADD2.F32 R1, -RZ, R2.H0_H0") == "HADD2.F32"
    assert prof.branch_target("@!P2 BRA 0x2f20") == 0x2F20
    assert prof.branch_target("BRA.U !UP0, 0x7f00000001c0") == 0x7F00000001C0
    assert prof.branch_target("HMNMX2 R1, R2, R3, PT") is None
    assert prof.branch_target("BRX R4 -0x10") is None


def test_parse_source_csv(rows):
    assert [r.address - BASE for r in rows] == [i[0] for i in INSTRUCTIONS]
    ldg = rows[3]
    assert ldg.sass == "LDG.E R4, desc[UR4][R2.64]"
    assert ldg.executed == 100
    # the per-reason columns without their prefix, the not-issued copy left out of the reasons
    assert ldg.samples == {"all": 40, "not_issued": 39, "long_sb": 40, "wait": 0, "barrier": 0}
    assert rows[6].sass == f"@!P0 BRA {hex(BASE + 0x30)}"
    with pytest.raises(ValueError, match="no SASS table"):
        prof.parse_source_csv('"ID","Metric Name"\n"0","Duration"\n')


def test_parse_source_csv_without_total_column():
    text = '"Address","Source","stall_wait","stall_long_sb"\n"0x10","HADD2 R1, R2, R3","3","4"\n'
    (row,) = prof.parse_source_csv(text)
    assert row.samples["all"] == 7 and row.executed == 0


def test_find_candidate_loop(rows):
    # the innermost backward branch around the HMNMX2, not the step loop (0x10 .. 0x80) nor the self-branch
    assert prof.find_candidate_loop(rows) == (BASE + 0x30, BASE + 0x60)
    assert prof.loops(rows) == [(BASE + 0x30, BASE + 0x60), (BASE + 0x10, BASE + 0x80)]


def test_split_by_loop(rows):
    out = prof.split_by_loop(rows, prof.find_candidate_loop(rows))
    assert out["loop"]["start_offset"] == "0x30" and out["loop"]["end_offset"] == "0x60"
    assert out["loop"]["instructions"] == 4 and out["loop"]["marker_outside"] == 0
    assert out["loop"]["opcodes"] == {"LDG.E": 1, "HADD2": 1, "HMNMX2": 1, "BRA": 1}
    s = out["samples"]
    assert (s["total"], s["in_loop"], s["outside"]) == (119, 73, 46)
    assert s["in_loop_share"] == round(73 / 119, 4)
    assert (s["not_issued_in_loop"], s["not_issued_outside"]) == (67, 46)
    e = out["executed"]
    assert (e["total"], e["in_loop"], e["outside"]) == (452, 400, 52)
    r = out["reasons"]
    assert list(r) == ["long_sb", "wait", "barrier"]  # by total samples
    assert (r["long_sb"]["in_loop"], r["long_sb"]["outside"]) == (45, 0)
    assert (r["wait"]["in_loop"], r["wait"]["outside"]) == (28, 16)
    assert (r["barrier"]["in_loop"], r["barrier"]["outside"], r["barrier"]["in_loop_share"]) == (0, 30, 0.0)
    assert out["samples_by_opcode"]["in_loop"] == {"LDG": 40, "HMNMX2": 20, "HADD2": 10, "BRA": 3}
    assert list(out["samples_by_opcode"]["outside"]) == ["BAR", "SHFL", "HMMA", "MOV", "BRA"]
    reg = out["regions"]
    assert reg["step_loop"] == {"start": hex(BASE + 0x10), "end": hex(BASE + 0x80)}
    assert reg["candidate_loop"]["samples"] == 73
    assert reg["step_loop_rest"]["samples"] == 5 + 30 + 8 + 1 and reg["step_loop_rest"]["instructions"] == 5
    assert reg["kernel_rest"]["samples"] == 2 and reg["kernel_rest"]["instructions"] == 3
    assert reg["kernel_rest"]["executed_share"] == round(2 / 452, 4)


def test_top_instructions(rows):
    loop = prof.find_candidate_loop(rows)
    top = prof.top_instructions(rows, 15, loop)
    assert len(top) == 9  # the instructions without samples left out
    assert [t["offset"] for t in top[:4]] == ["0x30", "0x20", "0x50", "0x40"]
    first, second, third = top[:3]
    assert first["stall"] == "long_sb" and first["in_loop"] and first["share"] == round(40 / 119, 4)
    assert second["sass"].startswith("BAR.SYNC") and second["stall"] == "barrier" and not second["in_loop"]
    assert third["stall"] == "wait" and third["reasons"] == {"wait": 15, "long_sb": 5}
    assert [t["samples"] for t in prof.top_instructions(rows, 2)] == [40, 30]
    assert "in_loop" not in prof.top_instructions(rows, 1)[0]


def _without_loops() -> list[tuple]:
    """The instructions with both backward branches made forward: HMNMX2 in no loop."""
    return [(off, s.replace("{0x30}", "{0x70}").replace("{0x10}", "{0x90}"), *c) for off, s, *c in INSTRUCTIONS]


def test_attribute_keeps_the_top_without_a_loop(rows):
    out = prof.attribute(rows)
    assert out["samples"]["in_loop"] == 73 and len(out["top"]) == 9 and out["top"][0]["in_loop"]
    out = prof.attribute(prof.parse_source_csv(source_csv(_without_loops())))
    assert "inside a loop" in out["loop_error"] and "samples" not in out
    assert out["samples_total"] == 119 and out["top"][0]["offset"] == "0x30" and "in_loop" not in out["top"][0]


def test_loop_finder_errors():
    with pytest.raises(ValueError, match="inside a loop"):
        prof.find_candidate_loop(prof.parse_source_csv(source_csv(_without_loops())))
    # only the candidate loop's branch made forward: the step loop holds the HMNMX2 then
    inner_forward = [(off, s.replace("{0x30}", "{0x70}"), *c) for off, s, *c in INSTRUCTIONS]
    assert prof.find_candidate_loop(prof.parse_source_csv(source_csv(inner_forward))) == (BASE + 0x10, BASE + 0x80)
    no_marker = [(off, s.replace("HMNMX2", "HADD2"), *c) for off, s, *c in INSTRUCTIONS]
    with pytest.raises(ValueError, match="no HMNMX2"):
        prof.find_candidate_loop(prof.parse_source_csv(source_csv(no_marker)))


def test_peeled_marker_outside_and_busiest_loop():
    # a second small loop (0xb0 .. 0xd0) with an HMNMX2 that runs less, and one HMNMX2 outside any loop
    extra = (
        (0xB0, "HMNMX2 R1, R1, R2, PT", 1, 1, 5, 0, 1, 0),
        (0xC0, "HMNMX2 R3, R3, R2, PT", 1, 1, 5, 0, 1, 0),
        (0xD0, "@P3 BRA {0xb0}", 0, 0, 5, 0, 0, 0),
        (0xE0, "HMNMX2 R7, R7, R5, PT", 0, 0, 1, 0, 0, 0),
    )
    rows = prof.parse_source_csv(source_csv(INSTRUCTIONS + extra))
    loop = prof.find_candidate_loop(rows)
    assert loop == (BASE + 0x30, BASE + 0x60)  # 100 HMNMX2 executed against 10
    assert prof.split_by_loop(rows, loop)["loop"]["marker_outside"] == 3


def test_cuobjdump_rows():
    text = """
        /*2f10*/                   IMAD.MOV.U32 R4, RZ, RZ, R2 ;                 /* 0x000000ffff047224 */
                                                                                 /* 0x000fe200078e0002 */
        /*2f20*/                   HMNMX2 R87, R228, R87, PT ;                   /* 0x00000057e4577240 */
        /*2f30*/              @!P2 BRA 0x2f20 ;                                  /* 0xfffffff000b8a947 */
        /*2f40*/                   EXIT ;                                        /* 0x000000000000794d */
"""
    rows = prof.parse_cuobjdump_sass(text)
    assert [(r.address, r.sass) for r in rows][1:3] == [
        (0x2F20, "HMNMX2 R87, R228, R87, PT"),
        (0x2F30, "@!P2 BRA 0x2f20"),
    ]
    assert prof.find_candidate_loop(rows) == (0x2F20, 0x2F30)


def test_sass_check_finds_the_candidate_loop(tmp_path):
    """The loop found in the real kernel compiled for sm_90 (offline, as the resource test compiles): HMNMX2 only
    inside it, no tensor-core instruction in it, inside the residual-step loop. Skipped where Triton cannot compile
    for sm_90 here."""
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "commvq_encode_ncu.py"), "--sass-check", "--bits", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["1bit"]
    if "error" in res:
        pytest.skip(f"no sm_90 compile here: {res['error']}")
    loop = res["loop"]
    assert loop["marker_outside"] == 0 and loop["opcodes"].get("HMNMX2", 0) >= 16
    assert not any(op.startswith(("HMMA", "BAR")) for op in loop["opcodes"])
    step = res["regions"]["step_loop"]
    assert int(step["start"], 16) < int(loop["start"], 16) <= int(loop["end"], 16) < int(step["end"], 16)


def test_sass_check_of_a_variant_and_a_wrong_one(tmp_path):
    """``--variant`` compiles that variant: four adjacent lanes a thread (``wide_lanes``) load each ``K^T`` row as one
    16-byte load per thread, 4 per 4 candidates, with the keys divided in the kernel (``--row-norms``); a label of
    another kernel, or none, is refused with the list of labels."""
    pytest.importorskip("triton")
    script = str(BENCHMARKS / "commvq_encode_ncu.py")
    bad = subprocess.run([sys.executable, script, "--sass-check", "--variant", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--variant must be one of" in bad.stderr and "split_h2_half_wide" in bad.stderr
    out = tmp_path / "wide.json"
    cmd = [
        script,
        "--sass-check",
        "--bits",
        "1",
        "--variant",
        "split_h2_half_wide",
        "--row-norms",
        "--output",
        str(out),
    ]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["1bit"]
    if "error" in res:
        pytest.skip(f"no sm_90 compile here: {res['error']}")
    assert res["loop"]["opcodes"].get("LDG.E.128") == 4 and res["loop"]["opcodes"].get("HMNMX2") == 64
