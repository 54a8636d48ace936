"""Task manifests: the study as one JSON line per task, run one line at a time (a Slurm array task each).

A manifest (``manifest.jsonl``) is written by :func:`plan_eval` / :func:`plan_command` (``pressroom-eval plan``)
and holds one JSON object per line:

- ``{"index": 0, "phase": "phase1_baseline", "kind": "eval", "name": ..., "output": DIR, "eval": {...}}``: one
  evaluation run; ``eval`` holds :class:`~pressroom.evaluation.run.EvalConfig`'s fields and ``output`` is its
  results directory (kvpress's layout, ``EvalConfig.results_dir()``). It is done when that directory is complete.
- ``{"index": 1, "phase": "phase2_commvq", "kind": "command", "name": ..., "output": DIR, "argv": [...],
  "done": FILE, "distributed": false}``: any command line (a training unit such as ``pressroom-train commvq keys
  ... --layer 3``). It is done when ``done`` exists; :func:`run_task` writes that marker (atomically) only after
  the command exited 0, so the command itself must write its outputs atomically or resume (pressroom's training
  commands do both). With ``distributed``, ``$PRESSROOM_LAUNCHER`` (e.g. ``torchrun --no-python --standalone
  --nproc-per-node 4``) is put in front of the command when set. With ``resume_if`` (a glob) and ``resume_args``,
  the arguments are added when the glob matches (a checkpoint exists: the task was interrupted and requeued).

Every line has a ``stage`` (default 0): ``slurm/submit.sh`` submits one array per stage, each after the previous
one succeeded (e.g. KV collection, then one codebook task per layer, then the assembly of the codebooks).

Tasks are idempotent: running a task that is done returns at once. :func:`pending_indices` and
:func:`array_spec` give the unfinished tasks as a Slurm ``--array`` list, and :func:`aggregate` builds the
comparison table and plots from the finished evaluation tasks.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pressroom.evaluation.atomic import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

EVAL = "eval"
COMMAND = "command"
KINDS = (EVAL, COMMAND)
PHASES = ("phase0_analyze", "phase1_baseline", "phase2_commvq", "phase2_eit", "phase3_eval_trained")
LAUNCHER_ENV = "PRESSROOM_LAUNCHER"
# Testing aid: run-task sleeps this many seconds before running a task (so that a test can kill it mid-run).
SLEEP_ENV = "PRESSROOM_TASK_SLEEP"
ARRAY_INDEX_ENV = "SLURM_ARRAY_TASK_ID"
# The files of a complete evaluation run: pressroom.evaluation.run.RESULT_FILES (a test keeps them equal).
EVAL_RESULT_FILES = ("predictions.csv", "metrics.json", "config.yaml", "stats.json")


# --------------------------------------------------------------------------------------------------- planning


def _eval_config_fields() -> set[str]:
    from pressroom.evaluation.run import EvalConfig

    return {f.name for f in fields(EvalConfig)} - {"press_init_command"}


def plan_eval(
    models: Sequence[str],
    presses: Sequence[str],
    ratios: Sequence[float],
    data_dirs: Sequence[str | None],
    output_dir: str | Path,
    dataset: str = "synthetic",
    baseline: bool = True,
    phase: str = "phase1_baseline",
    **config: Any,
) -> list[dict[str, Any]]:
    """Manifest lines for the evaluation grid models x (baseline + presses x ratios) x data_dirs.

    Parameters
    ----------
    models, presses, ratios, data_dirs : sequences
        The grid. ``data_dirs`` are context lengths for the synthetic dataset, kvpress's data_dir otherwise.
    output_dir : str or Path
        Parent of every run's results directory (made absolute, so tasks run from any directory).
    dataset : str
        ``synthetic`` or a kvpress Hub dataset.
    baseline : bool
        Add the ``no_press`` run once per model and data_dir.
    phase : str
        The phase the lines belong to (picks the sbatch script in ``slurm/submit.sh``).
    **config
        Other :class:`~pressroom.evaluation.run.EvalConfig` fields (``tasks``, ``n_samples``, ``seed``, ...).

    Returns
    -------
    list of dict
        One line per run, without ``index`` (see :func:`write_manifest`).
    """
    from pressroom.evaluation.run import EvalConfig, press_grid

    unknown = set(config) - _eval_config_fields()
    if unknown:
        raise ValueError(f"Unknown evaluation setting(s) {sorted(unknown)}; known: {sorted(_eval_config_fields())}.")
    if not models:
        raise ValueError("Give at least one model to plan for.")
    out = str(Path(output_dir).expanduser().resolve())
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for model, data_dir in itertools.product(models, data_dirs or [None]):
        for press, ratio in press_grid(list(presses), list(ratios), baseline=baseline):
            cfg = EvalConfig(
                dataset=dataset,
                data_dir=data_dir,
                model=model,
                press_name=press,
                compression_ratio=ratio,
                output_dir=out,
                **config,
            )
            results_dir = str(cfg.results_dir())
            if results_dir in seen:
                continue
            seen.add(results_dir)
            fields_ = asdict(cfg)
            fields_.pop("press_init_command")
            lines.append(
                {"phase": phase, "kind": EVAL, "name": Path(results_dir).name, "output": results_dir, "eval": fields_}
            )
    if not lines:
        raise ValueError("The grid is empty: give --press (or keep the baseline) and at least one ratio.")
    return lines


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """Parse ``key=v1,v2`` items (``key=0-29`` is a range of integers, both ends included) into lists."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not raw.strip():
            raise ValueError(f"Bad grid item {item!r}: write key=v1,v2 or key=FIRST-LAST (e.g. layer=0-29).")
        values: list[str] = []
        for part in (p.strip() for p in raw.split(",")):
            lo, dash, hi = part.partition("-")
            if dash and lo.isdigit() and hi.isdigit():
                if int(hi) < int(lo):
                    raise ValueError(f"Bad range {part!r} in {item!r}: the end is before the start.")
                values.extend(str(i) for i in range(int(lo), int(hi) + 1))
            elif part:
                values.append(part)
        grid[key] = values
    return grid


