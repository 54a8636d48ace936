"""AnchorPress: keep the anchor tokens (sinks, special tokens, separators, recent tokens) plus the best-scored rest."""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvpress import ScorerPress, SnapKVPress
from kvpress.utils import compute_n_kept
from torch import nn

from pressroom.kernels.kv_compact import kv_compact

logger = logging.getLogger(__name__)

DEFAULT_SEPARATOR_CHARS = ".,;:!?\n"
ADAPTER_ATTR = "_pressroom_eit_adapter"  # set on a model that holds an EIT adapter loaded by AnchorPress
ADAPTER_NAME = "eit"
CAPTURE_ATTR = "_pressroom_anchor_ids"  # persistent token-id capture installed when a kvpress wrapper applies us

# anchor tiers: when the anchors alone exceed the budget, higher tiers are kept first
TIER_OTHER, TIER_SEPARATOR, TIER_RECENT, TIER_SINK = 0, 1, 2, 3


def _token_strings(tokenizer: Any) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in tokens]


def separator_token_ids(tokenizer: Any, chars: str = DEFAULT_SEPARATOR_CHARS) -> list[int]:
    """Ids of the tokenizer's separator tokens: punctuation and line breaks.

    A token is a separator when its text, once whitespace is removed, is made only of ``chars`` (e.g. ``"."``,
    ``","``, ``".\\n"``, ``" ;"``, ``"..."``), or, when ``chars`` contains a newline, when it is whitespace holding
    a line break (``"\\n\\n"``). SepLLM (arXiv 2412.12094) keeps the same kind of tokens.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    chars : str
        The separator characters (default ``".,;:!?\\n"``).
    """
    if not chars:
        raise ValueError("separator chars must not be empty; use separators=() to disable separator anchors.")
    punct = set(chars) - {"\n"}
    newline = "\n" in chars
    ids = []
    for i, text in enumerate(_token_strings(tokenizer)):
        stripped = "".join(text.split())
        if stripped:
            if all(c in punct for c in stripped):
                ids.append(i)
        elif newline and "\n" in text:
            ids.append(i)
    return ids


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (``all_special_ids`` and added tokens marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return sorted(ids)


def anchor_tiers(
    input_ids: torch.Tensor,
    *,
    n_sink: int,
    n_recent: int,
    separator_lookup: torch.Tensor | None,
    special_lookup: torch.Tensor | None,
    end: int | None = None,
) -> torch.Tensor:
    """Anchor tier of every token: 3 sink or special, 2 recent, 1 separator, 0 not an anchor.

    Parameters
    ----------
    input_ids : torch.Tensor
        ``[batch, seq_len]`` token ids; negative ids (unknown tokens) are never separators or special.
    n_sink, n_recent : int
        The first ``n_sink`` tokens are sinks, the ``n_recent`` tokens before ``end`` are recent.
    separator_lookup, special_lookup : torch.Tensor, optional
        ``[vocab]`` bool tables (``None``: no such anchors); ids beyond the table are not anchors.
    end : int, optional
        Where the sequence being compressed ends (default ``seq_len``); tokens from ``end`` on are tier 0.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
    seq_len = input_ids.shape[1]
    end = seq_len if end is None else end
    pos = torch.arange(seq_len, device=input_ids.device)
    tier = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)

    def lookup(table: torch.Tensor | None) -> torch.Tensor:
        if table is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        table = table.to(input_ids.device)
        ok = (input_ids >= 0) & (input_ids < table.shape[0])
        return table[input_ids.clamp(0, table.shape[0] - 1)] & ok

    tier = torch.where(lookup(separator_lookup), TIER_SEPARATOR, tier)
    tier = torch.where(((pos >= end - n_recent) & (pos < end))[None], torch.clamp(tier, min=TIER_RECENT), tier)
    tier = torch.where(lookup(special_lookup) | (pos < n_sink)[None], TIER_SINK, tier)
    tier = torch.where((pos < end)[None], tier, TIER_OTHER)
    return tier


def _lookup(ids: list[int] | tuple[int, ...], size: int) -> torch.Tensor:
    size = max([size, *(i + 1 for i in ids)]) if ids else size
    table = torch.zeros(size, dtype=torch.bool)
    if ids:
        table[torch.tensor(list(ids), dtype=torch.long)] = True
    return table


def _resolve_scorer(scorer: Any) -> ScorerPress:
    if scorer is None:
        return SnapKVPress(window_size=64, kernel_size=5)
    if isinstance(scorer, ScorerPress):
        return scorer
    if isinstance(scorer, str):
        import kvpress

        aliases = {
            "snapkv": "SnapKVPress",
            "knorm": "KnormPress",
            "tova": "TOVAPress",
            "keydiff": "KeyDiffPress",
            "random": "RandomPress",
            "lagkv": "LagKVPress",
            "streaming_llm": "StreamingLLMPress",
            "expected_attention": "ExpectedAttentionPress",
        }
        cls = getattr(kvpress, aliases.get(scorer.lower(), scorer), None)
        if isinstance(cls, type) and issubclass(cls, ScorerPress):
            return cls()
    raise ValueError(
        f"scorer must be a kvpress ScorerPress instance or the name of one (snapkv, knorm, tova, ...), got {scorer!r}."
    )


class _IdsCapture:
    """Forward pre-hook on an input embedding that keeps the last 2-D integer input (the token ids)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self.ids = ids


def _model_capture(model: nn.Module) -> _IdsCapture:
    capture = getattr(model, CAPTURE_ATTR, None)
    if capture is None:
        capture = _IdsCapture()
        capture.handle = model.get_input_embeddings().register_forward_pre_hook(capture)
        setattr(model, CAPTURE_ATTR, capture)
    return capture


def detach_id_capture(model: nn.Module) -> bool:
    """Remove the persistent token-id capture hook that AnchorPress installs under kvpress wrappers, if any."""
    capture = getattr(model, CAPTURE_ATTR, None)
    if capture is None:
        return False
    capture.handle.remove()
    delattr(model, CAPTURE_ATTR)
    return True


@dataclass
class AnchorPress(ScorerPress):
    """Anchor eviction: keep anchor tokens plus the best-scored rest of the context.

    Anchors - the first ``n_sink`` tokens (attention sinks, StreamingLLM arXiv 2309.17453), special tokens, the
    tokenizer's separator/punctuation tokens, the last ``n_recent`` tokens - carry much of a sequence's
    information (SepLLM, arXiv 2412.12094: initial + separator + neighbouring tokens; AnLLM, arXiv 2402.07616:
    anchor tokens). They are always kept; the remaining budget (``compression_ratio``) is filled, per KV head, by
    a ``scorer`` (by default a SnapKV-like query-aware score, arXiv 2404.14469; any kvpress ``ScorerPress`` fits).
    If the anchors alone exceed the budget, the budget still holds: sinks and special tokens first, then recent
    tokens, then the best-scored separators. The kept keys and values are gathered into a contiguous compacted
    cache by :func:`pressroom.kernels.kv_compact.kv_compact` (Triton on CUDA).

    The press needs the token ids of the prefill: it captures them with a forward pre-hook on the model's input
    embedding while it is applied (``with press(model):``, kvpress's pipeline, ``model.generate``); nothing is
    passed by the caller. Separator and special ids come from the tokenizer: ``tokenizer=`` if given, else the one
    saved with ``adapter``, else the one at ``model.name_or_path``. :meth:`score` ranks every anchor above every
    other token, so kvpress wrappers that select from it (``KeyRerotationPress``, ``AdaKVPress``) keep the anchors.

    ``adapter`` names an EIT LoRA adapter (``pressroom-train eit train``, eviction-invariant training) for the model:
    it is loaded into the model with peft the first time the press is applied and **stays active** afterwards (in
    kvpress's pipeline the question and the answer are decoded after the press's context has closed, and they
    are the tokens the adapter was trained for): use a separate model instance for adapter-free baselines.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prefilled KV pairs to evict (as in kvpress: ``int(L * (1 - ratio))`` are kept).
    n_sink : int, default=4
        First tokens always kept.
    n_recent : int, default=64
        Last tokens of the prefill always kept.
    separators : str, sequence of int, or None
        ``None``: the tokenizer's tokens made of ``".,;:!?\\n"`` (see :func:`separator_token_ids`); a string: other
        separator characters; a sequence of ids: exactly these tokens (``()`` disables separator anchors).
    keep_special : bool, default=True
        Keep special tokens (chat-template markers, BOS/EOS...).
    scorer : ScorerPress or str, optional
        Scores the non-anchor tokens (default ``SnapKVPress(window_size=64, kernel_size=5)``; a name such as
        ``"knorm"`` works in press specs). Its own ``compression_ratio`` is ignored.
    adapter : str, optional
        Directory of an EIT LoRA adapter (``adapter_config.json`` + weights) to load into the model once.
    tokenizer : PreTrainedTokenizerBase, optional
        Where separator and special token ids come from (see above).
    use_triton : bool, optional
        KV compaction kernel: ``None`` Triton on CUDA, the PyTorch reference elsewhere; ``True``/``False`` forced.

    Raises
    ------
    ValueError
        ``compression_ratio`` outside ``[0, 1)``, negative ``n_sink`` / ``n_recent``, an unknown scorer, a missing
        adapter directory, no tokenizer to find separators, or a prefill whose token ids were not seen.
    """

    compression_ratio: float = 0.0
    n_sink: int = 4
    n_recent: int = 64
    separators: str | tuple[int, ...] | list[int] | None = None
    keep_special: bool = True
    scorer: Any = None
    adapter: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    use_triton: bool | None = None
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _capture: Any = field(default=None, init=False, repr=False, compare=False)
    _own_context: bool = field(default=False, init=False, repr=False, compare=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _last_tiers: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {ratio!r}.")
        for name in ("n_sink", "n_recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.separators is not None and not isinstance(self.separators, str):
            try:
                self.separators = tuple(int(i) for i in self.separators)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"separators must be None, a string of characters or a sequence of token ids, got "
                    f"{self.separators!r}."
                ) from err
        self.scorer = _resolve_scorer(self.scorer)
        if self.adapter is not None:
            path = Path(str(self.adapter)).expanduser()
            if not (path / "adapter_config.json").is_file():
                raise ValueError(
                    f"adapter={self.adapter!r} is not an adapter directory (no adapter_config.json); point it at the "
                    "final/ or checkpoint-N/ folder written by `pressroom-train eit train`."
                )
        self._tables = {}

    # ----------------------------------------------------------------------------------------------- model set-up
    def post_init_from_model(self, model: nn.Module) -> None:
        """Load the adapter (once), build the anchor tables, set up the scorer and the token-id capture."""
        self._load_adapter(model)
        self._prepare_tables(model)
        self.scorer.post_init_from_model(model)
        if not self._own_context:  # applied by a kvpress wrapper: a persistent hook on the model
            self._capture = _model_capture(model)

    def _find_tokenizer(self, model: nn.Module) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        from transformers import AutoTokenizer

        candidates = []
        if self.adapter is not None:
            candidates.append(str(Path(self.adapter).expanduser()))
        name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
        if name:
            candidates.append(str(name))
        for cand in candidates:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(cand)
                return self.tokenizer
            except (OSError, ValueError, TypeError):
                continue
        return None

    def _prepare_tables(self, model: nn.Module) -> None:
        vocab = int(model.get_input_embeddings().weight.shape[0])
        key = (vocab, id(self.tokenizer))
        if self._tables.get("key") == key:
            return
        tok = None
        if self.separators is None or isinstance(self.separators, str) or self.keep_special:
            tok = self._find_tokenizer(model)
        if self.separators is None or isinstance(self.separators, str):
            if tok is None:
                raise ValueError(
                    "AnchorPress needs the tokenizer to find separator tokens: pass tokenizer=..., or separators=(ids),"
                    " or apply it to a model whose name_or_path (or adapter directory) holds a tokenizer."
                )
            sep = separator_token_ids(tok, self.separators or DEFAULT_SEPARATOR_CHARS)
        else:
            sep = list(self.separators)
        special: list[int] = []
        if self.keep_special:
            if tok is not None:
                special = special_token_ids(tok)
            else:  # explicit separators and no tokenizer: the config's special ids
                cfg = model.config
                for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    val = getattr(cfg, name, None)
                    special.extend(val if isinstance(val, (list, tuple)) else [val] if val is not None else [])
        self._tables = {"key": key, "separator": _lookup(sep, vocab), "special": _lookup(special, vocab)}

    def _load_adapter(self, model: nn.Module) -> None:
        if self.adapter is None:
            return
        path = str(Path(self.adapter).expanduser().resolve())
        loaded = getattr(model, ADAPTER_ATTR, None)
        if loaded == path:
            return
        if loaded is not None:
            raise ValueError(f"The model already holds the EIT adapter {loaded}; load a fresh model to apply {path}.")
        from peft import PeftModel

        PeftModel.from_pretrained(model, path, adapter_name=ADAPTER_NAME, is_trainable=False)  # injects in place
        setattr(model, ADAPTER_ATTR, path)
        logger.info("Loaded EIT adapter %s into %s", path, type(model).__name__)

    @contextmanager
    def __call__(self, model: nn.Module):
        """Apply the press (kvpress hooks), load the adapter once, and capture the token ids of each forward.

        The ids are captured by a forward pre-hook on the input embedding registered here and removed on exit.
        When a kvpress wrapper applies this press (``KeyRerotationPress``, ``AdaKVPress``, ``ComposedPress``...),
        only :meth:`post_init_from_model` runs: it then installs one persistent capture hook on the model
        (shared by every AnchorPress, see :func:`detach_id_capture`).
        """
        capture = _IdsCapture()
        handle = model.get_input_embeddings().register_forward_pre_hook(capture)
        self._capture, self._own_context = capture, True
        try:
            with super().__call__(model):  # calls post_init_from_model
                yield
        finally:
            handle.remove()
            self._own_context = False
            self._capture = None

    # ------------------------------------------------------------------------------------------------ compression
    def anchor_tiers(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Anchor tier of each token of ``input_ids`` ``[batch, seq_len]`` (tables must be prepared)."""
        if not self._tables:
            raise ValueError("AnchorPress tables are not prepared: apply the press with `with press(model):` first.")
        return anchor_tiers(
            input_ids,
            n_sink=self.n_sink,
            n_recent=self.n_recent,
            separator_lookup=self._tables["separator"],
            special_lookup=self._tables["special"] if self.keep_special else None,
        )

    def scorer_scores(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        """The scorer's own scores ``[batch, kv_heads, seq_len]`` (a shorter SnapKV window for short prefills)."""
        scorer = self.scorer
        window = getattr(scorer, "window_size", None)
        q_len = hidden_states.shape[1]
        if isinstance(window, int) and q_len <= window:
            scorer = dataclasses.replace(scorer, window_size=max(1, q_len // 2))
        return scorer.score(module, hidden_states, keys, values, attentions, kwargs)

    def prefill_tiers(self, batch: int, k_len: int, q_len: int, device: torch.device) -> torch.Tensor:
        """Anchor tiers ``[batch, k_len]`` of the cached tokens, from the token ids captured for this prefill."""
        ids = self._capture.ids if self._capture is not None else None
        if ids is None or ids.shape[0] != batch or ids.shape[1] != q_len:
            raise ValueError(
                "AnchorPress did not see the token ids of this prefill: apply it with `with press(model):` around a "
                "forward that takes input_ids (not inputs_embeds), e.g. kvpress's pipeline or model.generate."
            )
        if k_len < q_len:
            raise ValueError(
                f"{k_len} keys for a prefill of {q_len} tokens: AnchorPress must see the whole prefill (do not compose "
                "it after a press that already pruned the cache)."
            )
        ids = ids.to(device)
        if k_len > q_len:  # tokens already in the cache before this prefill: ids unknown
            ids = torch.cat([ids.new_full((batch, k_len - q_len), -1), ids], dim=1)
        return self.anchor_tiers(ids)

    @staticmethod
    def rank(tiers: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``tier + 0.5 * (scores min-max normalised per head)``: anchors first by tier, then by score."""
        s = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)
        lo = s.amin(-1, keepdim=True)
        hi = s.amax(-1, keepdim=True)
        norm = (s - lo) / (hi - lo).clamp_min(1e-12)
        return tiers[:, None, :].float() + 0.5 * norm

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> torch.Tensor:
        """Scores ``[batch, kv_heads, seq_len]`` in which every anchor outranks every other token (see :meth:`rank`).

        Wrappers that select from ``score`` themselves (kvpress's ``KeyRerotationPress``, ``AdaKVPress``...) thus
        keep the anchors too.
        """
        batch, _, k_len, _ = keys.shape
        tiers = self.prefill_tiers(batch, k_len, hidden_states.shape[1], keys.device)
        self._last_tiers = tiers
        return self.rank(tiers, self.scorer_scores(module, hidden_states, keys, values, attentions, kwargs))

    def selection(self, tiers: torch.Tensor, scores: torch.Tensor, n_kept: int) -> torch.Tensor:
        """Indices ``[batch, kv_heads, n_kept]`` (sorted) of the kept tokens: anchors by tier, then best scores."""
        return self.rank(tiers, scores).topk(n_kept, dim=-1).indices.sort(dim=-1).values

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
        k_len = keys.shape[2]
        n_kept = compute_n_kept(k_len, self.compression_ratio)
        if n_kept >= k_len:
            return keys, values
        ranks = self.score(module, hidden_states, keys, values, attentions, kwargs)
        indices = ranks.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        n_anchor = int((self._last_tiers > TIER_OTHER).sum(1).max())
        self.last_stats = {
            "layer": int(getattr(module, "layer_idx", -1)),
            "seq_len": k_len,
            "n_kept": n_kept,
            "n_anchors": n_anchor,
            "anchors_truncated": n_anchor > n_kept,
        }
        return kv_compact(keys, values, indices, use_triton=self.use_triton)


__all__ = [
    "ADAPTER_ATTR",
    "DEFAULT_SEPARATOR_CHARS",
    "AnchorPress",
    "anchor_tiers",
    "detach_id_capture",
    "separator_token_ids",
    "special_token_ids",
]
