"""Eviction-invariant training (EIT): a LoRA fine-tune that makes a model tolerate anchor eviction.

``pressroom-train eit analyze`` measures which token types receive attention (sinks, special tokens, separators,
recent tokens, the rest) per layer and head, the evidence behind AnchorPress's default anchors (SepLLM, arXiv
2412.12094; attention sinks, arXiv 2309.17453). ``pressroom-train eit train`` fine-tunes LoRA adapters (peft, on
q/k/v/o) so that the model works when everything but the anchors and a sample of the rest is evicted from its KV
cache after the prefill, as :class:`pressroom.presses.AnchorPress` does (anchor-based masks in training: AnLLM,
arXiv 2402.07616).

Each step runs two forward passes on the same batch of ``seq_len`` tokens from the corpus's *train* split:

- the teacher: the base model (adapter disabled), full causal attention, no gradient;
- the student: the model with the adapter, under a KV-keep mask (:class:`pressroom.kernels.keep_attention.KeepMask`):
  the first ``split = seq_len - continuation`` tokens are the prefill (they see the full causal context, as in
  kvpress, which compresses after the prefill); the ``continuation`` tokens after it see only the kept prefill keys
  (anchors always, the rest sampled uniformly to the keep ratio) and each other.

``loss = CE(student) + lambda_kl * KL(student || teacher)`` over the continuation tokens. The keep ratio follows a
schedule: ``curriculum`` (linear from ``keep_start`` to ``keep_end``), ``adaptive`` (moves one ``keep_step`` down
whenever the validation perplexity under eviction holds within ``adaptive_tolerance`` of the best seen), or
``fixed``. The student's attention is plugged into transformers through its attention-function registry
(``AttentionInterface``, name ``"pressroom_eit"``): flex_attention on CUDA, a PyTorch reference on the CPU.

Checkpoints ``checkpoint-N/`` and ``final/`` hold the adapter (``adapter_config.json`` + weights), the tokenizer,
``eit_config.json`` and ``trainer_state.pt`` (optimizer, LR and keep schedules, RNG, loss curve); ``--resume``
continues from the latest one. ``best/`` holds the adapter with the lowest validation perplexity at the fixed keep
ratio ``select_keep_ratio`` (measured at every evaluation, on sequences of the *train* split kept aside): on a small
corpus LoRA overfits once it sees it many times, and ``final/`` can be worse than an earlier step. Runs under
``accelerate launch`` / ``torchrun`` on 1 or N GPUs as it does alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.keep_attention import KeepMask, keep_attention
from pressroom.presses.anchor_press import (
    DEFAULT_SEPARATOR_CHARS,
    anchor_tiers,
    separator_token_ids,
    special_token_ids,
)

logger = logging.getLogger(__name__)

EIT_ATTENTION = "pressroom_eit"
SCHEDULES = ("curriculum", "adaptive", "fixed")
TOKEN_TYPES = ("sink", "special", "recent", "separator", "other")
CHECKPOINT_PREFIX = "checkpoint-"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on SIGUSR1 after a checkpoint; run again with --resume
STATE_FILE = "trainer_state.pt"
BEST_DIR = "best"
CONFIG_FILE = "eit_config.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------------ attention registration
def eit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    eit_keep: KeepMask | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: keep-mask attention when ``eit_keep`` is passed, SDPA otherwise.

    Registered under ``"pressroom_eit"``; the student's forward passes ``eit_keep=KeepMask(...)`` as a model
    keyword (transformers hands it down to every attention layer). Without it (the teacher, generation) this is
    transformers' SDPA attention.
    """
    if eit_keep is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("EIT keep-mask attention does not support padding; train on full-length sequences.")
    if query.shape[2] != key.shape[2]:
        raise ValueError("EIT keep-mask attention runs on whole sequences (no KV cache): pass use_cache=False.")
    out = keep_attention(query, key, value, eit_keep, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_eit_attention() -> str:
    """Register :func:`eit_attention_forward` in transformers' ``AttentionInterface``; return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(EIT_ATTENTION, eit_attention_forward)
    return EIT_ATTENTION


def use_eit_attention(model: nn.Module) -> None:
    """Switch ``model`` (every config in it) to the ``"pressroom_eit"`` attention function."""
    register_eit_attention()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = EIT_ATTENTION


# --------------------------------------------------------------------------------------------------- anchors/masks
@dataclass
class AnchorSpec:
    """Which tokens are anchors in training (the same rule as :class:`pressroom.presses.AnchorPress`)."""

    n_sink: int = 4
    n_recent: int = 64
    separator_chars: str = DEFAULT_SEPARATOR_CHARS
    keep_special: bool = True

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.n_recent < 0:
            raise ValueError(f"n_sink and n_recent must be >= 0, got {self.n_sink}, {self.n_recent}.")

    def tables(self, tokenizer: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        def table(ids: list[int]) -> torch.Tensor:
            t = torch.zeros(max([vocab, *(i + 1 for i in ids)]), dtype=torch.bool)
            if ids:
                t[torch.tensor(ids)] = True
            return t

        sep = table(separator_token_ids(tokenizer, self.separator_chars) if self.separator_chars else [])
        special = table(special_token_ids(tokenizer)) if self.keep_special else None
        return sep, special


def sample_keep_mask(
    input_ids: torch.Tensor,
    keep_ratio: float,
    split: int,
    spec: AnchorSpec,
    separator_lookup: torch.Tensor | None,
    special_lookup: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[batch, seq_len]`` bool keep mask: prefill anchors, the rest of the prefill sampled, everything after.

    Of the ``split`` prefill tokens, ``round(keep_ratio * split)`` (at least 1) are kept in each row: every anchor
    (sinks and special tokens, then the ``n_recent`` tokens before ``split``, then separators; if the anchors alone
    exceed the budget, lower tiers are sampled among themselves) and then other tokens drawn uniformly at random.
    Tokens from ``split`` on are always kept.

    Raises
    ------
    ValueError
        ``keep_ratio`` outside ``(0, 1]`` or ``split`` outside ``[1, seq_len]``.
    """
    if isinstance(keep_ratio, bool) or not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio!r}.")
    batch, seq_len = input_ids.shape
    if not 1 <= split <= seq_len:
        raise ValueError(f"split must be in [1, {seq_len}], got {split}.")
    n_keep = max(1, min(split, round(keep_ratio * split)))
    tiers = anchor_tiers(
        input_ids[:, :split],
        n_sink=spec.n_sink,
        n_recent=spec.n_recent,
        separator_lookup=separator_lookup,
        special_lookup=special_lookup,
    )
    noise = torch.rand(batch, split, generator=generator, device="cpu").to(input_ids.device)
    rank = tiers.float() + noise  # anchors by tier, random order inside a tier
    idx = rank.topk(n_keep, dim=1).indices
    keep = torch.zeros(batch, seq_len, dtype=torch.bool, device=input_ids.device)
    keep.scatter_(1, idx, True)
    keep[:, split:] = True
    return keep


