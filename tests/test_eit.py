"""Eviction-invariant training (EIT): keep masks, the registered student attention, schedules, a short training run
on a tiny model (loss goes down, checkpoints, resume, the adapter in AnchorPress in kvpress's pipeline), analysis."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from kvpress import KVPressTextGenerationPipeline  # noqa: E402

from pressroom.kernels.keep_attention import KeepMask  # noqa: E402
from pressroom.presses import AnchorPress  # noqa: E402
from pressroom.presses.anchor_press import ADAPTER_ATTR, TIER_OTHER, anchor_tiers  # noqa: E402
from pressroom.training import eit  # noqa: E402
from pressroom.training.cli import main as train_main  # noqa: E402

SEQ, CONT = 64, 16


def _tiny():
    from pressroom.evaluation.models import load_model

    return load_model("tiny-llama", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tables(smollm2_tokenizer):
    return eit.AnchorSpec(n_sink=2, n_recent=4).tables(smollm2_tokenizer, 49152)


def test_keep_mask_keeps_anchors_and_hits_ratio(smollm2_tokenizer, tables):
    tok = smollm2_tokenizer
    text = "Alpha beta gamma delta, epsilon zeta eta theta iota kappa. Lambda mu nu xi omicron pi rho sigma tau! " * 4
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)] * 3)
    seq_len = ids.shape[1]
    spec = eit.AnchorSpec(n_sink=2, n_recent=4)
    split = seq_len - 10
    tiers = anchor_tiers(ids[:, :split], n_sink=2, n_recent=4, separator_lookup=tables[0], special_lookup=tables[1])
    n_anchor = int((tiers > TIER_OTHER).sum(1).max())
    gen = torch.Generator().manual_seed(0)
    for ratio in (0.35, 0.5, 0.77, 1.0):
        keep = eit.sample_keep_mask(ids, ratio, split, spec, tables[0], tables[1], generator=gen)
        assert keep.shape == ids.shape and keep.dtype == torch.bool
        assert keep[:, split:].all()
        kept = keep[:, :split].sum(1)
        assert n_anchor <= round(ratio * split)
        assert (kept - ratio * split).abs().max() <= 1
        assert keep[:, :split][tiers > TIER_OTHER].all()
    # rows differ (the non-anchor tokens are sampled)
    keep = eit.sample_keep_mask(ids, 0.5, split, spec, tables[0], tables[1], generator=gen)
    assert not torch.equal(keep[0], keep[1])
    # a budget below the anchors: still exact, highest tiers first (sinks)
    keep = eit.sample_keep_mask(ids, 0.05, split, spec, tables[0], tables[1], generator=gen)
    assert (keep[:, :split].sum(1) == round(0.05 * split)).all() and keep[:, :2].all()
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="keep ratio"):
            eit.sample_keep_mask(ids, bad, split, spec, tables[0], tables[1])
    with pytest.raises(ValueError, match="split"):
        eit.sample_keep_mask(ids, 0.5, 0, spec, tables[0], tables[1])


def test_registered_attention_equals_dense_mask_sdpa():
    model, _ = _tiny()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 40), generator=gen)
    keep = torch.rand(2, 40, generator=gen) < 0.4
    keep[:, 0] = True
    mask = KeepMask(keep, split=24)
    with torch.no_grad():
        dense = torch.zeros(2, 1, 40, 40).masked_fill(~mask.dense(), float("-inf"))
        expected = model(input_ids=ids, attention_mask=dense, use_cache=False).logits
        full = model(input_ids=ids, use_cache=False).logits
        eit.use_eit_attention(model)
        student = model(input_ids=ids, eit_keep=mask, use_cache=False).logits
        teacher = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(student, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(teacher, full, atol=1e-5, rtol=1e-5)  # no keep mask: plain causal SDPA
    assert not torch.allclose(student[:, 24:], full[:, 24:], atol=1e-3)  # the mask matters after the split
    torch.testing.assert_close(student[:, :24], full[:, :24], atol=1e-4, rtol=1e-4)  # the prefill is untouched


def test_schedules_and_config_errors():
    cur = eit.KeepSchedule("curriculum", 0.9, 0.3, steps=7)
    assert cur.ratio(0) == pytest.approx(0.9) and cur.ratio(6) == pytest.approx(0.3)
    assert cur.ratio(3) == pytest.approx(0.6) and cur.ratio(100) == pytest.approx(0.3)
    assert eit.KeepSchedule("fixed", 0.9, 0.4).ratio(0) == pytest.approx(0.4)
    ada = eit.KeepSchedule("adaptive", 0.9, 0.5, step=0.2, tolerance=0.05)
    assert ada.ratio(0) == pytest.approx(0.9)
    assert ada.observe(10.0)  # first observation at a ratio holds: move on
    assert ada.ratio(1) == pytest.approx(0.7)
    assert ada.observe(20.0) and ada.ratio(2) == pytest.approx(0.5)
    assert not ada.observe(5.0) and ada.ratio(3) == pytest.approx(0.5)  # at the end: stays
    state = ada.state_dict()
    again = eit.KeepSchedule("adaptive", 0.9, 0.5)
    again.load_state_dict(state)
    assert again.ratio(0) == pytest.approx(0.5)
    ada2 = eit.KeepSchedule("adaptive", 0.9, 0.3, step=0.1, tolerance=0.01)
    ada2.best_ppl = 10.0
    assert not ada2.observe(12.0) and ada2.ratio(0) == pytest.approx(0.9)  # perplexity did not hold
    for kwargs, match in (
        ({"mode": "cosine"}, "keep schedule"),
        ({"start": 1.2}, "start"),
        ({"end": 0.0}, "end"),
        ({"start": 0.3, "end": 0.9}, "must not exceed"),
        ({"steps": 0}, "steps"),
    ):
        with pytest.raises(ValueError, match=match):
            eit.KeepSchedule(**kwargs)
    with pytest.raises(ValueError, match="continuation"):
        eit.EITConfig(seq_len=64, continuation=64)
    with pytest.raises(ValueError, match="keep ratio"):
        eit.EITConfig(keep_end=1.5)
    with pytest.raises(ValueError, match="keep schedule"):
        eit.EITConfig(keep_schedule="sometimes")
    with pytest.raises(ValueError, match="select_keep_ratio"):
        eit.EITConfig(select_keep_ratio=1.5)
    assert train_main(["eit", "train", "--output", "/tmp/x", "--keep-end", "0"]) == 2
    with pytest.raises(SystemExit):
        train_main(["eit", "train", "--output", "/tmp/x", "--keep-schedule", "sometimes"])


def _batch_loss(model, ids, keep, split):
    with torch.no_grad():
        logits = model(input_ids=ids, eit_keep=KeepMask(keep, split), use_cache=False).logits
    return eit.eit_loss(logits, None, ids, split, 0.0)[1]["ce"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("eit")
    args = ["eit", "train", "--model", "tiny-llama", "--output", str(out), "--seq-len", str(SEQ)]
    args += ["--continuation", str(CONT), "--lora-r", "8", "--lr", "2e-2", "--warmup-steps", "1", "--n-recent", "4"]
    args += ["--train-sequences", "1"]  # one sequence: a few steps visibly lower its loss
    args += ["--keep-schedule", "curriculum", "--keep-start", "0.9", "--keep-end", "0.4", "--eval-every", "3"]
    assert train_main([*args, "--max-steps", "6", "--save-every", "3"]) == 0
    return out, args


def test_training_lowers_loss_and_checkpoints(trained, smollm2_tokenizer, tables):
    out, _ = trained
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "eit_config.json", "trainer_state.pt"):
        assert (final / name).is_file(), name
    assert (out / "checkpoint-3" / "adapter_config.json").is_file()
    cfg = json.loads((final / "eit_config.json").read_text())
    assert cfg["step"] == 6 and cfg["lora_r"] == 8 and cfg["keep_ratio"] == pytest.approx(0.4)
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == list(range(1, 7))
    assert log["history"][0]["keep_ratio"] == pytest.approx(0.9)
    assert log["history"][-1]["keep_ratio"] == pytest.approx(0.4)
    assert log["tokens"] == 6 * SEQ and log["tokens_per_second"] > 0
    assert all(h["kl"] >= -1e-6 for h in log["history"])
    assert log["history"][-1]["loss"] < log["history"][0]["loss"] - 0.1
    # best/: the adapter of the evaluation with the lowest validation perplexity at the fixed selection ratio
    sel = {v["step"]: v["select_ppl"] for v in log["val"]}
    assert set(sel) == {3, 6} and log["best"]["step"] == min(sel, key=sel.get)
    best_cfg = json.loads((out / "best" / "eit_config.json").read_text())
    assert best_cfg["step"] == log["best"]["step"] and (out / "best" / "adapter_model.safetensors").is_file()
    # the fine-tuned student does better than the base model under eviction on its training sequence
    from peft import PeftModel

    from pressroom.evaluation.corpora import corpus_tokens

    ids = corpus_tokens(smollm2_tokenizer, "pg_essays", "train")[:SEQ][None]
    keep = eit.sample_keep_mask(
        ids, 0.4, SEQ - CONT, eit.AnchorSpec(n_sink=4, n_recent=4), tables[0], tables[1], torch.Generator()
    )
    base, _ = _tiny()
    eit.use_eit_attention(base)
    before = _batch_loss(base, ids, keep, SEQ - CONT)
    tuned = PeftModel.from_pretrained(base, str(final))
    after = _batch_loss(tuned, ids, keep, SEQ - CONT)
    assert after < before - 0.1, (before, after)


def test_resume_continues_from_checkpoint(trained, tmp_path):
    out, args = trained
    import shutil

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    args = [a if a != str(out) else str(resumed) for a in args]
    assert train_main([*args, "--max-steps", "6", "--save-every", "3", "--resume"]) == 0
    log = json.loads((resumed / "train_log.json").read_text())
    first = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == list(range(1, 7))
    assert log["history"][:3] == first["history"][:3]  # restored, not recomputed
    assert log["history"][3]["keep_ratio"] == pytest.approx(first["history"][3]["keep_ratio"])
    assert (resumed / "final" / "adapter_model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        empty = eit.EITConfig(model="tiny-llama", output=str(tmp_path / "empty"), seq_len=SEQ, continuation=CONT)
        eit.train(empty, resume=True)


def test_adapter_in_anchor_press_pipeline(trained, smollm2_tokenizer):
    out, _ = trained
    final = str(out / "final")
    model, _ = _tiny()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=smollm2_tokenizer, device="cpu")
    context = "The key is seven, remember it. Some filler text follows here.\n" * 6
    ids = torch.tensor([smollm2_tokenizer.encode(context, add_special_tokens=False)])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    # the press finds the tokenizer saved with the adapter (the tiny model has no name_or_path)
    press = AnchorPress(compression_ratio=0.5, n_recent=8, adapter=final)
    out1 = pipe(context, questions=["What is the key?", "Again?"], press=press, max_new_tokens=2)
    assert len(out1["answers"]) == 2
    assert getattr(model, ADAPTER_ATTR).endswith("final")
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter is in the model, and stays active
    pipe(context, question="Once more?", press=AnchorPress(compression_ratio=0.5, adapter=final), max_new_tokens=2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)  # loaded once, not twice
    # through the press registry, as pressroom-eval builds it
    from pressroom.evaluation.press_registry import make_press

    built = make_press(f"anchor:adapter={final},n_recent=8", 0.75)
    assert isinstance(built, AnchorPress) and built.adapter == final
    other = out / "checkpoint-3"
    with pytest.raises(ValueError, match="already holds"):
        with AnchorPress(compression_ratio=0.5, adapter=str(other))(model):
            pass


def test_analyze_writes_json_and_plot(tmp_path):
    out = tmp_path / "analysis"
    args = ["eit", "analyze", "--model", "tiny-llama", "--output", str(out), "--seq-len", "48"]
    assert train_main([*args, "--n-sequences", "2", "--n-recent", "8"]) == 0
    result = json.loads((out / "attention_by_type.json").read_text())
    assert (out / "attention_by_type.png").stat().st_size > 1000
    assert result["types"] == list(eit.TOKEN_TYPES)
    per = torch.tensor(result["per_layer_head"])
    assert per.shape == (2, 4, 5)
    torch.testing.assert_close(per.sum(-1), torch.ones(2, 4), atol=1e-4, rtol=0)  # attention rows sum to one
    assert sum(result["token_share"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["overall"]["separator"] > 0 and result["overall"]["sink"] > 0


def test_evicted_perplexity_and_loss_shapes(smollm2_tokenizer):
    model, _ = _tiny()
    ids = torch.randint(0, 49152, (3 * 48,), generator=torch.Generator().manual_seed(0))
    full = eit.evicted_perplexity(model, ids, None, 32, 16)
    assert full["windows"] == 3 and full["tokens"] == 48 and full["kv_tokens"] == 32
    # ratio 0: the same numbers as the full cache; ratio 0.5: half the context kept, another perplexity
    same = eit.evicted_perplexity(model, ids, AnchorPress(tokenizer=smollm2_tokenizer), 32, 16)
    assert same["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    half = eit.evicted_perplexity(
        model, ids, AnchorPress(compression_ratio=0.5, n_recent=4, tokenizer=smollm2_tokenizer), 32, 16
    )
    assert half["kv_tokens"] == 16 and half["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)
    # the full sequence's logits and the continuation's logits (logits_to_keep) give the same loss
    gen = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(2, 20, 50, generator=gen), torch.randn(2, 20, 50, generator=gen)
    labels = torch.randint(0, 50, (2, 20), generator=gen)
    a = eit.eit_loss(logits, teacher, labels, 12, 0.5)[1]
    b = eit.eit_loss(logits[:, 12:], teacher[:, 12:], labels, 12, 0.5)[1]
    assert a == pytest.approx(b) and a["kl"] > 0
    with pytest.raises(ValueError, match="positions"):
        eit.eit_loss(logits[:, 5:], None, labels, 12, 0.0)


def test_sigusr1_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    import signal

    class Immediately(eit._StopRequest):
        def __init__(self):
            super().__init__()
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm's --signal=B:USR1 would, during the first step

    monkeypatch.setattr(eit, "_StopRequest", Immediately)
    out = tmp_path / "usr1"
    args = ["eit", "train", "--model", "tiny-llama", "--output", str(out), "--seq-len", str(SEQ)]
    args += ["--continuation", str(CONT), "--lora-r", "4", "--max-steps", "5", "--save-every", "100"]
    assert train_main(args) == eit.EXIT_INTERRUPTED
    assert (out / "checkpoint-1" / "trainer_state.pt").is_file() and not (out / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone again
    assert eit.latest_checkpoint(out) == out / "checkpoint-1"
