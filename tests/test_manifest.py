"""Task manifests without Slurm: planning grids, idempotent run-task, command units, --array lists, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from pressroom.evaluation import manifest as mf
from pressroom.evaluation.cli import main as eval_main
from pressroom.evaluation.run import RESULT_FILES, EvalConfig, Runner

SMALL = ["--model", "tiny-llama", "--data-dir", "256", "--tasks", "niah_single", "--n-samples", "1"]
SMALL += ["--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def runner():
    return Runner(progress=False)


def test_eval_result_files_match_the_runner():
    assert mf.EVAL_RESULT_FILES == RESULT_FILES


def test_plan_eval_grid(tmp_path):
    lines = mf.plan_eval(
        models=["tiny-llama", "tiny-qwen3"],
        presses=["knorm", "snapkv"],
        ratios=[0.25, 0.5],
        data_dirs=["256", "512"],
        output_dir=tmp_path,
        tasks=["niah_single"],
        n_samples=1,
    )
    # per model and length: the baseline once + 2 presses x 2 ratios
    assert len(lines) == 2 * 2 * (1 + 4)
    names = [line["name"] for line in lines]
    assert len(set(names)) == len(names) and "synthetic__512__tiny-qwen3__snapkv__0.25" in names
    for line in lines:
        cfg = EvalConfig(**line["eval"])
        assert str(cfg.results_dir()) == line["output"] and line["kind"] == "eval"
    path = mf.write_manifest(lines, tmp_path / "m.jsonl")
    assert [t["index"] for t in mf.read_manifest(path)] == list(range(len(lines)))
    with pytest.raises(ValueError, match="Unknown evaluation setting"):
        mf.plan_eval(["tiny-llama"], ["knorm"], [0.5], ["256"], tmp_path, n_sample=1)


def test_array_spec_and_grid():
    assert mf.array_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert mf.array_spec([3]) == "3" and mf.array_spec([]) == ""
    assert mf.parse_grid(["layer=0-3", "bits=1,2"]) == {"layer": ["0", "1", "2", "3"], "bits": ["1", "2"]}
    with pytest.raises(ValueError, match="key=v1,v2"):
        mf.parse_grid(["layer"])
    with pytest.raises(ValueError, match="before the start"):
        mf.parse_grid(["layer=5-2"])


def test_run_task_is_idempotent_and_aggregates(tmp_path, runner, capsys):
    manifest = tmp_path / "m.jsonl"
    args = ["plan", str(manifest), *SMALL, "--press", "knorm", "--ratio", "0.5", "--output-dir", str(tmp_path / "r")]
    assert eval_main(args) == 0
    tasks = mf.read_manifest(manifest)
    assert len(tasks) == 2 and mf.status(manifest)["array"] == "0-1"
    assert mf.run_task(manifest, 1, runner=runner) == 0
    assert mf.task_done(tasks[1]) and not mf.task_done(tasks[0])
    assert mf.status(manifest)["array"] == "0"
    capsys.readouterr()
    assert eval_main(["status", str(manifest), "--format", "array"]) == 0
    assert capsys.readouterr().out.strip() == "0"
    before = (tmp_path / "r" / tasks[1]["name"] / "predictions.csv").stat().st_mtime_ns
    assert mf.run_task(manifest, 1, runner=runner) == 0  # done: returns at once
    assert "already done" in capsys.readouterr().out
    assert (tmp_path / "r" / tasks[1]["name"] / "predictions.csv").stat().st_mtime_ns == before
    # aggregation over what exists, the missing task reported (or refused with --strict)
    assert eval_main(["aggregate", str(manifest), "--strict"]) == 2
    assert "have no results yet" in capsys.readouterr().err
    assert eval_main(["aggregate", str(manifest)]) == 0
    assert list(pd.read_csv(tmp_path / "comparison.csv")["press"]) == ["knorm"]
    assert mf.run_task(manifest, 0, runner=runner) == 0
    assert eval_main(["aggregate", str(manifest)]) == 0
    assert sorted(pd.read_csv(tmp_path / "comparison.csv")["press"]) == ["knorm", "no_press"]
    assert mf.status(manifest)["array"] == ""


def test_run_task_index_from_slurm(tmp_path, runner, monkeypatch):
    manifest = tmp_path / "m.jsonl"
    args = ["plan", str(manifest), *SMALL, "--press", "knorm", "--ratio", "0.5", "--output-dir", str(tmp_path)]
    assert eval_main(args + ["--no-baseline"]) == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert mf.run_task(manifest, runner=runner) == 0
    assert mf.task_done(mf.read_manifest(manifest)[0])


def test_command_units(tmp_path, capsys):
    script = tmp_path / "unit.py"
    script.write_text("import sys, pathlib; pathlib.Path(sys.argv[1], f'layer{sys.argv[2]}.txt').write_text('ok')\n")
    lines = mf.plan_command(
        f"{sys.executable} {script} {{output}} {{layer}}",
        mf.parse_grid(["bits=2", "layer=0-2"]),
        tmp_path,
        task_output="{output_dir}/codebooks/bits{bits}",
        name="unit-b{bits}-l{layer}",
        phase="phase2_commvq",
    )
    assert [line["name"] for line in lines] == ["unit-b2-l0", "unit-b2-l1", "unit-b2-l2"]
    assert lines[2]["argv"][-2:] == [str(tmp_path / "codebooks" / "bits2"), "2"]
    manifest = mf.write_manifest(lines, tmp_path / "m.jsonl")
    assert mf.run_task(manifest, 2) == 0
    assert (tmp_path / "codebooks" / "bits2" / "layer2.txt").read_text() == "ok"
    marker = json.loads((tmp_path / "codebooks" / "bits2" / ".done" / "unit-b2-l2.json").read_text())
    assert marker["task"] == "unit-b2-l2" and marker["argv"] == lines[2]["argv"]
    assert mf.status(manifest)["array"] == "0-1"
    # a failing command writes no marker, so it runs again next time
    failing = mf.plan_command([sys.executable, "-c", "raise SystemExit(5)"], {}, tmp_path / "f", phase="x")
    fm = mf.write_manifest(failing, tmp_path / "f.jsonl")
    assert mf.run_task(fm, 0) == 5 and mf.status(fm)["array"] == "0"
    with pytest.raises(ValueError, match="neither a grid key"):
        mf.plan_command("train --layer {layr}", {"layer": ["0"]}, tmp_path)
    with pytest.raises(ValueError, match="same name"):
        mf.plan_command("train {layer}", {"layer": ["0", "1"]}, tmp_path, name="same")


def test_phase_presets(tmp_path, capsys):
    m = tmp_path / "commvq.jsonl"
    args = ["plan", str(m), "--phase", "phase2_commvq", "--model", "tiny-llama", "--bits", "1", "2"]
    assert eval_main([*args, "--output-dir", str(tmp_path), "--args", "--method e2e"]) == 0
    tasks = mf.read_manifest(m)
    # collect train/heldout; scales + keys per (bits, layer) of the tiny model's 2 layers; values per (bits, layer);
    # assembly per bits; held-out evaluation per bits
    steps = [(t["stage"], t["argv"][2]) for t in tasks]
    assert (
        steps
        == [(0, "collect")] * 2
        + [(1, "scale")]
        + [(1, "keys")] * 4
        + [(2, "values")] * 4
        + [(3, "convert")] * 2
        + [(4, "eval")] * 2
    )
    keys = [t for t in tasks if t["argv"][2] == "keys"]
    out = str(tmp_path / "tiny-llama")
    assert keys[3]["argv"] == [
        "pressroom-train", "commvq", "keys", "--model", "tiny-llama", "--output", out, "--bits", "2", "--layer", "1",
        "--method", "e2e",
    ]  # fmt: skip
    assert mf.status(m)["stages"] == {"0": "0-1", "1": "2-6", "2": "7-10", "3": "11-12", "4": "13-14"}
    m = tmp_path / "eit.jsonl"
    assert eval_main(["plan", str(m), "--phase", "phase2_eit", "--model", "tiny-llama", "--args", "--max-steps 5"]) == 0
    (task,) = mf.read_manifest(m)
    assert task["distributed"] and task["argv"][:3] == ["pressroom-train", "eit", "train"]
    assert task["argv"][-2:] == ["--max-steps", "5"] and task["resume_args"] == ["--resume"]
    assert task["resume_if"].endswith("tiny-llama/checkpoint-*/trainer_state.pt")
    capsys.readouterr()
    assert eval_main(["plan", str(tmp_path / "p3.jsonl"), "--phase", "phase3_eval_trained"]) == 2
    assert "give --trained-dir" in capsys.readouterr().err
    args = ["plan", str(tmp_path / "p3.jsonl"), "--phase", "phase3_eval_trained", "--model", "tiny-llama"]
    args += ["--trained-dir", str(tmp_path), "--ratio", "0.5", "--bits", "2", "--output-dir", str(tmp_path / "p3")]
    assert eval_main(args) == 0
    specs = [(t["eval"]["press_name"], t["eval"]["compression_ratio"]) for t in mf.read_manifest(tmp_path / "p3.jsonl")]
    assert specs == [
        ("no_press", 0.0),
        (f"anchor:adapter={tmp_path}/phase2_eit/tiny-llama/final", 0.5),
        (f"commvq:codebooks={tmp_path}/phase2_commvq/tiny-llama/2bit/em,bits=2", 0.0),
    ]


def test_resume_args_when_a_checkpoint_exists(tmp_path):
    script = "import sys, pathlib; pathlib.Path(sys.argv[1], 'argv.txt').write_text(' '.join(sys.argv[2:]))"
    lines = mf.plan_command(
        [sys.executable, "-c", script, "{output}", "--steps", "3"],
        {},
        tmp_path,
        resume_if="{output}/checkpoint-*/state.pt",
        resume_args=["--resume"],
    )
    manifest = mf.write_manifest(lines, tmp_path / "m.jsonl")
    assert mf.run_task(manifest, 0) == 0
    assert (tmp_path / "argv.txt").read_text() == "--steps 3"  # no checkpoint: a fresh start
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "state.pt").write_bytes(b"")
    Path(lines[0]["done"]).unlink()
    assert mf.run_task(manifest, 0) == 0
    assert (tmp_path / "argv.txt").read_text() == "--steps 3 --resume"


def test_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert eval_main(["run-task", str(tmp_path / "missing.jsonl"), "--index", "0"]) == 2
    assert "write one with `pressroom-eval plan`" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "kind": "eval", "output": "x", "eval": {}}\n{"index": 5}\n')
    assert eval_main(["run-task", str(bad), "--index", "0"]) == 2
    assert "line 2: index 5 should be 1" in capsys.readouterr().err
    manifest = tmp_path / "m.jsonl"
    args = ["plan", str(manifest), *SMALL, "--no-baseline", "--press", "knorm", "--ratio", "0.5"]
    assert eval_main([*args, "--output-dir", str(tmp_path)]) == 0
    assert eval_main(["run-task", str(manifest), "--index", "3"]) == 2
    assert "out of range: the manifest has tasks 0..0" in capsys.readouterr().err
    assert eval_main(["run-task", str(manifest)]) == 2
    assert "Give --index N" in capsys.readouterr().err