# --------------------------------------------------------------------------------------------------- schedules
@dataclass
class KeepSchedule:
    """The keep ratio over training.

    Parameters
    ----------
    mode : str
        ``curriculum`` (linear ``start`` -> ``end`` over ``steps``), ``adaptive`` (one ``step`` down each time
        :meth:`observe` sees a validation perplexity within ``tolerance`` of the best so far; never below ``end``),
        or ``fixed`` (always ``end``).
    start, end : float
        Keep ratios in ``(0, 1]`` with ``end <= start``.
    steps : int
        Training steps (curriculum length).
    step : float
        Adaptive decrement.
    tolerance : float
        Adaptive: relative perplexity increase still counted as "holding".
    """

    mode: str = "curriculum"
    start: float = 0.9
    end: float = 0.3
    steps: int = 1000
    step: float = 0.1
    tolerance: float = 0.02
    current: float | None = None
    best_ppl: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise ValueError(f"Unknown keep schedule {self.mode!r}; choose one of {', '.join(SCHEDULES)}.")
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise ValueError(f"keep ratio {name} must be in (0, 1], got {v!r}.")
        if self.end > self.start:
            raise ValueError(f"keep ratio end ({self.end}) must not exceed start ({self.start}).")
        if self.steps < 1:
            raise ValueError(f"schedule steps must be >= 1, got {self.steps}.")
        if not 0.0 < self.step <= 1.0 or self.tolerance < 0:
            raise ValueError(f"adaptive step must be in (0, 1] and tolerance >= 0, got {self.step}, {self.tolerance}.")
        if self.current is None:
            self.current = self.end if self.mode == "fixed" else self.start

    def ratio(self, step: int) -> float:
        """Keep ratio at training step ``step`` (0-based)."""
        if self.mode == "curriculum":
            frac = min(1.0, step / max(1, self.steps - 1))
            return self.start + (self.end - self.start) * frac
        return float(self.current)

    def observe(self, val_ppl: float) -> bool:
        """Adaptive mode: record a validation perplexity; return whether the ratio moved on."""
        if self.mode != "adaptive":
            return False
        if self.best_ppl is None or val_ppl < self.best_ppl:
            self.best_ppl = val_ppl
        if val_ppl <= self.best_ppl * (1.0 + self.tolerance) and self.current > self.end:
            self.current = max(self.end, round(self.current - self.step, 6))
            self.best_ppl = None  # a new ratio: its own best
            return True
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ------------------------------------------------------------------------------------------------------ losses
def eit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    split: int,
    lambda_kl: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(student) + lambda_kl * KL(student || teacher)`` over the tokens predicted from positions ``>= split``.

    ``student_logits``/``teacher_logits``: ``[B, L, V]``, or ``[B, L - split, V]`` (the positions from ``split`` on,
    as ``logits_to_keep=L - split`` returns them); ``labels``: ``[B, L]`` input ids (shifted here).
    """

    def tail(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == labels.shape[1]:
            return logits[:, split:-1]
        if logits.shape[1] == labels.shape[1] - split:
            return logits[:, :-1]
        raise ValueError(
            f"logits cover {logits.shape[1]} positions; expected {labels.shape[1]} or {labels.shape[1] - split}."
        )

    s = tail(student_logits).float()
    target = labels[:, split + 1 :]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1))
    kl = torch.zeros((), device=s.device)
    if lambda_kl > 0 and teacher_logits is not None:
        logp_s = F.log_softmax(s, dim=-1)
        logp_t = F.log_softmax(tail(teacher_logits).float(), dim=-1)
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()
    loss = ce + lambda_kl * kl
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "kl": float(kl.detach())}


# --------------------------------------------------------------------------------------------------------- data
def token_chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` chunks of a 1-D token tensor (the tail is dropped)."""
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are fewer than one sequence of {seq_len}; lower --seq-len.")
    return ids[: n * seq_len].view(n, seq_len)


