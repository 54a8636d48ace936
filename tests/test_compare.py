"""Comparison of result directories: rows, summary, markdown, CSV, plots, errors."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pressroom.evaluation.compare import (
    compare,
    load_perplexity_results,
    load_results,
    plot_perplexity,
    plot_scores,
    summary_table,
    to_markdown,
)
from pressroom.evaluation.perplexity import PerplexityResult, write_perplexity_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "smollm2"


def _write_run(
    root: Path,
    press: str,
    ratio: float,
    metrics: dict,
    stats: dict | None,
    dataset: str = "synthetic",
    data_dir: str | None = "2048",
) -> Path:
    """A run directory as the runner writes it (kvpress's layout plus our stats.json)."""
    name = "__".join(filter(None, [dataset, data_dir or "", MODEL, press, f"{ratio:.2f}"]))
    run = root / name
    run.mkdir(parents=True)
    config = {
        "dataset": dataset,
        "data_dir": data_dir,
        "model": MODEL,
        "press_name": press,
        "compression_ratio": ratio,
        "tasks": None,
        "n_samples": 2,
        "seed": 0,
        "press_init_command": f"{press}()",
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=4))
    rows = [{"task": t, "question": "q", "answer": ["a"], "predicted_answer": "a"} for t in metrics]
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    if stats is not None:
        (run / "stats.json").write_text(json.dumps(stats, indent=2))
    return run


def _stats(kv_bytes: int, prefill: float) -> dict:
    return {
        "kv_bytes": kv_bytes,
        "kv_bytes_full": 1_000_000,
        "prefill_seconds": prefill,
        "decode_seconds_per_token": 0.02,
        "decode_tokens": 40,
        "peak_gpu_memory_bytes": None,
        "context_tokens": 2048.0,
        "n_contexts": 2,
        "device": "cpu",
    }


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    _write_run(
        root,
        "no_press",
        0.0,
        {"niah_single": {"string_match": 100.0}, "qa_essay": {"string_match": 50.0}},
        _stats(1_000_000, 0.5),
    )
    _write_run(
        root,
        "knorm",
        0.5,
        {"niah_single": {"string_match": 50.0}, "qa_essay": {"string_match": 25.0}},
        _stats(500_000, 0.4),
    )
    return root


def test_load_results_rows(results):
    df = load_results([results])
    expected = [
        "model",
        "press",
        "compression_ratio",
        "dataset",
        "data_dir",
        "task",
        "score",
        "kv_bytes",
        "prefill_seconds",
        "decode_seconds_per_token",
        "peak_gpu_memory_bytes",
        "path",
    ]
    assert list(df.columns[: len(expected)]) == expected
    assert len(df) == 4
    knorm = df[(df["press"] == "knorm") & (df["task"] == "qa_essay")].iloc[0]
    assert knorm["score"] == 25.0 and knorm["compression_ratio"] == 0.5 and knorm["kv_bytes"] == 500_000
    assert knorm["model"] == MODEL and knorm["dataset"] == "synthetic" and knorm["data_dir"] == "2048"
    assert pd.isna(knorm["peak_gpu_memory_bytes"]) and knorm["decode_seconds_per_token"] == 0.02
    assert Path(knorm["path"]).name == "synthetic__2048__smollm2__knorm__0.50"
    # a run directory itself is a valid path too (the CLI passes the run directories it made)
    assert len(load_results([Path(knorm["path"])])) == 2


