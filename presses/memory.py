"""Bytes a KV cache actually holds.

A cache class of ours reports its own footprint with ``memory_bytes()`` (packed codes, ring buffers, norms);
for transformers' caches (``DynamicCache``, ``QuantizedCache``, ...) we add up every tensor its layers hold.
"""

from __future__ import annotations

import torch
from transformers import Cache


def _tensor_bytes(obj: object, seen: set[int]) -> int:
    total = 0
    for value in vars(obj).values():
        tensors = value if isinstance(value, (list, tuple)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def cache_memory_bytes(cache: Cache | None) -> int:
    """Bytes of device memory held by ``cache`` (0 for ``None``).

    Uses ``cache.memory_bytes()`` when the cache defines it; otherwise sums the tensors held by each layer
    (keys, values, quantized codes, scales), counting shared storage once.
    """
    if cache is None:
        return 0
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen: set[int] = set()
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Cannot measure a {type(cache).__name__}: it has no `layers` and no memory_bytes().")
    return sum(_tensor_bytes(layer, seen) for layer in layers)