def train_val_chunks(
    tokenizer: Any, corpus: str, seq_len: int, val_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of the corpus's *train* split; the last ``val_sequences`` chunks are kept aside for validation."""
    from pressroom.evaluation.corpora import corpus_tokens

    chunks = token_chunks(corpus_tokens(tokenizer, corpus, "train"), seq_len)
    if chunks.shape[0] <= val_sequences:
        raise ValueError(f"The train split gives {chunks.shape[0]} sequences of {seq_len}; lower --seq-len.")
    return chunks[: chunks.shape[0] - val_sequences], chunks[chunks.shape[0] - val_sequences :]


# ----------------------------------------------------------------------------------- evaluation under eviction
@torch.no_grad()
def evicted_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    press: Any,
    context_len: int,
    continuation_len: int,
    max_windows: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of continuations after a compressed prefill (kvpress's protocol, on a language-modelling text).

    ``ids`` (1-D) is cut into windows of ``context_len + continuation_len`` tokens; for each, the context is
    prefilled under ``press`` (``None``: full cache) into a fresh ``DynamicCache``, then the continuation is scored
    in one forward pass over the compressed cache (positions continue after the context, as kvpress's pipeline
    places its question). The first continuation token is predicted from the prefill's last hidden state.

    Returns ``{"perplexity", "nll", "tokens", "windows", "kv_tokens"}`` (``kv_tokens``: mean tokens held per layer
    after the prefill).
    """
    import contextlib

    from transformers import DynamicCache

    window = context_len + continuation_len
    chunks = token_chunks(ids, window)
    if max_windows is not None:
        chunks = chunks[:max_windows]
    device = next(model.parameters()).device
    total_nll, total_tokens, kv = 0.0, 0, []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for chunk in tqdm(chunks, desc="evicted ppl", disable=not progress, leave=False):
        chunk = chunk.to(device)[None]
        ctx, cont = chunk[:, :context_len], chunk[:, context_len:]
        cache = DynamicCache()
        with press(base) if press is not None else contextlib.nullcontext():
            hidden = base.model(input_ids=ctx, past_key_values=cache).last_hidden_state[:, -1:]
        kv.append(cache.get_seq_length())
        first = base.lm_head(hidden).float()
        pos = torch.arange(context_len, window, device=device)[None]
        out = base(input_ids=cont, past_key_values=cache, position_ids=pos)
        logits = torch.cat([first, out.logits[:, :-1].float()], dim=1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cont.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += cont.numel()
    mean = total_nll / max(1, total_tokens)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": int(chunks.shape[0]),
        "kv_tokens": sum(kv) / max(1, len(kv)),
    }


# ----------------------------------------------------------------------------------------------------- training
@dataclass
class EITConfig:
    """Everything a run depends on (saved as ``eit_config.json`` in each checkpoint)."""

    model: str = "smollm2"
    corpus: str = "pg_essays"
    output: str = "eit-out"
    seq_len: int = 2048
    continuation: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    lambda_kl: float = 1.0
    lora_r: int = 64
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    keep_schedule: str = "curriculum"
    keep_start: float = 0.9
    keep_end: float = 0.3
    keep_step: float = 0.1
    adaptive_tolerance: float = 0.02
    n_sink: int = 4
    n_recent: int = 64
    separator_chars: str = DEFAULT_SEPARATOR_CHARS
    keep_special: bool = True
    save_every: int = 200
    eval_every: int = 50
    val_sequences: int = 2
    select_keep_ratio: float | None = 0.25
    train_sequences: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}.")
        if not 1 <= self.continuation < self.seq_len - 1:
            raise ValueError(f"continuation must be in [1, seq_len - 1), got {self.continuation}.")
        for name in ("batch_size", "grad_accum", "max_steps", "save_every", "eval_every", "lora_r", "val_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.train_sequences is not None and self.train_sequences < self.batch_size:
            raise ValueError(f"train_sequences must be >= batch_size, got {self.train_sequences}.")
        if self.lambda_kl < 0:
            raise ValueError(f"lambda_kl must be >= 0, got {self.lambda_kl}.")
        if self.select_keep_ratio is not None and not 0.0 < self.select_keep_ratio <= 1.0:
            raise ValueError(f"select_keep_ratio must be in (0, 1] or None, got {self.select_keep_ratio}.")
        # validates the schedule and ratios early, with a clear message
        self.schedule()
        AnchorSpec(self.n_sink, self.n_recent, self.separator_chars, self.keep_special)

    @property
    def split(self) -> int:
        return self.seq_len - self.continuation

    def schedule(self) -> KeepSchedule:
        return KeepSchedule(
            self.keep_schedule,
            self.keep_start,
            self.keep_end,
            self.max_steps,
            self.keep_step,
            self.adaptive_tolerance,
        )


def _lr_lambda(cfg: EITConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (SIGUSR1) after saving ``checkpoint``; resume with ``--resume``."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted by SIGUSR1; saved {checkpoint}: run again with --resume to continue")
        self.checkpoint = checkpoint


class _StopRequest:
    """Turns SIGUSR1 into a flag read at the end of each step (installed only in the main thread)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            self._previous = signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        logger.warning("SIGUSR1: saving a checkpoint at the end of this step, then stopping")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None


def latest_checkpoint(output: str | Path) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N under ``output`` (None if there is none)."""
    best, best_step = None, -1
    for path in Path(output).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / STATE_FILE).is_file() and int(suffix) > best_step:
            best, best_step = path, int(suffix)
    return best


def _save(target: Path, peft_model: nn.Module, tokenizer: Any, cfg: EITConfig, state: dict, accelerator: Any) -> None:
    """Write a checkpoint folder atomically (built under a temporary name, then renamed)."""
    if not accelerator.is_main_process:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / CONFIG_FILE, {**asdict(cfg), "step": state["step"], "keep_ratio": state["keep_ratio"]})
        torch.save(state, tmp / STATE_FILE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def validation_perplexity(
    model: nn.Module, chunks: torch.Tensor, keep_ratio: float, cfg: EITConfig, tables: tuple, device: torch.device
) -> float:
    """Perplexity of the continuations of the validation chunks under a keep mask (fixed seed)."""
    spec = AnchorSpec(cfg.n_sink, cfg.n_recent, cfg.separator_chars, cfg.keep_special)
    gen = torch.Generator().manual_seed(1234)
    nll, n = 0.0, 0
    was_training = model.training
    model.eval()
    for row in chunks:
        ids = row[None].to(device)
        keep = sample_keep_mask(ids, keep_ratio, cfg.split, spec, tables[0], tables[1], generator=gen)
        mask = KeepMask(keep, cfg.split, pad_to=cfg.seq_len)
        logits = model(input_ids=ids, eit_keep=mask, use_cache=False, logits_to_keep=cfg.continuation).logits
        _, parts = eit_loss(logits, None, ids, cfg.split, 0.0)
        nll += parts["ce"]
        n += 1
    model.train(was_training)
    return math.exp(nll / max(1, n))


def train(cfg: EITConfig, resume: str | bool | None = None, progress: bool = True) -> Path:
    """Run EIT; return the ``final/`` directory. ``resume``: True (latest checkpoint) or a checkpoint path."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from pressroom.evaluation.models import load_model

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    device = accelerator.device if cfg.device is None else torch.device(cfg.device)
    out = Path(cfg.output)
    resume_from: Path | None = None
    if resume:
        resume_from = latest_checkpoint(out) if resume is True else Path(resume)
        if resume_from is None or not (resume_from / STATE_FILE).is_file():
            raise FileNotFoundError(f"No checkpoint to resume from under {out if resume is True else resume}.")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_model(cfg.model, device=str(device), dtype=cfg.dtype)
    use_eit_attention(model)
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if resume_from is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(resume_from / "adapter_model.safetensors")))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    keep_sched = cfg.schedule()
    train_chunks, val_chunks = train_val_chunks(tokenizer, cfg.corpus, cfg.seq_len, cfg.val_sequences)
    if cfg.train_sequences is not None:
        train_chunks = train_chunks[: cfg.train_sequences]
    vocab = int(model.get_input_embeddings().weight.shape[0])
    spec = AnchorSpec(cfg.n_sink, cfg.n_recent, cfg.separator_chars, cfg.keep_special)
    tables = spec.tables(tokenizer, vocab)

    state: dict[str, Any] = {"step": 0, "history": [], "val": [], "tokens": 0, "train_seconds": 0.0}
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    if resume_from is not None:
        saved = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        lr_sched.load_state_dict(saved["lr_scheduler"])
        keep_sched.load_state_dict(saved["keep_schedule"])
        if accelerator.process_index == 0:
            gen.set_state(saved["generator"])
        else:  # the saved state is rank 0's: give every other rank its own stream again
            gen.manual_seed(cfg.seed + accelerator.process_index + 1_000_003 * int(saved["step"]))
        state.update({k: saved[k] for k in ("step", "history", "val", "tokens", "train_seconds")})
        state["best"] = saved.get("best")
        logger.info("Resumed from %s at step %d", resume_from, state["step"])
    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    unwrapped = accelerator.unwrap_model(peft_model)

    def batches() -> Iterator[torch.Tensor]:
        # each process draws its own sequences (seeded by rank); an epoch is a permutation of the train chunks
        while True:
            order = torch.randperm(train_chunks.shape[0], generator=gen)
            for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
                yield train_chunks[order[i : i + cfg.batch_size]]

    data = batches()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(
        total=cfg.max_steps, initial=state["step"], desc="eit", disable=not (progress and accelerator.is_main_process)
    )
    split = cfg.split
    tail = cfg.seq_len - split  # logits only where the loss is (the continuation)
    interrupt = _StopRequest()  # SIGUSR1 (Slurm's --signal before the time limit): checkpoint, then stop
    while state["step"] < cfg.max_steps:
        step = state["step"]
        ratio = keep_sched.ratio(step)
        t0 = time.perf_counter()
        parts_acc: dict[str, float] = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        for _ in range(cfg.grad_accum):
            ids = next(data).to(device)
            keep = sample_keep_mask(ids, ratio, split, spec, tables[0], tables[1], generator=gen)
            with accelerator.accumulate(peft_model):
                teacher_logits = None
                if cfg.lambda_kl > 0:
                    with torch.no_grad(), unwrapped.disable_adapter():
                        teacher_logits = unwrapped(input_ids=ids, use_cache=False, logits_to_keep=tail).logits
                mask = KeepMask(keep, split, pad_to=cfg.seq_len)
                student = peft_model(input_ids=ids, eit_keep=mask, use_cache=False, logits_to_keep=tail)
                loss, parts = eit_loss(student.logits, teacher_logits, ids, split, cfg.lambda_kl)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k in parts_acc:
                parts_acc[k] += parts[k] / cfg.grad_accum
            state["tokens"] += ids.numel() * accelerator.num_processes
        lr_sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["train_seconds"] += time.perf_counter() - t0
        state["step"] = step + 1
        step_seconds = time.perf_counter() - t0
        state["history"].append(
            {"step": step + 1, "keep_ratio": round(ratio, 4), **parts_acc, "seconds": round(step_seconds, 4)}
        )
        out_of_time = cfg.max_seconds is not None and state["train_seconds"] >= cfg.max_seconds
        stop_now = interrupt.requested
        if accelerator.num_processes > 1:  # every rank stops at the same step
            flags = torch.tensor([float(out_of_time), float(stop_now)], device=device)
            flags = accelerator.reduce(flags, reduction="max")
            out_of_time, stop_now = bool(flags[0].item()), bool(flags[1].item())
        if out_of_time:
            logger.warning("Stopping at step %d: --max-seconds %.0f reached", state["step"], cfg.max_seconds)
        bar.set_postfix(loss=f"{parts_acc['loss']:.3f}", keep=f"{ratio:.2f}")
        bar.update(1)
        last = state["step"] == cfg.max_steps or out_of_time
        if state["step"] % cfg.eval_every == 0 or last:
            ppl = validation_perplexity(unwrapped, val_chunks, ratio, cfg, tables, device)
            moved = keep_sched.observe(ppl)
            entry = {"step": state["step"], "keep_ratio": round(ratio, 4), "ppl": ppl, "moved": moved}
            if cfg.select_keep_ratio is not None:
                # model selection at one fixed keep ratio (the curriculum's ratio moves, so its perplexities are not
                # comparable across steps): the adapter with the lowest one is kept in best/
                sel = validation_perplexity(unwrapped, val_chunks, cfg.select_keep_ratio, cfg, tables, device)
                entry["select_ppl"] = sel
                if state.get("best") is None or sel < state["best"]["select_ppl"]:
                    state["best"] = {"step": state["step"], "select_ppl": sel}
                    accelerator.wait_for_everyone()
                    _save(
                        out / BEST_DIR,
                        unwrapped,
                        tokenizer,
                        cfg,
                        {"step": state["step"], "keep_ratio": ratio, "select_ppl": sel},
                        accelerator,
                    )
            state["val"].append(entry)
        if state["step"] % cfg.save_every == 0 or last or stop_now:
            accelerator.wait_for_everyone()
            snapshot = {
                **state,
                "keep_ratio": keep_sched.ratio(state["step"]),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "keep_schedule": keep_sched.state_dict(),
                "generator": gen.get_state(),
                "tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            }
            name = "final" if last else f"{CHECKPOINT_PREFIX}{state['step']}"
            _save(out / name, unwrapped, tokenizer, cfg, snapshot, accelerator)
            if accelerator.is_main_process:
                atomic_write_json(
                    out / "train_log.json",
                    {
                        "config": asdict(cfg),
                        "step": state["step"],
                        "history": state["history"],
                        "val": state["val"],
                        "best": state.get("best"),
                        "tokens": state["tokens"],
                        "train_seconds": state["train_seconds"],
                        "tokens_per_second": snapshot["tokens_per_second"],
                        "peak_memory_bytes": snapshot["peak_memory_bytes"],
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                        "num_processes": accelerator.num_processes,
                        "stopped_by_time": bool(out_of_time),
                    },
                )
        if out_of_time:
            break
        if stop_now and not last:
            bar.close()
            interrupt.restore()
            raise TrainingInterrupted(out / name)
    bar.close()
    interrupt.restore()
    accelerator.wait_for_everyone()
    return out / "final"


# ----------------------------------------------------------------------------------------------------- analysis
@torch.no_grad()
def analyze_attention(
    model: nn.Module,
    tokenizer: Any,
    sequences: torch.Tensor,
    spec: AnchorSpec,
    progress: bool = False,
) -> dict[str, Any]:
    """Share of attention each token type receives, per layer and head (eager attention weights).

    Types (a key gets the first that applies): ``sink`` (the first ``n_sink`` positions), ``special``, ``recent``
    (within ``n_recent`` positions before the query), ``separator``, ``other``. For every layer and query head the
    attention mass of each type is averaged over queries and sequences; ``token_share`` gives, for comparison, the
    average share of the visible keys of each type (what uniform attention would give).
    """
    vocab = int(model.get_input_embeddings().weight.shape[0])
    sep_table, special_table = spec.tables(tokenizer, vocab)
    layers = _attention_modules(model)
    n_layers = len(layers)
    heads = model.config.num_attention_heads
    mass = torch.zeros(n_layers, heads, len(TOKEN_TYPES), dtype=torch.float64)
    share = torch.zeros(len(TOKEN_TYPES), dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def hook(layer_idx: int):
        def f(module, args, kwargs, output):
            weights = output[1]  # [B, H, L, L]
            if weights is None:
                raise ValueError(
                    "analyze needs eager attention weights; load the model with attn_implementation='eager'."
                )
            types = current["types"]  # [B, L, L, T] one-hot per (query, key)
            mass[layer_idx] += torch.einsum("bhqk,bqkt->ht", weights.float(), types).double().cpu() / (
                weights.shape[0] * weights.shape[2]
            )

        return f

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        for row in tqdm(sequences, desc="analyze", disable=not progress, leave=False):
            ids = row[None].to(next(model.parameters()).device)
            types = token_type_matrix(ids, spec, sep_table, special_table)
            current["types"] = types
            visible = types.sum(-1)  # causal: 1 where the key is visible
            share += (types.sum((1, 2)) / visible.sum((1, 2))[:, None]).mean(0).double().cpu()
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = len(sequences)
    mass /= n
    share /= n
    return {
        "types": list(TOKEN_TYPES),
        "per_layer_head": mass.tolist(),
        "per_layer": mass.mean(1).tolist(),
        "overall": dict(zip(TOKEN_TYPES, mass.mean((0, 1)).tolist())),
        "token_share": dict(zip(TOKEN_TYPES, share.tolist())),
        # attention per token of a type relative to uniform attention over the visible keys (1 = no preference)
        "enrichment": {
            t: (m / s if s > 0 else None) for t, m, s in zip(TOKEN_TYPES, mass.mean((0, 1)).tolist(), share.tolist())
        },
        "sequences": n,
        "seq_len": int(sequences.shape[1]),
        "anchors": asdict(spec),
    }


def token_type_matrix(
    ids: torch.Tensor, spec: AnchorSpec, sep_table: torch.Tensor, special_table: torch.Tensor | None
) -> torch.Tensor:
    """``[B, L, L, 5]`` one-hot type of key ``k`` seen from query ``q`` (zero where ``k > q``)."""
    tiers = anchor_tiers(ids, n_sink=0, n_recent=0, separator_lookup=sep_table, special_lookup=special_table)
    seq_len = ids.shape[1]
    pos = torch.arange(seq_len, device=ids.device)
    causal = pos[None, :] <= pos[:, None]
    sink = (pos < spec.n_sink)[None, None, :].expand(ids.shape[0], seq_len, seq_len)
    special = (tiers == 3)[:, None, :].expand_as(sink)
    recent = ((pos[:, None] - pos[None, :]) < spec.n_recent)[None].expand_as(sink)
    separator = (tiers == 1)[:, None, :].expand_as(sink)
    t_sink = sink
    t_special = special & ~t_sink
    t_recent = recent & ~t_sink & ~t_special
    t_sep = separator & ~t_sink & ~t_special & ~t_recent
    t_other = ~(t_sink | t_special | t_recent | t_sep)
    types = torch.stack([t_sink, t_special, t_recent, t_sep, t_other], dim=-1) & causal[None, :, :, None]
    return types.float()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model.language_model if hasattr(base.model, "language_model") else base.model
    return [layer.self_attn for layer in inner.layers]


def plot_analysis(result: dict[str, Any], path: Path) -> Path:
    """Heatmap (layer x token type, mean over heads) and overall bars next to the uniform share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_layer = np.array(result["per_layer"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.25 * len(per_layer) + 2.5))
    im = ax1.imshow(per_layer, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax1.set_xticks(range(len(TOKEN_TYPES)), TOKEN_TYPES)
    ax1.set_ylabel("layer")
    ax1.set_title("attention mass received (mean over heads)")
    fig.colorbar(im, ax=ax1)
    x = np.arange(len(TOKEN_TYPES))
    ax2.bar(x - 0.2, [result["overall"][t] for t in TOKEN_TYPES], 0.4, label="attention mass")
    ax2.bar(x + 0.2, [result["token_share"][t] for t in TOKEN_TYPES], 0.4, label="share of visible keys")
    ax2.set_xticks(x, TOKEN_TYPES)
    ax2.set_title("all layers and heads")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------- CLI
def cmd_analyze(args: argparse.Namespace) -> int:
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation="eager")
    ids = corpus_tokens(tokenizer, args.corpus, args.split)
    seqs = token_chunks(ids, args.seq_len)[: args.n_sequences]
    spec = AnchorSpec(args.n_sink, args.n_recent, args.separator_chars, not args.no_special)
    result = analyze_attention(model, tokenizer, seqs, spec, progress=True)
    result.update({"model": args.model, "corpus": args.corpus, "split": args.split})
    result["command"] = " ".join(["pressroom-train", *sys.argv[1:]]) if sys.argv else None
    result["device"] = str(next(model.parameters()).device)
    result["dtype"] = str(model.dtype)
    out = Path(args.output)
    atomic_write_json(out / "attention_by_type.json", result)
    plot_analysis(result, out / "attention_by_type.png")
    overall = ", ".join(f"{t} {result['overall'][t]:.3f} (share {result['token_share'][t]:.3f})" for t in TOKEN_TYPES)
    print(f"attention mass by token type: {overall}")
    print(f"wrote {out / 'attention_by_type.json'} and {out / 'attention_by_type.png'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = EITConfig(
        model=args.model,
        corpus=args.corpus,
        output=args.output,
        seq_len=args.seq_len,
        continuation=args.continuation,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lambda_kl=args.lambda_kl,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        keep_schedule=args.keep_schedule,
        keep_start=args.keep_start,
        keep_end=args.keep_end,
        keep_step=args.keep_step,
        adaptive_tolerance=args.adaptive_tolerance,
        n_sink=args.n_sink,
        n_recent=args.n_recent,
        separator_chars=args.separator_chars,
        keep_special=not args.no_special,
        save_every=args.save_every,
        eval_every=args.eval_every,
        val_sequences=args.val_sequences,
        select_keep_ratio=args.select_keep_ratio or None,
        train_sequences=args.train_sequences,
        max_seconds=args.max_seconds,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    resume: str | bool | None = args.resume
    if resume == "latest":
        resume = True
    try:
        final = train(cfg, resume=resume)
    except TrainingInterrupted as err:  # not a success: Slurm's wrapper requeues, the next run resumes
        print(f"pressroom-train eit: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {final}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a tiny test model, a Hub id or a dir")
    p.add_argument("--corpus", default="pg_essays")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=64)
    p.add_argument("--separator-chars", default=DEFAULT_SEPARATOR_CHARS)
    p.add_argument("--no-special", action="store_true", help="special tokens are not anchors")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eit_command", metavar="{analyze,train}")
    a = sub.add_parser("analyze", help="attention received by token type per layer/head (JSON + plot)")
    _common(a)
    a.add_argument("--split", default="train", choices=("train", "heldout", "all"))
    a.add_argument("--n-sequences", type=int, default=4)
    a.set_defaults(func=cmd_analyze)

    t = sub.add_parser("train", help="eviction-invariant LoRA training (teacher full KV, student keep mask)")
    _common(t)
    t.add_argument("--continuation", type=int, default=512, help="tokens after the evicted prefill (the loss)")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=20)
    t.add_argument("--lambda-kl", type=float, default=1.0)
    t.add_argument("--lora-r", type=int, default=64)
    t.add_argument("--lora-alpha", type=int, default=None, help="default: = r")
    t.add_argument("--keep-schedule", default="curriculum", choices=SCHEDULES)
    t.add_argument("--keep-start", type=float, default=0.9)
    t.add_argument("--keep-end", type=float, default=0.3)
    t.add_argument("--keep-step", type=float, default=0.1, help="adaptive: decrement of the keep ratio")
    t.add_argument("--adaptive-tolerance", type=float, default=0.02)
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--val-sequences", type=int, default=2, help="train-split sequences kept aside for validation")
    t.add_argument(
        "--select-keep-ratio",
        type=float,
        default=0.25,
        help="keep ratio of the validation that picks best/ (the adapter to use); 0 disables best/",
    )
    t.add_argument("--train-sequences", type=int, default=None, help="use only the first N train sequences")
    t.add_argument("--max-seconds", type=float, default=None, help="stop (and save final/) after this training time")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--resume", nargs="?", const="latest", default=None, help="resume from the latest checkpoint or a path"
    )
    t.set_defaults(func=cmd_train)

    def need_sub(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=need_sub)


__all__ = [
    "AnchorSpec",
    "EITConfig",
    "KeepSchedule",
    "analyze_attention",
    "eit_attention_forward",
    "eit_loss",
    "evicted_perplexity",
    "latest_checkpoint",
    "register_eit_attention",
    "sample_keep_mask",
    "train",
    "use_eit_attention",
]
