"""Exact parallel evaluation of StreamingLLM's attention-sink cache (arXiv 2309.17453).

StreamingLLM (Xiao et al., *Efficient Streaming Language Models with Attention Sinks*,
https://arxiv.org/abs/2309.17453) keeps the first ``n_sink`` tokens of a stream (the attention sinks) and a rolling
window of the most recent tokens, and assigns positions *inside the cache*: the cached keys sit at positions
``0 .. L-1`` and the current query at ``L-1``. Measured the paper's way, one token per forward pass, a 150k-token
stream takes 10-20 ms per token on a GPU. This module computes the same per-token NLL in parallel, a chunk of
queries at a time.

Why it is exact. When token ``t`` is processed, every layer attends to the sinks ``{0 .. n_sink-1}`` and to the
window ``{max(n_sink, t-window+1) .. t}`` (``window`` counts the current token, so the cache holds at most
``n_sink + window`` tokens). In the cache the sinks sit at ``0 .. n_sink-1``, the ``W_t = min(t-n_sink+1, window)``
window tokens at ``n_sink .. n_sink+W_t-1`` and the query last, at ``p_t = n_sink+W_t-1 = min(t, n_sink+window-1)``.
RoPE scores depend only on the query-key distance, so

- window token ``j`` is seen at its true distance ``t - j``;
- sink ``s`` is seen at distance ``p_t - s`` (smaller than ``t - s`` once tokens have been evicted);
- for ``t < n_sink`` it is ordinary causal attention.

A cached key/value of token ``j`` was computed when ``j`` was processed, from ``j``'s own visible context, which is
exactly what a parallel computation produces when every query at every layer uses its own visible set and
distances. So, per layer, query ``t`` attends over two blocks of pre-RoPE keys joined in one softmax:

- window block: ``q`` rotated at ``t``, keys ``j`` in ``[max(n_sink, t-window+1), t]`` rotated at ``j``;
- sink block: ``q`` rotated at ``p_t``, sinks ``s <= t`` rotated at ``s``.

Only distances matter, so the window block is rotated at positions relative to the first key held for the chunk
(``t - b`` and ``j - b``): at absolute positions near 150k a float32 angle is off by up to ~0.008 rad, an error
the real cache (positions below ``n_sink + window``) never makes. The full cache (``window=None``) uses the true
absolute positions, as the model does, so it shows what happens beyond the model's context.

Positions. ``positions="cache"`` (the default) is the paper's pos-shift above. ``positions="original"`` keeps every
token at its position in the stream, as kvpress does when it evicts (``DecodingPress(StreamingLLMPress)``, which
keeps the rotated keys it was given): the sinks are then seen at their true distance ``t - s`` too, and every
angle is computed from absolute positions in float32, as the model computes them. With ``window = target_size -
n_sink + 1`` (kvpress compresses after the step, so a query also sees the token the next compression drops), this
is what ``DecodingPress(StreamingLLMPress(n_sink), compression_interval=1, target_size)`` computes token by token
(tested), in parallel.

Three entry points:

- :func:`sink_window_attention`: a context manager that swaps every decoder layer's attention forward for the
  two-block computation; consecutive forward passes inside it continue one stream.
- :func:`parallel_streaming_perplexity`: the perplexity of a long stream through it, chunk by chunk.
- :func:`reference_streaming_nll`: the literal token-by-token StreamingLLM procedure with an explicit per-layer
  list of pre-RoPE keys and values, for tests on short sequences.

Supported: Llama, Mistral (without its own sliding window) and Qwen3 decoders (GQA included) with a static
RoPE (default, linear, llama3, yarn), batch size 1.

Example
-------
>>> from pressroom.evaluation.corpora import corpus_tokens
>>> from pressroom.evaluation.models import load_model
>>> model, tokenizer = load_model("smollm2")
>>> ids = corpus_tokens(tokenizer, "pg_essays", "all")
>>> result = parallel_streaming_perplexity(model, ids, n_sink=4, window=1024)  # doctest: +SKIP
>>> result.perplexity, result.kv_bytes  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pressroom.evaluation.perplexity import PerplexityResult, _as_token_ids, _mean_to_perplexity, _model_device, _sync

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen3")
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
PARALLEL_MODE = "parallel"
POSITION_MODES = ("cache", "original")
# Largest score block (elements, float32) computed at once per layer; bigger chunks are split by query rows.
MAX_SCORE_ELEMENTS = 1 << 28


# --------------------------------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_config(n_sink: int | None, window: int | None) -> tuple[int, int | None]:
    """Validate ``(n_sink, window)``; return ``(n_sink, window)`` with ``window=None`` for the full cache."""
    if window is None:
        if n_sink is not None:
            _check_int("n_sink", n_sink, 0)
        return 0, None
    window = _check_int("window", window, 1)
    if n_sink is None:
        raise ValueError(
            "n_sink=None means the full cache: pass window=None too, or n_sink=0 for a plain sliding window."
        )
    return _check_int("n_sink", n_sink, 0), window


def _check_positions(positions: str) -> str:
    if positions not in POSITION_MODES:
        raise ValueError(
            f"positions must be one of {POSITION_MODES} ('cache': StreamingLLM's positions inside the cache; "
            f"'original': the stream positions, as kvpress's eviction keeps them), got {positions!r}."
        )
    return positions


# --------------------------------------------------------------------------------------------------- RoPE


def _rotary_embedding(model: PreTrainedModel) -> nn.Module:
    """The model's rotary embedding module (``inv_freq`` and ``attention_scaling``)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no rotary embedding at model.model.rotary_emb; not supported.")
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; only static RoPE is supported.")
    return rotary


