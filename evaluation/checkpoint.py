"""The checkpoint of an unfinished evaluation run: ``{results_dir}.partial.json``.

:class:`pressroom.evaluation.run.Runner` rewrites it atomically after every context (the answers so far by row
number, the run's identity, what its recorder measured, the wall seconds) and resumes from it;
``pressroom-eval compare --paired BASE RUN.partial.json`` pairs the questions it has answered with a finished run.
Both read it here (no torch: the comparison tools stay light).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUFFIX = ".partial.json"
KEYS = ("answers", "identity", "recorder", "wall")  # each a dict but "wall" (seconds)


def partial_path(results_dir: Path) -> Path:
    """The checkpoint of an unfinished run: answers so far, written after every context (removed when complete)."""
    return results_dir.with_name(f"{results_dir.name}{SUFFIX}")


def is_checkpoint(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


def read_checkpoint(path: Path, advice: str) -> dict[str, Any]:
    """The checkpoint at ``path``, checked for its :data:`KEYS`.

    Raises
    ------
    ValueError
        Unreadable, or a key missing or of the wrong type; the message ends with ``advice`` (what to do).
    """
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is an unreadable checkpoint ({err}); {advice}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is an unreadable checkpoint (not a JSON object); {advice}")
    wrong = [k for k in KEYS if not isinstance(state.get(k), (int, float) if k == "wall" else dict)]
    if wrong:
        raise ValueError(f"{path} lacks {wrong} (or holds them in another form); {advice}")
    return state
