"""The runner: kvpress's layout, skipping finished runs, atomic results, clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import yaml
from kvpress import SnapKVPress

from pressroom.evaluation.compare import paired_gap
from pressroom.evaluation.press_registry import make_press
from pressroom.evaluation.run import RESULT_FILES, EvalConfig, Runner, partial_path

SMALL = dict(model="tiny-llama", data_dir="512", tasks=["niah_single"], n_samples=1, max_new_tokens=4)


@pytest.fixture(scope="module")
def runner():
    return Runner(progress=False)


def test_layout_and_stats(runner, tmp_path):
    cfg = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL)
    out = runner.run(cfg)
    assert out.name == "synthetic__512__tiny-llama__snapkv__0.50"
    assert sorted(p.name for p in out.iterdir()) == sorted(RESULT_FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"niah_single"} and "string_match" in metrics["niah_single"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["press_name"] == "snapkv" and config["compression_ratio"] == 0.5
    assert "SnapKVPress" in config["press_init_command"]
    stats = json.loads((out / "stats.json").read_text())
    # SnapKV at 0.5 keeps half the context: the bytes held are about half the full cache's.
    assert 0.4 < stats["kv_bytes"] / stats["kv_bytes_full"] < 0.6
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds_per_token"] > 0
    assert stats["peak_gpu_memory_bytes"] is None  # CPU
    baseline = runner.run(EvalConfig(output_dir=str(tmp_path), **SMALL))
    assert baseline.name == "synthetic__512__tiny-llama__no_press__0.00"
    base_stats = json.loads((baseline / "stats.json").read_text())
    assert base_stats["kv_bytes"] == base_stats["kv_bytes_full"]


def test_skips_complete_run(runner, tmp_path, monkeypatch):
    cfg = EvalConfig(press_name="knorm", compression_ratio=0.25, output_dir=str(tmp_path), **SMALL)
    out = runner.run(cfg)
    before = (out / "predictions.csv").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("a complete run must not be evaluated again")

    monkeypatch.setattr(runner, "pipeline", boom)
    assert runner.run(EvalConfig(press_name="knorm", compression_ratio=0.25, output_dir=str(tmp_path), **SMALL)) == out
    assert (out / "predictions.csv").stat().st_mtime_ns == before
    # the same directory with another configuration is refused, not overwritten
    other = dict(SMALL, n_samples=2)
    with pytest.raises(ValueError, match="different configuration"):
        runner.run(EvalConfig(press_name="knorm", compression_ratio=0.25, output_dir=str(tmp_path), **other))


@dataclass
class ExplodingPress(SnapKVPress):
    def compress(self, *args, **kwargs):
        raise RuntimeError("press failed mid-run")


def test_broken_run_leaves_nothing(runner, tmp_path):
    cfg = EvalConfig(press_name="exploding", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL)
    with pytest.raises(RuntimeError, match="press failed"):
        runner.run(cfg, press=ExplodingPress(compression_ratio=0.5))
    assert not cfg.results_dir().exists()
    assert not list(tmp_path.rglob("metrics.json"))


def test_bad_input_errors(runner, tmp_path):
    with pytest.raises(ValueError, match="Unknown press 'nosuchpress'"):
        make_press("nosuchpress", 0.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        EvalConfig(press_name="snapkv", compression_ratio=1.5)
    with pytest.raises(ValueError, match="Unknown dataset"):
        EvalConfig(dataset="nosuchdataset")
    with pytest.raises(ValueError, match="Could not load model"):
        runner.run(EvalConfig(output_dir=str(tmp_path), **dict(SMALL, model="/no/such/model/dir")))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="Cannot write results"):
        runner.run(EvalConfig(output_dir=str(blocker / "results"), **SMALL))
    with pytest.raises(ValueError, match="(?i)too short|at least|minimum"):
        runner.run(EvalConfig(output_dir=str(tmp_path), **dict(SMALL, data_dir="8")))


def test_press_that_reads_token_types_gets_the_pipeline_tokenizer(runner, tmp_path):
    """AnchorPress finds separators with a tokenizer; the Runner hands it the pipeline's (tiny models have no
    tokenizer of their own on disk), and the press keeps half the context."""
    press = make_press("anchor", 0.5)
    assert press.tokenizer is None
    out = runner.run(EvalConfig(press_name="anchor", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL), press)
    assert press.tokenizer is not None
    stats = json.loads((out / "stats.json").read_text())
    assert 0.4 < stats["kv_bytes"] / stats["kv_bytes_full"] < 0.6


def test_query_aware_compresses_the_question_with_the_context(runner, tmp_path):
    # kvpress's query_aware mode: each question joins its context before compression; its own directory suffix
    cfg = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path), query_aware=True, **SMALL)
    out = runner.run(cfg)
    assert out.name == "synthetic__512__tiny-llama__snapkv__0.50__query_aware"
    stats = json.loads((out / "stats.json").read_text())
    agnostic = runner.run(EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL))
    agnostic_stats = json.loads((agnostic / "stats.json").read_text())
    # the compressed prefill saw the question's tokens too
    assert stats["context_tokens"] > agnostic_stats["context_tokens"]
    assert yaml.safe_load((out / "config.yaml").read_text())["query_aware"] is True


def test_runs_written_before_a_new_config_field_are_reused(runner, tmp_path, monkeypatch):
    out = runner.run(EvalConfig(press_name="knorm", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL))
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["query_aware"]  # as written by an older pressroom
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setattr(runner, "pipeline", lambda *a, **k: pytest.fail("must reuse the complete run"))
    assert runner.run(EvalConfig(press_name="knorm", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL)) == out


@dataclass
class CountingSnapKVPress(SnapKVPress):
    """SnapKV that counts the contexts it compresses and raises at the ``fail_at``-th (0: never)."""

    fail_at: int = 0
    contexts: int = 0

    def compress(self, module, *args, **kwargs):
        if module.layer_idx == 0:
            self.contexts += 1
            if self.contexts == self.fail_at:
                raise KeyboardInterrupt  # as a Ctrl-C or a Slurm preemption would stop the run
        return super().compress(module, *args, **kwargs)


def test_interrupted_run_resumes_from_its_checkpoint(runner, tmp_path):
    """A run stopped after its first of three contexts keeps that answer; asked again it evaluates only the two
    left, gives the answers of an uninterrupted run, and removes its checkpoint."""
    small = dict(SMALL, n_samples=3)
    cfg = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path / "a"), **small)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, press=CountingSnapKVPress(compression_ratio=0.5, fail_at=2))
    checkpoint = partial_path(cfg.results_dir())
    assert not cfg.results_dir().exists()
    assert len(json.loads(checkpoint.read_text())["answers"]) == 1
    # the unfinished run pairs with a baseline on the questions it has answered
    base = runner.run(EvalConfig(output_dir=str(tmp_path / "base"), **small))
    part = paired_gap(base, checkpoint, n_boot=10)
    assert part["n_questions"] == 1 and part["partial"]["answered"] == 1 and part["partial"]["of"] == 3
    other_seed = runner.run(EvalConfig(output_dir=str(tmp_path / "seed1"), **dict(small, seed=1)))
    with pytest.raises(ValueError, match="other questions.*seed"):
        paired_gap(other_seed, checkpoint)
    with pytest.raises(ValueError, match="goes second"):
        paired_gap(checkpoint, base)
    press = CountingSnapKVPress(compression_ratio=0.5)
    out = runner.run(cfg, press=press)
    assert press.contexts == 2 and not checkpoint.exists()
    assert json.loads((out / "stats.json").read_text())["resumed_contexts"] == 1
    fresh_cfg = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path / "b"), **small)
    fresh = runner.run(fresh_cfg, press=CountingSnapKVPress(compression_ratio=0.5))
    assert (out / "predictions.csv").read_text() == (fresh / "predictions.csv").read_text()


def test_checkpoint_of_another_run_is_refused(runner, tmp_path):
    cfg = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path), **SMALL)
    checkpoint = partial_path(cfg.results_dir())
    checkpoint.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*move it away"):
        runner.run(cfg)
    other = EvalConfig(press_name="snapkv", compression_ratio=0.5, output_dir=str(tmp_path), **dict(SMALL, seed=1))
    state = {"identity": other.identity(), "answers": {}, "wall": 0.0}
    state["recorder"] = {k: [] for k in ("prefill_seconds", "kv_bytes", "context_tokens")}
    state["recorder"].update(decode_seconds=0.0, decode_tokens=0)
    checkpoint.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="different configuration"):
        runner.run(cfg)
    state["identity"] = cfg.identity()
    state["answers"] = {"999": "x"}
    checkpoint.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="does not have"):
        runner.run(cfg)
    assert checkpoint.exists() and not cfg.results_dir().exists()  # nothing of the user's is removed
