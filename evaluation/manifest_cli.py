"""``pressroom-eval plan | run-task | status | aggregate``: the study as a task manifest (one Slurm array task a line).

``plan`` writes the manifest for a phase of the study (or any evaluation grid, or any command over a grid);
``run-task`` runs one line (``$SLURM_ARRAY_TASK_ID`` by default); ``status`` lists what is done and prints the
unfinished tasks as an ``--array`` list; ``aggregate`` builds the comparison table and plots. See
:mod:`pressroom.evaluation.manifest` and ``slurm/README.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from pressroom.evaluation import manifest as mf

# Phase presets of the study: the training commands each phase runs (pressroom-train's subcommands), by stage.
COMMVQ = "pressroom-train commvq {step} --model {model} --output {output}"
PHASE_COMMANDS: dict[str, dict[str, Any]] = {
    "phase0_analyze": {"command": "pressroom-train eit analyze --model {model} --output {output}"},
    "phase2_commvq": {"command": COMMVQ},
    "phase2_eit": {
        "command": "pressroom-train eit train --model {model} --output {output}",
        "distributed": True,
        "resume_if": "{output}/checkpoint-*/trainer_state.pt",  # a requeued run resumes from its checkpoint
        "resume_args": ["--resume"],
    },
}
PHASE1_RATIOS = [0.25, 0.5, 0.75]
PHASE1_LENGTHS = ["4096"]


def _layers(model: str, spec: str | None) -> list[str]:
    if spec:
        return mf.parse_grid([f"layer={spec}"])["layer"]
    return [str(i) for i in range(mf.model_num_layers(model))]


def _plan_commvq(args: argparse.Namespace, model: str, label: str, extra: str) -> list[dict[str, Any]]:
    """CommVQ codebooks for one model, in stages: KV collection; scales and one key-codebook task per
    (bits, layer); one value-codec task per (bits, layer); assembly of the codebooks; held-out evaluation."""
    bits = [str(b) for b in args.bits]
    layers = _layers(model, args.layers)
    common = dict(output_dir=args.output_dir, task_output=f"{{output_dir}}/{label}", phase=args.phase)
    steps = [  # (stage, step, extra command arguments, grid)
        (0, "collect", " --split {split}", {"split": ["train", "heldout"]}),
        (1, "scale", "", {}),
        (1, "keys", " --bits {bits} --layer {layer}", {"bits": bits, "layer": layers}),
        (2, "values", " --bits {bits} --layer {layer}", {"bits": bits, "layer": layers}),
        (3, "convert", " --bits {bits}", {"bits": bits}),
        (4, "eval", " --bits {bits}", {"bits": bits}),
    ]
    lines: list[dict[str, Any]] = []
    for stage, step, step_args, grid in steps:
        name = "-".join([f"commvq-{label}-{step}", *(f"{k}{{{k}}}" for k in grid)])
        command = COMMVQ.replace("{step}", step) + step_args + extra
        lines += mf.plan_command(command, {"model": [model], **grid}, name=name, stage=stage, **common)
    return lines


def _plan_phase_commands(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pressroom.evaluation.models import model_label

    preset = PHASE_COMMANDS[args.phase]
    extra = f" {args.args}" if args.args else ""
    lines: list[dict[str, Any]] = []
    for model in args.model:
        label = model_label(model)
        if args.phase == "phase2_commvq":
            lines += _plan_commvq(args, model, label, extra)
            continue
        lines += mf.plan_command(
            preset["command"] + extra,
            {"model": [model]},
            args.output_dir,
            task_output=f"{{output_dir}}/{label}",
            name=f"{args.phase}-{label}",
            phase=args.phase,
            distributed=preset.get("distributed", False),
            resume_if=preset.get("resume_if"),
            resume_args=preset.get("resume_args", ()),
        )
    return lines


def _plan_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pressroom.evaluation.cli import default_presses

    presses = args.press
    if presses is None and args.phase == "phase3_eval_trained":
        return _plan_phase3_defaults(args)
    if presses is None:
        presses = default_presses()
    return _eval_lines(args, args.model, presses, args.ratio, baseline=not args.no_baseline)


def _plan_phase3_defaults(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What phase 2 trained, per model: AnchorPress with the EIT adapter at the ratios (beside the baseline) and
    CommVQPress with the codebooks of each bit width, found under --trained-dir as submit_all.sh lays them out."""
    from pressroom.evaluation.models import model_label

    if args.trained_dir is None:
        raise ValueError(
            "phase3_eval_trained evaluates what phase 2 trained: give --trained-dir (the study directory holding "
            "phase2_commvq/ and phase2_eit/) or --press specs that load it."
        )
    root = Path(args.trained_dir).expanduser().resolve()
    lines: list[dict[str, Any]] = []
    for model in args.model:
        label = model_label(model)
        anchor = [f"anchor:adapter={root / 'phase2_eit' / label / 'final'}"]
        lines += _eval_lines(args, [model], anchor, args.ratio, baseline=not args.no_baseline)
        commvq = [
            f"commvq:codebooks={root / 'phase2_commvq' / label / f'{b}bit' / args.commvq_method},bits={b}"
            for b in args.bits
        ]
        lines += _eval_lines(args, [model], commvq, [0.0], baseline=False)
    return lines


