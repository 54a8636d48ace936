"""CommVQ codebook training (arXiv 2506.18879): EM, E2E, KV collection, value codecs, the `commvq` CLI (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pressroom.evaluation.models import load_model, tiny_config
from pressroom.kernels.commvq_codebook import scale_pairs
from pressroom.presses.commvq_codebooks import CommVQCodebooks
from pressroom.training.cli import main as train_main
from pressroom.training.commvq import (
    ValueConfig,
    _rope,
    collect,
    keys_dir,
    load_layer,
    train_keys_layer,
    train_value_codec,
)
from pressroom.training.commvq_em import (
    E2EConfig,
    EMConfig,
    fit_keys_e2e,
    fit_keys_em,
    fit_step_em,
    key_relative_mse,
    prepare_keys,
    query_pair_weights,
    reference_fit_step,
)


def _synthetic_keys(n: int = 300, heads: int = 2, head_dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, heads * head_dim, generator=gen) * torch.linspace(0.2, 3.0, heads * head_dim)
    return prepare_keys(keys, heads)


def test_prepare_keys_normalizes_tokens_over_all_heads():
    keys = torch.randn(10, 32)
    r, norm = prepare_keys(keys, 2)
    assert r.shape == (2, 10, 16)
    torch.testing.assert_close(norm, keys.norm(dim=1))
    torch.testing.assert_close(r.transpose(0, 1).flatten(1).norm(dim=1), torch.ones(10))


def test_em_lowers_mse_every_residual():
    r, norm = _synthetic_keys()
    thetas, mse = fit_keys_em(r, norm, residuals=3, cfg=EMConfig(n_steps=3), use_triton=False)
    assert thetas.shape == (2, 3, 128, 8) and mse.shape == (2, 3)
    initial = (r.pow(2).sum(-1) * norm.pow(2)).sum(1) / (r.shape[1] * r.shape[2])  # error of coding nothing
    errors = torch.cat([initial.view(2, 1), mse], dim=1)
    assert (errors[:, 1:] < errors[:, :-1]).all(), errors
    rel = key_relative_mse(r, norm, thetas, use_triton=False)
    torch.testing.assert_close(rel, mse[:, -1] / initial, rtol=1e-4, atol=1e-6)


def test_em_step_matches_the_reference_iteration():
    r, norm = _synthetic_keys(n=256)
    cfg = EMConfig(n_steps=4)
    theta, best, iters = fit_step_em(r[:1], norm, 1.0, cfg, torch.Generator().manual_seed(3), use_triton=False)
    # the reference's own float32 inv() of the ill-conditioned normal matrix costs it ~1e-3 relative; in float64
    # its iteration and ours (float64 solve, additive E-step) agree closely. Ours runs on float32 keys, whose
    # matmuls round differently with the CPU's BLAS: 4 iterations agree within 1e-4 on one machine, 2.2e-4 on
    # another; a different iteration (another E-step, M-step or init) is off by percents
    for dtype, rtol in ((torch.float64, 5e-4), (torch.float32, 2e-3)):
        gen = torch.Generator().manual_seed(3)
        ref_theta, ref_best, ref_iters = reference_fit_step(r[0].to(dtype), norm.to(dtype), 1.0, cfg, gen)
        assert int(iters[0]) == ref_iters
        torch.testing.assert_close(best[0], ref_best.float(), rtol=rtol, atol=0)
        if dtype == torch.float64:  # |theta| up to 0.23; a few rarely used centers move most with the rounding (the
            # reference's own float32 run is 2.7e-3 off its float64 one on this data)
            diff = (theta[0] - ref_theta.float()).abs()
            assert diff.max() < 1e-2 and (diff < 2e-3).float().mean() > 0.99, diff.max()


def test_e2e_loss_falls():
    r, norm = _synthetic_keys(n=256)
    _, mse, history = fit_keys_e2e(r, norm, residuals=1, cfg=E2EConfig(steps=16, batch=128, lr=1e-2))
    assert mse.shape == (2, 1)
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4, history


def test_value_codec_training_lowers_loss():
    torch.manual_seed(0)
    from pressroom.presses.commvq_codebooks import ValueCodec

    n, heads, kv_heads, d = 96, 2, 1, 8
    q, k, v = torch.randn(n, heads * d), torch.randn(n, kv_heads * d), torch.randn(n, kv_heads * d)
    codec = ValueCodec(kv_heads * d, bits=2, intermediate_dim=32)
    hist = train_value_codec(
        codec, q, k, v, [48, 48], 1.0 / 10000 ** (torch.arange(0, d, 2) / d), 1.0, heads, kv_heads,
        ValueConfig(steps=30, batch=4, window=16, lr=1e-2),
    )  # fmt: skip
    assert sum(hist[-5:]) / 5 < sum(hist[:5]) / 5, hist


def test_value_codebook_polish_lowers_the_coded_error():
    """Least-squares rounds: the training error (bits refined as the cache codes them) falls round after round, and
    the polished codebook also codes unseen values from the same source better; 0 rounds change nothing."""
    from pressroom.presses.commvq_codebooks import ValueCodec
    from pressroom.training.commvq import polish_value_codebook

    torch.manual_seed(0)
    codec = ValueCodec(16, bits=2, intermediate_dim=32).eval()
    mix = torch.randn(16, 16)
    train, test = torch.randn(512, 16) @ mix, torch.randn(256, 16) @ mix

    def err(v):
        bits, coef = codec.refine(v, codec.encode(v)[0], 16)
        return float(((v - coef * (bits.float() @ codec.channel_embedding())) ** 2).sum() / (v**2).sum())

    before = codec.embedding.detach().clone()
    assert polish_value_codebook(codec, train, 0) == [] and torch.equal(codec.embedding, before)
    test_before = err(test)
    hist = polish_value_codebook(codec, train, 3, refine_steps=16, chunk=200)
    assert len(hist) == 3 and hist[2] < hist[1] < hist[0]
    assert err(test) < test_before
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        polish_value_codebook(codec, train, -1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


def test_collected_keys_are_pre_rope(tiny, tmp_path):
    model, tok = tiny
    kv_dir = collect(model, tok, tmp_path, max_tokens=40, seq_len=40, show_progress=False)
    data, lengths = load_layer(kv_dir, 1, ("k", "v", "q"))
    assert lengths == [40] and data["q"].shape == (40, 64) and data["k"].shape == (40, 32)
    ids = load_file(str(kv_dir / "shard_00000.safetensors"))["ids"]
    with torch.no_grad():
        out = model(ids.view(1, -1), use_cache=True)
    cached_k = out.past_key_values.layers[1].keys[0].transpose(0, 1)  # [T, H, d], after RoPE
    cached_v = out.past_key_values.layers[1].values[0].transpose(0, 1)
    rotary = model.model.rotary_emb
    ours = _rope(data["k"].float().view(40, 2, 16), torch.arange(40), rotary.inv_freq, rotary.attention_scaling)
    torch.testing.assert_close(ours, cached_k, atol=2e-3, rtol=2e-3)  # fp16 storage
    torch.testing.assert_close(data["v"].float().view(40, 2, 16), cached_v, atol=2e-3, rtol=2e-3)


def test_collection_resumes_without_duplicating_tokens(tiny, tmp_path):
    model, tok = tiny
    full = collect(model, tok, tmp_path / "full", max_tokens=100, seq_len=32, show_progress=False)
    part = collect(model, tok, tmp_path / "part", max_tokens=100, seq_len=32, stop_after=2, show_progress=False)
    assert len(list(part.glob("shard_*.safetensors"))) == 2
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_layer(part, 0)
    collect(model, tok, tmp_path / "part", max_tokens=100, seq_len=32, show_progress=False)  # resume
    a, la = load_layer(full, 0, ("k", "v"))
    b, lb = load_layer(part, 0, ("k", "v"))
    assert la == lb == [32, 32, 32, 4]
    ids = torch.cat([load_file(str(p))["ids"] for p in sorted(part.glob("shard_*.safetensors"))])
    from pressroom.evaluation.corpora import corpus_tokens

    assert torch.equal(ids, corpus_tokens(tok, "pg_essays", "train")[:100])
    torch.testing.assert_close(a["k"], b["k"])
    with pytest.raises(ValueError, match="other settings"):
        collect(model, tok, tmp_path / "part", max_tokens=100, seq_len=16, show_progress=False)


def test_cli_all_on_a_tiny_model(tmp_path):
    out = tmp_path / "run"
    args = ["commvq", "all", "--model", "tiny-llama", "--bits", "1", "--output", str(out), "--device", "cpu",
            "--max-tokens", "192", "--heldout-tokens", "64", "--seq-len", "64", "--em-steps", "2",
            "--value-steps", "3", "--value-window", "32"]  # fmt: skip
    assert train_main(args) == 0
    books = CommVQCodebooks.load(out, bits=1)
    books.validate(tiny_config("tiny-llama"))
    assert (books.residuals, books.head_dim, books.num_layers, books.num_kv_heads) == (1, 16, 2, 2)
    assert books.values is not None and len(books.values) == 2
    result = json.loads((out / "1bit" / "em" / "heldout_mse.json").read_text())
    assert len(result["keys_rel_mse"]) == 2 and 0 < result["keys_rel_mse_mean"] < 1
    assert len(result["values_rel_mse"]) == 2
    # the cache's default coding (refined bits) codes the held-out values no worse than the encoder alone
    assert all(r <= e * (1 + 1e-5) for r, e in zip(result["values_rel_mse_refined"], result["values_rel_mse"]))
    # the reference files written by `keys` and the native codebook hold the same thetas (fp16 in native)
    ref = CommVQCodebooks.load(out / "1bit" / "keys_em")
    torch.testing.assert_close(ref.key_theta.half().float(), books.key_theta)
    # convert both ways through the CLI
    assert train_main(["commvq", "convert", "--input", str(out / "1bit" / "em"), "--to", "reference",
                       "--output", str(tmp_path / "ref"), "--bits", "1"]) == 0  # fmt: skip
    assert train_main(["commvq", "convert", "--input", str(tmp_path / "ref"), "--to", "native",
                       "--output", str(tmp_path / "nat"), "--bits", "1"]) == 0  # fmt: skip
    assert torch.equal(CommVQCodebooks.load(tmp_path / "nat").key_theta, books.key_theta)
    # a second `all` finds every unit of work done and redoes none
    assert train_main(args) == 0


def test_cli_rejects_bad_layer(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["commvq", "collect", "--model", "tiny-llama", "--output", str(out), "--device", "cpu",
                       "--max-tokens", "32", "--seq-len", "32"]) == 0  # fmt: skip
    assert train_main(["commvq", "keys", "--output", str(out), "--layer", "7", "--device", "cpu"]) == 2
    assert "outside 0..1" in capsys.readouterr().err


def test_weighted_sums_split_over_tokens_equal_the_plain_product():
    """The M-step's p^T r, cut into chunks of tokens (equal chunks; an N with no even split falls back)."""
    from pressroom.training.commvq_em import weighted_sums

    torch.manual_seed(3)
    for n in (4096, 1000, 1001):
        p, r = torch.rand(2, n, 64), torch.randn(2, n, 16)
        exact = (p.double().transpose(1, 2) @ r.double()).float()
        torch.testing.assert_close(weighted_sums(p, r, min_chunk=64), exact, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(weighted_sums(p, r), exact, atol=1e-4, rtol=1e-5)  # short: the plain product


def test_query_pair_weights():
    """Energy per RoPE pair (channels p and p + d/2 of the rotate_half layout), pooled over a KV head's query heads,
    mean 1 per KV head, then to the power; bad input raises."""
    q = torch.zeros(5, 4 * 8)  # 4 query heads of head_dim 8 (pairs 0..3), 2 KV heads
    q[:, 0] = 2.0  # head 0, pair 0 (first coordinate)
    q[:, 4] = 2.0  # head 0, pair 0 (second coordinate): energy 8
    q[:, 8 + 1] = 2.0  # head 1, pair 1: energy 4
    q[:, 16:] = 1.0  # heads 2, 3: energy 2 in every pair
    w = query_pair_weights(q, num_kv_heads=2, head_dim=8, power=1.0)
    want0 = torch.tensor([4.0, 2.0, 0.0, 0.0]) / 1.5  # group 0: mean of heads 0, 1 = [4, 2, 0, 0], mean 1.5
    torch.testing.assert_close(w[0], want0.clamp_min(1e-6))
    torch.testing.assert_close(w[1], torch.ones(4))
    torch.testing.assert_close(query_pair_weights(q, 2, 8, 0.5), w.sqrt())
    assert torch.equal(query_pair_weights(q, 2, 8, 0.0), torch.ones(2, 4))
    with pytest.raises(ValueError, match=">= 0"):
        query_pair_weights(q, 2, 8, -1.0)
    with pytest.raises(ValueError, match="whole heads"):
        query_pair_weights(q, 3, 8, 1.0)


def test_key_relative_mse_is_scale_free_in_the_weights():
    """Equal weights search like the Euclidean distance (the same codes, the same error); unequal ones change it."""
    r, norm = _synthetic_keys(n=200)
    thetas, _ = fit_keys_em(r, norm, residuals=2, cfg=EMConfig(n_steps=2), use_triton=False)
    plain = key_relative_mse(r, norm, thetas, use_triton=False)
    torch.testing.assert_close(key_relative_mse(r, norm, thetas, False, torch.full((2, 8), 7.0)), plain)
    skewed = torch.ones(2, 8)
    skewed[:, 0] = 100.0
    assert not torch.allclose(key_relative_mse(r, norm, thetas, False, skewed), plain)


def test_keys_trained_under_query_weights(tiny, tmp_path):
    """``query_weight``: the layer's files carry the pair weights and the setting; a rerun with another setting
    raises instead of mixing distances; a collection without queries raises; ``0`` writes the reference's files."""
    model, tok = tiny
    collect(model, tok, tmp_path, max_tokens=96, seq_len=48, show_progress=False)
    em = EMConfig(n_steps=2)
    for layer in (0, 1):
        out = train_keys_layer(tmp_path, layer, 1, "em", None, "cpu", em, use_triton=False, query_weight=0.5)
        assert out["query_weight"] == 0.5
    data, _ = load_layer(tmp_path / "kv" / "train", 1, ("q", "k"))
    books = CommVQCodebooks.load(keys_dir(tmp_path, 1, "em"))
    weights = query_pair_weights(data["q"], 2, 16, 0.5)
    torch.testing.assert_close(books.key_pair_weights[1], weights)
    # the saved theta is EM's on the keys scaled by sqrt(w) per pair, scaled back: the weighted search of the
    # scaled keys over theta * sqrt(w) is then the search EM trained
    r, norm = prepare_keys(data["k"], 2)
    scaled, _ = fit_keys_em(scale_pairs(r, weights.sqrt()[:, None, :]), norm, 1, em, use_triton=False)
    torch.testing.assert_close(books.key_theta[1], scaled / weights.sqrt()[:, None, None, :])
    assert train_keys_layer(tmp_path, 1, 1, "em", None, "cpu", em, query_weight=0.5)["skipped"]
    with pytest.raises(ValueError, match="--key-query-weight"):
        train_keys_layer(tmp_path, 1, 1, "em", None, "cpu", em, query_weight=0.0)
    train_keys_layer(tmp_path, 1, 1, "em", None, "cpu", em, use_triton=False, force=True, query_weight=0.0)
    assert "pair_weights" not in torch.load(keys_dir(tmp_path, 1, "em") / "001_0.pt", weights_only=True)
    with pytest.raises(ValueError, match="pair_weights"):  # layer 0 weighted, layer 1 not: refused at load
        CommVQCodebooks.load(keys_dir(tmp_path, 1, "em"))
    books.save_reference(keys_dir(tmp_path, 1, "em"))  # weights without the setting (as convert writes them)
    with pytest.raises(ValueError, match="unknown"):
        train_keys_layer(tmp_path, 1, 1, "em", None, "cpu", em, query_weight=0.0)
    no_q = tmp_path / "noq"
    collect(model, tok, no_q, max_tokens=48, seq_len=48, queries=False, show_progress=False)
    with pytest.raises(ValueError, match="without queries"):
        train_keys_layer(no_q, 0, 1, "em", None, "cpu", em, query_weight=0.5)
