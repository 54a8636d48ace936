"""CommVQAblationPress: CommVQ's coding error on one side of the KV cache only, for attributing quality loss.

CommVQ (Li et al., ICML 2025, arXiv 2506.18879) codes keys (RoPE-commutative residual VQ) and values (a learned
binary codebook) with different methods and different errors. When a coded cache loses quality, this press tells
which side is responsible: it codes the prefilled cache exactly as :class:`~pressroom.presses.CommVQPress` does (same
codebooks, sinks, window), then keeps the dequantized tensors of one side and the original tensors of the other in a
plain ``DynamicLayer``.

This is a diagnostic, not a compression method: the cache it leaves holds full-size tensors and saves no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from pressroom.presses.commvq_cache import CommVQLayer, check_exact_layers
from pressroom.presses.commvq_press import CommVQPress

SIDES = ("keys", "values")
CODED = (*SIDES, "both")


@dataclass
class CommVQAblationPress(CommVQPress):
    """CommVQ coding of one side of the cache, the other kept exact (no memory saved: an ablation).

    Parameters
    ----------
    coded : str, default="keys"
        The side whose CommVQ reconstruction replaces the original: ``"keys"`` (values stay exact), ``"values"``
        (keys stay exact) or ``"both"`` (the coded cache's attention inputs, in a plain layer).
    layers : tuple of int, optional
        Only these layers are coded; the others keep their exact keys and values. ``None`` (default): every layer.

    The other fields are :class:`~pressroom.presses.CommVQPress`'s (codebooks, bits, window, n_sink, ...); the
    reconstruction is the CommVQ layer's own dequantization (``CommVQLayer.keys`` / ``.values``), so sinks and
    the full-precision window are kept exactly as in the coded cache.
    """

    coded: str = "keys"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coded not in CODED:
            raise ValueError(f"coded must be one of {CODED}, got {self.coded!r}.")
        if self.layers is not None:
            self.layers = check_exact_layers(self.layers, name="layers")

    def forward_hook(self, module: nn.Module, input: Any, kwargs: dict, output: Any) -> Any:
        """After the prefill, code the layer as CommVQPress does, then keep one side's reconstruction only."""
        cache = kwargs.get("past_key_values")
        idx = module.layer_idx
        if self.layers is not None and idx not in self.layers:  # left exact
            return output
        before = cache.layers[idx] if cache is not None else None
        exact = (before.keys, before.values) if type(before) is DynamicLayer and before.is_initialized else None
        output = super().forward_hook(module, input, kwargs, output)
        layer = cache.layers[idx] if cache is not None else None
        if exact is None or not isinstance(layer, CommVQLayer):
            return output
        keys, values = layer.keys, layer.values  # [coded tokens, then the window slots (sinks first)]
        if layer.pos.dim() != 2 or keys.shape != exact[0].shape or values.shape != exact[1].shape:
            raise ValueError(
                f"CommVQAblationPress: the coded layer holds {tuple(keys.shape)} keys for {tuple(exact[0].shape)} "
                "prefilled ones (an eviction press in front is not supported)."
            )
        # back to the prefill's token order (each batch row's positions of the coded tokens and the window slots)
        order = torch.cat((layer.pos[:, : layer.n], layer.wpos[:, : layer.nw]), dim=1).long().argsort(dim=1)
        gather = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        keys, values = keys.gather(2, gather), values.gather(2, gather)
        keys, values = keys.to(exact[0].dtype), values.to(exact[1].dtype)
        if self.coded == "keys":
            values = exact[1]
        elif self.coded == "values":
            keys = exact[0]
        plain = DynamicLayer()
        plain.update(keys, values)
        cache.layers[idx] = plain
        return output


__all__ = ["CODED", "CommVQAblationPress", "SIDES"]
