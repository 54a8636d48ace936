"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="module")
def tiny_llama():
    """(model, tokenizer) of the tiny random Llama (GQA), float32 on CPU, once per module."""
    from pressroom.evaluation.models import load_model

    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


@pytest.fixture
def random_commvq_books():
    """``make(config, residuals=3, bits=2)``: random but valid CommVQ codebooks (value codecs included), seeded."""
    from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, model_kv_shape

    def make(config, residuals: int = 3, bits: int = 2) -> CommVQCodebooks:
        torch.manual_seed(0)
        layers, heads, head_dim = model_kv_shape(config)
        theta = torch.randn(layers, heads, residuals, 128, head_dim // 2) * 0.3
        values = [ValueCodec(heads * head_dim, bits) for _ in range(layers)]
        return CommVQCodebooks("random", bits, residuals, head_dim, layers, heads, theta, values=values)

    return make


@pytest.fixture
def coded_layer():
    """``make(theta, codec, keys, values, **layer_kwargs)``: a ``CommVQLayer`` (plain RoPE frequencies) that has coded
    every token of ``keys`` / ``values`` ``[1, H, n, D]`` straight through ``_encode`` (positions ``0..n-1``)."""
    from pressroom.presses.commvq_cache import CommVQLayer

    def make(theta, codec, keys, values, **layer_kwargs):
        n, d = keys.shape[2], keys.shape[3]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        layer = CommVQLayer(theta, codec, inv_freq, d**-0.5, **layer_kwargs)
        layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
        layer.reserve(n)
        layer._encode(keys, values, torch.arange(n))
        return layer

    return make


@pytest.fixture
def sm90_probe():
    """Run Python ``code`` (an offline sm_90 compile) in a process without the interpreter and return the JSON of its
    last line; skip where this machine has no ptxas (Triton's), fail on any other error."""

    def run(code: str):
        try:  # skip only where there is no ptxas: a compile that fails (bad PTX) fails the test
            from triton import knobs

            ptxas = knobs.nvidia.ptxas.path
        except Exception:
            ptxas = None
        if not ptxas or not os.path.exists(ptxas):
            pytest.skip("no ptxas here: no sm_90 compile")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
