"""The summary page over a results store (knlens.viz.store_page, ``knlens summary``): it renders offline,
its counts are the store's, failures are listed, setting groups are kept apart, an empty store says so, and
a folder that is not a store is one error line."""

from __future__ import annotations

import re

import pytest

import knlens
from knlens.cli import main
from knlens.store import Store
from knlens.sweeps import Study, sweep
from knlens.viz.html import remote_sources
from knlens.viz.store_page import GROUP_SQL, render_store, write_store_page

FACTS = [knlens.Fact([f"the capital of {c} is", f"the capital city of {c} is"], f" {t}", subject=c,
                     name=f"capital-{c}", relation=r)
         for c, t, r in (("france", "paris", "P36"), ("spain", "madrid", "P36"), ("italy", "rome", "P1376"))]
LOCATE = {"steps": 4, "n_random": 3, "specificity": False, "preset": "eleuther"}
TRACE = {"samples": 1, "known_only": False, "kinds": ["mlp", "attn"]}


def _boom(model, fact, samples=1):
    raise RuntimeError(f"no trace for {fact.name}\nsecond line")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = knlens.load_model("tiny-llama")
    path = tmp_path_factory.mktemp("runs")
    sweep("locate", FACTS, model, path, settings=LOCATE, progress=False)
    sweep("locate", FACTS[:1], model, path, settings={**LOCATE, "steps": 2}, progress=False)  # another group
    sweep("trace", FACTS, model, path, settings=TRACE, progress=False)
    sweep(Study("trace", _boom), FACTS[2:], model, path, progress=False)  # one recorded failure
    return Store(path, create=False)


@pytest.fixture(scope="module")
def page(store):
    return render_store(store)


def _cells(page: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    row = re.search(rf"<tr><td[^>]*>{re.escape(first)}</td>(.*?)</tr>", page)
    assert row, first
    return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))


def test_page_renders_offline_with_figures(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert remote_sources(page) == []
    assert page.count('src="data:image/png;base64,') >= 2  # a layer histogram and an indirect-effect figure
    for heading in ("Tasks", "Setting groups", "Knowledge neurons (locate)", "Causal tracing (trace)"):
        assert f"<h2>{heading}</h2>" in page


def test_task_counts_are_the_stores(store, page):
    counts = store.sql("select study, count(*) filter (where status = 'done') as done, "
                       "count(*) filter (where status = 'failed') as failed, count(*) as n from tasks group by study")
    assert sorted(counts.study) == ["locate", "trace"]
    for study, done, failed, n in counts.itertuples(index=False):
        assert _cells(page, study)[:3] == [str(done), str(failed), str(n)]
    assert (counts.set_index("study").n.to_dict()) == {"locate": 4, "trace": 4}


def test_failed_task_is_listed_with_its_first_line(store, page):
    key = store.failed().key.tolist()
    assert len(key) == 1 and "Failed tasks (1)" in page
    assert key[0] in page and "RuntimeError: no trace for capital-italy" in page


def test_setting_groups_are_kept_apart(store, page):
    groups = store.sql(f"select {GROUP_SQL} as grp, count(*) as n from tasks where study = 'locate' group by all")
    assert len(groups) == 2 and sorted(groups.n) == [1, 3]
    sections = {g: page.split(f"<h3>Group <code>{g}</code></h3>")[1].split("<h3>")[0] for g in groups.grp}
    big = groups.grp[groups.n == 3].iloc[0]
    small = groups.grp[groups.n == 1].iloc[0]
    assert "P1376" in sections[big] and "P1376" not in sections[small]  # italy ran under one setting only
    assert _cells(sections[big], "P36")[0] == "2" and _cells(sections[small], "P36")[0] == "1"


def test_refined_share_and_histogram_match_the_rows(store, page):
    refined = store.sql("select count(distinct key) as n from locate_rows where refined").n[0]
    assert refined > 0  # the eleuther preset on two prompts keeps neurons
    assert "refined neurons per layer" in page
    assert "beats controls" in page and "random uniform" in page


def test_empty_store_says_so(tmp_path):
    page = render_store(Store(tmp_path / "new"))
    assert "holds no tasks" in page and remote_sources(page) == []


def test_cli_writes_the_page(store, tmp_path, capsys):
    out = tmp_path / "summary.html"
    assert main(["summary", str(store.path), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_text() == render_store(store)


@pytest.mark.parametrize("make", ["missing", "foreign", "file"])
def test_cli_not_a_store_is_one_error_line(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif make == "file":
        target.write_text("hello")
    assert main(["summary", str(target), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "p.html").exists()
    assert not (make == "missing" and target.exists())


def test_write_store_page_unwritable_path(store, tmp_path):
    with pytest.raises(knlens.KnlensError, match="cannot write the summary page"):
        write_store_page(store, tmp_path / "no" / "such" / "folder" / "p.html")
