"""CommVQCache: a transformers ``Cache`` that holds CommVQ codes, and attention computed from them.

CommVQ (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025, arXiv 2506.18879)
codes every key (before RoPE) with ``R`` residual 12-bit codes of a RoPE-commutative codebook and every value (all KV
heads of a token together) with ``feat_dim * bits`` bits of a learned binary additive codebook. This cache holds only
that, bit-packed, plus a small full-precision window of recent tokens:

- key codes: uint8 ``[B, H_kv, cap, ceil(1.5 R)]`` (two 12-bit codes in three bytes);
- value bits: uint8 ``[B, cap, feat_dim * bits / 8]``;
- per token: the key norm ``n_t`` and the value coefficient ``c_t = (prescale + eps) / (postscale + eps)``
  (float16 each) and the RoPE position (int32; per KV head after a per-head eviction press);
- the window: the most recent tokens (at most ``window``), keys before RoPE, in the model's dtype, flushed into
  codes ``flush_chunk`` tokens at a time.

Attention reads the codes directly. The cache wraps transformers' attention functions (``sdpa``, flash, flex) once:
when an attention call receives the exact tensor this cache's ``update`` just returned, the wrapper computes the
attention itself, from the codes (:func:`pressroom.kernels.commvq_attention.decode_attention` for one new token:
the Triton split-K kernel on CUDA; :func:`~pressroom.kernels.commvq_attention.chunk_attention` for a chunk of new
tokens, which dequantizes the codes a block at a time, never the whole prefix). Every other attention call goes
through untouched. A model in ``eager`` attention cannot be intercepted: the cache then returns dequantized keys and
values (correct, but transient full-precision tensors of one layer).

:class:`pressroom.presses.CommVQPress` turns a prefilled ``DynamicCache`` into these layers inside kvpress's pipeline.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from pressroom.kernels.commvq_attention import (
    CodedKV,
    LayerBooks,
    chunk_attention,
    decode_attention,
    dequantize_keys,
    dequantize_values,
    window_keys,
)
from pressroom.kernels.commvq_beam import check_beam, encode_keys_beam
from pressroom.kernels.commvq_codebook import check_pair_weights, from_interleaved, search_operands, to_interleaved
from pressroom.kernels.commvq_encode import PRECISIONS, KeyTables, code_bytes, encode_keys, pack_bits, ptx_loop_native
from pressroom.kernels.commvq_key_norms import key_norms
from pressroom.kernels.commvq_value_codes import value_codes
from pressroom.kernels.commvq_value_prep import value_prep, values_by_token
from pressroom.kernels.rope_ring import resolve_use_triton
from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec
from pressroom.presses.sink_window_cache import PositionResolver, _text_config, rope_frequencies

# tokens encoded at once, over the batch (bounds the value encoder's activations: under 1 GB at 2 bits at the 8B shape
# under encode_precision="half", by the shapes); 32,768 measured faster than 8,192 per layer on an H200 (the README's
# encode section)
ENCODE_BLOCK = 32768
# encode_precision="half": the value encoder's last matmul gives the three logit differences l_c - l_0 of each choice
# (ValueCodec.head_differences: a quarter fewer multiply-adds and logits); False: the four logits (ValueCodec.head)
VALUE_DIFFERENCES = True
# encode_precision="half" on a GPU where encode_keys' PTX candidate loop runs (ptx_loop_native: NVIDIA sm_80+): the
# key search's options there; {}: its defaults (the Triton loop). The PTX loop on g_B in shared memory, 8 candidates
# an iteration: the key kernel 9.6-9.8 -> 5.9 ms, the whole layer 13.5 -> 9.8 ms of GPU time at 128k tokens, 1 bit,
# the same codes (H100, benchmarks/results/commvq_encode_asm_h100*.json)
PTX_KEY_OPTIONS: dict = dict(asm_loop=True, shared_scratch=True, unroll=8)
DEFAULT_VALUE_REFINE = 64  # greedy bit flips per token after the value encoder (CommVQLayer.value_refine)

# ------------------------------------------------------------------------------------------- attention interception
_PENDING: list[Any] = [None]


class _Pending:
    __slots__ = ("layer", "key", "mode", "new")

    def __init__(self, layer: CommVQLayer, key: torch.Tensor, mode: str, new: tuple | None) -> None:
        self.layer, self.key, self.mode, self.new = layer, key, mode, new


def _wrap_attention(fn):
    if getattr(fn, "_commvq_wrapped", False):
        return fn

    def commvq_attention(module, query, key, value, attention_mask, *args, **kwargs):
        pending = _PENDING[0]
        if pending is not None and pending.key is key:
            _PENDING[0] = None
            if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
                raise ValueError("CommVQCache supports full-attention layers without softcapping.")
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5

            def dense(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # the wrapped implementation itself
                return fn(module, query, k, v, attention_mask, *args, **kwargs)[0]

            return pending.layer.attend(pending, query, float(scaling), dense, attention_mask), None
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    commvq_attention._commvq_wrapped = True
    commvq_attention.__wrapped__ = fn
    return commvq_attention


def _check_kv(key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    if key_states.dim() != 4 or value_states.shape[:3] != key_states.shape[:3]:
        raise ValueError(f"Expected keys/values [batch, kv_heads, seq, head_dim], got {tuple(key_states.shape)}.")


def _check_no_pending() -> None:
    """Raise if the previous layer's attention was never computed through the wrapper (then cleared)."""
    if _PENDING[0] is not None:
        stale = _PENDING[0]
        _PENDING[0] = None
        raise RuntimeError(
            f"A CommVQ layer's attention was never computed ({stale.layer!r}): the model's attention did not go "
            "through transformers' attention functions. Load the model with attn_implementation='sdpa' or use "
            "CommVQCache(..., mode='dequantize')."
        )


def install_attention() -> list[str]:
    """Wrap transformers' registered attention functions (idempotent); returns the implementations covered."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    covered = []
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        if name.startswith("paged"):
            continue
        ALL_ATTENTION_FUNCTIONS[name] = _wrap_attention(ALL_ATTENTION_FUNCTIONS[name])
        covered.append(name)
    return covered


@contextlib.contextmanager
def _value_matmuls(precision: str, device: torch.device):
    """The value encoder's matmuls at ``encode_precision``: TF32 for ``"tf32"`` on CUDA, bfloat16 (autocast, float32
    sums; the layer norm stays float32) for ``"half"`` on any device, float32 otherwise."""
    if precision == "half":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        with _matmul_tf32(device.type == "cuda" and precision == "tf32"):
            yield


@contextlib.contextmanager
def _matmul_tf32(enabled: bool):
    """float32 matmuls on tensor cores (TF32) inside the block when ``enabled`` (the value encoder with
    ``encode_precision="tf32"``); the global setting is restored after."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"encode_precision must be one of {PRECISIONS} ('ieee': the reference quantizer's codes; 'tf32x3' / "
            f"'tf32' / 'half': the key search's dot products on tensor cores; 'half' also runs the value encoder "
            f"in bfloat16), got {precision!r}."
        )


