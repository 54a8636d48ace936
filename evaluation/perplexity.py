"""Streaming perplexity over a long text, with a press or a cache, as StreamingLLM measures it.

StreamingLLM (https://arxiv.org/abs/2309.17453) evaluates language modelling on long streams by feeding the text
one token at a time into a cache that is never reset, and scoring each next token from the logits of the current
one. Whatever the press or cache evicts along the way is gone for every later prediction, so the perplexity shows
how much a compression method hurts on an unbounded stream, while ``kv_bytes`` shows what it saves.

Two modes:

- ``"streaming"``: one token per forward pass (the paper's protocol; the only mode in which a decoding press,
  e.g. ``DecodingPress(StreamingLLMPress(), ...)``, acts on every step).
- ``"chunked"``: ``chunk_size`` tokens per forward pass into the same cache. With the full cache it computes the
  same numbers as ``"streaming"`` (up to float reassociation), much faster: use it for long full-cache baselines.

Example
-------
>>> from kvpress import DecodingPress, StreamingLLMPress
>>> from pressroom.evaluation.corpora import corpus_tokens
>>> from pressroom.evaluation.models import load_model
>>> model, tokenizer = load_model("smollm2")
>>> ids = corpus_tokens(tokenizer, "pg_essays", "heldout", max_tokens=4096)
>>> press = DecodingPress(StreamingLLMPress(n_sink=4), compression_interval=64, target_size=1024)
>>> result = streaming_perplexity(model, ids, press=press)
>>> result.perplexity, result.kv_bytes_max  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from pressroom.evaluation.atomic import atomic_write_text
from pressroom.presses.memory import cache_memory_bytes

if TYPE_CHECKING:
    from kvpress import BasePress

logger = logging.getLogger(__name__)

MODES = ("streaming", "chunked")
RESULT_KIND = "perplexity"
KV_SAMPLES = 200  # how many times kv bytes are sampled over a streaming run


@dataclass
class PerplexityResult:
    """Outcome of a perplexity run.

    Attributes
    ----------
    perplexity : float
        ``exp`` of the mean negative log-likelihood over all predicted tokens.
    nll : list of float
        Negative log-likelihood (nats) of each predicted token, in stream order (token ``t + 1`` given ``<= t``).
    tokens : int
        Number of tokens predicted (the input length minus one).
    runtime_seconds : float
        Wall time of the forward passes (CUDA synchronised).
    tokens_per_second : float
        ``tokens / runtime_seconds``.
    kv_bytes : int
        Bytes held by the cache at the end of the run.
    kv_bytes_max : int
        Largest number of bytes the cache held at any sampled step.
    mode : str
        ``"streaming"`` or ``"chunked"``.
    """

    perplexity: float
    nll: list[float] = field(repr=False)
    tokens: int
    runtime_seconds: float
    tokens_per_second: float
    kv_bytes: int
    kv_bytes_max: int
    mode: str

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain, JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerplexityResult:
        """Rebuild a result from ``to_dict()`` output (extra keys, such as run metadata, are ignored).

        Raises
        ------
        ValueError
            If a field is missing.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"Not a perplexity result: missing {', '.join(missing)}.")
        return cls(**{n: data[n] for n in names})

    def running_perplexity(self, window: int | None = None) -> list[float]:
        """Perplexity as the stream goes on.

        Parameters
        ----------
        window : int, optional
            ``None``: ``exp`` of the cumulative mean NLL up to each token. An integer: ``exp`` of the mean NLL over
            the last ``window`` tokens (fewer at the start).

        Returns
        -------
        list of float
            One value per predicted token.
        """
        nll = np.asarray(self.nll, dtype=np.float64)
        if nll.size == 0:
            return []
        csum = np.cumsum(nll)
        if window is None:
            means = csum / np.arange(1, nll.size + 1)
        else:
            if not isinstance(window, (int, np.integer)) or window < 1:
                raise ValueError(f"window must be a positive integer or None, got {window!r}.")
            lagged = np.zeros_like(csum)
            lagged[window:] = csum[:-window]
            counts = np.minimum(np.arange(1, nll.size + 1), window)
            means = (csum - lagged) / counts
        with np.errstate(over="ignore"):
            return np.exp(means).tolist()


def _mean_to_perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _as_token_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}.") from err
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(
            f"input_ids must be 1-D [T] or [1, T] (one stream, batch size 1), got shape {tuple(input_ids.shape)}."
        )
    return input_ids.long()


