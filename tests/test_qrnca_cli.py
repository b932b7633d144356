"""``knlens qrnca`` and ``knlens twostage`` on a tiny model: output, files and one-line errors (exit 2)."""

from __future__ import annotations

import pytest

from knlens.cli import main
from knlens.core.errors import SettingsError
from knlens.cli.study import STUDIES
from knlens.studies.qrnca_study import QRNCAStudySettings
from knlens.studies.two_stage_study import TwoStageStudySettings


def test_twostage_prints_the_stages_and_writes_files(tmp_path, capsys):
    assert main(["twostage", "--model", "tiny-llama", "--fact", "capital-france", "--corruption", "remove",
                 "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stage 1 kept" in out and "grad_x_act" in out
    assert {"result.json", "twostage.csv", "twostage.png"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["twostage", "--fact", "capital-france", "--image", "cat.png"], "vision-language model"),
    (["twostage", "--fact", "capital-france", "--tau-a", "2.0"], "tau_a is a fraction"),
    (["twostage", "--prompt", "the capital of france is"], "no fact given"),
    (["qrnca", "--relations", "P36"], "option letters ['B', 'C', 'D'] are not single tokens"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main([*argv, "--model", "tiny-llama", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_studies_are_registered_with_checked_settings():
    assert {"qrnca", "twostage"} <= set(STUDIES)
    with pytest.raises(SettingsError, match="at least 2 relations"):
        QRNCAStudySettings(relations=("P36",))
    with pytest.raises(SettingsError, match="unknown corruption"):
        TwoStageStudySettings(corruption="blur")


@pytest.mark.integration
def test_both_studies_run_save_and_write_their_pages(real_model, tmp_path):
    from pathlib import Path

    from knlens.data.pararel import default_data_dir
    from knlens.studies.qrnca_study import QRNCAStudy, qrnca_study
    from knlens.studies.two_stage_study import TwoStageStudy, two_stage_study
    from knlens.viz import qrnca_page, two_stage_page

    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    q = qrnca_study(real_model, QRNCAStudySettings(relations=("P36", "P30"), candidates=20, queries=1, n_templates=2,
                                                   steps=2, top_v=5))
    assert list(q.tables["counts"].relation) == ["P36", "P30"] and int(q.numbers["mc prompts"]) == 4
    assert set(q.tables["pcr"].method) == {"QRNCA", "KN", "random", "random (matched)"}
    assert QRNCAStudy.load(q.save(tmp_path / "q")) == q
    assert "## PCR (pooled over domains) beside the paper" in qrnca_page.render_markdown(q)
    t = two_stage_study(real_model, TwoStageStudySettings(relations=("P36",), candidates=15, facts=1, steps=2,
                                                          n_random=1, noise_samples=2))
    assert int(t.numbers["facts"]) == 1 and len(t.tables["facts"]) == 1
    assert TwoStageStudy.load(t.save(tmp_path / "t")) == t
    assert "## Comparison (over facts)" in two_stage_page.render_markdown(t)
