"""Comparison tables and plots over result directories.

Task runs are read in kvpress's layout: one directory per run,
``{dataset}__{data_dir}__{model}__{press}__{ratio:.2f}/`` (kvpress drops an empty ``data_dir`` and may append
suffixes; the names are not parsed, ``config.yaml`` is), holding

- ``config.yaml``: ``dataset``, ``data_dir``, ``model``, ``press_name``, ``compression_ratio``, ...
- ``metrics.json``: ``{task: {"string_match": score}}`` (kvpress's format; a bare number per task is accepted),
- ``predictions.csv``,
- ``stats.json`` (pressroom's, optional): ``kv_bytes``, ``kv_bytes_full``, ``prefill_seconds``,
  ``decode_seconds_per_token``, ``peak_gpu_memory_bytes``, ``context_tokens``, ``n_contexts``, ``device``.

Perplexity runs are JSON files with ``"kind": "perplexity"`` (see :mod:`pressroom.evaluation.perplexity`)
anywhere below the given paths.

Command line: ``python -m pressroom.evaluation.compare RESULTS_DIR [MORE ...] [-o OUTPUT_DIR]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pressroom.evaluation.atomic import atomic_write_bytes, atomic_write_json
from pressroom.evaluation.checkpoint import is_checkpoint, read_checkpoint
from pressroom.evaluation.compare_options import add_arguments
from pressroom.evaluation.tasks import row_scores

logger = logging.getLogger(__name__)

NO_PRESS = "no_press"
RUN_FILES = ("config.yaml", "metrics.json", "predictions.csv", "stats.json")
REQUIRED_FILES = ("config.yaml", "metrics.json")
KEY_COLUMNS = ["model", "dataset", "data_dir", "press", "compression_ratio"]
STAT_COLUMNS = ["kv_bytes", "prefill_seconds", "decode_seconds_per_token", "peak_gpu_memory_bytes"]
EXTRA_STAT_COLUMNS = ["kv_bytes_full", "context_tokens", "n_contexts", "device"]
COLUMNS = ["model", "press", "compression_ratio", "dataset", "data_dir", "task", "score", *STAT_COLUMNS, "path"]
PERPLEXITY_KIND = "perplexity"
MAX_TASK_PANELS = 15


# --------------------------------------------------------------------------------------------------- files


def _check_paths(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("No result paths given.")
    resolved = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Result path {str(p)!r} does not exist.")
        resolved.append(path)
    return resolved


def _walk_dirs(paths: Sequence[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in paths:
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root):
            # hidden directories are in-flight temporaries (atomic writes) or tool state: never results
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            if here.resolve() not in seen:
                seen.add(here.resolve())
                yield here


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def _number(value: Any) -> float:
    """``value`` as a float; NaN for None, booleans and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _task_score(value: Any) -> float:
    """A task's score from kvpress's metrics: ``{"string_match": x}``, another single metric, or a number."""
    if isinstance(value, dict):
        if "string_match" in value:
            return _number(value["string_match"])
        numbers = [v for v in value.values() if isinstance(v, Number) and not isinstance(v, bool)]
        return float(numbers[0]) if numbers else math.nan
    return _number(value)


