"""Streaming perplexity: the embedded model's figure, streaming == chunked, presses, cache positions, JSON, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kvpress import DecodingPress, StreamingLLMPress
from transformers import DynamicCache

from pressroom.evaluation.corpora import corpus_tokens
from pressroom.evaluation.perplexity import (
    PerplexityResult,
    read_perplexity_json,
    run_perplexity,
    streaming_perplexity,
    write_perplexity_json,
)


@pytest.fixture(scope="module")
def tiny_llama():
    from pressroom.evaluation.models import load_model

    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_ids(tiny_llama):
    _, tokenizer = tiny_llama
    return corpus_tokens(tokenizer, "pg_essays", "heldout", max_tokens=300)


def _kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # float32 keys + values


def test_embedded_model_perplexity_on_heldout_essays(smollm2):
    model, tokenizer = smollm2
    ids = corpus_tokens(tokenizer, "pg_essays", "heldout", max_tokens=2048)
    result = streaming_perplexity(model, ids, mode="chunked", chunk_size=512, progress=False)
    assert 5.0 < result.perplexity < 60.0
    assert result.tokens == 2047 and len(result.nll) == 2047 and result.mode == "chunked"
    assert result.perplexity == pytest.approx(math.exp(sum(result.nll) / len(result.nll)), rel=1e-6)
    # the full cache holds every token fed (all but the last), nothing more
    assert result.kv_bytes == result.kv_bytes_max == 2047 * _kv_bytes_per_token(model)
    assert result.runtime_seconds > 0 and result.tokens_per_second > 0


def test_streaming_matches_chunked_on_full_cache(tiny_llama, tiny_ids):
    model, _ = tiny_llama
    streamed = streaming_perplexity(model, tiny_ids, progress=False)
    chunked = streaming_perplexity(model, tiny_ids, mode="chunked", chunk_size=64, progress=False)
    assert streamed.mode == "streaming" and streamed.tokens == chunked.tokens == tiny_ids.numel() - 1
    assert abs(streamed.perplexity - chunked.perplexity) / chunked.perplexity < 1e-3
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(chunked.nll), rtol=1e-4, atol=1e-4)
    assert streamed.kv_bytes == chunked.kv_bytes == (tiny_ids.numel() - 1) * _kv_bytes_per_token(model)


def test_streaming_matches_chunked_on_embedded_model(smollm2):
    model, tokenizer = smollm2
    ids = corpus_tokens(tokenizer, "pg_essays", "heldout", max_tokens=24)
    streamed = streaming_perplexity(model, ids[None], progress=False)  # [1, T] input
    chunked = streaming_perplexity(model, ids, mode="chunked", chunk_size=8, progress=False)
    assert abs(streamed.perplexity - chunked.perplexity) / chunked.perplexity < 1e-3


def test_decoding_press_bounds_the_cache(tiny_llama, tiny_ids):
    model, _ = tiny_llama
    full = streaming_perplexity(model, tiny_ids, progress=False)
    press = DecodingPress(StreamingLLMPress(n_sink=4), compression_interval=16, target_size=64)
    pressed = streaming_perplexity(model, tiny_ids, press=press, progress=False)
    per_token = _kv_bytes_per_token(model)
    assert pressed.kv_bytes_max <= (64 + 16) * per_token
    assert pressed.kv_bytes < full.kv_bytes / 3
    assert math.isfinite(pressed.perplexity) and pressed.tokens == full.tokens
    # the first 64 tokens are predicted before any eviction: identical to the full cache
    torch.testing.assert_close(torch.tensor(pressed.nll[:64]), torch.tensor(full.nll[:64]))


class _PositionCache(DynamicCache):
    """A cache that assigns positions itself, recording what it was asked."""

    def __init__(self, constant: bool = False, wrong_count: bool = False):
        super().__init__()
        self.calls: list[int] = []
        self.constant = constant
        self.wrong_count = wrong_count

    def position_ids_for(self, n_new: int) -> torch.LongTensor:
        self.calls.append(n_new)
        if self.wrong_count:
            return torch.zeros(n_new + 1, dtype=torch.long)
        if self.constant:
            return torch.zeros(n_new, dtype=torch.long)
        start = self.get_seq_length()
        return torch.arange(start, start + n_new)


@pytest.mark.parametrize("mode", ["streaming", "chunked"])
def test_cache_assigns_positions(tiny_llama, tiny_ids, mode):
    model, _ = tiny_llama
    ids = tiny_ids[:80]
    reference = streaming_perplexity(model, ids, mode=mode, chunk_size=32, progress=False)
    cache = _PositionCache()
    own = streaming_perplexity(model, ids, cache=cache, mode=mode, chunk_size=32, progress=False)
    assert cache.calls == ([1] * 79 if mode == "streaming" else [32, 32, 15])
    own_diff = (torch.tensor(own.nll) - torch.tensor(reference.nll)).abs().max().item()
    assert own_diff < 1e-5
    # the positions are really used: all-zero positions change the predictions (a little, on random weights)
    zero = streaming_perplexity(
        model, ids, cache=_PositionCache(constant=True), mode=mode, chunk_size=32, progress=False
    )
    zero_diff = (torch.tensor(zero.nll) - torch.tensor(reference.nll)).abs().max().item()
    assert zero_diff > 100 * max(own_diff, 1e-6)
    with pytest.raises(RuntimeError, match="position_ids_for"):
        streaming_perplexity(model, ids, cache=_PositionCache(wrong_count=True), mode=mode, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sliding"}, "Unknown mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"input_ids": torch.tensor([5])}, "at least 2 tokens"),
        ({"input_ids": torch.ones(2, 10, dtype=torch.long)}, "1-D"),
        ({"input_ids": torch.ones(1, 1, 10, dtype=torch.long)}, "1-D"),
        ({"input_ids": torch.ones(10)}, "integer"),
        ({"max_tokens": 1}, "max_tokens"),
    ],
)
def test_bad_inputs_raise(tiny_llama, kwargs, message):
    model, _ = tiny_llama
    args = {"input_ids": torch.arange(10), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        streaming_perplexity(model, **args)


def test_running_perplexity():
    nll = [math.log(2), math.log(4), math.log(8)]
    result = PerplexityResult(
        perplexity=4.0,
        nll=nll,
        tokens=3,
        runtime_seconds=1.0,
        tokens_per_second=3.0,
        kv_bytes=1,
        kv_bytes_max=2,
        mode="streaming",
    )
    assert result.running_perplexity() == pytest.approx([2.0, math.sqrt(8), 4.0])
    assert result.running_perplexity(window=2) == pytest.approx([2.0, math.sqrt(8), math.sqrt(32)])
    assert result.running_perplexity(window=10) == pytest.approx(result.running_perplexity())
    with pytest.raises(ValueError, match="window"):
        result.running_perplexity(window=0)
    assert PerplexityResult.from_dict({**result.to_dict(), "model": "x"}) == result


def _result() -> PerplexityResult:
    return PerplexityResult(
        perplexity=12.5,
        nll=[2.0, 3.0],
        tokens=2,
        runtime_seconds=0.5,
        tokens_per_second=4.0,
        kv_bytes=100,
        kv_bytes_max=120,
        mode="chunked",
    )


def test_json_written_atomically(tmp_path):
    path = tmp_path / "out" / "ppl.json"
    write_perplexity_json(_result(), path, model="smollm2", press_name="no_press", compression_ratio=0.0)
    data = json.loads(path.read_text())
    assert data["kind"] == "perplexity" and data["perplexity"] == 12.5 and data["nll"] == [2.0, 3.0]
    assert data["model"] == "smollm2" and data["torch_version"] == torch.__version__ and "transformers_version" in data
    assert read_perplexity_json(path)["kv_bytes_max"] == 120
    # a failing write (metadata that cannot be serialised) leaves the previous file intact and no temp file
    before = path.read_text()
    with pytest.raises(TypeError):
        write_perplexity_json(_result(), path, model=object())
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["ppl.json"]
    with pytest.raises(ValueError, match="overwrite"):
        write_perplexity_json(_result(), path, perplexity=1.0)


def test_run_perplexity_writes_then_resumes(tmp_path, monkeypatch):
    import pressroom.evaluation.models as models

    output = tmp_path / "ppl.json"
    output.write_text('{"kind": "perplexity", "perplexity": 3')  # a half-written file from an interrupted run
    first = run_perplexity("tiny-llama", max_tokens=64, mode="chunked", chunk_size=16, output=output, progress=False)
    data = json.loads(output.read_text())
    assert data["perplexity"] == pytest.approx(first.perplexity) and data["tokens"] == 63
    assert data["model"] == "tiny-llama" and data["corpus"] == "pg_essays" and data["split"] == "heldout"
    assert data["press_name"] == "no_press" and data["device"] == "cpu" and data["mode"] == "chunked"

    def no_load(*args, **kwargs):
        raise AssertionError("a complete result must be reused, not recomputed")

    monkeypatch.setattr(models, "load_model", no_load)
    again = run_perplexity("tiny-llama", max_tokens=64, mode="chunked", chunk_size=16, output=output, progress=False)
    assert again == first
    with pytest.raises(ValueError, match="Unknown mode"):
        run_perplexity("tiny-llama", mode="nope", output=tmp_path / "other.json")
