"""RULER-style synthetic long-context tasks on the Paul Graham essays, offline, plus kvpress's Hub datasets.

``generate_tasks(tokenizer, ...)`` builds a :class:`pandas.DataFrame` in kvpress's evaluation format (columns
``context, question, answer_prefix, answer, max_new_tokens, task``, plus ``sample``, ``depth`` and
``context_tokens``), so that it can go straight into kvpress's pipeline and our runner. The tasks follow RULER
(Hsieh et al., 2024, https://arxiv.org/abs/2404.06654):

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {7-digit number}." in the essays;
  the question asks for the number of that key.
- ``niah_multikey``: four needles with different keys; the question asks for one of them (the others distract).
- ``niah_multivalue``: four needles with the same key and different numbers; the question asks for all four.
- ``niah_multiquery``: four needles with different keys; one question asks for all four numbers.
- ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (five variables) hidden in the
  essays; the question asks for every variable that holds the value.
- ``cwe`` (common-words extraction): a numbered list of words drawn from the essays' vocabulary, in which ten words
  appear much more often than the rest; the question asks for the ten most common ones.
- ``passkey``: the classic "The pass key is 68471. Remember it. 68471 is the pass key." in the essays.

Lengths are in tokens of the given tokenizer: the whole ``context`` (instructions, haystack and needles) is built to
within a few percent of ``context_length``, and the needle depth is measured in tokens too. Generation is
deterministic for a given seed. ``score_predictions`` scores a ``predicted_answer`` column the way kvpress scores its
RULER data (``string_match_all``, and ``string_match_part`` for ``qa`` tasks), returning kvpress's ``metrics.json``
layout. ``load_hub_dataset`` loads kvpress's own datasets (RULER, LongBench, ...) for users with network.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from pressroom.evaluation.atomic import atomic_path
from pressroom.evaluation.corpora import PG_ESSAYS, load_corpus

TASKS: tuple[str, ...] = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "passkey",
)
"""Names of the synthetic tasks that :func:`generate_tasks` can build."""

MAX_NEW_TOKENS: dict[str, int] = {
    "niah_single": 128,
    "niah_multikey": 128,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "vt": 30,
    "cwe": 120,
    "passkey": 16,
}
"""Generation budget per task (RULER's ``tokens_to_generate``; 16 for the short passkey answer)."""

COLUMNS: tuple[str, ...] = (
    "context",
    "question",
    "answer_prefix",
    "answer",
    "max_new_tokens",
    "task",
    "sample",
    "depth",
    "context_tokens",
)
"""Columns of the DataFrame returned by :func:`generate_tasks` (kvpress's six, then ours)."""

HUB_DATASETS: dict[str, str] = {
    "ruler": "simonjegou/ruler",
    "longbench": "Xnhyacinth/LongBench",
    "infinitebench": "MaxJeblick/InfiniteBench",
    "loogle": "simonjegou/loogle",
    "needle_in_haystack": "alessiodevoto/paul_graham_essays",
}
"""kvpress's evaluation datasets on the Hugging Face Hub, by kvpress's names."""

SYNTHETIC = "synthetic"
LENGTH_TOLERANCE = 0.05  # the context is within 5% of context_length (the builder aims at 1%)

# RULER's settings: 4 needles for the multi-needle variants, 1 chain of 4 hops for vt, 10 common words for cwe.
NUM_NEEDLES = 4
NUM_HOPS = 4
NUM_COMMON_WORDS = 10
_MIN_HAYSTACK_TOKENS = 32  # the least essay text a needle task must contain
_MIN_UNCOMMON_WORDS = NUM_COMMON_WORDS
_AIM = 0.01  # the builders iterate until the context is within 1% of the target

# ---------------------------------------------------------------------------------------------------------------
# Templates (RULER's wording; the essays are the haystack for every task but cwe)
# ---------------------------------------------------------------------------------------------------------------
_NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_QUESTION_ONE = "What is the special magic number for {key} mentioned in the provided text?"
_NIAH_PREFIX_ONE = "The special magic number for {key} mentioned in the provided text is"
_NIAH_QUESTION_ALL = "What are all the special magic numbers for {keys} mentioned in the provided text?"
_NIAH_PREFIX_ALL = "The special magic numbers for {keys} mentioned in the provided text are"

_VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_FIRST = "VAR {name} = {value}."
_VT_HOP = "VAR {name} = VAR {previous}."
_VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
_VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are assigned "
    "the value {value}, they are:"
)

_CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "Question: What are the {count} most common words in the above list?"
_CWE_PREFIX = "Answer: The top {count} words that appear most often in the list are:"

_PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
_PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
# The classic question is "What is the pass key?"; SmolLM2-135M then often explains the phrase "pass key" instead of
# quoting it (5/10 at 2k tokens), while naming it a number mentioned in the text gets 10/10.
_PASSKEY_QUESTION = "What is the pass key (a number) mentioned in the provided text?"
_PASSKEY_PREFIX = "The pass key mentioned in the provided text is"

# Keys of the niah needles are "adjective-noun" pairs (as in RULER), from these fixed lists.
_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "dusty", "eager",
    "elegant", "fancy", "fierce", "fragile", "frozen", "gentle", "giant", "golden", "graceful", "hollow", "humble",
    "icy", "jolly", "lively", "lonely", "lucky", "marble", "mellow", "misty", "modern", "noisy", "patient", "polite",
    "proud", "quiet", "rapid", "rustic", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "sturdy",
    "sunny", "swift", "tender", "tidy", "velvet", "violet", "wandering", "wicked", "wise", "witty", "wooden",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "balloon", "basket", "beacon", "blanket", "bottle", "bridge", "button", "candle", "canyon",
    "castle", "cherry", "compass", "cottage", "dolphin", "dragon", "falcon", "feather", "forest", "garden", "glacier",
    "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "monkey",
    "needle", "orchard", "otter", "parrot", "pebble", "pepper", "pillow", "pocket", "rabbit", "ribbon", "saddle",
    "scooter", "shovel", "spider", "teapot", "thistle", "tiger", "tractor", "trumpet", "tunnel", "violin", "walnut",
    "whistle",
)  # fmt: skip
_VT_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class _Needle:
    """One sentence hidden in the haystack at a desired depth (a fraction of the context, in tokens)."""

    text: str
    depth: float
    target: bool = False


@dataclass
class _Task:
    """A needle task before its haystack is filled in."""

    instruction: str
    needles: list[_Needle]
    question: str
    answer_prefix: str
    answer: list[str]


@dataclass
class _Haystack:
    """Essay sentences of a split with their token counts, for one tokenizer."""

    sentences: list[str]
    counts: list[int]
    doc_starts: list[int]


# ---------------------------------------------------------------------------------------------------------------
# Haystack text
# ---------------------------------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_GLUED_PARAGRAPH = re.compile(r"([a-z][.!?][\"')]?|[.!?][\"')]|\b\d{4})([A-Z][a-z])")


def _clean(text: str) -> str:
    # The essay files are hard-wrapped and their paragraphs are glued together ("...class.One of the ...").
    text = re.sub(r"\s+", " ", text).strip()
    return _GLUED_PARAGRAPH.sub(r"\1 \2", text)


