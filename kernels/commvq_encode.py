"""CommVQ key encoding fused with 12-bit packing, and the bit packing of key codes and value bits.

CommVQ (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025, arXiv 2506.18879)
codes a key head vector (before RoPE, interleaved pair layout, divided by the token's norm) with ``R`` greedy residual
steps; each step picks one of 4096 centers ``u_A + w_B`` (:func:`pressroom.kernels.commvq_codebook.additive_parts`),
a 12-bit code ``C = 64 A + B``. This module holds what the cache stores:

- :func:`pack_codes12` / :func:`unpack_codes12`: ``R`` 12-bit codes in ``ceil(1.5 R)`` bytes (two codes in three
  bytes, little-endian: code ``2j`` is byte ``3j`` plus the low nibble of byte ``3j+1``; code ``2j+1`` is the high
  nibble of byte ``3j+1`` plus byte ``3j+2``).
- :func:`pack_bits` / :func:`unpack_bits`: 0/1 values, 8 per byte, least significant bit first.
- :func:`encode_keys`: the residual nearest-center search of every residual step of one token block in one Triton
  program (the additive structure: per step 128 dot products and a 64x64 table per vector, never a ``[N, 4096]``
  distance matrix), writing the packed bytes directly; :func:`encode_keys_reference` is the plain-PyTorch
  reference (:func:`pressroom.kernels.commvq_codebook.residual_encode` then :func:`pack_codes12`).
- :func:`normalize_keys`: the pre-RoPE keys of a token (all KV heads), interleaved, divided by their joint L2 norm.

Dispatch as everywhere in pressroom: ``use_triton=None`` runs the kernel on CUDA tensors and the reference elsewhere
(or always the reference with ``PRESSROOM_FORCE_REFERENCE=1``).
"""

from __future__ import annotations

import functools

import torch

from pressroom.kernels.commvq_codebook import N_ENTRIES, THETA_ROWS, additive_parts, residual_encode, to_interleaved
from pressroom.kernels.f16x2 import pack_f16x2, pack_i16x2
from pressroom.kernels.rope_ring import HAS_TRITON, resolve_use_triton, triton_interpreted

if HAS_TRITON:
    import triton
    import triton.language as tl

    from pressroom.kernels.f16x2 import _f16_halves, _f16_pack, _hadd2, _hmin2, _i16_halves, _i16_pack, _viaddmin2

_BIT_WEIGHTS = (1 << torch.arange(8)).to(torch.uint8)
# "split_h2": the largest codebook term (|K|, ||u||^2, ||w||^2) and key-side bound (||w||^2 + 2 ||x|| ||w||) let
# through to float16 sums (max 65504): far above unit-norm keys and their codebooks, far below overflow
F16_SAFE = 1.0e4
# "split_dpx": candidate sums in int16 fixed point, |sum| kept at most I16_SPAN (the sentinel 32767 stays above)
I16_SPAN = 32766


@functools.lru_cache(maxsize=64)  # a pure function of its arguments; each launch of asm_loop asks for it
def candidate_loop_ptx(rows: int, row_bytes: int, i16: bool = False, unroll: int = 4, shared: bool = False) -> str:
    """PTX of the paired searches' candidate loop for one thread (``encode_keys(asm_loop=True)``): the minima over
    ``B`` of one packed lane (two ``A``) for ``rows`` consecutive scratch rows.

    Operands: ``$1`` the first row's ``g_B`` (rows ``row_bytes`` apart), ``$2`` the lane's entry in the step's packed
    ``K^T`` (global, rows of 128 bytes), ``$3`` where to write the first row's minimum (the others ``row_bytes``
    apart); ``$0`` a dummy. Per ``unroll`` candidates ``B`` the thread loads its ``unroll`` ``K^T`` entries once and
    each row's ``g_B`` as vectors, then runs one ``add.rn.f16x2`` and one ``min.f16x2`` (``i16``: ``add.s16x2`` then
    ``min.s16x2``, one sm_90 ``VIADDMNMX``) per entry. The same sums, in the same float16 (or int16) arithmetic, as
    the Triton loop it replaces (minima do not depend on the order).

    Two layouts of ``g_B``:

    - global (``shared=False``): the scratch's 64 packed pairs (``g_B`` in both halves, 4 bytes an entry, 16-byte
      loads of 4 candidates: ``unroll + rows * unroll / 4`` loads per ``unroll`` candidates, 20 for 4 candidates
      and 16 rows, against the compiler's ``unroll * (rows + 1)``, 68); ``$1``, ``$2``, ``$3`` 64-bit global
      addresses;
    - shared (``shared=True``, ``encode_keys(shared_scratch=True)``): 64 float16 (int16) ``g_B`` a row, 2 bytes an
      entry, in shared memory: one 16-byte load per row and 8 candidates (8 bytes for 4), each half broadcast to
      both halves of the add's operand (``mov.b32 {h, h}``, which ptxas folds into the instruction's ``.H0_H0`` /
      ``.H1_H1`` operand selector); ``$1`` and ``$3`` 32-bit shared addresses. The loop ends with ``bar.sync 0``
      (every thread of the program has read its ``g_B``) and writes each row's minimum over its ``g_B``: ``$3`` is
      then the lane's word in the first row (128 bytes of minima in place of the 128 bytes of ``g_B``), so every
      thread of the program must run this PTX exactly once.

    Parameters
    ----------
    rows : int
        Scratch rows a thread takes (``block_n / num_warps`` in the kernel).
    row_bytes : int
        Bytes from one scratch row to the next (``4 * SCRATCH_ASM`` in the kernel's global scratch,
        :data:`SHARED_ROW_BYTES` in its shared one), a multiple of 16, at least 256 (global) or 128 (shared).
    i16 : bool
        Signed int16 pairs (``"split_dpx"``) instead of float16 pairs.
    unroll : int
        Candidates per loop pass, a multiple of 4 dividing 64.
    shared : bool
        ``g_B`` and the minima in shared memory (above), instead of the global scratch.

    Returns
    -------
    str
        The PTX, one scoped block (its registers local, its label unique per instance: ``${:uid}``).

    Raises
    ------
    ValueError
        For ``rows``, ``row_bytes`` or ``unroll`` outside those ranges.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}.")
    if unroll < 4 or unroll % 4 or 64 % unroll:
        raise ValueError(f"unroll must be a multiple of 4 dividing 64, got {unroll}.")
    least = 128 if shared else 256
    if row_bytes < least or row_bytes % 16:
        raise ValueError(f"row_bytes must be a multiple of 16 holding 64 entries (>= {least}), got {row_bytes}.")
    add, mn, inf = ("add.s16x2", "min.s16x2", "0x7FFF7FFF") if i16 else ("add.rn.f16x2", "min.f16x2", "0x7C007C00")
    width = 2 if shared else 4  # bytes of g_B a candidate
    out = [
        "{",
        ".reg .pred clp;",
        ".reg .b64 clk, cle;",
        f".reg .b32 clm<{rows}>, clc<{unroll}>, clx<4>, clt;",
        *((".reg .b32 clg, cld;", ".reg .b16 cll, clh;") if shared else (".reg .b64 clg;",)),
        f"mov.b{32 if shared else 64} clg, $1;",
        "mov.b64 clk, $2;",
        "add.s64 cle, clk, 8192;",
        *(f"mov.b32 clm{i}, {inf};" for i in range(rows)),
        "CL${:uid}:",
        *(f"ld.global.b32 clc{j}, [clk+{128 * j}];" for j in range(unroll)),
    ]
    space = "shared" if shared else "global"
    for i in range(rows):
        b = 0  # the candidate of the pass the next loaded word starts with
        while b < unroll:
            n_words = 2 if shared and unroll - b < 8 else 4  # 16-byte loads; 8 bytes for the last 4 of a pass
            regs = ", ".join(f"clx{k}" for k in range(n_words))
            vec = "v4" if n_words == 4 else "v2"
            out.append(f"ld.{space}.{vec}.b32 {{{regs}}}, [clg+{i * row_bytes + width * b}];")
            for k in range(n_words):
                if shared:  # two candidates a word, each half broadcast
                    out.append(f"mov.b32 {{cll, clh}}, clx{k};")
                    for half in ("cll", "clh"):
                        out.append(f"mov.b32 cld, {{{half}, {half}}};")
                        out += [f"{add} clt, clc{b}, cld;", f"{mn} clm{i}, clm{i}, clt;"]
                        b += 1
                else:
                    out += [f"{add} clt, clc{b}, clx{k};", f"{mn} clm{i}, clm{i}, clt;"]
                    b += 1
    out += [
        f"add.{'s32' if shared else 's64'} clg, clg, {width * unroll};",
        f"add.s64 clk, clk, {128 * unroll};",
        "setp.lt.u64 clp, clk, cle;",
        "@clp bra CL${:uid};",
        *(("bar.sync 0;",) if shared else ()),  # every g_B read before the minima take its place
        *(f"st.{space}.b32 [$3+{i * row_bytes}], clm{i};" for i in range(rows)),
        "mov.b32 $0, 0;",
        "}",
    ]
    return "\n".join(out)


def code_bytes(residuals: int) -> int:
    """Bytes that ``residuals`` packed 12-bit codes take: ``ceil(1.5 R)``."""
    if residuals < 1:
        raise ValueError(f"residuals must be >= 1, got {residuals}.")
    return (3 * residuals + 1) // 2


def pack_codes12(codes: torch.Tensor) -> torch.Tensor:
    """Pack 12-bit codes ``[..., R]`` (any integer dtype, values 0..4095) into uint8 ``[..., ceil(1.5 R)]``."""
    if codes.dim() < 1:
        raise ValueError("codes must have a trailing residual dimension.")
    r = codes.shape[-1]
    c = codes.to(torch.int32)
    if r % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    c = c.unflatten(-1, (-1, 2))
    lo, hi = c[..., 0], c[..., 1]
    out = torch.stack((lo & 0xFF, (lo >> 8) | ((hi & 0xF) << 4), hi >> 4), dim=-1).flatten(-2)
    return out[..., : code_bytes(r)].to(torch.uint8)


def unpack_codes12(packed: torch.Tensor, residuals: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes12`: uint8 ``[..., ceil(1.5 R)]`` -> int64 codes ``[..., R]``."""
    nb = code_bytes(residuals)
    if packed.shape[-1] != nb:
        raise ValueError(f"{residuals} codes take {nb} bytes, got {packed.shape[-1]}.")
    b = packed.to(torch.int32)
    if nb % 3:
        b = torch.nn.functional.pad(b, (0, 3 - nb % 3))
    b = b.unflatten(-1, (-1, 3))
    lo = b[..., 0] | ((b[..., 1] & 0xF) << 8)
    hi = (b[..., 1] >> 4) | (b[..., 2] << 4)
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :residuals].long()


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values ``[..., n]`` (n a multiple of 8) into uint8 ``[..., n/8]``, least significant bit first."""
    n = bits.shape[-1]
    if n % 8:
        raise ValueError(f"the bit dimension must be a multiple of 8, got {n}.")
    b = bits.to(torch.uint8).unflatten(-1, (n // 8, 8))
    return (b * _BIT_WEIGHTS.to(b.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., m]`` -> ``[..., 8m]`` of 0/1 in ``dtype``."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.flatten(-2).to(dtype)


def normalize_keys(raw_keys: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys ``[B, H_kv, N, D]`` (``rotate_half`` layout) -> ``(x [B, N, H_kv, D], norms [B, N])``.

    ``x`` is float32, interleaved per head, divided by the L2 norm of the token's keys over all KV heads together
    (CommVQ normalizes per token, keeping the norm). A zero key gives norm 0 and ``x = 0``.
    """
    if raw_keys.dim() != 4:
        raise ValueError(f"keys must be [batch, kv_heads, tokens, head_dim], got {tuple(raw_keys.shape)}.")
    x = to_interleaved(raw_keys.float()).transpose(1, 2)  # [B, N, H, D]
    norms = torch.linalg.vector_norm(x, dim=(2, 3))  # read in place, summed as CommVQLayer's encode sums them
    x = x / torch.where(norms > eps, norms, torch.ones_like(norms))[..., None, None]
    return x.contiguous(), norms


