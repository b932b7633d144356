"""``knlens study multilingual`` and ``knlens locate --languages``: bad input is one line and exit 2, a short real
run on Gemma-3-270M fills every table, saves, and renders its pages (IG from zero rather than AMIG there: AMIG
costs IG's times the prompt's length, and tests/test_amig.py checks it)."""

from __future__ import annotations

import pandas as pd
import pytest

import knlens
from knlens.cli import main
from knlens.data.pararel import default_data_dir
from knlens.methods.multilingual.likn_result import LanguageNeurons
from knlens.studies.multilingual_facts import MultilingualSettings
from knlens.studies.multilingual_study import TABLES, MultilingualStudy, multilingual_study
from knlens.viz.language_page import language_grid, render_language_html, remote_sources
from knlens.viz.multilingual_page import render_markdown

needs_data = pytest.mark.skipif(not (default_data_dir() / "mpararel").is_dir(), reason="no mParaRel data folder")


def _no_model(*args, **kwargs):
    raise AssertionError("bad input must be refused before the model is loaded")


@needs_data
@pytest.mark.parametrize("argv, start", [
    (["locate", "--languages", "en,xx", "--fact", "P36:Q142"], "error: mParaRel has no data for language(s) 'xx'"),
    (["locate", "--languages", "en", "--fact", "P36:Q142"], "error: --languages needs at least two"),
    (["locate", "--languages", "en,fr", "--fact", "capital-france"], "error: with --languages, --fact is RELATION:SUBJECT"),
    (["locate", "--languages", "en,fr", "--fact", "P36:Q99999999"], "error: subject Q99999999 of P36 has no usable fact"),
    (["locate", "--languages", "en,fr", "--fact", "P99999:Q142"], "error: mParaRel (en) has no relation"),
    (["study", "multilingual", "--languages", "en"], "error: the multilingual study needs at least 2 languages"),
    (["study", "multilingual", "--held-out", "es"], "error: held_out language(s) ['es'] are not among"),
    (["study", "multilingual", "--edit-languages", "es"], "error: edit_languages language(s) ['es'] are not among"),
])
def test_bad_input_is_one_line_and_exit_2(argv, start, capsys, monkeypatch):
    monkeypatch.setattr(knlens.core.models, "load_model", _no_model)
    assert main([*argv, "--model", "tiny-llama", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err


def test_the_study_defaults_to_gemma():
    from knlens.cli import build_parser

    args = build_parser().parse_args(["study", "multilingual"])
    assert args.model == "gemma3-270m" == MultilingualSettings().model
    assert build_parser().parse_args(["study", "editing"]).model == "smollm2-135m"


def _neurons() -> LanguageNeurons:
    frame = pd.DataFrame({"fact": ["f"] * 4, "language": ["en", "en", "fr", "fr"], "layer": [3, 5, 3, 9],
                          "neuron": [7, 9, 7, 1], "independent": [True, False, True, False]})
    sizes = pd.DataFrame({"fact": ["f", "f"], "language": ["en", "fr"], "n_neurons": [2, 2], "n_independent": [1, 1],
                          "n_specific": [1, 1]})
    return LanguageNeurons(frame, sizes, ("en", "fr"))


def test_the_language_grid_and_page():
    grid = language_grid(_neurons(), "f")
    assert list(grid.columns) == ["language", "L3", "L5", "L9"]
    assert grid.set_index("language").loc["LIKN"].tolist() == ["7", "", ""]
    assert grid.set_index("language").loc["fr"].tolist() == ["7", "", "1"]
    effects = pd.DataFrame({"language": ["en"], "action": ["suppress"], "knowledge_relative": [-0.5]})
    page = render_language_html(_neurons(), effects, notes=("skipped de: not known",), figure=False)
    assert remote_sources(page) == [] and "<b>7</b>" in page and "skipped de: not known" in page
    assert "<b>1</b>" not in page and "Suppress" in page


@pytest.mark.integration
@needs_data
def test_a_short_real_study_fills_saves_and_renders(gemma, tmp_path):
    settings = MultilingualSettings(relations=("P30",), languages=("en", "es", "pt"), candidates=20, max_prompts=2,
                                    max_facts=2, attribution="ig", steps=1, n_random=1, n_resamples=2, held_out=("pt",),
                                    degenerate_facts=1, degenerate_top=2, edit_facts=2, edit_languages=("pt",), n_neighbours=1,
                                    memla_steps=1)
    result = multilingual_study(gemma, settings)
    assert set(result.tables) == set(TABLES)
    f = result.tables["filters"].set_index("filter")["facts"]
    assert f["read"] == 20 and f["read"] >= f["known in en"] >= f["known in es"] >= f["known in pt"] >= 2
    assert f["attributed"] == 2 == result.numbers["facts_attributed"]
    errors = result.tables["facts"]["completeness error (median)"]   # IG: every fact's error is reported
    assert len(errors) == 2 and errors.between(0.0, 10.0).all()
    assert set(result.tables["likn_sizes"].language) == {"en", "es", "pt"}
    assert set(result.tables["degenerate"].language) == {"en", "es", "pt"}
    m = result.tables["edit_matrix"]
    assert set(m.editor) == {"kn-update", "memla"} and set(m.edit_language) == {"pt"}
    assert set(m.eval_language) == {"en", "es", "pt"}
    assert (m.n_facts + m.n_skipped <= 2).all() and result.edits is not None
    assert set(result.tables["stability"].method) == {"intersection", "matrice (uniform)", "matrice (confidence)"}
    loaded = MultilingualStudy.load(result.save(tmp_path / "saved"))
    assert loaded == result
    page = render_markdown(result)
    for heading in ("## Headline", "## Facts per filter", "## MATRICE vs plain intersection", "## Limitations"):
        assert heading in page
    html = render_language_html(result.neurons, result.tables["likn_effects"], figure=False)
    assert remote_sources(html) == []


@pytest.mark.integration
@needs_data
def test_locate_languages_prints_each_language_and_writes_the_page(gemma, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(knlens.core.models, "load_model", lambda name: gemma)
    out = tmp_path / "out"
    argv = ["locate", "--model", "gemma3-270m", "--quiet", "--languages", "en,fr", "--fact", "P1376:Q1489",
            "--steps", "2", "--grid", "gauss-legendre", "--max-prompts", "2", "--attribution", "ig", "--n-random", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Neurons per language" in text and "Language-independent neurons (LIKN" in text
    page = (out / "languages.html").read_text()
    assert remote_sources(page) == [] and "P1376-Q1489-Q96" in page


def test_a_language_the_model_does_not_know_is_skipped_and_counted():
    """``locate --languages`` keeps the languages where the greedy answer is the target and names the others;
    fewer than two known languages is a NotKnownError."""
    from knlens import Fact
    from knlens.cli.locate_languages import known_languages
    from knlens.core.errors import NotKnownError
    from knlens.data.multilingual import MultilingualFact

    model = knlens.load_model("tiny-llama")

    def greedy(prompt: str) -> str:
        return model.to_string(int(model(model.to_tokens(prompt))[0, -1].argmax()))

    a, b = "the capital of france is", "the capital city of france is"
    wrong = next(t for t in (" paris", " rome", " berlin") if t != greedy(a))
    fact = MultilingualFact("P36", "Q142", "Q90", {"en": Fact([a], greedy(a)), "xx": Fact([b], greedy(b)),
                                                   "yy": Fact([a], wrong)})
    kept, skipped = known_languages(model, fact)
    assert kept.languages == ("en", "xx") and list(skipped) == ["yy"] and "not known" in skipped["yy"]
    with pytest.raises(NotKnownError, match="fewer than two"):
        known_languages(model, fact.restrict(["en", "yy"]))
