"""Triton RoPE ring kernels vs their PyTorch references (CPU, ``TRITON_INTERPRET=1``), and the references' semantics.

``make test`` sets ``TRITON_INTERPRET=1`` for the whole run; it must be set before Triton is imported, so the
Triton comparisons are skipped when the kernels were compiled for a GPU but only CPU tensors are at hand.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported, when this file runs alone

import pytest  # noqa: E402
import torch  # noqa: E402

from pressroom.kernels import rope_ring  # noqa: E402
from pressroom.kernels.rope_ring import (  # noqa: E402
    resolve_use_triton,
    ring_decode,
    ring_rotate_keys,
    ring_rotate_keys_reference,
    ring_store,
    ring_store_reference,
)


def _interpreted() -> bool:
    if not rope_ring.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rope_ring._ring_store_kernel, InterpretedFunction)


DEVICE = "cuda" if torch.cuda.is_available() and not _interpreted() else "cpu"
needs_triton = pytest.mark.skipif(
    not rope_ring.HAS_TRITON or (DEVICE == "cpu" and not _interpreted()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before Triton is imported",
)


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype, scaling: float = 1.0):
    freqs = positions.float()[..., None] * _inv_freq(head_dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _new_tokens(batch, heads, n, head_dim, dtype, seed=0):
    """Keys and values as the model hands them over: [B, H, n, D] views of [B, n, H, D] tensors."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n, heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    values = torch.randn(batch, n, heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return keys, values