def _read_run(run_dir: Path) -> list[dict[str, Any]] | None:
    """Rows of one run directory, or ``None`` (with a warning) if it is incomplete or unreadable."""
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    if missing:
        logger.warning("Skipping %s: incomplete run (no %s).", run_dir, " or ".join(missing))
        return None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        logger.warning("Skipping %s: unreadable config.yaml or metrics.json (%s).", run_dir, err)
        return None
    if not isinstance(config, dict) or not isinstance(metrics, dict) or not metrics:
        logger.warning("Skipping %s: config.yaml or metrics.json is empty or not a mapping.", run_dir)
        return None
    stats: dict[str, Any] = {}
    if (run_dir / "stats.json").is_file():
        try:
            stats = json.loads((run_dir / "stats.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            logger.warning("Ignoring unreadable %s (%s).", run_dir / "stats.json", err)
        if not isinstance(stats, dict):
            stats = {}
    base = {
        "model": str(config.get("model", "")).replace("/", "--"),
        "press": str(config.get("press_name", config.get("press", ""))),
        "compression_ratio": _number(config.get("compression_ratio", 0.0)),
        "dataset": str(config.get("dataset", "")),
        "data_dir": "" if config.get("data_dir") is None else str(config["data_dir"]),
    }
    run_stats = {name: _number(stats.get(name)) for name in STAT_COLUMNS + EXTRA_STAT_COLUMNS[:-1]}
    run_stats["device"] = stats.get("device")
    return [
        {**base, "task": str(task), "score": _task_score(value), **run_stats, "path": str(run_dir)}
        for task, value in metrics.items()
    ]


# --------------------------------------------------------------------------------------------------- loading


def load_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (run, task) from the kvpress-layout run directories below ``paths``.

    Parameters
    ----------
    paths : sequence of str or Path
        Directories (searched recursively) holding run directories, or run directories themselves.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, press, compression_ratio, dataset, data_dir, task, score, kv_bytes, prefill_seconds,
        decode_seconds_per_token, peak_gpu_memory_bytes, path``, then ``kv_bytes_full, context_tokens,
        n_contexts, device``. Statistics a run lacks (no ``stats.json``, or no GPU) are NaN.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    ValueError
        If no complete run directory is found.
    """
    roots = _check_paths(paths)
    rows: list[dict[str, Any]] = []
    for run_dir in _walk_dirs(roots):
        if _is_run_dir(run_dir):
            rows.extend(_read_run(run_dir) or [])
    if not rows:
        raise ValueError(
            f"No complete run found under {', '.join(map(str, roots))}: expected directories "
            "'{dataset}__{data_dir}__{model}__{press}__{ratio}' holding config.yaml and metrics.json."
        )
    df = pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_STAT_COLUMNS])
    return df.sort_values(["model", "dataset", "data_dir", "press", "compression_ratio", "task"], kind="stable")[
        df.columns
    ].reset_index(drop=True)


def load_perplexity_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every perplexity JSON (``"kind": "perplexity"``) below ``paths``, each with its ``path`` added.

    Parameters
    ----------
    paths : sequence of str or Path
        Directories (searched recursively) or JSON files.

    Returns
    -------
    list of dict
        Sorted by model, press name, compression ratio and path; empty if none is found.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    """
    roots = _check_paths(paths)
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
    for directory in _walk_dirs(roots):
        files.extend(sorted(p for p in directory.glob("*.json") if not p.name.startswith(".")))
    results, seen = [], set()
    for file in files:
        if file.name in ("metrics.json", "stats.json") or file.resolve() in seen:
            continue
        seen.add(file.resolve())
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") == PERPLEXITY_KIND and "perplexity" in data:
            results.append({**data, "path": str(file)})
    results.sort(
        key=lambda r: (
            str(r.get("model", "")),
            str(r.get("press_name", "")) != NO_PRESS,
            str(r.get("press_name", "")),
            _number(r.get("compression_ratio", 0.0)),
            r["path"],
        )
    )
    return results


# --------------------------------------------------------------------------------------------------- tables


def _press_order(press: pd.Series) -> pd.Series:
    return (press != NO_PRESS).astype(int)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, data_dir, press, compression ratio): a column per task, their average, stats.

    Parameters
    ----------
    df : pandas.DataFrame
        As returned by :func:`load_results`.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, dataset, data_dir, press, compression_ratio``, one per task (mean score over repeated
        runs), ``average`` (mean over the tasks), ``n_runs``, then ``kv_bytes, prefill_seconds,
        decode_seconds_per_token, peak_gpu_memory_bytes`` (means over runs). No-press rows come first.

    Raises
    ------
    ValueError
        If ``df`` is empty or lacks columns.
    """
    missing = [c for c in [*KEY_COLUMNS, "task", "score", "path"] if c not in df.columns]
    if missing:
        raise ValueError(f"summary_table needs load_results' columns; missing {', '.join(missing)}.")
    if df.empty:
        raise ValueError("summary_table got no rows.")
    df = df.copy()
    df["data_dir"] = df["data_dir"].fillna("")
    scores = df.pivot_table(index=KEY_COLUMNS, columns="task", values="score", aggfunc="mean", dropna=False)
    scores = scores.dropna(how="all")
    tasks = sorted(scores.columns)
    scores = scores[tasks]
    scores.columns = list(tasks)
    scores["average"] = scores[tasks].mean(axis=1)
    grouped = df.groupby(KEY_COLUMNS, dropna=False)
    stats = grouped[[c for c in STAT_COLUMNS if c in df.columns]].agg(
        lambda s: pd.to_numeric(s, errors="coerce").mean()
    )
    n_runs = grouped["path"].nunique().rename("n_runs")
    table = scores.join(n_runs).join(stats).reset_index()
    order = table.assign(_no_press=_press_order(table["press"]))
    order = order.sort_values(
        ["model", "dataset", "data_dir", "_no_press", "press", "compression_ratio"], kind="stable"
    )
    return order.drop(columns="_no_press").reset_index(drop=True)


def _format_cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if column == "compression_ratio":
            return f"{value:.2f}"
        if value.is_integer() and abs(value) >= 1:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table of ``df`` (no ``tabulate`` needed); numeric columns are right-aligned.

    Parameters
    ----------
    df : pandas.DataFrame
        Any frame; a named index is shown as columns, a default index is dropped.

    Returns
    -------
    str
        The table, one line per row, ending with a newline.
    """
    if any(name is not None for name in df.index.names):
        df = df.reset_index()
    columns = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    body = [[_format_cell(v, col) for v, col in zip(row, columns)] for row in df.itertuples(index=False, name=None)]
    widths = [max([len(h), 3, *(len(r[i]) for r in body)]) for i, h in enumerate(columns)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line([h.replace("|", "\\|") for h in columns]), rule, *(line(r) for r in body)]) + "\n"


