"""The key search's candidate loop in PTX (``encode_keys(asm_loop=True)``): the PTX text run by a small emulator of
its instructions against the minima it must give, its argument checks, and its offline sm_90 compile."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pressroom.kernels.commvq_codebook import additive_parts
from pressroom.kernels.commvq_encode import (
    SCRATCH_ASM,
    SHARED_ROW_BYTES,
    candidate_loop_ptx,
    encode_keys,
    encode_keys_split_h2_reference,
    encode_meta,
    normalize_keys,
    shared_scratch_bytes,
    unpack_codes12,
)
from pressroom.kernels.f16x2 import pack_f16x2, pack_i16x2, unpack_f16x2, unpack_i16x2
from pressroom.kernels.rope_ring import triton_interpreted

ADDR = re.compile(r"\[(\$?\w+)\+(\d+)\]")


def _halves(v: int, i16: bool) -> tuple:
    z = torch.tensor([v], dtype=torch.int64).to(torch.int32)
    return unpack_i16x2(z) if i16 else unpack_f16x2(z)


def _pair(lo: torch.Tensor, hi: torch.Tensor, i16: bool) -> int:
    packed = pack_i16x2(lo, hi) if i16 else pack_f16x2(lo, hi)
    return int(packed.item()) & 0xFFFFFFFF


def _f16x2(op: str, a: int, b: int, i16: bool) -> int:
    (alo, ahi), (blo, bhi) = _halves(a, i16), _halves(b, i16)
    if op == "add":  # float16 adds rounded to nearest, or int16 adds wrapping at 16 bits
        lo, hi = (
            ((alo + blo + 32768) % 65536 - 32768, (ahi + bhi + 32768) % 65536 - 32768)
            if i16
            else (alo + blo, ahi + bhi)
        )
    else:
        lo, hi = torch.minimum(alo, blo), torch.minimum(ahi, bhi)
    return _pair(lo, hi, i16)


def emulate(ptx: str, mem: np.ndarray, operands: dict) -> None:
    """Run the PTX of :func:`candidate_loop_ptx` on byte memory ``mem`` (little-endian 32-bit words), its operands
    ``$1``..``$3`` given as byte addresses: only the instructions it emits, each as PTX defines it (one thread:
    ``bar.sync`` waits for nobody)."""
    for _ in emulate_thread(ptx, mem, operands):
        pass


def emulate_threads(ptx: str, mem: np.ndarray, operands: list[dict], barrier: bool = True) -> None:
    """Run one thread per operand set on shared ``mem``: with ``barrier``, ``bar.sync`` as the hardware runs it
    (every thread reaches it before any goes on), else each thread start to end in turn."""
    threads = [emulate_thread(ptx, mem, ops) for ops in operands]
    while threads:
        if barrier:
            threads = [t for t in threads if next(t, StopIteration) is not StopIteration]
        else:
            for t in threads:
                for _ in t:
                    pass
            threads = []


def emulate_thread(ptx: str, mem: np.ndarray, operands: dict):
    """:func:`emulate` as a generator that yields at each ``bar.sync``."""
    lines = [ln.strip().rstrip(";") for ln in ptx.split("\n")]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if ln.endswith(":")}
    regs: dict = dict(operands)
    i16 = "add.s16x2" in ptx

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    def addr(tok: str) -> int:
        base, off = ADDR.fullmatch(tok).groups()
        return regs[base] + int(off)

    def word(a: int) -> int:
        return int(mem[a : a + 4].view(np.uint32)[0])

    pc, steps = 0, 0
    while pc < len(lines):
        steps += 1
        assert steps < 1_000_000, "the loop does not end"
        ln, pc = lines[pc], pc + 1
        if not ln or ln in "{}" or ln.startswith(".reg") or ln.endswith(":"):
            continue
        op, _, rest = ln.partition(" ")
        if op.startswith("@"):  # @p bra LABEL
            pred, target = op[1:], rest.split()[1]
            pc = labels[target] if regs[pred] else pc
            continue
        if op in ("ld.global.v4.b32", "ld.shared.v4.b32", "ld.shared.v2.b32"):
            dst, src = rest.split("}, ")
            for k, r in enumerate(dst.strip("{").split(", ")):
                regs[r] = word(addr(src) + 4 * k)
            continue
        if op == "mov.b32" and rest.startswith("{"):  # {lo, hi} = a 32-bit word's two halves
            dst, src = rest.split("}, ")
            lo, hi = dst.strip("{").split(", ")
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        if op == "bar.sync":  # the caller decides when the thread goes on
            yield
            continue
        args = [a.strip() for a in rest.split(",", 1)]
        if op == "mov.b32" and args[1].startswith("{"):  # a word from two halves
            lo, hi = args[1].strip("{}").split(", ")
            regs[args[0]] = regs[lo] | (regs[hi] << 16)
            continue
        args = [a.strip() for a in rest.split(",")]
        if op in ("mov.b64", "mov.b32"):
            regs[args[0]] = val(args[1])
        elif op in ("add.s64", "add.s32"):
            regs[args[0]] = val(args[1]) + val(args[2])
        elif op == "ld.global.b32":
            regs[args[0]] = word(addr(args[1]))
        elif op in ("st.global.b32", "st.shared.b32"):
            mem[addr(args[0]) : addr(args[0]) + 4] = np.array([val(args[1])], dtype=np.uint32).view(np.uint8)
        elif op == "setp.lt.u64":
            regs[args[0]] = val(args[1]) < val(args[2])
        elif op in ("add.rn.f16x2", "add.s16x2", "min.f16x2", "min.s16x2"):
            regs[args[0]] = _f16x2(op.split(".")[0], val(args[1]), val(args[2]), i16)
        else:
            raise AssertionError(f"the emulator does not know {ln!r}")


@pytest.mark.parametrize(
    ("i16", "unroll", "values"),
    [(False, 4, "signed"), (True, 4, "signed"), (False, 8, "signed"), (False, 4, "positive"), (True, 4, "positive")],
)
def test_ptx_loop_gives_the_minima_of_the_triton_loop(i16: bool, unroll: int, values: str):
    """Per row and half: ``min_B (K^T[B, lane] + g[row, B])`` in float16 (int16 wrapping) arithmetic, written back
    ``row_bytes`` apart: what the Triton loop computes, for rows of another lane and scratch row width; all sums
    positive too (the minima start at the +inf / int16 max of the Triton loop, not at 0)."""
    torch.manual_seed(unroll + i16)
    rows, row_bytes, lane = 3, 4 * SCRATCH_ASM, 5
    low = 1 if values == "positive" else -9000
    if i16:
        g = torch.randint(low, 9000, (rows, 64, 2))
        kt = torch.randint(low, 9000, (64, 32, 2))
    else:
        g = torch.randn(rows, 64, 2).half().float()
        kt = torch.randn(64, 32, 2).half().float()
        if values == "positive":
            g, kt = g.abs() + 1.0, kt.abs() + 1.0
    # the scratch (rows of row_bytes: 64 packed g_B, then the minima at entry 64 + lane) and K^T after it
    scr = np.zeros(rows * row_bytes + 64 * 128, dtype=np.uint8)
    words = scr.view(np.uint32)
    for r in range(rows):
        for b in range(64):
            words[r * row_bytes // 4 + b] = _pair(g[r, b, :1], g[r, b, 1:], i16)
    kt_at = rows * row_bytes
    for b in range(64):
        for j in range(32):
            words[(kt_at + 128 * b) // 4 + j] = _pair(kt[b, j, :1], kt[b, j, 1:], i16)
    ptx = candidate_loop_ptx(rows, row_bytes, i16=i16, unroll=unroll)
    emulate(ptx, scr, {"$1": 0, "$2": kt_at + 4 * lane, "$3": 4 * (64 + lane)})
    for r in range(rows):
        got = _halves(int(words[r * row_bytes // 4 + 64 + lane]), i16)
        for h in range(2):
            if i16:
                sums = (kt[:, lane, h] + g[r, :, h] + 32768) % 65536 - 32768
            else:
                sums = (kt[:, lane, h].half() + g[r, :, h].half()).float()
            assert got[h].float().item() == sums.min().float().item(), (r, h)


def _shared_problem(rows: int, i16: bool) -> tuple:
    """Random ``g_B`` ``[rows, 64]`` and packed ``K^T`` ``[64, 32, 2]`` for the shared loop (float16-exact, or
    int16) and a memory holding them as it reads them: rows of 64 16-bit ``g_B``, :data:`SHARED_ROW_BYTES` apart,
    then ``K^T`` (rows of 128 bytes) at the returned offset."""
    if i16:
        g, kt = torch.randint(-9000, 9000, (rows, 64)), torch.randint(-9000, 9000, (64, 32, 2))
        halves = g.to(torch.int16)
    else:
        g, kt = torch.randn(rows, 64).half().float(), torch.randn(64, 32, 2).half().float()
        halves = g.half().view(torch.int16)
    mem = np.zeros(rows * SHARED_ROW_BYTES + 64 * 128, dtype=np.uint8)
    for r in range(rows):
        mem[r * SHARED_ROW_BYTES : r * SHARED_ROW_BYTES + 128] = halves[r].numpy().view(np.uint8)
    kt_at = rows * SHARED_ROW_BYTES
    words = mem.view(np.uint32)
    for b in range(64):
        for j in range(32):
            words[(kt_at + 128 * b) // 4 + j] = _pair(kt[b, j, :1], kt[b, j, 1:], i16)
    return g, kt, mem, kt_at


def _shared_minimum(kt: torch.Tensor, g_row: torch.Tensor, lane: int, half: int, i16: bool) -> float:
    """What the Triton loop gives for one row, lane and half: ``min_B (K^T[B, lane] + g_B)`` in float16 (int16
    wrapping) arithmetic."""
    if i16:
        sums = (kt[:, lane, half] + g_row + 32768) % 65536 - 32768
    else:
        sums = (kt[:, lane, half].half() + g_row.half()).float()
    return sums.min().float().item()


@pytest.mark.parametrize(("i16", "unroll"), [(False, 4), (False, 8), (False, 16), (True, 4), (True, 8)])
def test_shared_ptx_loop_gives_the_minima_in_place(i16: bool, unroll: int):
    """The shared-memory loop (``candidate_loop_ptx(shared=True)``): rows of 64 16-bit ``g_B`` (one a candidate,
    broadcast to both halves of the sum), its minima written over them at the lane's word, ``row_bytes`` apart; the
    same minima as the Triton loop, in float16 (int16 wrapping) arithmetic."""
    torch.manual_seed(unroll + 10 * i16)
    rows, row_bytes, lane = 3, SHARED_ROW_BYTES, 7
    g, kt, mem, kt_at = _shared_problem(rows, i16)
    words = mem.view(np.uint32)
    ptx = candidate_loop_ptx(rows, row_bytes, i16=i16, unroll=unroll, shared=True)
    assert "ld.global.v4" not in ptx and "bar.sync 0" in ptx
    emulate(ptx, mem, {"$1": 0, "$2": kt_at + 4 * lane, "$3": 4 * lane})
    for r in range(rows):
        got = _halves(int(words[(r * row_bytes + 4 * lane) // 4]), i16)
        for h in range(2):
            assert got[h].float().item() == _shared_minimum(kt, g[r], lane, h, i16), (r, h)


@pytest.mark.parametrize("i16", [False, True])
def test_shared_ptx_loop_needs_its_barrier(i16: bool):
    """Several lanes of one group of rows (as the warp's threads share them): with ``bar.sync`` honoured every lane
    writes its minima over ``g_B`` only after all have read it, and each gets the Triton loop's minima; run one lane
    after another (no barrier) the later lanes read minima as ``g_B`` and go wrong, so the barrier is what the
    in-place layout relies on, and it sits between the loop and the first store."""
    torch.manual_seed(5 + i16)
    rows, row_bytes, lanes = 2, SHARED_ROW_BYTES, (0, 7, 31)
    ptx = candidate_loop_ptx(rows, row_bytes, i16=i16, unroll=8, shared=True)
    lines = ptx.split("\n")
    at = lines.index("bar.sync 0;")
    assert lines[at - 1].startswith("@clp bra") and lines[at + 1].startswith("st.shared.b32")
    state = torch.get_rng_state()

    def run(barrier: bool) -> int:
        torch.set_rng_state(state)  # the same problem for both runs
        g, kt, mem, kt_at = _shared_problem(rows, i16)
        words = mem.view(np.uint32)
        emulate_threads(ptx, mem, [{"$1": 0, "$2": kt_at + 4 * j, "$3": 4 * j} for j in lanes], barrier)
        wrong = 0
        for r in range(rows):
            for j in lanes:
                got = _halves(int(words[(r * row_bytes + 4 * j) // 4]), i16)
                for h in range(2):
                    wrong += got[h].float().item() != _shared_minimum(kt, g[r], j, h, i16)
        return wrong

    assert run(barrier=True) == 0
    assert run(barrier=False) > 0


def test_ptx_loop_and_launch_argument_checks():
    with pytest.raises(ValueError, match="rows must be >= 1"):
        candidate_loop_ptx(0, 384)
    with pytest.raises(ValueError, match="unroll must be a multiple of 4 dividing 64"):
        candidate_loop_ptx(4, 384, unroll=6)
    with pytest.raises(ValueError, match="row_bytes"):
        candidate_loop_ptx(4, 100)
    with pytest.raises(ValueError, match="row_bytes"):
        candidate_loop_ptx(4, 136, shared=True)  # not a multiple of 16
    assert "ld.shared.v2.b32" in candidate_loop_ptx(4, 128, shared=True)  # 64 halves fit 128 bytes
    with pytest.raises(ValueError, match="asm_loop applies to the searches"):
        encode_meta(128, 11, 64, 4, 1, "split", "tf32", asm_loop=True)
    with pytest.raises(ValueError, match="wide_lanes=False"):
        encode_meta(128, 11, 64, 4, 1, "split_h2", "half", wide_lanes=True, asm_loop=True)
    with pytest.raises(ValueError, match="unroll must be a multiple of 4"):
        encode_meta(128, 11, 64, 4, 1, "split_h2", "half", unroll=2, asm_loop=True)
    with pytest.raises(ValueError, match="block_n rows over num_warps"):
        encode_meta(128, 11, 16, 32, 1, "split_h2", "half", asm_loop=True)
    # the same checks off Triton (the PyTorch path), where the option itself has no effect
    x, _ = normalize_keys(torch.randn(1, 2, 8, 16))
    theta = torch.randn(2, 3, 128, 8) * 0.2
    with pytest.raises(ValueError, match="wide_lanes=False"):
        encode_keys(x[0], theta, use_triton=False, precision="half", wide_lanes=True, asm_loop=True)
    with pytest.raises(ValueError, match="asm_loop applies to the searches"):
        encode_keys(x[0], theta, use_triton=False, asm_loop=True)  # the flat search of "ieee"
    with pytest.raises(ValueError, match="pass asm_loop=True with it"):
        encode_keys(x[0], theta, use_triton=False, precision="half", shared_scratch=True)
    with pytest.raises(ValueError, match="block_n <= 64"):
        encode_meta(128, 11, 128, 8, 1, "split_h2", "half", asm_loop=True, shared_scratch=True)
    with pytest.raises(ValueError, match="precision='half'"):  # "tf32" at 32 rows: Triton's own 48 KB alone
        encode_meta(128, 11, 32, 4, 1, "split_h2", "tf32", asm_loop=True, shared_scratch=True)
    for rows in (16, 32, 64):  # whole KB (Triton's shared memory after it stays 1024-byte aligned), every row held
        size = shared_scratch_bytes(rows)
        assert size % 1024 == 0 and rows * SHARED_ROW_BYTES <= size < rows * SHARED_ROW_BYTES + 1024


def test_f_tables_in_halves_order():
    """The asm path's ``f`` tables: row ``c`` is ``A = c // 2 + 32 (c % 2)`` (the packed minima's half ``c``)."""
    from pressroom.kernels.commvq_encode import KeyTables

    tables = KeyTables(torch.randn(2, 3, 128, 64, generator=torch.Generator().manual_seed(3)) * 0.1)
    for dtype in (None, torch.float16):
        uh, unh = tables.f_tables_in_halves(dtype)
        ud, un = tables.dot_tables(dtype)[0], tables.split_tables()[0]
        for c in (0, 1, 2, 3, 62, 63):
            a = c // 2 + 32 * (c % 2)
            assert torch.equal(uh[:, :, c], ud[:, :, a]) and torch.equal(unh[:, :, c], un[:, :, a])
    assert uh.dtype == torch.float16 and uh.is_contiguous() and unh.is_contiguous()


def test_asm_loop_meta_takes_the_ptx_only_where_it_runs(monkeypatch):
    """``asm_loop=True`` always routes the step's end through the 160-entry scratch; the PTX loop itself only where
    the launch compiles PTX (not the interpreter), the GPU runs it (``native_ptx``) and, for ``"split_dpx"``, sm_90."""
    from pressroom.kernels import commvq_encode

    def meta(search="split_h2", **kw):
        return encode_meta(128, 11, 64, 4, 1, search, "half", row_norms=True, asm_loop=True, **kw)[0]

    got = meta()  # under the interpreter
    assert got["ASM_LOOP"] and got["SCR_W"] == SCRATCH_ASM == 160 and "ASM_PTX" not in got
    assert meta(shared_scratch=True) == got  # no PTX, no shared layout
    monkeypatch.setattr(commvq_encode, "triton_interpreted", lambda: False)  # a launch compiled for a GPU
    got = meta()
    assert got["ASM_PTX"] and got["ASM_ROWS"] == 16 and "min.f16x2" in got["LOOP_PTX"]
    for off in (meta(native_ptx=False), meta("split_dpx", native_dpx=False)):  # ROCm / before sm_80; sm_80-89
        assert off["ASM_LOOP"] and off["SCR_W"] == 160 and "ASM_PTX" not in off and "LOOP_PTX" not in off
    assert "add.s16x2" in meta("split_dpx")["LOOP_PTX"]
    shared = meta(shared_scratch=True)  # g_B and the minima in shared memory, the float32 g_B alone in the scratch
    assert shared["SHARED"] and shared["SCR_W"] == 64 and "ld.shared.v2.b32" in shared["LOOP_PTX"]
    assert f"prs_key_scratch[{64 * SHARED_ROW_BYTES}]" in shared["SHARED_DECL"]
    off = meta(shared_scratch=True, native_ptx=False)  # no PTX: the global scratch of asm_loop alone
    assert "SHARED" not in off and off["SCR_W"] == SCRATCH_ASM
    assert "ASM_LOOP" not in encode_meta(128, 11, 64, 4, 1, "split_h2", "half")[0]  # the default: no scratch trip


@pytest.mark.parametrize("search", ["split_h2", "split_dpx"])
def test_asm_loop_path_equals_the_reference_with_exact_ties(search: str):
    """``asm_loop=True`` off the PTX (here: the interpreter) runs the Triton loop but the PTX path's end of a step: the
    minima through the scratch, ``A`` picked from its 64 halves in memory order (half ``c`` holds ``A = c // 2 + 32
    (c % 2)``), ``g_B`` reloaded from the scratch for ``B``. The same codes as the reference, and on an exact tie
    between ``A = 1`` (half 2) and ``A = 32`` (half 1) the first ``A``, not the first half."""
    g = torch.Generator().manual_seed(11)
    theta = (torch.randn(1, 2, 128, 64, generator=g) * 0.1).half().float()
    theta[:, :, 64:66] = theta[:, :, 2:4]  # u_32 = u_1 (and w_32 = w_1)
    u, w = additive_parts(theta)
    x, _ = normalize_keys(torch.randn(1, 1, 40, 128, generator=g))
    x = x[0].clone()
    x[:8, 0] = u[0, 0, 1] + w[0, 0, 0]  # centre (1, 0) = centre (32, 0) exactly: a tie at distance 0
    kw = dict(search=search, precision="half", key_norm_bound=2.0, block_n=16, num_warps=4)
    got = encode_keys(x, theta, use_triton=True, asm_loop=True, **kw)
    want = encode_keys_split_h2_reference(x, theta, None, torch.float16, "i16" if search == "split_dpx" else "f16", 2.0)
    assert torch.equal(got, want)
    assert (unpack_codes12(got, 2)[:8, 0, 0] == 64).all()  # A = 1, B = 0
    assert torch.equal(got, encode_keys(x, theta, use_triton=True, **kw))
    # shared_scratch where no PTX runs: accepted, and the same path (its shared layout is the GPU tests' part)
    assert torch.equal(got, encode_keys(x, theta, use_triton=True, asm_loop=True, shared_scratch=True, **kw))


@pytest.mark.parametrize("use_triton", [False, True])
def test_the_cache_passes_its_ptx_key_options_only_where_the_ptx_runs(monkeypatch, coded_layer, use_triton):
    """``commvq_cache.PTX_KEY_OPTIONS`` reach ``encode_keys`` for ``encode_precision="half"`` on the Triton path of
    a GPU that runs the PTX loop (here faked), nowhere else; the codes are those of the defaults (the interpreter
    runs the Triton loop for ``asm_loop``)."""
    if use_triton and not triton_interpreted():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    from pressroom.presses import commvq_cache
    from pressroom.presses.commvq_codebooks import ValueCodec

    calls = []

    def spy(*args, **kwargs):
        calls.append({k: kwargs[k] for k in ("asm_loop", "shared_scratch", "unroll") if k in kwargs})
        return encode_keys(*args, **kwargs)

    monkeypatch.setattr(commvq_cache, "encode_keys", spy)
    options = dict(asm_loop=True, shared_scratch=True, unroll=8)
    monkeypatch.setattr(commvq_cache, "PTX_KEY_OPTIONS", options)
    torch.manual_seed(3)
    heads, d, n = 2, 16, 40
    theta = (torch.randn(heads, 2, 128, d // 2) * 0.1).half().float()
    raw, values = torch.randn(1, heads, n, d), torch.randn(1, heads, n, d)
    codes = {}
    for native in (False, True):
        monkeypatch.setattr(commvq_cache, "ptx_loop_native", lambda device, native=native: native)
        for precision in ("half", "tf32"):
            calls.clear()
            codec = ValueCodec(heads * d, 1)
            layer = coded_layer(theta, codec, raw, values, use_triton=use_triton, encode_precision=precision)
            want = options if native and use_triton and precision == "half" else {}
            assert calls and all(c == want for c in calls)
            codes[native, precision] = layer.codes[:, :, :n].clone()
    assert torch.equal(codes[True, "half"], codes[False, "half"])


_ASM_PROBE = """
import json, os, re, subprocess, tempfile
from triton import knobs
from pressroom.kernels import commvq_encode
from pressroom.kernels.commvq_resources import _cubin_usage, kernel_resources_compiled
half = {k: "*fp16" for k in ("ud_ptr", "wd_ptr", "u_ptr", "w_ptr")}
out = {}
# (search, shared g_B, block_n, head_dim): the default tiling, the other sizes shared_scratch allows, and a head_dim
# whose table rows are not a power of two of 128-byte lines (the prefetch's clamped chunks)
for search, shared, bn, d in (("split_h2", False, 64, 128), ("split_dpx", False, 64, 128), ("split_h2", True, 64, 128),
                              ("split_h2", True, 32, 128), ("split_h2", True, 16, 96)):
    meta, (nw, ns) = commvq_encode.encode_meta(d, 11, bn, 4, 1, search, "half", row_norms=True, asm_loop=True,
                                               shared_scratch=shared, prefetch=True)
    meta.update(NATIVE=True, PREFETCH=True)  # what a launch on sm_90 compiles
    c = kernel_resources_compiled(commvq_encode.encode_kernel(search), meta, nw, ns, half)
    ptx = c.asm["ptx"]
    key = f"{search}{'_shared' if shared else ''}_{bn}_{d}"
    out[key] = dict(meta_rows=meta.get("ASM_ROWS"), block_n=bn, labels=len(re.findall(r"^\\s*CL\\d+:", ptx, re.M)),
                    v4=ptx.count("ld.global.v4.b32 {clx0"), shared_v2=ptx.count("ld.shared.v2.b32 {clx0"),
                    decls=len(re.findall(r"\\.shared .*prs_key_scratch\\[", ptx)), dynamic_shared=c.metadata.shared,
                    **_cubin_usage(c.asm["cubin"]))
    with tempfile.TemporaryDirectory() as tmp:  # the SASS, where cuobjdump is
        path = os.path.join(tmp, "k.cubin")
        open(path, "wb").write(c.asm["cubin"])
        try:
            sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True).stdout
            res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True)
            m = re.search(r"SHARED:(\\d+)", res.stdout)
            if m:
                out[key]["static_shared"] = int(m.group(1))
        except Exception:
            sass = ""
    ops = re.findall(r"\\*/\\s+(?:@!?U?P\\w+\\s+)?([A-Z][A-Z0-9_.]*)", sass)
    out[key]["sass"] = {op: sum(o.split(".")[0] == op for o in ops) for op in ("HMNMX2", "VHMNMX", "VIADDMNMX")}