def attention_mode(config: Any) -> str:
    """``"codes"`` when the model's attention implementation can be intercepted, else ``"dequantize"``."""
    impl = getattr(config, "_attn_implementation", None)
    covered = install_attention()
    return "codes" if impl in covered else "dequantize"


def _unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``k * cos + rotate_half(k) * sin`` (float32), keys ``[B, H, n, D]``, cos ``[B|1, n, D]``."""
    k = keys.float()
    c = cos.float().unsqueeze(1) if cos.dim() == 3 else cos.float()
    s = sin.float().unsqueeze(1) if sin.dim() == 3 else sin.float()
    half = k.shape[-1] // 2
    rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * c - rot * s) / (c * c + s * s)


class _CommVQLayerBase(CacheLayerMixin):
    """What the layers of a CommVQ cache share: full attention, no static shape, no beam search or batch edits."""

    is_sliding = False
    is_compileable = False

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def max_cache_len(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("CommVQCache does not support beam search.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("CommVQCache does not support repeating the batch.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("CommVQCache does not support selecting batch rows.")


class CommVQLayer(_CommVQLayerBase):
    """One layer of a :class:`CommVQCache`: packed key codes, packed value bits, norms, positions and a window.

    Parameters
    ----------
    theta : torch.Tensor
        Key codebooks of the layer ``[H_kv, R, 128, head_dim/2]``.
    codec : ValueCodec
        The layer's value codec.
    inv_freq : torch.Tensor
        RoPE inverse frequencies; ``attention_scaling``: the rotary cos/sin factor.
    window : int
        Full-precision recent tokens kept (at most); ``flush_chunk``: tokens coded at a time when it overflows.
    n_sink : int
        The first ``n_sink`` tokens committed to the layer (the stream's first tokens, the attention sinks of
        StreamingLLM, arXiv 2309.17453) are never coded: they stay in full precision beside the window, since most
        heads put a large share of their attention on them and an error in their values reaches every output.
    mode : str
        ``"codes"`` (attention from codes through the wrapped attention functions) or ``"dequantize"``.
    resolver : PositionResolver, optional
        Shared by the layers of one cache (finds the RoPE position of new tokens from their cos/sin).
    use_triton : bool or None
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere.
    encode_precision : str
        Of the key encoder's dot products on the GPU: ``"ieee"`` (float32, the reference quantizer's codes; flat
        search, 121 ms per layer for 128k tokens at 1 bit on an H200), ``"tf32x3"`` (three TF32 products per float32
        one, split search: 29.3 ms, 99.999% of tokens coded identically) or ``"tf32"`` (split search with float16
        candidate sums, ``"split_h2"``: 12.1 ms, 99.0% identical, the same reconstruction error to four digits;
        ``benchmarks/results/commvq_encode_h2.json``; the value encoder's matmuls then run in TF32 too: 15.2 ms
        instead of 48.7 ms per layer). Off Triton the keys are coded by the PyTorch reference of that search: the
        exact one for ``"ieee"`` and ``"tf32x3"``, the float16-sum one for ``"tf32"``. ``"half"``: the float16-sum
        search with float16 dot operands (the residual rounded to nearest, where TF32 truncates; same mantissa) and the
        value encoder's matmuls in bfloat16 (autocast, on any device), its last one giving each choice's three logit
        differences (:meth:`ValueCodec.head_differences`, the same arg-max up to rounding); see the README's encode
        section for its timings and codes.
    value_refine : int
        Greedy bit flips per token after the value encoder (:meth:`ValueCodec.refine`), each lowering the token's
        reconstruction error, and the least-squares coefficient stored as ``c_t``; ``0``: the encoder's bits and the
        reference's ``c_t = (prescale + eps) / (postscale + eps)``. Our addition to CommVQ: on SmolLM2's held-out
        values (2 bits) the relative MSE goes from 0.169 to 0.068 with 64 (the search has converged by then). The
        Triton kernel of :mod:`pressroom.kernels.commvq_refine` runs it on CUDA (H200, 128k tokens of the 8B shape,
        64 flips: 47.6 ms at 1 bit, 107 ms at 2 bits, against 639 / 1,040 ms in PyTorch, the same error,
        ``benchmarks/results/commvq_value_refine.json``), the PyTorch reference elsewhere.
    pair_weights : torch.Tensor, optional
        ``[H_kv, head_dim/2]``: the key encoder's per-RoPE-pair distance weights the codebooks were trained under
        (:attr:`CommVQCodebooks.key_pair_weights`); ``None``: the Euclidean distance.
    key_beam : int
        Code sequences kept per key by the key encoder after each residual step
        (:func:`pressroom.kernels.commvq_beam.encode_keys_beam`; our addition): ``1`` (default) is the paper's
        greedy search, on the kernels above; more lowers the key error (SmolLM2 layer 18 at 2 bits: 0.0081 greedy,
        0.0064 with 4) for about ``key_beam`` times the search's arithmetic, in PyTorch on every device (no Triton
        kernel yet), ``encode_precision`` then not applying to the keys. The codes' format is unchanged.
    """

    def __init__(
        self,
        theta: torch.Tensor,
        codec: ValueCodec,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        *,
        window: int = 128,
        flush_chunk: int | None = None,
        n_sink: int = 0,
        mode: str = "codes",
        resolver: PositionResolver | None = None,
        use_triton: bool | None = None,
        encode_precision: str = "ieee",
        value_refine: int = DEFAULT_VALUE_REFINE,
        pair_weights: torch.Tensor | None = None,
        key_beam: int = 1,
    ) -> None:
        flush_chunk = _check_window(window, flush_chunk)
        _check_sink(n_sink)
        _check_precision(encode_precision)
        _check_value_refine(value_refine)
        self.key_beam = check_beam(key_beam)
        self.encode_precision = encode_precision
        self.value_refine = int(value_refine)
        if mode not in ("codes", "dequantize"):
            raise ValueError(f"mode must be 'codes' or 'dequantize', got {mode!r}.")
        # codebook constants live in a namespace, not as tensor attributes: tools that sum a layer's tensor
        # attributes (pressroom.presses.memory for a DynamicCache holding these layers) then count only the KV state
        self.consts = SimpleNamespace(theta=theta.detach().float(), inv_freq=inv_freq.detach().float().cpu())
        if pair_weights is not None:
            pair_weights = check_pair_weights(pair_weights.detach(), (theta.shape[0], theta.shape[-1]))
        self.consts.pair_weights = pair_weights
        self.codec_host = codec
        self.window = int(window)
        self.n_sink = int(n_sink)
        self.nsink = 0  # sink tokens held, in window slots [0, nsink)
        self.npin = 0  # pinned prefill tokens (load_prefill's pin), in window slots [nsink, nsink + npin)
        self.flush_chunk = int(flush_chunk)
        self.mode = mode
        self.use_triton = use_triton
        self.resolver = resolver if resolver is not None else PositionResolver()
        self.attention_scaling = float(attention_scaling)
        self._inv_freq_host = tuple(float(f) for f in self.consts.inv_freq)
        self.residuals = int(theta.shape[1])
        self.kbytes = code_bytes(self.residuals)
        self.n_bits = codec.code_bits
        self.is_initialized = False
        self.n = 0  # coded tokens
        self.nw = 0  # window tokens
        self.cap = 0
        self.per_head_pos = False
        self._next_position: int | None = None
        self._mark: tuple | None = None
        self.codes = self.knorm = self.vcoef = self.pos = self.vbits = None
        self.wkeys = self.wvals = self.wpos = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(R={self.residuals}, value_bits={self.n_bits}, coded={self.n}, window={self.nw})"

    # ------------------------------------------------------------------ geometry / resolver protocol
    @property
    def seen(self) -> int:
        return self.n + self.nw

    def position_base(self) -> int:
        return self.seen

    # ------------------------------------------------------------------ allocation
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _check_kv(key_states, value_states)
        batch, heads, _, head_dim = key_states.shape
        if heads != self.consts.theta.shape[0] or head_dim != 2 * self.consts.theta.shape[-1]:
            raise ValueError(
                f"The CommVQ codebooks are for {self.consts.theta.shape[0]} KV heads of head_dim "
                f"{2 * self.consts.theta.shape[-1]}, but the model gives {heads} heads of {head_dim}."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        dev = self.device
        self.codec = (
            self.codec_host.to(dev).float().eval() if self.codec_host.embedding.device != dev else self.codec_host
        )
        self.books = LayerBooks.build(
            self.consts.theta,
            self.codec.embedding,
            self.codec.scale + self.codec.eps,
            self.consts.inv_freq,
            self.attention_scaling,
            device=dev,
        )
        # the search's operands (module docstring of pressroom.kernels.commvq_codebook, weighted search): the
        # encoder scales the keys by search.scale and searches search.theta's centers; decoding reads books.theta.
        # A namespace, as consts: constants, not KV state (tools summing a layer's tensor attributes skip them)
        pw = self.consts.pair_weights
        ones = torch.ones(heads, head_dim, device=dev)
        scale, theta = search_operands(ones, self.books.theta, None if pw is None else pw.to(dev))
        self.search = SimpleNamespace(theta=theta, scale=None if pw is None else scale)
        # the coded rows are unit-norm keys (over all heads), times the pair scale of a weighted search
        self._key_norm_bound = 1.0 if pw is None else float(scale.max())
        self.tables = KeyTables(self.search.theta)
        self._triton = resolve_use_triton(self.use_triton, key_states)
        wcap = self.window + self.n_sink
        self.wkeys = torch.zeros(batch, heads, wcap, head_dim, dtype=self.dtype, device=dev)
        self.wvals = torch.zeros(batch, heads, wcap, head_dim, dtype=value_states.dtype, device=dev)
        self.wpos = torch.zeros(batch, wcap, dtype=torch.int32, device=dev)
        self._alloc(0)
        self.is_initialized = True

    def _alloc(self, cap: int) -> None:
        b, h, dev = self.batch, self.heads, self.device
        new = {
            "codes": torch.zeros(b, h, cap, self.kbytes, dtype=torch.uint8, device=dev),
            "knorm": torch.zeros(b, cap, dtype=torch.float16, device=dev),
            "vcoef": torch.zeros(b, cap, dtype=torch.float16, device=dev),
            "pos": torch.zeros((b, h, cap) if self.per_head_pos else (b, cap), dtype=torch.int32, device=dev),
            "vbits": torch.zeros(b, cap, self.n_bits // 8, dtype=torch.uint8, device=dev),
        }
        for name, t in new.items():
            old = getattr(self, name)
            if old is not None and self.n:
                if name == "codes":
                    t[:, :, : self.n] = old[:, :, : self.n]
                elif name == "vbits":
                    t[:, : self.n] = old[:, : self.n]
                else:
                    t[..., : self.n] = old[..., : self.n]
            setattr(self, name, t)
        self.cap = cap

    def reserve(self, n_tokens: int) -> None:
        """Allocate room for ``n_tokens`` coded tokens at once (no growth later up to that)."""
        if not self.is_initialized:
            raise RuntimeError("reserve() needs an initialized layer (after the first update).")
        if n_tokens > self.cap:
            self._alloc(int(n_tokens))

    def _ensure(self, needed: int) -> None:
        if needed > self.cap:
            self._alloc(max(needed, int(self.cap * 1.25) + self.flush_chunk))

    def _set_per_head_positions(self) -> None:
        if not self.per_head_pos:
            self.per_head_pos = True
            old = self.pos
            self.pos = torch.zeros(self.batch, self.heads, self.cap, dtype=torch.int32, device=self.device)
            self.pos[..., : self.n] = old[:, None, : self.n]

    # ------------------------------------------------------------------ encoding
    def _encode(self, keys_il: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Append coded tokens: pre-RoPE interleaved keys ``[B, H, m, D]``, values ``[B, H, m, D]``, positions
        ``[m]``, ``[B, m]`` or ``[B, H, m]``."""
        m = keys_il.shape[2]
        if m == 0:
            return
        if pos.dim() == 3:
            self._set_per_head_positions()
        self._ensure(self.n + m)
        ptx = self.encode_precision == "half" and self._triton and ptx_loop_native(keys_il.device)
        key_options = PTX_KEY_OPTIONS if ptx else {}
        block = max(1, ENCODE_BLOCK // self.batch)
        for s in range(0, m, block):
            e = min(m, s + block)
            lo, hi = self.n + s, self.n + e
            k = keys_il[:, :, s:e].float()  # [B, H, n, D]
            norms = key_norms(k, self._triton)  # [B, n]: a token's heads together, read in place (one pass on Triton)
            safe = torch.where(norms > 0, norms, 1.0)
            x, row_norms = k.transpose(1, 2), safe  # [B, n, H, D]: encode_keys divides (in the kernel on Triton)
            if self.search.scale is not None:  # weighted search: divide, then scale the pairs
                x, row_norms = x / safe[..., None, None] * self.search.scale, None
            for b in range(self.batch):
                out = self.codes[b, :, lo:hi].transpose(0, 1)
                if self.key_beam > 1:
                    rn = None if row_norms is None else row_norms[b]
                    encode_keys_beam(x[b], self.search.theta, self.key_beam, self.tables, out, rn)
                    continue
                encode_keys(
                    x[b],
                    self.search.theta,
                    use_triton=self._triton,
                    tables=self.tables,
                    out=out,
                    precision=self.encode_precision,
                    key_norm_bound=self._key_norm_bound,
                    row_norms=None if row_norms is None else row_norms[b],
                    **key_options,
                )
            self.knorm[:, lo:hi] = norms  # cast in the copy (one kernel)
            # [B, n, H * D] float32, for the float32 encoder and the refinement ("half" reads the values in place)
            v = values_by_token(values[:, :, s:e]) if self.value_refine or self.encode_precision != "half" else None
            with torch.no_grad(), _value_matmuls(self.encode_precision, values.device):
                if self.encode_precision == "half":  # the encoder's input in one pass, in its matmuls' bfloat16
                    norm = self.codec.norm1
                    y, prescale = value_prep(
                        values[:, :, s:e], self.codec.scale, self.codec.eps, norm.weight, norm.bias, norm.eps,
                        torch.bfloat16, self._triton,
                    )  # fmt: skip
                    differences = VALUE_DIFFERENCES
                    logits = self.codec.head_differences(y) if differences else self.codec.head(y)
                    del y
                else:
                    logits, prescale = self.codec.logits(v)
                    differences = False
                # the arg-max choices as packed bytes and bits in one pass (a Triton kernel on CUDA)
                # the bits as the postscale matmul takes them: bfloat16 under "half" (no cast of a float32 copy)
                matmul_dtype = torch.bfloat16 if self.encode_precision == "half" else self.codec.embedding.dtype
                bits_dtype = torch.uint8 if self.value_refine else matmul_dtype
                packed, bits = value_codes(logits, bits_dtype, self._triton, differences=differences)
                del logits
                if not self.value_refine:  # the decoded direction's norm: a [m, bits] x [bits, D] matmul too
                    post = self.codec.postscale(bits)
                    coef = (prescale.float() + self.codec.eps) / (post + self.codec.eps)
            if self.value_refine:  # float32 throughout: it tracks each token's error through the flips
                bits, coef = self.codec.refine(v, bits, self.value_refine, self._triton)
                packed = pack_bits(bits)
            self.vcoef[:, lo:hi] = coef[..., 0]  # cast in the copy
            self.vbits[:, lo:hi] = packed
            p = pos[..., s:e]  # cast to int32 in the copies below
            if self.per_head_pos:
                self.pos[:, :, lo:hi] = p.view(1, 1, -1) if p.dim() == 1 else p[:, None] if p.dim() == 2 else p
            else:
                self.pos[:, lo:hi] = p
        self.n += m

    def _commit(self, keys_il: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Add new tokens (pre-RoPE interleaved keys ``[B, H, q, D]``, positions ``[q]``): the first ``n_sink`` tokens
        of the layer stay in window slots ``[0, nsink)`` for good; after them the window keeps the most recent ones,
        whole ``flush_chunk`` blocks of the oldest are coded."""
        if self.nsink < self.n_sink and self.nw == self.nsink and self.n == 0:
            take = min(self.n_sink - self.nsink, keys_il.shape[2])
            sl = slice(self.nsink, self.nsink + take)
            self.wkeys[:, :, sl] = keys_il[:, :, :take].to(self.dtype)
            self.wvals[:, :, sl] = values[:, :, :take].to(self.wvals.dtype)
            self.wpos[:, sl] = pos[:take].to(torch.int32)
            self.nsink += take
            self.nw += take
            keys_il, values, pos = keys_il[:, :, take:], values[:, :, take:], pos[take:]
        q = keys_il.shape[2]
        if q == 0:
            return
        s = self.nsink + self.npin  # the recent tokens' slots start after the sinks and the pinned tokens
        recent = self.nw - s
        total = recent + q
        n_flush = 0
        if total > self.window:
            n_flush = min(total, math.ceil((total - self.window) / self.flush_chunk) * self.flush_chunk)
        from_window = min(n_flush, recent)
        if from_window:
            wp = self.wpos[:, s : s + from_window]
            self._encode(self.wkeys[:, :, s : s + from_window], self.wvals[:, :, s : s + from_window], wp)
        from_new = n_flush - from_window
        if from_new:
            self._encode(keys_il[:, :, :from_new], values[:, :, :from_new], pos[None, :from_new].expand(self.batch, -1))
        keep_old = recent - from_window
        if from_window and keep_old:
            self.wkeys[:, :, s : s + keep_old] = self.wkeys[:, :, s + from_window : self.nw].clone()
            self.wvals[:, :, s : s + keep_old] = self.wvals[:, :, s + from_window : self.nw].clone()
            self.wpos[:, s : s + keep_old] = self.wpos[:, s + from_window : self.nw].clone()
        add = q - from_new
        at = s + keep_old
        self.wkeys[:, :, at : at + add] = keys_il[:, :, from_new:].to(self.dtype)
        self.wvals[:, :, at : at + add] = values[:, :, from_new:].to(self.wvals.dtype)
        self.wpos[:, at : at + add] = pos[from_new:].to(torch.int32)
        self.nw = at + add

    def append_prerope(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Code tokens given directly (pre-RoPE keys ``[B, H, m, D]`` in the model's ``rotate_half`` layout, values,
        positions ``[m]``), bypassing the window: for filling a cache from stored KV, a chunk at a time.

        Raises
        ------
        RuntimeError
            If the layer was never updated (its dtype, device and batch are set at the first update).
        """
        if not self.is_initialized:
            raise RuntimeError("append_prerope needs an initialized layer: run one forward pass (or update) first.")
        self._encode(to_interleaved(keys.float()), values, positions.to(self.device))

    def coded_view(self) -> CodedKV:
        """The current state as the attention functions read it."""
        return CodedKV(
            self.codes, self.knorm, self.vcoef, self.pos, self.vbits, self.n, self.wkeys, self.wvals, self.wpos, self.nw
        )

    # ------------------------------------------------------------------ update / attention
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new (rotated) keys and values; return what the model's attention call receives.

        In ``codes`` mode the new tensors themselves are returned and the wrapped attention function computes the
        attention from the codes (one new token: it is stored first, then attended with everything; several: they
        attend to the stored state and themselves, then are stored). In ``dequantize`` mode the full dequantized
        keys and values (rotated, model layout) are returned, in the same order of storing and attending.
        """
        _check_no_pending()
        cache_kwargs = cache_kwargs or {}
        cos, sin = cache_kwargs.get("cos"), cache_kwargs.get("sin")
        if cos is None or sin is None:
            raise ValueError("CommVQCache needs a RoPE model: cache_kwargs must hold the rotary 'cos' and 'sin'.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:2] != (self.batch, self.heads) or key_states.shape[-1] != self.head_dim:
            raise ValueError(f"New keys {tuple(key_states.shape)} do not fit this layer (fixed at the first update).")
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        n_new = key_states.shape[-2]
        position = self.resolver.resolve(self, cos, sin, cache_kwargs.get("cache_position"))
        self._next_position = position + n_new
        pos = torch.arange(position, position + n_new, device=self.device, dtype=torch.int32)
        raw = to_interleaved(_unrotate(key_states, cos, sin))
        if self.mode == "dequantize":
            if n_new == 1:  # as in codes mode: stored first (a flush codes the window's oldest), then attended
                self._commit(raw, value_states, pos)
                return self._dequantized()
            old_k, old_v = self._dequantized()
            self._commit(raw, value_states, pos)
            keys = torch.cat((old_k, key_states.to(old_k.dtype)), dim=2)
            values = torch.cat((old_v, value_states.to(old_v.dtype)), dim=2)
            return keys, values
        if n_new == 1:
            self._commit(raw, value_states, pos)
            _PENDING[0] = _Pending(self, key_states, "decode", None)
        else:
            _PENDING[0] = _Pending(self, key_states, "chunk", (raw, value_states, pos))
        return key_states, value_states

    def attend(
        self, pending: _Pending, query: torch.Tensor, scaling: float, dense=None, attention_mask=None
    ) -> torch.Tensor:
        """Attention output ``[B, q, Hq, D]`` (the layout transformers' attention functions return).

        One new token: :func:`decode_attention` over codes + window. Several: if nothing is coded yet (a prefill),
        ``dense`` -- the wrapped attention implementation (SDPA, flash...) with the model's own mask -- attends over
        the window (rotated) and the new tokens, so a long single-pass prefill costs what it costs without the cache;
        otherwise :func:`chunk_attention` (coded tokens dequantized a block at a time, merged by log-sum-exp).
        """
        if pending.mode == "chunk" and self.n == 0 and dense is not None:
            raw, values, pos = pending.new
            kv = self.coded_view()
            keys = torch.cat((from_interleaved(window_keys(kv, self.books)).to(pending.key.dtype), pending.key), dim=2)
            vals = torch.cat((self.wvals[:, :, : self.nw].to(values.dtype), values), dim=2)
            out = dense(keys, vals)
            self._commit(raw, values, pos)
            return out
        q = to_interleaved(query)
        if pending.mode == "decode":
            out = decode_attention(q[:, :, 0], self.coded_view(), self.books, scaling, use_triton=self._triton)
            out = out[:, :, None]
        else:
            raw, values, pos = pending.new
            out = chunk_attention(q, self.coded_view(), self.books, scaling, raw, values, pos)
            self._commit(raw, values, pos)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens, keys rotated (model layout) and values, in the model's dtype ``[B, H, n + nw, D]``."""
        kv = self.coded_view()
        keys = torch.cat((dequantize_keys(kv, self.books), window_keys(kv, self.books)), dim=2)
        values = torch.cat((dequantize_values(kv, self.books), self.wvals[:, :, : self.nw].float()), dim=2)
        return from_interleaved(keys).to(self.dtype), values.to(self.wvals.dtype)

    # ------------------------------------------------------------------ prefill from another cache (the press)
    def load_prefill(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index: torch.Tensor | None = None,
        pin: torch.Tensor | None = None,
    ) -> None:
        """Fill an empty layer from rotated prefill keys ``[B, H, n, D]`` (``cos``/``sin`` of the whole prefill).

        ``index`` (``[B, H, n]`` int64), when given, is the prefill position of each kept key (a per-head eviction
        press kept different tokens per head): every kept token is then coded, with per-head positions. Without it
        the keys are the whole prefill, at positions ``0..n-1``: the last ``window`` tokens stay in full precision.
        ``pin`` (int64 ``[k]``, distinct prefill positions from ``n_sink`` to ``n - window - 1``, without
        ``index``): tokens kept in full precision for good, in window slots after the sinks (the window's buffers
        grow by ``k`` slots; :class:`~pressroom.presses.CommVQPress`'s ``pin_ratio`` picks them).
        """
        if self.seen:
            raise ValueError("load_prefill needs an empty CommVQLayer.")
        self.lazy_initialization(keys, values)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        if index is None:
            n = keys.shape[2]
            raw = to_interleaved(_unrotate(keys, cos, sin))
            pos = torch.arange(n, device=self.device, dtype=torch.int32)
            if pin is not None and pin.numel():
                self._pin_prefill(raw, values, pos, pin)
            else:
                self._commit(raw, values, pos)
        elif pin is not None:
            raise ValueError("load_prefill: pin needs the whole prefill (no index of kept tokens).")
        else:
            b, h, n = index.shape
            gather = index[..., None].expand(b, h, n, cos.shape[-1])
            c = cos.float().expand(b, -1, -1)[:, None].expand(b, h, -1, -1).gather(2, gather)
            s = sin.float().expand(b, -1, -1)[:, None].expand(b, h, -1, -1).gather(2, gather)
            raw = to_interleaved(_unrotate(keys, c, s))
            self._encode(raw, values, index.to(torch.int32))
        self._next_position = None

    def _pin_prefill(self, raw: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, pin: torch.Tensor) -> None:
        """``load_prefill`` with pinned tokens: the sinks, then the pinned tokens in the next window slots (for
        good), then every other token committed as usual (the oldest coded, the last ``window`` in the window)."""
        n = raw.shape[2]
        pin = pin.to(self.device, torch.long)
        lo, hi = self.n_sink, n - self.window
        if pin.dim() != 1 or pin.unique().numel() != pin.numel() or (pin < lo).any() or (pin >= hi).any():
            raise ValueError(
                f"pin must be distinct prefill positions in [{lo}, {hi}) (after the {self.n_sink} sinks, before the "
                f"last {self.window} tokens, which stay in full precision anyway), got {pin.tolist()[:8]}..."
            )
        pin = pin.sort().values
        self._commit(raw[:, :, :lo], values[:, :, :lo], pos[:lo])  # the sinks
        k = pin.numel()
        at = self.nsink
        self._grow_window(k)
        self.wkeys[:, :, at : at + k] = raw[:, :, pin].to(self.dtype)
        self.wvals[:, :, at : at + k] = values[:, :, pin].to(self.wvals.dtype)
        self.wpos[:, at : at + k] = pos[pin]
        self.npin, self.nw = k, self.nw + k
        rest = torch.ones(n, dtype=torch.bool, device=self.device)
        rest[:lo] = False
        rest[pin] = False
        self._commit(raw[:, :, rest], values[:, :, rest], pos[rest])

    def _grow_window(self, extra: int) -> None:
        """``extra`` more window slots (the held ones kept)."""
        old = self.wkeys.shape[2]
        for name, slot_dim in (("wkeys", 2), ("wvals", 2), ("wpos", 1)):
            held = getattr(self, name)
            shape = list(held.shape)
            shape[slot_dim] += extra
            grown = held.new_zeros(shape)
            grown.narrow(slot_dim, 0, old).copy_(held)
            setattr(self, name, grown)

    # ------------------------------------------------------------------ mark / restore (kvpress's pipeline)
    def mark(self) -> None:
        """Record the state; assigning ``keys``/``values`` of the marked length later restores it."""
        if not self.is_initialized:
            return
        self._mark = (self.n, self.nw, self.wkeys.clone(), self.wvals.clone(), self.wpos.clone(), self.nsink, self.npin)

    def restore(self) -> None:
        if self._mark is None:
            raise RuntimeError("This CommVQLayer has no mark (CommVQPress marks it after the context).")
        n, nw, wk, wv, wp, nsink, npin = self._mark
        self.n, self.nw, self.nsink, self.npin = n, nw, nsink, npin
        self.wkeys.copy_(wk)
        self.wvals.copy_(wv)
        self.wpos.copy_(wp)
        self._next_position = None

    @property
    def keys(self) -> torch.Tensor | None:
        """Dequantized rotated keys of every held token (a transient copy; assigning restores the mark)."""
        return self._dequantized()[0] if self.is_initialized else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(value, "keys")

    @property
    def values(self) -> torch.Tensor | None:
        """Dequantized values of every held token (a transient copy; assigning restores the mark)."""
        return self._dequantized()[1] if self.is_initialized else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(value, "values")

    def _assign(self, value: torch.Tensor | None, name: str) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() != 4:
            raise ValueError(f"A CommVQLayer's {name} can only be reset to its marked length.")
        length = value.shape[2]
        if length == self.seen:
            return
        if self._mark is not None and length == self._mark[0] + self._mark[1]:
            self.restore()
            return
        raise ValueError(
            f"A CommVQLayer's {name} can only be reset to its marked state ({self._mark and sum(self._mark[:2])} "
            f"tokens), got {length}: a CommVQ cache cannot be pruned by another press afterwards (put eviction "
            "presses before CommVQPress in a ComposedPress)."
        )

    # ------------------------------------------------------------------ Cache protocol
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        n_new = cache_position.shape[0]
        start = self.resolver.cache_position_start(cache_position) if n_new else self.seen
        if self.mode == "codes":  # the wrapper attends itself; a small mask over the window suffices
            return self.nw + n_new, start - self.nw
        return self.seen + n_new, start - self.seen

    def _tensors(self) -> list[torch.Tensor]:
        held = [self.codes, self.knorm, self.vcoef, self.pos, self.vbits, self.wkeys, self.wvals, self.wpos]
        if self._mark is not None:  # the window snapshot of kvpress's multi-question protocol
            held += list(self._mark[2:5])
        return [t for t in held if t is not None]

    def memory_bytes(self) -> int:
        """Bytes held: codes, value bits, norms, coefficients, positions (capacity), the window buffers and, while
        marked, the window snapshot."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def codebook_bytes(self) -> int:
        """Bytes of this layer's codebooks on the device (constant, like weights; not in :meth:`memory_bytes`)."""
        if not self.is_initialized:
            return 0
        books = (self.books.theta, self.books.ztab, self.books.emb, self.tables.u, self.tables.w, self.tables.h)
        if self.search.scale is not None:
            books = (*books, self.search.theta, self.search.scale)
        codec = sum(p.numel() * p.element_size() for p in self.codec.parameters())
        return codec + sum(t.numel() * t.element_size() for t in books)

    def reset(self) -> None:
        self.n = self.nw = self.nsink = self.npin = 0
        self._mark = None
        self._next_position = None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.seen + max_length
        if max_length >= self.seen:
            return
        if self._mark is not None and max_length == sum(self._mark[:2]):
            self.restore()
            return
        raise ValueError(f"Cannot crop a CommVQLayer from {self.seen} to {max_length} tokens (codes are final).")

    @property
    def max_batch_size(self) -> int:
        return self.batch if self.is_initialized else 0


class ExactLayer(_CommVQLayerBase):
    """A full-precision layer of a CommVQ cache: keys (rotated, as the model gives them) and values in the model's
    dtype, for the layers whose coding costs most quality (``exact_layers`` of :class:`CommVQCache` and
    :class:`~pressroom.presses.CommVQPress`).

    Mixed precision over layers is not in CommVQ (arXiv 2506.18879), which codes every layer; it follows the
    observation that a model's retrieval depends on few layers and heads (e.g. Wu et al., *Retrieval Head
    Mechanistically Explains Long-Context Factuality*, arXiv 2404.15574). On SmolLM2 at 2 bits one layer (18) carries
    56% of the multi-value needle answer's loss (``benchmarks/results/commvq_needle_nll_cpu.json``).

    The tokens live in buffers that grow by an eighth (``memory_bytes`` reports their capacity). In ``codes`` mode the
    layer shares the coded layers' attention masks, which cover only their windows: the mask the model builds is
    then used when it covers this layer's tokens, else the layer attends causally over all of them itself (SDPA).
    Padding masks are then not applied, as in the coded layers.

    Parameters
    ----------
    mode : str
        The cache's mode, ``"codes"`` or ``"dequantize"``.
    cache : transformers.Cache, optional
        The cache holding the layer (kept as a weak reference, so the cache is freed when dropped): its first coded
        layer gives the attention-mask sizes in ``codes`` mode.
    """

    def __init__(self, mode: str = "codes", cache: Any = None) -> None:
        if mode not in ("codes", "dequantize"):
            raise ValueError(f"mode must be 'codes' or 'dequantize', got {mode!r}.")
        self.mode = mode
        self._cache = weakref.ref(cache) if cache is not None else None
        self.is_initialized = False
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._held = {"_k": 0, "_v": 0}  # valid tokens per buffer (they differ only between two assignments)
        self._mark: int | None = None

    @property
    def n(self) -> int:
        """Tokens held (by both keys and values)."""
        return min(self._held.values())

    def _hold(self, n: int) -> None:
        self._held = {"_k": n, "_v": n}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tokens={self.n})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _check_kv(key_states, value_states)
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self._v = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.is_initialized = True

    def _ensure(self, needed: int) -> None:
        cap = min(self._k.shape[2], self._v.shape[2])
        if needed <= cap:
            return
        cap = max(needed, cap)
        cap += max(256, cap // 8)  # headroom of an eighth: geometric growth, counted by memory_bytes
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], cap, old.shape[-1])
            new[:, :, : self._held[name]] = old[:, :, : self._held[name]]
            setattr(self, name, new)

    def reserve(self, n_tokens: int) -> None:
        """Capacity for ``n_tokens`` tokens in all (once initialized)."""
        if self.is_initialized:
            self._ensure(int(n_tokens))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new rotated keys and values ``[B, H, n, D]`` after the held ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:2] != self._k.shape[:2] or key_states.shape[-1] != self._k.shape[-1]:
            raise ValueError(f"New keys {tuple(key_states.shape)} do not fit this layer (fixed at the first update).")
        if value_states.shape[:3] != key_states.shape[:3] or value_states.shape[-1] != self._v.shape[-1]:
            raise ValueError(f"New values {tuple(value_states.shape)} do not fit the keys {tuple(key_states.shape)}.")
        m = key_states.shape[2]
        self._ensure(self.n + m)
        self._k[:, :, self.n : self.n + m] = key_states
        self._v[:, :, self.n : self.n + m] = value_states
        self._hold(self.n + m)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return every held token (in ``codes`` mode the wrapped attention attends them)."""
        _check_no_pending()
        self.append(key_states, value_states)
        keys, values = self.keys, self.values
        if self.mode == "codes":
            _PENDING[0] = _Pending(self, keys, "exact", None)
        return keys, values

    def attend(
        self, pending: _Pending, query: torch.Tensor, scaling: float, dense=None, attention_mask=None
    ) -> torch.Tensor:
        """Attention output ``[B, q, Hq, D]`` over every held token: the model's attention with its own mask when that
        mask covers them (or none is needed), else causal SDPA over all of them."""
        keys, values = pending.key, self.values
        q, total = query.shape[2], keys.shape[2]
        mask_fits = q in (1, total) if attention_mask is None else attention_mask.shape[-1] == total
        if dense is not None and mask_fits:
            return dense(keys, values)
        # new tokens at the end: bottom-right aligned causal attention, without materializing a [q, total] mask
        causal = causal_lower_right(q, total) if q > 1 else None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=causal, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
        )
        return out.transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ kvpress's protocol and the Cache protocol
    @property
    def keys(self) -> torch.Tensor | None:
        return self._k[:, :, : self.n] if self.is_initialized else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(value, "_k")

    @property
    def values(self) -> torch.Tensor | None:
        return self._v[:, :, : self.n] if self.is_initialized else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(value, "_v")

    def _assign(self, value: torch.Tensor | None, name: str) -> None:
        """``held[:, :, :m]`` of the held tokens (kvpress removing an answer) truncates; any other tensor is copied
        into a new buffer (the held length is then the shorter of keys and values until both are assigned)."""
        if value is None or not isinstance(value, torch.Tensor) or value.dim() != 4:
            raise ValueError(f"An ExactLayer's {name[1:]} must be a [batch, kv_heads, tokens, head_dim] tensor.")
        held = getattr(self, name)
        if (
            held is not None
            and value.data_ptr() == held.data_ptr()
            and value.shape[2] <= self.n
            and value.shape[:2] == held.shape[:2]
            and value.shape[-1] == held.shape[-1]
            and value.stride() == held.stride()
        ):
            self._truncate(value.shape[2])
            return
        other = self._v if name == "_k" else self._k
        if self.is_initialized and (value.shape[:2] != other.shape[:2] or value.dtype != other.dtype):
            raise ValueError(
                f"An ExactLayer's {name[1:]} {tuple(value.shape)} ({value.dtype}) do not fit the layer's other side "
                f"{tuple(other.shape)} ({other.dtype})."
            )
        if not self.is_initialized:
            self.lazy_initialization(value, value)
        setattr(self, name, value.clone(memory_format=torch.contiguous_format))
        self._held[name] = value.shape[2]
        self._drop_stale_mark()

    def _truncate(self, length: int) -> None:
        """Hold the first ``length`` tokens; a mark beyond them is dropped (its tokens are gone)."""
        self._hold(min(self.n, length))
        self._drop_stale_mark()

    def _drop_stale_mark(self) -> None:
        if self._mark is not None and self._mark > self.n:
            self._mark = None

    def mark(self) -> None:
        self._mark = self.n if self.is_initialized else None

    def restore(self) -> None:
        if self._mark is None:
            raise RuntimeError("This ExactLayer has no mark (or its tokens were removed since).")
        self._hold(self._mark)

    def get_seq_length(self) -> int:
        return self.n

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        if self.mode == "codes":  # the mask the coded layers use (this layer adapts in attend)
            cache = self._cache() if self._cache is not None else None
            coded = next((p for p in getattr(cache, "layers", ()) if isinstance(p, CommVQLayer)), None)
            if coded is not None:
                return coded.get_mask_sizes(cache_position)
        return self.n + cache_position.shape[0], 0

    def memory_bytes(self) -> int:
        """Bytes of the key and value buffers (their capacity)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._k, self._v))

    def codebook_bytes(self) -> int:
        return 0

    def reset(self) -> None:
        self._hold(0)
        self._mark = None

    def crop(self, max_length: int) -> None:
        """As a coded layer: only back to the mark (the multi-question protocol); a crop to the held length or more
        does nothing. The same rule in every layer keeps a cache's layers in step."""
        if max_length < 0:
            max_length = self.n + max_length
        if max_length >= self.n:
            return
        if self._mark is not None and max_length == self._mark:
            self.restore()
            return
        raise ValueError(
            f"Cannot crop an ExactLayer from {self.n} to {max_length} tokens: a CommVQ cache crops only back to its "
            "marked context."
        )

    @property
    def max_batch_size(self) -> int:
        return self._k.shape[0] if self.is_initialized else 0


