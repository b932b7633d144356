"""``knlens edit`` on the tiny Llama: the table, the saved evaluation and edits, one-line errors before the model
is loaded where the input alone is wrong."""

from __future__ import annotations

import pandas as pd
import pytest

from knlens import NeuronSet
from knlens.cli import main
from knlens.methods.editing.edit import Edit
from knlens.methods.editing.result import EditEvaluation

BASE = ["edit", "--model", "tiny-llama", "--quiet", "--prompt", "the capital of france is",
        "--prompt", "the capital city of france is", "--target", " paris", "--subject", "france", "--n-text", "0"]


def test_edit_prints_the_metrics_and_saves_the_evaluation_and_the_edits(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*BASE, "--new", " berlin", "--editor", "kn-update", "--editor", "rank-one", "--layer", "0",
                 "--neurons", "1:3,1:7", "--control", "--steps", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "reliability" in captured.out and "kn-update" in captured.out and captured.err == ""
    ev = EditEvaluation.load(out)
    assert list(ev.settings.editors) == ["kn-update", "rank-one", "random"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"editor", "metric", "mean", "ci_low", "ci_high", "before"} <= set(metrics.columns)
    edits = {p.name: Edit.load(p) for p in (out / "edits").iterdir()}
    assert set(edits) == {"kn-update", "rank-one", "random"}
    assert edits["random"].delta_norm == pytest.approx(edits["kn-update"].delta_norm, rel=1e-5)
    assert edits["kn-update"].params["neurons"] == NeuronSet([(1, 3), (1, 7)])


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("argv, message", [
    (["--new", " paris"], "is the fact's target"),
    ([], "--new T is required"),
    (["--new", " berlin", "--neurons", "1:x"], "--neurons takes LAYER:INDEX"),
    (["--new", " berlin", "--steps", "0"], "--steps must be at least 1"),
    (["--new", " berlin", "--fact", "capital-france"], "either --fact NAME or --prompt"),
])
def test_bad_input_is_one_line_before_the_model_loads(argv, message, capsys, monkeypatch):
    import knlens.core.models

    monkeypatch.setattr(knlens.core.models, "load_model", _no_model)
    assert main([*BASE, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_multi_token_target_for_the_kn_editor_is_one_line(capsys):
    assert main([*BASE, "--new", " berlin is", "--editor", "kn-update", "--neurons", "1:3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the target ' berlin is' is 2 tokens") and err.count("\n") == 1