@lru_cache(maxsize=4)
def _essay_sentences(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Sentences of the essays of ``split`` and the index of each document's first sentence."""
    sentences: list[str] = []
    starts: list[int] = []
    for doc in load_corpus(PG_ESSAYS, split):
        parts = [s.strip() for s in _SENTENCE_END.split(_clean(doc)) if s.strip()]
        if parts:
            starts.append(len(sentences))
            sentences.extend(parts)
    if not sentences:
        raise ValueError(f"The essay split {split!r} has no text to build a haystack from.")
    return tuple(sentences), tuple(starts)


@lru_cache(maxsize=4)
def _essay_vocabulary(split: str) -> tuple[str, ...]:
    """Distinct lowercase words (5 to 12 letters) of the essays of ``split``, sorted."""
    words: set[str] = set()
    for doc in load_corpus(PG_ESSAYS, split):
        words.update(w for w in re.findall(r"\b[a-z]+\b", doc.lower()) if 5 <= len(w) <= 12)
    return tuple(sorted(words))


def _haystack(tokenizer: Any, split: str) -> _Haystack:
    sentences, starts = _essay_sentences(split)
    ids = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    return _Haystack(list(sentences), [len(x) for x in ids], list(starts))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _take_sentences(hay: _Haystack, tokenizer: Any, start: int, budget: int) -> tuple[list[str], list[int]]:
    """Essay sentences from ``start`` (cycling through the documents) totalling about ``budget`` tokens.

    The last sentence is cut at a word boundary (and closed with a period) to land near the budget.
    """
    texts: list[str] = []
    counts: list[int] = []
    used = 0
    n = len(hay.sentences)
    i = start
    while used < budget:
        text, count = hay.sentences[i % n], hay.counts[i % n]
        if used + count <= budget:
            texts.append(text)
            counts.append(count)
            used += count
            i += 1
            continue
        words = text.split()
        keep = int(len(words) * (budget - used) / count)
        if keep > 0:
            cut = " ".join(words[:keep]).rstrip(",;:-") + "."
            texts.append(cut)
            counts.append(_count(tokenizer, " " + cut))
        break
    return texts, counts


def _place_needles(
    texts: list[str], counts: list[int], needles: list[_Needle], offset: int, total: int, needle_counts: list[int]
) -> list[str]:
    """Insert the needles between sentences, each at the boundary closest to its depth (in tokens)."""
    out: list[str] = []
    position = offset
    k = 0
    for j in sorted(range(len(needles)), key=lambda j: needles[j].depth):
        goal = needles[j].depth * total
        while k < len(texts) and abs(position + counts[k] - goal) <= abs(position - goal):
            out.append(texts[k])
            position += counts[k]
            k += 1
        out.append(needles[j].text)
        position += needle_counts[j]
    out.extend(texts[k:])
    return out


def _needle_minimum(spec: _Task, tokenizer: Any) -> int:
    """Fewest context tokens that hold the task's instructions, needles and a little essay text."""
    fixed = _count(tokenizer, spec.instruction) + 1  # + the final newline
    return fixed + sum(_count(tokenizer, " " + n.text) for n in spec.needles) + _MIN_HAYSTACK_TOKENS


def _build_needle_context(
    spec: _Task, tokenizer: Any, hay: _Haystack, context_length: int, start: int
) -> tuple[str, int, float]:
    """Fill the haystack around the needles; return (context, its token count, measured depth of the target)."""
    fixed = _count(tokenizer, spec.instruction) + 1  # + the final newline
    needle_counts = [_count(tokenizer, " " + n.text) for n in spec.needles]
    budget = context_length - fixed - sum(needle_counts)
    best: tuple[int, str] | None = None
    for _ in range(6):
        texts, counts = _take_sentences(hay, tokenizer, start, max(budget, 1))
        items = _place_needles(texts, counts, spec.needles, fixed - 1, context_length, needle_counts)
        context = spec.instruction + " ".join(items) + "\n"
        n_tokens = _count(tokenizer, context)
        if best is None or abs(n_tokens - context_length) < abs(best[0] - context_length):
            best = (n_tokens, context)
        if abs(n_tokens - context_length) <= _AIM * context_length:
            break
        budget += context_length - n_tokens
    assert best is not None  # the loop runs at least once
    n_tokens, context = best
    target = next(n for n in spec.needles if n.target)
    depth = _count(tokenizer, context[: context.index(target.text)]) / n_tokens
    return context, n_tokens, depth


# ---------------------------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------------------------
def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), k)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def _other_depths(rng: random.Random, k: int) -> list[float]:
    return [rng.random() for _ in range(k)]


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _niah(task: str, rng: random.Random, depth: float) -> _Task:
    n_needles = 1 if task == "niah_single" else NUM_NEEDLES
    if task == "niah_multivalue":
        keys = _keys(rng, 1) * n_needles
    else:
        keys = _keys(rng, n_needles)
    values = _numbers(rng, n_needles, 7)
    depths = [depth, *_other_depths(rng, n_needles - 1)]
    needles = [
        _Needle(_NIAH_NEEDLE.format(key=k, value=v), d, target=(i == 0))
        for i, (k, v, d) in enumerate(zip(keys, values, depths))
    ]
    if task in ("niah_single", "niah_multikey"):
        question = _NIAH_QUESTION_ONE.format(key=keys[0])
        prefix = _NIAH_PREFIX_ONE.format(key=keys[0])
        answer = [values[0]]
    else:
        asked = _join_keys([keys[0]] if task == "niah_multivalue" else keys)
        question = _NIAH_QUESTION_ALL.format(keys=asked)
        prefix = _NIAH_PREFIX_ALL.format(keys=asked)
        answer = values
    return _Task(_NIAH_INSTRUCTION, needles, question, prefix, answer)