def check_exact_layers(exact_layers: Any, num_layers: int | None = None, name: str = "exact_layers") -> tuple[int, ...]:
    """``exact_layers`` (or another set of layers, ``name`` in the errors) as a sorted tuple of layer indices: an int,
    ints, or a string of ints joined by ``+`` (``"15+18"``, the form press specs use); checked against ``num_layers``
    when given."""
    items = exact_layers
    if isinstance(items, str):
        items = [s.strip() for s in items.split("+") if s.strip()]
        try:
            items = [int(s) for s in items]
        except ValueError as err:
            raise ValueError(f"{name} as a string must be layer indices joined by '+', got {exact_layers!r}.") from err
    elif isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    elif items is None:
        items = []
    try:
        items = list(items)
    except TypeError:
        items = None
    if items is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(f"{name} must be layer indices (ints >= 0), got {exact_layers!r}.")
    out = tuple(sorted(set(items)))
    if num_layers is not None:
        if any(i >= num_layers for i in out):
            raise ValueError(f"{name} {out} out of range: the model has {num_layers} layers.")
        if len(out) == num_layers:
            raise ValueError(f"{name} names every layer: nothing would be coded (use a DynamicCache).")
    return out


def _check_value_refine(value_refine: Any) -> None:
    if isinstance(value_refine, bool) or not isinstance(value_refine, int) or value_refine < 0:
        raise ValueError(
            f"value_refine must be an int >= 0 (greedy bit flips per token; 0: the encoder's bits as the reference "
            f"codes them), got {value_refine!r}."
        )


