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


def test_edit_with_the_criteria_writes_the_before_after_page(tmp_path, capsys):
    from knlens.core.errors import DataNotFoundError
    from knlens.data.pararel import reverse_templates
    from knlens.viz.html import remote_sources

    try:
        reverse_templates("P36")
    except DataNotFoundError as err:
        pytest.skip(f"no data folder: {err}")
    out = tmp_path / "out"
    argv = ["edit", "--model", "tiny-llama", "--quiet", "--fact", "capital-france", "--new", " Rome", "--symmetry",
            "--synonym-template", "[X] speaks", "--editor", "rank-one", "--editor", "rank-one-relation",
            "--layer", "0", "--steps", "3", "--n-text", "0", "--neighbours", "1", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "symmetry" in captured.out and captured.err == ""
    ev = EditEvaluation.load(out)
    assert {"symmetry", "symmetry_old", "synonym"} <= set(ev.frame.group)
    sym = ev.frame[ev.frame.group == "symmetry"]
    assert set(sym.target_true) == {" Italy"} and set(sym.target_new) == {" France"}
    assert "Rome is the capital of" in set(sym.prompt)
    edits = {p.name: Edit.load(p) for p in (out / "edits").iterdir()}
    assert edits["rank-one-relation"].params["key_at"] == "relation" and edits["rank-one"].params["key_at"] == "subject"
    page = (out / "report.html").read_text()
    assert remote_sources(page) == [] and "<script" not in page
    for title in ("edit prompt (reliability)", "paraphrases (generality)", "reverse prompts of the new object",
                  "synonymous prompts", "rank-one-relation"):
        assert title in page


@pytest.mark.parametrize("argv, message", [
    (["--fact", "language-france", "--new", " German", "--symmetry"], "no symmetric or bijective reading"),
    (["--fact", "capital-france", "--new", " Madrid", "--symmetry"], "give --new-subject S"),
    (["--fact", "capital-france", "--new", " Rome", "--synonym"], "no synonymous reading"),
])
def test_criteria_bad_input_is_one_line_before_the_model_loads(argv, message, capsys, monkeypatch):
    import knlens.core.models

    monkeypatch.setattr(knlens.core.models, "load_model", _no_model)
    assert main(["edit", "--model", "tiny-llama", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
