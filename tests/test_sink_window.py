"""SinkWindowCache / SinkWindowPress: StreamingLLM (arXiv 2309.17453) with sinks + window and in-cache positions.

What is pinned here:
- window >= length: the same logits as a DynamicCache / no press (Llama, Qwen3, Mistral; GQA);
- the semantics, against an independent brute-force StreamingLLM (a DynamicCache rebuilt at every step from
  explicitly kept pre-RoPE keys rotated by the model's own rotary embedding): token by token and in chunks;
- exactly the sinks and the last ``window`` tokens are kept, in order (pre-RoPE keys captured from k_proj/k_norm);
- no drift: after 20,000 bfloat16 tokens the keys equal fresh pre-RoPE keys rotated to their in-cache positions;
- caller positions do not matter (generate's absolute ones == in-cache ones), constant memory in model.generate;
- kvpress's pipeline: several questions, answers independent of the previous ones, the real SmolLM2 finds a needle;
- errors, the registry, memory accounting.
"""

from __future__ import annotations

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.models.llama.modeling_llama import rotate_half

from pressroom.evaluation.models import load_model
from pressroom.evaluation.perplexity import streaming_perplexity
from pressroom.presses import PRESSES, SinkWindowCache, SinkWindowLayer, SinkWindowPress, cache_memory_bytes


@pytest.fixture(scope="module")
def models():
    loaded: dict[tuple[str, torch.dtype], tuple] = {}

    def get(name: str = "tiny-llama", dtype: torch.dtype = torch.float32):
        if (name, dtype) not in loaded:
            loaded[name, dtype] = load_model(name, device="cpu", dtype=dtype)
        return loaded[name, dtype]

    return get


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 5000, (1, n), generator=gen)


