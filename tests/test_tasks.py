"""Tests of the synthetic RULER-style tasks (pressroom.evaluation.tasks): lengths, depths, answers, scoring, files."""

from __future__ import annotations

import math
import re
from collections import Counter

import pandas as pd
import pytest

from pressroom.evaluation.tasks import (
    COLUMNS,
    HUB_DATASETS,
    LENGTH_TOLERANCE,
    TASKS,
    generate_tasks,
    load_hub_dataset,
    read_tasks,
    score_predictions,
    write_tasks,
)

NEEDLE_TASKS = [t for t in TASKS if t != "cwe"]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def needle_start(row: pd.Series) -> int:
    """Character offset of the sentence holding the first needle (the one whose depth is asked)."""
    first = re.escape(row["answer"][0])
    if row["task"] == "vt":
        pattern = rf"VAR {first} = \d+\."
    elif row["task"] == "passkey":
        pattern = rf"The pass key is {first}\. Remember it\."
    else:
        pattern = rf"One of the special magic numbers for [a-z]+-[a-z]+ is: {first}\."
    matches = list(re.finditer(pattern, row["context"]))
    assert len(matches) == 1, f"{row['task']}: needle {pattern!r} found {len(matches)} times"
    return matches[0].start()


@pytest.fixture(scope="module")
def tasks_2k(smollm2_tokenizer) -> pd.DataFrame:
    return generate_tasks(smollm2_tokenizer, context_length=2048, n_samples=2, seed=0)


def test_columns_and_types(tasks_2k):
    df = tasks_2k
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 2 * len(TASKS)
    assert list(df["task"].unique()) == list(TASKS)
    assert df.groupby("task")["sample"].apply(list).to_dict() == {t: [0, 1] for t in TASKS}
    for _, row in df.iterrows():
        assert isinstance(row["answer"], list) and row["answer"]
        assert all(isinstance(a, str) and a for a in row["answer"])
        assert row["question"] and row["answer_prefix"] and row["max_new_tokens"] > 0
    assert df["sample"].dtype == "int64" and df["context_tokens"].dtype == "int64"
    assert df["max_new_tokens"].dtype == "int64" and df["depth"].dtype == "float64"
    # kvpress's runner groups rows by context: rows sharing a context must share the answer prefix.
    assert (df.groupby("context")["answer_prefix"].nunique() == 1).all()
    assert df.loc[df["task"] == "cwe", "depth"].isna().all()
    needle_depths = df.loc[df["task"] != "cwe", "depth"]
    assert needle_depths.between(0.0, 1.0).all()


def test_deterministic_per_seed(smollm2_tokenizer, tasks_2k):
    again = generate_tasks(smollm2_tokenizer, context_length=2048, n_samples=2, seed=0)
    pd.testing.assert_frame_equal(again, tasks_2k)
    other = generate_tasks(smollm2_tokenizer, context_length=2048, n_samples=2, seed=1)
    for (_, a), (_, b) in zip(tasks_2k.iterrows(), other.iterrows()):
        assert a["task"] == b["task"]
        assert a["answer"] != b["answer"]
        assert a["context"] != b["context"]


@pytest.mark.parametrize("context_length", [1024, 2048, 4096])
def test_lengths_within_tolerance(smollm2_tokenizer, context_length):
    df = generate_tasks(smollm2_tokenizer, context_length=context_length, n_samples=2, seed=3)
    assert set(df["task"]) == set(TASKS)
    for _, row in df.iterrows():
        measured = n_tokens(smollm2_tokenizer, row["context"])
        assert measured == row["context_tokens"]
        assert abs(measured - context_length) <= LENGTH_TOLERANCE * context_length, (row["task"], measured)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_requested_depth(smollm2_tokenizer, depth):
    df = generate_tasks(smollm2_tokenizer, NEEDLE_TASKS, context_length=2048, n_samples=2, depth=depth, seed=5)
    for _, row in df.iterrows():
        offset = n_tokens(smollm2_tokenizer, row["context"][: needle_start(row)])
        measured = offset / row["context_tokens"]
        assert abs(measured - depth) <= 0.05, (row["task"], depth, measured)
        assert abs(row["depth"] - measured) <= 0.01


