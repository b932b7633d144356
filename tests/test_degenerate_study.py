"""``knlens study degenerate`` on hand-written facts the tiny random Llama can read: every table filled, the page
rendered with the facts' counts, the functional filter's counts consistent with the components."""

from __future__ import annotations

import pytest

from knlens import Fact
from knlens.studies.degenerate_study import DegenerateStudySettings, degenerate_study
from knlens.viz.degenerate_page import render_markdown

CAPITALS = (("france", "paris"), ("spain", "madrid"), ("italy", "rome"), ("germany", "berlin"), ("japan", "tokyo"))


@pytest.fixture(scope="module")
def study(tiny_llama):
    facts = [Fact([f"the capital of {c} is", f"the capital city of {c} is"], f" {o}", subject=c, relation="P36",
                  name=f"P36-{c}") for c, o in CAPITALS]
    settings = DegenerateStudySettings(model="tiny-llama", relations=("P36",), max_facts=5, steps=2, top=10,
                                       check_steps=2, n_random=2, single_max=0.5, removes_min=0.2)
    return degenerate_study(tiny_llama, settings, facts=facts)


def test_study_tables(study):
    t = study.tables
    assert t["counts"]["studied"].tolist() == [5]
    assert set(t["methods"]["method"]) == {"persistence", "average", "dbscan", "kmeans"}
    comps = t["components"]
    for row in t["methods"].itertuples():
        mine = comps[comps.method == row.method]
        assert row.clusters == len(mine) and row.degenerate_clusters == int(mine["degenerate"].sum())
        assert row.degenerate_clusters <= row.single_below
    assert set(t["robustness"]["condition"]) == {"intact", "set_suppressed", "random_suppressed"}
    assert set(t["fact_check"]["split"]) <= {"calibration", "test"}


def test_study_page(study):
    page = render_markdown(study)
    assert page.startswith("# Degenerate knowledge neurons")
    for section in ("## Facts", "## Clusters and the functional filter", "## Robustness", "## Fact checking",
                    "## The papers' claims", "## Limitations", "Versions:"):
        assert section in page


def test_study_bad_setting_exits_2(capsys):
    from knlens.cli import main

    assert main(["study", "degenerate", "--model", "tiny-llama", "--locate-share", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "locate_share" in err[0]
