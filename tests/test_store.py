"""The results store: round trip (put, reopen, SQL, load equals), keys by content, corrupt and foreign files
reported and their tasks re-run, stores of another format refused, bad input to ``knlens query``."""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import knlens
from knlens.cli import main
from knlens.core.errors import QueryError, StoreFormatError
from knlens.results.contract import same
from knlens.store import Store, StoreProblemWarning, Task
from knlens.sweeps import sweep

FACTS = [knlens.Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france",
                     name="capital-france"),
         knlens.Fact(["the capital of spain is", "the capital city of spain is"], " madrid", subject="spain",
                     name="capital-spain"),
         knlens.Fact(["the capital of italy is", "the capital city of italy is"], " rome", subject="italy",
                     name="capital-italy")]
TRACE = {"samples": 1, "known_only": False, "kinds": ["mlp"]}
LOCATE = {"steps": 4, "n_random": 3, "specificity": False}


@pytest.fixture(scope="module")
def model():
    return knlens.load_model("tiny-llama")


def test_round_trip_put_reopen_sql_load(tmp_path, model):
    store = Store(tmp_path / "runs")
    results = {}
    for study, settings, run in (("locate", LOCATE, knlens.locate), ("trace", TRACE, knlens.trace)):
        task = Task(study, FACTS[0], "tiny-llama", settings)
        kw = {**settings, "progress": False} if study == "locate" else settings
        results[task.key] = run(model, FACTS[0], **kw)
        store.put(task, result=results[task.key], seconds=0.5)

    again = Store(tmp_path / "runs")
    assert len(again) == 2 and set(again.done_keys()) == set(results)
    for key, result in results.items():
        assert same(again.load(key), result)
        assert type(again.load(key)) is type(result)
    rows = again.sql("select key, study, fact, model, status, seconds, result_key, knlens_version from tasks order by study")
    assert rows.study.tolist() == ["locate", "trace"] and (rows.status == "done").all()
    assert rows.fact.tolist() == ["capital-france"] * 2 and (rows.model == "tiny-llama").all()
    assert rows.result_key.tolist() == [results[k].key for k in rows.key]
    assert (rows.knlens_version == knlens.__version__).all() and (rows.seconds == 0.5).all()
    # each result's own table, queryable with its key, read in place from Parquet
    neurons = again.sql("select * from locate_rows")
    locate_key = rows.key[0]
    assert set(neurons.key) == {locate_key} and len(neurons) == len(results[locate_key].to_frame())
    assert again.sql("select count(*) n from trace_rows").n[0] == len(results[rows.key[1]].to_frame())
    assert not again.problems() and not list((tmp_path / "runs" / ".tmp").iterdir())


def test_keys_differ_by_settings_model_version_and_fact_content():
    base = Task("trace", FACTS[0], "tiny-llama", TRACE)
    keys = {base.key,
            Task("trace", FACTS[0], "tiny-llama", {**TRACE, "samples": 2}).key,
            Task("trace", FACTS[0], "tiny-gpt2", TRACE).key,
            Task("trace", FACTS[0], "tiny-llama", TRACE, knlens_version="0.0.1").key,
            Task("trace", knlens.Fact(FACTS[0].prompts[:1], " paris", subject="france", name="capital-france"),
                 "tiny-llama", TRACE).key}
    assert len(keys) == 5
    assert Task("trace", FACTS[0], "tiny-llama", dict(reversed(list(TRACE.items())))).key == base.key
    assert Task.from_row(base.row()) == base


def test_corrupt_row_file_is_reported_and_its_task_runs_again(tmp_path, model):
    runs = tmp_path / "runs"
    first = sweep("trace", FACTS, model, runs, settings=TRACE, progress=False)
    assert (first.done, first.failed) == (3, 0)
    store = Store(runs)
    broken = store.result_dir(first.keys[1]) / "task.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.warns(StoreProblemWarning, match="unreadable"):
        assert first.keys[1] not in store.done_keys()
    assert any(first.keys[1] in p and "runs again" in p for p in store.problems())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreProblemWarning)
        again = sweep("trace", FACTS, model, runs, settings=TRACE, progress=False)
        assert (again.ran, again.done, again.skipped) == (1, 1, 2)
        assert Store(runs).done_keys() == set(first.keys)
        assert same(Store(runs).load(first.keys[1]), knlens.trace(model, FACTS[1], **TRACE))
        # a query still runs: the unreadable file is left out of the views
        assert Store(runs).sql("select count(*) n from tasks where status = 'done'").n[0] == 3


def test_foreign_parquet_is_reported_and_ignored(tmp_path, model):
    runs = tmp_path / "runs"
    report = sweep("trace", FACTS[:1], model, runs, settings=TRACE, progress=False)
    row_dir = Store(runs).result_dir(report.keys[0])
    pq.write_table(pa.table({"x": [1, 2]}), runs / "tasks" / "stray.parquet")           # not where rows live
    pq.write_table(pa.table({"key": [report.keys[0]]}), row_dir / "task.parquet")        # a row file of no store
    with pytest.warns(StoreProblemWarning):
        problems = Store(runs).problems()
    assert len(problems) == 2 and any("stray.parquet" in p and "not part of the store" in p for p in problems)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreProblemWarning)
        assert len(Store(runs)) == 0
        assert sweep("trace", FACTS[:1], model, runs, settings=TRACE, progress=False).done == 1
        assert len(Store(runs)) == 1


def test_stores_of_another_format_or_other_folders_are_refused(tmp_path):
    other = tmp_path / "old"
    other.mkdir()
    (other / "store.json").write_text(json.dumps({"format": "knlens-store/0"}))
    with pytest.raises(StoreFormatError, match="another format"):
        Store(other)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StoreFormatError, match="not a knlens results store"):
        Store(busy)
    with pytest.raises(StoreFormatError, match="no results store"):
        Store(tmp_path / "missing", create=False)
    empty = Store(tmp_path / "new")
    assert len(empty) == 0 and empty.tasks().empty and list(empty.tasks().columns)[:2] == ["key", "study"]
    with pytest.raises(QueryError, match="no_such_table"):
        empty.sql("select * from no_such_table")
    with pytest.raises(StoreFormatError, match="no result stored"):
        empty.load("trace/capital-france/0123456789abcdef")


@pytest.mark.parametrize("argv, message", [
    (["query", "{old}", "select 1"], "another format"),
    (["query", "{missing}", "select 1"], "no results store"),
    (["query", "{new}", "select * from nowhere"], "nowhere"),
])
def test_query_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "store.json").write_text(json.dumps({"format": "other"}))
    Store(tmp_path / "new")
    dirs = {k: str(tmp_path / k) for k in ("old", "missing", "new")}
    assert main([a.format(**dirs) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_query_prints_rows(tmp_path, capsys, model):
    sweep("trace", FACTS[:2], model, tmp_path, settings=TRACE, progress=False)
    assert main(["query", str(tmp_path), "select fact, status from tasks order by fact"]) == 0
    out = capsys.readouterr().out
    assert "capital-france" in out and "capital-spain" in out and "done" in out
    assert main(["query", str(tmp_path), "select * from tasks", "--csv", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().startswith("key,study,fact")
