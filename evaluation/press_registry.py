"""Presses by name: kvpress's (with the names of kvpress's evaluation registry) and pressroom's.

A press spec is ``name`` or ``name:key=value,key=value`` (values parsed as Python literals when they can be,
e.g. ``snapkv:window_size=32``, ``sink_window:n_sink=4,window=1024``). ``no_press`` (alias ``none``) is the
baseline. The compression ratio is given separately and set on the press (on every component of a
composed press).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import kvpress
from kvpress import (
    AdaKVPress,
    BasePress,
    ComposedPress,
    DecodingPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    LagKVPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

NO_PRESS = "no_press"
NO_PRESS_ALIASES = ("no_press", "none")

# kvpress's presses under the names kvpress's evaluation uses (plus the faithful StreamingLLM wrapper of
# kvpress issue #158). Each factory returns a fresh press: presses hold per-run state.
KVPRESS_FACTORIES: dict[str, Callable[[], BasePress]] = {
    "snapkv": SnapKVPress,
    "knorm": KnormPress,
    "streaming_llm": StreamingLLMPress,
    "tova": TOVAPress,
    "random": RandomPress,
    "keydiff": KeyDiffPress,
    "pyramidkv": PyramidKVPress,
    "lagkv": LagKVPress,
    "observed_attention": ObservedAttentionPress,
    "expected_attention": lambda: AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)),
    "adakv_snapkv": lambda: AdaKVPress(SnapKVPress()),
    "key_rerotation_streaming_llm": lambda: KeyRerotationPress(StreamingLLMPress()),
    "decoding_streaming_llm": lambda: DecodingPress(base_press=StreamingLLMPress()),
    "decoding_knorm": lambda: DecodingPress(base_press=KnormPress()),
}


def pressroom_factories() -> dict[str, Callable[..., BasePress]]:
    """pressroom's own presses, from ``pressroom.presses.PRESSES`` (name -> class)."""
    from pressroom.presses import PRESSES

    return dict(PRESSES)


def press_names() -> list[str]:
    return [NO_PRESS, *KVPRESS_FACTORIES, *pressroom_factories()]


def parse_press_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name:key=value,...`` into the name and its keyword arguments."""
    name, _, args = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad press argument {item!r} in {spec!r}: write name:key=value,key=value.")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw.strip()
    return name.strip(), kwargs


def set_compression_ratio(press: BasePress, ratio: float) -> None:
    """Set ``compression_ratio`` on a press and on every press it wraps (kvpress's wrappers and ComposedPress)."""
    if isinstance(press, ComposedPress):
        for sub in press.presses:
            set_compression_ratio(sub, ratio)
        return
    if isinstance(press, DecodingPress):
        # DecodingPress compresses to target_size; its base press's ratio is overridden at each step.
        return
    if hasattr(press, "compression_ratio"):
        press.compression_ratio = ratio
    inner = getattr(press, "press", None) or getattr(press, "base_press", None)
    if isinstance(inner, BasePress):
        set_compression_ratio(inner, ratio)


def _apply_kwargs(press: BasePress, kwargs: dict[str, Any], spec: str) -> BasePress:
    target = press
    # Wrappers (AdaKV, KeyRerotation, Decoding) forward unknown keywords to the press they wrap.
    while kwargs:
        names = {f.name for f in fields(target)} if is_dataclass(target) else set()
        for key in [k for k in kwargs if k in names]:
            setattr(target, key, kwargs.pop(key))
        inner = getattr(target, "press", None) or getattr(target, "base_press", None)
        if not kwargs or not isinstance(inner, BasePress):
            break
        target = inner
    if kwargs:
        raise ValueError(f"Press {spec!r} has no parameter(s) {sorted(kwargs)}.")
    if hasattr(press, "__post_init__"):
        press.__post_init__()
    return press


def make_press(spec: str | BasePress | None, compression_ratio: float = 0.0) -> BasePress | None:
    """Build a press from a spec (or pass an instance through), with its compression ratio set.

    Parameters
    ----------
    spec : str, BasePress or None
        ``"no_press"``/``"none"``/None for the baseline; a registry name, optionally with ``:key=value`` pairs;
        or a press instance (returned as is, its ratio untouched).
    compression_ratio : float
        Fraction of the KV cache to remove, in [0, 1).
    """
    if spec is None or isinstance(spec, BasePress):
        return spec
    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}.")
    name, kwargs = parse_press_spec(spec)
    if name in NO_PRESS_ALIASES:
        if kwargs:
            raise ValueError("no_press takes no parameters.")
        return None
    ours = pressroom_factories()
    if name in ours:
        cls = ours[name]
        params = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
        if "compression_ratio" in params and "compression_ratio" not in kwargs:
            kwargs["compression_ratio"] = compression_ratio
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"Bad parameters for press {name!r}: {err}.") from err
    if name in KVPRESS_FACTORIES:
        press = KVPRESS_FACTORIES[name]()
    elif isinstance(getattr(kvpress, name, None), type) and issubclass(getattr(kvpress, name), BasePress):
        try:
            press = getattr(kvpress, name)()
        except TypeError as err:
            raise ValueError(f"kvpress.{name} cannot be built without arguments ({err}); wrap it in code.") from err
    else:
        raise ValueError(f"Unknown press {name!r}. Known: {', '.join(press_names())}, or any kvpress class name.")
    set_compression_ratio(press, compression_ratio)
    return _apply_kwargs(press, kwargs, spec)


def press_label(spec: str | BasePress | None) -> str:
    """The press's name as it appears in result directories."""
    if spec is None:
        return NO_PRESS
    if isinstance(spec, BasePress):
        return type(spec).__name__
    name, kwargs = parse_press_spec(spec)
    if name in NO_PRESS_ALIASES:
        return NO_PRESS
    # values may be paths (e.g. anchor:adapter=DIR): no path separator may reach the directory name
    suffix = "".join(f"-{k}{str(v).strip('/').replace('/', '--')}" for k, v in sorted(kwargs.items()))
    return f"{name}{suffix}"