def _ring(batch, heads, slots, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, slots, head_dim, generator=gen).to(DEVICE, dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    else:  # float32 math rounded once: at most one bfloat16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)


CASES = [  # (batch, kv_heads, head_dim, n_sink, window)
    (1, 2, 16, 4, 7),
    (2, 3, 64, 1, 5),
    (1, 1, 16, 0, 3),
    (2, 2, 64, 3, 1),
    (1, 2, 48, 2, 9),  # head_dim / 2 not a power of two
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_ring_store_kernel_matches_reference(case, dtype):
    batch, heads, head_dim, n_sink, window = case
    slots = n_sink + window
    n_tok, seq0 = 11, 2
    keys, values = _new_tokens(batch, heads, n_tok, head_dim, dtype)
    cos, sin = _cos_sin(torch.arange(seq0 + 100, seq0 + 100 + n_tok), head_dim, dtype, scaling=1.3)
    cos, sin = cos[None].to(DEVICE), sin[None].to(DEVICE)  # broadcast over the batch
    # survivors of the chunk: new sinks, then the last `window` tokens (wrapping around the ring)
    ranges = [(0, max(0, min(n_tok, n_sink - seq0))), (max(0, n_sink - seq0, n_tok - window), n_tok)]
    results = []
    for fn in (lambda **kw: ring_store(**kw, use_triton=True), ring_store_reference):
        raw, vbuf, ws = (_ring(batch, heads, slots, head_dim, dtype, seed=s) for s in (1, 2, 3))
        for start, stop in ranges:
            fn(
                keys=keys,
                values=values,
                cos=cos,
                sin=sin,
                raw_keys=raw,
                value_buf=vbuf,
                seq0=seq0,
                start=start,
                stop=stop,
                n_sink=n_sink,
                window=window,
                rotated_out=ws,
            )
        results.append((raw, vbuf, ws))
    for got, want in zip(*results):
        _assert_close(got, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("logical", [True, False])
def test_ring_rotate_kernel_matches_reference(case, dtype, logical):
    batch, heads, head_dim, n_sink, window = case
    slots = n_sink + window
    raw = _ring(batch, heads, slots, head_dim, dtype)
    inv_freq = _inv_freq(head_dim).to(DEVICE)
    for ring_first in sorted({0, window // 2, window - 1}):
        for pos_base, start, stop in ((0, 0, slots), (-3, 1, slots - 1), (123_456, 0, slots)):
            outs = []
            for use_triton in (True, False):
                out = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=DEVICE)
                ring_rotate_keys(
                    raw,
                    out,
                    inv_freq,
                    0.9,
                    pos_base=pos_base,
                    start=start,
                    stop=stop,
                    n_sink=n_sink,
                    window=window,
                    ring_first=ring_first,
                    logical_order=logical,
                    use_triton=use_triton,
                )
                outs.append(out)
            _assert_close(*outs)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_ring_decode_kernel_matches_reference(case, dtype):
    """The fused decoding step (store one token + re-rotate moved slots) equals its reference, for a token that
    evicts a window slot, lands on a sink slot, or fills an empty slot, with none / some / all slots re-rotated."""
    batch, heads, head_dim, n_sink, window = case
    slots = n_sink + window
    key, value = _new_tokens(batch, heads, 1, head_dim, dtype, seed=4)
    inv_freq = _inv_freq(head_dim).to(DEVICE)
    for seq in sorted({0, max(0, n_sink - 1), n_sink + window + 2, 1000}):
        cos, sin = _cos_sin(torch.tensor([seq + 7]), head_dim, dtype)
        cos, sin = cos[None].expand(batch, -1, -1).to(DEVICE), sin[None].expand(batch, -1, -1).to(DEVICE)
        for rot_stop in sorted({0, n_sink, slots}):
            outs = []
            for use_triton in (True, False):
                bufs = [_ring(batch, heads, slots, head_dim, dtype, seed=s) for s in (5, 6, 7)]
                ring_decode(
                    key,
                    value,
                    cos,
                    sin,
                    *bufs,
                    inv_freq,
                    1.1,
                    seq=seq,
                    pos_base=seq - slots + 1,
                    rot_start=0,
                    rot_stop=rot_stop,
                    n_sink=n_sink,
                    window=window,
                    ring_first=(seq + 1 - window - n_sink) % window,
                    use_triton=use_triton,
                )
                outs.append(bufs)
            for got, want in zip(*outs):
                _assert_close(got, want)


@needs_triton
def test_kernels_leave_other_slots_alone():
    raw = _ring(1, 2, 6, 16, torch.float32)
    out = torch.full((1, 2, 6, 16), 7.0, device=DEVICE)
    ring_rotate_keys(
        raw,
        out,
        _inv_freq(16).to(DEVICE),
        1.0,
        pos_base=0,
        start=2,
        stop=4,
        n_sink=2,
        window=4,
        ring_first=1,
        logical_order=True,
        use_triton=True,
    )
    assert (out[:, :, :2] == 7).all() and (out[:, :, 4:] == 7).all() and not (out[:, :, 2:4] == 7).all()
    keys, values = _new_tokens(1, 2, 3, 16, torch.float32)
    cos, sin = _cos_sin(torch.arange(3), 16, torch.float32)
    ring, vbuf = torch.zeros(1, 2, 6, 16, device=DEVICE), torch.zeros(1, 2, 6, 16, device=DEVICE)
    ring_store(
        keys,
        values,
        cos[None].to(DEVICE),
        sin[None].to(DEVICE),
        ring,
        vbuf,
        seq0=4,
        start=1,
        stop=2,
        n_sink=2,
        window=4,
        use_triton=True,
    )
    assert ring[:, :, 5].abs().sum() > 0 and ring[:, :, :5].abs().sum() == 0  # seq 5 -> slot 2 + (5 - 2) % 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_round_trip_is_the_rotation(dtype):
    """Store keys rotated at positions p, read them back at the same positions: the same keys (no drift)."""
    batch, heads, head_dim, n_sink, window = 2, 2, 16, 2, 5
    pre = torch.randn(batch, heads, n_sink + window, head_dim)
    positions = torch.arange(50_000, 50_000 + n_sink + window)
    cos, sin = _cos_sin(positions, head_dim, torch.float32, scaling=1.2)
    rotated = (pre * cos + _rotate_half(pre) * sin).to(dtype)
    raw = torch.zeros(batch, heads, n_sink + window, head_dim, dtype=dtype)
    vbuf = torch.zeros_like(raw)
    ring_store_reference(
        rotated,
        rotated,
        cos[None].to(dtype),
        sin[None].to(dtype),
        raw,
        vbuf,
        seq0=0,
        start=0,
        stop=n_sink + window,
        n_sink=n_sink,
        window=window,
    )
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(raw.float(), pre, **tol)  # un-rotated, attention_scaling undone
    out = torch.empty_like(raw)
    ring_rotate_keys_reference(
        raw,
        out,
        _inv_freq(head_dim),
        1.2,
        pos_base=50_000,
        start=0,
        stop=n_sink + window,
        n_sink=n_sink,
        window=window,
        ring_first=0,
        logical_order=True,
    )
    torch.testing.assert_close(out.float(), rotated.float(), **tol)


def test_reference_orders():
    """Logical order reads sinks, then the window from ring_first on; physical order maps slots back."""
    n_sink, window, head_dim = 2, 5, 4
    raw = torch.arange(n_sink + window, dtype=torch.float32)[None, None, :, None].repeat(1, 1, 1, head_dim)
    inv_freq = torch.zeros(head_dim // 2)  # angle 0: rotation is the identity
    out = torch.empty_like(raw)
    ring_rotate_keys_reference(
        raw,
        out,
        inv_freq,
        1.0,
        pos_base=0,
        start=0,
        stop=7,
        n_sink=n_sink,
        window=window,
        ring_first=3,
        logical_order=True,
    )
    assert out[0, 0, :, 0].tolist() == [0, 1, 5, 6, 2, 3, 4]
    # physical order with a real rotation: slot 5 (ring index 3 = ring_first) is logical index n_sink
    inv_freq = torch.ones(head_dim // 2)
    ring_rotate_keys_reference(
        raw,
        out,
        inv_freq,
        1.0,
        pos_base=10,
        start=0,
        stop=7,
        n_sink=n_sink,
        window=window,
        ring_first=3,
        logical_order=False,
    )
    logical = torch.tensor([0, 1, 4, 5, 6, 2, 3])
    cos, sin = torch.cos(10.0 + logical.float()), torch.sin(10.0 + logical.float())
    torch.testing.assert_close(out[0, 0, :, 0], raw[0, 0, :, 0] * cos - raw[0, 0, :, 2] * sin)


def test_dispatch_and_validation(monkeypatch):
    t = torch.zeros(1)
    assert resolve_use_triton(False, t) is False
    assert resolve_use_triton(None, t) is False  # CPU: the reference
    monkeypatch.setenv("PRESSROOM_FORCE_REFERENCE", "1")
    assert resolve_use_triton(None, t) is False
    if rope_ring.HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            resolve_use_triton(True, t)
    raw = torch.zeros(1, 1, 6, 8)
    keys = torch.zeros(1, 1, 4, 8)
    cos = torch.ones(1, 4, 8)
    with pytest.raises(ValueError, match="survive"):  # 4 window tokens into a window of 3
        ring_store_reference(keys, keys, cos, cos, raw, raw.clone(), seq0=3, start=0, stop=4, n_sink=3, window=3)
    with pytest.raises(ValueError, match="match"):
        ring_store_reference(keys, keys, cos, cos, raw, raw.clone(), seq0=0, start=0, stop=1, n_sink=2, window=3)
    with pytest.raises(ValueError, match="inv_freq"):
        ring_rotate_keys_reference(
            raw,
            raw.clone(),
            torch.ones(3),
            1.0,
            pos_base=0,
            start=0,
            stop=6,
            n_sink=3,
            window=3,
            ring_first=0,
            logical_order=True,
        )
    with pytest.raises(ValueError, match="ring_first"):
        ring_rotate_keys_reference(
            raw,
            raw.clone(),
            torch.ones(4),
            1.0,
            pos_base=0,
            start=0,
            stop=6,
            n_sink=3,
            window=3,
            ring_first=3,
            logical_order=False,
        )


@needs_triton
def test_cache_on_the_triton_path_matches_the_reference_path():
    """SinkWindowCache end to end with the kernels (prefill chunks, decoding steps, eviction, the keys property)."""
    from transformers import AutoModelForCausalLM

    from pressroom.evaluation.models import tiny_config
    from pressroom.presses import SinkWindowCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", num_hidden_layers=1)).to(DEVICE).eval()
    ids = torch.randint(3, 5000, (1, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits, keys = [], []
    for use_triton in (True, False):
        cache = SinkWindowCache(model.config, n_sink=2, window=5, use_triton=use_triton)
        with torch.no_grad():
            out = [
                model(chunk, past_key_values=cache).logits for chunk in torch.split(ids, [9, 1, 1, 1, 4, 1, 1, 6], 1)
            ]
        logits.append(torch.cat(out, dim=1))
        keys.append(cache.layers[0].keys)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys[0], keys[1], atol=1e-5, rtol=1e-5)
