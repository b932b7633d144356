"""The Ray executor on a local Ray cluster that this module starts (``ray start --head``, as on a real cluster's head
node, loopback only, 2 CPUs) and stops: a sweep through ``knlens sweep --executor ray`` stores what the local
executor stores; a rerun skips what is stored; a study's error and a worker that dies are recorded as failed
tasks while the other tasks go on; an unreachable address, a model the workers cannot load and a missing Ray are
one clear error before any work."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

import knlens
from knlens.cli import main
from knlens.core.errors import RayNotInstalledError, RayUnreachableError, RayWorkerError, SweepError
from knlens.results.contract import same
from knlens.store import Store, Task
from knlens.sweeps import Study, read_facts, sweep
from knlens.sweeps.executors import attempt

ROOT = Path(__file__).resolve().parents[1]
DATA = "builtin:capital"  # targets the tiny models' vocabulary holds
LOCATE = {"steps": 4, "n_random": 3, "specificity": False, "held_out": False}
ROW = ["key", "study", "fact", "relation", "model", "settings_hash", "settings", "fact_json", "knlens_version", "status",
       "error", "result_key", "result_type"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (the head node's: every process ``ray start`` left running)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _stop(sid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _session(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while _session(sid) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    """The address of a one-node Ray cluster (``ray start --head``, in its own session so that it is stopped
    whole, by its processes' ids); its workers import this checkout's knlens."""
    port, temp = _free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    argv = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=100000000",
            f"--temp-dir={temp}"]
    head = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = head.communicate(timeout=240)[0]
        assert head.returncode == 0, out
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _argv(store: Path, n_facts: int, *extra: str) -> list[str]:
    sets = [a for k, v in LOCATE.items() for a in ("--set", f"{k}={str(v).lower()}")]
    return ["sweep", "locate", "--data", DATA, "--max-facts", str(n_facts), "--model", "tiny-llama",
            "--store", str(store), *sets, "--quiet", *extra]


def test_ray_sweep_stores_what_the_local_executor_stores_and_resumes(tmp_path, cluster, capsys):
    ray_store, local_store = tmp_path / "ray", tmp_path / "local"
    assert main(_argv(ray_store, 2, "--executor", "ray", "--ray-address", cluster, "--workers", "2")) == 0
    assert "2 stored, 0 failed, 0 already stored" in capsys.readouterr().out
    facts = read_facts(DATA, max_facts=3)
    again = sweep("locate", facts, "tiny-llama", ray_store, settings=LOCATE, executor="ray", ray_address=cluster,
                  progress=False)
    assert (again.ran, again.done, again.skipped) == (1, 1, 2)  # the stored tasks are skipped, the new one runs
    local = sweep("locate", facts, "tiny-llama", local_store, settings=LOCATE, progress=False)
    assert local.done == 3 and local.keys == again.keys

    by_ray, by_local = Store(ray_store), Store(local_store)
    pd.testing.assert_frame_equal(by_ray.tasks()[ROW], by_local.tasks()[ROW])
    assert len(by_ray.attempts()) == 3 and not by_ray.problems()
    for key in local.keys:
        a, b = by_ray.load(key), by_local.load(key)
        assert set(a.timings) == set(b.timings)  # times differ, everything else is equal to the bit
        assert same(dataclasses.replace(a, timings={}), dataclasses.replace(b, timings={}))
    query = "select * exclude (key) from locate_rows order by all"
    pd.testing.assert_frame_equal(by_ray.sql(query), by_local.sql(query))


def test_a_model_the_workers_cannot_load_is_one_error_line(tmp_path, cluster, capsys):
    argv = _argv(tmp_path, 1, "--executor", "ray", "--ray-address", cluster, "--workers", "1")
    assert main([a if a != "tiny-llama" else "no-such-model-zz" for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "cannot load model 'no-such-model-zz'" in err[0], err
    assert not (tmp_path / "tasks").exists()


def test_a_worker_the_cluster_cannot_place_is_refused_before_any_work(tmp_path, cluster):
    with pytest.raises(RayWorkerError, match="has 2 CPUs: it cannot place a worker of 4 CPUs"):
        sweep("locate", read_facts(DATA, max_facts=1), "tiny-llama", tmp_path, executor="ray", ray_address=cluster,
              worker_cpus=4)
    assert not (tmp_path / "tasks").exists()


class Crashing:
    """A study that raises on ``raise_on``, kills its own process (the Ray worker) on ``die_on``, and traces
    the other facts."""

    def __init__(self, raise_on: str, die_on: str) -> None:
        self.raise_on, self.die_on = raise_on, die_on

    def __call__(self, model, fact, samples=1):
        if fact.name == self.raise_on:
            raise RuntimeError(f"no luck with {fact.name}")
        if fact.name == self.die_on:
            os._exit(3)
        return knlens.trace(model, fact, samples=samples, known_only=False, kinds=["mlp"])


def test_a_study_error_and_a_dead_worker_are_failed_tasks_and_the_others_go_on(tmp_path, cluster):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    facts = read_facts(DATA, max_facts=4)
    study = Study("crashing", Crashing(facts[0].name, facts[1].name))
    report = sweep(study, facts, "tiny-llama", tmp_path, executor="ray", ray_address=cluster, workers=2,
                   progress=False)
    assert (report.done, report.failed) == (2, 2)
    failed = Store(tmp_path).failed().set_index("fact").error.to_dict()
    assert failed[facts[0].name] == f"RuntimeError: no luck with {facts[0].name}"
    assert failed[facts[1].name].startswith("RayWorkerError: the Ray worker died running it")
    tb = Store(tmp_path).sql("select fact, traceback from tasks where status = 'failed'").set_index("fact").traceback
    assert "raise RuntimeError" in tb[facts[0].name]  # the worker's own traceback, carried as text


def test_unreachable_address_is_one_error_before_any_work(tmp_path, capsys):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    facts = read_facts(DATA, max_facts=1)
    with pytest.raises(RayUnreachableError, match=f"cannot reach the Ray cluster at '{address}'"):
        sweep("locate", facts, "tiny-llama", tmp_path / "a", settings=LOCATE, executor="ray", ray_address=address)
    assert main(_argv(tmp_path / "b", 1, "--executor", "ray", "--ray-address", f"ray://{address}")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: cannot reach the Ray cluster at 'ray://127.0.0.1:"), err
    for store in (tmp_path / "a", tmp_path / "b"):
        assert not (store / "tasks").exists()
    with pytest.raises(SweepError, match="host:port"):
        sweep("locate", facts, "tiny-llama", tmp_path / "c", executor="ray", ray_address="headnode")


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    with pytest.raises(RayNotInstalledError, match=r"pip install 'knlens\[ray\]'"):
        sweep("locate", read_facts(DATA, max_facts=1), "tiny-llama", tmp_path, executor="ray")


@pytest.mark.parametrize("kwargs, message", [
    ({"executor": "dask"}, "unknown executor 'dask'"),
    ({"workers": 2}, "workers applies to the ray executor only"),
    ({"executor": "ray", "model": object()}, "takes the model by name"),
    ({"executor": "ray", "workers": 0}, "workers must be at least 1"),
])
def test_executor_options_are_checked(tmp_path, kwargs, message):
    kwargs = {"model": "tiny-llama", **kwargs}
    with pytest.raises(SweepError, match=message):
        sweep("trace", read_facts(DATA, max_facts=1), kwargs.pop("model"), tmp_path, **kwargs)


def test_an_outcome_travels_as_the_files_of_its_result(tiny_llama):
    fact = read_facts(DATA, max_facts=1)[0]
    task = Task("trace", fact, "tiny-llama", {"samples": 1, "known_only": False})
    done = attempt("trace", tiny_llama, task)
    back = pickle.loads(pickle.dumps(done))
    assert back.task == task and back.failure is None and same(back.result, done.result)
    failed = attempt("trace", tiny_llama, dataclasses.replace(task, settings={"samples": 0}))
    assert pickle.loads(pickle.dumps(failed)) == failed and "Traceback" in failed.failure.traceback
