"""Write Jane Austen's six novels as a folder of ``.txt`` files, a calibration corpus beyond the embedded essays.

The novels (public domain, about 0.9M SmolLM2 tokens) ship in Debian's ``r-cran-janeaustenr`` as an R lazy-load
database (``data/Rdata.rdx`` indexes ``data/Rdata.rdb``: zlib-compressed serialized character vectors, one line per
element). This script reads it with the PyPI package ``rdata`` and writes ``<name>.txt`` per novel, lines joined by
newlines, atomically. The folder is then a corpus of :func:`pressroom.evaluation.corpora.load_corpus` (its train
split: every novel but ``prideprejudice``), e.g. ``pg_essays+<folder>`` for the codebook training.

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/jar
    pip install rdata
    python benchmarks/export_austen.py /tmp/jar .corpora/austen
"""

from __future__ import annotations

import argparse
import gzip
import zlib
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DATA = "usr/lib/R/site-library/janeaustenr/data"


def find_data(root: Path) -> Path:
    """The package's ``data`` folder under ``root`` (the extracted .deb, the installed R library, or the folder)."""
    for cand in (root, root / "data", root / DATA, root / "janeaustenr" / "data"):
        if (cand / "Rdata.rdx").is_file() and (cand / "Rdata.rdb").is_file():
            return cand
    raise FileNotFoundError(
        f"No janeaustenr data (Rdata.rdx / Rdata.rdb) under {root}: run `apt-get download r-cran-janeaustenr && "
        "dpkg-deb -x r-cran-janeaustenr_*.deb DIR` and pass DIR."
    )


def read_novels(data: Path) -> dict[str, str]:
    """``{novel: text}`` from the package's lazy-load database."""
    try:
        import rdata
    except ImportError as err:
        raise SystemExit("This script needs the PyPI package rdata: pip install rdata") from err

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        lines = parse(zlib.decompress(chunk[4:]))  # 4 bytes of uncompressed length, then zlib
        out[str(name)] = "\n".join(str(x) for x in lines).strip() + "\n"
    missing = set(NOVELS) - set(out)
    if missing:
        raise ValueError(f"{data} lacks the novels {sorted(missing)}: is it janeaustenr 1.0?")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the extracted r-cran-janeaustenr package (or its data folder)")
    ap.add_argument("output", type=Path, help="folder to write <novel>.txt into")
    args = ap.parse_args(argv)
    from pressroom.evaluation.atomic import atomic_path

    novels = read_novels(find_data(args.source))
    args.output.mkdir(parents=True, exist_ok=True)
    for name in NOVELS:
        with atomic_path(args.output / f"{name}.txt") as tmp:
            Path(tmp).write_text(novels[name], encoding="utf-8")
    words = sum(len(t.split()) for t in novels.values())
    print(f"wrote {len(NOVELS)} novels ({words} words) to {args.output}")


if __name__ == "__main__":
    main()
