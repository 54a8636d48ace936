"""Causal attention under a KV-keep mask: the student's attention of eviction-invariant training (EIT).

A keep mask is a per-(batch, key) boolean ``keep[b, j]`` combined with causality, plus a prefill boundary
``split``: query ``i`` may attend to key ``j`` iff

    j <= i  and  (keep[b, j]  or  i < split)

The queries before ``split`` are the *prefill* (kvpress compresses the cache after it: they see the whole causal
context); the queries from ``split`` on are the tokens that come after the eviction (a question, an answer, the
continuation of a text) and see only the kept keys. ``split=0`` is the plain keep mask (every query sees only kept
keys). This is how AnchorPress (anchors + scored rest, cf. SepLLM arXiv 2412.12094, AnLLM arXiv 2402.07616) is
simulated in training without building a ``[L, L]`` mask.

Paths, all with the same semantics (a query that may see no key gets a zero output, flex_attention's convention):

- :func:`keep_attention_reference`: plain PyTorch (float32 softmax over query chunks) for the CPU and for tests.
- :func:`keep_attention_flex`: ``torch.nn.attention.flex_attention`` (compiled to Triton on CUDA, unfused eager on
  the CPU). With ``compact=True`` (default) the prefill queries run causal SDPA over the prefix (flash kernels)
  and the post-eviction queries run flex_attention over the kept keys *gathered* into a compacted KV
  (``ceil(keep ratio * split) + (L - split)`` keys, a staircase causal block mask on their original positions),
  so the work shrinks with the keep ratio; ``compact=False`` runs one flex_attention over all keys with the mask
  as a ``mask_mod`` (the block mask only skips the causal upper triangle).
- :func:`keep_attention`: dispatch (flex on CUDA, the reference elsewhere; ``PRESSROOM_FORCE_REFERENCE=1``
  forces the reference).

The masks and gathered indices depend only on ``keep`` and ``split``, so :class:`KeepMask` builds them once per
forward pass and every layer reuses them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from pressroom.kernels.rope_ring import FORCE_REFERENCE_ENV

_PAD = 128  # compacted KV length is padded to a multiple of this on CUDA (fewer flex_attention recompilations)
_compiled_flex: Any = None


def _flex_attention():
    """flex_attention, compiled on first use (the compiled Triton kernel is what makes it fast on a GPU)."""
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # compacted KV lengths change with the keep ratio (curriculum): allow a few more specialisations
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _eager_flex(*args: Any, **kwargs: Any) -> torch.Tensor:
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(*args, **kwargs)


def _check_keep(keep: torch.Tensor, split: int) -> None:
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a [batch, seq_len] bool tensor, got {keep.dtype} {tuple(keep.shape)}.")
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= keep.shape[1]:
        raise ValueError(f"split must be an int in [0, {keep.shape[1]}], got {split!r}.")


class KeepMask:
    """A KV-keep mask for one batch: ``keep`` ``[batch, seq_len]`` bool and the prefill boundary ``split``.

    A plain object, not a tensor or a dataclass, so that ``DistributedDataParallel`` hands it to the model as it
    is; its derived index tensors and block masks are built once and shared by every layer.

    Parameters
    ----------
    keep : torch.Tensor
        ``[batch, seq_len]`` bool: which keys the post-eviction queries may see.
    split : int
        Queries ``< split`` see every earlier key (the prefill); queries ``>= split`` only kept ones.
    pad_to : int, optional
        Pad the compacted KV to a multiple of this (default 128 on CUDA, 16 elsewhere). The padding keys are masked
        for every query, so their blocks are skipped by flex_attention: ``pad_to=seq_len`` costs no compute and
        gives one compacted shape whatever the keep ratio (one compilation for a whole curriculum).
    """

    def __init__(self, keep: torch.Tensor, split: int = 0, pad_to: int | None = None) -> None:
        _check_keep(keep, split)
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
            raise ValueError(f"pad_to must be a positive integer or None, got {pad_to!r}.")
        self.keep = keep
        self.split = split
        self.pad_to = pad_to
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"KeepMask(batch={self.keep.shape[0]}, seq_len={self.seq_len}, split={self.split})"

    @property
    def seq_len(self) -> int:
        return int(self.keep.shape[1])

    def dense(self) -> torch.Tensor:
        """The ``[batch, 1, seq_len, seq_len]`` boolean mask (True = may attend); for references and tests."""
        return keep_mask_dense(self.keep, self.split)

    def compacted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, pos)`` ``[batch, n]``: kept key indices (padded with 0) and their positions (padded with
        ``seq_len``, which no query reaches)."""
        if "compact" not in self._cache:
            keep = self.keep
            batch, seq_len = keep.shape
            counts = keep.sum(1)
            pad = self.pad_to or (_PAD if keep.is_cuda else 16)
            n = max(1, int(counts.max()))
            n = int(math.ceil(n / pad) * pad)
            ar = torch.arange(seq_len, device=keep.device).expand(batch, seq_len)
            # sort kept positions first (stable), then cut to n
            order = torch.where(keep, ar, ar + seq_len).argsort(dim=1)
            if order.shape[1] < n:
                order = torch.cat([order, order.new_zeros(batch, n - order.shape[1])], dim=1)
            idx = order[:, :n]
            slot = torch.arange(n, device=keep.device).expand(batch, n)
            valid = slot < counts[:, None]
            pos = torch.where(valid, idx, torch.full_like(idx, seq_len))
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            self._cache["compact"] = (idx, pos)
        return self._cache["compact"]

    def block_mask(self, compact: bool) -> Any:
        """flex_attention's BlockMask (built once per mask and kind)."""
        key = ("block", compact)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            batch, seq_len = self.keep.shape
            split = self.split
            device = self.keep.device
            block = 128 if device.type == "cuda" else 16
            if compact:
                _, pos = self.compacted()

                def mask_mod(b, h, q_idx, kv_idx):
                    return pos[b, kv_idx] <= q_idx + split

                q_len, kv_len = seq_len - split, pos.shape[1]
            else:
                keep = self.keep

                def mask_mod(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) & (keep[b, kv_idx] | (q_idx < split))

                q_len = kv_len = seq_len
            self._cache[key] = create_block_mask(
                mask_mod, batch, None, q_len, kv_len, device=device, BLOCK_SIZE=block, _compile=device.type == "cuda"
            )
        return self._cache[key]