def _default_cache(model: PreTrainedModel) -> Cache:
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def _positions(cache: Cache, start: int, n_new: int, device: torch.device) -> torch.Tensor:
    """Positions ``[1, n_new]`` for the next tokens: the cache's own if it assigns them, else absolute indices."""
    assign = getattr(cache, "position_ids_for", None)
    if callable(assign):
        pos = torch.as_tensor(assign(n_new), dtype=torch.long, device=device).reshape(-1)
        if pos.numel() != n_new:
            raise RuntimeError(
                f"{type(cache).__name__}.position_ids_for({n_new}) returned {pos.numel()} positions, not {n_new}."
            )
        return pos[None]
    return torch.arange(start, start + n_new, dtype=torch.long, device=device)[None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: PreTrainedModel) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def streaming_perplexity(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    press: BasePress | None = None,
    cache: Cache | None = None,
    mode: str = "streaming",
    chunk_size: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on one long token stream, with an optional press and cache.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM (in eval mode).
    input_ids : torch.LongTensor
        The stream, 1-D ``[T]`` or ``[1, T]``.
    press : kvpress.BasePress, optional
        Applied with ``with press(model):`` around the whole run. In streaming mode the first forward pass
        (``t = 0``) is what kvpress calls the prefill; every later one is a decoding step, so decoding presses
        (``DecodingPress``) act on the stream.
    cache : transformers.Cache, optional
        The cache to fill; never reset during the run. Defaults to a fresh ``DynamicCache``. If it has a method
        ``position_ids_for(n_new) -> LongTensor`` (a cache that assigns positions itself, as StreamingLLM's
        rolling cache does), its positions are passed as both ``position_ids`` and ``cache_position``;
        otherwise the absolute token indices are.
    mode : {"streaming", "chunked"}
        ``"streaming"``: one token per forward pass. ``"chunked"``: ``chunk_size`` tokens per forward pass.
    chunk_size : int
        Tokens per forward pass in chunked mode.
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens of the stream.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    PerplexityResult
        ``tokens`` is ``T - 1``: the NLL of token ``t + 1`` comes from the logits at ``t``.

    Raises
    ------
    ValueError
        Unknown mode, ``chunk_size < 1``, ``max_tokens < 2``, fewer than 2 tokens, or input not ``[T]`` / ``[1, T]``.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    ids = _as_token_ids(input_ids)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one context token and one to predict), got {max_tokens}.")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(
            f"Perplexity needs at least 2 tokens (one context token and one to predict), got {ids.numel()}."
        )

    device = _model_device(model)
    ids = ids.to(device)
    cache = _default_cache(model) if cache is None else cache
    n_pred = ids.numel() - 1
    nll = torch.empty(n_pred, dtype=torch.float32, device=device)
    kv_max = 0
    step = chunk_size if mode == "chunked" else 1
    sample_every = 1 if mode == "chunked" else max(1, n_pred // KV_SAMPLES)

    bar = tqdm(total=n_pred, disable=not progress, unit="tok", desc=f"perplexity ({mode})", leave=False)
    _sync(device)
    started = time.perf_counter()
    try:
        with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
            for i, start in enumerate(range(0, n_pred, step)):
                end = min(start + step, n_pred)
                positions = _positions(cache, start, end - start, device)
                logits = model(
                    input_ids=ids[None, start:end],
                    past_key_values=cache,
                    position_ids=positions,
                    cache_position=positions[0],
                    use_cache=True,
                ).logits
                nll[start:end] = F.cross_entropy(logits[0].float(), ids[start + 1 : end + 1], reduction="none")
                if i % sample_every == 0:
                    kv_max = max(kv_max, cache_memory_bytes(cache))
                bar.update(end - start)
        _sync(device)
    finally:
        bar.close()
    runtime = time.perf_counter() - started
    kv_bytes = cache_memory_bytes(cache)
    nll_list = nll.cpu().tolist()
    return PerplexityResult(
        perplexity=_mean_to_perplexity(float(np.mean(nll_list))),
        nll=nll_list,
        tokens=n_pred,
        runtime_seconds=runtime,
        tokens_per_second=n_pred / runtime if runtime > 0 else math.inf,
        kv_bytes=kv_bytes,
        kv_bytes_max=max(kv_max, kv_bytes),
        mode=mode,
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_perplexity_json(result: PerplexityResult, path: str | Path, **metadata: Any) -> Path:
    """Write a result and its metadata as JSON, atomically.

    Parameters
    ----------
    result : PerplexityResult
        The run's result.
    path : str or Path
        The JSON file to write (parent directories are created).
    **metadata
        Run description, e.g. ``model``, ``press_name``, ``compression_ratio``, ``corpus``, ``split``, ``device``.
        The torch / transformers / kvpress versions and the time are added, and ``"kind": "perplexity"`` marks
        the file for :mod:`pressroom.evaluation.compare`.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If a metadata key would overwrite a result field.
    """
    payload: dict[str, Any] = {"kind": RESULT_KIND}
    payload.update(
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        kvpress_version=_version("kvpress"),
        pressroom_version=_version("pressroom"),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    clash = sorted(set(metadata) & ({f.name for f in fields(PerplexityResult)} | {"kind"}))
    if clash:
        raise ValueError(f"Metadata keys {clash} would overwrite result fields; rename them.")
    payload.update(metadata)
    payload.update(result.to_dict())
    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def read_perplexity_json(path: str | Path) -> dict[str, Any] | None:
    """The content of a complete perplexity JSON file, or ``None`` if it is missing, partial or not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        PerplexityResult.from_dict(data)
    except (TypeError, ValueError):
        return None
    return data


def run_perplexity(
    model_name: str = "smollm2",
    press: BasePress | None = None,
    corpus: str = "pg_essays",
    split: str = "heldout",
    max_tokens: int | None = 2048,
    mode: str = "streaming",
    chunk_size: int = 512,
    output: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    press_name: str = "no_press",
    compression_ratio: float = 0.0,
    cache: Cache | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Load a model and a corpus, measure perplexity, and write the JSON (resumable).

    Parameters
    ----------
    model_name : str
        Anything :func:`pressroom.evaluation.models.load_model` accepts (default: the embedded SmolLM2).
    press : kvpress.BasePress, optional
        The press to apply (see :func:`streaming_perplexity`).
    corpus, split : str
        Passed to :func:`pressroom.evaluation.corpora.corpus_tokens`.
    max_tokens : int, optional
        Length of the stream (``None``: the whole corpus split).
    mode, chunk_size :
        See :func:`streaming_perplexity`.
    output : str or Path, optional
        JSON file to write. If it already holds a complete result, the run is skipped and that result returned.
    device, dtype : optional
        Passed to ``load_model``.
    press_name : str
        Name recorded in the JSON; when a press is given and this is left at ``"no_press"``, the press's class
        name is recorded instead.
    compression_ratio : float
        Recorded in the JSON.
    cache : transformers.Cache, optional
        Cache to fill (default: a fresh ``DynamicCache``).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    PerplexityResult
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if output is not None:
        stored = read_perplexity_json(output)
        if stored is not None:
            logger.info("%s already holds a complete perplexity result; skipping the run.", output)
            return PerplexityResult.from_dict(stored)
        if Path(output).exists():
            logger.warning("%s is incomplete or unreadable; running again and overwriting it.", output)

    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import load_model, model_label

    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    ids = corpus_tokens(tokenizer, corpus, split, max_tokens=max_tokens)
    result = streaming_perplexity(
        model, ids, press=press, cache=cache, mode=mode, chunk_size=chunk_size, progress=progress
    )
    if press is not None and press_name == "no_press":
        press_name = type(press).__name__
    logger.info(
        "%s / %s (%.2f) on %s:%s: perplexity %.3f over %d tokens in %.1f s (%s)",
        model_name,
        press_name,
        compression_ratio,
        corpus,
        split,
        result.perplexity,
        result.tokens,
        result.runtime_seconds,
        mode,
    )
    if output is not None:
        write_perplexity_json(
            result,
            output,
            model=model_label(model_name),
            press_name=press_name,
            compression_ratio=float(compression_ratio),
            press_init_command=None if press is None else str(press),
            cache_class=type(cache).__name__ if cache is not None else "DynamicCache",
            corpus=corpus,
            split=split,
            max_tokens=max_tokens,
            chunk_size=chunk_size,
            device=str(_model_device(model)),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        )
    return result


__all__ = [
    "MODES",
    "PerplexityResult",
    "read_perplexity_json",
    "run_perplexity",
    "streaming_perplexity",
    "write_perplexity_json",
]
