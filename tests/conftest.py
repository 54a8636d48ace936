"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32 on CPU."""
    from pressroom.evaluation.models import load_model

    return load_model("smollm2", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from pressroom.evaluation.models import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(params=["tiny-llama", "tiny-qwen3", "tiny-mistral"])
def tiny_model(request):
    """(model, tokenizer) of each tiny random architecture (GQA), float32 on CPU."""
    from pressroom.evaluation.models import load_model

    return load_model(request.param, device="cpu", dtype=torch.float32)
