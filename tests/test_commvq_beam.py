"""Beam-search key encoding (kernels.commvq_beam) and its key_beam option in CommVQLayer / CommVQCache / CommVQPress."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pressroom.kernels.commvq_beam import MAX_BEAM, beam_search_head, check_beam, encode_keys_beam
from pressroom.kernels.commvq_codebook import centers_from_theta
from pressroom.kernels.commvq_encode import KeyTables, encode_keys_reference, normalize_keys, unpack_codes12
from pressroom.presses import CommVQCache, CommVQPress
from pressroom.presses.commvq_codebooks import model_kv_shape


def _keys(n: int, heads: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(seed))
    return x / x.flatten(1).norm(dim=1)[:, None, None]


def _sq_error(x: torch.Tensor, thetas: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Per-(row, head) squared error of packed codes ``[N, H, bytes]`` for ``thetas [H, R, 128, P]``."""
    r = thetas.shape[1]
    codes = unpack_codes12(packed, r)  # [N, H, R]
    centers = centers_from_theta(thetas)  # [H, R, 4096, D]
    heads = torch.arange(thetas.shape[0])[None]
    rec = sum(centers[:, i][heads, codes[..., i]] for i in range(r))
    return (x - rec).pow(2).sum(-1)


def test_beam_one_is_the_greedy_search():
    torch.manual_seed(0)
    thetas = torch.randn(2, 3, 128, 8) * 0.3
    x = _keys(200, 2, 16)
    assert torch.equal(encode_keys_beam(x, thetas, 1), encode_keys_reference(x, thetas))


def test_wide_beam_finds_the_exhaustive_optimum():
    """With a beam of all 4,096 first-step codes, two steps search all 4096^2 sequences: the exact optimum."""
    torch.manual_seed(1)
    thetas = torch.randn(1, 2, 128, 4) * 0.4
    x = _keys(3, 1, 8, seed=1)[:, 0]
    codes, err = beam_search_head(x, KeyTables(thetas), 0, 4096)
    centers = centers_from_theta(thetas[0])  # [2, 4096, 8]
    full = (x[:, None, None] - centers[0][None, :, None] - centers[1][None, None]).pow(2).sum(-1)
    best = full.flatten(1).min(1)
    torch.testing.assert_close(err, best.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(codes[:, 0] * 4096 + codes[:, 1], best.indices)


def test_wider_beams_lower_the_error_and_keep_the_format():
    torch.manual_seed(2)
    thetas = torch.randn(2, 4, 128, 8) * 0.3
    x = _keys(300, 2, 16, seed=2)
    errors = {}
    for beam in (1, 2, 4, 8):
        packed = encode_keys_beam(x, thetas, beam, row_chunk=64)  # several chunks
        assert packed.shape == (300, 2, 6) and packed.dtype == torch.uint8
        errors[beam] = _sq_error(x, thetas, packed).mean().item()
    assert errors[2] < errors[1] and errors[4] < errors[2] and errors[8] < errors[4]
    assert errors[8] < 0.9 * errors[1]


def test_row_norms_divide_first():
    torch.manual_seed(3)
    thetas = torch.randn(2, 2, 128, 8) * 0.3
    raw = torch.randn(50, 2, 16) * 3
    norms = raw.flatten(1).norm(dim=1)
    want = encode_keys_beam(raw / norms[:, None, None], thetas, 3)
    assert torch.equal(encode_keys_beam(raw, thetas, 3, row_norms=norms), want)
    with pytest.raises(ValueError, match="row_norms must be"):
        encode_keys_beam(raw, thetas, 3, row_norms=norms[:10])


@pytest.mark.parametrize("bad", [0, MAX_BEAM + 1, True, 2.0, "4"])
def test_bad_beams_raise(bad, tiny_llama, random_commvq_books):
    with pytest.raises(ValueError, match="key_beam must be an int"):
        check_beam(bad)
    model, _ = tiny_llama
    books = random_commvq_books(model.config, residuals=2)
    with pytest.raises(ValueError, match="key_beam must be an int"):
        CommVQCache(model.config, books, key_beam=bad)
    with pytest.raises(ValueError, match="key_beam must be an int"):
        CommVQPress(codebooks=books, key_beam=bad)


def test_key_beam_in_the_cache_and_the_press(tiny_llama, random_commvq_books):
    """key_beam=4: the cache holds the beam search's codes (same bytes as greedy), and the press passes it on."""
    model, tok = tiny_llama
    books = random_commvq_books(model.config, residuals=3)
    _, heads, head_dim = model_kv_shape(model.config)
    torch.manual_seed(4)
    keys, values, pos = torch.randn(1, heads, 40, head_dim), torch.randn(1, heads, 40, head_dim), torch.arange(40)
    x, _ = normalize_keys(keys)  # [1, 40, H, D]
    held = {}
    for beam in (1, 4):
        cache = CommVQCache(model.config, books, window=4, n_sink=0, use_triton=False, key_beam=beam)
        with torch.no_grad():
            model(torch.randint(5, 1000, (1, 6)), past_key_values=cache)
        layer = cache.layers[1]
        start = layer.n
        layer.append_prerope(keys, values, pos)
        got = layer.codes[0, :, start : layer.n].transpose(0, 1)  # [40, H, bytes]
        assert torch.equal(got, encode_keys_beam(x[0], books.key_theta[1], beam))
        held[beam] = (cache.memory_bytes(), _sq_error(x[0], books.key_theta[1], got).mean().item())
    assert held[4][0] == held[1][0] and held[4][1] < held[1][1]
    press = CommVQPress(codebooks=books, window=4, n_sink=0, use_triton=False, key_beam=4)
    ids = tok("a few words of context for the press to code, " * 3, return_tensors="pt").input_ids
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    assert all(layer.key_beam == 4 for layer in cache.layers)