def _check_sink(n_sink: Any) -> None:
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an integer >= 0 (full-precision first tokens), got {n_sink!r}.")


def _check_window(window: Any, flush_chunk: Any) -> int:
    """Validate; return the flush chunk (``None``: ``min(64, max(1, window // 2))``)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}.")
    if flush_chunk is None:
        return min(64, max(1, window // 2))
    if isinstance(flush_chunk, bool) or not isinstance(flush_chunk, int) or not 1 <= flush_chunk <= window:
        raise ValueError(f"flush_chunk must be an integer in [1, window={window}], got {flush_chunk!r}.")
    return flush_chunk


def load_codebooks(codebooks: str | CommVQCodebooks, bits: int | None, config: Any) -> CommVQCodebooks:
    """Load (if a path) and validate codebooks for ``config``; they must hold value codecs."""
    books = codebooks if isinstance(codebooks, CommVQCodebooks) else CommVQCodebooks.load(codebooks, bits=bits)
    if bits is not None and books.bits != bits:
        raise ValueError(f"The codebooks are {books.bits}-bit, not {bits}-bit.")
    books.validate(_text_config(config))
    if books.values is None:
        raise ValueError(
            "These CommVQ codebooks hold keys only (e.g. the reference's .pt files): CommVQCache also needs the value "
            "codecs. Train them with `pressroom-train commvq values ...` and save the native format."
        )
    return books


class CommVQCache(Cache):
    """A transformers ``Cache`` holding CommVQ codes (arXiv 2506.18879), attention computed from the codes.

    Works with ``model.generate(..., past_key_values=CommVQCache(model.config, books))`` and manual loops; a long
    prompt fed in chunks is coded chunk by chunk (each chunk attends to the codes of the previous ones, dequantized a
    block at a time), so no full-precision copy of the whole prompt's cache ever exists. See :class:`CommVQLayer`
    for the storage and the module docstring for how attention is computed.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model config (RoPE frequencies, layers, KV heads; ``_attn_implementation`` picks the mode).
    codebooks : str or CommVQCodebooks
        A codebook directory (:meth:`CommVQCodebooks.load`) or loaded codebooks, with value codecs.
    bits : int, optional
        Expected bit width (checked against the codebooks).
    window : int, default=128
        Full-precision recent tokens kept at most.
    n_sink : int, default=4
        First tokens kept in full precision for good (:class:`CommVQLayer`).
    flush_chunk : int, optional
        Tokens coded at once when the window overflows (default ``min(64, window // 2)``).
    mode : str, optional
        ``"codes"`` or ``"dequantize"``; default from the model's attention implementation.
    use_triton : bool, optional
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere.
    rotary_emb : torch.nn.Module, optional
        The model's rotary embedding (``model.model.rotary_emb``): its ``inv_freq`` (computed on the model's device)
        is then used to rotate the coded keys, bit-identical to the queries' rotation even at million-token
        positions; default: the frequencies computed from the config on the CPU.
    encode_precision : str, default="ieee"
        Key encoder dot products on the GPU, ``"ieee"``, ``"tf32x3"`` or ``"tf32"`` (:class:`CommVQLayer`).
    value_refine : int, default=64
        Greedy bit flips per token after the value encoder; ``0``: the reference's coding (:class:`CommVQLayer`).
    exact_layers : tuple of int, optional
        Layers kept in full precision (:class:`ExactLayer`), every other layer coded; default none. Each costs
        ``2 * H_kv * head_dim`` elements per token (a SmolLM2 layer: 768 bytes a token in bfloat16).
    key_beam : int, default=1
        Code sequences kept per key by the key encoder (:class:`CommVQLayer`; 1: the paper's greedy search).

    Raises
    ------
    ValueError
        Codebooks that do not fit the model, keys-only codebooks, a bad window, an unsupported RoPE.
    FileNotFoundError
        A codebook directory that does not exist or holds no codebook.
    """

    def __init__(
        self,
        config: Any,
        codebooks: str | CommVQCodebooks,
        bits: int | None = None,
        window: int = 128,
        flush_chunk: int | None = None,
        mode: str | None = None,
        use_triton: bool | None = None,
        rotary_emb: Any = None,
        n_sink: int = 4,
        encode_precision: str = "ieee",
        value_refine: int = DEFAULT_VALUE_REFINE,
        pair_weights: torch.Tensor | None = None,
        exact_layers: tuple[int, ...] | int | str | None = None,
        key_beam: int = 1,
    ) -> None:
        flush_chunk = _check_window(window, flush_chunk)
        _check_sink(n_sink)
        _check_precision(encode_precision)
        _check_value_refine(value_refine)
        check_beam(key_beam)
        text = _text_config(config)
        books = load_codebooks(codebooks, bits, text)
        self.exact_layers = check_exact_layers(exact_layers, books.num_layers)
        if rotary_emb is not None and hasattr(rotary_emb, "inv_freq"):
            inv_freq = rotary_emb.inv_freq.detach().float()
            scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
        else:
            inv_freq, scaling = rope_frequencies(text)
        self.codebooks = books
        self.mode = mode or attention_mode(config)
        if self.mode == "codes":
            install_attention()
        self.resolver = PositionResolver()
        layers = [
            CommVQLayer(
                books.key_theta[i],
                books.values[i],
                inv_freq,
                scaling,
                window=window,
                flush_chunk=flush_chunk,
                n_sink=n_sink,
                mode=self.mode,
                resolver=self.resolver,
                use_triton=use_triton,
                encode_precision=encode_precision,
                value_refine=value_refine,
                pair_weights=books.layer_pair_weights(i),
                key_beam=key_beam,
            )
            if i not in self.exact_layers
            else ExactLayer(self.mode, cache=self)  # a weak reference: no cycle through the layers
            for i in range(books.num_layers)
        ]
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes held by all layers (codes, bits, norms, positions, windows); codebooks excluded."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def codebook_bytes(self) -> int:
        """Bytes of the codebooks on the device (theta tables, value codecs)."""
        return sum(layer.codebook_bytes() for layer in self.layers)

    def reserve(self, n_tokens: int) -> None:
        """Pre-allocate ``n_tokens`` coded tokens in every (initialized) layer."""
        for layer in self.layers:
            layer.reserve(n_tokens)

    def mark(self) -> None:
        for layer in self.layers:
            layer.mark()

    def restore(self) -> None:
        for layer in self.layers:
            layer.restore()


__all__ = [
    "CommVQCache",
    "CommVQLayer",
    "ExactLayer",
    "attention_mode",
    "check_exact_layers",
    "install_attention",
    "load_codebooks",
]