def keep_mask_dense(keep: torch.Tensor, split: int = 0) -> torch.Tensor:
    """``[batch, 1, L, L]`` bool: ``allowed[b, 0, i, j] = j <= i and (keep[b, j] or i < split)``."""
    _check_keep(keep, split)
    seq_len = keep.shape[1]
    ar = torch.arange(seq_len, device=keep.device)
    causal = ar[None, :] <= ar[:, None]
    prefill = (ar < split)[:, None]
    return (causal[None] & (keep[:, None, :] | prefill[None]))[:, None]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeepMask) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, seq_len, head_dim].")
    batch, heads, seq_len, _ = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} (self-attention).")
    if heads % k.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {k.shape[1]} KV heads.")
    if tuple(mask.keep.shape) != (batch, seq_len):
        raise ValueError(f"keep mask {tuple(mask.keep.shape)} does not match [batch, seq_len] = [{batch}, {seq_len}].")
    return heads // k.shape[1]


def keep_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: KeepMask,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Plain-PyTorch keep-mask attention (float32 scores and softmax, queries in chunks of ``chunk``).

    ``q`` ``[B, Hq, L, D]``, ``k``/``v`` ``[B, Hkv, L, D]`` (GQA: ``Hq`` a multiple of ``Hkv``); returns
    ``[B, Hq, L, Dv]`` in ``q``'s dtype. Rows with no visible key are zero.
    """
    groups = _check_qkv(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    seq_len = q.shape[2]
    ar = torch.arange(seq_len, device=q.device)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        qi = ar[start:stop]
        allowed = (ar[None, :] <= qi[:, None])[None] & (mask.keep[:, None, :] | (qi < mask.split)[None, :, None])
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, start:stop] = torch.matmul(probs, vf).to(q.dtype)
    return out


def keep_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: KeepMask,
    scale: float | None = None,
    compact: bool = True,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Keep-mask attention with ``flex_attention`` (see the module docstring for ``compact``).

    Parameters
    ----------
    q, k, v : torch.Tensor
        As in :func:`keep_attention_reference`.
    mask : KeepMask
        The keep mask (its block masks are built once and cached on it).
    scale : float, optional
        Softmax scale (default ``head_dim ** -0.5``).
    compact : bool
        Gather the kept keys for the post-eviction queries (default) or mask over all keys.
    compiled : bool, optional
        Use the compiled flex_attention (default: on CUDA); the eager one is an unfused reference.
    """
    groups = _check_qkv(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compiled = q.is_cuda if compiled is None else compiled
    flex = _flex_attention() if compiled else _eager_flex
    gqa = groups > 1
    if not compact:
        return flex(q, k, v, block_mask=mask.block_mask(False), scale=scale, enable_gqa=gqa)
    split, seq_len = mask.split, q.shape[2]
    parts = []
    if split > 0:
        parts.append(
            F.scaled_dot_product_attention(
                q[:, :, :split], k[:, :, :split], v[:, :, :split], is_causal=True, scale=scale, enable_gqa=gqa
            )
        )
    if split < seq_len:
        idx, _ = mask.compacted()
        gather = idx[:, None, :, None]
        k_c = k.gather(2, gather.expand(-1, k.shape[1], -1, k.shape[-1]))
        v_c = v.gather(2, gather.expand(-1, v.shape[1], -1, v.shape[-1]))
        q_tail = q[:, :, split:]
        if compiled and not q_tail.is_contiguous():
            q_tail = q_tail.contiguous()
        parts.append(flex(q_tail, k_c, v_c, block_mask=mask.block_mask(True), scale=scale, enable_gqa=gqa))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def keep_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: KeepMask,
    scale: float | None = None,
    use_flex: bool | None = None,
) -> torch.Tensor:
    """Keep-mask attention: compiled flex_attention on CUDA, :func:`keep_attention_reference` elsewhere.

    ``use_flex``: ``None`` auto (``PRESSROOM_FORCE_REFERENCE=1`` forces the reference), ``True`` / ``False``
    forced (``True`` on the CPU runs flex_attention's eager, unfused path).
    """
    if use_flex is None:
        use_flex = q.is_cuda and os.environ.get(FORCE_REFERENCE_ENV, "0") != "1"
    if use_flex:
        return keep_attention_flex(q, k, v, mask, scale=scale)
    return keep_attention_reference(q, k, v, mask, scale=scale)


__all__ = [
    "KeepMask",
    "keep_attention",
    "keep_attention_flex",
    "keep_attention_reference",
    "keep_mask_dense",
]