def _format(template: str, values: dict[str, str], what: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"The {what} {template!r} uses {err} which is neither a grid key nor output_dir/output/index; "
            f"grid keys: {sorted(set(values) - {'output_dir', 'output'})}."
        ) from err


def plan_command(
    command: str | Sequence[str],
    grid: dict[str, Sequence[str]],
    output_dir: str | Path,
    task_output: str = "{output_dir}",
    name: str | None = None,
    done: str | None = None,
    phase: str = "commands",
    distributed: bool = False,
    stage: int = 0,
    resume_if: str | None = None,
    resume_args: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Manifest lines running ``command`` once per point of ``grid`` (the product of its value lists).

    Every string is a ``str.format`` template over the grid keys, ``output_dir`` and (in ``command`` and
    ``done``) ``output``, the task's output directory.

    Parameters
    ----------
    command : str or sequence of str
        The command line (a string is split as a shell would), e.g.
        ``"pressroom-train commvq keys --model {model} --bits {bits} --layer {layer} --output {output}"``.
    grid : dict
        ``{key: [values]}``; an empty grid gives one task.
    output_dir : str or Path
        The study's output root (made absolute).
    task_output : str
        The task's output directory; several tasks may share one (e.g. one codebook directory for all layers).
    name : str, optional
        The task's name (default: the grid values joined by ``-``, after the phase).
    done : str, optional
        The marker file written when the command succeeded (default: ``{output}/.done/{name}.json``).
    phase, distributed, stage, resume_if, resume_args
        See the module docstring (``resume_if`` is a template too).
    """
    argv_template = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv_template:
        raise ValueError("The command is empty.")
    out = str(Path(output_dir).expanduser().resolve())
    keys = list(grid)
    lines: list[dict[str, Any]] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        values["output_dir"] = out
        task_name = _format(name, values, "task name") if name else "-".join([phase, *combo])
        values["output"] = str(Path(_format(task_output, values, "task output")).expanduser().resolve())
        argv = [_format(arg, values, "command argument") for arg in argv_template]
        marker = _format(done, values, "done marker") if done else str(Path(values["output"]) / ".done" / task_name)
        if not done:
            marker += ".json"
        if resume_if:
            extra = {"resume_if": _format(resume_if, values, "resume glob"), "resume_args": list(resume_args)}
        else:
            extra = {}
        lines.append(
            {
                "phase": phase,
                "kind": COMMAND,
                "name": task_name,
                "output": values["output"],
                "argv": argv,
                "done": str(Path(marker).expanduser().resolve()),
                "distributed": bool(distributed),
                "stage": int(stage),
                **extra,
            }
        )
    names = [line["name"] for line in lines]
    if len(set(names)) != len(names):
        raise ValueError("Two tasks have the same name: put every grid key in --name.")
    return lines


def model_num_layers(model: str) -> int:
    """Number of transformer layers of ``model`` (read from its config; no weights are loaded)."""
    from pressroom.evaluation import models as models_mod

    if model in models_mod.TINY_MODELS:
        return int(models_mod.tiny_config(model).num_hidden_layers)
    from transformers import AutoConfig

    path = models_mod._smollm2_local_dir() if model == models_mod.SMOLLM2 else model
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"Cannot read the config of {model!r} to count its layers; pass --layers.") from err
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


# --------------------------------------------------------------------------------------------------- manifest files


def write_manifest(lines: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Number the lines (``index`` 0..N-1, the array task ids) and write them atomically as JSON lines."""
    rows = []
    for i, line in enumerate(lines):
        rows.append(json.dumps({"index": i, **{k: v for k, v in line.items() if k != "index"}}, sort_keys=False))
    if not rows:
        raise ValueError("Nothing to write: the manifest would be empty.")
    return atomic_write_text(path, "\n".join(rows) + "\n")


def _check_line(line: Any, number: int, path: Path) -> dict[str, Any]:
    where = f"{path}, line {number}"
    if not isinstance(line, dict):
        raise ValueError(f"{where}: a manifest line must be a JSON object.")
    if line.get("index") != number - 1:
        raise ValueError(f"{where}: index {line.get('index')!r} should be {number - 1}; re-write it with plan.")
    kind = line.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}.")
    needed = ("output", "eval") if kind == EVAL else ("output", "argv", "done")
    missing = [k for k in needed if k not in line]
    if missing:
        raise ValueError(f"{where}: missing {missing}.")
    if kind == COMMAND and (not isinstance(line["argv"], list) or not line["argv"]):
        raise ValueError(f"{where}: argv must be a non-empty list of strings.")
    if not isinstance(line.get("stage", 0), int) or line.get("stage", 0) < 0:
        raise ValueError(f"{where}: stage must be a non-negative integer.")
    return line


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a manifest; raise ``ValueError`` naming the line that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {str(path)!r} does not exist; write one with `pressroom-eval plan`.")
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg}).") from err
        lines.append(_check_line(obj, len(lines) + 1, path))
    if not lines:
        raise ValueError(f"Manifest {path} is empty.")
    return lines


