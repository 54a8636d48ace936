"""StreamingLLM's rolling KV cache: attention sinks + a window, positions assigned inside the cache.

StreamingLLM (Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, arXiv 2309.17453) keeps the
first ``n_sink`` tokens of a stream and a rolling window of the most recent ones, and gives the cached tokens their
positions *in the cache* rather than in the text, so that a model can read an unbounded stream with constant memory
and without ever seeing a relative distance larger than the cache. This module implements it as a transformers
``Cache``:

- :class:`SinkWindowLayer`: one layer's ring of pre-RoPE keys and values (``n_sink + window`` slots, allocated once).
- :class:`SinkWindowCache`: a ``Cache`` of such layers, for ``model.generate``, a manual loop or
  :func:`pressroom.evaluation.perplexity.streaming_perplexity`.
- :func:`rope_frequencies`: the RoPE ``inv_freq`` and ``attention_scaling`` of a model config, as the model
  computes them.

:class:`pressroom.presses.SinkWindowPress` builds :class:`SinkWindowLayer` objects from a prefilled
``DynamicCache`` inside kvpress's pipeline.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from pressroom.kernels.rope_ring import (
    resolve_use_triton,
    ring_decode,
    ring_decode_steady,
    ring_rotate_keys,
    ring_store,
)

UNSUPPORTED_ROPE = ("dynamic", "longrope")  # frequencies change with the sequence length inside the model


def _text_config(config: Any) -> Any:
    if config is None:
        raise ValueError("SinkWindowCache needs the model config (for its RoPE frequencies), got None.")
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    try:
        return int(config.hidden_size // config.num_attention_heads)
    except AttributeError as err:
        raise ValueError("The config has neither head_dim nor hidden_size / num_attention_heads.") from err


def rope_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and attention scaling of a model, computed as its rotary embedding does.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (its text config is used). transformers 5 reads ``config.rope_parameters``;
        transformers 4.56+ reads ``config.rope_scaling`` and ``config.rope_theta``.

    Returns
    -------
    (inv_freq, attention_scaling)
        ``inv_freq``: float32 CPU tensor of ``head_dim // 2`` entries; ``attention_scaling``: the factor the model
        applies to cos and sin (1.0 for the default RoPE).

    Raises
    ------
    ValueError
        No config, no RoPE parameters, partial rotary embeddings, per-layer-type RoPE, or a RoPE whose frequencies
        depend on the sequence length (``dynamic``, ``longrope``).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = _text_config(config)
    params = getattr(text, "rope_parameters", None)
    if params is None:  # transformers 4.x
        scaling = getattr(text, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(text, "rope_theta", None)
        partial = getattr(text, "partial_rotary_factor", 1.0)
    else:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ValueError(f"Unsupported rope_parameters {params!r} (per-layer-type RoPE is not supported).")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params["rope_theta"]
        partial = params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    if rope_type in UNSUPPORTED_ROPE:
        raise ValueError(
            f"RoPE type {rope_type!r} changes its frequencies with the sequence length; SinkWindowCache supports "
            "static RoPE (default, linear, llama3, yarn)."
        )
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"Partial rotary embeddings (partial_rotary_factor={partial}) are not supported.")
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        if theta is None:
            raise ValueError("The config has no rope_theta: SinkWindowCache needs a RoPE model.")
        dim = _head_dim(text)
        # the expression of transformers' compute_default_rope_parameters, on the CPU as at model init
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        attention_scaling = 1.0
    else:
        init = ROPE_INIT_FUNCTIONS.get(rope_type)
        if init is None:
            raise ValueError(f"Unknown RoPE type {rope_type!r}.")
        inv_freq, attention_scaling = init(text, None)
    return inv_freq.detach().to(device="cpu", dtype=torch.float32), float(attention_scaling)


class PositionResolver:
    """Finds, once per forward pass, the position the caller gave the first new token.

    The attention layers call ``cache.update(keys, values, layer_idx, {"cos", "sin", "cache_position"})``; the cos /
    sin are the rotary embedding of the caller's ``position_ids`` and the same tensor objects for every layer of one
    forward pass, so the answer is computed at the first layer and reused (keyed by the identity of ``cos``).

    Candidates, in order: ``cache_position[0]``, the continuation of the previous call (its position plus its
    number of tokens), the number of tokens seen and the in-cache position. A candidate is accepted when the RoPE
    cos/sin at it and at its last token match the ones the model used, in every batch row (this also rejects
    per-row positions, e.g. left padding, and non-contiguous positions). If none matches, the position is solved
    from the rotation angles (coarse to fine frequencies, from each candidate as a prior) and verified the same
    way. One host synchronisation per forward pass.
    """

    def __init__(self) -> None:
        self._cos_ref: weakref.ReferenceType[torch.Tensor] | None = None
        self._position = 0
        self._cp_ref: weakref.ReferenceType[torch.Tensor] | None = None
        self._cp_start = 0

    def cache_position_start(self, cache_position: torch.Tensor) -> int:
        """``int(cache_position[0])``, memoised for the tensor object (one host sync per forward)."""
        if self._cp_ref is not None and self._cp_ref() is cache_position:
            return self._cp_start
        start = int(cache_position.reshape(-1)[0])
        self._cp_ref = weakref.ref(cache_position)
        self._cp_start = start
        return start

    def resolve(
        self,
        layer: SinkWindowLayer,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_position: torch.Tensor | None,
    ) -> int:
        """Position of the first of the new tokens whose rotation is ``cos`` / ``sin`` (``[B or 1, n, head_dim]``).

        Raises
        ------
        ValueError
            If no single position explains the rotation (per-row or non-contiguous positions, or a rotary embedding
            that does not match the config's).
        """
        if self._cos_ref is not None and self._cos_ref() is cos:
            return self._position
        candidates: list[int] = []
        if cache_position is not None and cache_position.numel() > 0:
            candidates.append(self.cache_position_start(cache_position))
        if layer._next_position is not None:
            candidates.append(layer._next_position)
        candidates += [layer.seen, layer.position_base()]
        candidates = list(dict.fromkeys(candidates))
        n_new = cos.shape[-2]
        ends = [0] if n_new == 1 else [0, n_new - 1]
        # one small device-to-host copy: the cos/sin of the first and last new token, every batch row
        given = torch.stack((cos[:, ends], sin[:, ends])).to(device="cpu", dtype=torch.float32)  # [2, B, E, D]
        tol = (0.05 + 4 * torch.finfo(cos.dtype).eps) * max(1.0, abs(layer.attention_scaling))
        position = self._first_match(layer, given, ends, candidates, tol)
        if position is None:
            solved = [self._solve(layer, given, prior) for prior in candidates]
            position = self._first_match(layer, given, ends, list(dict.fromkeys(solved)), tol)
        if position is None:
            raise ValueError(
                "SinkWindowCache could not determine the position of the new tokens from their rotary embedding: "
                "positions must be the same in every batch row (no left padding) and consecutive within a forward "
                "pass, and the model's RoPE must match its config (a model cast with `.to(torch.bfloat16)` holds a "
                "bfloat16 rotary inv_freq: load it with `from_pretrained(..., dtype=...)` / `from_config(..., "
                "dtype=...)`, which keep inv_freq in float32)."
            )
        self._cos_ref = weakref.ref(cos)
        self._position = position
        return position

    @staticmethod
    def _first_match(
        layer: SinkWindowLayer, given: torch.Tensor, ends: list[int], candidates: list[int], tol: float
    ) -> int | None:
        # A wrong integer position is off by ~0.5 at some frequency; the tolerance covers the model dtype's rounding
        # and ulp-level differences between our inv_freq and the model's (or CPU and GPU cos) at large positions.
        inv_freq = torch.tensor(layer._inv_freq_host, dtype=torch.float32)
        pos = torch.tensor([[c + e for e in ends] for c in candidates], dtype=torch.float32)  # [K, E]
        freqs = pos[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        own = torch.stack((emb.cos(), emb.sin())) * layer.attention_scaling  # [2, K, E, D]
        err = (own[:, None] - given[:, :, None]).abs().amax(dim=(0, 1, 3, 4))  # [K]
        for candidate, e in zip(candidates, err.tolist()):
            if e <= tol:
                return candidate
        return None

    @staticmethod
    def _solve(layer: SinkWindowLayer, given: torch.Tensor, prior: int) -> int:
        half = len(layer._inv_freq_host)
        theta = torch.atan2(given[1, 0, 0, :half].double(), given[0, 0, 0, :half].double()).tolist()
        estimate = float(prior)
        for f, th in sorted(zip(layer._inv_freq_host, theta)):  # coarse (slow) to fine (fast) frequencies
            if f <= 0:
                continue
            period = 2 * math.pi / f
            base = th / f
            estimate = base + period * round((estimate - base) / period)
        return int(round(estimate))


class SharedWorkspace:
    """The rotated-keys workspace, shared by the layers of one cache (or of one press).

    A decoding step writes every kept key, rotated, into the workspace and the attention reads it at once, before
    the next layer's update: one ``[B, H_kv, n_sink + window, D]`` tensor per shape, dtype and device serves every
    layer, so the cache holds about 2 (not 3) ring-sized tensors per layer. Held weakly here, strongly by the
    layers, so a workspace goes away with the last layer that uses it.
    """

    def __init__(self) -> None:
        self._buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The workspace for this shape, dtype and device (allocated on first use)."""
        key = (tuple(shape), dtype, str(device))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.zeros(shape, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer


class SinkWindowLayer(CacheLayerMixin):
    """One layer of StreamingLLM's rolling cache: ``n_sink`` sinks + a ring of ``window`` recent tokens.

    Storage. Allocated once, at the first update, with the dtype, device, batch size, KV heads and head_dim of the
    incoming keys: ``_raw_keys`` (keys before RoPE) and ``_values``, ``[B, H_kv, n_sink + window, D]``, plus a
    workspace of rotated keys of the same shape shared by all the layers of the cache (:class:`SharedWorkspace`).
    The token with stream index ``seq`` lives in slot ``seq`` if ``seq < n_sink``, else in slot
    ``n_sink + (seq - n_sink) % window``; nothing else is allocated while decoding.

    Visibility. A forward pass with ``q`` new tokens sees the kept tokens in logical order (sinks, then the window
    oldest to newest) except, when the cache is full, the oldest window token, which the first new token evicts;
    then the new tokens, causally. So one decoding step sees exactly ``n_sink + window`` keys (``window`` counts the
    current token) and a chunk of ``q`` tokens sees ``V = min(kept, n_sink + window - 1)`` cached ones plus itself.
    Afterwards the layer keeps the sinks and the last ``window`` tokens of the stream. A chunk longer than the
    window is fine.

    Positions (pos-shift, no drift). Keys are stored un-rotated: the keys the model hands over were rotated with the
    cos/sin in ``cache_kwargs``; they are un-rotated once, exactly (float32, dividing by ``cos**2 + sin**2``, which
    also undoes ``attention_scaling``). At read time, logical slot ``i`` is rotated in float32 from the stored key to
    position ``i + offset``, with the angle computed as the model's rotary embedding computes it (float32 position
    times float32 ``inv_freq``, cos/sin, times ``attention_scaling``), and ``offset`` chosen so that the new tokens
    sit exactly at the positions the caller used: ``offset = p - V`` where ``p`` is the caller's position of the
    first new token (found by :class:`PositionResolver`). Every query-key distance is therefore the in-cache
    distance, whatever absolute positions the caller passes (``model.generate``: growing positions; kvpress's
    pipeline: ``context_length + i``; :meth:`position_ids_for`: in-cache positions), and nothing accumulates: a key
    is recomputed from its stored original each time.

    Decoding (one new token). The new token overwrites the oldest window slot; in one kernel launch
    (:func:`pressroom.kernels.rope_ring.ring_decode`) every other kept key is rotated from its stored original into
    the workspace, in physical ring order, and the new key, as the model rotated it, joins them; the layer returns
    the workspace ``[B, H_kv, kept, D]`` and the value buffer itself (one query attends to an unordered set, so no
    reordering is needed). Nothing is allocated, and nothing carries over between steps in the workspace.

    Undo log (kvpress's multi-question protocol). :meth:`mark` records the current state; from then on, the first
    overwrite of each slot saves its content in a log (at most ``window`` tokens, plus the sinks still empty at the
    mark; grown on demand). Assigning to :attr:`keys` or :attr:`values` -- what kvpress's pipeline does after each
    answer, ``layer.keys = layer.keys[:, :, :n]`` -- restores the marked state (:meth:`restore`). A layer without a
    mark keeps no log and refuses the assignment.

    Parameters
    ----------
    n_sink : int
        Number of attention sinks (first tokens kept forever), ``>= 0``.
    window : int
        Number of recent tokens kept, ``>= 1``.
    inv_freq : torch.Tensor
        The model's RoPE inverse frequencies (``head_dim // 2`` float32 values).
    attention_scaling : float
        The rotary embedding's cos/sin scaling (1.0 for default RoPE).
    resolver : PositionResolver, optional
        Shared by the layers of one cache so that positions are found once per forward pass.
    workspace : SharedWorkspace, optional
        Shared by the layers of one cache (a layer alone gets its own).
    use_triton : bool, optional
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere; ``True`` / ``False``: forced.
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        n_sink: int,
        window: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        *,
        resolver: PositionResolver | None = None,
        workspace: SharedWorkspace | None = None,
        use_triton: bool | None = None,
    ) -> None:
        # CacheLayerMixin.__init__ would assign self.keys / self.values, which are properties here.
        _check_geometry(n_sink, window)
        if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.numel() == 0:
            raise ValueError("inv_freq must be a non-empty 1-D tensor (the model's rotary inv_freq).")
        self.n_sink = int(n_sink)
        self.window = int(window)
        self.capacity = self.n_sink + self.window
        self.attention_scaling = float(attention_scaling)
        self.use_triton = use_triton
        self.resolver = resolver if resolver is not None else PositionResolver()
        self.workspace_pool = workspace if workspace is not None else SharedWorkspace()
        self._inv_freq = inv_freq.detach().to(dtype=torch.float32).clone()
        self._inv_freq_host = tuple(float(f) for f in self._inv_freq.cpu())
        self._triton = False  # resolved at allocation
        self._raw_keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._workspace: torch.Tensor | None = None
        self._log_keys: torch.Tensor | None = None
        self._log_values: torch.Tensor | None = None
        self.is_initialized = False
        self.seen = 0
        self._next_position: int | None = None
        self._mark_seen: int | None = None
        self._log_len = 0
        self._log_max = 0
        self._graph_seq: torch.Tensor | None = None  # set by SinkWindowDecoder: steady-state steps read seq on device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_sink={self.n_sink}, window={self.window}, seen={self.seen}, kept={self.n_kept})"
        )

    # ------------------------------------------------------------------ geometry
    def _kept_after(self, seen: int) -> int:
        return min(seen, self.n_sink) + min(max(seen - self.n_sink, 0), self.window)

    @property
    def n_kept(self) -> int:
        """Number of tokens held (sinks + window tokens)."""
        return self._kept_after(self.seen)

    def position_base(self) -> int:
        """``V``: the number of cached tokens the next forward pass sees, i.e. the in-cache position of its first
        new token."""
        return min(self.n_kept, self.capacity - 1)

    def position_ids_for(self, n_new: int) -> torch.Tensor:
        """In-cache positions ``[1, n_new]`` that the next ``n_new`` tokens will occupy (``V .. V + n_new - 1``)."""
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
            raise ValueError(f"n_new must be a positive integer, got {n_new!r}.")
        device = self._raw_keys.device if self._raw_keys is not None else None
        base = self.position_base()
        return torch.arange(base, base + n_new, dtype=torch.long, device=device)[None]

    def _slot(self, seq: int) -> int:
        return seq if seq < self.n_sink else self.n_sink + (seq - self.n_sink) % self.window

    def _ring_first(self, seen: int, n_window: int) -> int:
        """Ring index of the oldest of the last ``n_window`` window tokens when ``seen`` tokens have been seen."""
        return (seen - n_window - self.n_sink) % self.window

    def _slot_runs(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """Contiguous runs ``(seq, slot, length)`` of the slots of stream indices ``lo .. hi-1`` (no wrap twice)."""
        seq = lo
        if seq < min(hi, self.n_sink):
            yield seq, seq, min(hi, self.n_sink) - seq
            seq = min(hi, self.n_sink)
        while seq < hi:
            ring = (seq - self.n_sink) % self.window
            length = min(hi - seq, self.window - ring)
            yield seq, self.n_sink + ring, length
            seq += length

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the ring, the value buffer and the workspace once, shaped after the incoming states."""
        if key_states.dim() != 4 or value_states.shape[:2] != key_states.shape[:2]:
            raise ValueError(f"Expected keys/values [batch, kv_heads, seq, head_dim], got {tuple(key_states.shape)}.")
        batch, heads, _, head_dim = key_states.shape
        if value_states.shape[-1] != head_dim:
            raise ValueError("SinkWindowLayer needs keys and values with the same head_dim.")
        if 2 * self._inv_freq.numel() != head_dim:
            raise ValueError(
                f"RoPE inv_freq has {self._inv_freq.numel()} frequencies but head_dim is {head_dim}: partial rotary "
                "embeddings are not supported."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (batch, heads, self.capacity, head_dim)
        self._raw_keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._values = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        self._workspace = self.workspace_pool.get(shape, self.dtype, self.device)
        self._inv_freq = self._inv_freq.to(self.device).clone()
        self._triton = resolve_use_triton(self.use_triton, self._raw_keys, self._values, self._workspace)
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens (evicting the oldest window tokens) and return the keys/values to attend to.

        Parameters
        ----------
        key_states, value_states : torch.Tensor
            ``[B, H_kv, q, D]``, keys rotated by the model.
        cache_kwargs : dict
            Must hold ``"cos"`` and ``"sin"`` (the model's rotary embedding of the new tokens); ``"cache_position"``
            helps find their position.

        Returns
        -------
        (keys, values)
            ``q == 1``: the workspace and value buffer, ``[B, H_kv, kept, D]``, in ring order. ``q > 1``: new tensors
            ``[B, H_kv, V + q, D]`` in logical order (visible cached tokens, then the new ones as given).
        """
        cache_kwargs = cache_kwargs or {}
        cos, sin = cache_kwargs.get("cos"), cache_kwargs.get("sin")
        if cos is None or sin is None:
            raise ValueError(
                "SinkWindowCache needs a RoPE model: cache_kwargs must hold the rotary 'cos' and 'sin' of the new keys."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        n_new = key_states.shape[-2]
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        if cos.shape[-2] != n_new or cos.shape[-1] != key_states.shape[-1]:
            raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not match {n_new} new keys.")
        if self._graph_seq is not None and n_new == 1:
            return self._decode_steady(key_states, value_states, cos, sin)
        position = self.resolver.resolve(self, cos, sin, cache_kwargs.get("cache_position"))
        self._next_position = position + n_new
        if n_new == 1:
            return self._decode(key_states, value_states, cos, sin, position)
        return self._prefill(key_states, value_states, cos, sin, position)

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = self._raw_keys.shape
        if (
            key_states.dim() != 4
            or key_states.shape[:2] != expected[:2]
            or key_states.shape[-1] != expected[-1]
            or value_states.shape != key_states.shape
        ):
            raise ValueError(
                f"New keys {tuple(key_states.shape)} / values {tuple(value_states.shape)} do not fit this layer's "
                f"buffers {tuple(expected)} (batch, kv heads and head_dim are fixed at the first update)."
            )

    def _store(self, key_states, value_states, cos, sin, seq0: int, start: int, stop: int, rotated_out=None) -> None:
        ring_store(
            key_states,
            value_states,
            cos,
            sin,
            self._raw_keys,
            self._values,
            seq0=seq0,
            start=start,
            stop=stop,
            n_sink=self.n_sink,
            window=self.window,
            rotated_out=rotated_out,
            use_triton=self._triton,
            validate=False,
        )

    def _rotate(self, out: torch.Tensor, pos_base: int, start: int, stop: int, ring_first: int, logical: bool) -> None:
        ring_rotate_keys(
            self._raw_keys,
            out,
            self._inv_freq,
            self.attention_scaling,
            pos_base=pos_base,
            start=start,
            stop=stop,
            n_sink=self.n_sink,
            window=self.window,
            ring_first=ring_first,
            logical_order=logical,
            use_triton=self._triton,
            validate=False,
        )

    def _gather_logical(
        self, keys_out: torch.Tensor | None, values_out: torch.Tensor | None, n_visible: int, pos_base: int
    ) -> None:
        """Write the first ``n_visible`` visible tokens in logical order (keys rotated to ``pos_base + i``)."""
        n_sinks = min(self.seen, self.n_sink, n_visible)
        n_window = n_visible - n_sinks
        if keys_out is not None and n_visible:
            self._rotate(keys_out, pos_base, 0, n_visible, self._ring_first(self.seen, n_window), logical=True)
        if values_out is None:
            return
        values_out[:, :, :n_sinks] = self._values[:, :, :n_sinks]
        dst = n_sinks
        for _, slot, length in self._slot_runs(self.seen - n_window, self.seen) if n_window else ():
            values_out[:, :, dst : dst + length] = self._values[:, :, slot : slot + length]
            dst += length

    def _survivors(self, seq0: int, n_new: int) -> list[tuple[int, int]]:
        """Token ranges of a chunk that the layer keeps: new sinks, and new tokens among the last ``window``."""
        sink_stop = min(max(self.n_sink - seq0, 0), n_new)
        window_start = max(sink_stop, n_new - self.window)
        return [(s, e) for s, e in ((0, sink_stop), (window_start, n_new)) if e > s]

    def _prefill(self, key_states, value_states, cos, sin, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_new = key_states.shape[-2]
        n_visible = self.position_base()
        batch, heads, _, head_dim = self._raw_keys.shape
        keys = key_states.new_empty((batch, heads, n_visible + n_new, head_dim))
        values = value_states.new_empty((batch, heads, n_visible + n_new, head_dim))
        self._gather_logical(keys, values, n_visible, position - n_visible)
        keys[:, :, n_visible:] = key_states
        values[:, :, n_visible:] = value_states
        seq0 = self.seen
        self._log_before_write(seq0, seq0 + n_new)
        for start, stop in self._survivors(seq0, n_new):
            self._store(key_states, value_states, cos, sin, seq0, start, stop)
        self.seen += n_new
        return keys, values

    def _decode(self, key_states, value_states, cos, sin, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.seen
        n_visible = self.position_base()
        self._log_before_write(seq, seq + 1)
        self.seen = seq + 1
        kept = n_visible + 1
        n_window = kept - min(self.seen, self.n_sink)
        # one launch: the kept keys rotated to `offset + logical index` (the new token lands at `position`), and
        # the new token stored (its raw key into the ring, the model's own rotated key into the workspace)
        ring_decode(
            key_states,
            value_states,
            cos,
            sin,
            self._raw_keys,
            self._values,
            self._workspace,
            self._inv_freq,
            self.attention_scaling,
            seq=seq,
            pos_base=position - n_visible,
            rot_start=0,
            rot_stop=kept,
            n_sink=self.n_sink,
            window=self.window,
            ring_first=self._ring_first(self.seen, n_window),
            use_triton=self._triton,
            validate=False,
        )
        if kept == self.capacity:
            return self._workspace, self._values
        return self._workspace[:, :, :kept], self._values[:, :, :kept]

    def _decode_steady(self, key_states, value_states, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """A steady-state decoding step for :class:`SinkWindowDecoder`: no host synchronisation, no Python state
        change (the decoder sets ``_graph_seq`` before the step and advances ``seen`` after it), so that one CUDA
        graph replays every step. The new token sits at in-cache position ``n_sink + window - 1``."""
        ring_decode_steady(
            key_states,
            value_states,
            cos,
            sin,
            self._raw_keys,
            self._values,
            self._workspace,
            self._inv_freq,
            self.attention_scaling,
            seq=self._graph_seq,
            n_sink=self.n_sink,
            window=self.window,
            use_triton=self._triton,
        )
        return self._workspace, self._values

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of what :meth:`update` returns for these queries.

        ``kv_length = V + q``; ``kv_offset = cache_position[0] - V``, so that the returned key ``j`` has mask index
        ``cache_position[0] - V + j``: every cached key is below the first query, the new keys are causal, and a 2-D
        ``attention_mask`` (e.g. ``model.generate``'s, all ones) is read at the most recent columns.
        """
        n_new = cache_position.shape[0]
        if self._graph_seq is not None and n_new == 1:  # the decoder's steady state: cache_position = capacity - 1
            return self.capacity, 0
        n_visible = self.position_base()
        start = self.resolver.cache_position_start(cache_position) if n_new else self.seen
        return n_visible + n_new, start - n_visible

    def get_seq_length(self) -> int:
        """Tokens seen so far (like ``DynamicSlidingWindowLayer.cumulative_length``), not tokens held."""
        return self.seen

    def get_max_cache_shape(self) -> int:
        """Capacity ``n_sink + window``."""
        return self.capacity

    @property
    def max_batch_size(self) -> int:
        return 0 if self._raw_keys is None else self._raw_keys.shape[0]

    @property
    def max_cache_len(self) -> int:
        return self.capacity

    # ------------------------------------------------------------------ prefill from another cache (the press)
    def load_prefill(self, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Fill an empty layer from a whole prefill: ``keys`` rotated by the model with ``cos`` / ``sin``.

        Keeps the sinks and the last ``window`` tokens (un-rotated); ``seen`` becomes the prefill length.
        """
        if self.seen:
            raise ValueError("load_prefill needs an empty SinkWindowLayer.")
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        if cos.shape[-2] != keys.shape[-2]:
            raise ValueError(f"cos/sin cover {cos.shape[-2]} tokens but the prefill has {keys.shape[-2]}.")
        self.lazy_initialization(keys, values)
        self._check_states(keys, values)
        n_new = keys.shape[-2]
        for start, stop in self._survivors(0, n_new):
            self._store(keys, values, cos, sin, 0, start, stop)
        self.seen = n_new
        self._next_position = None

    # ------------------------------------------------------------------ undo log
    def mark(self) -> None:
        """Record the current state; later assignments to :attr:`keys` / :attr:`values` restore it."""
        self._mark_seen = self.seen
        self._log_len = 0
        self._log_max = self.window + max(0, self.n_sink - self.seen)

    def release_mark(self) -> None:
        """Forget the mark and free the undo log."""
        self._mark_seen = None
        self._log_len = 0
        self._log_keys = self._log_values = None

    @property
    def marked(self) -> bool:
        return self._mark_seen is not None

    def _log_before_write(self, lo: int, hi: int) -> None:
        """Save the slots that stream indices ``lo .. hi-1`` overwrite, the first time since the mark."""
        if self._mark_seen is None:
            return
        first = max(lo - self._mark_seen, self._log_len)
        stop = min(hi - self._mark_seen, self._log_max)
        if stop <= first:
            return
        self._ensure_log(stop)
        for seq, slot, length in self._slot_runs(self._mark_seen + first, self._mark_seen + stop):
            e = seq - self._mark_seen
            self._log_keys[:, :, e : e + length] = self._raw_keys[:, :, slot : slot + length]
            self._log_values[:, :, e : e + length] = self._values[:, :, slot : slot + length]
        self._log_len = stop

    def _ensure_log(self, n: int) -> None:
        capacity = 0 if self._log_keys is None else self._log_keys.shape[2]
        if capacity >= n:
            return
        new_capacity = min(self._log_max, max(n, 2 * capacity, 16))
        batch, heads, _, head_dim = self._raw_keys.shape
        log_keys = self._raw_keys.new_empty((batch, heads, new_capacity, head_dim))
        log_values = self._values.new_empty((batch, heads, new_capacity, head_dim))
        if self._log_len:
            log_keys[:, :, : self._log_len] = self._log_keys[:, :, : self._log_len]
            log_values[:, :, : self._log_len] = self._log_values[:, :, : self._log_len]
        self._log_keys, self._log_values = log_keys, log_values

    def restore(self) -> None:
        """Return to the marked state (undo every token added since :meth:`mark`).

        Raises
        ------
        RuntimeError
            If the layer has no mark.
        """
        if self._mark_seen is None:
            raise RuntimeError(
                "This SinkWindowLayer has no mark to restore: call mark() after the context (SinkWindowPress does it "
                "in kvpress's pipeline)."
            )
        for seq, slot, length in self._slot_runs(self._mark_seen, self._mark_seen + self._log_len):
            e = seq - self._mark_seen
            self._raw_keys[:, :, slot : slot + length] = self._log_keys[:, :, e : e + length]
            self._values[:, :, slot : slot + length] = self._log_values[:, :, e : e + length]
        self.seen = self._mark_seen
        self._log_len = 0
        self._next_position = None

    # ------------------------------------------------------------------ keys / values protocol
    @property
    def keys(self) -> torch.Tensor | None:
        """A copy of the kept keys in logical order, rotated to in-cache positions ``0 .. kept-1``.

        Assigning to it (kvpress's pipeline does ``layer.keys = layer.keys[:, :, :n]`` after each answer) restores
        the state of the last :meth:`mark`; the assigned tensor must have the current or the marked number of kept
        tokens (anything else, e.g. another press pruning this layer, raises ``ValueError``).
        """
        if not self.is_initialized:
            return None
        kept = self.n_kept
        batch, heads, _, head_dim = self._raw_keys.shape
        keys = self._raw_keys.new_empty((batch, heads, kept, head_dim))
        self._gather_logical(keys, None, kept, 0)
        return keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(value, "keys")

    @property
    def values(self) -> torch.Tensor | None:
        """A copy of the kept values in logical order (see :attr:`keys` for assignment)."""
        if not self.is_initialized:
            return None
        batch, heads, _, head_dim = self._values.shape
        values = self._values.new_empty((batch, heads, self.n_kept, head_dim))
        self._gather_logical(None, values, self.n_kept, 0)
        return values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(value, "values")

    def _assign(self, value: torch.Tensor | None, name: str) -> None:
        if not self.is_initialized:
            raise RuntimeError(f"Cannot assign {name} to an empty SinkWindowLayer.")
        if self._mark_seen is None:
            raise RuntimeError(
                f"Assigning {name} to a SinkWindowLayer restores its marked state, but it has no mark: in kvpress's "
                "pipeline use SinkWindowPress (it marks the layers after the context), or call mark() yourself."
            )
        allowed = {self.n_kept, self._kept_after(self._mark_seen)}
        expected = self._raw_keys.shape
        if (
            not isinstance(value, torch.Tensor)
            or value.dim() != 4
            or value.shape[:2] != expected[:2]
            or value.shape[-1] != expected[-1]
            or value.shape[2] not in allowed
        ):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"A SinkWindowLayer's {name} can only be reset to its marked state (a tensor with {sorted(allowed)} "
                f"tokens, e.g. layer.{name}[:, :, :n]); got {shape}. It cannot be pruned by another press."
            )
        self.restore()

    # ------------------------------------------------------------------ memory and housekeeping
    def _tensors(self) -> list[torch.Tensor]:
        held = (self._raw_keys, self._values, self._workspace, self._log_keys, self._log_values, self._inv_freq)
        return [t for t in held if t is not None]

    def memory_bytes(self) -> int:
        """Bytes held: ring, values, undo log, the ``inv_freq`` copy and the (possibly shared) workspace."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def reset(self) -> None:
        """Forget every token (buffers are kept and zeroed, the mark is dropped)."""
        for t in (self._raw_keys, self._values):
            if t is not None:
                t.zero_()
        self.seen = 0
        self._next_position = None
        self.release_mark()

    def _map_batch(self, fn) -> None:
        for name in ("_raw_keys", "_values", "_log_keys", "_log_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t).contiguous())
        self._workspace = self.workspace_pool.get(self._raw_keys.shape, self._raw_keys.dtype, self._raw_keys.device)

    def _move(self, device: torch.device | str) -> None:
        self._inv_freq = self._inv_freq.to(device)
        self._map_batch(lambda t: t.to(device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``."""
        if self.is_initialized:
            self._map_batch(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        """Only a no-op crop is possible: evicted tokens cannot come back.

        Raises
        ------
        ValueError
            If ``max_length`` is below the number of tokens seen.
        """
        if max_length < 0:
            max_length = self.seen + max_length
        if max_length < self.seen:
            raise ValueError(
                f"Cannot crop a SinkWindowLayer to {max_length} tokens after {self.seen}: a rolling cache cannot "
                "rewind (use mark() / restore())."
            )

    def offload(self) -> None:
        """Move the buffers to the CPU."""
        if self.is_initialized:
            self._move("cpu")

    def prefetch(self) -> None:
        """Move the buffers back to the layer's device."""
        if self.is_initialized and self._raw_keys.device != self.device:
            self._move(self.device)


def _check_geometry(n_sink: Any, window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive integer, got {window!r}.")
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be a non-negative integer, got {n_sink!r}.")


class SinkWindowCache(Cache):
    """StreamingLLM's rolling cache (arXiv 2309.17453): ``n_sink`` attention sinks + the last ``window`` tokens,
    positions assigned inside the cache, constant memory for unbounded streams.

    Every layer is a :class:`SinkWindowLayer` (see it for the storage, the visibility rule, the exact position
    handling and the decoding fast path). Works with ``model.generate(..., past_key_values=cache)`` for any number
    of new tokens, with manual loops at any positions, and with
    :func:`pressroom.evaluation.perplexity.streaming_perplexity` (which passes :meth:`position_ids_for`).
    ``get_seq_length()`` is the number of tokens seen, so ``generate``'s positions keep growing; memory is
    ``memory_bytes()``: per layer a pre-RoPE key ring and a value ring of ``n_sink + window`` slots, plus one
    rotated-keys workspace shared by all layers; constant once the first token has been stored.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model config (its text config gives the RoPE frequencies and the number of layers).
    n_sink : int
        Attention sinks kept forever (the paper uses 4).
    window : int
        Recent tokens kept (``window`` counts the current token while decoding).
    use_triton : bool, optional
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere (or everywhere with
        ``PRESSROOM_FORCE_REFERENCE=1``); ``True`` / ``False``: forced.

    Raises
    ------
    ValueError
        ``window <= 0``, ``n_sink < 0``, no config, or an unsupported RoPE (see :func:`rope_frequencies`).

    Examples
    --------
    >>> cache = SinkWindowCache(model.config, n_sink=4, window=1020)  # doctest: +SKIP
    >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=10_000)  # doctest: +SKIP
    >>> cache.memory_bytes()  # doctest: +SKIP
    """

    def __init__(self, config: Any, n_sink: int = 4, window: int = 1024, use_triton: bool | None = None) -> None:
        _check_geometry(n_sink, window)
        text = _text_config(config)
        inv_freq, attention_scaling = rope_frequencies(text)
        n_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError("The config has no num_hidden_layers.")
        self.n_sink = n_sink
        self.window = window
        self.resolver = PositionResolver()
        self.workspace_pool = SharedWorkspace()
        layers = [
            SinkWindowLayer(
                n_sink,
                window,
                inv_freq,
                attention_scaling,
                resolver=self.resolver,
                workspace=self.workspace_pool,
                use_triton=use_triton,
            )
            for _ in range(n_layers)
        ]
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes actually held by all layers (rings, values, undo logs, ``inv_freq`` copies) plus the shared
        workspace, each tensor counted once."""
        seen: set[int] = set()
        total = 0
        for layer in self.layers:
            for t in layer._tensors():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    @property
    def n_kept(self) -> int:
        """Tokens held per layer (sinks + window tokens)."""
        return self.layers[0].n_kept

    def position_ids_for(self, n_new: int) -> torch.Tensor:
        """In-cache positions ``[1, n_new]`` of the next ``n_new`` tokens (see
        :meth:`SinkWindowLayer.position_ids_for`)."""
        return self.layers[0].position_ids_for(n_new)

    def mark(self) -> None:
        """Mark every layer (see :meth:`SinkWindowLayer.mark`)."""
        for layer in self.layers:
            layer.mark()

    def restore(self) -> None:
        """Restore every layer to its mark (see :meth:`SinkWindowLayer.restore`)."""
        for layer in self.layers:
            layer.restore()

    def release_mark(self) -> None:
        """Drop the marks and free the undo logs."""
        for layer in self.layers:
            layer.release_mark()


class SinkWindowDecoder:
    """Token-by-token decoding through a :class:`SinkWindowCache`, with one CUDA graph for the steady state.

    Until the ring is full, each step is an ordinary forward pass at the cache's in-cache positions. From then on,
    every step has the same shapes and the same in-cache positions (StreamingLLM's pos-shift: the new token always
    sits at ``n_sink + window - 1``), and the only thing that changes is the stream index, which the cache's kernel
    reads from a device tensor (:func:`pressroom.kernels.rope_ring.ring_decode_steady`). So the decoder runs the
    first steady step eagerly (a warm-up, on a side stream), captures the second into a CUDA graph and replays it
    for every later token: the Python and kernel-launch overhead of a decoding step (most of a batch-1 step of an
    8B model) is paid once. Without CUDA (or with ``use_graph=False``) the same steady-state code path runs eagerly.

    The logits returned by a replayed step live in the graph's static output: they are overwritten by the next
    step (clone them to keep them). The cache must not carry a kvpress multi-question mark, and its positions must
    be the in-cache ones (the decoder passes them). Feeding the cache elsewhere in between (e.g. a prefill chunk)
    is fine: the stream index is set from the cache before each replay.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose cache is ``cache``.
    cache : SinkWindowCache
        The rolling cache (prefilled or empty).
    use_graph : bool, optional
        ``None``: a CUDA graph on CUDA, eager steps elsewhere; ``True`` / ``False``: forced (``True`` needs CUDA).

    Examples
    --------
    >>> cache = SinkWindowCache(model.config, n_sink=4, window=4092)  # doctest: +SKIP
    >>> decoder = SinkWindowDecoder(model, cache)  # doctest: +SKIP
    >>> for _ in range(1_000_000):  # doctest: +SKIP
    ...     next_id = decoder.step(next_id).argmax(-1)
    """

    def __init__(self, model: Any, cache: SinkWindowCache, use_graph: bool | None = None) -> None:
        if not isinstance(cache, SinkWindowCache):
            raise ValueError(f"SinkWindowDecoder needs a SinkWindowCache, got {type(cache).__name__}.")
        self.model = model
        self.cache = cache
        self.use_graph = use_graph
        self._seq: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._cache_position: torch.Tensor | None = None
        self._graph: Any = None
        self._logits: torch.Tensor | None = None
        self._warm = False

    @property
    def captured(self) -> bool:
        """Whether the steady-state CUDA graph has been captured."""
        return self._graph is not None

    def _steady(self) -> bool:
        layers = self.cache.layers
        return all(
            layer.is_initialized and layer.seen + 1 >= layer.capacity and layer._mark_seen is None for layer in layers
        )

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits

    def _set_graph_mode(self, on: bool) -> None:
        for layer in self.cache.layers:
            layer._graph_seq = self._seq if on else None

    def _advance(self) -> None:
        for layer in self.cache.layers:
            layer.seen += 1
            layer._next_position = layer.capacity

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per batch row (``[B, 1]``) and return its logits ``[B, 1, vocab]``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError("SinkWindowDecoder.step takes input_ids of shape [batch, 1] (one token per row).")
        if not self._steady():
            self._set_graph_mode(False)
            return self._forward(input_ids, position_ids=self.cache.position_ids_for(1).to(input_ids.device))
        layer = self.cache.layers[0]
        device = layer._raw_keys.device
        graph = self.use_graph if self.use_graph is not None else device.type == "cuda"
        if graph and device.type != "cuda":
            raise ValueError("use_graph=True needs the model and cache on a CUDA device.")
        stale = self._seq is None or self._seq.device != device
        if stale or (self._ids is not None and self._ids.shape != input_ids.shape):
            self._seq = torch.zeros(1, dtype=torch.int64, device=device)
            self._ids = torch.zeros_like(input_ids, device=device)
            self._positions = torch.full((1, 1), layer.capacity - 1, dtype=torch.long, device=device)
            self._cache_position = torch.full((1,), layer.capacity - 1, dtype=torch.long, device=device)
            self._graph, self._logits, self._warm = None, None, False
        self._set_graph_mode(True)
        try:
            self._seq.fill_(layer.seen)
            self._ids.copy_(input_ids)
            kwargs = {"position_ids": self._positions, "cache_position": self._cache_position}
            if not graph:
                logits = self._forward(self._ids, **kwargs)
            elif not self._warm:  # warm-up (allocations, Triton compilation) on a side stream, as CUDA graphs need
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    logits = self._forward(self._ids, **kwargs)
                torch.cuda.current_stream(device).wait_stream(side)
                self._warm = True
            else:
                if self._graph is None:
                    self._graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self._graph):  # records, runs nothing
                        self._logits = self._forward(self._ids, **kwargs)
                self._graph.replay()
                logits = self._logits
        finally:
            self._set_graph_mode(False)
        self._advance()
        return logits


__all__ = [
    "PositionResolver",
    "SharedWorkspace",
    "SinkWindowCache",
    "SinkWindowDecoder",
    "SinkWindowLayer",
    "rope_frequencies",
]