def _vt(rng: random.Random, depth: float) -> _Task:
    names: list[str] = []
    while len(names) < NUM_HOPS + 1:
        name = "".join(rng.choice(_VT_LETTERS) for _ in range(5))
        if name not in names:
            names.append(name)
    value = _numbers(rng, 1, 5)[0]
    # The chain starts at `depth` and its hops follow, evenly spread over the rest of the context (in order).
    needles = [_Needle(_VT_FIRST.format(name=names[0], value=value), depth, target=True)]
    for i in range(1, NUM_HOPS + 1):
        d = depth + (1.0 - depth) * i / (NUM_HOPS + 1)
        needles.append(_Needle(_VT_HOP.format(name=names[i], previous=names[i - 1]), d))
    question = _VT_QUESTION.format(value=value)
    prefix = _VT_PREFIX.format(count=len(names), value=value)
    return _Task(_VT_INSTRUCTION, needles, question, prefix, names)


def _passkey(rng: random.Random, depth: float) -> _Task:
    value = _numbers(rng, 1, 5)[0]
    needle = _Needle(_PASSKEY_NEEDLE.format(value=value), depth, target=True)
    return _Task(_PASSKEY_INSTRUCTION, [needle], _PASSKEY_QUESTION, _PASSKEY_PREFIX, [value])


def _cwe_context(words: list[str]) -> str:
    return _CWE_INSTRUCTION + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + "\n"


@dataclass
class _CwePlan:
    """The words of one cwe sample; :meth:`build` lays out a list with ``n_rare`` distinct uncommon words."""

    common: list[str]
    pool: list[str]
    split: str
    order_seed: float
    freq_common: int
    freq_rare: int

    def build(self, tokenizer: Any, n_rare: int) -> tuple[str, int]:
        words = self.common * self.freq_common + self.pool[:n_rare] * self.freq_rare
        random.Random(f"{self.order_seed}:{n_rare}:{self.freq_common}:{self.freq_rare}").shuffle(words)
        context = _cwe_context(words)
        return context, _count(tokenizer, context)

    def extend_pool(self) -> bool:
        """Add the whole corpus's other words to the pool (once); False if there is nothing left to add."""
        if self.split == "all":
            return False
        extra = sorted(set(_essay_vocabulary("all")) - set(self.common) - set(self.pool))
        random.Random(f"{self.order_seed}:extra").shuffle(extra)
        self.pool = self.pool + extra
        self.split = "all"
        return True


def _cwe_plan(rng: random.Random, context_length: int, split: str) -> _CwePlan:
    # RULER: 10 common words 30 times each among words seen 3 times; for short contexts 6 times among words seen once.
    freq_common, freq_rare = (30, 3) if context_length >= 4096 else (6, 1)
    vocabulary = list(_essay_vocabulary(split))
    rng.shuffle(vocabulary)
    common, pool = vocabulary[:NUM_COMMON_WORDS], vocabulary[NUM_COMMON_WORDS:]
    return _CwePlan(common, pool, split, rng.random(), freq_common, freq_rare)


def _cwe_minimum(plan: _CwePlan, tokenizer: Any) -> int:
    return plan.build(tokenizer, _MIN_UNCOMMON_WORDS)[1]


def _build_cwe_context(plan: _CwePlan, tokenizer: Any, context_length: int) -> tuple[str, int]:
    """Numbered word list of about ``context_length`` tokens (binary search on the number of uncommon words)."""
    while True:
        largest = plan.build(tokenizer, len(plan.pool))
        if largest[1] >= context_length:
            break
        if not plan.extend_pool():
            # Even the whole vocabulary is too small: repeat the uncommon words more (common ones stay 10x as often).
            plan.freq_rare += 1
            plan.freq_common = max(plan.freq_common, 10 * plan.freq_rare)
    lo, hi = _MIN_UNCOMMON_WORDS, len(plan.pool)  # build(lo) is the shortest list, build(hi) >= target
    cache: dict[int, tuple[str, int]] = {lo: plan.build(tokenizer, lo), hi: largest}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cache[mid] = plan.build(tokenizer, mid)
        if cache[mid][1] <= context_length:
            lo = mid
        else:
            hi = mid
    return min((cache[lo], cache[hi]), key=lambda c: abs(c[1] - context_length))


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def _validate_tasks(tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))
    if not names:
        raise ValueError(f"No task given; choose among {', '.join(TASKS)}.")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {', '.join(map(repr, unknown))}; valid tasks are: {', '.join(TASKS)}.")
    return names