def eval_config(task: dict[str, Any]):
    """The :class:`~pressroom.evaluation.run.EvalConfig` of an evaluation line (checked against its output)."""
    from pressroom.evaluation.run import EvalConfig

    cfg = EvalConfig(**task["eval"])
    if str(cfg.results_dir()) != task["output"]:
        raise ValueError(
            f"Task {task['index']}: its output {task['output']} is not its configuration's results directory "
            f"{cfg.results_dir()}; the manifest was edited by hand: write it again with `pressroom-eval plan`."
        )
    return cfg


def task_done(task: dict[str, Any]) -> bool:
    """Whether a task's results exist (a complete results directory, or the command's done marker)."""
    if task["kind"] == EVAL:  # run.is_complete without importing torch, so that a done task exits at once
        return all((Path(task["output"]) / name).is_file() for name in EVAL_RESULT_FILES)
    return Path(task["done"]).is_file()


def pending_indices(tasks: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the tasks that are not done."""
    return [t["index"] for t in tasks if not task_done(t)]


def array_spec(indices: Iterable[int]) -> str:
    """Slurm ``--array`` list of ``indices``, runs compressed: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    for _, group in itertools.groupby(enumerate(ordered), key=lambda p: p[1] - p[0]):
        run = [v for _, v in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


# --------------------------------------------------------------------------------------------------- running


def resolve_index(index: int | None, n_tasks: int) -> int:
    """The task index: ``index`` if given, else ``$SLURM_ARRAY_TASK_ID``; checked against the manifest."""
    if index is None:
        raw = os.environ.get(ARRAY_INDEX_ENV)
        if raw is None:
            raise ValueError(f"Give --index N (or run inside a Slurm array job, which sets ${ARRAY_INDEX_ENV}).")
        if not raw.strip().isdigit():
            raise ValueError(f"${ARRAY_INDEX_ENV}={raw!r} is not a task index.")
        index = int(raw)
    if not 0 <= index < n_tasks:
        raise ValueError(f"Task index {index} is out of range: the manifest has tasks 0..{n_tasks - 1}.")
    return index


def _slurm_ids() -> dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _run_command(task: dict[str, Any]) -> int:
    argv = list(task["argv"])
    launcher = os.environ.get(LAUNCHER_ENV, "").strip()
    if task.get("resume_if") and glob.glob(task["resume_if"]):
        argv += list(task.get("resume_args", []))
    if task.get("distributed") and launcher:
        argv = shlex.split(launcher) + argv
    Path(task["output"]).mkdir(parents=True, exist_ok=True)
    logger.info("Task %s: %s", task["index"], shlex.join(argv))
    started = time.time()
    child = subprocess.Popen(argv)

    def forward(signum: int, frame: Any) -> None:  # checkpoint signals (USR1) and cancellation reach the command
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc < 0:  # killed by a signal: report it as a shell does
        rc = 128 - rc
    if rc == 0:
        atomic_write_json(
            task["done"],
            {
                "task": task["name"],
                "argv": argv,
                "seconds": round(time.time() - started, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(),
                **_slurm_ids(),
            },
        )
    return rc


def run_task(manifest: str | Path, index: int | None = None, runner: Any = None) -> int:
    """Run one manifest line; return its exit status (0 at once when its results already exist).

    Parameters
    ----------
    manifest : str or Path
        The manifest file.
    index : int, optional
        The line's index (default ``$SLURM_ARRAY_TASK_ID``).
    runner : Runner, optional
        An evaluation :class:`~pressroom.evaluation.run.Runner` to reuse (a new one by default).
    """
    tasks = read_manifest(manifest)
    task = tasks[resolve_index(index, len(tasks))]
    if task_done(task):
        print(f"task {task['index']} ({task['name']}): already done, nothing to run ({task['output']})")
        return 0
    print(f"task {task['index']} ({task['name']}): running on {socket.gethostname()} {_slurm_ids()}", flush=True)
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay > 0:
        print(f"task {task['index']}: sleeping {delay:g} s first (${SLEEP_ENV})", flush=True)
        time.sleep(delay)
    started = time.perf_counter()
    if task["kind"] == COMMAND:
        rc = _run_command(task)
    else:
        from pressroom.evaluation.run import Runner

        cfg = eval_config(task)

        def stop(signum: int, frame: Any) -> None:  # unwind, so the atomic write removes its temporary directory
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            (runner or Runner(progress=False)).run(cfg)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        rc = 0
    state = "done" if rc == 0 else f"failed (exit status {rc})"
    seconds = time.perf_counter() - started
    print(f"task {task['index']} ({task['name']}): {state} in {seconds:.1f} s -> {task['output']}")
    return rc


def status(manifest: str | Path) -> dict[str, Any]:
    """Done and pending tasks of a manifest: ``{"total", "done", "pending": [indices], "array", "phases", "kinds"}``."""
    tasks = read_manifest(manifest)
    pending = pending_indices(tasks)
    return {
        "total": len(tasks),
        "done": len(tasks) - len(pending),
        "pending": pending,
        "array": array_spec(pending),
        "phases": sorted({t.get("phase", "") for t in tasks}),
        "kinds": sorted({t["kind"] for t in tasks}),
        "stages": {
            str(stage): array_spec(i for i in pending if tasks[i].get("stage", 0) == stage)
            for stage in sorted({tasks[i].get("stage", 0) for i in pending})
        },
    }


def aggregate(
    manifests: str | Path | Sequence[str | Path], output_dir: str | Path | None = None, allow_missing: bool = True
):
    """The comparison table and plots (:func:`pressroom.evaluation.compare.compare`) over manifests' runs.

    Several manifests (e.g. phase 1's baselines and phase 3's trained presses) give one table. Writes
    ``comparison.csv`` and ``scores.png`` into ``output_dir`` (default: the first manifest's directory).
    Evaluation tasks that are not done are listed on stderr; with ``allow_missing=False`` they are an error.
    Returns ``(table, {manifest: missing indices})``.
    """
    from pressroom.evaluation.compare import compare

    paths = [Path(manifests)] if isinstance(manifests, (str, Path)) else [Path(m) for m in manifests]
    if not paths:
        raise ValueError("Give at least one manifest to aggregate.")
    done: list[str] = []
    missing: dict[str, list[int]] = {}
    n_evals = 0
    for path in paths:
        evals = [t for t in read_manifest(path) if t["kind"] == EVAL]
        n_evals += len(evals)
        done += [t["output"] for t in evals if task_done(t)]
        absent = [t["index"] for t in evals if not task_done(t)]
        if absent:
            missing[str(path)] = absent
            print(f"aggregate: {path}: tasks {array_spec(absent)} have no results yet", file=sys.stderr)
    if not n_evals:
        raise ValueError(f"{', '.join(map(str, paths))}: no evaluation tasks to aggregate.")
    if missing and not allow_missing:
        raise ValueError(f"Some tasks have no results ({missing}); run them first (slurm/submit.sh MANIFEST).")
    if not done:
        raise ValueError("No evaluation task has results yet.")
    out = Path(output_dir) if output_dir is not None else paths[0].resolve().parent
    table = compare(done, output_dir=out)
    print(f"aggregate: {len(done)} runs -> {out / 'comparison.csv'}")
    return table, missing
