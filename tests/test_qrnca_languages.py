"""``knlens study qrnca-languages`` end to end on hand-written facts in two "languages" the tiny random Llama can read
(English and a made-up ``xx`` with another word order): the domains are the languages, every table consistent with
the others, the page rendered as the language page, the result saved and loaded back equal; and the translated
multiple-choice frames."""

from __future__ import annotations

import pytest

from knlens import Fact
from knlens.core.errors import SettingsError
from knlens.data.multilingual import MultilingualFact
from knlens.methods.structure.multiple_choice import TEMPLATES, TEMPLATES_BY_LANGUAGE, templates_for
from knlens.studies.qrnca_languages import PAPER_LANGUAGES, QRNCALanguageSettings, qrnca_language_study
from knlens.studies.qrnca_study import QRNCAStudy
from knlens.viz import qrnca_page

COUNTRIES = ("france", "germany", "italy", "spain", "japan", "china")
CAPITALS = ("paris", "berlin", "rome", "madrid", "tokyo", "beijing")
LETTERS = ("a", "the", "of", "in")  # single tokens of the tiny vocabulary (A-D are not)


def _facts() -> list[MultilingualFact]:
    return [MultilingualFact("P36", f"Q{i}", f"Q{100 + i}", {
        "en": Fact([f"the capital of {c} is", f"the capital city of {c} is"], f" {o}", subject=c, relation="P36"),
        "xx": Fact([f"{c} capital is", f"{c} capital city is"], f" {o}", subject=c, relation="P36")})
        for i, (c, o) in enumerate(zip(COUNTRIES, CAPITALS))]


@pytest.fixture(scope="module")
def study(tiny_llama):
    settings = QRNCALanguageSettings(model="tiny-llama", relations=("P36",), languages=("en", "xx"), queries=2,
                                     n_templates=1, max_prompts=2, steps=2, top_v=5, letters=LETTERS)
    return qrnca_language_study(tiny_llama, settings, facts=_facts())


def test_the_domains_are_the_languages(study):
    s, t = study.settings, study.tables
    counts = t["counts"].set_index("language")
    assert counts.index.tolist() == ["en", "xx"] and counts["queries"].tolist() == [2, 2]
    assert counts["template language"].tolist() == ["en", "en"]          # no frame for the made-up language
    assert counts["shared with every language"].tolist() == [2, 2]      # the same facts in both languages
    assert set(study.density) == {"en", "xx"} and t["sets"]["domain"].tolist() == ["en", "xx"]
    by_domain = t["pcr_by_domain"]
    assert set(by_domain["domain"]) == {"en", "xx"}
    # related = the language's own prompts, unrelated = the other language's: the same facts asked twice
    assert (by_domain["n_related"] == by_domain["n_unrelated"]).all()
    paper = t["pcr"].set_index(["method", "action"])["paper (Llama-2-7B-chat)"]
    assert paper[("QRNCA", "boost")] == PAPER_LANGUAGES["QRNCA"]["boost"] == 41.2
    queries = t["neurons"]["query"].unique()
    assert {q.split("@")[1] for q in queries} == {"en", "xx"}            # each query named by fact and language


def test_the_language_page_and_round_trip(study, tmp_path):
    page = qrnca_page.render_markdown(study)
    assert page.startswith("# QRNCA by language: query-relevant neurons")
    assert "knlens study qrnca-languages --page benchmarks/QRNCA_LANGUAGES.md" in page
    assert "over 2 languages" in page and "- xx: lower / middle / upper" in page
    assert "## PCR (pooled over the languages) beside the paper" in page
    back = QRNCAStudy.load(study.save(tmp_path / "lang"))
    assert back == study and isinstance(back.settings, QRNCALanguageSettings)


def test_translated_frames_and_bad_settings():
    assert templates_for("en") == (TEMPLATES, "en")
    assert templates_for("zz")[1] == "en"
    for lang, frames in TEMPLATES_BY_LANGUAGE.items():   # every frame has the question and the options, in order
        assert len(frames) == len(TEMPLATES), lang
        assert all(0 <= f.index("{question}") < f.index("{options}") for f in frames), lang
    with pytest.raises(SettingsError, match="at least 2 languages"):
        QRNCALanguageSettings(languages=("en",))
    with pytest.raises(SettingsError, match="unknown grid 'simpson'"):
        QRNCALanguageSettings(grid="simpson")
    assert QRNCALanguageSettings().grid == "gauss-legendre"   # right grids cannot integrate Gemma-3 (RESULTS.md)
