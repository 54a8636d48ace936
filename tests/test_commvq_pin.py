"""CommVQPress pin_ratio: the prefill tokens the observation window attends to most stay in full precision."""

from __future__ import annotations

import pytest
import torch
from kvpress import ComposedPress, KVPressTextGenerationPipeline, SnapKVPress
from transformers import DynamicCache

from pressroom.presses import CommVQAblationPress, CommVQLayer, CommVQPress
from pressroom.presses.commvq_codebooks import model_kv_shape


class Spy(CommVQPress):
    """Records, per layer, the pinned tokens the press chose."""

    chosen: dict

    def pinned_tokens(self, module, hidden_states, keys, position_embeddings):
        pin = super().pinned_tokens(module, hidden_states, keys, position_embeddings)
        self.chosen[module.layer_idx] = pin
        return pin


def _prefill(model, press, ids):
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    return cache


def test_pinned_tokens_stay_exact_through_decoding(tiny_llama, random_commvq_books):
    model, _ = tiny_llama
    books = random_commvq_books(model.config)
    ids = torch.randint(5, 1000, (1, 200), generator=torch.Generator().manual_seed(1))
    kw = dict(codebooks=books, window=32, n_sink=4, use_triton=False, pin_window=16)
    press = Spy(**kw, pin_ratio=0.1)
    press.chosen = {}
    cache = _prefill(model, press, ids)
    plain = _prefill(model, CommVQPress(**kw), ids)
    for i, layer in enumerate(cache.layers):
        pin = press.chosen[i]
        assert isinstance(layer, CommVQLayer) and pin.numel() == 20 == layer.npin  # round(0.1 * 200)
        assert torch.equal(pin, pin.sort().values) and pin.min() >= 4 and pin.max() < 200 - 32
        assert torch.equal(layer.wpos[0, 4:24].long(), pin)  # after the sinks, for good
        assert layer.n + layer.nw == 200 and layer.nw - 24 <= 32  # recent tokens: at most the window
        assert plain.layers[i].n + plain.layers[i].nw == 200
    # reconstructed in prefill order: the pinned tokens, the sinks and the window are the prefill's own
    exact = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=exact)
    coded = _prefill(model, CommVQAblationPress(**kw, pin_ratio=0.1, coded="both"), ids)
    same = ((exact.layers[1].keys - coded.layers[1].keys).abs().amax(dim=(0, 1, 3)) < 1e-5).nonzero().flatten()
    want = torch.cat((torch.arange(4), press.chosen[1], torch.arange(200 - 32, 200)))
    assert torch.equal(same, want)
    with torch.no_grad():  # decoding flushes the window; the pinned tokens stay
        out = model(torch.tensor([[7]]), past_key_values=cache)
        for _ in range(40):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    layer = cache.layers[1]
    assert layer.npin == 20 and torch.equal(layer.wpos[0, 4:24].long(), press.chosen[1]) and layer.seen == 241


def test_pins_cost_their_full_precision_bytes(tiny_llama, random_commvq_books):
    """memory_bytes: each pinned token adds a window slot (keys, values, position; twice while marked) and leaves
    the coded part (its codes, norms, value bits, coefficient, position)."""
    model, _ = tiny_llama
    books = random_commvq_books(model.config)
    ids = torch.randint(5, 1000, (1, 300), generator=torch.Generator().manual_seed(2))
    kw = dict(codebooks=books, window=32, n_sink=4, use_triton=False)
    pinned = _prefill(model, CommVQPress(**kw, pin_ratio=0.05), ids).layers[0]
    plain = _prefill(model, CommVQPress(**kw), ids).layers[0]
    k = pinned.npin
    assert k == 15
    slot = pinned.wkeys[0, :, 0].numel() * (pinned.wkeys.element_size() + pinned.wvals.element_size())
    slot += pinned.wpos.element_size()
    assert pinned.wkeys.shape[2] == plain.wkeys.shape[2] + k
    window = sum(t.numel() * t.element_size() for t in (pinned.wkeys, pinned.wvals, pinned.wpos))
    window_plain = sum(t.numel() * t.element_size() for t in (plain.wkeys, plain.wvals, plain.wpos))
    assert window - window_plain == k * slot
    assert pinned.n + pinned.nw == plain.n + plain.nw == 300  # every token held once, coded or exact
    # the marked snapshot (kvpress's multi-question protocol) copies the window: the pins count twice while marked
    assert pinned._mark[2].shape == pinned.wkeys.shape


