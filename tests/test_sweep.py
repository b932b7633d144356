"""Sweeps: stored tasks skipped, failures recorded and retried on request, data specs, the CLI's bad input,
and a real ``knlens sweep`` process killed with SIGKILL mid-sweep and restarted: nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import knlens
from knlens.cli import main
from knlens.core.errors import SweepError
from knlens.data.builtin import UnknownRelationError, builtin_relations
from knlens.results.contract import same
from knlens.store import Store
from knlens.sweeps import Study, read_facts, retry_failed, sweep
from knlens.sweeps.plan import parse_setting

ROOT = Path(__file__).resolve().parents[1]
FACTS = [knlens.Fact([f"the capital of {c} is"], f" {t}", subject=c, name=f"capital-{c}")
         for c, t in (("france", "paris"), ("spain", "madrid"), ("italy", "rome"), ("japan", "tokyo"))]
TRACE = {"samples": 1, "known_only": False, "kinds": ["mlp"]}


@pytest.fixture(scope="module")
def model():
    return knlens.load_model("tiny-llama")


def test_rerun_skips_what_is_stored(tmp_path, model, capsys):
    first = sweep("trace", FACTS[:2], model, tmp_path, settings=TRACE)
    assert (first.ran, first.done, first.skipped) == (2, 2, 0)
    err = capsys.readouterr().err
    assert "[1/2] done" in err and "[2/2] done" in err and "eta" in err
    more = sweep("trace", FACTS, model, tmp_path, settings=TRACE)
    assert (more.ran, more.done, more.skipped) == (2, 2, 2)
    assert "4 tasks, 2 already stored, 2 to run" in capsys.readouterr().err
    assert len(Store(tmp_path).attempts()) == 4 and len(Store(tmp_path)) == 4
    other = sweep("trace", FACTS[:1], model, tmp_path, settings={**TRACE, "samples": 2}, progress=False)
    assert other.done == 1 and len(Store(tmp_path)) == 5  # other settings: another key, both kept


class Flaky:
    """A study that fails on the facts named in ``failing`` (a set the test empties to 'fix' it)."""

    def __init__(self, failing):
        self.failing = set(failing)

    def __call__(self, model, fact, samples=1):
        if fact.name in self.failing:
            raise RuntimeError(f"flaky failure on {fact.name}")
        return knlens.trace(model, fact, samples=samples, known_only=False, kinds=["mlp"])


def test_failed_task_is_recorded_and_retried_on_request(tmp_path, model):
    flaky = Flaky({"capital-spain"})
    study = Study("trace", flaky)
    report = sweep(study, FACTS[:3], model, tmp_path, progress=False)
    assert (report.done, report.failed) == (2, 1)
    failed = Store(tmp_path).failed()
    assert failed.fact.tolist() == ["capital-spain"]
    assert failed.error[0] == "RuntimeError: flaky failure on capital-spain"
    assert "Traceback" in Store(tmp_path).sql("select traceback from tasks where status = 'failed'").traceback[0]
    again = sweep(study, FACTS[:3], model, tmp_path, progress=False)  # not retried unless asked
    assert (again.ran, again.skipped, again.failed_skipped) == (0, 2, 1) and "not retried" in again.summary()
    flaky.failing.clear()
    retried = sweep(study, FACTS[:3], model, tmp_path, retry_failed=True, progress=False)
    assert (retried.ran, retried.done, retried.failed) == (1, 1, 0)
    store = Store(tmp_path)
    assert store.failed().empty and len(store) == 3
    attempts = store.attempts()
    assert sorted(attempts.status) == ["done", "done", "done", "failed"]  # the failure stays as history
    assert same(store.load(report.keys[1]), flaky(model, FACTS[1]))


def test_retry_failed_rebuilds_tasks_from_the_store(tmp_path, model):
    flaky = Flaky({"capital-france", "capital-italy"})
    sweep(Study("flaky", flaky), FACTS[:3], model, tmp_path, progress=False)
    assert len(Store(tmp_path).failed()) == 2
    flaky.failing = {"capital-italy"}
    report = retry_failed(tmp_path, model, studies={"flaky": Study("flaky", flaky)}, progress=False)
    assert (report.ran, report.done, report.failed) == (2, 1, 1)
    assert Store(tmp_path).failed().fact.tolist() == ["capital-italy"]


def test_data_specs(tmp_path):
    assert [f.name for f in read_facts("builtin:capital,P38", max_facts=1)] == ["capital-france", "currency-japan"]
    assert len(read_facts("builtin", max_facts=1)) == len(builtin_relations())
    for rel, subj, obj in (("P36", "france", "paris"), ("P1376", "paris", "france")):
        (tmp_path / "pararel" / "patterns").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pararel" / "tuples").mkdir(exist_ok=True)
        pats = ["the capital of [X] is [Y] .", "the capital city of [X] is [Y] .", "[X] has the capital [Y] ."]
        (tmp_path / "pararel" / "patterns" / f"{rel}.jsonl").write_text("\n".join(json.dumps({"pattern": p}) for p in pats))
        (tmp_path / "pararel" / "tuples" / f"{rel}.jsonl").write_text(json.dumps({"sub_label": subj, "obj_label": obj}))
    facts = read_facts("pararel:P36,P1376", data_dir=tmp_path)
    assert [f.name for f in facts] == ["P36-0", "P1376-0"] and facts[0].target == " paris"
    with pytest.raises(UnknownRelationError, match="P999"):
        read_facts("pararel:P36,P999", data_dir=tmp_path)
    with pytest.raises(UnknownRelationError):
        read_facts("builtin:no-such-relation")
    with pytest.raises(SweepError, match="unknown data spec"):
        read_facts("wikidata:P36")
    assert parse_setting("n_random=3") == ("n_random", 3)
    with pytest.raises(SweepError):
        parse_setting("steps")


@pytest.mark.parametrize("argv, message", [
    (["sweep", "nosuch", "--data", "builtin", "--store", "{store}"], "invalid choice: 'nosuch'"),
    (["sweep", "trace", "--data", "builtin:nosuch", "--store", "{store}"], "nosuch"),
    (["sweep", "trace", "--data", "pararel:P999", "--data-dir", "{data}", "--store", "{store}"], "P999"),
    (["sweep", "trace", "--data", "builtin", "--store", "{store}", "--set", "stepz=4"], "no setting 'stepz'"),
    (["sweep", "trace", "--data", "builtin", "--store", "{store}", "--max-facts", "0"], "--max-facts"),
    (["sweep", "trace", "--data", "builtin", "--store", "{old}"], "another format"),
    (["sweep", "trace", "--data", "builtin", "--store", "{store}", "--model", "no-such-model-zz"], "no-such-model-zz"),
])
def test_sweep_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "pararel" / "patterns").mkdir(parents=True)
    (tmp_path / "pararel" / "tuples").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "store.json").write_text('{"format": "knlens-store/0"}')
    dirs = {"store": str(tmp_path / "runs"), "data": str(tmp_path), "old": str(tmp_path / "old")}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([a.format(**dirs) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], err
    if "--model" not in argv:
        assert not (tmp_path / "runs" / "tasks").exists()


def test_cli_sweep_exits_1_when_tasks_fail(tmp_path, capsys):
    # trace refuses facts the random model does not know (known_only): every task fails, and is recorded
    argv = ["sweep", "trace", "--data", "builtin:capital", "--max-facts", "2", "--model", "tiny-llama",
            "--store", str(tmp_path), "--set", "samples=1", "--quiet"]
    assert main(argv) == 1
    assert "0 stored, 2 failed" in capsys.readouterr().out
    assert Store(tmp_path).failed().error.str.startswith("NotKnownError").all()


DATA = "builtin:capital,official-language,currency"  # targets the tiny models' vocabulary holds


def _sweep_process(store: Path, n_facts: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "knlens", "sweep", "locate", "--data", DATA, "--max-facts", str(n_facts),
            "--model", "tiny-llama", "--store", str(store), "--set", "steps=4", "--set", "n_random=3",
            "--set", "specificity=false", "--set", "held_out=false"]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_sweep_then_resume_loses_and_duplicates_nothing(tmp_path):
    store = tmp_path / "runs"
    n_facts = 4  # per built-in relation
    expected = len(read_facts(DATA, max_facts=n_facts))
    proc = _sweep_process(store, n_facts)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        rows = list((store / "tasks").rglob("task.parquet")) if (store / "tasks").is_dir() else []
        if len(rows) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    stored_before = Store(store, create=False).done_keys()
    assert 3 <= len(stored_before) < expected

    resumed = _sweep_process(store, n_facts)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{expected - len(stored_before)} stored, 0 failed, {len(stored_before)} already stored" in out
    final = Store(store, create=False)
    attempts = final.attempts()
    assert len(attempts) == expected and attempts.key.is_unique and (attempts.status == "done").all()
    assert stored_before <= set(attempts.key) and not final.problems()
    assert not any((store / ".tmp").iterdir())  # the killed process' half-written attempt is gone
    for key in attempts.key:
        result = final.load(key)
        assert isinstance(result, knlens.LocateResult) and result.fact.name == key.split("/")[1]
