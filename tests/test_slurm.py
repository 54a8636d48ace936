"""slurm/ against a real Slurm (slurm/local/start.sh starts one on this machine; CI does): a 4-task array of tiny
evaluations with its aggregation, a resubmission that submits nothing, a task killed mid-run that is the only one
to run again, and a training unit that checkpoints on USR1 and is requeued.

Skipped, with the reason, when no Slurm answers (set ``PRESSROOM_SLURM_UNAVAILABLE`` to say why it could not
start). ``PRESSROOM_SLURM_RECORD=FILE`` writes a transcript of the run (job ids, task logs) to FILE.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from pressroom.evaluation import manifest as mf
from pressroom.evaluation.cli import main as eval_main
from pressroom.evaluation.manifest import read_manifest, task_done

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
LOCAL_DIR = Path(os.environ.get("PRESSROOM_SLURM_DIR", "/tmp/pressroom-slurm"))
WAIT_S = 420
GRID = ["--model", "tiny-llama", "--ratio", "0.5", "--data-dir", "256", "--tasks", "niah_single"]
GRID += ["--n-samples", "1", "--max-new-tokens", "3"]
PRESSES = ["knorm", "streaming_llm", "snapkv"]  # + the no_press baseline: 4 tasks


class Record:
    """The transcript of the run, written to $PRESSROOM_SLURM_RECORD when set."""

    def __init__(self) -> None:
        self.path = os.environ.get("PRESSROOM_SLURM_RECORD")
        self.parts: list[str] = []

    def add(self, title: str, text: str = "") -> None:
        self.parts.append(f"== {title}\n{text.rstrip()}\n" if text else f"== {title}\n")

    def write(self) -> None:
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            head = f"# tests/test_slurm.py against a real Slurm, transcript ($PRESSROOM_SLURM_RECORD), {time.ctime()}\n"
            Path(self.path).write_text(head + "\n".join(self.parts), encoding="utf-8")


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    reason = os.environ.get("PRESSROOM_SLURM_UNAVAILABLE")
    if reason:
        pytest.skip(f"Slurm could not start: {reason}")
    env = dict(os.environ)
    if "SLURM_CONF" not in env and (LOCAL_DIR / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(LOCAL_DIR / "slurm.conf")
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed (no sbatch/sinfo on PATH); start one with `sudo slurm/local/start.sh`")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("Slurm does not answer (sinfo timed out); start one with `sudo slurm/local/start.sh`")
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        why = out.stderr.strip() or f"node states {states}"
        pytest.skip(f"no Slurm node is up ({why}); start one with `sudo slurm/local/start.sh`")
    env["PRESSROOM_SETUP"] = f'export PATH="{Path(sys.executable).parent}:$PATH"'  # this environment, in the jobs
    env["PRESSROOM_GPUS"] = "0"
    env.pop("PRESSROOM_VENV", None)
    env.pop("PRESSROOM_TASK_SLEEP", None)  # only the kill below asks for a slow task
    yield env
    if SUBMITTED:
        sh(["scancel", *SUBMITTED], env)


SUBMITTED: list[str] = []  # cancelled when the tests end, so that a failed test leaves no job behind


def sh(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def submit(manifest: Path, env: dict[str, str], *extra: str) -> tuple[list[str], str]:
    """Run slurm/submit.sh; return the job ids it printed (arrays, then the aggregation) and its stderr."""
    res = sh(["bash", str(SUBMIT), str(manifest), *extra], env)
    assert res.returncode == 0, res.stderr
    ids = [line.split()[1] for line in res.stdout.splitlines()]
    SUBMITTED.extend(ids)
    return ids, res.stderr


def jobs(job_id: str, env: dict[str, str]) -> list[dict[str, str]]:
    """scontrol's records of a job (one per array task), as dicts."""
    res = sh(["scontrol", "show", "job", "-o", job_id], env)
    assert res.returncode == 0, res.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in res.stdout.splitlines() if line.strip()]


def wait_for(job_ids: list[str], env: dict[str, str], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = sh(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], env)
        if res.returncode == 0 and not res.stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s: {res.stdout}")


