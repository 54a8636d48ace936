"""The command lines: pressroom-eval's subcommands end to end on a tiny model, and clear errors."""

from __future__ import annotations

import json

from pressroom.evaluation.cli import default_presses
from pressroom.evaluation.cli import main as eval_main
from pressroom.training.cli import main as train_main


def test_run_and_compare(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["run", "--model", "tiny-qwen3", "--press", "knorm", "--ratio", "0.5", "--data-dir", "512"]
    args += ["--tasks", "niah_single", "--n-samples", "1", "--max-new-tokens", "3", "--output-dir", str(out)]
    assert eval_main(args) == 0
    table = capsys.readouterr().out
    assert "| no_press" in table and "| knorm" in table
    assert (out / "comparison.csv").is_file() and (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert eval_main(["compare", str(out), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.csv").is_file()


def test_tasks_subcommand(tmp_path, capsys):
    path = tmp_path / "tasks.jsonl"
    assert eval_main(["tasks", str(path), "--tasks", "passkey", "--length", "600", "--n-samples", "2"]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and {r["task"] for r in rows} == {"passkey"}


def test_errors_are_clear(tmp_path, capsys):
    assert eval_main(["run", "--model", "tiny-llama", "--press", "nosuchpress", "--output-dir", str(tmp_path)]) == 2
    assert "Unknown press 'nosuchpress'" in capsys.readouterr().err
    assert eval_main(["ppl", "--press", "snapkv", "--ratio", "1.5", "--output-dir", str(tmp_path)]) == 2
    assert "compression_ratio must be in [0, 1)" in capsys.readouterr().err
    assert eval_main(["compare", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_default_press_set():
    assert default_presses()[:3] == ["streaming_llm", "snapkv", "knorm"]


def test_train_cli_lists_only_what_exists(capsys):
    assert train_main([]) == 0
    assert "pressroom-train" in capsys.readouterr().out
