"""Evaluate a press through kvpress's ``KVPressTextGenerationPipeline``, in kvpress's results layout.

One run = (dataset, data_dir, model, press, compression ratio). Its results go to
``{output_dir}/{dataset}__{data_dir}__{model}__{press}__{ratio:.2f}/`` with kvpress's files
``predictions.csv``, ``metrics.json`` and ``config.yaml``, plus ``stats.json`` (ours): the KV-cache bytes
actually held after prefill, the full cache's bytes for the same tokens, prefill seconds, decode seconds per
generated token, and peak GPU memory where there is a GPU.

The directory is written atomically (built under a temporary name, then renamed), so an interrupted or failed
run leaves nothing half-written, and a complete run is skipped when asked again. An unfinished run keeps its answers
so far in ``{results_dir}.partial.json`` (rewritten atomically after every context); the same run asked again
resumes from it, and removes it once the results directory is written. As in kvpress, the questions
of one context share a single prefill (a ``DecodingPress`` runs per question, as kvpress requires).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from kvpress import BasePress, DecodingPress, KVPressTextGenerationPipeline, ObservedAttentionPress
from tqdm.auto import tqdm

from pressroom.evaluation import tasks as tasks_mod
from pressroom.evaluation.atomic import atomic_write_json
from pressroom.evaluation.checkpoint import partial_path, read_checkpoint
from pressroom.evaluation.models import load_model, model_label
from pressroom.evaluation.press_registry import make_press, press_label
from pressroom.presses.memory import cache_memory_bytes

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
RESULT_FILES = ("predictions.csv", "metrics.json", "config.yaml", "stats.json")


@dataclass
class EvalConfig:
    """What one evaluation run is; saved as ``config.yaml`` in its results directory.

    Parameters
    ----------
    dataset : str
        ``"synthetic"`` (pressroom's offline RULER-style tasks on the essays) or a kvpress Hub dataset
        (``ruler``, ``longbench``, ``infinitebench``, ``loogle``, ``needle_in_haystack``).
    data_dir : str, optional
        For ``synthetic``, the context length in tokens (default ``"2048"``); for Hub datasets, kvpress's data_dir.
    model : str
        ``smollm2`` (embedded), a tiny test model, a Hub id or a local directory.
    press_name : str
        A press spec for :func:`pressroom.evaluation.press_registry.make_press` (``no_press`` for the baseline).
    compression_ratio : float
        Fraction of the KV cache the press removes.
    tasks : list of str, optional
        Synthetic tasks to generate (default: all of them).
    n_samples : int
        Synthetic samples (contexts) per task.
    seed : int
        Seed of the task generator and of torch.
    max_new_tokens : int, optional
        Overrides the dataset's per-task value.
    max_context_length : int, optional
        Truncates contexts (kvpress's pipeline argument).
    fraction : float
        Fraction of a Hub dataset to sample.
    query_aware : bool
        kvpress's ``query_aware`` mode: each question is appended to its context before compression (so
        query-aware presses such as SnapKV see it, as in their papers), and the question itself is then empty.
        Every question gets its own prefill. Off by default (kvpress's default: the press compresses the context
        alone, then all questions of that context are answered from the same compressed cache).
    device, dtype : str, optional
        Where and in which precision to run (default: CUDA in bfloat16 if present, else CPU in float32).
    output_dir : str
        Parent of the run's results directory.
    """

    dataset: str = SYNTHETIC
    data_dir: str | None = None
    model: str = "smollm2"
    press_name: str = "no_press"
    compression_ratio: float = 0.0
    tasks: list[str] | None = None
    n_samples: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    max_context_length: int | None = None
    fraction: float = 1.0
    query_aware: bool = False
    device: str | None = None
    dtype: str | None = None
    output_dir: str = "./results"
    press_init_command: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dataset == SYNTHETIC:
            self.data_dir = str(self.data_dir or 2048)
            if not self.data_dir.isdigit():
                raise ValueError(
                    f"For the synthetic dataset, data_dir is the context length in tokens: {self.data_dir}"
                )
        elif self.dataset not in tasks_mod.HUB_DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; use {SYNTHETIC!r} or one of {', '.join(tasks_mod.HUB_DATASETS)}."
            )
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}.")
        if press_label(self.press_name) == "no_press":
            self.compression_ratio = 0.0
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}.")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")

    def results_dir(self) -> Path:
        """kvpress's layout: ``{dataset}__{data_dir}__{model}__{press}__{ratio:.2f}`` (+ kvpress's suffixes)."""
        parts = [
            self.dataset,
            self.data_dir or "",
            model_label(self.model),
            press_label(self.press_name),
            f"{self.compression_ratio:.2f}",
        ]
        if self.fraction < 1.0:
            parts.append(f"fraction{self.fraction:.3f}")
        if self.max_context_length is not None:
            parts.append(f"max_context{self.max_context_length}")
        if self.query_aware:
            parts.append("query_aware")
        return Path(self.output_dir) / "__".join(parts)

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the results are (used to refuse reusing a run made differently)."""
        d = asdict(self)
        for key in ("press_init_command", "output_dir", "device"):
            d.pop(key)
        return d


