"""CommVQ codebooks: the commutative T, centers, nearest-center kernel, formats, validation (arXiv 2506.18879)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import LlamaConfig

from pressroom.kernels.commvq_codebook import (
    additive_parts,
    centers_from_theta,
    commutative_T,
    em_estep,
    em_estep_reference,
    from_interleaved,
    nearest_centers,
    nearest_centers_reference,
    residual_decode,
    residual_encode,
    stats_TtS,
    theta_from_stats,
    to_interleaved,
)
from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, residuals_for_bits, save_reference_layer

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reference_T() -> torch.Tensor:
    # The loop of the reference's quantize_key_cache.py, written out (XAB = XA - YB, YAB = XB + YA).
    t = torch.zeros(8192, 128)
    for a in range(64):
        for b in range(64):
            t[2 * (a * 64 + b), 2 * a] = 1
            t[2 * (a * 64 + b), 2 * b + 1] = -1
            t[2 * (a * 64 + b) + 1, 2 * b] = 1
            t[2 * (a * 64 + b) + 1, 2 * a + 1] = 1
    return t


def test_T_has_reference_structure_and_diagonal_gram():
    t = commutative_T()
    assert torch.equal(t, _reference_T())
    gram = t.T @ t
    assert torch.count_nonzero(gram - torch.diag(torch.diagonal(gram))) == 0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_centers_match_T_and_additive_parts(head_dim):
    torch.manual_seed(0)
    p = head_dim // 2
    theta = torch.randn(128, p)
    centers = centers_from_theta(theta)
    assert centers.shape == (4096, head_dim)
    via_t = (commutative_T() @ theta).view(4096, 2, p).permute(0, 2, 1).flatten(1)  # the reference's layout
    torch.testing.assert_close(centers, via_t)
    u, w = additive_parts(theta)
    assert u.shape == w.shape == (64, head_dim)
    torch.testing.assert_close(centers.view(64, 64, head_dim), u[:, None] + w[None, :])


def test_every_center_commutes_with_rope_rotations():
    torch.manual_seed(1)
    theta = torch.randn(128, 4)
    centers = centers_from_theta(theta).view(4096, 4, 2)  # (X, Y) per pair
    x, y = centers[..., 0], centers[..., 1]
    c = torch.stack((torch.stack((x, -y), -1), torch.stack((y, x), -1)), -2)  # [4096, 4, 2, 2]
    for angle in (0.3, -1.7, 2.9):
        ang = torch.tensor(angle)
        rot = torch.tensor([[torch.cos(ang), -torch.sin(ang)], [torch.sin(ang), torch.cos(ang)]])
        torch.testing.assert_close(rot @ c, c @ rot)
    # so rotating a center equals multiplying by it: RoPE on quantized keys = RoPE on the center's (X, Y) pair


def test_interleave_round_trip_and_layout():
    x = torch.arange(8.0)
    assert to_interleaved(x).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    y = torch.randn(3, 5, 64)
    assert torch.equal(from_interleaved(to_interleaved(y)), y)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_nearest_reference_equals_brute_force(head_dim):
    torch.manual_seed(2)
    theta = torch.randn(128, head_dim // 2) * 0.1
    r = torch.randn(500, head_dim) * 0.3
    codes = nearest_centers_reference(r, theta)
    brute = torch.cdist(r, centers_from_theta(theta)).argmin(1)
    assert torch.equal(codes, brute)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU) or CUDA")
@pytest.mark.parametrize("head_dim,n", [(64, 130), (128, 70), (16, 5)])
def test_triton_nearest_equals_reference(head_dim, n):
    torch.manual_seed(3)
    theta = torch.randn(128, head_dim // 2) * 0.1
    r = torch.randn(n, head_dim) * 0.3
    assert torch.equal(nearest_centers(r, theta, use_triton=True), nearest_centers_reference(r, theta))


def test_residual_encode_decode():
    torch.manual_seed(4)
    thetas = torch.randn(3, 128, 8) * torch.tensor([0.3, 0.1, 0.03]).view(3, 1, 1)
    r = torch.randn(200, 16) * 0.3
    codes, res = residual_encode(r, thetas, use_triton=False)
    assert codes.shape == (200, 3) and codes.dtype == torch.int64
    torch.testing.assert_close(residual_decode(codes, thetas) + res, r, atol=1e-5, rtol=0)
    # greedy: each step codes the residual of the previous ones
    c0 = nearest_centers_reference(r, thetas[0])
    assert torch.equal(codes[:, 0], c0)


def test_residuals_for_bits():
    assert residuals_for_bits(2, 128) == 21 and residuals_for_bits(1, 128) == 11
    assert residuals_for_bits(2, 64) == 11 and residuals_for_bits(1, 64) == 5


def _books(layers=2, heads=3, head_dim=64, bits=2, values=True) -> CommVQCodebooks:
    torch.manual_seed(5)
    r = residuals_for_bits(bits, head_dim)
    codecs = None
    if values:
        codecs = [ValueCodec(heads * head_dim, bits, intermediate_dim=32) for _ in range(layers)]
        for c in codecs:
            c.scale.uniform_(0.5, 2.0)
    return CommVQCodebooks(
        model_name="tiny",
        bits=bits,
        residuals=r,
        head_dim=head_dim,
        num_layers=layers,
        num_kv_heads=heads,
        key_theta=torch.randn(layers, heads, r, 128, head_dim // 2).half().float(),
        values=codecs,
        key_mse=torch.rand(layers, heads, r),
    )


@pytest.mark.parametrize("head_dim,bits", [(64, 1), (128, 2)])
def test_format_round_trips(tmp_path, head_dim, bits):
    books = _books(layers=2, heads=2, head_dim=head_dim, bits=bits)
    native = CommVQCodebooks.load(books.save_native(tmp_path / "native"))
    assert torch.equal(native.key_theta, books.key_theta)  # theta was fp16-representable
    assert (native.residuals, native.head_dim, native.bits) == (books.residuals, head_dim, bits)
    v = torch.randn(4, 2 * head_dim)
    for a, b in zip(books.values, native.values):
        bits_a, pre_a = a.encode(v)
        bits_b, pre_b = b.encode(v)
        assert torch.equal(bits_a, bits_b)
        torch.testing.assert_close(a.decode(bits_a, pre_a), b.decode(bits_b, pre_b))
    ref_dir = native.save_reference(tmp_path / "ref")
    data = torch.load(ref_dir / "001_1.pt", weights_only=True)
    assert set(data) == {"steps", "final_error"} and isinstance(data["final_error"], float)
    step = data["steps"][0]
    assert set(step) == {"mse_loss", "theta", "clustering_centers"} and step["mse_loss"].dim() == 0
    assert step["theta"].shape == (128, head_dim // 2) and step["clustering_centers"].shape == (4096, head_dim)
    back = CommVQCodebooks.load(ref_dir)
    assert back.values is None and back.bits == bits
    assert torch.equal(back.key_theta, books.key_theta)
    torch.testing.assert_close(back.key_mse, books.key_mse)
    again = CommVQCodebooks.load(back.save_native(tmp_path / "native2"))
    assert torch.equal(again.key_theta, books.key_theta)
    torch.testing.assert_close(again.key_centers(1)[1], torch.stack([s["clustering_centers"] for s in data["steps"]]))


def test_load_by_bits_subdir_and_bits_mismatch(tmp_path):
    books = _books(values=False, bits=1)
    books.save_native(tmp_path / "1bit")
    assert CommVQCodebooks.load(tmp_path, bits=1).residuals == 5
    with pytest.raises(ValueError, match="1-bit"):
        CommVQCodebooks.load(tmp_path / "1bit", bits=2)
    with pytest.raises(FileNotFoundError):
        CommVQCodebooks.load(tmp_path / "nothing")


def test_reference_files_never_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"steps": [Evil()], "final_error": 0.0}, tmp_path / "000_0.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        CommVQCodebooks.load(tmp_path)


def test_validate_refuses_wrong_model():
    books = _books(layers=2, heads=3, head_dim=64, values=False)

    def cfg(layers, kv, head_dim):
        return LlamaConfig(
            num_hidden_layers=layers,
            num_attention_heads=kv * 3,
            num_key_value_heads=kv,
            hidden_size=head_dim * kv * 3,
            head_dim=head_dim,
        )

    books.validate(cfg(2, 3, 64))
    with pytest.raises(ValueError, match="2 layers but the model has 4"):
        books.validate(cfg(4, 3, 64))
    with pytest.raises(ValueError, match="3 KV heads but the model has 1"):
        books.validate(cfg(2, 1, 64))
    with pytest.raises(ValueError, match="head_dim 64 but the model has 32.*pressroom-train commvq"):
        books.validate(cfg(2, 3, 32))


def test_value_codec_bits_and_decode():
    torch.manual_seed(6)
    codec = ValueCodec(feat_dim=32, bits=1, intermediate_dim=16)
    v = torch.randn(2, 7, 32)
    bits, prescale = codec.encode(v)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 7, 32) and set(bits.unique().tolist()) <= {0, 1}
    torch.testing.assert_close(prescale, (v / (codec.scale + codec.eps)).norm(dim=-1, keepdim=True))
    out = codec.decode(bits, prescale)
    # the decoded direction has unit norm before prescale/scale: the norm of the scaled value is kept exactly
    torch.testing.assert_close((out / (codec.scale + codec.eps)).norm(dim=-1, keepdim=True), prescale + codec.eps)
    assert codec.postscale(bits).shape == (2, 7, 1)
    assert not math.isnan(codec(v).sum().item())
    # the deterministic path equals the one-hot mapping of the reference (0 -> 10, 1 -> 01, 2 -> 11, 3 -> 00)
    logits, _ = codec.logits(v)
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), 4).float()
    assert torch.equal(bits, ValueCodec.choices_to_bits(onehot).to(torch.uint8))
    assert ValueCodec.argmax_to_bits(torch.tensor([0, 1, 2, 3])).tolist() == [1, 0, 0, 1, 1, 1, 0, 0]


def test_postscale_takes_bits_in_any_dtype_and_under_autocast():
    # the cache's "half" encode hands bfloat16 bits to the postscale under bfloat16 autocast: the same float32 norms
    # as float32 bits there, and as uint8 bits outside autocast (the float32 matmul)
    torch.manual_seed(7)
    codec = ValueCodec(feat_dim=64, bits=1)
    bits = torch.rand(50, 64) > 0.5
    with torch.no_grad():
        exact = torch.linalg.vector_norm(bits.float() @ codec.embedding, dim=-1, keepdim=True)
        assert torch.equal(codec.postscale(bits.to(torch.uint8)), exact)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = torch.linalg.vector_norm((bits.float() @ codec.embedding).float(), dim=-1, keepdim=True)
            got = codec.postscale(bits.to(torch.bfloat16))
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert torch.equal(codec.postscale(bits.float()), want)
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=0)  # the bfloat16 product
    # a device type without autocast (shape inference on "meta") still works
    assert codec.to("meta").postscale(bits.to(torch.uint8).to("meta")).shape == (50, 1)


def _reference_m_step(r: torch.Tensor, centers: torch.Tensor, temperature: float) -> torch.Tensor:
    # The reference's E_step + M_step (quantize_key_cache.py) written out: cdist, softmax, weighted means, inv.
    p = torch.softmax(-torch.cdist(r, centers) / temperature, dim=1)
    n = p.sum(0) + 1e-8
    m = (p.T @ r) / n[:, None]
    t = commutative_T()
    n2 = n.repeat_interleave(2)[None]
    b = m.view(4096, -1, 2).permute(0, 2, 1).flatten(0, 1)
    return (torch.linalg.inv((t.T * n2) @ t) @ t.T * n2) @ b


@pytest.mark.parametrize("temperature", [1.0, 1e-2])
def test_estep_statistics_give_the_reference_m_step(temperature):
    torch.manual_seed(7)
    theta = torch.randn(128, 8) * 0.1
    r = torch.randn(300, 16) * 0.2
    codes, counts, pa, pb = em_estep_reference(r, theta, temperature)
    assert torch.equal(codes, torch.cdist(r, centers_from_theta(theta)).argmin(1))
    torch.testing.assert_close(counts.sum(), torch.tensor(300.0))
    theta_new = theta_from_stats(counts, stats_TtS(pa.T @ r, pb.T @ r))
    torch.testing.assert_close(
        theta_new, _reference_m_step(r, centers_from_theta(theta), temperature), atol=2e-5, rtol=1e-4
    )


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU) or CUDA")
@pytest.mark.parametrize("temperature", [1.0, 1e-3])
@pytest.mark.parametrize("design", ["three_pass", "two_pass"])
def test_triton_estep_equals_reference(temperature, design):
    torch.manual_seed(8)
    theta = torch.randn(128, 8) * 0.1
    r = torch.randn(70, 16) * 0.2
    ref = em_estep_reference(r, theta, temperature)
    # three_pass in chunks of 48 rows: a full chunk, then a partial one with a partial tile
    out = em_estep(r, theta, temperature, use_triton=True, programs=2, design=design, chunk_rows=48)
    assert torch.equal(out[0], ref[0])
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU) or CUDA")
def test_batched_heads_equal_one_by_one():
    torch.manual_seed(9)
    theta = torch.randn(3, 128, 8) * 0.1
    r = torch.randn(3, 40, 16) * 0.2
    codes = nearest_centers(r, theta, use_triton=True)
    est = em_estep(r, theta, 1e-2, use_triton=True, programs=1, chunk_rows=32)
    for g in range(3):
        assert torch.equal(codes[g], nearest_centers_reference(r[g], theta[g]))
        ref = em_estep_reference(r[g], theta[g], 1e-2)
        assert torch.equal(est[0][g], ref[0])
        for a, b in zip(est[1:], ref[1:]):
            torch.testing.assert_close(a[g], b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU) or CUDA")
@pytest.mark.parametrize("design", ["three_pass", "two_pass"])
def test_triton_estep_breaks_ties_like_the_reference(design):
    # entries A=5 and A=9 (and B=2, B=7) equal: centers repeat, and the first of equal centers must win
    torch.manual_seed(11)
    theta = torch.randn(128, 8) * 0.1
    theta[18:20] = theta[10:12]  # z_9 = z_5
    theta[14:16] = theta[4:6]  # z_7 = z_2
    centers = centers_from_theta(theta)
    r = centers[torch.tensor([64 * 9 + 7, 64 * 5 + 2, 64 * 9 + 3, 12])]  # exactly on repeated centers
    ref = em_estep_reference(r, theta, 1e-2)
    out = em_estep(r, theta, 1e-2, use_triton=True, design=design)
    assert ref[0].tolist() == [64 * 5 + 2, 64 * 5 + 2, 64 * 5 + 3, 12]
    assert torch.equal(out[0], ref[0])


def test_estep_rejects_bad_launch_settings():
    r, theta = torch.randn(8, 16), torch.randn(128, 8)
    with pytest.raises(ValueError, match="design must be one of"):
        em_estep(r, theta, 1.0, design="one_pass")
    with pytest.raises(ValueError, match="power of two"):
        em_estep(r, theta, 1.0, block_n=24)


def test_reference_written_codebooks_load_unchanged(tmp_path):
    # Files built the way the reference's quantize_key_cache.py builds them (head_dim 128, Llama-3.1-8B layout):
    # centers = (T @ theta) viewed [4096, 2, 64] -> permute -> [4096, 128]; mse_loss a 0-d tensor; final_error float.
    torch.manual_seed(10)
    t = _reference_T()
    thetas = torch.randn(2, 2, 3, 128, 64)  # [layer, group, step, 128, 64]
    for layer in range(2):
        for group in range(2):
            steps = []
            for i in range(3):
                centers = (t @ thetas[layer, group, i]).view(4096, 2, 64).permute(0, 2, 1).flatten(1)
                steps.append({"mse_loss": torch.tensor(0.5 / (i + 1)), "theta": thetas[layer, group, i],
                              "clustering_centers": centers})  # fmt: skip
            torch.save({"final_error": 0.1, "steps": steps}, tmp_path / f"{layer:03d}_{group}.pt")
    books = CommVQCodebooks.load(tmp_path)
    assert (books.num_layers, books.num_kv_heads, books.residuals, books.head_dim) == (2, 2, 3, 128)
    assert torch.equal(books.key_theta, thetas)
    data = torch.load(tmp_path / "001_0.pt", weights_only=True)
    torch.testing.assert_close(books.key_centers(1)[0, 2], data["steps"][2]["clustering_centers"])


def test_pair_weights_round_trip_and_validation(tmp_path):
    """The key distance's per-pair weights travel through both formats; partial or bad weights raise."""
    books = _books(layers=2, heads=2, head_dim=64, bits=1, values=False)
    weights = torch.rand(2, 2, 32) + 0.1
    weighted = CommVQCodebooks(
        "tiny", 1, books.residuals, 64, 2, 2, books.key_theta, key_mse=books.key_mse, key_pair_weights=weights
    )
    assert torch.equal(weighted.layer_pair_weights(1), weights[1]) and books.layer_pair_weights(1) is None
    native = CommVQCodebooks.load(weighted.save_native(tmp_path / "native"))
    assert torch.equal(native.key_pair_weights, weights)
    ref = weighted.save_reference(tmp_path / "ref")
    assert torch.equal(torch.load(ref / "001_0.pt", weights_only=True)["pair_weights"], weights[1, 0])
    assert torch.equal(CommVQCodebooks.load(ref).key_pair_weights, weights)
    assert CommVQCodebooks.load(books.save_reference(tmp_path / "plain")).key_pair_weights is None
    data = torch.load(ref / "000_1.pt", weights_only=True)
    torch.save({**data, "pair_weights": torch.ones(5)}, ref / "000_1.pt")
    with pytest.raises(ValueError, match="000_1.pt: pair_weights has shape"):
        CommVQCodebooks.load(ref)
    with pytest.raises(ValueError, match="may not replace"):
        save_reference_layer(tmp_path / "x", 0, books.key_theta[0], extra={"final_error": 0.0})
    del data["pair_weights"]
    torch.save(data, ref / "000_1.pt")
    with pytest.raises(ValueError, match="3 of 4 files carry pair_weights"):
        CommVQCodebooks.load(ref)
    for bad, match in ((torch.rand(2, 2, 16), "must be"), (-weights, "positive"), (weights * math.inf, "finite")):
        with pytest.raises(ValueError, match=match):
            CommVQCodebooks("tiny", 1, books.residuals, 64, 2, 2, books.key_theta, key_pair_weights=bad)


def test_repr_is_one_short_line_without_tensors():
    """A press holding loaded codebooks prints in one short line (kvpress writes ``str(press)`` into an evaluation's
    ``config.yaml``: it once held every codebook value, 100 KB per run)."""
    from pressroom.presses import CommVQPress

    books = _books(layers=2, heads=2, head_dim=64, bits=2)
    text = repr(CommVQPress(books, bits=2))
    assert "tensor(" not in text and "\n" not in text and len(text) < 600, text
    assert "CommVQCodebooks(model_name=" in text and "num_layers=2" in text and "<2 ValueCodec>" in text
