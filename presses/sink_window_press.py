"""SinkWindowPress: StreamingLLM done fully in kvpress's pipeline (attention sinks + a rolling window)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import QuantizedCache
from transformers.cache_utils import DynamicLayer

from pressroom.presses.sink_window_cache import UNSUPPORTED_ROPE, PositionResolver, SharedWorkspace, SinkWindowLayer


@dataclass
class SinkWindowPress(BasePress):
    """StreamingLLM (Xiao et al., *Efficient Streaming Language Models with Attention Sinks*,
    https://arxiv.org/abs/2309.17453): keep ``n_sink`` attention sinks and a rolling window of recent tokens, with
    positions assigned inside the cache, during prefill **and decoding**.

    kvpress's ``StreamingLLMPress`` prunes once, after the prefill, and keeps the original positions (kvpress issue
    #158). This press instead turns each layer of the prefilled ``DynamicCache`` into a
    :class:`~pressroom.presses.SinkWindowLayer` (sinks + the last ``window`` tokens, keys stored before RoPE): the
    layer itself then streams, so the question and the answer keep evicting the oldest window tokens while the
    press is no longer active, memory stays at ``n_sink + window`` tokens per layer, and every key is rotated to
    its in-cache position at each step (see :class:`~pressroom.presses.SinkWindowCache`).

    In ``pipeline("kv-press-text-generation")`` several questions on one context work: the press marks each layer
    after the prefill, and the pipeline's removal of an answer (``layer.keys = layer.keys[:, :, :n]``) restores the
    marked state from a bounded undo log. With ``cache=SinkWindowCache(...)`` in the pipeline the layers already
    stream and the press only marks them. Works in ``model.generate`` under ``with press(model):`` too.

    The prefill itself attends over the whole context (kvpress semantics: compress after prefill); for a streaming
    prefill, feed the context in chunks into a :class:`~pressroom.presses.SinkWindowCache`.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the context to evict at prefill when ``window`` is None:
        ``window = round(context_length * (1 - compression_ratio)) - n_sink`` (at least 1). Ignored when ``window``
        is given.
    n_sink : int, default=4
        Number of attention sinks (first tokens kept forever).
    window : int, optional
        A fixed number of recent tokens to keep, whatever the context length.
    use_triton : bool, optional
        ``None``: Triton kernels on CUDA, PyTorch references elsewhere; ``True`` / ``False``: forced.

    Raises
    ------
    ValueError
        ``compression_ratio`` outside ``[0, 1)``, ``n_sink < 0``, ``window <= 0``; at prefill, a quantized or
        sliding-window cache, or keys already pruned by another press.
    """

    compression_ratio: float = 0.0
    n_sink: int = 4
    window: int | None = None
    use_triton: bool | None = None
    _resolver: PositionResolver = field(init=False, repr=False, compare=False, default_factory=PositionResolver)
    _workspace: SharedWorkspace = field(init=False, repr=False, compare=False, default_factory=SharedWorkspace)

    def __post_init__(self) -> None:
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {ratio!r}.")
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be a non-negative integer, got {self.n_sink!r}.")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0
        ):
            raise ValueError(f"window must be a positive integer or None, got {self.window!r}.")

    def window_for(self, context_length: int) -> int:
        """The window used for a context of ``context_length`` tokens."""
        if self.window is not None:
            return self.window
        return max(1, round(context_length * (1.0 - self.compression_ratio)) - self.n_sink)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Not available: this press replaces the cache layer instead of returning pruned tensors.

        Raises
        ------
        TypeError
            Always; wrappers that call ``compress`` (``DecodingPress``, ``KeyRerotationPress``...) cannot wrap it.
            For streaming decoding use the press itself (its layers keep evicting) or a ``SinkWindowCache``.
        """
        raise TypeError(
            "SinkWindowPress acts through forward_hook by turning the cache layer into a streaming SinkWindowLayer; "
            "it cannot be wrapped by presses that call compress(). Its layers already evict while decoding."
        )

    def forward_hook(self, module: nn.Module, input: Any, kwargs: dict, output: Any) -> Any:
        """After an attention layer's prefill, replace its cache layer by a streaming :class:`SinkWindowLayer`."""
        cache = kwargs.get("past_key_values")
        cache_position = kwargs.get("cache_position")
        q_len = kwargs["hidden_states"].shape[1]
        if cache is None or cache_position is None or not is_prefilling(cache_position, q_len):
            return output
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        if isinstance(layer, SinkWindowLayer):  # cache=SinkWindowCache(...): it streams already
            layer.mark()
            return output
        if isinstance(cache, QuantizedCache) or type(layer) is not DynamicLayer:
            raise ValueError(
                f"SinkWindowPress needs a DynamicCache of full-attention layers (or a SinkWindowCache), got a "
                f"{type(layer).__name__} in a {type(cache).__name__}."
            )
        keys, values = layer.keys, layer.values
        if keys.shape[-2] != q_len:
            raise ValueError(
                f"Layer {layer_idx} holds {keys.shape[-2]} keys after a prefill of {q_len} tokens: SinkWindowPress "
                "must see the whole prefill (do not compose it after a pruning press)."
            )
        rotary = getattr(module, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise ValueError("SinkWindowPress needs the model's rotary embedding (apply it with `with press(model):`).")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in UNSUPPORTED_ROPE:
            raise ValueError(f"RoPE type {rope_type!r} changes its frequencies with the sequence length: unsupported.")
        cos, sin = kwargs["position_embeddings"]
        new_layer = SinkWindowLayer(
            self.n_sink,
            self.window_for(q_len),
            rotary.inv_freq,
            getattr(rotary, "attention_scaling", 1.0),
            resolver=self._resolver,
            workspace=self._workspace,
            use_triton=self.use_triton,
        )
        new_layer.load_prefill(keys, values, cos, sin)
        new_layer.mark()
        cache.layers[layer_idx] = new_layer
        return output


__all__ = ["SinkWindowPress"]