def make_query_aware(df) -> None:
    """kvpress's ``query_aware`` mode, in place: each question joins its context (which the press then compresses)
    and the question left to ask after compression is empty."""
    df["context"] = df["context"] + df["question"]
    df["question"] = ""


def is_complete(results_dir: Path) -> bool:
    return all((results_dir / name).is_file() for name in RESULT_FILES)


def check_writable(directory: Path) -> None:
    """Fail early, with a clear message, when results cannot be written under ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"Cannot write results under {directory}: {err.strerror or err}. Choose another --output-dir."
        ) from err


_RECORDED = ("prefill_seconds", "decode_seconds", "decode_tokens", "kv_bytes", "context_tokens")


class _Recorder:
    """Times prefill / question / decode forwards and measures the cache after prefill."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.phase = "idle"
        self.prefill_seconds: list[float] = []
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self.kv_bytes: list[int] = []
        self.context_tokens: list[int] = []
        self._t0 = 0.0

    def state(self) -> dict[str, Any]:
        """What has been recorded (a checkpoint's part; :meth:`load` restores it)."""
        return {k: getattr(self, k) for k in _RECORDED}

    def load(self, state: dict[str, Any]) -> None:
        for k in _RECORDED:
            setattr(self, k, state[k])

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def pre_hook(self, module, args, kwargs) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def post_hook(self, module, args, kwargs, output) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._t0
        ids = kwargs.get("input_ids")
        q_len = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        if self.phase == "prefill":
            self.prefill_seconds.append(elapsed)
            self.context_tokens.append(q_len)
        elif self.phase == "decode" and q_len == 1:
            self.decode_seconds += elapsed
            self.decode_tokens += 1


class InstrumentedPipeline(KVPressTextGenerationPipeline):
    """kvpress's pipeline, unchanged in behaviour, that records timings and the KV bytes held after prefill."""

    recorder: _Recorder | None = None

    @contextmanager
    def recording(self):
        self.recorder = _Recorder(self.model.device)
        base = self.model.model
        handles = [
            base.register_forward_pre_hook(self.recorder.pre_hook, with_kwargs=True),
            base.register_forward_hook(self.recorder.post_hook, with_kwargs=True),
        ]
        try:
            yield self.recorder
        finally:
            for h in handles:
                h.remove()

    def _forward(self, input_tensors, max_new_tokens=50, press=None, cache=None):
        if self.recorder is not None:
            self.recorder.phase = "prefill"
            self._measured = False
        try:
            return super()._forward(input_tensors, max_new_tokens=max_new_tokens, press=press, cache=cache)
        finally:
            if self.recorder is not None:
                self.recorder.phase = "idle"

    def generate_answer(self, question_ids, cache, context_length, max_new_tokens):
        rec = self.recorder
        if rec is not None:
            if not self._measured:  # the cache as the press left it after prefill, before any question
                rec.kv_bytes.append(cache_memory_bytes(cache))
                self._measured = True
            rec.phase = "decode"
        return super().generate_answer(question_ids, cache, context_length, max_new_tokens)