def test_depths_spread_when_not_given(smollm2_tokenizer):
    n = 5
    df = generate_tasks(smollm2_tokenizer, ["niah_single", "passkey"], context_length=1024, n_samples=n, seed=2)
    for _, group in df.groupby("task"):
        depths = group.sort_values("sample")["depth"].tolist()
        for i, d in enumerate(depths):  # sample i falls in the i-th fifth of the context (give or take a sentence)
            assert i / n - 0.05 <= d <= (i + 1) / n + 0.05, (i, d)


def test_answers_are_in_the_context(tasks_2k):
    for _, row in tasks_2k.iterrows():
        for answer in row["answer"]:
            assert answer in row["context"], (row["task"], answer)


def test_task_specifics(tasks_2k):
    df = tasks_2k.set_index(["task", "sample"])
    single = df.loc[("niah_single", 0)]
    assert len(single["answer"]) == 1 and re.fullmatch(r"\d{7}", single["answer"][0])
    assert single["context"].count("One of the special magic numbers for") == 1
    key = re.search(r"for ([a-z]+-[a-z]+) mentioned", single["question"]).group(1)
    assert f"One of the special magic numbers for {key} is: {single['answer'][0]}." in single["context"]
    assert single["answer_prefix"] == f"The special magic number for {key} mentioned in the provided text is"

    multikey = df.loc[("niah_multikey", 0)]
    assert len(multikey["answer"]) == 1
    assert multikey["context"].count("One of the special magic numbers for") == 4
    assert len(set(re.findall(r"numbers for ([a-z]+-[a-z]+) is", multikey["context"]))) == 4

    multivalue = df.loc[("niah_multivalue", 0)]
    assert len(set(multivalue["answer"])) == 4
    assert len(set(re.findall(r"numbers for ([a-z]+-[a-z]+) is", multivalue["context"]))) == 1

    multiquery = df.loc[("niah_multiquery", 0)]
    keys = re.findall(r"numbers for ([a-z]+-[a-z]+) is", multiquery["context"])
    assert len(set(keys)) == 4 and len(set(multiquery["answer"])) == 4
    assert all(k in multiquery["question"] and k in multiquery["answer_prefix"] for k in keys)

    vt = df.loc[("vt", 0)]
    names = vt["answer"]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(r"VAR [A-Z]{5} = (\d+)\.", vt["context"]).group(1)
    assert f"value {value}" in vt["question"]
    for previous, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {previous}." in vt["context"]
        assert vt["context"].index(f"VAR {previous} =") < vt["context"].index(f"VAR {name} =")

    passkey = df.loc[("passkey", 0)]
    assert f"The pass key is {passkey['answer'][0]}. Remember it." in passkey["context"]


def test_cwe_common_words_are_the_most_common(tasks_2k):
    for _, row in tasks_2k[tasks_2k["task"] == "cwe"].iterrows():
        words = re.findall(r"\d+\. ([a-z]+)", row["context"])
        counts = Counter(words)
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(row["answer"])
        least_common = min(counts[w] for w in row["answer"])
        most_other = max(c for w, c in counts.items() if w not in top)
        assert least_common > most_other
        numbers = [int(n) for n in re.findall(r"(\d+)\. [a-z]+", row["context"])]
        assert numbers == list(range(1, len(numbers) + 1))


def test_score_predictions(tasks_2k):
    df = tasks_2k.copy()
    df["predicted_answer"] = [" " + ", ".join(a).upper() + "." for a in df["answer"]]
    scores = score_predictions(df)
    assert scores == {t: {"string_match": 100.0} for t in sorted(TASKS)}
    df["predicted_answer"] = ""
    assert score_predictions(df) == {t: {"string_match": 0.0} for t in sorted(TASKS)}
    # string_match_all: half of the references found in one row of two -> 25.
    multi = df[df["task"] == "niah_multivalue"].copy()
    multi["predicted_answer"] = [" ".join(multi["answer"].iloc[0][:2]), None]
    assert score_predictions(multi) == {"niah_multivalue": {"string_match": 25.0}}
    # string_match_part for qa tasks: any reference counts.
    qa = pd.DataFrame({"task": ["qa_1"], "answer": [["Paris", "Lyon"]], "predicted_answer": ["paris"]})
    assert score_predictions(qa) == {"qa_1": {"string_match": 100.0}}