def _sample_depths(rng: random.Random, n_samples: int, depth: float | None) -> list[float]:
    if depth is not None:
        return [float(depth)] * n_samples
    # Stratified: sample i gets a seeded depth inside the i-th of n equal slices of [0, 1].
    return [(i + rng.random()) / n_samples for i in range(n_samples)]


def generate_tasks(
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    context_length: int = 2048,
    n_samples: int = 1,
    depth: float | None = None,
    seed: int = 0,
    haystack_split: str = "heldout",
) -> pd.DataFrame:
    """Generate RULER-style synthetic tasks on the Paul Graham essays, in kvpress's DataFrame format.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Used to measure lengths and depths in tokens (``add_special_tokens=False``).
    tasks : sequence of str, optional
        Task names among :data:`TASKS`; all of them by default.
    context_length : int
        Target length of each ``context`` (instructions, haystack and needles) in tokens; the generated contexts are
        within 5% of it (usually within 1%).
    n_samples : int
        Samples (distinct contexts) per task.
    depth : float, optional
        Where the (first) needle goes, as a fraction of the context in tokens, in [0, 1]. ``None`` spreads the
        samples' depths evenly over [0, 1] (one seeded depth in each of ``n_samples`` equal slices).
    seed : int
        Seed of the keys, values, depths and haystack offsets: the same seed gives an identical DataFrame.
    haystack_split : str
        Split of the essays (``"train"``, ``"heldout"`` or ``"all"``, see
        :func:`pressroom.evaluation.corpora.load_corpus`); the documents are cycled when more text is needed.

    Returns
    -------
    pandas.DataFrame
        One row per (task, sample, question), with columns :data:`COLUMNS`: ``context``, ``question``,
        ``answer_prefix``, ``answer`` (list of reference strings), ``max_new_tokens``, ``task``, ``sample`` (int),
        ``depth`` (the measured depth of the first needle, NaN for cwe) and ``context_tokens``.

    Raises
    ------
    ValueError
        For an unknown task, ``n_samples < 1``, a depth outside [0, 1], or a context_length too short for a task's
        instructions and needles (the message gives the minimum).
    """
    names = _validate_tasks(tasks)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer (tokens), got {context_length!r}.")
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth must be a number in [0, 1] (or None to spread the depths), got {depth!r}.")
    hay = _haystack(tokenizer, haystack_split) if any(t != "cwe" for t in names) else None

    # Plan every sample first (keys, values, depths, words: none depend on the length), so that a context_length too
    # short for some sample is reported with the minimum that works for all of them.
    plans: list[tuple[str, int, _Task | _CwePlan, int]] = []
    for task in names:
        depth_rng = random.Random(f"pressroom-tasks:{seed}:{task}:depths")
        depths = _sample_depths(depth_rng, n_samples, depth)
        task_plans = []
        for sample in range(n_samples):
            rng = random.Random(f"pressroom-tasks:{seed}:{task}:{sample}")
            plan: _Task | _CwePlan
            if task == "cwe":
                plan = _cwe_plan(rng, context_length, haystack_split)
                start = 0
            else:
                assert hay is not None
                if task == "vt":
                    plan = _vt(rng, depths[sample])
                elif task == "passkey":
                    plan = _passkey(rng, depths[sample])
                else:
                    plan = _niah(task, rng, depths[sample])
                start = rng.choice(hay.doc_starts)
            task_plans.append((task, sample, plan, start))
        minimum = max(
            _cwe_minimum(p, tokenizer) if isinstance(p, _CwePlan) else _needle_minimum(p, tokenizer)
            for _, _, p, _ in task_plans
        )
        if context_length < minimum:
            what = "its shortest word list" if task == "cwe" else "its instructions, needles and a little essay text"
            raise ValueError(
                f"context_length={context_length} is too short for task {task!r}: it needs at least {minimum} tokens "
                f"with this tokenizer ({what}). Use context_length >= {minimum}."
            )
        plans.extend(task_plans)

    rows: list[dict[str, Any]] = []
    for task, sample, plan, start in plans:
        if isinstance(plan, _CwePlan):
            context, n_tokens = _build_cwe_context(plan, tokenizer, context_length)
            answer = list(plan.common)
            question = _CWE_QUESTION.format(count=len(answer))
            prefix = _CWE_PREFIX.format(count=len(answer))
            used_depth = float("nan")
        else:
            assert hay is not None
            context, n_tokens, used_depth = _build_needle_context(plan, tokenizer, hay, context_length, start)
            question, prefix, answer = plan.question, plan.answer_prefix, plan.answer
        rows.append(
            {
                "context": context,
                "question": question,
                "answer_prefix": prefix,
                "answer": list(answer),
                "max_new_tokens": MAX_NEW_TOKENS[task],
                "task": task,
                "sample": sample,
                "depth": used_depth,
                "context_tokens": n_tokens,
            }
        )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.astype({"max_new_tokens": "int64", "sample": "int64", "depth": "float64", "context_tokens": "int64"})