def test_summary_table_and_markdown(results, monkeypatch):
    table = summary_table(load_results([results]))
    assert list(table["press"]) == ["no_press", "knorm"]
    assert list(table["average"]) == [75.0, 37.5]
    assert list(table["niah_single"]) == [100.0, 50.0]
    assert list(table["kv_bytes"]) == [1_000_000, 500_000]
    assert {"qa_essay", "prefill_seconds", "decode_seconds_per_token", "n_runs"} <= set(table.columns)

    monkeypatch.setitem(sys.modules, "tabulate", None)  # any import of tabulate would now fail
    markdown = to_markdown(table)
    lines = markdown.strip().split("\n")
    assert len(lines) == 2 + len(table)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({line.count("|") for line in lines}) == 1
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "dataset", "data_dir", "press", "compression_ratio"] and "average" in header
    assert set(lines[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    knorm = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert knorm[3:5] == ["knorm", "0.50"] and "37.5" in knorm and "500000" in knorm
    assert "a \\| b" in to_markdown(pd.DataFrame({"x": ["a | b"]}))


def test_compare_writes_csv_and_plots(results, tmp_path, capsys):
    result = PerplexityResult(
        perplexity=20.0,
        nll=[3.0] * 500,
        tokens=500,
        runtime_seconds=1.0,
        tokens_per_second=500.0,
        kv_bytes=10,
        kv_bytes_max=12,
        mode="streaming",
    )
    write_perplexity_json(result, results / "ppl" / "a.json", model=MODEL, press_name="no_press", compression_ratio=0.0)
    write_perplexity_json(
        result, results / "ppl" / "b.json", model=MODEL, press_name="streaming_llm", compression_ratio=0.5
    )
    out = tmp_path / "report"
    table = compare([results], output_dir=out)
    assert len(table) == 2
    printed = capsys.readouterr().out
    assert "| no_press" in printed and "average" in printed and "streaming_llm" in printed
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv["press"]) == ["no_press", "knorm"] and list(csv["average"]) == [75.0, 37.5]
    for png in ("scores.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # default output directory: the first path
    compare([results])
    assert (results / "scores.png").read_bytes()[:8] == PNG_MAGIC


def test_plots_direct(results, tmp_path):
    df = load_results([results])
    single_task = df[df["task"] == "qa_essay"]
    assert plot_scores(single_task, tmp_path / "one.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_scores(df.iloc[:0], tmp_path / "none.png")
    with pytest.raises(ValueError, match="nll"):
        plot_perplexity([{"perplexity": 3.0}], tmp_path / "p.png")


def test_perplexity_results_found_anywhere(results):
    result = PerplexityResult(
        perplexity=9.0,
        nll=[2.0, 2.4],
        tokens=2,
        runtime_seconds=1.0,
        tokens_per_second=2.0,
        kv_bytes=1,
        kv_bytes_max=1,
        mode="chunked",
    )
    write_perplexity_json(result, results / "deep" / "er" / "x.json", model=MODEL, press_name="knorm")
    (results / "other.json").write_text(json.dumps({"perplexity": 1.0}))  # not marked as ours
    (results / "broken.json").write_text("{")
    found = load_perplexity_results([results])
    assert len(found) == 1 and found[0]["perplexity"] == 9.0 and found[0]["path"].endswith("x.json")
    assert load_perplexity_results([results / "deep" / "er" / "x.json"])[0]["press_name"] == "knorm"


def test_missing_path_and_nothing_found(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_results([missing])
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        compare([missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.yaml and metrics\.json"):
        load_results([empty])
    with pytest.raises(ValueError, match="No complete run"):
        compare([empty])


def test_incomplete_runs_skipped(results, caplog):
    partial = _write_run(results, "snapkv", 0.5, {"niah_single": {"string_match": 0.0}}, _stats(1, 0.1))
    (partial / "metrics.json").unlink()  # interrupted before scoring
    in_flight = results / ".synthetic__2048__smollm2__tova__0.50.tmp-abc"  # the runner's temp dir
    in_flight.mkdir()
    (in_flight / "predictions.csv").write_text("task\n")
    no_stats = _write_run(results, "tova", 0.25, {"niah_single": 75.0}, None, data_dir=None)  # plain kvpress
    with caplog.at_level(logging.WARNING, logger="pressroom.evaluation.compare"):
        df = load_results([results])
    assert "snapkv" not in set(df["press"])
    assert any("snapkv" in r.getMessage() and "metrics.json" in r.getMessage() for r in caplog.records)
    assert not any(".tmp-" in r.getMessage() for r in caplog.records)
    tova = df[df["press"] == "tova"].iloc[0]
    assert tova["score"] == 75.0 and pd.isna(tova["kv_bytes"]) and tova["data_dir"] == ""
    assert Path(tova["path"]) == no_stats
    assert len(summary_table(df)) == 3


def _write_predictions(run: Path, rows: list[tuple[str, list[str], str]]) -> Path:
    """``predictions.csv`` as the runner writes it: the answer list as its Python repr (pandas' CSV of a list)."""
    run.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(
        [{"task": t, "answer": a, "answer_prefix": "The number is", "predicted_answer": p} for t, a, p in rows]
    )
    df.to_csv(run / "predictions.csv", index=False)
    return run


def test_paired_gap_counts_and_interval(tmp_path, capsys):
    from pressroom.evaluation.compare import main, paired_gap

    # task x: base 4/4, other 2/4 (gap 50); task y: both 1/2 of the answers on one question, base 1 more (gap 25)
    base = _write_predictions(
        tmp_path / "base",
        [("x", ["11"], "11"), ("x", ["12"], "it is 12"), ("x", ["13"], "13."), ("x", ["14"], "14"),
         ("y", ["1", "2"], "1 and 2"), ("y", ["3", "4"], "3")],
    )  # fmt: skip
    other = _write_predictions(
        tmp_path / "other",
        [("x", ["11"], "11"), ("x", ["12"], "21"), ("x", ["13"], "no"), ("x", ["14"], "14"),
         ("y", ["1", "2"], "1 and 2"), ("y", ["3", "4"], "4 ... 3")],
    )  # fmt: skip
    res = paired_gap(base, other, n_boot=2000, seed=1)
    assert res["tasks"]["x"] == {"base": 100.0, "other": 50.0, "gap": 50.0, "n": 4, "base_only": 2, "other_only": 0}
    assert res["tasks"]["y"]["gap"] == -25.0 and res["tasks"]["y"]["other_only"] == 1
    assert res["gap"] == pytest.approx(12.5) and res["base"] == pytest.approx(87.5)
    low, high = res["interval"]
    assert low < res["gap"] < high and -25.0 <= low and high <= 50.0
    same = paired_gap(base, base, n_boot=50)
    assert same["gap"] == 0.0 and same["interval"] == [0.0, 0.0]
    out = tmp_path / "gap.json"
    assert main(["--paired", str(base), str(other), "--bootstrap", "100", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["gap"] == pytest.approx(12.5) and saved["base_run"] == str(base)
    assert '"gap": 12.5' in capsys.readouterr().out


def test_paired_gap_errors(tmp_path):
    from pressroom.evaluation.compare import main, paired_gap

    base = _write_predictions(tmp_path / "base", [("x", ["1"], "1"), ("x", ["2"], "2")])
    shorter = _write_predictions(tmp_path / "shorter", [("x", ["1"], "1")])
    shuffled = _write_predictions(tmp_path / "shuffled", [("x", ["2"], "2"), ("x", ["1"], "1")])
    for bad in (shorter, shuffled):
        with pytest.raises(ValueError, match="same questions"):
            paired_gap(base, bad)
    with pytest.raises(FileNotFoundError, match="No predictions.csv"):
        paired_gap(base, tmp_path)
    with pytest.raises(ValueError, match="n_boot"):
        paired_gap(base, base, n_boot=0)
    with pytest.raises(SystemExit):
        main([])  # neither result directories nor --paired


def test_read_tasks_parses_runner_answer_lists(tmp_path):
    from pressroom.evaluation.tasks import read_tasks, score_predictions

    run = _write_predictions(tmp_path / "run", [("x", ["7", "8"], "7, 8"), ("qa_y", ["a", "b"], "b")])
    df = read_tasks(run / "predictions.csv")
    assert df["answer"].tolist() == [["7", "8"], ["a", "b"]]
    assert score_predictions(df) == {"qa_y": {"string_match": 100.0}, "x": {"string_match": 100.0}}


def test_pressroom_eval_compare_paired(tmp_path, capsys):
    from pressroom.evaluation.cli import main

    base = _write_predictions(tmp_path / "base", [("x", ["1"], "1"), ("x", ["2"], "2")])
    other = _write_predictions(tmp_path / "other", [("x", ["1"], "1"), ("x", ["2"], "3")])
    out = tmp_path / "gap.json"
    assert main(["compare", "--paired", str(base), str(other), "--json", str(out), "--bootstrap", "10"]) == 0
    saved = json.loads(out.read_text())
    assert saved["gap"] == 50.0 and saved["command"].startswith("pressroom-eval compare --paired")
    assert main(["compare", str(base), "--paired", str(base), str(other)]) == 2
    assert "either result directories or --paired" in capsys.readouterr().err


def test_paired_gap_reads_numpy_answer_arrays_and_checks_metrics(tmp_path):
    """Hub datasets keep answers as numpy arrays, which pandas writes as ``['12' '34']`` (no comma): read back as two
    answers; a run whose metrics.json disagrees with its rescored predictions raises instead of giving a gap."""
    from pressroom.evaluation.compare import paired_gap

    def run(name, preds, metrics):
        d = tmp_path / name
        d.mkdir()
        df = pd.DataFrame({"task": ["x", "x"], "answer": [np.array(["12", "34"]), np.array(["5"])],
                           "predicted_answer": preds})  # fmt: skip
        df.to_csv(d / "predictions.csv", index=False)
        (d / "metrics.json").write_text(json.dumps({"x": {"string_match": metrics}}))
        return d

    base = run("base", ["12 and 34", "5"], 100.0)
    assert "['12' '34']" in (base / "predictions.csv").read_text()
    other = run("other", ["12", "5"], 75.0)
    assert paired_gap(base, other, n_boot=20)["gap"] == 25.0
    wrong = run("wrong", ["12", "5"], 50.0)
    with pytest.raises(ValueError, match="metrics.json says 50.00"):
        paired_gap(base, wrong)


def test_compare_options_that_do_not_go_together(tmp_path, capsys):
    from pressroom.evaluation.cli import main

    base = _write_predictions(tmp_path / "base", [("x", ["1"], "1")])
    assert main(["compare", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    assert main(["compare", "--paired", str(base), str(base), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "go with --paired" in err and "not --paired" in err