def full_cache_bytes(model, tokens: int) -> int:
    """Bytes a full (uncompressed) cache holds for ``tokens`` tokens of ``model`` in its dtype."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return int(2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * model.dtype.itemsize)


def _atomic_write_dir(target: Path, files: dict[str, str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if target.exists():  # an incomplete directory from elsewhere: keep it aside, never delete data
            stale = target.with_name(f"{target.name}.stale-{int(time.time())}")
            logger.warning("Moving incomplete %s aside to %s", target, stale)
            os.replace(target, stale)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Runner:
    """Runs evaluations, keeping loaded models, pipelines and generated datasets between runs."""

    def __init__(self, progress: bool = True):
        self.progress = progress
        self._pipelines: dict[tuple, InstrumentedPipeline] = {}
        self._datasets: dict[tuple, pd.DataFrame] = {}

    def pipeline(self, model: str, device: str | None, dtype: str | None, eager: bool) -> InstrumentedPipeline:
        key = (model, device, dtype, eager)
        if key not in self._pipelines:
            kwargs = {"attn_implementation": "eager"} if eager else {}
            mdl, tok = load_model(model, device=device, dtype=dtype, **kwargs)
            self._pipelines[key] = InstrumentedPipeline(model=mdl, tokenizer=tok, device=mdl.device)
        return self._pipelines[key]

    def dataset(self, config: EvalConfig, tokenizer) -> pd.DataFrame:
        key = (
            config.dataset,
            config.data_dir,
            tuple(config.tasks or ()),
            config.n_samples,
            config.seed,
            config.fraction,
            config.model,
        )
        if key not in self._datasets:
            if config.dataset == SYNTHETIC:
                df = tasks_mod.generate_tasks(
                    tokenizer,
                    tasks=config.tasks,
                    context_length=int(config.data_dir),
                    n_samples=config.n_samples,
                    seed=config.seed,
                )
            else:
                df = tasks_mod.load_hub_dataset(config.dataset, config.data_dir)
                if config.fraction < 1.0:
                    df = df.sample(frac=config.fraction, random_state=config.seed)
            self._datasets[key] = df
        return self._datasets[key].copy()

    def run(self, config: EvalConfig, press: BasePress | None = None) -> Path:
        """Evaluate one configuration; return its results directory (skipped if already complete).

        ``press`` may be given as an instance (its label is then ``config.press_name``); otherwise it is built
        from ``config.press_name`` and ``config.compression_ratio``.
        """
        results_dir = config.results_dir()
        if is_complete(results_dir):
            stored = yaml.safe_load((results_dir / "config.yaml").read_text())
            # a field added after the run was written counts as its default (older runs stay reusable)
            defaults = {f.name: f.default for f in fields(EvalConfig)}
            stored_id = {k: stored.get(k, defaults.get(k)) for k in config.identity()}
            if stored_id != config.identity():
                raise ValueError(
                    f"{results_dir} holds a complete run made with a different configuration "
                    f"({stored_id} vs {config.identity()}); use another --output-dir."
                )
            logger.info("Skipping %s: already complete", results_dir)
            return results_dir
        check_writable(results_dir.parent)
        press = press if press is not None else make_press(config.press_name, config.compression_ratio)
        config.press_init_command = repr(press)
        pipe = self.pipeline(config.model, config.device, config.dtype, isinstance(press, ObservedAttentionPress))
        if getattr(press, "tokenizer", False) is None:  # presses that read token types (AnchorPress): the pipeline's
            press.tokenizer = pipe.tokenizer
        df = self.dataset(config, pipe.tokenizer).reset_index(drop=True)  # row numbers: a checkpoint's keys
        if config.query_aware:  # as kvpress's evaluation
            make_query_aware(df)
        torch.manual_seed(config.seed)
        device = pipe.model.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        df["predicted_answer"] = None
        checkpoint = partial_path(results_dir)
        done, wall_before = self._resume(checkpoint, config, df)
        started = time.perf_counter()
        with pipe.recording() as rec, torch.inference_mode():
            if done:
                rec.load(done["recorder"])
            if isinstance(press, DecodingPress):
                groups = [(row["context"], df.loc[[idx]]) for idx, row in df.iterrows()]
            else:
                groups = list(df.groupby("context", sort=False))
            desc = f"{press_label(config.press_name)}@{config.compression_ratio:.2f}"
            answered = done["answers"] if done else {}
            todo = [(c, g) for c, g in groups if not all(str(i) in answered for i in g.index)]
            if len(todo) < len(groups):
                logger.info("Resuming %s: %d of %d contexts done", results_dir, len(groups) - len(todo), len(groups))
            for context, group in tqdm(todo, desc=desc, disable=not self.progress, leave=False):
                if group["answer_prefix"].nunique() != 1:
                    raise ValueError("Rows sharing a context must share their answer_prefix.")
                max_new = config.max_new_tokens or int(group["max_new_tokens"].iloc[0])
                out = pipe(
                    context,
                    questions=group["question"].tolist(),
                    answer_prefix=group["answer_prefix"].iloc[0],
                    press=press,
                    max_new_tokens=max_new,
                    max_context_length=config.max_context_length,
                )
                df.loc[group.index, "predicted_answer"] = out["answers"]
                answered.update({str(i): a for i, a in zip(group.index, out["answers"])})
                wall = wall_before + time.perf_counter() - started
                state = {"identity": config.identity(), "answers": answered, "recorder": rec.state(), "wall": wall}
                atomic_write_json(checkpoint, state)
        wall = wall_before + time.perf_counter() - started
        df["compression_ratio"] = config.compression_ratio
        metrics = tasks_mod.score_predictions(df)
        mean_tokens = sum(rec.context_tokens) / max(1, len(rec.context_tokens))
        stats = {
            "kv_bytes": int(sum(rec.kv_bytes) / max(1, len(rec.kv_bytes))),
            "kv_bytes_full": int(
                sum(full_cache_bytes(pipe.model, t) for t in rec.context_tokens) / max(1, len(rec.context_tokens))
            ),
            "prefill_seconds": sum(rec.prefill_seconds) / max(1, len(rec.prefill_seconds)),
            "decode_seconds_per_token": rec.decode_seconds / max(1, rec.decode_tokens),
            "decode_tokens": rec.decode_tokens,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "context_tokens": mean_tokens,
            "n_contexts": len(rec.context_tokens),
            "n_questions": len(df),
            "wall_seconds": wall,
            "resumed_contexts": len(groups) - len(todo),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(pipe.model.dtype),
            "torch": torch.__version__,
        }
        columns = [c for c in df.columns if c != "context"]
        _atomic_write_dir(
            results_dir,
            {
                "predictions.csv": df[columns].to_csv(index=False),
                "metrics.json": json.dumps(metrics, indent=4),
                "stats.json": json.dumps(stats, indent=2),
                "config.yaml": yaml.safe_dump(asdict(config), sort_keys=False),
            },
        )
        checkpoint.unlink(missing_ok=True)
        logger.info("Wrote %s", results_dir)
        return results_dir

    @staticmethod
    def _resume(checkpoint: Path, config: EvalConfig, df: pd.DataFrame) -> tuple[dict[str, Any] | None, float]:
        """The checkpoint of an interrupted run of ``config`` (its answers put into ``df``), and its wall seconds."""
        if not checkpoint.is_file():
            return None, 0.0
        state = read_checkpoint(checkpoint, "move it away to start the run afresh.")
        missing = [f"recorder.{k}" for k in _RECORDED if k not in state["recorder"]]
        if missing:
            raise ValueError(f"{checkpoint} lacks {sorted(missing)}; move it away to start the run afresh.")
        answers, identity = state["answers"], state["identity"]
        if identity != json.loads(json.dumps(config.identity())):
            raise ValueError(
                f"{checkpoint} is the checkpoint of a run made with a different configuration ({identity} vs "
                f"{config.identity()}); move it away, or use another --output-dir."
            )
        rows = {str(i) for i in range(len(df))}  # df is numbered 0..n-1 (run)
        unknown = [k for k in answers if k not in rows]
        if unknown:
            raise ValueError(
                f"{checkpoint} answers rows {unknown[:5]} that this run's dataset does not have; move it away."
            )
        for key, answer in answers.items():
            df.at[int(key), "predicted_answer"] = answer
        return state, float(state["wall"])


def press_grid(presses: list[str], ratios: list[float], baseline: bool = True) -> list[tuple[str, float]]:
    """(press spec, ratio) pairs of a sweep: the no_press baseline once (if asked), then every press x ratio."""
    grid: list[tuple[str, float]] = [("no_press", 0.0)] if baseline else []
    return grid + [(p, r) for p in presses if press_label(p) != "no_press" for r in ratios]


def run_evaluation(config: EvalConfig | None = None, press: BasePress | None = None, **kwargs: Any) -> Path:
    """Evaluate one configuration (``EvalConfig`` or its fields as keywords); return the results directory."""
    config = config or EvalConfig(**kwargs)
    return Runner().run(config, press=press)
