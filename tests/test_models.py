"""Models: tiny random architectures and the embedded SmolLM2 load and run; bad names fail clearly."""

from __future__ import annotations

import pytest
import torch

from pressroom.evaluation.models import load_model, model_label, smollm2_gguf_path


def test_tiny_models_gqa_and_deterministic(tiny_model):
    model, tokenizer = tiny_model
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    again, _ = load_model(f"tiny-{cfg.model_type}")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)  # seeded weights


def test_embedded_model_is_smollm2(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert tokenizer.model_max_length == 8192 and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_second_load_is_fast(smollm2):
    import time

    start = time.perf_counter()
    load_model("smollm2", device="cpu", dtype=torch.float32)
    assert time.perf_counter() - start < 15  # cached safetensors, no GGUF conversion


def test_bad_model_names(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="Unknown tiny model"):
        load_model("tiny-gpt")
    with pytest.raises(ValueError, match="Could not load model"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-llama", dtype="float7")
    monkeypatch.setenv("PRESSROOM_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="PRESSROOM_SMOLLM2_GGUF"):
        smollm2_gguf_path()


def test_model_label():
    assert model_label("meta-llama/Llama-3.1-8B") == "meta-llama--Llama-3.1-8B"
