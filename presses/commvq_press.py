"""CommVQPress: CommVQ's coded KV cache in kvpress's pipeline (arXiv 2506.18879)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import BasePress, SnapKVPress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import QuantizedCache
from transformers.cache_utils import DynamicLayer

from pressroom.kernels.commvq_beam import check_beam
from pressroom.presses.commvq_cache import (
    DEFAULT_VALUE_REFINE,
    CommVQLayer,
    ExactLayer,
    _check_precision,
    _check_sink,
    _check_value_refine,
    _check_window,
    attention_mode,
    check_exact_layers,
    load_codebooks,
)
from pressroom.presses.commvq_codebooks import CommVQCodebooks
from pressroom.presses.sink_window_cache import UNSUPPORTED_ROPE, PositionResolver, rope_frequencies


def _recompute_rotated_keys(module: nn.Module, hidden_states: torch.Tensor, cos, sin) -> torch.Tensor:
    """The layer's rotated keys of the whole prefill ``[B, H, n, D]``, recomputed from its input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, n, _ = hidden_states.shape
    head_dim = module.head_dim
    k = module.k_proj(hidden_states).view(b, n, -1, head_dim)
    if hasattr(module, "k_norm"):
        k = module.k_norm(k)
    k = k.transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


def kept_indices(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Prefill index ``[B, H, m]`` of each kept key (``kept [B, H, m, D]`` rows of ``full [B, H, n, D]``).

    Matches by a random projection (sorted, then the nearest candidate verified on the whole vector), so an eviction
    press that gathered keys (any per-head selection) can be undone without knowing its indices.
    """
    g = torch.randn(full.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fp_full = full.double() @ g.to(full.device)
    fp_kept = kept.double() @ g.to(kept.device)
    order = fp_full.argsort(dim=-1)
    sorted_fp = fp_full.gather(-1, order)
    pos = torch.searchsorted(sorted_fp.contiguous(), fp_kept.contiguous()).clamp(max=full.shape[2] - 1)
    lo = (pos - 1).clamp(min=0)
    cand = torch.stack((order.gather(-1, lo), order.gather(-1, pos)), dim=-1)  # [B, H, m, 2]
    d = full.shape[-1]
    vec = full.gather(2, cand.flatten(2)[..., None].expand(-1, -1, -1, d)).view(*cand.shape, d)
    err = (vec.float() - kept.float()[..., None, :]).abs().amax(-1)
    best = err.argmin(-1, keepdim=True)
    idx = cand.gather(-1, best)[..., 0]
    eps = torch.finfo(kept.dtype).eps if kept.dtype.is_floating_point else 0.0
    tol = max(1e-3, 4 * eps) * kept.float().abs().amax().clamp_min(1.0)  # a recomputed key may differ by an ulp
    if bool((err.gather(-1, best)[..., 0] > tol).any()):
        raise ValueError(
            "CommVQPress could not find the positions of the keys another press kept: put only eviction presses that "
            "keep a subset of the prefill keys (unchanged) before CommVQPress."
        )
    return idx


@dataclass
class CommVQPress(BasePress):
    """CommVQ (Li et al., *CommVQ: Commutative Vector Quantization for KV Cache Compression*, ICML 2025,
    https://arxiv.org/abs/2506.18879): keys coded with a RoPE-commutative residual codebook (12-bit codes), values
    with a learned binary codebook, attention computed from the codes.

    After the prefill of each attention layer this press replaces the ``DynamicCache`` layer by a
    :class:`~pressroom.presses.CommVQLayer` holding only packed codes, norms and a small full-precision window; the
    question and the answer are then attended from the codes (Triton kernels on CUDA) and added to the window,
    which flushes into codes. Several questions on one context work (the layers are marked after the context and
    restored after each answer). It composes with eviction: ``ComposedPress([SnapKVPress(0.5), CommVQPress(...)])``
    codes only the kept keys (their positions are recovered per head). With ``cache=CommVQCache(...)`` in the pipeline
    the prefill is coded as it goes and the press only marks the layers.

    Parameters
    ----------
    codebooks : str or CommVQCodebooks
        Codebook directory (native format with value codecs, or a parent holding ``{bits}bit/``) or loaded
        codebooks.
    bits : int, default=2
        Bit width (1 or 2), checked against the codebooks.
    window : int, default=128
        Full-precision recent tokens; the rest of the context is coded.
    flush_chunk : int, optional
        Tokens coded at once when the window overflows while decoding (default ``min(64, window // 2)``).
    n_sink : int, default=4
        The context's first tokens kept in full precision beside the window (attention sinks); with an eviction
        press in front (per-head kept tokens) every kept token is coded.
    compression_ratio : float, default=0.0
        Not used to prune (CommVQ keeps every token); present for kvpress's tooling. The memory saving is
        reported by ``memory_bytes()``.
    use_triton : bool, optional
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere.
    encode_precision : str, default="ieee"
        The encoders' arithmetic: ``"ieee"`` (the reference quantizer's key codes), ``"tf32x3"``, ``"tf32"`` (key
        dot products on tensor cores, and the value encoder in TF32 on the GPU) or ``"half"`` (float16 key dot
        operands and the value encoder in bfloat16, on any device); see :class:`~pressroom.presses.CommVQLayer`.
    value_refine : int, default=64
        Greedy bit flips per token after the value encoder, each lowering the token's error (our addition; ``0``:
        the reference's coding; see :class:`~pressroom.presses.CommVQLayer`).
    exact_layers : tuple of int, optional
        Layers kept in full precision (:class:`~pressroom.presses.commvq_cache.ExactLayer`), the others coded; an
        int, ints, or ints joined by ``+`` in a press spec (``commvq:bits=2,exact_layers=18``). Our addition (mixed
        precision over layers): each such layer costs its full fp16 cache.
    pin_ratio : float, default=0.0
        Share of the prefill's tokens kept in full precision for good beside the sinks and the window (our
        addition, per-token mixed precision as in MiKV, arXiv 2402.18096, and ZipCache, arXiv 2405.14256): per layer
        the tokens that the last ``pin_window`` prefill tokens attend to most (SnapKV's observation window, arXiv
        2404.14469: attention averaged over those queries, the largest over the query heads). Each costs its full
        keys and values; ``0`` (default): CommVQ as in the paper. Needs the whole prefill (no eviction press in front).
    pin_window : int, default=64
        The observation window's queries for ``pin_ratio``.
    pin_span : int, default=1
        ``pin_ratio``'s token score is the largest window attention over the token and the ``pin_span - 1`` tokens
        before it. A query that attends to a phrase reads what follows it next (a retrieval question finds the key
        phrase, then copies the value after it), so ``pin_span > 1`` also keeps the span after each attended token.
    key_beam : int, default=1
        Code sequences kept per key by the key encoder after each residual step (our addition; 1: the paper's
        greedy search): 4 lowers SmolLM2's layer-18 key error by a fifth at 2 bits, for about 4 times the search's
        arithmetic, in PyTorch (:class:`~pressroom.presses.CommVQLayer`); the needle answers did not gain from it on
        the CPU (README).

    Raises
    ------
    ValueError
        Wrong bits or window; at prefill, codebooks that do not fit the model, keys-only codebooks, a quantized cache.
    FileNotFoundError
        A codebook path that does not exist or holds no codebook (at prefill).
    """

    requires_artifacts = True  # class attribute: the default evaluation job skips it (it needs trained codebooks)

    codebooks: str | CommVQCodebooks | None = None
    bits: int = 2
    window: int = 128
    flush_chunk: int | None = None
    n_sink: int = 4
    compression_ratio: float = 0.0
    use_triton: bool | None = None
    encode_precision: str = "ieee"
    value_refine: int = DEFAULT_VALUE_REFINE
    exact_layers: tuple[int, ...] | int | str | None = None
    key_beam: int = 1
    pin_ratio: float = 0.0
    pin_window: int = 64
    pin_span: int = 1
    _books: CommVQCodebooks | None = field(init=False, repr=False, compare=False, default=None)
    _resolver: PositionResolver = field(init=False, repr=False, compare=False, default_factory=PositionResolver)

    def __post_init__(self) -> None:
        if self.codebooks is None:
            raise ValueError(
                "CommVQPress needs codebooks: CommVQPress(codebooks='<dir>', bits=2); train them with "
                "`pressroom-train commvq all --model <model> --bits 2`."
            )
        if self.bits not in (1, 2):
            raise ValueError(f"bits must be 1 or 2, got {self.bits!r}.")
        _check_window(self.window, self.flush_chunk)
        _check_sink(self.n_sink)
        _check_precision(self.encode_precision)
        _check_value_refine(self.value_refine)
        check_beam(self.key_beam)
        if isinstance(self.pin_ratio, bool) or not isinstance(self.pin_ratio, (int, float)):
            raise ValueError(f"pin_ratio must be a number in [0, 1), got {self.pin_ratio!r}.")
        if not 0.0 <= float(self.pin_ratio) < 1.0:
            raise ValueError(f"pin_ratio must be in [0, 1) (a share of the prefill's tokens), got {self.pin_ratio!r}.")
        if isinstance(self.pin_window, bool) or not isinstance(self.pin_window, int) or self.pin_window < 1:
            raise ValueError(f"pin_window must be an int >= 1 (observation queries), got {self.pin_window!r}.")
        if isinstance(self.pin_span, bool) or not isinstance(self.pin_span, int) or self.pin_span < 1:
            raise ValueError(
                f"pin_span must be an int >= 1 (tokens scored by one attended token), got {self.pin_span!r}."
            )
        self.exact_layers = check_exact_layers(self.exact_layers)

    def books_for(self, config: Any) -> CommVQCodebooks:
        """The codebooks, loaded once and validated against ``config``."""
        if self._books is None:
            self._books = load_codebooks(self.codebooks, self.bits, config)
        else:
            self._books.validate(config)
        return self._books

    def pinned_tokens(
        self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, position_embeddings: tuple
    ) -> torch.Tensor | None:
        """The prefill positions ``pin_ratio`` keeps exact in this layer (int64 ``[k]``, sorted), or ``None``.

        The window attention of the last ``pin_window`` prefill queries (SnapKV's, with the layer's rotated ``keys
        [B, H_kv, n, D]``) scored by :meth:`pin_scores` and picked by :meth:`pick_pins`.
        """
        n = keys.shape[2]
        w = min(self.pin_window, n - 1)
        if self.pin_count(n, w) <= 0:
            return None
        attn = SnapKVPress.compute_window_attention(module, hidden_states, keys, w, position_embeddings)
        return self.pick_pins(self.pin_scores(attn, self.pin_span), n, w)

    def _pin_range(self, n: int, w: int) -> tuple[int, int]:
        """The candidates ``[lo, hi)``: after the sinks, before the last ``window`` tokens and the observation
        window."""
        return self.n_sink, min(n - self.window, n - w)

    def pin_count(self, n: int, w: int) -> int:
        """How many of ``n`` prefill tokens to pin with a ``w``-query observation window: ``round(pin_ratio * n)``,
        at most the candidates."""
        lo, hi = self._pin_range(n, w)
        return min(round(self.pin_ratio * n), hi - lo)

    def pick_pins(self, scores: torch.Tensor, n: int, w: int) -> torch.Tensor:
        """The :meth:`pin_count` best candidates of ``scores [n - w]``, sorted."""
        lo, hi = self._pin_range(n, w)
        return (scores[lo:hi].topk(self.pin_count(n, w)).indices + lo).sort().values

    @staticmethod
    def pin_scores(attn: torch.Tensor, span: int = 1) -> torch.Tensor:
        """Per-token scores ``[n - w]`` from the window attention ``[B, H_q, w, n - w]``: averaged over the window's
        queries, the largest over query heads and batch rows (one set of pinned tokens per layer), then the largest
        over each token and the ``span - 1`` tokens before it."""
        scores = attn.float().mean(dim=-2).amax(dim=1).amax(dim=0)
        if span > 1:  # a token scores as the most attended of itself and the span - 1 before it
            padded = torch.nn.functional.pad(scores[None, None], (span - 1, 0), value=0.0)
            scores = torch.nn.functional.max_pool1d(padded, span, stride=1)[0, 0]
        return scores

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """Not available: this press replaces the cache layer.

        Raises
        ------
        TypeError
            Always (wrappers that call ``compress`` cannot wrap it).
        """
        raise TypeError("CommVQPress acts through forward_hook (it replaces the cache layer); it cannot be wrapped.")

    def forward_hook(self, module: nn.Module, input: Any, kwargs: dict, output: Any) -> Any:
        """After an attention layer's prefill, code its cache layer into a :class:`CommVQLayer`."""
        cache = kwargs.get("past_key_values")
        cache_position = kwargs.get("cache_position")
        q_len = kwargs["hidden_states"].shape[1]
        if cache is None or cache_position is None or not is_prefilling(cache_position, q_len):
            return output
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        if isinstance(layer, (CommVQLayer, ExactLayer)):
            layer.mark()
            return output
        if isinstance(cache, QuantizedCache) or type(layer) is not DynamicLayer:
            raise ValueError(
                f"CommVQPress needs a DynamicCache (or a CommVQCache), got a {type(layer).__name__} in a "
                f"{type(cache).__name__}."
            )
        books = self.books_for(module.config)
        if layer_idx in check_exact_layers(self.exact_layers, books.num_layers):  # full precision beside the codes
            exact = ExactLayer(attention_mode(module.config), cache=cache)
            exact.append(layer.keys, layer.values)
            exact.mark()
            cache.layers[layer_idx] = exact
            return output
        cos, sin = kwargs["position_embeddings"]
        rope_type = getattr(module.config, "rope_parameters", None) or {}
        if isinstance(rope_type, dict) and rope_type.get("rope_type") in UNSUPPORTED_ROPE:
            raise ValueError(f"RoPE type {rope_type.get('rope_type')!r} is not supported by CommVQPress.")
        rotary = getattr(module, "rotary_emb", None)  # kvpress attaches the model's rotary embedding
        if rotary is not None and hasattr(rotary, "inv_freq"):  # the model's own frequencies (device-computed)
            inv_freq, rotary_scaling = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        else:
            inv_freq, rotary_scaling = rope_frequencies(module.config)
        keys, values = layer.keys, layer.values
        index = None
        if keys.shape[-2] != q_len:
            full = _recompute_rotated_keys(module, kwargs["hidden_states"], cos, sin)
            index = kept_indices(full, keys)
        new_layer = CommVQLayer(
            books.key_theta[layer_idx],
            books.values[layer_idx],
            inv_freq,
            rotary_scaling,
            window=self.window,
            flush_chunk=self.flush_chunk,
            n_sink=self.n_sink,
            mode=attention_mode(module.config),
            resolver=self._resolver,
            use_triton=self.use_triton,
            encode_precision=self.encode_precision,
            value_refine=self.value_refine,
            pair_weights=books.layer_pair_weights(layer_idx),
            key_beam=self.key_beam,
        )
        pin = None
        if self.pin_ratio > 0:
            if index is not None:
                raise ValueError(
                    "CommVQPress(pin_ratio>0) needs the whole prefill: it cannot follow an eviction press (set "
                    "pin_ratio=0 in a ComposedPress)."
                )
            pin = self.pinned_tokens(module, kwargs["hidden_states"], keys, (cos, sin))
        new_layer.load_prefill(keys, values, cos, sin, index=index, pin=pin)
        new_layer.mark()
        cache.layers[layer_idx] = new_layer
        return output


__all__ = ["CommVQPress", "kept_indices"]
