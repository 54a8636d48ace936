"""The parallel StreamingLLM evaluator equals the literal token-by-token procedure (arXiv 2309.17453)."""

from __future__ import annotations

import functools

import pytest
import torch

from pressroom.evaluation.perplexity import streaming_perplexity
from pressroom.evaluation.streaming import (
    parallel_streaming_perplexity,
    reference_streaming_nll,
    sink_window_attention,
    sink_window_kv_bytes,
)

TINY = ("tiny-llama", "tiny-qwen3", "tiny-mistral")
CONFIGS = ((4, 16), (0, 16), (1, 7), (4, 64))
CHUNKS = (5, 32, 300)  # smaller than, between, and larger than the windows and the stream
LENGTH = 200
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token work is thousands of tiny ops: one thread avoids waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _tiny(name: str):
    from pressroom.evaluation.models import load_model

    model, _ = load_model(name, device="cpu", dtype=torch.float32)
    return model


def _ids(length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (length,), generator=generator)


def _parallel(model, ids, n_sink, window, chunk_size) -> torch.Tensor:
    result = parallel_streaming_perplexity(model, ids, n_sink, window, chunk_size=chunk_size, progress=False)
    assert result.tokens == ids.numel() - 1 == len(result.nll)
    return torch.tensor(result.nll)


@functools.cache
def _full_nll(name: str) -> torch.Tensor:
    result = streaming_perplexity(_tiny(name), _ids(), mode="chunked", chunk_size=64, progress=False)
    return torch.tensor(result.nll)


@pytest.mark.parametrize("n_sink,window", CONFIGS)
@pytest.mark.parametrize("name", TINY)
def test_parallel_equals_token_by_token(name, n_sink, window):
    model, ids = _tiny(name), _ids()
    reference = reference_streaming_nll(model, ids, n_sink, window)
    # The eviction must matter, or the comparison would prove nothing.
    assert (reference - _full_nll(name)).abs().max() > 1e-2
    for chunk in CHUNKS:
        diff = (_parallel(model, ids, n_sink, window, chunk) - reference).abs().max().item()
        assert diff < TOL, f"{name} n_sink={n_sink} window={window} chunk={chunk}: max |dNLL| {diff:.2e}"


@pytest.mark.parametrize("name", TINY)
def test_window_covering_the_stream_is_the_full_cache(name):
    model, ids = _tiny(name), _ids()
    full = _full_nll(name)
    assert (reference_streaming_nll(model, ids, 4, LENGTH) - full).abs().max() < TOL
    for n_sink, window, chunk in ((4, LENGTH, 32), (0, LENGTH + 50, 300), (None, None, 5), (2, None, 64)):
        diff = (_parallel(model, ids, n_sink, window, chunk) - full).abs().max().item()
        assert diff < TOL, f"{name} n_sink={n_sink} window={window} chunk={chunk}: max |dNLL| {diff:.2e}"


def test_embedded_smollm2_parallel_equals_token_by_token(smollm2):
    from pressroom.evaluation.corpora import corpus_tokens

    model, tokenizer = smollm2
    ids = corpus_tokens(tokenizer, "pg_essays", "heldout", max_tokens=300)
    reference = reference_streaming_nll(model, ids, 4, 64)
    parallel = _parallel(model, ids, 4, 64, chunk_size=96)
    assert (parallel - reference).abs().max().item() < 1e-3
    full = torch.tensor(streaming_perplexity(model, ids, mode="chunked", chunk_size=300, progress=False).nll)
    assert (parallel - full).abs().max().item() > 0.1  # the window of 64 does change the predictions