def wait_running(job_id: str, log: Path, env: dict[str, str], text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states = {j.get("JobState") for j in jobs(job_id, env)}
        if "RUNNING" in states and log.is_file() and text in log.read_text():
            return
        assert states <= {"PENDING", "RUNNING", "CONFIGURING"}, f"{job_id} ended early: {states}"
        time.sleep(1)
    raise AssertionError(f"{job_id} did not start running in {WAIT_S} s")


def fingerprint(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _time(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()


RECORD = Record()


def test_array_resubmit_and_recovery(slurm_env, tmp_path):
    env, rec = slurm_env, RECORD
    version = sh(["sbatch", "--version"], env).stdout.strip()
    rec.add(f"{version}, SLURM_CONF={env.get('SLURM_CONF', '(default)')}", sh(["sinfo", "-N", "-l"], env).stdout)
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "results"
    assert eval_main(["plan", str(manifest), *GRID, "--press", *PRESSES, "--output-dir", str(out)]) == 0
    tasks = read_manifest(manifest)
    assert len(tasks) == 4
    rec.add("manifest (4 tasks)", manifest.read_text())

    # 1. the array (throttled to 2 at a time) and its aggregation job
    ids, err = submit(manifest, env, "--throttle", "2")
    rec.add(f"slurm/submit.sh manifest.jsonl --throttle 2 -> {' '.join(ids)}", err)
    assert len(ids) == 2, err
    array_id, agg_id = ids
    assert "tasks 0-3 (at most 2 at a time)" in err
    wait_for(ids, env)
    records = {j["ArrayTaskId"]: j for j in jobs(array_id, env)}
    assert sorted(records) == ["0", "1", "2", "3"]
    assert {j["JobState"] for j in records.values()} == {"COMPLETED"}, records
    assert jobs(agg_id, env)[0]["JobState"] == "COMPLETED"
    spans = [(_time(j["StartTime"]), _time(j["EndTime"])) for j in records.values()]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2, f"throttle 2 not kept: {spans}"
    rec.add(
        f"array job {array_id}: task -> job id, state, start, end",
        "\n".join(
            f"{array_id}_{i} -> job {j['JobId']} {j['JobState']} {j['StartTime']} {j['EndTime']}"
            for i, j in sorted(records.items())
        ),
    )
    logs = tmp_path / "logs"
    for task in tasks:
        assert task_done(task), task["output"]
        log = logs / f"phase1_baseline-{array_id}_{task['index']}.out"
        text = log.read_text()
        assert f"task {task['index']} ({task['name']}): done" in text and "exit status 0" in text, text
        rec.add(f"log {log.name}", text)
    agg_log = (logs / f"phase1_baseline_aggregate-{agg_id}.out").read_text()
    rec.add(f"aggregation job {agg_id} (afterany:{array_id}) log", agg_log)
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert sorted(table["press"]) == sorted(["no_press", *PRESSES]) and (tmp_path / "scores.png").is_file()
    assert "aggregate: 4 runs" in agg_log

    # 2. submitting again submits nothing
    before = {t["index"]: fingerprint(Path(t["output"])) for t in tasks}
    ids, err = submit(manifest, env, "--throttle", "2")
    rec.add(f"resubmission -> job ids: {ids or 'none'}", err)
    assert ids == [] and "nothing to submit" in err and "4 of 4 tasks done" in err

    # 3. one more task (a 5th press); it is killed mid-run, then resubmitted: only it runs again
    assert eval_main(["plan", str(manifest), *GRID, "--press", *PRESSES, "random", "--output-dir", str(out)]) == 0
    tasks = read_manifest(manifest)
    new = tasks[4]
    assert new["name"].endswith("__random__0.50") and not task_done(new)
    slow = dict(env, PRESSROOM_TASK_SLEEP="600")  # run-task waits before evaluating: time to kill it mid-run
    ids, err = submit(manifest, slow, "--no-aggregate")
    assert len(ids) == 1 and "tasks 4 (stage 0)" in err, err
    killed = ids[0]
    log = logs / f"phase1_baseline-{killed}_4.out"
    wait_running(f"{killed}_4", log, env, "sleeping 600 s first")
    res = sh(["scancel", f"{killed}_4"], env)
    assert res.returncode == 0, res.stderr
    wait_for([killed], env)
    assert jobs(f"{killed}_4", env)[0]["JobState"] == "CANCELLED"
    rec.add(f"task 4 submitted alone as array job {killed} (tasks 4), killed with scancel {killed}_4", err)
    rec.add(f"log {log.name} (killed)", log.read_text())
    assert not Path(new["output"]).exists() and not list(out.glob(".*"))  # nothing half-written
    assert {t["index"]: fingerprint(Path(t["output"])) for t in tasks[:4]} == before

    ids, err = submit(manifest, env)
    rec.add(f"resubmission after the kill -> {' '.join(ids)}", err)
    assert len(ids) == 2 and "tasks 4 (stage 0)" in err, err
    wait_for(ids, env)
    recovered = jobs(ids[0], env)
    assert [(j["ArrayTaskId"], j["JobState"]) for j in recovered] == [("4", "COMPLETED")]
    text = (logs / f"phase1_baseline-{ids[0]}_4.out").read_text()
    rec.add(f"log phase1_baseline-{ids[0]}_4.out (recovered)", text)
    assert all(task_done(t) for t in tasks)
    assert {t["index"]: fingerprint(Path(t["output"])) for t in tasks[:4]} == before  # nothing else ran
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert sorted(table["press"]) == sorted(["no_press", "random", *PRESSES])
    agg_log = (logs / f"phase1_baseline_aggregate-{ids[1]}.out").read_text()
    rec.add(f"aggregation job {ids[1]} log", agg_log)
    assert "aggregate: 5 runs" in agg_log
    rec.write()


TRAINER = """
import json, os, signal, sys, time
out, total = sys.argv[1], int(sys.argv[2])
ckpt = os.path.join(out, "checkpoint.json")
step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
print(f"trainer: start at step {step}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
while step < total:
    time.sleep(0.2)
    step += 1
    if stop:
        json.dump({"step": step}, open(ckpt, "w"))
        print(f"trainer: checkpoint at step {step}", flush=True)
        sys.exit(3)
json.dump({"step": step, "final": True}, open(os.path.join(out, "final.json"), "w"))
print(f"trainer: finished at step {step}", flush=True)
"""


def test_training_unit_checkpoints_and_requeues_on_usr1(slurm_env, tmp_path):
    env = slurm_env
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    manifest = tmp_path / "train.jsonl"
    # stage 0: the training unit; stage 1: a unit that needs its final output (runs after stage 0 succeeded)
    unit = tmp_path / "unit"
    lines = mf.plan_command(
        [sys.executable, str(script), "{output}", "150"], {}, tmp_path, "{output_dir}/unit", phase="phase2_eit"
    )
    check = f"import json; assert json.load(open({str(unit / 'final.json')!r}))['final']"
    lines += mf.plan_command([sys.executable, "-c", check], {}, tmp_path, name="after", phase="phase2_eit", stage=1)
    mf.write_manifest(lines, manifest)
    ids, err = submit(manifest, env)
    assert len(ids) == 2, err  # one array per stage; a training manifest has no aggregation job
    assert jobs(ids[1], env)[0]["Dependency"].startswith(f"afterok:{ids[0]}_*")
    job = f"{ids[0]}_0"
    log = tmp_path / "logs" / f"phase2_eit-{ids[0]}_0.out"
    wait_running(job, log, env, "trainer: start at step 0")
    # what --signal=B:USR1@S does before the time limit: USR1 to the batch shell
    assert sh(["scancel", "--signal=USR1", "--batch", job], env).returncode == 0
    deadline = time.monotonic() + 60
    while jobs(job, env)[0].get("Restarts") != "1" and time.monotonic() < deadline:
        time.sleep(1)
    record = jobs(job, env)[0]
    assert record["Restarts"] == "1" and record["JobState"] in {"PENDING", "RUNNING", "COMPLETED"}, record
    if record["JobState"] == "PENDING":  # Slurm holds a requeued job for a while; release it now
        sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], env)
    wait_for(ids, env)
    assert jobs(job, env)[0]["JobState"] == "COMPLETED" and jobs(ids[1], env)[0]["JobState"] == "COMPLETED"
    text = log.read_text()
    assert "trainer: checkpoint at step" in text and "requeueing job" in text, text
    resumed = re.search(r"trainer: start at step (\d+), restart 1", text)
    assert resumed and int(resumed.group(1)) > 0, text
    assert "trainer: finished at step 150" in text and all(task_done(t) for t in read_manifest(manifest))
    RECORD.add(f"training unit {job}: USR1 to the batch shell -> checkpoint, requeue (Restarts=1), resume", text)
    RECORD.write()


def _dependency_or_done(job: str, prefix: str, before: list[str], env: dict[str, str]) -> bool:
    """``job``'s dependency starts with ``prefix``, or it reads (null) and every task of ``before`` completed."""
    dep = jobs(job, env)[0]["Dependency"]
    if dep.startswith(prefix):
        return True
    return dep == "(null)" and all(r["JobState"] == "COMPLETED" for b in before for r in jobs(b, env))


def test_submit_all_chains_phases_with_afterok(slurm_env, tmp_path):
    env = slurm_env
    small = "--data-dir 256 --tasks niah_single --n-samples 1 --max-new-tokens 3 --ratio 0.5 --no-baseline"
    args = ["bash", str(REPO / "slurm" / "submit_all.sh"), "phase1_baseline", "phase3_eval_trained"]
    args += [
        "--model",
        "tiny-llama",
        "--output-dir",
        str(tmp_path),
        "--plan-args",
        f"phase1_baseline={small} --press knorm",
    ]
    args += ["--plan-args", f"phase3_eval_trained={small} --press snapkv"]
    res = sh(args, env)
    assert res.returncode == 0, res.stderr
    ids = dict(line.split(maxsplit=1) for line in res.stdout.splitlines())
    phase1, phase3, study = (
        ids["phase1_baseline"].split()[1],
        ids["phase3_eval_trained"].split()[1],
        ids["study_aggregate"],
    )
    # phase 3 waits for phase 1; Slurm shows a dependency that is already met as (null), so that reading also
    # passes when the whole phase 1 array has completed by the time it is read (the start times are checked below)
    assert _dependency_or_done(phase3, f"afterok:{phase1}_*", [phase1], env)
    assert _dependency_or_done(study, "afterany:", [phase1, phase3], env)
    wait_for([phase1, phase3, study], env)
    assert all(jobs(j, env)[0]["JobState"] == "COMPLETED" for j in (phase1, phase3, study))
    assert _time(jobs(phase3, env)[0]["StartTime"]) >= _time(jobs(phase1, env)[0]["EndTime"])
    assert sorted(pd.read_csv(tmp_path / "comparison.csv")["press"]) == ["knorm", "snapkv"]  # one table
    RECORD.add(f"submit_all.sh phase1_baseline phase3_eval_trained -> {ids}", res.stderr)
    RECORD.write()
