"""The command-line options of ``pressroom-eval compare`` / ``python -m pressroom.evaluation.compare``.

Apart from :mod:`pressroom.evaluation.compare` so that building ``pressroom-eval``'s parser imports no pandas.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the compare options to ``parser`` (:func:`pressroom.evaluation.compare.run_from_args` runs them)."""
    parser.add_argument("paths", nargs="*", help="result directories (searched recursively)")
    parser.add_argument(
        "-o", "--output-dir", default=None, help="where to write the CSV and plots (default: first path)"
    )
    parser.add_argument(
        "--paired", nargs=2, metavar=("BASE_RUN", "OTHER_RUN"), default=None,
        help="two run directories on the same questions: the gap BASE - OTHER with a paired bootstrap interval "
        "(OTHER_RUN may be an unfinished run's .partial.json: the questions it has answered so far)",
    )  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=None, help="--paired: bootstrap draws (default 10000)")
    parser.add_argument("--json", default=None, help="--paired: also write the result to this JSON file")