print(json.dumps(out))
"""


def test_asm_loop_compiles_for_sm90(sm90_probe):
    """The launches ``asm_loop=True`` makes compile offline for sm_90 (with the tables' prefetch; the default tiling,
    16 rows a thread, and with ``shared_scratch`` the smaller tilings it allows and a head_dim of 96) with the loop
    once per kernel (a unique label), one ``g_B`` load per row and 4 candidates, the shared array declared once, at
    most a small spill, and static and dynamic shared memory within the 48 KB a launch has without opting in."""
    got = sm90_probe(_ASM_PROBE)
    for search, row in got.items():
        shared, rows = "_shared" in search, row["block_n"] // 4
        assert row["meta_rows"] == rows and row["labels"] == 1, (search, row)
        # per row and 4 candidates one 16-byte load of packed pairs (global) or one 8-byte load of halves (shared)
        assert (row["v4"], row["shared_v2"], row["decls"]) == ((0, rows, 1) if shared else (rows, 0, 0)), (search, row)
        if "stack_bytes" in row:
            assert row["stack_bytes"] <= 64, (search, row)
        if "static_shared" in row:  # static and dynamic together within the 48 KB a launch has without opting in
            assert row["static_shared"] + row["dynamic_shared"] <= 48 * 1024, (search, row)
            assert row["static_shared"] >= (shared_scratch_bytes(row["block_n"]) if shared else 0), (search, row)
        ops = row["sass"]
        if any(ops.values()) and rows == 16:  # cuobjdump was there: the loop's 64 minima per pass, fused as ptxas likes
            if search.startswith("split_dpx"):
                assert ops["VIADDMNMX"] == 64, ops
            else:
                assert ops["HMNMX2"] + 2 * ops["VHMNMX"] == 64 and ops["VIADDMNMX"] == 0, ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("search", ["split_h2", "split_dpx"])
@pytest.mark.parametrize(("block_n", "num_warps"), [(64, 4), (32, 2), (64, 8), (32, 8), (16, 4)])
@pytest.mark.parametrize(("shared", "prefetch"), [(False, False), (True, False), (True, True)])
def test_asm_loop_equals_the_triton_loop_on_a_gpu(search: str, block_n: int, num_warps: int, shared: bool, prefetch):
    """On a GPU that runs the PTX loop: the same codes as the Triton loop, at 16, 8 and 4 rows a thread, with the
    global scratch and with ``g_B`` and the minima in shared memory (and the tables' L1 prefetch)."""
    from pressroom.kernels.commvq_encode import dpx_native, ptx_loop_native

    device = torch.device("cuda")
    if not ptx_loop_native(device) or (search == "split_dpx" and not dpx_native(device)):
        pytest.skip("this GPU runs the Triton loop")
    g = torch.Generator().manual_seed(block_n + num_warps)
    theta = (torch.randn(4, 5, 128, 64, generator=g) * 0.1).half().float().to(device)
    x, _ = normalize_keys(torch.randn(1, 4, 1000, 128, generator=g).to(device))
    kw = dict(use_triton=True, search=search, precision="half", block_n=block_n, num_warps=num_warps)
    kw["key_norm_bound"] = 1.0
    got = encode_keys(x[0], theta, **kw, asm_loop=True, shared_scratch=shared, prefetch=prefetch)
    assert torch.equal(got, encode_keys(x[0], theta, **kw))
