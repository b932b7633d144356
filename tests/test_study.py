"""``knlens study query-localization``: the ParaRel study as one command (tiny settings on the embedded model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from knlens.cli import main
from knlens.data.pararel import default_data_dir
from knlens.studies.query_localization_study import (TABLES, QueryLocalizationSettings, QueryLocalizationStudy,
                                                     query_localization_study)
from knlens.viz.query_localization_page import render_markdown


def test_a_model_that_cannot_read_the_facts_is_one_error_line(capsys):
    """The tiny test model's vocabulary lacks ParaRel's targets: the study stops with one line naming one."""
    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    assert main(["study", "query-localization", "--model", "tiny-llama", "--quiet", "--candidates", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the target") and "not in the model's vocabulary" in err[0]


@pytest.mark.integration
def test_the_study_runs_saves_and_writes_its_page(real_model, tmp_path):
    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    settings = QueryLocalizationSettings(candidates=40, facts_per_relation=2, steps=2, n_random=1, k=2, n_controls=1,
                                         others=1)
    result = query_localization_study(real_model, settings)
    assert set(result.tables) == set(TABLES)
    counts = result.tables["counts"]
    assert list(counts.relation) == ["P36", "P1376"] and (counts.studied <= 2).all()
    assert int(result.numbers["facts"]) == int(counts.studied.sum()) >= 4
    loaded = QueryLocalizationStudy.load(result.save(tmp_path / "saved"))
    assert loaded == result and loaded.key == result.key
    page = render_markdown(result)
    for heading in ("## Headline", "## Query-KN mapping", "## Knowledge-synapse scaling", "## Limitations"):
        assert heading in page
    assert f"{int(result.numbers['facts'])} facts" in page