def perplexity_table(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per perplexity result: model, press, ratio, corpus, mode, tokens, perplexity, kv bytes, speed."""
    columns = {
        "model": "model",
        "press_name": "press",
        "compression_ratio": "compression_ratio",
        "corpus": "corpus",
        "split": "split",
        "mode": "mode",
        "tokens": "tokens",
        "perplexity": "perplexity",
        "kv_bytes": "kv_bytes",
        "kv_bytes_max": "kv_bytes_max",
        "tokens_per_second": "tokens_per_second",
        "path": "path",
    }
    rows = [{new: r.get(old) for old, new in columns.items()} for r in results]
    return pd.DataFrame(rows, columns=list(columns.values()))


# --------------------------------------------------------------------------------------------------- plots


def _save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _new_figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Any, np.ndarray]:
    # The object-oriented API with the Agg canvas: no pyplot state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _group_label(keys: tuple, varying: list[str]) -> str:
    return ", ".join(str(k) for k, name in zip(keys, ["model", "dataset", "data_dir"]) if name in varying and k)


def plot_scores(df: pd.DataFrame, path: str | Path) -> Path:
    """Score vs compression ratio, one line per press; the no-press baseline as a dashed horizontal line.

    The first panel shows the average over tasks; with several tasks, one panel per task follows (up to 15).

    Parameters
    ----------
    df : pandas.DataFrame
        As returned by :func:`load_results`.
    path : str or Path
        The PNG to write (atomically).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If ``df`` has no rows.
    """
    if df.empty:
        raise ValueError("plot_scores got no rows.")
    df = df.copy()
    df["data_dir"] = df["data_dir"].fillna("")
    run_keys = ["model", "dataset", "data_dir", "press", "compression_ratio"]
    average = df.groupby(run_keys, dropna=False)["score"].mean().reset_index().assign(task="average")
    tasks = sorted(df["task"].unique())
    panels = ["average"] if len(tasks) == 1 else ["average", *tasks[:MAX_TASK_PANELS]]
    if len(tasks) > MAX_TASK_PANELS:
        logger.info("plot_scores: showing the first %d of %d tasks.", MAX_TASK_PANELS, len(tasks))
    per_task = df.groupby([*run_keys, "task"], dropna=False)["score"].mean().reset_index()
    data = pd.concat([average, per_task], ignore_index=True)
    varying = [c for c in ("model", "dataset", "data_dir") if df[c].nunique() > 1]

    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, 4.8, 3.6)
    colors: dict[str, Any] = {}
    palette = [f"C{i}" for i in range(10)]
    for ax, panel in zip(axes, panels):
        sub = data[data["task"] == panel]
        for group_keys, group in sub.groupby(["model", "dataset", "data_dir"], dropna=False, sort=True):
            suffix = _group_label(group_keys, varying)
            for press, runs in group.groupby("press", sort=True):
                label = f"{press} ({suffix})" if suffix else str(press)
                color = colors.setdefault(label, palette[len(colors) % len(palette)])
                runs = runs.sort_values("compression_ratio")
                if press == NO_PRESS:
                    ax.axhline(runs["score"].mean(), color=color, linestyle="--", linewidth=1.2, label=label)
                else:
                    ax.plot(runs["compression_ratio"], runs["score"], marker="o", color=color, label=label)
        if len(tasks) == 1:
            title = str(tasks[0])
        else:
            title = "average over tasks" if panel == "average" else str(panel)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("score")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8, loc="best")
    return _save_figure(fig, path)


def _running_perplexity(nll: Sequence[float]) -> np.ndarray:
    values = np.asarray(nll, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.exp(np.cumsum(values) / np.arange(1, values.size + 1))


def plot_perplexity(results: Sequence[dict[str, Any]], path: str | Path, log_x: bool = True) -> Path:
    """Running (cumulative) perplexity vs tokens, one line per perplexity run.

    Parameters
    ----------
    results : sequence of dict
        As returned by :func:`load_perplexity_results` (each needs ``nll``).
    path : str or Path
        The PNG to write (atomically).
    log_x : bool
        Logarithmic token axis.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If no result has a per-token ``nll`` list.
    """
    usable = [r for r in results if isinstance(r.get("nll"), list) and r["nll"]]
    if not usable:
        raise ValueError("plot_perplexity needs results with a non-empty per-token 'nll' list.")
    from matplotlib.ticker import ScalarFormatter

    several_models = len({r.get("model") for r in usable}) > 1
    fig, axes = _new_figure(1, 1, 7.0, 4.5)
    ax = axes[0]
    for r in usable:
        running = _running_perplexity(r["nll"])
        x = np.arange(1, running.size + 1)
        if running.size > 2000:  # keep the PNG light: ~2000 points, spaced for the chosen axis
            idx = np.geomspace(1, running.size, 2000) if log_x else np.linspace(1, running.size, 2000)
            idx = np.unique(idx.astype(int)) - 1
            x, running = x[idx], running[idx]
        press = r.get("press_name") or NO_PRESS
        label = f"{press} ({_number(r.get('compression_ratio', 0.0)):.2f})"
        if several_models:
            label += f" [{r.get('model')}]"
        label += f": {_number(r.get('perplexity')):.2f}"
        ax.plot(x, running, linestyle="--" if press == NO_PRESS else "-", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("tokens")
    ax.set_ylabel("running perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------- entry


def _predictions(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"No predictions.csv in {run_dir}: pass a run directory of pressroom-eval or kvpress.")
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def _check_rescored(run_dir: Path, df: pd.DataFrame, scores: np.ndarray) -> None:
    """Raise if the rescored ``predictions.csv`` disagrees with the run's own ``metrics.json`` (when it has one):
    the answers were then not read back as they were scored."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for task, value in metrics.items() if isinstance(metrics, dict) else ():
        rows = df["task"].to_numpy() == task
        stored = _task_score(value)
        if rows.any() and not math.isnan(stored) and abs(100.0 * scores[rows].mean() - stored) > 0.01:
            raise ValueError(
                f"{run_dir}: rescoring predictions.csv gives {100.0 * scores[rows].mean():.2f} for {task!r}, but "
                f"metrics.json says {stored:.2f}; the answers in predictions.csv are not in a format this reader knows."
            )


def paired_gap(
    base: str | Path, other: str | Path, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """How far ``other`` scores below ``base`` on the same questions, with a paired bootstrap interval.

    Both run directories must hold the same questions in the same order (same ``task``, ``answer`` and
    ``answer_prefix`` per row: two presses run on one generated dataset). The gap is the task-averaged score of
    ``base`` minus that of ``other`` (the way the averages of :func:`summary_table` are taken), in points. The
    interval resamples the questions of each task with replacement, the same draw for both runs, so it reflects
    which questions differ, not the spread of each run alone.

    Parameters
    ----------
    base, other : str or Path
        Run directories (``predictions.csv`` is read and rescored with kvpress's string match). ``other`` may also
        be the checkpoint of an unfinished run (``{run}.partial.json``): the gap is then taken over the questions it
        has answered so far, ``base`` restricted to the same ones, and the result says so under ``partial``.
    n_boot : int
        Bootstrap draws.
    seed : int
        Seed of the draws.
    level : float
        Coverage of the percentile interval, in (0, 1).

    Returns
    -------
    dict
        ``base``, ``other`` (task-averaged scores), ``gap``, ``interval`` ([low, high]), ``level``, ``n_boot``,
        ``n_questions`` and ``tasks``: per task ``base``, ``other``, ``gap``, ``n``, ``base_only`` / ``other_only``
        (questions that one run gets more of right than the other).

    Raises
    ------
    FileNotFoundError
        If a run directory has no ``predictions.csv``.
    ValueError
        If the runs hold different questions, or ``n_boot`` / ``level`` are out of range.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    if is_checkpoint(base):
        raise ValueError(f"{base}: an unfinished run goes second (OTHER_RUN), paired with a complete BASE_RUN.")
    a = _predictions(Path(base))
    partial = None
    if is_checkpoint(other):
        a, b, partial = _answered_rows(Path(base), a, Path(other))
    else:
        b = _predictions(Path(other))
    keys = [c for c in ("task", "answer", "answer_prefix", "question") if c in a.columns and c in b.columns]
    same = len(a) == len(b) and "task" in keys and a[keys].reset_index(drop=True).equals(b[keys].reset_index(drop=True))
    if not same:
        raise ValueError(
            f"{base} and {other} do not hold the same questions in the same order ({len(a)} vs {len(b)} rows; "
            f"compared columns {keys}): pair two runs made on one dataset (same tasks, samples, seed and length)."
        )
    sa, sb = row_scores(a).to_numpy(), row_scores(b).to_numpy()
    if partial is None:  # a checkpoint has no metrics.json to check against
        for run, df, scores in ((Path(base), a, sa), (Path(other), b, sb)):
            _check_rescored(run, df, scores)
    tasks = sorted(a["task"].unique())
    rows = {t: np.flatnonzero(a["task"].to_numpy() == t) for t in tasks}
    diff = sa - sb
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for t in tasks:
        idx = rows[t]
        draws += diff[idx][rng.integers(0, len(idx), size=(n_boot, len(idx)))].mean(axis=1)
    draws *= 100.0 / len(tasks)
    tail = 100.0 * (1.0 - level) / 2.0
    per_task = {
        t: {
            "base": 100.0 * float(sa[i].mean()),
            "other": 100.0 * float(sb[i].mean()),
            "gap": 100.0 * float(diff[i].mean()),
            "n": int(len(i)),
            "base_only": int((sa[i] > sb[i]).sum()),
            "other_only": int((sb[i] > sa[i]).sum()),
        }
        for t, i in rows.items()
    }
    return {
        "base": float(np.mean([v["base"] for v in per_task.values()])),
        "other": float(np.mean([v["other"] for v in per_task.values()])),
        "gap": float(np.mean([v["gap"] for v in per_task.values()])),
        "interval": [float(np.percentile(draws, tail)), float(np.percentile(draws, 100.0 - tail))],
        "level": level,
        "n_boot": n_boot,
        "n_questions": int(len(a)),
        "tasks": per_task,
        **({"partial": partial} if partial is not None else {}),
    }


# the fields of a run's configuration that decide its questions (an unfinished run is paired on these)
_DATASET_FIELDS = ("dataset", "data_dir", "model", "tasks", "n_samples", "seed", "fraction", "query_aware")


def _answered_rows(base: Path, a: pd.DataFrame, checkpoint: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``base``'s rows that the unfinished run ``checkpoint`` (``{run}.partial.json``, written by the Runner after
    every context) has answered, and the same rows with its answers; the checkpoint's dataset must be ``base``'s."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"No checkpoint {checkpoint}: pass the .partial.json file of an unfinished run.")
    state = read_checkpoint(checkpoint, "pass the .partial.json file of an unfinished pressroom-eval run.")
    answers, identity = state["answers"], state["identity"]
    config_path = base / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.yaml in {base}: an unfinished run is paired with a pressroom-eval run.")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    differ = [k for k in _DATASET_FIELDS if k in identity and config.get(k) != identity[k]]
    if differ:
        raise ValueError(
            f"{checkpoint} was made on other questions than {base} (they differ in {differ}): pair it with a run of "
            "the same dataset, tasks, samples, seed and length."
        )
    try:
        positions = sorted(int(k) for k in answers)
    except ValueError as err:
        raise ValueError(f"{checkpoint}: answers are keyed by row numbers, got {err}.") from err
    if not answers or positions[0] < 0 or positions[-1] >= len(a):
        raise ValueError(f"{checkpoint} answers {len(answers)} rows, not within {base}'s {len(a)} questions.")
    partial = {"answered": len(positions), "of": int(len(a)), "checkpoint": str(checkpoint)}
    a = a.iloc[positions].reset_index(drop=True)
    b = a.copy()
    b["predicted_answer"] = [str(answers[str(i)]) for i in positions]
    return a, b, partial


def compare(paths: Sequence[str | Path], output_dir: str | Path | None = None) -> pd.DataFrame:
    """Build the comparison table over ``paths``, print it as markdown, and write the CSV and plots.

    Writes into ``output_dir`` (default: the first path): ``comparison.csv`` (the summary table), ``scores.png``
    and, if perplexity JSON files are found, ``perplexity.csv`` and ``perplexity.png``.

    Parameters
    ----------
    paths : sequence of str or Path
        Result directories (searched recursively).
    output_dir : str or Path, optional
        Where to write the outputs.

    Returns
    -------
    pandas.DataFrame
        The summary table (see :func:`summary_table`); empty if only perplexity results were found.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    ValueError
        If neither task runs nor perplexity results are found.
    """
    roots = _check_paths(paths)
    out = Path(output_dir) if output_dir is not None else (roots[0] if roots[0].is_dir() else roots[0].parent)
    perplexity = load_perplexity_results(roots)
    try:
        df = load_results(roots)
    except ValueError:
        if not perplexity:
            raise
        df = None
    table = pd.DataFrame()
    if df is not None:
        table = summary_table(df)
        print(to_markdown(table))
        atomic_write_bytes(out / "comparison.csv", table.to_csv(index=False).encode("utf-8"))
        plot_scores(df, out / "scores.png")
    if perplexity:
        ppl = perplexity_table(perplexity)
        print(to_markdown(ppl.drop(columns="path")))
        atomic_write_bytes(out / "perplexity.csv", ppl.to_csv(index=False).encode("utf-8"))
        if any(isinstance(r.get("nll"), list) and r["nll"] for r in perplexity):
            plot_perplexity(perplexity, out / "perplexity.png")
    logger.info("Comparison written to %s", out)
    return table


def run_from_args(args: argparse.Namespace, command: str) -> None:
    """Run what the options of :func:`~pressroom.evaluation.compare_options.add_arguments` ask for; ``command``
    (the command line) goes into ``--json``.

    Raises
    ------
    ValueError
        If both or neither of result directories and ``--paired`` are given (and as :func:`compare` /
        :func:`paired_gap`).
    """
    if bool(args.paths) == bool(args.paired):
        raise ValueError("give either result directories or --paired BASE_RUN OTHER_RUN.")
    if not args.paired:
        if args.json is not None or args.bootstrap is not None:
            raise ValueError("--json and --bootstrap go with --paired.")
        compare(args.paths, args.output_dir)
        return
    if args.output_dir is not None:
        raise ValueError("--output-dir goes with result directories, not --paired (use --json).")
    result = paired_gap(*args.paired, n_boot=10000 if args.bootstrap is None else args.bootstrap)
    result.update(base_run=args.paired[0], other_run=args.paired[1], command=command)
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m pressroom.evaluation.compare RESULTS [...] [-o OUTPUT_DIR]``, or
    ``--paired BASE_RUN OTHER_RUN [--json FILE]`` for the paired gap of two runs (:func:`paired_gap`)."""
    parser = argparse.ArgumentParser(description="Compare pressroom / kvpress result directories.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        run_from_args(args, " ".join(["python -m pressroom.evaluation.compare", *words]))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