_CONTROL = re.compile(r"[\x00-\x1f]")


def _references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _prediction(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _CONTROL.sub("", str(value).strip()).strip().lower()


def _string_match(prediction: str, references: list[str], part: bool) -> float:
    hits = [1.0 if r.lower() in prediction else 0.0 for r in references]
    if not hits:
        return 0.0
    return max(hits) if part else sum(hits) / len(hits)


def score_predictions(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Score predictions per task, as kvpress scores its RULER data.

    For each row, the fraction of the reference strings (``answer``) found case-insensitively in
    ``predicted_answer`` (``string_match_all``; for tasks whose name starts with ``qa``, 1 if any reference is found:
    ``string_match_part``), averaged over the task's rows and multiplied by 100.

    Parameters
    ----------
    df : pandas.DataFrame
        With columns ``task``, ``answer`` (a list of strings, or one string) and ``predicted_answer``.

    Returns
    -------
    dict
        ``{task: {"string_match": score}}`` with scores in [0, 100] rounded to 2 decimals (kvpress's
        ``metrics.json``).
    """
    values = row_scores(df)
    return {
        str(task): {"string_match": round(100.0 * float(group.mean()), 2)}
        for task, group in values.groupby(df["task"], sort=True)
    }


def row_scores(df: pd.DataFrame) -> pd.Series:
    """Each row's score in [0, 1], as :func:`score_predictions` averages them (same columns, same errors).

    ``answer`` may also be a list's text, as ``predictions.csv`` stores it (JSON, Python's or numpy's ``repr``).
    """
    missing = [c for c in ("predicted_answer", "answer", "task") if c not in df.columns]
    if missing:
        raise ValueError(
            f"Cannot score: the DataFrame has no {', '.join(map(repr, missing))} column(s). Run the model first so "
            "that each row has a 'predicted_answer' (and keep the 'task' and 'answer' columns)."
        )
    values = [
        _string_match(_prediction(p), _as_list(a) if isinstance(a, str) else _references(a), str(t).startswith("qa"))
        for p, a, t in zip(df["predicted_answer"], df["answer"], df["task"])
    ]
    return pd.Series(values, index=df.index, dtype="float64")


_FORMATS = (".jsonl", ".csv", ".parquet")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"Unsupported file extension {path.suffix!r} for {path}; use one of {', '.join(_FORMATS)}.")
    return suffix


def _plain(value: Any) -> Any:
    """JSON-friendly version of a cell (lists and numpy arrays to lists, NaN to None, numpy scalars to Python)."""
    if isinstance(value, str) or value is None:
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_tasks(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a task DataFrame to ``.jsonl``, ``.csv`` or ``.parquet`` (by extension), atomically.

    The file is written to a temporary file in the same directory and then moved into place, so a reader never sees a
    partial file. In CSV, list cells (``answer``) are stored as JSON strings.

    Parameters
    ----------
    df : pandas.DataFrame
        E.g. from :func:`generate_tasks`, possibly with a ``predicted_answer`` column.
    path : str or os.PathLike
        Destination; its parent directory is created if needed.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    fmt = _format(path)
    with atomic_path(path) as tmp_name:
        if fmt == ".jsonl":
            with open(tmp_name, "w", encoding="utf-8") as f:
                for record in df.to_dict(orient="records"):
                    plain = {str(k): _plain(v) for k, v in record.items()}
                    f.write(json.dumps(plain, ensure_ascii=False) + "\n")
        elif fmt == ".csv":
            out = df.copy()
            for column in out.columns:
                if out[column].map(lambda v: isinstance(v, (list, tuple)) or hasattr(v, "tolist")).any():
                    out[column] = out[column].map(lambda v: json.dumps(_plain(v), ensure_ascii=False))
            out.to_csv(tmp_name, index=False)
        else:
            df.to_parquet(tmp_name, index=False)
    return path


_QUOTED = r"'(?:[^'\\]|\\.)*'" + "|" + r'"(?:[^"\\]|\\.)*"'
# numpy's repr of a string array, as pandas writes an array column to CSV: quoted items separated by blanks only
_NUMPY_STRINGS = re.compile(rf"\[\s*(?:(?:{_QUOTED})\s*)*\]")
_NP_STR = re.compile(rf"np\.str_\(({_QUOTED})\)")  # a numpy >= 2 string scalar inside a list's repr


def _parse_list_text(text: str) -> list | None:
    """A list written as text: JSON, a Python list's repr (also with ``np.str_('x')`` items) or a numpy string
    array's repr (``['a' 'b']``, no commas); ``None`` if it is none of them."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        if _NUMPY_STRINGS.fullmatch(text):
            return [ast.literal_eval(q) for q in re.findall(_QUOTED, text)]
        try:
            parsed = ast.literal_eval(_NP_STR.sub(r"\1", text))
        except (ValueError, SyntaxError):
            return None
    return list(parsed) if isinstance(parsed, (list, tuple)) else None


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        parsed = _parse_list_text(text) if text.startswith("[") else None
        return [value] if parsed is None else [str(v) for v in parsed]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def read_tasks(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a file written by :func:`write_tasks` (``.jsonl``, ``.csv`` or ``.parquet``).

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    pandas.DataFrame
        With ``answer`` as a list of strings per row and the numeric columns (``max_new_tokens``, ``sample``,
        ``context_tokens``, ``depth``) restored to numbers.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"No task file at {path}.")
    if fmt == ".jsonl":
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        df = pd.DataFrame.from_records(records)
    elif fmt == ".csv":
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    else:
        df = pd.read_parquet(path)
    if "answer" in df.columns:
        df["answer"] = df["answer"].map(_as_list)
    for column in ("max_new_tokens", "sample", "context_tokens"):
        if column in df.columns:
            df[column] = pd.to_numeric(df[column]).astype("int64")
    if "depth" in df.columns:
        df["depth"] = pd.to_numeric(df["depth"].replace({"": None}), errors="coerce").astype("float64")
    return df


def load_hub_dataset(name: str, data_dir: str | None = None) -> pd.DataFrame:
    """Load one of kvpress's evaluation datasets from the Hugging Face Hub (needs network or a warm HF cache).

    Parameters
    ----------
    name : str
        A key of :data:`HUB_DATASETS` (``"ruler"``, ``"longbench"``, ``"infinitebench"``, ``"loogle"``,
        ``"needle_in_haystack"``).
    data_dir : str, optional
        The dataset's sub-directory, e.g. ``"4096"`` for RULER or a task name for LongBench.

    Returns
    -------
    pandas.DataFrame
        The ``test`` split, in kvpress's format.
    """
    if name not in HUB_DATASETS:
        raise ValueError(
            f"Unknown Hub dataset {name!r}; choose one of {', '.join(HUB_DATASETS)} "
            f"(or use the offline {SYNTHETIC!r} tasks, see generate_tasks)."
        )
    repo = HUB_DATASETS[name]
    try:
        from datasets import load_dataset

        return load_dataset(repo, data_dir=data_dir, split="test").to_pandas()
    except Exception as err:  # network and cache errors surface as many exception types
        where = f"{repo}" + (f" (data_dir={data_dir!r})" if data_dir else "")
        raise RuntimeError(
            f"Could not load dataset {name!r} from the Hugging Face Hub ({where}): {err}. It needs network access "
            f"or a warm HF cache; offline, use the {SYNTHETIC!r} tasks "
            "(pressroom.evaluation.tasks.generate_tasks), built from the embedded essays."
        ) from err