def _eval_lines(
    args: argparse.Namespace, models: list[str], presses: list[str], ratios: list[float] | None, baseline: bool
) -> list[dict[str, Any]]:
    config = {
        "tasks": args.tasks,
        "n_samples": args.n_samples,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "max_context_length": args.max_context_length,
        "fraction": args.fraction,
        "query_aware": args.query_aware,
        "dtype": args.dtype,
    }
    return mf.plan_eval(
        models=models,
        presses=presses,
        ratios=ratios if ratios is not None else PHASE1_RATIOS,
        data_dirs=args.data_dir if args.data_dir is not None else PHASE1_LENGTHS,
        output_dir=args.output_dir,
        dataset=args.dataset,
        baseline=baseline,
        phase=args.phase,
        **config,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    if args.command_template is not None:
        lines = mf.plan_command(
            args.command_template,
            mf.parse_grid(args.grid or []),
            args.output_dir,
            task_output=args.task_output,
            name=args.name,
            done=args.done,
            phase=args.phase,
            distributed=args.distributed,
            stage=args.stage,
            resume_if=args.resume_if,
            resume_args=shlex.split(args.resume_args),
        )
    elif args.phase in PHASE_COMMANDS:
        lines = _plan_phase_commands(args)
    else:
        lines = _plan_eval(args)
    path = mf.write_manifest(lines, args.manifest)
    pending = mf.pending_indices(mf.read_manifest(path))
    print(f"{path}: {len(lines)} tasks ({args.phase}), {len(pending)} not done yet")
    return 0


def cmd_run_task(args: argparse.Namespace) -> int:
    return mf.run_task(args.manifest, args.index)


def cmd_status(args: argparse.Namespace) -> int:
    info = mf.status(args.manifest)
    if args.format == "array":
        if info["array"]:
            print(info["array"])
    elif args.format == "phase":
        if len(info["phases"]) != 1:
            raise ValueError(f"{args.manifest} mixes phases {info['phases']}; give slurm/submit.sh --script.")
        print(info["phases"][0])
    elif args.format == "stages":
        for stage, spec in info["stages"].items():
            print(stage, spec)
    elif args.format == "kinds":
        print(" ".join(info["kinds"]))
    elif args.format == "json":
        print(json.dumps(info))
    else:
        print(f"{args.manifest}: {info['done']} of {info['total']} tasks done; pending: {info['array'] or 'none'}")
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    mf.aggregate(args.manifest, args.output_dir, allow_missing=not args.strict)
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``plan``, ``run-task``, ``status`` and ``aggregate`` to ``pressroom-eval``'s subcommands."""
    p = sub.add_parser(
        "plan",
        help="write a task manifest (one line per run/training unit) for a phase of the study",
        description="Write MANIFEST (JSON lines) for a phase: evaluation grids (phase1_baseline, "
        "phase3_eval_trained) or training units (phase0_analyze, phase2_commvq: one task per layer, phase2_eit), "
        "or any --command over a --grid.",
    )
    p.add_argument("manifest", help="the manifest file to write (e.g. results/phase1/manifest.jsonl)")
    p.add_argument("--phase", default="phase1_baseline", help=f"{', '.join(mf.PHASES)}, or a name of your own")
    p.add_argument("--output-dir", default="./results", help="where the tasks' results go")
    p.add_argument("--model", nargs="+", default=["smollm2"], help="models (smollm2, tiny-*, Hub ids, directories)")
    g = p.add_argument_group("evaluation grid (phase1_baseline, phase3_eval_trained)")
    g.add_argument("--press", nargs="+", default=None, help="press specs (default: the main job's press set)")
    g.add_argument("--ratio", nargs="+", type=float, default=None, help=f"ratios (default {PHASE1_RATIOS})")
    g.add_argument("--dataset", default="synthetic")
    g.add_argument("--data-dir", nargs="+", default=None, help=f"lengths / data_dirs ({PHASE1_LENGTHS})")
    g.add_argument("--tasks", nargs="+", default=None, help="synthetic tasks (default: all)")
    g.add_argument("--n-samples", type=int, default=5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--max-context-length", type=int, default=None)
    g.add_argument("--fraction", type=float, default=1.0)
    g.add_argument("--query-aware", action="store_true", help="kvpress's query_aware: compress context + question")
    g.add_argument("--dtype", default=None)
    g.add_argument("--no-baseline", action="store_true", help="no no_press run")
    g.add_argument("--trained-dir", default=None, help="phase3 without --press: the study directory with phase2_*/")
    g.add_argument("--commvq-method", default="em", help="phase3 without --press: which codebooks (em or e2e)")
    t = p.add_argument_group("training units (phase0_analyze, phase2_commvq, phase2_eit)")
    t.add_argument("--bits", nargs="+", type=int, default=[1, 2], help="phase2_commvq: codebook bits")
    t.add_argument("--layers", default=None, help="phase2_commvq: layers, e.g. 0-29 or 0,5,7 (default: all)")
    t.add_argument("--args", default="", help="extra arguments appended to the phase's training command")
    c = p.add_argument_group("any command over a grid")
    c.add_argument(
        "--command",
        dest="command_template",
        default=None,
        help="a command template, e.g. 'pressroom-train commvq keys --model {model} --layer {layer} --output {output}'",
    )
    c.add_argument("--grid", nargs="+", default=None, help="key=v1,v2 or key=0-29 items")
    c.add_argument("--task-output", default="{output_dir}", help="template of each task's output directory")
    c.add_argument("--name", default=None, help="template of each task's name (default: phase-values)")
    c.add_argument("--done", default=None, help="template of the done marker (default {output}/.done/NAME.json)")
    c.add_argument("--distributed", action="store_true", help="prefix $PRESSROOM_LAUNCHER (torchrun) when set")
    c.add_argument("--stage", type=int, default=0, help="stage (submit.sh runs stage k+1 after stage k succeeded)")
    c.add_argument("--resume-if", default=None, help="glob template: when it matches, --resume-args are added")
    c.add_argument("--resume-args", default="", help="arguments added when --resume-if matches (e.g. --resume)")
    p.set_defaults(func=cmd_plan)

    r = sub.add_parser("run-task", help="run one manifest line ($SLURM_ARRAY_TASK_ID); done tasks exit 0 at once")
    r.add_argument("manifest")
    r.add_argument("--index", type=int, default=None, help="the line's index (default: $SLURM_ARRAY_TASK_ID)")
    r.set_defaults(func=cmd_run_task)

    s = sub.add_parser("status", help="done / pending tasks of a manifest (--format array: the pending --array list)")
    s.add_argument("manifest")
    s.add_argument("--format", choices=["text", "array", "stages", "phase", "kinds", "json"], default="text")
    s.set_defaults(func=cmd_status)

    a = sub.add_parser("aggregate", help="one comparison table (comparison.csv) and plots over manifests' results")
    a.add_argument("manifest", nargs="+", help="one or more manifests (e.g. phase 1's and phase 3's)")
    a.add_argument("--output-dir", default=None, help="default: the first manifest's directory")
    a.add_argument("--strict", action="store_true", help="fail if an evaluation task has no results")
    a.set_defaults(func=cmd_aggregate)
