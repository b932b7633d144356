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
    assert {"qrnca", "qrnca-languages", "twostage"} <= set(STUDIES)
    with pytest.raises(SettingsError, match="at least 2 relations"):
        QRNCAStudySettings(relations=("P36",))
    with pytest.raises(SettingsError, match="unknown corruption"):
        TwoStageStudySettings(corruption="blur")