def test_pins_in_the_pipeline_with_several_questions(tiny_llama, random_commvq_books):
    model, tok = tiny_llama
    books = random_commvq_books(model.config)
    press = CommVQPress(codebooks=books, window=16, flush_chunk=8, pin_ratio=0.1, pin_window=8)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    context = "The quick brown fox jumps over the lazy dog. " * 10
    questions = ["What jumps?", "Who is lazy?"]
    both = pipe(context, questions=questions, press=press, max_new_tokens=5)["answers"]
    single = [pipe(context, question=q, press=press, max_new_tokens=5)["answer"] for q in questions]
    assert both == single


def test_pin_errors(tiny_llama, random_commvq_books):
    model, _ = tiny_llama
    books = random_commvq_books(model.config)
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="pin_ratio must be"):
            CommVQPress(codebooks=books, pin_ratio=bad)
    for bad in (0, -3, 2.5, False):
        with pytest.raises(ValueError, match="pin_window must be"):
            CommVQPress(codebooks=books, pin_window=bad)
    press = ComposedPress([SnapKVPress(compression_ratio=0.5), CommVQPress(codebooks=books, window=8, pin_ratio=0.1)])
    ids = torch.randint(5, 1000, (1, 120))
    with pytest.raises(ValueError, match="cannot follow an eviction press"):
        _prefill(model, press, ids)
    layer = _prefill(model, CommVQPress(codebooks=books, window=32, n_sink=4, use_triton=False), ids[:, :100])
    fresh = CommVQLayer(books.key_theta[0], books.values[0], torch.ones(model_kv_shape(model.config)[2] // 2))
    keys, values = layer.layers[0].keys, layer.layers[0].values
    cos, sin = torch.ones(1, 100, keys.shape[-1]), torch.zeros(1, 100, keys.shape[-1])
    with pytest.raises(ValueError, match="pin must be distinct prefill positions"):
        fresh.load_prefill(keys, values, cos, sin, pin=torch.tensor([99]))  # inside the last window


def test_pin_span_keeps_what_follows_the_attended_tokens(tiny_llama, random_commvq_books, monkeypatch):
    """A spike of window attention at token t pins t and the pin_span - 1 tokens after it (then the next best)."""
    from pressroom.presses import commvq_press

    model, _ = tiny_llama
    books = random_commvq_books(model.config)
    n, w = 100, 8

    def spike(module, hidden_states, keys, window, position_embeddings):
        attn = torch.full((1, 2, window, n - window), 1e-4)
        attn[0, 1, :, 40] = 0.5  # one head, token 40
        attn[0, 0, :, 70] = 0.2
        return attn

    monkeypatch.setattr(commvq_press.SnapKVPress, "compute_window_attention", staticmethod(spike))
    keys = torch.zeros(1, 1, n, 4)
    for span, want in ((1, [40, 70]), (3, [40, 41, 42, 70, 71, 72])):
        press = CommVQPress(codebooks=books, window=16, n_sink=4, pin_ratio=len(want) / n, pin_window=w, pin_span=span)
        got = press.pinned_tokens(model.model.layers[0].self_attn, None, keys, None)
        assert got.tolist() == want
    with pytest.raises(ValueError, match="pin_span must be"):
        CommVQPress(codebooks=books, pin_span=0)