def test_context_manager_continues_the_stream_and_restores_the_model():
    model, ids = _tiny("tiny-qwen3"), _ids(120)
    attns = [layer.self_attn for layer in model.model.layers]
    with torch.inference_mode():
        before = model(input_ids=ids[None], use_cache=False).logits
        with sink_window_attention(model, 2, 10) as stream:
            assert all("forward" in a.__dict__ for a in attns)
            first = model(input_ids=ids[None, :50], use_cache=False).logits
            second = model(input_ids=ids[None, 50:], use_cache=False).logits
            assert stream.tokens_seen == 120
            stream.reset()
            again = model(input_ids=ids[None], use_cache=False).logits
            with pytest.raises(ValueError, match="nested"), sink_window_attention(model, 4, 16):
                pass
        assert all("forward" not in a.__dict__ for a in attns)
        torch.testing.assert_close(model(input_ids=ids[None], use_cache=False).logits, before, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="boom"), sink_window_attention(model, 4, 16):
            raise RuntimeError("boom")
        assert all("forward" not in a.__dict__ and "_pressroom_streaming" not in a.__dict__ for a in attns)
        torch.testing.assert_close(model(input_ids=ids[None], use_cache=False).logits, before, rtol=0, atol=0)
    streamed = torch.cat((first, second), dim=1)
    torch.testing.assert_close(streamed, again, rtol=1e-5, atol=1e-5)
    assert (streamed - before).abs().max() > 1e-2
    nll = torch.nn.functional.cross_entropy(streamed[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(nll, reference_streaming_nll(model, ids, 2, 10), rtol=0, atol=TOL)


def test_kv_bytes_are_those_of_a_sink_window_cache():
    model = _tiny("tiny-llama")  # 2 layers, 2 KV heads, head_dim 16, float32
    result = parallel_streaming_perplexity(model, _ids(100), 4, 16, chunk_size=32, progress=False)
    assert result.kv_bytes == result.kv_bytes_max == 2 * 2 * 2 * 16 * 20 * 4
    assert sink_window_kv_bytes(model, 99, None, None) == 2 * 2 * 2 * 16 * 99 * 4
    assert sink_window_kv_bytes(model, 10, 4, 16) == 2 * 2 * 2 * 16 * 10 * 4
    assert result.mode == "parallel" and result.tokens_per_second > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_sink=4, window=0), "window"),
        (dict(n_sink=4, window=-3), "window"),
        (dict(n_sink=-1, window=16), "n_sink"),
        (dict(n_sink=None, window=16), "n_sink=None"),
        (dict(n_sink=4, window=16, chunk_size=0), "chunk_size"),
        (dict(n_sink=4, window=16, chunk_size=True), "chunk_size"),
        (dict(n_sink=4, window=2.5), "window"),
        (dict(n_sink=4, window=16, max_tokens=1), "max_tokens"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel_streaming_perplexity(_tiny("tiny-llama"), _ids(50), progress=False, **kwargs)


def test_bad_input_elsewhere_raises_value_error():
    model = _tiny("tiny-mistral")
    with pytest.raises(ValueError, match="window"), sink_window_attention(model, 4, 0):
        pass
    with pytest.raises(ValueError, match="n_sink"):
        reference_streaming_nll(model, _ids(20), -2, 8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        parallel_streaming_perplexity(model, _ids(1), 4, 8, progress=False)
    with pytest.raises(ValueError, match="one stream"):
        parallel_streaming_perplexity(model, _ids(40).view(2, 20), 4, 8, progress=False)
    model.config.sliding_window = 32  # the model's own sliding window would be silently replaced
    try:
        with pytest.raises(ValueError, match="sliding"), sink_window_attention(model, 4, 16):
            pass
    finally:
        model.config.sliding_window = None
    assert "forward" not in model.model.layers[0].self_attn.__dict__


@pytest.mark.parametrize("name", ("tiny-llama", "tiny-qwen3"))
def test_original_positions_parallel_equals_token_by_token(name):
    """positions="original": every token at its stream position (kvpress's eviction), still exact in parallel."""
    model, ids = _tiny(name), _ids()
    reference = reference_streaming_nll(model, ids, 4, 16, positions="original")
    in_cache = reference_streaming_nll(model, ids, 4, 16)
    assert (reference - in_cache).abs().max() > 1e-3  # the sinks' distances differ once tokens are evicted
    for chunk in (7, 300):
        result = parallel_streaming_perplexity(
            model, ids, 4, 16, chunk_size=chunk, progress=False, positions="original"
        )
        assert (torch.tensor(result.nll) - reference).abs().max().item() < TOL


def test_kvpress_decoding_streamingllm_equals_original_positions_once_kept_in_order():
    """DecodingPress(StreamingLLMPress) compressing every step is the original-positions evaluator with window
    target - n_sink + 1 (a query also sees the token the next compression drops), if the cache stays in order:
    OrderedStreamingLLMPress matches it; kvpress's own StreamingLLMPress (topk order) evicts other tokens."""
    from kvpress import DecodingPress, StreamingLLMPress

    from pressroom.presses import OrderedStreamingLLMPress

    model, ids = _tiny("tiny-llama"), _ids(120)
    target = 27
    parallel = torch.tensor(
        parallel_streaming_perplexity(
            model, ids, 4, target - 4 + 1, chunk_size=50, progress=False, positions="original"
        ).nll
    )

    def kvpress_nll(base) -> torch.Tensor:
        press = DecodingPress(base_press=base, compression_interval=1, target_size=target)
        return torch.tensor(streaming_perplexity(model, ids, press=press, mode="streaming", progress=False).nll)

    assert (kvpress_nll(OrderedStreamingLLMPress(n_sink=4)) - parallel).abs().max().item() < TOL
    shipped = (kvpress_nll(StreamingLLMPress(n_sink=4)) - parallel).abs().max().item()
    assert shipped > 1e-2, "kvpress's StreamingLLMPress now keeps stream order: update the README's note on it"


def test_unknown_positions_mode_is_refused():
    with pytest.raises(ValueError, match="positions must be one of"):
        parallel_streaming_perplexity(_tiny("tiny-llama"), _ids(50), 4, 16, progress=False, positions="absolute")
    with pytest.raises(ValueError, match="positions must be one of"):
        reference_streaming_nll(_tiny("tiny-llama"), _ids(20), 4, 8, positions="rope")
