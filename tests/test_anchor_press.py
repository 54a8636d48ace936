"""AnchorPress: anchors on known token sequences, selection and budget, kvpress pipeline and model.generate."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kvpress import KnormPress, KVPressTextGenerationPipeline  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from pressroom.evaluation.press_registry import make_press, press_label  # noqa: E402
from pressroom.presses import PRESSES, AnchorPress  # noqa: E402
from pressroom.presses.anchor_press import (  # noqa: E402
    TIER_OTHER,
    TIER_RECENT,
    TIER_SEPARATOR,
    TIER_SINK,
    anchor_tiers,
    detach_id_capture,
    separator_token_ids,
    special_token_ids,
)


@pytest.fixture(scope="module")
def tiny():
    from pressroom.evaluation.models import load_model

    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


def _tables(tok, vocab=49157):
    sep = torch.zeros(vocab, dtype=torch.bool)
    sep[separator_token_ids(tok)] = True
    special = torch.zeros(vocab, dtype=torch.bool)
    special[special_token_ids(tok)] = True
    return sep, special


def test_separator_and_special_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    seps = set(separator_token_ids(tok))
    for text in (".", ",", ";", ":", "?", "!", "\n", "\n\n"):
        (tid,) = tok.encode(text, add_special_tokens=False)
        assert tid in seps, text
    for text in ("Hello", " world", " the"):
        assert tok.encode(text, add_special_tokens=False)[0] not in seps
    # another character set: only commas
    (comma,) = tok.encode(",", add_special_tokens=False)
    (period,) = tok.encode(".", add_special_tokens=False)
    only = set(separator_token_ids(tok, ","))
    assert comma in only and period not in only
    assert tok.convert_tokens_to_ids("<|im_start|>") in special_token_ids(tok)


def test_anchor_tiers_on_known_sequence(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "<|im_start|>user\nHello world, this is a test. Another sentence follows here and then the end"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    pieces = [tok.decode([i]) for i in ids[0]]
    sep, special = _tables(tok)
    tiers = anchor_tiers(ids, n_sink=2, n_recent=3, separator_lookup=sep, special_lookup=special)[0].tolist()
    n = len(pieces)
    for i, piece in enumerate(pieces):
        if i < 2 or piece == "<|im_start|>":
            expected = TIER_SINK
        elif i >= n - 3:
            expected = TIER_RECENT
        elif piece.strip() in {",", ".", ""} and (piece.strip() or "\n" in piece):
            expected = TIER_SEPARATOR
        else:
            expected = TIER_OTHER
        assert tiers[i] == expected, (i, piece, tiers[i])
    assert pieces.count(",") == 1 and pieces.count(".") == 1  # the sequence really has both separators
    # no special anchors when the table is not given; unknown ids (-1) are never anchors
    tiers2 = anchor_tiers(ids, n_sink=0, n_recent=0, separator_lookup=sep, special_lookup=None)[0]
    assert tiers2[0] == TIER_OTHER
    unknown = anchor_tiers(torch.full((1, 4), -1), n_sink=0, n_recent=0, separator_lookup=sep, special_lookup=special)
    assert unknown.eq(TIER_OTHER).all()


def test_selection_keeps_anchors_then_best_scores():
    press = AnchorPress(compression_ratio=0.5)
    tiers = torch.tensor([[3, 0, 0, 1, 0, 0, 1, 0, 2, 2]])
    scores = torch.tensor([[[0.0, 9.0, 1.0, 0.0, 8.0, 2.0, 0.0, 3.0, 0.0, 0.0]]])
    idx = press.selection(tiers, scores, 6)
    assert idx[0, 0].tolist() == [0, 1, 3, 6, 8, 9]  # 5 anchors + the best-scored other (index 1)
    # anchors beyond the budget: sinks, then recent, then the best-scored separators
    idx = press.selection(tiers, torch.tensor([[[0.0, 0, 0, 1.0, 0, 0, 5.0, 0, 0, 0]]]), 4)
    assert idx[0, 0].tolist() == [0, 6, 8, 9]


def test_prefill_keeps_every_anchor_and_the_budget(tiny, smollm2_tokenizer):
    model, _ = tiny
    tok = smollm2_tokenizer
    text = "One two three, four five six. Seven eight nine; ten eleven twelve!\nThirteen fourteen. " * 4
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    seq_len = ids.shape[1]
    full = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=full)
    press = AnchorPress(compression_ratio=0.6, n_sink=2, n_recent=4, tokenizer=tok, scorer=KnormPress())
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    n_kept = int(seq_len * 0.4)
    tiers = press.anchor_tiers(ids)[0]
    anchors = torch.nonzero(tiers > TIER_OTHER).flatten()
    assert 0 < len(anchors) <= n_kept
    for layer in range(len(cache.layers)):
        kept = cache.layers[layer].keys
        assert kept.shape[2] == n_kept and kept.is_contiguous()
        ref = full.layers[layer].keys
        for h in range(kept.shape[1]):
            dist = (ref[0, h][:, None] - kept[0, h][None]).abs().amax(-1)  # [L, n_kept]
            found = dist.min(dim=1).values == 0
            assert found[anchors].all(), f"layer {layer} head {h} lost an anchor"
            assert found.sum() == n_kept


def _prefill_inputs(model, ids):
    """(hidden_states, keys, values, attentions, kwargs) of layer 0 for a prefill of ``ids`` (captures ids too)."""
    captured = {}

    def hook(module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        captured["args"] = (
            kwargs["hidden_states"],
            cache.layers[0].keys,
            cache.layers[0].values,
            None,
            kwargs,
        )

    handle = model.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        model.model(input_ids=ids, past_key_values=DynamicCache())
    finally:
        handle.remove()
    return captured["args"]


def test_pipeline_generate_and_registry(tiny, smollm2_tokenizer):
    model, _ = tiny
    tok = smollm2_tokenizer
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok, device="cpu")
    context = "A sentence, with commas. And periods!\n" * 12
    press = AnchorPress(compression_ratio=0.5, n_recent=8, tokenizer=tok)
    out = pipe(context, questions=["First?", "Second?"], press=press, max_new_tokens=2)
    assert len(out["answers"]) == 2
    assert press.last_stats["n_kept"] == int(press.last_stats["seq_len"] * 0.5)
    ids = torch.tensor([tok.encode(context, add_special_tokens=False)])
    with torch.no_grad(), press(model):
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3
    assert press.last_stats["seq_len"] == ids.shape[1]
    # kvpress wrappers that select from score() keep the anchors too
    from kvpress import KeyRerotationPress

    wrapped = KeyRerotationPress(AnchorPress(compression_ratio=0.5, n_recent=8, tokenizer=tok))
    assert len(pipe(context, question="Third?", press=wrapped, max_new_tokens=2)["answer"]) >= 0
    # under a wrapper the ids come from a persistent capture hook on the model
    with torch.no_grad():
        ranks = wrapped.press.score(model.model.layers[0].self_attn, *_prefill_inputs(model, ids))
    tiers = wrapped.press.anchor_tiers(ids)
    assert ranks[:, :, tiers[0] > TIER_OTHER].min() > ranks[:, :, tiers[0] == TIER_OTHER].max()
    assert detach_id_capture(model) and not detach_id_capture(model)
    # registry: name, parameters, label
    assert PRESSES["anchor"] is AnchorPress
    built = make_press("anchor:n_recent=16,scorer=knorm", 0.75)
    assert isinstance(built, AnchorPress) and built.n_recent == 16 and built.compression_ratio == 0.75
    assert isinstance(built.scorer, KnormPress)
    assert "/" not in press_label("anchor:adapter=/some/dir/final,n_recent=16")


def test_anchor_press_errors(tiny, tmp_path):
    model, _ = tiny
    for kwargs, match in (
        ({"compression_ratio": 1.0}, "compression_ratio"),
        ({"compression_ratio": -0.1}, "compression_ratio"),
        ({"n_sink": -1}, "n_sink"),
        ({"n_recent": 1.5}, "n_recent"),
        ({"scorer": "nonsense"}, "scorer"),
        ({"adapter": str(tmp_path)}, "adapter_config.json"),
        ({"separators": 3}, "separators"),
    ):
        with pytest.raises(ValueError, match=match):
            AnchorPress(**kwargs)
    # a model without a tokenizer to find separators in
    with pytest.raises(ValueError, match="tokenizer"):
        with AnchorPress(compression_ratio=0.5)(model):
            pass
    # explicit separator ids need no tokenizer; inputs_embeds hide the ids: a clear error
    press = AnchorPress(compression_ratio=0.5, separators=(13, 30))
    embeds = model.get_input_embeddings()(torch.arange(10, 30)[None])
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad(), press(model):
        model.model(inputs_embeds=embeds, past_key_values=DynamicCache())
