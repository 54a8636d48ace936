"""Atomic writes: a file is complete or untouched, never half-written."""

from __future__ import annotations

import json

import pytest

from pressroom.evaluation.atomic import atomic_path, atomic_write_json


def test_write_and_failure_keeps_previous(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}  # the old result survives
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temp file left behind