def test_score_predictions_needs_predictions(tasks_2k):
    with pytest.raises(ValueError, match="predicted_answer"):
        score_predictions(tasks_2k)


def test_bad_inputs(smollm2_tokenizer):
    with pytest.raises(ValueError, match="Unknown task.*niah_single.*passkey"):
        generate_tasks(smollm2_tokenizer, ["niah_single", "haystack"])
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        generate_tasks(smollm2_tokenizer, ["passkey"], depth=1.5)
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        generate_tasks(smollm2_tokenizer, ["passkey"], depth=-0.1)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        generate_tasks(smollm2_tokenizer, ["passkey"], n_samples=0)
    for task in TASKS:
        with pytest.raises(ValueError, match=f"too short for task '{task}'.*at least") as info:
            generate_tasks(smollm2_tokenizer, [task], context_length=64, n_samples=2)
        minimum = int(re.search(r"context_length >= (\d+)", str(info.value)).group(1))
        assert minimum > 64
        # The minimum it reports is enough (for the same samples), and the result is still within tolerance.
        df = generate_tasks(smollm2_tokenizer, [task], context_length=minimum, n_samples=2)
        assert (abs(df["context_tokens"] - minimum) <= LENGTH_TOLERANCE * minimum).all()


def test_single_task_name_and_split(smollm2_tokenizer):
    df = generate_tasks(smollm2_tokenizer, "passkey", context_length=512, haystack_split="train")
    assert df["task"].tolist() == ["passkey"]
    with pytest.raises(ValueError, match="Unknown split"):
        generate_tasks(smollm2_tokenizer, "passkey", context_length=512, haystack_split="test")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_write_read_round_trip(tmp_path, tasks_2k, suffix):
    df = tasks_2k.copy()
    df["predicted_answer"] = ["", 'quote " and, comma\nnewline'] * (len(df) // 2)
    path = write_tasks(df, tmp_path / "sub" / f"tasks{suffix}")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    back = read_tasks(path)
    pd.testing.assert_frame_equal(back, df)
    assert all(isinstance(a, list) for a in back["answer"])
    assert math.isnan(back.loc[back["task"] == "cwe", "depth"].iloc[0])


def test_write_read_reject_unknown_extension(tmp_path, tasks_2k):
    with pytest.raises(ValueError, match="extension"):
        write_tasks(tasks_2k, tmp_path / "tasks.xlsx")
    with pytest.raises(ValueError, match="extension"):
        read_tasks(tmp_path / "tasks.txt")
    assert list(tmp_path.iterdir()) == []


def test_hub_dataset_loader(monkeypatch):
    import datasets

    with pytest.raises(ValueError, match="Unknown Hub dataset.*ruler"):
        load_hub_dataset("nope")

    calls = []

    class Fake:
        def to_pandas(self):
            return pd.DataFrame({"context": ["c"]})

    def fake_load(repo, data_dir=None, split=None):
        calls.append((repo, data_dir, split))
        return Fake()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_hub_dataset("ruler", "4096")["context"].tolist() == ["c"]
    assert calls == [(HUB_DATASETS["ruler"], "4096", "test")]

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="network.*synthetic"):
        load_hub_dataset("longbench", "narrativeqa")


def test_smollm2_retrieves_single_needle(smollm2):
    import kvpress  # noqa: F401  (registers kvpress's pipeline)
    from kvpress import KVPressTextGenerationPipeline

    model, tokenizer = smollm2
    df = generate_tasks(tokenizer, ["niah_single"], context_length=1024, seed=0)
    row = df.iloc[0]
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    prediction = pipe(row["context"], question=row["question"], answer_prefix=row["answer_prefix"], max_new_tokens=16)[
        "answer"
    ]
    assert row["answer"][0] in prediction, prediction
    df["predicted_answer"] = [prediction]
    assert score_predictions(df) == {"niah_single": {"string_match": 100.0}}