def _cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[N, head_dim]`` as the model computes them: float32 ``positions * inv_freq``, cast last."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x [..., N, D]`` with ``cos``/``sin [N, D]`` (the model's ``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------- attention


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order; raises if the model is not supported."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Model type {model_type!r} is not supported by the parallel streaming evaluator; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; not supported.")
    modules = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ValueError(f"Decoder layer {type(layer).__name__} has no Llama-style self_attn; not supported.")
        sliding = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if sliding is not None:
            raise ValueError(
                f"The model has its own sliding-window attention (sliding_window={sliding}); "
                "the streaming evaluator replaces attention and supports full-attention models only."
            )
        modules.append(attn)
    return modules


def _qkv(attn: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-RoPE queries ``[H, N, D]``, keys and values ``[KVH, N, D]`` of one sequence (batch size 1)."""
    n, d = hidden_states.shape[1], attn.head_dim
    q = attn.q_proj(hidden_states).view(n, -1, d)
    k = attn.k_proj(hidden_states).view(n, -1, d)
    v = attn.v_proj(hidden_states).view(n, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over head_dim, before RoPE
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


@dataclass
class _Block:
    """Precomputed geometry of one block of query rows ``[r0, r1)`` of a chunk (shared by all layers)."""

    r0: int
    r1: int
    k_lo: int  # window keys [k_lo, k_hi) of the chunk's window-key tensor
    k_hi: int
    mask: torch.Tensor  # [rows, n_sink_keys + k_hi - k_lo], True where attended
    cos_q: torch.Tensor  # window-branch query rotation, [rows, D]
    sin_q: torch.Tensor
    cos_qs: torch.Tensor | None  # sink-branch query rotation (at p_t), [rows, D]
    sin_qs: torch.Tensor | None


@dataclass
class _Geometry:
    """Positions and masks of one chunk of queries ``[c0, c1)``, whose window keys are tokens ``[b, c1)``."""

    c0: int
    c1: int
    b: int
    n_sink_keys: int
    cos_k: torch.Tensor  # window keys at j - b, [c1 - b, D]
    sin_k: torch.Tensor
    cos_ks: torch.Tensor | None  # sinks at s, [n_sink_keys, D]
    sin_ks: torch.Tensor | None
    blocks: list[_Block]


class SinkWindowAttention:
    """State of :func:`sink_window_attention`: the per-layer store of pre-RoPE keys/values of one stream.

    Every forward pass of the model inside the context continues the stream: a pass over ``N`` tokens holds the
    queries ``[tokens_seen, tokens_seen + N)``. Call :meth:`reset` to start a new stream.

    Attributes
    ----------
    n_sink : int
        Attention sinks kept (0 for the full cache).
    window : int or None
        Rolling-window length, counting the current token (``None``: the full cache, true positions).
    positions : str
        ``"cache"`` (StreamingLLM's positions inside the cache) or ``"original"`` (stream positions, as kvpress).
    """

    def __init__(
        self, model: PreTrainedModel, n_sink: int | None, window: int | None, positions: str = "cache"
    ) -> None:
        self.n_sink, self.window = _check_config(n_sink, window)
        self.positions = _check_positions(positions)
        self.modules = _attention_modules(model)
        rotary = _rotary_embedding(model)
        self.inv_freq = rotary.inv_freq
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        head_dim = int(self.modules[0].head_dim)
        if self.inv_freq.numel() * 2 != head_dim:
            raise ValueError(
                f"Partial rotary embeddings are not supported (inv_freq has {self.inv_freq.numel()} entries "
                f"for head_dim {head_dim})."
            )
        self.reset()

    @property
    def full_cache(self) -> bool:
        return self.window is None

    @property
    def capacity(self) -> int | None:
        """Tokens the equivalent sink+window cache holds at most (``None`` for the full cache)."""
        return None if self.window is None else self.n_sink + self.window

    @property
    def tokens_seen(self) -> int:
        """Tokens of the stream processed so far (by the last layer)."""
        return self._seen[-1]

    def reset(self) -> None:
        """Forget the stream: empty every layer's store."""
        n = len(self.modules)
        self._seen = [0] * n
        self._keys: list[torch.Tensor | None] = [None] * n  # window store, tokens [b_next, seen)
        self._values: list[torch.Tensor | None] = [None] * n
        self._sink_keys: list[torch.Tensor | None] = [None] * n
        self._sink_values: list[torch.Tensor | None] = [None] * n
        self._geometry: _Geometry | None = None

    # ------------------------------------------------------------------ geometry

    def _store_start(self, c0: int) -> int:
        """Index of the first token kept in the window store when the chunk starting at ``c0`` begins."""
        return 0 if self.window is None else max(0, c0 - self.window)

    def _geometry_for(
        self, c0: int, c1: int, device: torch.device, dtype: torch.dtype, kv_heads: int, groups: int
    ) -> _Geometry:
        geo = self._geometry
        if geo is not None and geo.c0 == c0 and geo.c1 == c1 and geo.cos_k.device == device:
            return geo
        n_sink, window = self.n_sink, self.window
        b = self._store_start(c0)
        ns = 0 if window is None else min(n_sink, c1)
        scale = self.attention_scaling
        # window block: relative to b (only distances matter) with positions inside the cache; the stream's own
        # positions, as the model computes the angles, with original positions
        origin = 0 if self.positions == "original" else b
        j = torch.arange(b, c1, device=device)
        cos_k, sin_k = _cos_sin(j - origin, self.inv_freq, scale, dtype)
        cos_ks = sin_ks = None
        if ns:
            cos_ks, sin_ks = _cos_sin(torch.arange(ns, device=device), self.inv_freq, scale, dtype)

        # Split the chunk's query rows so that one block's scores stay below MAX_SCORE_ELEMENTS.
        n_rows = c1 - c0
        rows = n_rows
        while rows > 1:
            keys = (c1 - b) if window is None else min(c1 - b, rows + window)
            if kv_heads * groups * rows * (ns + keys) <= MAX_SCORE_ELEMENTS:
                break
            rows = (rows + 1) // 2
        blocks = []
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            t = torch.arange(c0 + r0, c0 + r1, device=device)
            k_lo = 0 if window is None else max(0, c0 + r0 - window + 1 - b)
            k_hi = c0 + r1 - b
            jj = j[k_lo:k_hi]
            win = jj[None, :] <= t[:, None]
            if window is not None:
                win &= (jj[None, :] > t[:, None] - window) & (jj[None, :] >= n_sink)
            cos_q, sin_q = _cos_sin(t - origin, self.inv_freq, scale, dtype)
            cos_qs = sin_qs = None
            if ns:
                sink = torch.arange(ns, device=device)[None, :] <= t[:, None]
                win = torch.cat((sink, win), dim=1)
                # the query's in-cache position, or its stream position when positions are original
                p = t if self.positions == "original" else torch.clamp(t, max=n_sink + window - 1)
                cos_qs, sin_qs = _cos_sin(p, self.inv_freq, scale, dtype)
            blocks.append(_Block(r0, r1, k_lo, k_hi, win, cos_q, sin_q, cos_qs, sin_qs))
        geo = _Geometry(c0, c1, b, ns, cos_k, sin_k, cos_ks, sin_ks, blocks)
        self._geometry = geo
        return geo

    # ------------------------------------------------------------------ store

    def _window_keys(self, i: int, k: torch.Tensor, v: torch.Tensor, c0: int, c1: int):
        """Keys/values of tokens ``[b, c1)`` for layer ``i``, and the store updated for the next chunk."""
        old_k, old_v = self._keys[i], self._values[i]
        if self.window is None:
            # Full cache: an amortised growable buffer; the store *is* the window keys.
            held = 0 if old_k is None else c0
            if old_k is None or old_k.shape[1] < c1:
                cap = max(c1, 2 * (0 if old_k is None else old_k.shape[1]))
                new_k = k.new_empty(k.shape[0], cap, k.shape[2])
                new_v = v.new_empty(v.shape[0], cap, v.shape[2])
                if held:
                    new_k[:, :held] = old_k[:, :held]
                    new_v[:, :held] = old_v[:, :held]
                self._keys[i], self._values[i] = old_k, old_v = new_k, new_v
            old_k[:, c0:c1] = k
            old_v[:, c0:c1] = v
            return old_k[:, :c1], old_v[:, :c1]
        all_k = k if old_k is None else torch.cat((old_k, k), dim=1)
        all_v = v if old_v is None else torch.cat((old_v, v), dim=1)
        keep = c1 - self._store_start(c1)  # the next chunk needs the last `window` tokens
        self._keys[i] = all_k[:, all_k.shape[1] - keep :].clone()
        self._values[i] = all_v[:, all_v.shape[1] - keep :].clone()
        return all_k, all_v

    def _sinks(self, i: int, k: torch.Tensor, v: torch.Tensor, c0: int, c1: int, ns: int):
        """Pre-RoPE keys/values of the sinks ``[0, ns)`` of layer ``i``, taking new ones from this chunk."""
        if c0 < ns:
            take = ns - c0
            sk, sv = self._sink_keys[i], self._sink_values[i]
            self._sink_keys[i] = k[:, :take].clone() if sk is None else torch.cat((sk, k[:, :take]), dim=1)
            self._sink_values[i] = v[:, :take].clone() if sv is None else torch.cat((sv, v[:, :take]), dim=1)
        return self._sink_keys[i], self._sink_values[i]

    # ------------------------------------------------------------------ forward

    def attention(self, i: int, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Sink + window attention of layer ``i`` for the next ``N`` tokens of the stream; ``[1, N, hidden]``."""
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise ValueError(
                f"The streaming evaluator handles one stream (batch size 1), got hidden states "
                f"{tuple(hidden_states.shape)}."
            )
        dtype = hidden_states.dtype
        q, k, v = _qkv(attn, hidden_states)
        heads, n, d = q.shape
        kv_heads = k.shape[0]
        groups = heads // kv_heads
        c0 = self._seen[i]
        c1 = c0 + n
        geo = self._geometry_for(c0, c1, hidden_states.device, dtype, kv_heads, groups)
        ns = geo.n_sink_keys
        win_k, win_v = self._window_keys(i, k, v, c0, c1)
        k_rot = _rotate(win_k, geo.cos_k, geo.sin_k).float()
        win_v = win_v.float()
        sink_k = sink_v = None
        if ns:
            sk, sv = self._sinks(i, k, v, c0, c1, ns)
            sink_k = _rotate(sk, geo.cos_ks, geo.sin_ks).float()
            sink_v = sv.float()
        # Query head h uses KV head h // groups (transformers' repeat_kv): view q as [KVH, G, N, D].
        qg = q.view(kv_heads, groups, n, d)
        out = torch.empty(kv_heads, groups, n, d, dtype=torch.float32, device=q.device)
        for blk in geo.blocks:
            qb = qg[:, :, blk.r0 : blk.r1]
            rows = blk.r1 - blk.r0
            q_win = _rotate(qb, blk.cos_q, blk.sin_q).float().reshape(kv_heads, groups * rows, d)
            scores = q_win @ k_rot[:, blk.k_lo : blk.k_hi].transpose(1, 2)
            if ns:
                q_sink = _rotate(qb, blk.cos_qs, blk.sin_qs).float().reshape(kv_heads, groups * rows, d)
                scores = torch.cat((q_sink @ sink_k.transpose(1, 2), scores), dim=2)
            scores = scores.view(kv_heads, groups, rows, -1).mul_(attn.scaling)
            scores.masked_fill_(~blk.mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(kv_heads, groups * rows, -1)
            o = probs[:, :, ns:] @ win_v[:, blk.k_lo : blk.k_hi]
            if ns:
                o += probs[:, :, :ns] @ sink_v
            out[:, :, blk.r0 : blk.r1] = o.view(kv_heads, groups, rows, d)
        self._seen[i] = c1
        out = out.view(heads, n, d).transpose(0, 1).reshape(1, n, heads * d).to(dtype)
        return attn.o_proj(out)


def _patched_forward(state: SinkWindowAttention, i: int, attn: nn.Module):
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        # position_embeddings, attention_mask and past_key_values are ignored: positions and visibility come
        # from the stream, and the store replaces the cache.
        return state.attention(i, attn, hidden_states), None

    return forward


@contextmanager
def sink_window_attention(
    model: PreTrainedModel, n_sink: int | None, window: int | None, positions: str = "cache"
) -> Iterator[SinkWindowAttention]:
    """Swap every decoder layer's attention for StreamingLLM's sink + window attention, computed in parallel.

    Inside the context, consecutive forward passes of ``model`` (batch size 1, ``use_cache=False``) continue one
    token stream: each query ``t`` attends, at every layer, to the sinks ``0 .. n_sink-1`` at their in-cache
    distances (query at ``p_t = min(t, n_sink + window - 1)``) and to the window
    ``[max(n_sink, t - window + 1), t]`` at true distances, in one float32 softmax, exactly as StreamingLLM's
    cache with positions assigned inside the cache (arXiv 2309.17453) does token by token. Memory per layer is
    ``O(N * (n_sink + window + N))`` for a pass of ``N`` tokens, plus the store of pre-RoPE keys/values of the
    sinks and the last ``window`` tokens. The model's ``position_ids``, attention mask and cache are ignored.

    Parameters
    ----------
    model : PreTrainedModel
        A Llama, Mistral (without sliding window) or Qwen3 causal LM with a static RoPE.
    n_sink : int or None
        Attention sinks kept (``>= 0``; 0 is a plain sliding window with positions shifted inside the cache).
    window : int or None
        Recent tokens kept, counting the current one (``>= 1``). ``None`` (with ``n_sink`` ``None`` or any value):
        the full cache with true positions, i.e. ordinary causal attention, also beyond the model's context.
    positions : str
        ``"cache"`` (default): StreamingLLM's positions inside the cache. ``"original"``: every token keeps its
        stream position, as kvpress's ``DecodingPress(StreamingLLMPress)`` does (see the module docstring).

    Yields
    ------
    SinkWindowAttention
        The stream's state (``tokens_seen``, ``reset()``).

    Raises
    ------
    ValueError
        ``window < 1``, ``n_sink < 0``, ``n_sink=None`` with a window, an unknown ``positions``, an unsupported
        model, or nested use.
    """
    state = SinkWindowAttention(model, n_sink, window, positions)
    if any(getattr(m, "_pressroom_streaming", False) for m in state.modules):
        raise ValueError("sink_window_attention is already active on this model; it cannot be nested.")
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for i, attn in enumerate(state.modules):
            saved.append((attn, attn.__dict__.get("forward")))
            attn.forward = _patched_forward(state, i, attn)
            attn._pressroom_streaming = True
        yield state
    finally:
        for attn, previous in saved:
            if previous is None:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = previous
            attn.__dict__.pop("_pressroom_streaming", None)
        state.reset()


# --------------------------------------------------------------------------------------------------- perplexity


def sink_window_kv_bytes(model: PreTrainedModel, tokens: int, n_sink: int | None, window: int | None) -> int:
    """Bytes of K and V a sink+window cache of capacity ``n_sink + window`` holds after ``tokens`` tokens.

    ``2 * layers * kv_heads * head_dim * min(tokens, n_sink + window) * itemsize`` (``tokens`` for the full cache),
    in the model's dtype. Computed, not measured.
    """
    n_sink, window = _check_config(n_sink, window)
    modules = _attention_modules(model)
    attn = modules[0]
    kv_heads = attn.k_proj.out_features // attn.head_dim
    itemsize = attn.k_proj.weight.element_size()
    held = tokens if window is None else min(tokens, n_sink + window)
    return 2 * len(modules) * kv_heads * int(attn.head_dim) * held * itemsize


def parallel_streaming_perplexity(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    n_sink: int | None,
    window: int | None,
    chunk_size: int = 1024,
    max_tokens: int | None = None,
    progress: bool = True,
    positions: str = "cache",
) -> PerplexityResult:
    """Streaming perplexity of StreamingLLM's sink + window cache, computed exactly and in parallel.

    Gives the per-token NLL of the paper's protocol (arXiv 2309.17453: one token per forward pass into a cache
    of ``n_sink`` attention sinks and a rolling window of ``window`` tokens, positions assigned inside the cache)
    without the token-by-token loop: ``chunk_size`` queries per forward pass under
    :func:`sink_window_attention`. See the module docstring for why this is exact.

    Parameters
    ----------
    model : PreTrainedModel
        A supported causal LM (Llama, Mistral without sliding window, Qwen3), in eval mode.
    input_ids : torch.LongTensor
        The stream, 1-D ``[T]`` or ``[1, T]``.
    n_sink : int or None
        Attention sinks (``>= 0``).
    window : int or None
        Rolling-window length counting the current token (``>= 1``); ``None``: the full cache (ordinary causal
        attention at true positions, chunked, also beyond the model's context).
    chunk_size : int
        Queries per forward pass (memory ``O(chunk_size * (n_sink + window + chunk_size))`` per layer).
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens of the stream.
    progress : bool
        Show a tqdm progress bar.
    positions : str
        ``"cache"`` (default, the paper's) or ``"original"`` (kvpress's eviction; see the module docstring).

    Returns
    -------
    PerplexityResult
        ``tokens = T - 1`` predictions, ``nll`` per token, ``mode = "parallel"``. ``kv_bytes`` and
        ``kv_bytes_max`` are *computed, not measured*: the bytes a cache of capacity ``n_sink + window`` holds for
        this model and dtype after the ``T - 1`` tokens fed, ``2 * layers * kv_heads * head_dim *
        min(T - 1, n_sink + window) * itemsize`` (all ``T - 1`` tokens for the full cache).

    Raises
    ------
    ValueError
        ``window < 1``, ``n_sink < 0``, ``n_sink=None`` with a window, ``chunk_size < 1``, ``max_tokens < 2``,
        fewer than 2 tokens, input not ``[T]`` / ``[1, T]``, or an unsupported model.
    """
    n_sink_checked, window = _check_config(n_sink, window)
    _check_positions(positions)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    ids = _as_token_ids(input_ids)
    if max_tokens is not None:
        max_tokens = _check_int("max_tokens", max_tokens, 2)
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(
            f"Perplexity needs at least 2 tokens (one context token and one to predict), got {ids.numel()}."
        )
    device = _model_device(model)
    ids = ids.to(device)
    n_pred = ids.numel() - 1
    nll = torch.empty(n_pred, dtype=torch.float32, device=device)
    label = "full cache" if window is None else f"sinks {n_sink_checked}, window {window}"
    bar = tqdm(total=n_pred, disable=not progress, unit="tok", desc=f"parallel streaming ({label})", leave=False)
    _sync(device)
    started = time.perf_counter()
    try:
        with torch.inference_mode(), sink_window_attention(model, n_sink, window, positions):
            for start in range(0, n_pred, chunk_size):
                end = min(start + chunk_size, n_pred)
                positions = torch.arange(start, end, device=device)[None]
                logits = model(input_ids=ids[None, start:end], position_ids=positions, use_cache=False).logits
                nll[start:end] = F.cross_entropy(logits[0].float(), ids[start + 1 : end + 1], reduction="none")
                bar.update(end - start)
        _sync(device)
    finally:
        bar.close()
    runtime = time.perf_counter() - started
    nll_list = nll.cpu().tolist()
    kv_bytes = sink_window_kv_bytes(model, n_pred, n_sink, window)
    return PerplexityResult(
        perplexity=_mean_to_perplexity(float(np.mean(nll_list))),
        nll=nll_list,
        tokens=n_pred,
        runtime_seconds=runtime,
        tokens_per_second=n_pred / runtime if runtime > 0 else math.inf,
        kv_bytes=kv_bytes,
        kv_bytes_max=kv_bytes,
        mode=PARALLEL_MODE,
    )


# --------------------------------------------------------------------------------------------------- reference


def reference_streaming_nll(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    n_sink: int | None,
    window: int | None,
    positions: str = "cache",
) -> torch.Tensor:
    """The literal StreamingLLM procedure, token by token, for tests (slow: short sequences only).

    For each token: embed it, and at every layer append its pre-RoPE key/value to an explicit per-layer list,
    evict the oldest non-sink entry while the list is longer than ``n_sink + window``, rotate the ``L`` kept keys
    at the in-cache positions ``0 .. L-1`` and the query at ``L-1``, and attend (float32 softmax); then the MLP,
    the final norm and the LM head give the next token's NLL (arXiv 2309.17453, Section 3.2). No transformers
    ``Cache`` and no attention forward of the model are used: the decoder is run layer by layer from its parts.

    Parameters
    ----------
    model : PreTrainedModel
        A supported causal LM (see :func:`sink_window_attention`).
    input_ids : torch.LongTensor
        The stream, ``[T]`` or ``[1, T]``.
    n_sink, window : int or None
        As in :func:`parallel_streaming_perplexity` (``window=None``: keep everything, true positions).
    positions : str
        ``"cache"``: keys at ``0 .. L-1``, the query at ``L-1`` (the paper). ``"original"``: every key at its stream
        position and the query at ``t`` (kvpress's eviction).

    Returns
    -------
    torch.Tensor
        float32 ``[T - 1]`` (on CPU): NLL of token ``t + 1`` given the cache after token ``t``.

    Raises
    ------
    ValueError
        Bad ``n_sink``/``window``, fewer than 2 tokens, or an unsupported model.
    """
    n_sink, window = _check_config(n_sink, window)
    original = _check_positions(positions) == "original"
    ids = _as_token_ids(input_ids)
    if ids.numel() < 2:
        raise ValueError(f"Need at least 2 tokens, got {ids.numel()}.")
    modules = _attention_modules(model)
    rotary = _rotary_embedding(model)
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    base = model.model
    device = _model_device(model)
    ids = ids.to(device)
    keys: list[list[torch.Tensor]] = [[] for _ in modules]
    values: list[list[torch.Tensor]] = [[] for _ in modules]
    kept: list[int] = []  # stream positions of the entries every layer holds
    out = torch.empty(ids.numel() - 1, dtype=torch.float32)
    with torch.inference_mode():
        for t in range(ids.numel() - 1):
            x = base.embed_tokens(ids[None, t : t + 1])  # [1, 1, hidden]
            kept.append(t)
            if window is not None and len(kept) > n_sink + window:
                del kept[n_sink]
            length = len(kept)  # entries kept, at every layer
            key_pos = torch.tensor(kept, device=device) if original else torch.arange(length, device=device)
            cos, sin = _cos_sin(key_pos, rotary.inv_freq, scale, x.dtype)
            for layer, attn, lk, lv in zip(base.layers, modules, keys, values):
                h = layer.input_layernorm(x)
                q, k, v = _qkv(attn, h)  # [H, 1, D], [KVH, 1, D]
                lk.append(k[:, 0])
                lv.append(v[:, 0])
                if window is not None and len(lk) > n_sink + window:
                    del lk[n_sink], lv[n_sink]  # evict the oldest window token, keep the sinks
                if len(lk) != length:
                    raise RuntimeError(f"layer cache holds {len(lk)} entries, expected {length}")
                k_all = _rotate(torch.stack(lk, dim=1), cos, sin).float()  # [KVH, L, D], at key_pos
                v_all = torch.stack(lv, dim=1).float()
                q_rot = _rotate(q, cos[-1:], sin[-1:]).float()  # [H, 1, D], at key_pos[-1] (L-1, or t)
                # Query head h reads KV head h // groups (transformers' repeat_kv).
                kv_heads, d = k_all.shape[0], k_all.shape[2]
                q_kv = q_rot.view(kv_heads, -1, d)  # [KVH, G, D]
                scores = torch.einsum("kgd,kld->kgl", q_kv, k_all) * attn.scaling  # [KVH, G, L]
                o = torch.einsum("kgl,kld->kgd", torch.softmax(scores, dim=-1), v_all)  # [KVH, G, D]
                o = o.reshape(1, -1).to(x.dtype)  # [1, H * D], heads in order
                x = x + attn.o_proj(o)[None]
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = model.lm_head(base.norm(x))[0, -1].float()
            out[t] = -torch.log_softmax(logits, dim=-1)[ids[t + 1]].cpu()
    return out


__all__ = [
    "SinkWindowAttention",
    "parallel_streaming_perplexity",
    "reference_streaming_nll",
    "sink_window_attention",
    "sink_window_kv_bytes",
]