class PreRopeKeys:
    """Captures every layer's pre-RoPE keys ``[B, H_kv, q, D]`` (k_proj, then k_norm for Qwen3) of each forward."""

    def __init__(self, model):
        self.model = model
        self.last: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            module = getattr(attn, "k_norm", None) or attn.k_proj
            self.handles.append(module.register_forward_hook(self._hook(i, attn.head_dim)))

    def _hook(self, i: int, head_dim: int):
        def hook(module, args, output):
            b, q = output.shape[0], output.shape[1]
            self.last[i] = output.detach().reshape(b, q, -1, head_dim).transpose(1, 2).clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rotate(model, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``raw`` [B, H, n, D] rotated to ``positions`` [n] by the model's own rotary embedding (float32)."""
    cos, sin = model.model.rotary_emb(raw.float(), positions[None].long())
    cos, sin = cos[:, None].float(), sin[:, None].float()
    return raw.float() * cos + rotate_half(raw.float()) * sin


class BruteForceStream:
    """StreamingLLM spelled out: per layer, the kept pre-RoPE keys and values in order; at every forward a fresh
    DynamicCache holds the visible ones rotated to ``0 .. V-1`` (V = kept, minus the oldest window token when the
    cache is full) and the new tokens sit at ``V ..``."""

    def __init__(self, model, n_sink: int, window: int):
        self.model, self.n_sink, self.window = model, n_sink, window
        self.keys: list[torch.Tensor | None] = [None] * model.config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * model.config.num_hidden_layers
        self.seen = 0

    def _visible(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.shape[2] < self.n_sink + self.window:
            return t
        return torch.cat([t[:, :, : self.n_sink], t[:, :, self.n_sink + 1 :]], dim=2)  # the oldest window token goes

    def _trim(self, t: torch.Tensor) -> torch.Tensor:
        n_sinks = min(self.seen, self.n_sink)
        rest = t[:, :, n_sinks:]
        return torch.cat([t[:, :, :n_sinks], rest[:, :, max(0, rest.shape[2] - self.window) :]], dim=2)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        cache = DynamicCache()
        vis_k = [self._visible(k) for k in self.keys]
        vis_v = [self._visible(v) for v in self.values]
        n_vis = 0 if vis_k[0] is None else vis_k[0].shape[2]
        if n_vis:
            for i, (k, v) in enumerate(zip(vis_k, vis_v)):
                rotated = _rotate(self.model, k, torch.arange(n_vis)).to(k.dtype)
                cache.update(rotated, v, i)
        capture = PreRopeKeys(self.model)
        try:
            q = ids.shape[1]
            logits = self.model(
                ids, past_key_values=cache, position_ids=torch.arange(n_vis, n_vis + q)[None], use_cache=True
            ).logits
        finally:
            capture.remove()
        self.seen += ids.shape[1]
        for i in range(len(self.keys)):
            new_k, new_v = capture.last[i], cache.layers[i].values[:, :, n_vis:]
            k = new_k if vis_k[i] is None else torch.cat([vis_k[i], new_k], dim=2)
            v = new_v if vis_v[i] is None else torch.cat([vis_v[i], new_v], dim=2)
            self.keys[i], self.values[i] = self._trim(k), self._trim(v)
        return logits


def _feed(model, cache, ids: torch.Tensor, chunks: list[int], in_cache_positions: bool) -> torch.Tensor:
    """Logits of ``ids`` fed in ``chunks`` into ``cache``, at in-cache or at absolute positions."""
    out, start = [], 0
    for n in chunks:
        piece = ids[:, start : start + n]
        if in_cache_positions:
            pos = cache.position_ids_for(n)
            out.append(model(piece, past_key_values=cache, position_ids=pos, cache_position=pos[0]).logits)
        else:  # what generate does: positions = tokens seen so far
            out.append(model(piece, past_key_values=cache).logits)
        start += n
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mistral"])
def test_window_covering_everything_equals_dynamic_cache(models, name):
    model, _ = models(name)
    ids = _ids(40)
    with torch.no_grad():
        reference = model(ids).logits
        cache = SinkWindowCache(model.config, n_sink=4, window=64)
        got = _feed(model, cache, ids, [17, 1, 1, 1, 9, 1, 10], in_cache_positions=False)
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4)
        assert cache.get_seq_length() == 40 and cache.n_kept == 40

        dynamic = DynamicCache()
        with SinkWindowPress(window=64)(model):
            prefill = model(ids[:, :25], past_key_values=dynamic).logits
        assert all(isinstance(layer, SinkWindowLayer) for layer in dynamic.layers)
        decode = [model(ids[:, i : i + 1], past_key_values=dynamic).logits for i in range(25, 40)]
        torch.testing.assert_close(torch.cat([prefill, *decode], dim=1), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_matches_brute_force_streaming_llm(models, name):
    """Token by token and in chunks (longer than the window too), sinks + last window visible, in-cache
    distances: the same logits as the explicit StreamingLLM procedure."""
    model, _ = models(name)
    ids = _ids(70, seed=1)
    chunks = [5, 1, 1, 3, 1, 1, 1, 14, 1, 1, 2, 1, 1, 1, 1, 1, 26, 1, 1, 1, 1, 1, 1, 1, 1]
    assert sum(chunks) == 70
    n_sink, window = 2, 9
    with torch.no_grad():
        brute = BruteForceStream(model, n_sink, window)
        expected = torch.cat([brute.step(c) for c in torch.split(ids, chunks, dim=1)], dim=1)
        cache = SinkWindowCache(model.config, n_sink=n_sink, window=window)
        got = _feed(model, cache, ids, chunks, in_cache_positions=True)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
    # and far from a full cache: eviction really happened
    full = model(ids).logits
    assert (got[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_caller_positions_do_not_matter(models):
    """Absolute positions (generate's), in-cache positions and an arbitrary shift give the same logits."""
    model, _ = models("tiny-llama")
    ids = _ids(50, seed=2)
    chunks = [6] + [1] * 20 + [12] + [1] * 12
    with torch.no_grad():
        in_cache = _feed(model, SinkWindowCache(model.config, 3, 7), ids, chunks, in_cache_positions=True)
        absolute = _feed(model, SinkWindowCache(model.config, 3, 7), ids, chunks, in_cache_positions=False)
        cache, out, start = SinkWindowCache(model.config, 3, 7), [], 0
        for n in chunks:  # positions shifted by 5000, passed as position_ids only
            pos = torch.arange(start + 5000, start + 5000 + n)[None]
            out.append(model(ids[:, start : start + n], past_key_values=cache, position_ids=pos).logits)
            start += n
    torch.testing.assert_close(absolute, in_cache, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(out, dim=1), in_cache, atol=5e-4, rtol=1e-3)


def test_streaming_perplexity_uses_in_cache_positions(models):
    model, _ = models("tiny-llama")
    ids = _ids(60, seed=3)
    result = streaming_perplexity(model, ids, cache=SinkWindowCache(model.config, 2, 8), progress=False)
    with torch.no_grad():
        brute = BruteForceStream(model, 2, 8)
        logits = torch.cat([brute.step(ids[:, t : t + 1]) for t in range(59)], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")
    torch.testing.assert_close(torch.tensor(result.nll), nll, atol=1e-4, rtol=1e-4)
    # the full cache would differ: the window matters
    full = streaming_perplexity(model, ids, mode="chunked", chunk_size=60, progress=False)
    assert abs(full.perplexity - result.perplexity) > 1e-3


# ------------------------------------------------------------------------------------------- what is kept, drift
def _expected_kept(captured: list[torch.Tensor], n_sink: int, window: int) -> torch.Tensor:
    keys = torch.cat(captured, dim=2)
    return torch.cat([keys[:, :, :n_sink], keys[:, :, n_sink:][:, :, -window:]], dim=2)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_keeps_sinks_and_last_window_in_order(models, name):
    model, _ = models(name)
    ids = _ids(45, seed=4)
    n_sink, window = 3, 10
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    capture = PreRopeKeys(model)
    try:
        with torch.no_grad():
            cache = SinkWindowCache(model.config, n_sink, window)
            for chunk in torch.split(ids, [13, 1, 1, 17, 1, 1, 11], dim=1):
                model(chunk, past_key_values=cache)
                for i in range(len(captured)):
                    captured[i].append(capture.last[i])
            dynamic = DynamicCache()
            with SinkWindowPress(n_sink=n_sink, window=window)(model):
                model(ids, past_key_values=dynamic)
    finally:
        capture.remove()
    for i, layer in enumerate(cache.layers):
        assert layer.n_kept == n_sink + window and layer.get_seq_length() == 45
        want = _rotate(model, _expected_kept(captured[i], n_sink, window), torch.arange(n_sink + window))
        torch.testing.assert_close(layer.keys, want, atol=1e-5, rtol=1e-4)
    # the press, after a full-attention prefill: layer 0's keys depend only on the tokens
    layer = dynamic.layers[0]
    assert layer.n_kept == n_sink + window
    want = _rotate(model, _expected_kept(captured[0], n_sink, window), torch.arange(n_sink + window))
    torch.testing.assert_close(layer.keys, want, atol=1e-5, rtol=1e-4)


def test_no_drift_after_20000_bfloat16_tokens(models):
    """Stream 20,000 tokens at absolute positions (chunks, then single-token steps): the keys the cache returns and
    its stored pre-RoPE keys equal the model's pre-RoPE keys of the kept tokens, rotated where they belong."""
    model, _ = models("tiny-llama", torch.bfloat16)
    n_sink, window, chunk, total = 4, 32, 500, 20_000
    ids = _ids(total, seed=5)
    cache = SinkWindowCache(model.config, n_sink, window)
    capture = PreRopeKeys(model)
    sinks: list[torch.Tensor] = []
    recent: list[torch.Tensor] = []
    returned: dict[str, torch.Tensor] = {}
    layer = cache.layers[1]
    original_update = layer.update

    def spy(key_states, value_states, cache_kwargs=None):
        keys, values = original_update(key_states, value_states, cache_kwargs)
        returned["keys"] = keys.clone()
        return keys, values

    layer.update = spy
    try:
        with torch.no_grad():
            steps = [chunk] * ((total - 6) // chunk) + [1] * ((total - 6) % chunk + 6)
            start = 0
            for n in steps:
                model.model(ids[:, start : start + n], past_key_values=cache)
                start += n
                new = capture.last[1]
                if len(sinks) < n_sink:
                    sinks.append(new[:, :, : n_sink - len(sinks)])
                recent = [torch.cat([*recent, new], dim=2)[:, :, -window:]]
    finally:
        capture.remove()
        del layer.update
    assert start == total and cache.get_seq_length() == total
    raw = torch.cat([torch.cat(sinks, dim=2)[:, :, :n_sink], recent[0]], dim=2).float()  # logical order
    scale = raw.abs().max().item()

    oldest = (total - window - n_sink) % window  # ring index of the oldest window token

    def logical(ring: torch.Tensor) -> torch.Tensor:
        return torch.cat([ring[:, :, :n_sink], ring[:, :, n_sink:].roll(-oldest, 2)], dim=2)

    stored = logical(layer._raw_keys)
    torch.testing.assert_close(stored.float(), raw, atol=0.02 * scale, rtol=0.02)

    # the last decode step returned the workspace in ring order, at generate's positions: the new token at
    # total - 1, window tokens at their own index, sinks right before the window
    positions = torch.cat([torch.arange(total - window - n_sink, total - window), torch.arange(total - window, total)])
    want = _rotate(model, raw, positions)
    torch.testing.assert_close(logical(returned["keys"]).float(), want, atol=0.03 * scale, rtol=0.02)
    # the keys property: in-cache positions 0 .. kept-1
    torch.testing.assert_close(
        layer.keys.float(), _rotate(model, raw, torch.arange(n_sink + window)), atol=0.03 * scale, rtol=0.02
    )


# ------------------------------------------------------------------------------------------------ model.generate
class _Recorder(StoppingCriteria):
    def __init__(self, cache):
        self.cache, self.bytes, self.kept = cache, [], []

    def __call__(self, input_ids, scores, **kwargs):
        self.bytes.append(self.cache.memory_bytes())
        self.kept.append(self.cache.n_kept)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_generate_three_windows_constant_memory(models):
    model, _ = models("tiny-llama")
    n_sink, window, prompt = 4, 16, _ids(8, seed=6)
    cache = SinkWindowCache(model.config, n_sink, window)
    recorder = _Recorder(cache)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        past_key_values=cache,
        max_new_tokens=3 * window,
        min_new_tokens=3 * window,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([recorder]),
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=model.config.pad_token_id,
    )
    assert out.sequences.shape[1] == 8 + 3 * window
    assert len(set(recorder.bytes)) == 1  # allocated once, at the prefill
    ring = 1 * 2 * (n_sink + window) * 16 * 4  # [B, H_kv, slots, D] float32
    # per layer: key ring + value ring + inv_freq; one rotated-keys workspace shared by the layers
    assert recorder.bytes[0] == model.config.num_hidden_layers * (2 * ring + 8 * 4) + ring
    assert recorder.kept[-1] == n_sink + window and cache.get_seq_length() == 8 + 3 * window - 1
    # the same logits as a manual loop at in-cache positions (generate used absolute ones up to 55)
    with torch.no_grad():
        manual = _feed(
            model,
            SinkWindowCache(model.config, n_sink, window),
            out.sequences[:, :-1],
            [8] + [1] * (3 * window - 1),
            in_cache_positions=True,
        )
    torch.testing.assert_close(torch.stack(out.logits, dim=1), manual[:, 7:], atol=5e-5, rtol=1e-4)


def test_press_in_generate_keeps_evicting(models):
    model, _ = models("tiny-qwen3")
    prompt = _ids(30, seed=7)
    cache = DynamicCache()
    with SinkWindowPress(compression_ratio=0.5, n_sink=2)(model):
        model.generate(
            prompt,
            past_key_values=cache,
            max_new_tokens=25,
            min_new_tokens=25,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    layer = cache.layers[0]
    assert isinstance(layer, SinkWindowLayer) and layer.window == 13
    assert layer.n_kept == 15 and cache.get_seq_length() == 30 + 24


# ------------------------------------------------------------------------------------------------ kvpress pipeline
CONTEXT = " ".join(f"Item {i} of the list is the word {w}." for i, w in enumerate(["apple", "river", "stone"] * 8))


def test_pipeline_two_questions_match_single_questions(models):
    model, tokenizer = models("tiny-llama")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    q1, q2 = "Which word is item 3?", "Which word comes last?"
    cache = DynamicCache()
    press = SinkWindowPress(compression_ratio=0.5)
    both = pipe(CONTEXT, questions=[q1, q2], press=press, cache=cache, max_new_tokens=12)["answers"]
    alone = pipe(CONTEXT, question=q2, press=press, max_new_tokens=12)["answer"]
    assert len(both) == 2 and all(isinstance(a, str) for a in both)
    assert both[1] == alone
    context_length = cache.get_seq_length()
    layer = cache.layers[0]
    assert isinstance(layer, SinkWindowLayer)
    assert layer.window == round(context_length * 0.5) - 4 and layer.n_kept == 4 + layer.window
    assert layer.marked and layer._log_keys is not None and layer._log_keys.shape[2] <= layer.window

    # cache=SinkWindowCache: the press only marks its layers; still one answer per question, independent
    sw = SinkWindowCache(model.config, n_sink=4, window=40)
    both = pipe(CONTEXT, questions=[q1, q2], press=SinkWindowPress(), cache=sw, max_new_tokens=12)["answers"]
    alone = pipe(
        CONTEXT, question=q2, press=SinkWindowPress(), cache=SinkWindowCache(model.config, 4, 40), max_new_tokens=12
    )["answer"]
    assert both[1] == alone and sw.n_kept == 44


def test_pipeline_real_model_finds_needle(models):
    from pressroom.evaluation.corpora import corpus_text

    model, tokenizer = models("smollm2")
    haystack = tokenizer.decode(tokenizer.encode(corpus_text("pg_essays"), add_special_tokens=False)[:560])
    context = haystack + "\n\nImportant: the secret passcode is 4721. Remember it.\n"
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    press = SinkWindowPress(n_sink=4, window=128)
    cache = DynamicCache()
    answer = pipe(context, question="What is the secret passcode?", press=press, cache=cache, max_new_tokens=12)
    assert "4721" in answer["answer"]
    assert cache.layers[0].n_kept == 132 and cache.get_seq_length() > 560


# ---------------------------------------------------------------------------------------- errors, registry, memory
def test_bad_input(models):
    model, _ = models("tiny-llama")
    for kwargs in ({"window": 0}, {"window": -3}, {"n_sink": -1}, {"window": 2.5}, {"n_sink": True}):
        with pytest.raises(ValueError):
            SinkWindowCache(model.config, **kwargs)
    with pytest.raises(ValueError, match="config"):
        SinkWindowCache(None)
    for kwargs in ({"compression_ratio": 1.0}, {"compression_ratio": -0.1}, {"window": 0}, {"n_sink": -2}):
        with pytest.raises(ValueError):
            SinkWindowPress(**kwargs)
    cache = SinkWindowCache(model.config, 2, 4)
    ids = _ids(12)
    with torch.no_grad():
        model(ids[:, :8], past_key_values=cache)
        with pytest.raises(ValueError, match="position"):  # different positions per batch row
            model(
                ids[:, 8:10].expand(2, -1),
                past_key_values=SinkWindowCache(model.config, 2, 4),
                position_ids=torch.tensor([[0, 1], [5, 6]]),
            )
    layer = cache.layers[0]
    with pytest.raises(RuntimeError, match="no mark"):
        layer.keys = layer.keys
    cache.mark()
    with pytest.raises(ValueError, match="pruned"):
        layer.keys = layer.keys[:, :, :3]
    with pytest.raises(ValueError, match="crop"):
        cache.crop(4)
    with pytest.raises(ValueError, match="n_new"):
        cache.position_ids_for(0)
    with pytest.raises(TypeError):
        SinkWindowPress().compress(None, None, None, None, None, {})


def test_registry_and_window_rule():
    from pressroom.evaluation.press_registry import make_press

    assert PRESSES["sink_window"] is SinkWindowPress
    press = make_press("sink_window:n_sink=2,window=8", 0.5)
    assert isinstance(press, SinkWindowPress) and press.window_for(1000) == 8 and press.compression_ratio == 0.5
    assert SinkWindowPress(compression_ratio=0.75, n_sink=4).window_for(1000) == 246
    assert SinkWindowPress(compression_ratio=0.9, n_sink=4).window_for(20) == 1


def test_memory_accounting_and_undo_log(models):
    model, _ = models("tiny-mistral")
    ids = _ids(60, seed=8)
    cache = DynamicCache()
    with torch.no_grad():
        with SinkWindowPress(n_sink=4, window=20)(model):
            model(ids[:, :40], past_key_values=cache)
        layer = cache.layers[0]
        ring = 2 * 24 * 16 * 4
        assert layer.memory_bytes() == 3 * ring + 8 * 4  # its rings, inv_freq and the workspace it uses
        n_layers = len(cache.layers)
        assert cache_memory_bytes(cache) == n_layers * (2 * ring + 8 * 4) + ring  # the workspace is shared
        before_keys, before_values = layer.keys, layer.values
        reference = model(ids[:, 40:45], past_key_values=cache).logits
        for t in range(45, 60):  # a question and an answer longer than the window: the log stays bounded
            model(ids[:, t : t + 1], past_key_values=cache)
        assert layer._log_keys.shape[2] == layer.window
        log = 2 * 2 * 20 * 16 * 4  # keys + values of `window` tokens
        assert layer.memory_bytes() == 3 * ring + 8 * 4 + log
        assert cache_memory_bytes(cache) == n_layers * (2 * ring + 8 * 4 + log) + ring
        for lay in cache.layers:  # what kvpress's pipeline does to drop an answer
            n = 40
            lay.keys = lay.keys[:, :, :n]
            lay.values = lay.values[:, :, :n]
        assert cache.get_seq_length() == 40
        torch.testing.assert_close(layer.keys, before_keys)
        torch.testing.assert_close(layer.values, before_values)
        torch.testing.assert_close(model(ids[:, 40:45], past_key_values=cache).logits, reference)


@pytest.mark.parametrize("use_triton", [False, True])
def test_decoder_steady_state_equals_ordinary_steps(models, use_triton):
    """SinkWindowDecoder's steady-state path (stream index read on the device, as replayed by its CUDA graph; here
    run eagerly, with the Triton kernel under the interpreter) gives the logits and the cache of ordinary steps."""
    from pressroom.presses.sink_window_cache import SinkWindowDecoder

    model, _ = models("tiny-llama")
    ids = _ids(40, seed=3)
    plain = SinkWindowCache(model.config, n_sink=2, window=6, use_triton=use_triton)
    steady = SinkWindowCache(model.config, n_sink=2, window=6, use_triton=use_triton)
    decoder = SinkWindowDecoder(model, steady, use_graph=False)
    with torch.no_grad():
        for cache in (plain, steady):  # a prefill chunk, then token by token
            model(ids[:, :5], past_key_values=cache, position_ids=cache.position_ids_for(5), use_cache=True)
        for t in range(5, ids.shape[1]):
            ref = model(
                ids[:, t : t + 1], past_key_values=plain, position_ids=plain.position_ids_for(1), use_cache=True
            ).logits[:, -1]
            got = decoder.step(ids[:, t : t + 1])[:, -1]
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert steady.layers[0].seen == plain.layers[0].seen == ids.shape[1]
    for a, b in zip(plain.layers, steady.layers):
        torch.testing.assert_close(a._raw_keys, b._raw_keys)
        torch.testing.assert_close(a._values, b._values)
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        decoder.step(ids[:, :2])
