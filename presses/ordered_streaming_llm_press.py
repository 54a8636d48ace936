"""OrderedStreamingLLMPress: kvpress's StreamingLLMPress with the kept tokens left in stream order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import StreamingLLMPress
from kvpress.utils import compute_n_kept
from torch import nn


@dataclass
class OrderedStreamingLLMPress(StreamingLLMPress):
    """kvpress's ``StreamingLLMPress`` (StreamingLLM, Xiao et al., arXiv 2309.17453: keep ``n_sink`` attention sinks
    and the most recent tokens) that keeps the surviving tokens **in stream order**.

    kvpress's ``ScorerPress.compress`` gathers the kept tokens in ``scores.topk(...)`` order. StreamingLLM's scores
    are all 1 on the kept tokens, and ``topk`` returns tied entries in no defined order (on CPU with kvpress 0.5.5 it
    returns ``[15, 10, 11, 12, ...]`` for 27 ones among 28). One compression does not care: attention ignores order.
    But ``DecodingPress(StreamingLLMPress(...))`` compresses again at every interval and prunes by *index* (the slots
    after the first ``n_sink``), so from the second compression on it evicts arbitrary tokens, and sinks included,
    not the oldest ones. This press sorts the kept indices, so the cache stays ``[sinks, oldest .. newest]`` and
    ``DecodingPress(OrderedStreamingLLMPress(n_sink), compression_interval=1, target_size=n)`` keeps exactly the sinks
    and the most recent tokens at their original positions (tested against a token-by-token reference).
    For StreamingLLM with positions inside the cache, use :class:`~pressroom.presses.SinkWindowPress`.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the tokens to remove.
    n_sink : int, default=4
        Leading tokens never pruned.
    """

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        indices = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()
