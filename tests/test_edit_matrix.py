"""The cross-lingual edit matrix (knlens/methods/multilingual/edit_matrix.py): its shape, every cell measured or
counted as a skip with its reason, and its values the editing evaluation's own."""

from __future__ import annotations

import pandas as pd
import pytest

from knlens import Fact, load_model
from knlens.core.errors import SettingsError
from knlens.data.multilingual import MultilingualFact
from knlens.methods.editing.editors import EditRequest
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.kn import kn_update
from knlens.methods.multilingual.edit_matrix import counterparts, cross_lingual_edits
from knlens.methods.multilingual.edit_matrix_result import MATRIX_METRICS, EditMatrix
from knlens.methods.multilingual.likn_result import LanguageNeurons, LanguageNeuronSettings


def _fact(s, o, country, obj, langs=("en", "xx")):
    versions = {"en": Fact([f"the capital of {country} is", f"the capital city of {country} is"], obj),
                "xx": Fact([f"{country} has the capital"], obj)}
    return MultilingualFact("P36", s, o, {l: versions[l] for l in langs})


# France (single-token objects, both languages), Germany (its new object " rome is" has two tokens),
# Italy (no "xx" version: a missing translation wherever it or its counterpart is asked there)
FACTS = [_fact("Q1", "Q90", "france", " paris"), _fact("Q2", "Q64", "germany", " berlin"),
         _fact("Q3", "Q220", "italy", " rome is", langs=("en",))]


def _neurons(facts, languages=("en", "xx")):
    rows = [(m.key, l, 1, i, True) for m in facts for l in languages for i in (3, 7)]
    rows += [(m.key, l, 0, 5 if l == "en" else 9, False) for m in facts for l in languages]
    sizes = pd.DataFrame([{"fact": m.key, "language": l, "n_neurons": 3, "n_independent": 2, "n_specific": 1}
                          for m in facts for l in languages])
    return LanguageNeurons(pd.DataFrame(rows, columns=["fact", "language", "layer", "neuron", "independent"]), sizes,
                           tuple(languages), LanguageNeuronSettings(across=tuple(languages)))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def matrix(model):
    return cross_lingual_edits(model, FACTS, _neurons(FACTS), check_known=False, memla_options={"steps": 3})


def test_every_cell_is_measured_or_counted(matrix):
    t = matrix.to_frame()
    assert len(t) == 2 * 2 * 2 * len(MATRIX_METRICS)                # edit × eval language × editor × metric
    rel = t[t.metric == "reliability"]
    assert (rel.n_facts + rel.n_skipped == rel.n_total).all() and (rel.n_total == 3).all()
    skips = matrix.skips.set_index(["fact", "edit_language", "eval_language", "editor"])["reason"]
    fr, de, it = (m.key for m in FACTS)
    assert counterparts(FACTS)[de].key == it                           # Germany's new object is Italy's
    assert skips[(de, "en", "en", "kn-update")] == "multi_token_object"   # " rome is": MEMLA teacher-forces it
    assert (de, "en", "en", "memla") not in skips
    assert skips[(it, "en", "xx", "memla")] == "missing_translation"
    assert skips[(de, "xx", "en", "memla")] == "missing_translation"   # the new object has no xx label
    assert (fr, "xx", "en", "kn-update") not in skips
    counts = matrix.skip_counts().set_index(["edit_language", "eval_language", "editor"])
    assert counts.loc[("en", "en", "kn-update"), "multi_token_object"] == 2   # Germany's and Italy's (" paris" vs " rome is")
    assert int(counts.to_numpy()[:, :].sum()) == len(matrix.skips)
    assert matrix.table("reliability", "memla").shape == (2, 2)


def test_values_are_the_editing_evaluations(model, matrix):
    fr = FACTS[0]
    edit = kn_update(model, fr["en"], " berlin", _neurons(FACTS).independent(fr.key))
    req = EditRequest(fr["xx"], " berlin", neighbours=[])
    direct = evaluate_edits(model, [req], {"kn": lambda m, r, made: edit}, n_text=0).per_fact()
    mine = matrix.frame[(matrix.frame.fact == fr.key) & (matrix.frame.edit_language == "en")
                        & (matrix.frame.eval_language == "xx") & (matrix.frame.editor == "kn-update")]
    for metric in ("reliability", "reliability_es"):
        assert mine.set_index("metric").loc[metric, "after"] == direct.set_index("metric").loc[metric, "after"]


def test_not_known_and_bad_input_are_counted_or_refused(model, matrix, tmp_path):
    assert EditMatrix.load(matrix.save(tmp_path / "m")) == matrix
    checked = cross_lingual_edits(model, FACTS[:2], _neurons(FACTS[:2]), editors=["kn-update"], check_known=True)
    assert set(checked.skips.reason) <= {"not_known", "multi_token_object", "missing_translation"}
    assert "not_known" in set(checked.skips.reason)                    # the tiny model knows no capital
    with pytest.raises(SettingsError, match="editor"):
        cross_lingual_edits(model, FACTS, _neurons(FACTS), editors=["rome"])
    with pytest.raises(SettingsError, match="neuron sets"):
        cross_lingual_edits(model, FACTS, _neurons(FACTS), edit_languages=["de"])
    with pytest.raises(SettingsError, match="counterpart"):
        counterparts(FACTS[:1])