def _check_encode(x: torch.Tensor, thetas: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"normalized keys must be [N, H_kv, D], got {tuple(x.shape)}.")
    if thetas.dim() != 4 or thetas.shape[-2] != THETA_ROWS:
        raise ValueError(f"thetas must be [H_kv, R, 128, D/2], got {tuple(thetas.shape)}.")
    n, h, d = x.shape
    if thetas.shape[0] != h or 2 * thetas.shape[-1] != d:
        raise ValueError(f"thetas {tuple(thetas.shape)} do not fit keys {tuple(x.shape)}.")
    return n, h, d, thetas.shape[1]


def encode_keys_reference(x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`encode_keys`: per head ``residual_encode`` then :func:`pack_codes12`."""
    n, h, _, r = _check_encode(x, thetas)
    out = torch.empty(n, h, code_bytes(r), dtype=torch.uint8, device=x.device)
    for head in range(h):
        codes, _ = residual_encode(x[:, head], thetas[head], use_triton=False)
        out[:, head] = pack_codes12(codes)
    return out


def encode_keys_split_h2_reference(
    x: torch.Tensor,
    thetas: torch.Tensor,
    tables: KeyTables | None = None,
    dot_dtype: torch.dtype | None = None,
    sums: str = "f16",
    key_norm_bound: float = 1.0,
) -> torch.Tensor:
    """Plain-PyTorch ``search="split_h2"`` (``sums="f16"``) or ``"split_dpx"`` (``sums="i16"``) of
    :func:`encode_keys`, rounding as the kernel does. Per step and row, with ``K = 2 u_A . w_B`` and ``g_B =
    ||w_B||^2 - 2 r . w_B``:

    - ``"f16"``: ``m_A = min_B fp16(fp16(K[A, B]) + fp16(g_B))`` (each sum rounded to float16);
    - ``"i16"``: ``m_A = s * min_B (Kq[A, B] + gq_B)``, exact int16 sums of the fixed-point ``Kq = round(K / s)`` and
      ``gq = clamp(floor(g / s + 1/2), -c, c)`` (``s`` and ``c`` per step: :meth:`KeyTables.split_i16_tables` for
      ``key_norm_bound``);

    ``A`` is the first arg-min of ``m_A + f_A`` in float32 (``f_A = ||u_A||^2 - 2 r . u_A``), then ``B`` the first
    arg-min of the float32 ``K[A, B] + g_B``; packed as :func:`pack_codes12`. The kernel equals this bit for bit under
    the interpreter; compiled for a GPU it may also fuse a product and a sum into one multiply-add (``g / s + 1/2``,
    ``s m + f``), so near-ties may go another way there, as with its tensor-core dot products. ``tables``: those of
    ``thetas`` on ``x``'s device, if the caller holds them (built otherwise). ``dot_dtype=torch.float16``: the dot
    products' operands (residual and ``u``, ``w``) rounded to float16 first, as the kernel's."""
    if sums not in ("f16", "i16"):
        raise ValueError(f"sums must be 'f16' or 'i16', got {sums!r}.")
    n, h, _, r = _check_encode(x, thetas)
    if tables is None:
        tables = KeyTables(thetas.to(x.device))
    ud, wd = (t.float() for t in tables.dot_tables(dot_dtype))
    rnd = torch.float32 if dot_dtype is None else dot_dtype
    un, wn, k, _ = tables.split_tables()
    if sums == "f16":
        k16 = k.half()
    else:
        kq, qs = tables.split_i16_tables(key_norm_bound)[1:]
        kq = kq.view(h, r, 64, 64)
    codes = torch.empty(n, h, r, dtype=torch.long, device=x.device)
    for head in range(h):
        res = x[:, head].float()
        for step in range(r):
            u, w = tables.u[head, step], tables.w[head, step]
            rd = res.to(rnd).float()
            g = wn[head, step] - 2.0 * rd @ wd[head, step].T  # [n, 64]
            f = un[head, step] - 2.0 * rd @ ud[head, step].T
            m = torch.empty_like(f)
            if sums == "f16":
                g16 = g.half().float()
                k16s = k16[head, step].float()[None]
                for s in range(0, n, 2048):  # [rows, A, B] float16 sums (float32 sum rounded: the float16 add), 2k rows
                    m[s : s + 2048] = (k16s + g16[s : s + 2048, None, :]).half().amin(-1).float()
            else:
                scale, inv, clamp = qs[head * r + step]
                gq = torch.clamp(torch.floor(g * inv + 0.5), -clamp, clamp).to(torch.int32)
                kqs = kq[head, step].to(torch.int32)
                for s in range(0, n, 2048):
                    m[s : s + 2048] = (kqs[None] + gq[s : s + 2048, None, :]).amin(-1).float() * scale
            a = (m + f).argmin(-1)
            b = (k[head, step][a] + g).argmin(-1)
            codes[:, head, step] = a * 64 + b
            res = res - (u[a] + w[b])
    return pack_codes12(codes)


class KeyTables:
    """The per-layer tables the encode kernel reads: ``u``, ``w`` ``[H, R, 64, D]`` and ``H[A, B] = ||u_A + w_B||^2``
    ``[H, R, 64, 64]``, float32, built once per layer and device (:func:`key_tables`)."""

    def __init__(self, thetas: torch.Tensor) -> None:
        theta = thetas.float()
        self.u, self.w = (t.contiguous() for t in additive_parts(theta))
        self.h = (self.u.unsqueeze(-2) + self.w.unsqueeze(-3)).pow(2).sum(-1).contiguous()
        self.residuals = thetas.shape[1]
        self._split: tuple[torch.Tensor, ...] | None = None
        self._split_h2: torch.Tensor | None = None
        self._h2_bounds: tuple[float, float] | None = None  # (max ||w_B||^2, residual growth), with the split_h2 table
        self._dot16: tuple[torch.Tensor, torch.Tensor] | None = None
        self._i16: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._exact16: bool | None = None
        self._halves: dict[torch.dtype | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def split_tables(self) -> tuple[torch.Tensor, ...]:
        """What the ``"split"`` search reads: ``||u_A||^2``, ``||w_B||^2`` ``[H, R, 64]`` and the cross term
        ``K[A, B] = 2 u_A . w_B`` ``[H, R, 64, 64]`` with its transpose (``H[A, B] = ||u_A||^2 + ||w_B||^2 + K``)."""
        if self._split is None:
            # float64: exact to float32 whatever the global TF32 setting of float32 matmuls
            k = (2.0 * torch.matmul(self.u.double(), self.w.double().transpose(-1, -2))).float()
            un, wn = self.u.pow(2).sum(-1), self.w.pow(2).sum(-1)
            self._split = (un.contiguous(), wn.contiguous(), k.contiguous(), k.transpose(-1, -2).contiguous())
        return self._split

    def dot_tables(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``u``, ``w`` as the ``"split_h2"`` search's dot operands: float32 (``dtype=None``, rounded to TF32 by the
        tensor cores with ``precision="tf32"``) or ``torch.float16`` (``precision="half"``; the residual is rounded
        to float16 too)."""
        if dtype is None or dtype == torch.float32:
            return self.u, self.w
        if dtype != torch.float16:
            raise ValueError(f"the dot tables are float32 or torch.float16, got {dtype}.")
        if self._dot16 is None:
            self._dot16 = (self.u.half().contiguous(), self.w.half().contiguous())
        return self._dot16

    def f_tables_in_halves(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` (as :meth:`dot_tables` gives it for ``dtype``) and ``||u_A||^2`` (:meth:`split_tables`) with their 64
        ``A`` in the order of the packed lanes' halves in memory, ``A(c) = c // 2 + 32 (c % 2)`` (``[H, R, 64, D]``
        and ``[H, R, 64]``): what ``encode_keys(asm_loop=True)`` reads for its one ``f`` dot, as contiguous rows."""
        key = dtype if dtype == torch.float16 else None
        if self._halves.get(key) is None:
            order = HALVES_ORDER.to(self.u.device)
            ud = self.dot_tables(dtype)[0]
            un = self.split_tables()[0]
            self._halves[key] = (ud[..., order, :].contiguous(), un[..., order].contiguous())
        return self._halves[key]

    def center_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``u``, ``w`` as ``precision="half"`` gathers them to subtract the chosen center: float16 when that holds
        them exactly (codebooks stored in float16, as the native ones: half the bytes, the same residuals), float32
        otherwise."""
        if self._exact16 is None:
            u16, w16 = self.dot_tables(torch.float16)
            self._exact16 = bool(torch.equal(u16.float(), self.u) and torch.equal(w16.float(), self.w))
        return self.dot_tables(torch.float16) if self._exact16 else (self.u, self.w)

    def split_h2_table(self) -> torch.Tensor:
        """What ``"split_h2"`` reads beside :meth:`split_tables`: ``K^T`` as packed float16 pairs ``[H, R, 64, 32]``
        int32, lane ``j`` of row ``B`` holding ``K[j, B]`` (low) and ``K[j + 32, B]`` (high).

        Raises
        ------
        ValueError
            If the cross term or the squared center norms exceed the float16 range (codebooks far from the
            normalized keys' scale): use ``search="split"``.
        """
        if self._split_h2 is None:
            un, wn, k, kt = self.split_tables()
            worst = max(float(k.abs().max()), float(wn.max()), float(un.max()))
            if worst > F16_SAFE:
                raise ValueError(
                    f"search='split_h2' sums in float16, but these codebooks reach {worst:.3g} (> {F16_SAFE:g}): use "
                    "search='split' (float32 sums)."
                )
            self._split_h2 = pack_f16x2(kt[..., :32], kt[..., 32:]).contiguous()
            # a residual grows by at most one center per step: sum over steps of the largest ||u_A|| + ||w_B||
            growth = float((un.amax(-1).sqrt() + wn.amax(-1).sqrt()).amax(0).sum())
            self._h2_bounds = (float(wn.max()), growth)
        return self._split_h2

    def split_i16_tables(self, key_norm_bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``"split_dpx"`` reads beside :meth:`split_tables`: the cross term in int16 fixed point, per step
        ``Kq = round(K / s)``, as packed pairs of ``K^T`` ``[H, R, 64, 32]`` int32 (lane ``j`` of row ``B``: ``Kq[j,
        B]`` low, ``Kq[j + 32, B]`` high), the same ``Kq`` unpacked ``[H, R, 4096]`` int16 (row-major ``[A, B]``),
        and per step ``(s, 1 / s, c)`` ``[H * R, 3]`` float32.

        The step ``s = (max |K| + G) / 32766`` with ``G = max ||w_B||^2 + 2 key_norm_bound max ||w_B||``, the
        largest ``|g_B|`` of a residual of norm ``key_norm_bound``; ``c = 32766 - max |Kq|`` clamps ``gq``, so every
        sum ``Kq + gq`` stays inside int16 (a residual past the bound saturates its ``g_B``, it never wraps). For
        normalized keys (``key_norm_bound=1``) and SmolLM2's 2-bit codebooks ``s`` runs from ``6e-7`` to ``1.4e-4``
        over layers, heads and steps (median ``2e-6``; the 1,000-step codebooks of
        ``benchmarks/results/commvq_smollm2_2bit_train_v1000.json``): no coarser than float16 for sums past 0.25.
        """
        key_norm_bound = float(key_norm_bound)
        if not key_norm_bound > 0:
            raise ValueError(f"key_norm_bound must be positive, got {key_norm_bound}.")
        if key_norm_bound not in self._i16:
            un, wn, k, kt = self.split_tables()
            h, r = k.shape[:2]
            kmax = k.abs().flatten(2).amax(-1).double()  # [H, R]
            wmax = wn.amax(-1).double()
            span = kmax + wmax + 2.0 * key_norm_bound * wmax.sqrt()
            scale = torch.where(span > 0, span / I16_SPAN, torch.ones_like(span))
            kq = torch.round(k.double() / scale[..., None, None])  # [H, R, A, B]
            clamp = I16_SPAN - kq.abs().flatten(2).amax(-1)
            kqt = kq.transpose(-1, -2).to(torch.int32)
            packed = pack_i16x2(kqt[..., :32], kqt[..., 32:]).contiguous()
            scale32 = scale.float()
            qs = torch.stack((scale32, 1.0 / scale32, clamp.float()), dim=-1).reshape(h * r, 3).contiguous()
            # one bound at a time (the cache passes a constant one; a computed bound changes with the keys)
            self._i16 = {key_norm_bound: (packed, kq.to(torch.int16).reshape(h, r, 4096).contiguous(), qs)}
        return self._i16[key_norm_bound]

    def check_h2_keys(self, key_norm_bound: float) -> None:
        """Raise unless ``g_B = ||w_B||^2 - 2 r . w_B`` stays inside :data:`F16_SAFE` for every residual ``r`` of
        keys of norm at most ``key_norm_bound`` (``||r|| <= key_norm_bound + the steps' largest center norms``).

        Raises
        ------
        ValueError
            If it does not, or the codebooks themselves do not fit (:meth:`split_h2_table`).
        """
        self.split_h2_table()
        w_norm2_max, growth = self._h2_bounds
        if w_norm2_max + 2.0 * (key_norm_bound + growth) * w_norm2_max**0.5 > F16_SAFE:
            raise ValueError(
                f"search='split_h2' sums in float16, but keys of norm up to {key_norm_bound:.3g} reach past "
                f"{F16_SAFE:g}: pass normalized keys (normalize_keys) or use search='split'."
            )


if HAS_TRITON:

    @triton.jit
    def _store_code12(out_row, r, R: tl.constexpr, code, prev, rmask):
        """Write step ``r``'s 12-bit codes; returns the code the odd step after it packs with."""
        # code 2j: byte 3j and the low nibble of byte 3j+1; code 2j+1: the high nibble of 3j+1 and byte 3j+2
        byte0 = (3 * (r - r % 2)) // 2
        if r % 2 == 0:
            tl.store(out_row + byte0, (code & 255).to(tl.uint8), mask=rmask)
            if r == R - 1:
                tl.store(out_row + byte0 + 1, (code >> 8).to(tl.uint8), mask=rmask)
            prev = code
        else:
            tl.store(out_row + byte0 + 1, ((prev >> 8) | ((code & 15) << 4)).to(tl.uint8), mask=rmask)
            tl.store(out_row + byte0 + 2, (code >> 4).to(tl.uint8), mask=rmask)
        return prev

    @triton.jit
    def _load_block(x_ptr, out_ptr, rows, head, cols, dmask, n_rows, stride_xn, stride_xh, stride_on, stride_oh):
        """A block of normalized keys of one head (float32 ``[rows, BLOCK_D]``), its row mask and output rows."""
        rmask = rows < n_rows
        res = tl.load(
            x_ptr + rows[:, None] * stride_xn + head * stride_xh + cols[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        return res, rmask, out_ptr + rows * stride_on + head * stride_oh

    @triton.jit
    def _persistent_program(
        scr_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCR_W: tl.constexpr = 64
    ):
        """A persistent program's ids (program, programs, head), row / column / entry ranges, column mask and its
        own ``[BLOCK_N, SCR_W]`` scratch rows (32-bit entries)."""
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        head = tl.program_id(1)
        lrow = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        scr = scr_ptr + (head * n_prog + pid) * BLOCK_N * SCR_W + lrow * SCR_W
        return pid, n_prog, head, lrow, cols, tl.arange(0, 64), cols < D, scr

    @triton.jit
    def _subtract_center(res, u_ptr, w_ptr, base, a_idx, b_idx, cols, dmask, D: tl.constexpr):
        """``res - (u_A + w_B)`` per row: the residual left for the next step."""
        ua = tl.load(u_ptr + base + a_idx[:, None] * D + cols[None, :], mask=dmask[None, :], other=0.0)
        wb = tl.load(w_ptr + base + b_idx[:, None] * D + cols[None, :], mask=dmask[None, :], other=0.0)
        return res - (ua.to(tl.float32) + wb.to(tl.float32))  # float16 tables hold float16-exact codebooks

    @triton.jit
    def _prefetch_l1(ptrs):
        """Ask for the lines at ``ptrs`` in L1 (PTX ``prefetch.global.L1``), without waiting for them: the split
        search's candidate loop then finds its ``K^T`` rows and scratch lanes there instead of in L2 (PTX: callers
        skip it under the interpreter, see ``PREFETCH`` in :func:`encode_meta`)."""
        tl.inline_asm_elementwise(
            "prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )

    @triton.jit
    def _prefetch_table(ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Ask for a ``[ROWS, COLS]`` table at ``ptr`` (contiguous, of ``ptr``'s element type; ``ROWS`` and
        ``BLOCK_COLS >= COLS`` powers of two) in L1, one ``prefetch.global.L1`` per 128 bytes of each row (the last
        one clamped into the row: with 128 threads and a 16 KB table, one a thread)."""
        ELEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
        CHUNKS: tl.constexpr = (BLOCK_COLS * ELEM + 127) // 128  # a power of two
        chunk = tl.minimum(tl.arange(0, CHUNKS) * 128, COLS * ELEM - 1)
        at = tl.arange(0, ROWS)[:, None] * (COLS * ELEM) + chunk[None, :]
        _prefetch_l1(ptr.to(tl.pointer_type(tl.int8)) + at)

    @triton.jit
    def _shared_base(pid, DECL: tl.constexpr):
        """The 32-bit shared-memory address of the program's ``g_B`` rows (``encode_keys(shared_scratch=True)``):
        ``DECL`` declares them as a static ``.shared`` array (:func:`shared_scratch_decl`) and returns its address."""
        return tl.inline_asm_elementwise(DECL, "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)  # never copied

    @triton.jit
    def _st_shared16(addr, v):
        """Store the 16-bit ``v`` (float16 or int16) at the shared addresses ``addr`` (PTX ``st.shared.b16``)."""
        tl.inline_asm_elementwise(
            "st.shared.b16 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,h", [addr, v], dtype=tl.int32, is_pure=False, pack=1
        )

    @triton.jit
    def _ld_shared16(addr, like, I16: tl.constexpr):
        """The 16-bit values (int16 if ``I16``, else float16) at the shared addresses ``addr`` (``ld.shared.b16``).
        ``like`` (a 32-bit tensor of ``addr``'s shape, unread) puts the load in ``like``'s layout: the compiler then
        forms the addresses there instead of moving the loaded values through shared memory to it."""
        if I16:
            return tl.inline_asm_elementwise(
                "ld.shared.b16 $0, [$1];", "=h,r,r", [addr, like], dtype=tl.int16, is_pure=False, pack=1
            )
        else:
            return tl.inline_asm_elementwise(
                "ld.shared.b16 $0, [$1];", "=h,r,r", [addr, like], dtype=tl.float16, is_pure=False, pack=1
            )

    @triton.jit
    def _encode_kernel(
        x_ptr,
        u_ptr,
        w_ptr,
        h_ptr,
        out_ptr,
        n_rows,
        stride_xn,
        stride_xh,
        stride_on,
        stride_oh,
        D: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        A_CHUNK: tl.constexpr,
        NESTED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        head = tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        ks = tl.arange(0, 64)
        ac = tl.arange(0, A_CHUNK)
        dmask = cols < D
        res, rmask, out_row = _load_block(
            x_ptr, out_ptr, rows, head, cols, dmask, n_rows, stride_xn, stride_xh, stride_on, stride_oh
        )
        prev = tl.zeros((BLOCK_N,), tl.int32)
        # runtime loops (over residuals and A chunks): unrolled, R x 64 / A_CHUNK copies of the search made the
        # kernel take minutes to compile at R=11..21, the first thing a GPU run waited for
        for r in range(R):
            base = (head * R + r) * 64 * D
            w_t = tl.load(w_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
            rw = tl.dot(res, w_t, input_precision=PRECISION)  # [BLOCK_N, 64]: r . w_B
            best = tl.full((BLOCK_N,), float("inf"), tl.float32)
            best_idx = tl.zeros((BLOCK_N,), tl.int32)
            for a0 in range(0, 64, A_CHUNK):
                u_t = tl.load(
                    u_ptr + base + (a0 + ac)[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0
                )  # [BLOCK_D, A_CHUNK]
                ru = tl.dot(res, u_t, input_precision=PRECISION)  # [BLOCK_N, A_CHUNK]: r . u_A
                hv = tl.load(h_ptr + (head * R + r) * 4096 + (a0 + ac)[:, None] * 64 + ks[None, :])
                val = hv[None, :, :] - 2.0 * (ru[:, :, None] + rw[:, None, :])  # [BLOCK_N, A_CHUNK, 64]
                if NESTED:  # min over B, then over A, with indices: no reshape (a layout change through shared memory)
                    mb, ib = tl.min(val, axis=2, return_indices=True)  # [BLOCK_N, A_CHUNK]
                    m, ia = tl.min(mb, axis=1, return_indices=True)  # first A of the smallest, first B within it
                    i = ia.to(tl.int32) * 64 + tl.sum(tl.where(ac[None, :] == ia[:, None], ib, 0), axis=1).to(tl.int32)
                else:
                    val = tl.reshape(val, (BLOCK_N, A_CHUNK * 64))
                    m = tl.min(val, axis=1)
                    i = tl.argmin(val, axis=1).to(tl.int32)
                upd = m < best
                best = tl.where(upd, m, best)
                best_idx = tl.where(upd, a0 * 64 + i, best_idx)
            a_idx = best_idx // 64
            b_idx = best_idx % 64
            res = _subtract_center(res, u_ptr, w_ptr, base, a_idx, b_idx, cols, dmask, D)
            prev = _store_code12(out_row, r, R, best_idx, prev, rmask)

    @triton.jit
    def _encode_running_kernel(
        x_ptr,
        u_ptr,
        w_ptr,
        h_ptr,
        out_ptr,
        scr_ptr,
        n_rows,
        n_blocks,
        stride_xn,
        stride_xh,
        stride_on,
        stride_oh,
        D: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Persistent programs. Per step: r.u_A and r.w_B for all 64 entries by two dots; r.u_A goes through this
        # program's scratch so the loop over A reads one column per A, and keeps per-(row, B) running minima over
        # A in a [BLOCK_N, 64] tile: no cross-lane reduction inside the loop, one min at the end of the step.
        pid, n_prog, head, lrow, cols, ks, dmask, scr = _persistent_program(scr_ptr, D, BLOCK_N, BLOCK_D)
        for blk in range(pid, n_blocks, n_prog):
            res, rmask, out_row = _load_block(
                x_ptr, out_ptr, blk * BLOCK_N + lrow, head, cols, dmask, n_rows, stride_xn, stride_xh, stride_on,
                stride_oh,
            )  # fmt: skip
            prev = tl.zeros((BLOCK_N,), tl.int32)
            for r in range(R):
                base = (head * R + r) * 64 * D
                w_t = tl.load(w_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
                rw = tl.dot(res, w_t, input_precision=PRECISION)  # [BLOCK_N, 64]: r . w_B
                u_t = tl.load(u_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
                tl.debug_barrier()  # the previous step's reads of the scratch are done
                tl.store(scr[:, None] + ks[None, :], tl.dot(res, u_t, input_precision=PRECISION))
                tl.debug_barrier()
                hrow = h_ptr + (head * R + r) * 4096 + ks
                best = tl.full((BLOCK_N, 64), float("inf"), tl.float32)
                best_a = tl.zeros((BLOCK_N, 64), tl.int32)
                for a in range(64):
                    ra = tl.load(scr + a)
                    val = tl.load(hrow + a * 64)[None, :] - 2.0 * (ra[:, None] + rw)
                    upd = val < best
                    best = tl.where(upd, val, best)
                    best_a = tl.where(upd, a, best_a)
                vmin = tl.min(best, axis=1)
                # the first code (64 A + B) among the minima, as the reference's arg-min over the flattened 4096
                best_idx = tl.min(tl.where(best == vmin[:, None], best_a * 64 + ks[None, :], 4096), axis=1)
                a_idx = best_idx // 64
                b_idx = best_idx % 64
                res = _subtract_center(res, u_ptr, w_ptr, base, a_idx, b_idx, cols, dmask, D)
                prev = _store_code12(out_row, r, R, best_idx, prev, rmask)


if HAS_TRITON:

    @triton.jit
    def _encode_split_kernel(
        x_ptr,
        u_ptr,
        w_ptr,
        un_ptr,
        wn_ptr,
        k_ptr,
        kt_ptr,
        out_ptr,
        scr_ptr,
        n_rows,
        n_blocks,
        stride_xn,
        stride_xh,
        stride_on,
        stride_oh,
        D: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # ||r - u_A - w_B||^2 - ||r||^2 = f_A + (K[A, B] + g_B) with f_A = ||u_A||^2 - 2 r.u_A, g_B = ||w_B||^2 -
        # 2 r.w_B and the fixed cross term K = 2 u_A . w_B. Rounding is monotone, so min over (A, B) of
        # f_A + (K + g_B) is min over A of f_A + m_A with m_A = min_B (K[A, B] + g_B): the 4,096 candidates cost one
        # add and one min each, without indices; the arg-min is then found over 64 A, and over 64 B for that A only.
        pid, n_prog, head, lrow, cols, ks, dmask, scr = _persistent_program(scr_ptr, D, BLOCK_N, BLOCK_D)
        for blk in range(pid, n_blocks, n_prog):
            res, rmask, out_row = _load_block(
                x_ptr, out_ptr, blk * BLOCK_N + lrow, head, cols, dmask, n_rows, stride_xn, stride_xh, stride_on,
                stride_oh,
            )  # fmt: skip
            prev = tl.zeros((BLOCK_N,), tl.int32)
            for r in range(R):
                step = head * R + r
                base = step * 64 * D
                g = _split_g(res, w_ptr, wn_ptr, base, step, ks, cols, dmask, D, PRECISION)
                tl.debug_barrier()  # the previous step's reads of the scratch are done
                tl.store(scr[:, None] + ks[None, :], g)
                tl.debug_barrier()  # (also keeps the two [D, 64] operand tiles from being live at once)
                u_t = tl.load(u_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
                f = tl.load(un_ptr + step * 64 + ks)[None, :] - 2.0 * tl.dot(res, u_t, input_precision=PRECISION)
                kt = kt_ptr + step * 4096 + ks  # row B of K^T: K[:, B]
                m = tl.full((BLOCK_N, 64), float("inf"), tl.float32)  # [row, A]: min over B so far
                for b0 in range(0, 64, UNROLL):
                    for j in tl.static_range(UNROLL):
                        gb = tl.load(scr + b0 + j)
                        m = tl.minimum(m, tl.load(kt + (b0 + j) * 64)[None, :] + gb[:, None])
                tot = m + f
                vmin = tl.min(tot, axis=1)
                a_idx = tl.min(tl.where(tot == vmin[:, None], ks[None, :], 64), axis=1)  # first A of the minimum
                res, prev = _finish_split_step(
                    res, g, a_idx, k_ptr, u_ptr, w_ptr, step, ks, cols, dmask, out_row, r, prev, rmask, D, R
                )

    @triton.jit
    def _split_g(res, w_ptr, wn_ptr, base, step, ks, cols, dmask, D: tl.constexpr, PRECISION: tl.constexpr):
        """The split searches' ``g_B = ||w_B||^2 - 2 r . w_B`` per row (float32 ``[rows, 64]``)."""
        w_t = tl.load(w_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
        return tl.load(wn_ptr + step * 64 + ks)[None, :] - 2.0 * tl.dot(res, w_t, input_precision=PRECISION)

    @triton.jit
    def _split_f(rd, ud_ptr, un_ptr, base, step, js, cols, dmask, D: tl.constexpr, PRECISION: tl.constexpr):
        """The paired searches' ``f_A = ||u_A||^2 - 2 r . u_A`` per row, for ``A < 32`` and ``A >= 32`` (float32
        ``[rows, 32]`` each, the lanes' low and high halves)."""
        u_lo = tl.load(ud_ptr + base + js[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
        u_hi = tl.load(ud_ptr + base + (js[None, :] + 32) * D + cols[:, None], mask=dmask[:, None], other=0.0)
        f_lo = tl.load(un_ptr + step * 64 + js)[None, :] - 2.0 * tl.dot(rd, u_lo, input_precision=PRECISION)
        f_hi = tl.load(un_ptr + step * 64 + 32 + js)[None, :] - 2.0 * tl.dot(rd, u_hi, input_precision=PRECISION)
        return f_lo, f_hi

    @triton.jit
    def _split_f_halves(rd, uh_ptr, unh_ptr, base, step, ks, cols, dmask, D: tl.constexpr, PRECISION: tl.constexpr):
        """The same ``f_A`` in one ``[rows, 64]`` tile, in the order of the packed lanes' halves in memory (half
        ``c`` holds ``A = c // 2 + 32 (c % 2)``: ``a_of``, returned too), from ``u`` and ``||u_A||^2`` stored in that
        order (:meth:`KeyTables.f_tables_in_halves`: contiguous rows, no gather)."""
        u_t = tl.load(uh_ptr + base + ks[None, :] * D + cols[:, None], mask=dmask[:, None], other=0.0)
        f = tl.load(unh_ptr + step * 64 + ks)[None, :] - 2.0 * tl.dot(rd, u_t, input_precision=PRECISION)
        return f, ks // 2 + 32 * (ks % 2)

    @triton.jit
    def _minima_start(BLOCK_N: tl.constexpr, I16: tl.constexpr):
        """The paired searches' running minima before the first ``B`` (``[rows, 32]`` int32 lanes): +inf in both
        float16 halves, or (``I16``) the int16 maximum, above every sum."""
        if I16:
            return tl.full((BLOCK_N, 32), 0x7FFF7FFF, tl.int32)
        else:
            return tl.full((BLOCK_N, 32), 0x7C007C00, tl.int32)

    @triton.jit
    def _candidate_minima(m2, scr, kt2, UNROLL: tl.constexpr, I16: tl.constexpr, NATIVE: tl.constexpr):
        """The paired searches' candidate loop in Triton: ``m2`` lowered, per row and packed lane, to the minimum over
        ``B`` of ``K^T[B] + g_B`` (``g_B`` from the row's scratch, packed ``K^T`` rows from ``kt2``)."""
        for b0 in range(0, 64, UNROLL):
            for j in tl.static_range(UNROLL):
                gb2 = tl.load(scr + b0 + j)
                kb2 = tl.load(kt2 + (b0 + j) * 32)[None, :]
                if I16:
                    m2 = _viaddmin2(kb2, gb2[:, None], m2, NATIVE)
                else:
                    m2 = _hmin2(m2, _hadd2(kb2, gb2[:, None], NATIVE), NATIVE)
        return m2

    @triton.jit
    def _finish_split_step(
        res, g, a_idx, k_ptr, u_ptr, w_ptr, step, ks, cols, dmask, out_row, r, prev, rmask, D: tl.constexpr,
        R: tl.constexpr,
    ):  # fmt: skip
        """The split searches' end of a step, given each row's ``A``: the arg-min over ``B`` of the float32 sums
        ``K[A, B] + g_B`` (first index on ties), the residual left and the packed code."""
        kb = tl.load(k_ptr + step * 4096 + a_idx[:, None] * 64 + ks[None, :]) + g  # the same sums, for A
        mb = tl.min(kb, axis=1)
        b_idx = tl.min(tl.where(kb == mb[:, None], ks[None, :], 64), axis=1)
        res = _subtract_center(res, u_ptr, w_ptr, step * 64 * D, a_idx, b_idx, cols, dmask, D)
        prev = _store_code12(out_row, r, R, a_idx * 64 + b_idx, prev, rmask)
        return res, prev

    @triton.jit
    def _encode_split_h2_kernel(
        x_ptr,
        norm_ptr,
        u_ptr,
        w_ptr,
        ud_ptr,
        wd_ptr,
        un_ptr,
        wn_ptr,
        k_ptr,
        kt2_ptr,
        qs_ptr,
        out_ptr,
        scr_ptr,
        n_rows,
        n_blocks,
        stride_xn,
        stride_xh,
        stride_on,
        stride_oh,
        D: tl.constexpr,
        R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        PRECISION: tl.constexpr,
        NATIVE: tl.constexpr,
        WIDE_LANES: tl.constexpr = False,
        ROW_NORMS: tl.constexpr = False,
        I16: tl.constexpr = False,
        PREFETCH: tl.constexpr = False,
        ASM_LOOP: tl.constexpr = False,
        ASM_PTX: tl.constexpr = False,
        ASM_ROWS: tl.constexpr = 16,
        LOOP_PTX: tl.constexpr = "",
        SCR_W: tl.constexpr = 64,
        SHARED: tl.constexpr = False,
        SHARED_DECL: tl.constexpr = "",
        SHARED_ROW: tl.constexpr = 144,
    ):
        # The split search with its 4,096 candidate sums K[A, B] + g_B in packed float16 pairs: lane j of a row
        # holds A = j (low half) and A = j + 32 (high half), so one add.rn.f16x2 and one min.f16x2 cover two
        # candidates. K^T comes packed the same way ([B, 32] int32 per step, kt2) and g_B is rounded to float16 and
        # written to both halves of a scratch lane. m_A + f_A is then formed in float32 and its arg-min picks A;
        # B is the exact float32 arg-min for that A, as in the split search.
        # I16 ("split_dpx"): the same lanes hold int16 fixed-point sums (K^T and g_B scaled by the step's 1 / s,
        # qs_ptr), and one fused add-min (sm_90 DPX: VIADDMNMX) replaces the add and the min.
        pid, n_prog, head, lrow, cols, ks, dmask, scr = _persistent_program(scr_ptr, D, BLOCK_N, BLOCK_D, SCR_W)
        js = tl.arange(0, 32)
        if ASM_LOOP:  # the scratch's minima as 16-bit halves (entries 64..95) and its float32 g_B (96..159)
            scr_h = (scr + 64).to(tl.pointer_type(tl.int16 if I16 else tl.float16))
            scr_g = (scr + (0 if SHARED else 96)).to(tl.pointer_type(tl.float32))  # SHARED: only g_B in the scratch
            # the PTX loop: one element a thread, 32 lanes x (BLOCK_N / ASM_ROWS) groups of ASM_ROWS rows
            e = tl.arange(0, 32 * (BLOCK_N // ASM_ROWS))
            grp = scr_ptr + (head * n_prog + pid) * BLOCK_N * SCR_W + (e // 32) * (ASM_ROWS * SCR_W)
            lane = e % 32
            if SHARED:  # the 16-bit g_B, then the minima in their place, in shared memory: SHARED_ROW bytes a row
                sh_base = _shared_base(pid, SHARED_DECL)  # once: each instance of the PTX declares its own array
                sh_row = sh_base + lrow * SHARED_ROW
                sh_grp = sh_base + (e // 32) * (ASM_ROWS * SHARED_ROW)
        for blk in range(pid, n_blocks, n_prog):
            res, rmask, out_row = _load_block(
                x_ptr, out_ptr, blk * BLOCK_N + lrow, head, cols, dmask, n_rows, stride_xn, stride_xh, stride_on,
                stride_oh,
            )  # fmt: skip
            if ROW_NORMS:  # the raw keys divided by their token's norm here, rounded as torch's division
                rows = blk * BLOCK_N + lrow
                res = tl.math.div_rn(res, tl.load(norm_ptr + rows, mask=rows < n_rows, other=1.0)[:, None])
            prev = tl.zeros((BLOCK_N,), tl.int32)
            for r in range(R):
                step = head * R + r
                base = step * 64 * D
                if PREFETCH:  # this step's packed K^T (64 lines of 128 bytes), in L1 by the candidate loop
                    _prefetch_l1(kt2_ptr + step * 2048 + ks * 32)
                rd = res.to(ud_ptr.dtype.element_ty)  # the dots' operand (float16 with precision="half")
                g = _split_g(rd, wd_ptr, wn_ptr, base, step, ks, cols, dmask, D, PRECISION)
                if I16:  # g_B in fixed point (int32 values), clamped so that no sum leaves int16
                    q_inv = tl.load(qs_ptr + step * 3 + 1)
                    q_clamp = tl.load(qs_ptr + step * 3 + 2)
                    g16 = tl.minimum(tl.maximum(tl.floor(g * q_inv + 0.5), -q_clamp), q_clamp).to(tl.int32)
                else:
                    g16 = g.to(tl.float16)
                if not SHARED:  # in both halves of a packed lane
                    gpack = _i16_pack(g16, g16) if I16 else _f16_pack(g16, g16)
                tl.debug_barrier()  # the previous step's reads of the scratch are done
                if SHARED:  # one 16-bit g_B an entry (the loop broadcasts it to both halves)
                    _st_shared16(sh_row[:, None] + 2 * ks[None, :], g16.to(tl.int16) if I16 else g16)
                else:
                    tl.store(scr[:, None] + ks[None, :], gpack)
                if ASM_LOOP:  # the float32 g_B kept in the scratch (entries 96..159; 0..63 with SHARED), not in
                    # registers through the loop
                    tl.store(scr_g[:, None] + ks[None, :], g)
                tl.debug_barrier()
                if PREFETCH and not SHARED:  # the scratch rows just written (two lines a row), in L1 for the loop
                    _prefetch_l1(scr[:, None] + (tl.arange(0, 2) * 32)[None, :])
                kt2 = kt2_ptr + step * 2048 + js  # row B of the packed K^T
                if PREFETCH and ASM_LOOP:  # in L1 while the loop runs: what the step reads after it (the f dot's
                    # table, the rows of K that pick B, the centres the residual update gathers) and what the next
                    # step reads first (its g dot's table, its K^T)
                    _prefetch_table(ud_ptr + base, 64, D, BLOCK_D)
                    _prefetch_table(k_ptr + step * 4096, 64, 64, 64)
                    _prefetch_table(u_ptr + base, 64, D, BLOCK_D)
                    _prefetch_table(w_ptr + base, 64, D, BLOCK_D)
                    nstep = head * R + (r + 1) % R  # the next block's first step after the last
                    _prefetch_table(wd_ptr + nstep * 64 * D, 64, D, BLOCK_D)
                    _prefetch_table(kt2_ptr + nstep * 2048, 64, 32, 32)
                if ASM_LOOP:  # the minima through the scratch, then A picked from them in one pass over 64
                    if SHARED:  # the loop in PTX on shared memory (candidate_loop_ptx(shared=True))
                        tl.inline_asm_elementwise(
                            LOOP_PTX, "=r,r,l,r", [sh_grp, kt2_ptr + step * 2048 + lane, sh_grp + 4 * lane],
                            dtype=tl.int32, is_pure=False, pack=1,
                        )  # fmt: skip
                    elif ASM_PTX:  # the whole loop in PTX (candidate_loop_ptx)
                        tl.inline_asm_elementwise(
                            LOOP_PTX, "=r,l,l,l", [grp, kt2_ptr + step * 2048 + lane, grp + 64 + lane],
                            dtype=tl.int32, is_pure=False, pack=1,
                        )  # fmt: skip
                    else:  # no PTX here (the interpreter, ROCm, GPUs before sm_80): the Triton loop, stored as it
                        m2 = _candidate_minima(_minima_start(BLOCK_N, I16), scr, kt2, UNROLL, I16, NATIVE)
                        tl.store(scr[:, None] + 64 + js[None, :], m2)
                    # the f dot after the loop (its result is not held through it: fewer registers at its peak), in
                    # the order of the minima's halves in memory (ud_ptr, un_ptr: KeyTables.f_tables_in_halves)
                    f, a_of = _split_f_halves(rd, ud_ptr, un_ptr, base, step, ks, cols, dmask, D, PRECISION)
                    tl.debug_barrier()  # the minima written (by other threads)
                    if SHARED:
                        mh = _ld_shared16(sh_row[:, None] + 2 * ks[None, :], f.to(tl.int32, bitcast=True), I16)
                    else:
                        mh = tl.load(scr_h[:, None] + ks[None, :])
                    mh = mh.to(tl.float32)
                    if I16:
                        t = mh * tl.load(qs_ptr + step * 3) + f
                    else:
                        t = mh + f
                    vmin = tl.min(t, axis=1)
                    a_idx = tl.min(tl.where(t == vmin[:, None], a_of[None, :], 64), axis=1)  # first A of the minimum
                    g = tl.load(scr_g[:, None] + ks[None, :])
                else:
                    f_lo, f_hi = _split_f(rd, ud_ptr, un_ptr, base, step, js, cols, dmask, D, PRECISION)
                    if WIDE_LANES:
                        # the first B's sums, from a 2D load of K^T's first row: that lays the running minima out four
                        # adjacent lanes a thread (sm_90: the loop's K^T loads become one 16-byte load per thread and B,
                        # 20 loads per 4 B instead of 68); the loop takes B = 0 again, min(s, s) = s
                        first = tl.load(kt2 + lrow[:, None] * 0)
                        if I16:
                            m2 = _viaddmin2(first, tl.load(scr)[:, None], 0x7FFF7FFF, NATIVE)
                        else:
                            m2 = _hadd2(first, tl.load(scr)[:, None], NATIVE)
                    else:  # the compiler's default layout (one lane a thread)
                        m2 = _minima_start(BLOCK_N, I16)
                    m2 = _candidate_minima(m2, scr, kt2, UNROLL, I16, NATIVE)
                    if I16:
                        q_scale = tl.load(qs_ptr + step * 3)
                        qi_lo, qi_hi = _i16_halves(m2)
                        t_lo = qi_lo.to(tl.float32) * q_scale + f_lo
                        t_hi = qi_hi.to(tl.float32) * q_scale + f_hi
                    else:
                        m_lo, m_hi = _f16_halves(m2)
                        t_lo = m_lo.to(tl.float32) + f_lo
                        t_hi = m_hi.to(tl.float32) + f_hi
                    vmin = tl.minimum(tl.min(t_lo, axis=1), tl.min(t_hi, axis=1))
                    a_idx = tl.minimum(
                        tl.min(tl.where(t_lo == vmin[:, None], js[None, :], 64), axis=1),
                        tl.min(tl.where(t_hi == vmin[:, None], js[None, :] + 32, 64), axis=1),
                    )
                res, prev = _finish_split_step(
                    res, g, a_idx, k_ptr, u_ptr, w_ptr, step, ks, cols, dmask, out_row, r, prev, rmask, D, R
                )


SEARCHES = ("flat", "nested", "running", "split", "split_h2", "split_dpx")
PERSISTENT_SEARCHES = ("running", "split", "split_h2", "split_dpx")
PRECISIONS = ("ieee", "tf32", "tf32x3", "half")
# (block_n, num_warps) per search, and where a precision has its own; the fastest measured at 128k tokens x 8 KV
# heads, head_dim 128, R = 11 and 21 (benchmarks/results/commvq_encode_split.json, H200; commvq_encode_variants.json
# for the running search, H100)
_TILINGS = {
    "flat": (16, 4),
    "nested": (16, 8),
    "running": (64, 8),
    "split": (128, 8),
    ("split", "tf32x3"): (64, 8),
    "split_h2": (64, 4),
    "split_dpx": (64, 4),
}
# A of each 16-bit half of the packed minima in memory (lane j: A = j low, A = j + 32 high): half c holds A(c)
HALVES_ORDER = torch.arange(64) // 2 + 32 * (torch.arange(64) % 2)
# scratch entries a row with asm_loop: the 64 packed g_B, the 32 packed minima the loop writes back (entries 64..95),
# then the 64 float32 g_B that pick B (96..159), kept there instead of in registers through the loop
SCRATCH_ASM = 160
# the searches that run the split kernel with packed pairs (float16 or int16 sums)
PAIRED_SEARCHES = ("split_h2", "split_dpx")
# shared_scratch: bytes a row of the program's shared g_B (64 16-bit entries, then the 32 packed minima in their
# place), padded from 128 so that a warp's 16-bit stores of a g_B tile (8 rows x 4 lanes a store) spread over the
# banks (144 / 4 = 36 = 4 mod 32 banks a row) and rows stay 16-byte aligned for the loop's vector loads
SHARED_ROW_BYTES = 144


def shared_scratch_bytes(block_n: int) -> int:
    """Bytes of the static array :func:`shared_scratch_decl` declares: ``block_n`` rows of
    :data:`SHARED_ROW_BYTES`, rounded up to a multiple of 1024 so that Triton's own shared memory, which follows it,
    keeps the 1024-byte alignment its 128-byte-swizzled wgmma operand tiles assume."""
    return -(-block_n * SHARED_ROW_BYTES // 1024) * 1024


def shared_scratch_decl(block_n: int) -> str:
    """PTX declaring the paired searches' shared ``g_B`` rows (a static ``.shared`` array of the kernel of
    :func:`shared_scratch_bytes`, in one scoped block) and returning their 32-bit shared address."""
    if block_n < 1:
        raise ValueError(f"block_n must be >= 1, got {block_n}.")
    return "\n".join(
        [
            "{",
            f".shared .align 1024 .b8 prs_key_scratch[{shared_scratch_bytes(block_n)}];",
            "mov.u32 $0, prs_key_scratch;",
            "}",
        ]
    )


def encode_defaults(precision: str = "ieee", search: str | None = None) -> dict:
    """``search``, ``block_n`` and ``num_warps`` that :func:`encode_keys` uses unless told otherwise: with float32
    dots (``"ieee"``) the flat search (the split search's float32 dots spill: 267 ms vs 121 ms per layer at 1 bit),
    with ``"tf32"`` the split search with float16 sums (``"split_h2"``: 12.1 ms vs 14.8 ms for ``"split"`` and 50.3
    ms for the flat search with TF32, the same reconstruction error to 4 digits; ``commvq_encode_h2.json``), with
    ``"half"`` the same search with float16 dot operands (about 12% faster than ``"tf32"`` on an H200;
    ``commvq_encode_profile.json``), with ``"tf32x3"`` the split search (29.3 ms), the closest to float32 of the
    fast ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if search is None:
        search = {"ieee": "flat", "tf32": "split_h2", "half": "split_h2"}.get(precision, "split")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
    block_n, num_warps = _TILINGS.get((search, precision), _TILINGS[search])
    return dict(search=search, block_n=block_n, num_warps=num_warps)


# ``maxnreg`` (the PTX ``.maxnreg`` directive that Triton's NVIDIA backend emits): ptxas raises a lower cap to 24 and
# allows at most 255; it allocates registers to a warp in units of 256 (8 a thread), so a cap between multiples of 8
# takes the registers of the next one (170 compiles to 170 and occupies 176: two 4-warp programs per SM, as 168 gives
# three)
MAXNREG_RANGE = (24, 248)


def dpx_native(device: torch.device) -> bool:
    """Whether ``search="split_dpx"`` compiles its fused add-min as sm_90 PTX on ``device``: an NVIDIA GPU of compute
    capability 9 or more (``add.s16x2`` / ``min.s16x2`` need sm_90; ROCm and older GPUs take integer operations)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def ptx_loop_native(device: torch.device) -> bool:
    """Whether ``asm_loop=True`` runs its PTX candidate loop on ``device``: an NVIDIA GPU of compute capability 8 or
    more (``min.f16x2`` needs sm_80); elsewhere (ROCm, older GPUs, the CPU) the Triton loop runs."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 8


def _check_asm_loop(search: str, wide_lanes: bool, unroll: int, block_n: int, num_warps: int) -> None:
    if search not in PAIRED_SEARCHES:
        raise ValueError(f"asm_loop applies to the searches {PAIRED_SEARCHES}, not {search!r}.")
    if wide_lanes:
        raise ValueError("asm_loop sets its own lanes: pass wide_lanes=False with it.")
    if unroll % 4:
        raise ValueError(f"asm_loop loads g_B four candidates at a time: unroll must be a multiple of 4, got {unroll}.")
    if block_n % num_warps:
        raise ValueError(f"asm_loop splits block_n rows over num_warps: {block_n} % {num_warps} != 0.")


def _check_shared_scratch(shared_scratch: bool, asm_loop: bool, block_n: int, precision: str) -> None:
    if not shared_scratch:
        return
    if not asm_loop:
        raise ValueError("shared_scratch is a layout of the PTX candidate loop: pass asm_loop=True with it.")
    # the static array and Triton's own shared memory (the dots' operands: float16 with "half", 32-bit otherwise)
    # share the 48 KB a launch has without opting in: "half" fits at up to 64 rows (9 + 32 KB), "tf32" does not
    if precision != "half" or block_n > 64:
        raise ValueError(
            f"shared_scratch holds block_n rows of {SHARED_ROW_BYTES} bytes in static shared memory, which with the "
            f"kernel's own shared memory must stay within 48 KB: it needs precision='half' and block_n <= 64, got "
            f"precision={precision!r}, block_n={block_n}."
        )


def _check_maxnreg(maxnreg: int | None) -> None:
    if maxnreg is None:
        return
    lo, hi = MAXNREG_RANGE
    if isinstance(maxnreg, bool) or not isinstance(maxnreg, int) or not lo <= maxnreg <= hi or maxnreg % 8:
        raise ValueError(
            f"maxnreg must be None or a multiple of 8 from {lo} to {hi} (registers per thread; ptxas allocates them 8 "
            f"at a time), got {maxnreg!r}."
        )


def _check_half(precision: str, search: str) -> None:
    if precision == "half" and search not in PAIRED_SEARCHES:
        raise ValueError(f"precision='half' is implemented for search='split_h2' and 'split_dpx', not {search!r}.")


def encode_meta(
    d: int,
    r: int,
    block_n: int = 16,
    num_warps: int = 8,
    num_stages: int = 1,
    search: str = "flat",
    precision: str = "ieee",
    a_chunk: int = 16,
    unroll: int = 4,
    wide_lanes: bool = False,
    row_norms: bool = False,
    native_dpx: bool = True,
    prefetch: bool = False,
    asm_loop: bool = False,
    native_ptx: bool = True,
    shared_scratch: bool = False,
) -> tuple[dict, tuple]:
    """The encode kernel's constexprs and ``(num_warps, num_stages)`` for head dim ``d`` and ``r`` residuals (what
    :func:`encode_keys` launches; :mod:`pressroom.kernels.commvq_resources` compiles exactly this). ``native_dpx``:
    ``"split_dpx"``'s fused add-min as sm_90 PTX (``add.s16x2`` / ``min.s16x2``, which need sm_90); ``False``
    compiles the same arithmetic from 32-bit integer operations (older GPUs). ``prefetch``: the paired searches'
    L1 prefetch of each step's ``K^T`` and scratch (:func:`encode_keys`). ``asm_loop``: their end of a step through
    the scratch (:data:`SCRATCH_ASM` entries a row) and their candidate loop as PTX (:func:`candidate_loop_ptx`,
    ``block_n / num_warps`` rows a thread) where the launch compiles PTX (``NATIVE``) and ``native_ptx`` (the GPU
    runs it: :func:`ptx_loop_native`); the Triton loop, its minima stored where the PTX stores them, otherwise (the
    interpreter, ROCm, GPUs before sm_80, ``"split_dpx"`` without sm_90). ``shared_scratch`` (with ``asm_loop``): where
    the PTX loop runs, its ``g_B`` and minima in shared memory (:func:`candidate_loop_ptx` ``shared=True``,
    :func:`shared_scratch_decl`) and only the float32 ``g_B`` in the global scratch (64 entries a row); elsewhere
    as ``asm_loop`` alone."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (a tl.dot operand), got {block_n}.")
    _check_half(precision, search)
    if prefetch and search not in PAIRED_SEARCHES:
        raise ValueError(f"prefetch applies to the searches {PAIRED_SEARCHES}, not {search!r}.")
    if asm_loop:
        _check_asm_loop(search, wide_lanes, unroll, block_n, num_warps)
    _check_shared_scratch(shared_scratch, asm_loop, block_n, precision)
    # "half": float16 operands, exact products summed in float32 (the dot's input_precision does not apply)
    dot_precision = "ieee" if precision == "half" else precision
    meta = dict(D=d, R=r, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=dot_precision)
    if search in ("split", *PAIRED_SEARCHES):
        if unroll < 1 or 64 % unroll:
            raise ValueError(f"unroll must divide 64, got {unroll}.")
        meta.update(UNROLL=unroll)
        if search in PAIRED_SEARCHES:
            native = not triton_interpreted() and (search == "split_h2" or bool(native_dpx))
            if asm_loop:  # the minima and the float32 g_B go through 96 more scratch entries a row (160 in all)
                meta.update(ASM_LOOP=True, SCR_W=SCRATCH_ASM)
                if native and native_ptx:  # the PTX loop, one lane of block_n / num_warps rows a thread
                    rows, i16 = block_n // num_warps, search == "split_dpx"
                    if shared_scratch:  # g_B and the minima in shared memory; the float32 g_B alone in the scratch
                        ptx = candidate_loop_ptx(rows, SHARED_ROW_BYTES, i16=i16, unroll=unroll, shared=True)
                        decl = shared_scratch_decl(block_n)
                        meta.update(SHARED=True, SHARED_DECL=decl, SHARED_ROW=SHARED_ROW_BYTES, SCR_W=64)
                    else:
                        ptx = candidate_loop_ptx(rows, 4 * SCRATCH_ASM, i16=i16, unroll=unroll)
                    meta.update(ASM_PTX=True, ASM_ROWS=rows, LOOP_PTX=ptx)
            meta.update(
                NATIVE=native,
                WIDE_LANES=bool(wide_lanes),
                ROW_NORMS=bool(row_norms),
                I16=search == "split_dpx",
                PREFETCH=bool(prefetch) and not triton_interpreted(),  # PTX: none under the interpreter
            )
    elif search != "running":
        meta.update(A_CHUNK=a_chunk, NESTED=search == "nested")
    return meta, (num_warps, num_stages)


def encode_kernel(search: str = "flat"):
    """The Triton kernel :func:`encode_keys` launches for ``search``."""
    kernels = {
        "running": _encode_running_kernel,
        "split": _encode_split_kernel,
        "split_h2": _encode_split_h2_kernel,
        "split_dpx": _encode_split_h2_kernel,
    }
    return kernels.get(search, _encode_kernel)


def encode_keys(
    x: torch.Tensor,
    thetas: torch.Tensor,
    use_triton: bool | None = None,
    tables: KeyTables | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    search: str | None = None,
    precision: str = "ieee",
    a_chunk: int = 16,
    programs: int | None = None,
    unroll: int = 4,
    key_norm_bound: float | None = None,
    wide_lanes: bool = False,
    row_norms: torch.Tensor | None = None,
    maxnreg: int | None = None,
    prefetch: bool = False,
    asm_loop: bool = False,
    shared_scratch: bool = False,
) -> torch.Tensor:
    """Residual-encode normalized keys and pack the codes: ``[N, H_kv, D]`` -> uint8 ``[N, H_kv, ceil(1.5 R)]``.

    Parameters
    ----------
    x : torch.Tensor
        Normalized pre-RoPE keys, interleaved (:func:`normalize_keys`), ``[N, H_kv, D]`` (strided rows allowed).
    thetas : torch.Tensor
        The layer's key codebooks ``[H_kv, R, 128, D/2]``.
    use_triton : bool or None
        Kernel choice (module docstring).
    tables : KeyTables, optional
        Precomputed tables of ``thetas`` (the cache keeps one per layer).
    out : torch.Tensor, optional
        Where to write (a slice of the cache's code buffer); allocated otherwise.
    block_n, num_warps, a_chunk : int
        Kernel tiling: tokens per tile (a power of two >= 16), warps per program, ``A`` entries scored per step
        (16 .. 64; flat and nested searches). ``block_n`` / ``num_warps`` default to :func:`encode_defaults`.
    search : str, optional
        Default (:func:`encode_defaults`): ``"flat"`` with ``precision="ieee"``, ``"split_h2"`` with ``"tf32"`` and
        ``"half"``, ``"split"`` with ``"tf32x3"``.
        ``"flat"``: min and argmin over the ``A_CHUNK x 64`` candidates reshaped to one row; ``"nested"``: one
        min-with-index over ``B``, then over ``A`` (same result, first index on ties); ``"running"``: persistent
        programs keep, per ``B``, the running minimum over ``A`` in a ``[block_n, 64]`` tile (one elementwise
        compare per candidate, ``r . u_A`` read back per ``A`` from a 4 KB per-program scratch), then one min per
        step (same result); ``"split"``: persistent programs first take, per ``A``, the minimum over ``B`` of
        ``2 u_A . w_B + ||w_B||^2 - 2 r . w_B`` (one add and one min per candidate, no indices: the cross term is a
        fixed table), then the arg-min over ``A`` and, for that ``A`` only, over ``B`` (the first index on exact
        ties, as the others; distances rounded in another order, so near-ties may differ from the reference);
        ``"split_h2"``: the split search with those 4,096 sums in packed float16 pairs (one ``add.f16x2`` and one
        ``min.f16x2`` per two candidates), ``A`` then picked in float32 from them and ``B`` exactly as in
        ``"split"``: near-ties in ``A`` may go another way (:func:`encode_keys_split_h2_reference` rounds the same;
        it is also what runs without Triton). Needs normalized keys (``ValueError`` otherwise).
        ``"split_dpx"``: the split search with those sums in int16 fixed point (:meth:`KeyTables.split_i16_tables`:
        a step of ``1.4e-4`` at most for normalized keys, ``g_B`` saturating past ``key_norm_bound``), one fused add-min
        per two candidates (sm_90 DPX ``VIADDMNMX``; integer operations on older GPUs);
        ``encode_keys_split_h2_reference(..., sums="i16")`` rounds the same. Not faster on an H200 (2.71-3.07 ms
        against 2.78 ms per 32k-token chunk at 1 bit: ``benchmarks/results/commvq_encode_dpx.json``): an option.
    programs : int, optional
        Persistent programs per KV head for ``"running"`` and ``"split"`` (default: 8 per SM over all heads).
    unroll : int
        ``"split"`` / ``"split_h2"`` / ``"split_dpx"``: candidates ``B`` per iteration of its inner loop (a divisor
        of 64).
    key_norm_bound : float, optional
        ``"split_h2"``: an upper bound on the rows' norms, for its float16 range check; ``"split_dpx"``: the same
        bound sets its fixed-point step (default there: the largest head vector's norm) (the cache knows it: 1, or the
        largest pair scale of a weighted search); by default bounded from ``x`` (one device sync per call).
    row_norms : torch.Tensor, optional
        ``[N]`` positive, on ``x``'s device: code ``x / row_norms[:, None, None]`` instead of ``x`` (then ``x`` holds
        unnormalized keys and ``row_norms`` their tokens' norms). ``"split_h2"`` on Triton divides in the kernel as
        it loads a block (no normalized copy of the keys in memory), rounded as PyTorch's division; other paths
        divide first.
    wide_lanes : bool
        ``"split_h2"``: ``True`` lays the running minima of its candidate loop out four adjacent lanes a thread, so
        that each ``K^T`` row is one 16-byte load per thread (20 loads per 4 candidates instead of 68 on sm_90; the
        same codes); ``False`` (default): the compiler's layout, one lane a thread, which measured 1-2% faster on an
        H200 over seven runs (``benchmarks/results/commvq_encode_profile*.json``).
    prefetch : bool
        ``"split_h2"`` / ``"split_dpx"`` on a GPU: at each residual step, ask for the step's packed ``K^T`` (8 KB)
        and the program's scratch of ``g_B`` (just written) in L1 (PTX ``prefetch.global.L1``) before the dot
        products, so that the candidate loop's loads find them there (an Nsight Compute profile of the default
        search on an H200 has 67% of its warp samples in that loop, most waiting on those loads:
        ``benchmarks/results/commvq_encode_ncu.json``). With ``asm_loop``, also before the loop: the tables the step
        reads after it (the ``f`` dot's ``u``, the rows of ``K`` that pick ``B``, the centres the residual update
        gathers) and the ones the next step reads first (its ``g`` dot's ``w``, its ``K^T``), one
        ``prefetch.global.L1`` a 128-byte line (about 6 a thread and step), so that their loads after the loop find
        L1 instead of L2 (without ``shared_scratch`` the scratch rows as well). The same codes; no effect off a GPU.
    asm_loop : bool
        ``"split_h2"`` / ``"split_dpx"`` compiled for a GPU: the candidate loop as PTX (:func:`candidate_loop_ptx`):
        each thread takes one lane of ``block_n / num_warps`` consecutive rows and loads each row's ``g_B`` four
        candidates at a time (20 loads per 4 candidates and 16 rows, against the compiler's 68), the minima written
        back through the scratch. After the loop, on every path, the step reads the minima back as 64 float16 (or
        int16) halves and picks ``A`` in one pass over them, against one ``[rows, 64]`` ``f`` dot in their order, and
        ``B`` from the float32 ``g_B`` it kept in the scratch (no registers held through the loop; offline sm_90
        counts: ``benchmarks/results/commvq_encode_asm_sass.json``). The same sums and minima, so the same codes;
        under the interpreter, on ROCm, on GPUs before sm_80 (:func:`ptx_loop_native`) and for ``"split_dpx"``
        without sm_90 the Triton loop runs, its minima stored where the PTX stores them.
    shared_scratch : bool
        With ``asm_loop``, ``precision="half"`` and ``block_n <= 64``: where the PTX loop runs, each row's ``g_B``
        goes to shared memory as 64 float16 (int16) values instead of 64 packed pairs in the global scratch, and the
        loop writes its minima in their place (:func:`candidate_loop_ptx` ``shared=True``): its loads never leave
        the SM (the global scratch's lines, just written, can miss L1) and read half the bytes (8 candidates a
        16-byte load). 9 KB of static shared memory a program at ``block_n=64`` (:func:`shared_scratch_bytes`).
        The same sums, so the same codes; elsewhere as ``asm_loop`` alone.
    maxnreg : int, optional
        Registers per thread the kernel may use (Triton's ``maxnreg`` launch option: the PTX ``.maxnreg``
        directive, NVIDIA only), a multiple of 8 from 24 to 248; ``None`` (default): the compiler's choice. For
        more resident programs per SM at the cost of spills: ``"split_h2"`` at its default tiling takes 255
        registers (two 4-warp programs per SM on sm_90), 168 lets three fit and 128 four. The cap is a compile
        option (one compiled kernel per value); ptxas fails to compile below what the kernel needs at the least
        (``"split_h2"``: about 64); the interpreter and the PyTorch path ignore it. :func:`encode_meta` (and so the
        resource table) describes the launch without it. Measured on an H200 (``"half"``, 32k tokens, 1 bit), every
        cap was slower than none: 3.7-3.8 ms against 2.65 (the spills cost more than the occupancy gains;
        ``benchmarks/results/commvq_encode_profile_maxnreg.json``): an option for experiments, off by default.
    precision : str
        Of the ``r . u_A`` / ``r . w_B`` dot products: ``"ieee"`` (float32, equal codes to the reference) or
        ``"tf32"`` (tensor cores on a GPU, and by default the ``"split_h2"`` search; near-ties may then pick another
        center) or ``"tf32x3"`` (three TF32 products per float32 product: close to float32 on tensor cores) or
        ``"half"`` (``"split_h2"`` only, its default: the residual and the tables ``u``, ``w`` rounded to float16,
        exact products summed in float32; float16 keeps TF32's 10-bit mantissa but rounds to nearest, and normalized
        keys and their codebooks are well inside its range).

    Returns
    -------
    torch.Tensor
        The packed codes; code ``C = 64 A + B`` of step ``r`` selects ``u_A + w_B`` of ``thetas[h, r]``. The kernel
        equals :func:`encode_keys_reference` (first index on exact ties) up to float32 rounding of the dot products;
        with ``"split_h2"`` it equals :func:`encode_keys_split_h2_reference` instead.

    Raises
    ------
    ValueError
        With ``"split_h2"``, if the codebooks or the keys' norms reach past the float16 range it sums in; with
        ``precision="half"`` and another search; with ``row_norms`` not ``[N]``; with ``maxnreg`` not ``None`` nor
        a multiple of 8 from 24 to 248, or set for a launch on a ROCm build of PyTorch (an NVIDIA option); with
        ``asm_loop`` and another search than ``"split_h2"`` / ``"split_dpx"``, with ``wide_lanes``, with ``unroll``
        not a multiple of 4, or with ``block_n`` not a multiple of ``num_warps``; with ``shared_scratch`` without
        ``asm_loop``, with another precision than ``"half"`` or with ``block_n > 64`` (on every path).
    """
    n, h, d, r = _check_encode(x, thetas)
    _check_maxnreg(maxnreg)
    chosen = encode_defaults(precision, search)
    search = chosen["search"]
    _check_half(precision, search)
    if row_norms is not None:
        if row_norms.shape != (n,) or row_norms.device != x.device:
            raise ValueError(
                f"row_norms must be [N] = [{n}] on {x.device} (one norm per row of x), got {tuple(row_norms.shape)} "
                f"on {row_norms.device}."
            )
        row_norms = row_norms.float().contiguous()
    dot_dtype = torch.float16 if precision == "half" else None
    block_n = chosen["block_n"] if block_n is None else block_n
    num_warps = chosen["num_warps"] if num_warps is None else num_warps
    if asm_loop:  # on every path, so that a bad combination fails the same way on the CPU
        _check_asm_loop(search, wide_lanes, unroll, block_n, num_warps)
    _check_shared_scratch(shared_scratch, asm_loop, block_n, precision)
    if out is None:
        out = torch.empty(n, h, code_bytes(r), dtype=torch.uint8, device=x.device)
    triton_path = resolve_use_triton(use_triton, x, out)
    paired = search in PAIRED_SEARCHES
    if row_norms is not None and not (triton_path and paired):
        x, row_norms = x / row_norms[:, None, None], None  # divided first
    if tables is None and (paired or (triton_path and n)):
        tables = KeyTables(thetas.to(x.device))
    if paired:
        if key_norm_bound is None and search == "split_dpx":  # the largest head vector's norm: the fixed-point step
            peak = torch.linalg.vector_norm(x.detach().float(), dim=-1).amax(1)
            key_norm_bound = float((peak / (1.0 if row_norms is None else row_norms)).amax()) if n else 0.0
            key_norm_bound = max(key_norm_bound, 1e-6)  # all-zero or no keys: still a positive step
        elif key_norm_bound is None:  # >= every (divided) row's norm
            peak = x.detach().abs().amax((1, 2)) / (1.0 if row_norms is None else row_norms)
            key_norm_bound = float(peak.amax()) * d**0.5 if n else 0.0
        if search == "split_h2":  # the float16 range, on either path
            tables.check_h2_keys(key_norm_bound)
        else:  # the fixed-point step (ValueError for a bound that is not positive)
            tables.split_i16_tables(key_norm_bound)
    if not triton_path:
        if paired:
            sums = "i16" if search == "split_dpx" else "f16"
            out.copy_(encode_keys_split_h2_reference(x, thetas, tables, dot_dtype, sums, key_norm_bound))
        else:
            out.copy_(encode_keys_reference(x, thetas))
        return out
    if n == 0:
        return out
    launch = {} if maxnreg is None else dict(maxnreg=maxnreg)  # default: the launch as before, without the option
    if launch and torch.version.hip is not None and not triton_interpreted():
        raise ValueError("maxnreg is an NVIDIA (ptxas) launch option; this PyTorch build targets ROCm.")
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float().contiguous()
    native_dpx = search == "split_dpx" and dpx_native(x.device)
    meta, (num_warps, num_stages) = encode_meta(
        d,
        r,
        block_n,
        num_warps,
        1,
        search,
        precision,
        a_chunk,
        unroll,
        wide_lanes,
        row_norms is not None,
        native_dpx,
        prefetch,
        asm_loop,
        asm_loop and ptx_loop_native(x.device),  # elsewhere the Triton loop, its minima through the scratch as well
        shared_scratch,
    )
    strides = (x.stride(0), x.stride(1), out.stride(0), out.stride(1))
    n_blocks = triton.cdiv(n, block_n)
    if search in PERSISTENT_SEARCHES:
        if programs is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
            programs = triton.cdiv(8 * sms, h)
        programs = max(1, min(programs, n_blocks))
        dtype = torch.int32 if paired else torch.float32  # split_h2 / split_dpx: g_B as packed pairs
        scratch = torch.empty(h, programs, block_n, meta.get("SCR_W", N_ENTRIES), dtype=dtype, device=x.device)
        if search == "split":
            search_tables = tables.split_tables()
        elif paired:
            if search == "split_dpx":
                pairs, _, qs = tables.split_i16_tables(key_norm_bound)
            else:
                pairs, qs = tables.split_h2_table(), tables.split_tables()[0]  # qs: unread
            (ud, wd), (un, wn, k) = tables.dot_tables(dot_dtype), tables.split_tables()[:3]
            if meta.get("ASM_LOOP"):  # its one f dot reads u and ||u_A||^2 in the minima's half order
                ud, un = tables.f_tables_in_halves(dot_dtype)
            search_tables = (ud, wd, un, wn, k, pairs, qs)
        else:
            search_tables = (tables.h,)
        norm_args = (x if row_norms is None else row_norms,) if paired else ()
        # "half" gathers the chosen centers from float16 tables where they are exact (3-5% faster on an H200;
        # "tf32" measured no faster with them: benchmarks/results/commvq_encode_profile_centers.json)
        centers = tables.center_tables() if precision == "half" else (tables.u, tables.w)
        encode_kernel(search)[(programs, h)](
            x, *norm_args, *centers, *search_tables, out, scratch, n, n_blocks, *strides,
            **meta, num_warps=num_warps, num_stages=num_stages, **launch,
        )  # fmt: skip
    else:
        _encode_kernel[(n_blocks, h)](
            x, tables.u, tables.w, tables.h, out, n, *strides, **meta, num_warps=num_warps, num_stages=num_stages,
            **launch,
        )  # fmt: skip
    return out


__all__ = [
    "MAXNREG_RANGE",
    "N_ENTRIES",
    "KeyTables",
    "code_bytes",
    "encode_keys",
    "encode_kernel",
    "encode_meta",
    "PERSISTENT_SEARCHES",
    "PRECISIONS",
    "SEARCHES",
    "encode_defaults",
    "encode_keys_reference",
    "encode_keys_split_h2_reference",
    "dpx_native",
    "ptx_loop_native",
    "I16_SPAN",
    "PAIRED_SEARCHES",
    "candidate_loop_ptx",
    "SHARED_ROW_BYTES",
    "shared_scratch_bytes",
    "shared_scratch_decl",
    "normalize_keys",
    "pack_bits",
    "pack_codes12",
    "unpack_bits",
    "unpack_codes12",
]
