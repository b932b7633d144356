"""The syntax study (knlens/studies/syntax_*.py, knlens/methods/readout.py, the page in knlens/viz/syntax_page.py):
readouts agree with plain interventions, random controls are measured (not assumed null), BLiMP prompt sets are
read as a decoder reads them, and the whole study runs on given prompts; a short real run on the embedded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from knlens import NeuronSet
from knlens.core.errors import SettingsError
from knlens.core.tokens import encode, stack
from knlens.data.pararel import default_data_dir
from knlens.methods.editing.edit import fingerprint
from knlens.methods.interventions import intervene
from knlens.methods.readout import readout
from knlens.studies.syntax_data import NUMBERS, SyntaxItem, determiner_number, task_items, verb_number
from knlens.studies.syntax_effects import Prompt, effect_tests, flip_rates, suppression_frame
from knlens.studies.syntax_study import TABLES, SyntaxSettings, SyntaxStudy, syntax_study
from knlens.viz.syntax_page import render_markdown

PROMPTS = [Prompt("a", "singular", "the capital of france is", " this", " these"),
           Prompt("b", "singular", "the dog is in", " that", " those"),
           Prompt("c", "plural", "the cats of spain are in", " these", " this")]
SET = NeuronSet([(1, 3), (1, 7), (0, 5)])


def test_readout_agrees_with_a_plain_intervention(tiny_llama):
    q = stack([encode(tiny_llama, [p.prompt], p.good) for p in PROMPTS])
    r = readout(tiny_llama, q, [SET, NeuronSet()], q.target[:, None])
    p_set, p_none = intervene(tiny_llama, q, [SET, NeuronSet()], 0.0)
    assert torch.allclose(r.after[0, :, 0].exp(), p_set, atol=1e-6)
    assert torch.allclose(r.after[1], r.clean) and torch.equal(r.argmax_after[1], r.argmax_clean)
    assert torch.allclose(r.clean[:, 0].exp(), p_none, atol=1e-6)
    assert not torch.allclose(r.after[0], r.clean)


def test_suppression_is_measured_against_random_sets_that_move(tiny_llama):
    classes = {"singular": [tiny_llama.tokenizer.convert_tokens_to_ids(w) for w in ("this", "that")],
               "plural": [tiny_llama.tokenizer.convert_tokens_to_ids(w) for w in ("these", "those")]}
    magnitude = torch.rand(tiny_llama.cfg.n_layers, tiny_llama.cfg.d_mlp)
    frame = suppression_frame(tiny_llama, PROMPTS, SET, classes, magnitude, n_random=3)
    assert len(frame) == len(PROMPTS) * (1 + 2 * 3)
    assert set(frame.set) == {"knowledge", "uniform", "matched"}
    random = frame[frame.set != "knowledge"]
    assert (random.p_singular_after != random.p_singular_before).any(), "random sets must move the output"
    kn = frame[frame.set == "knowledge"]
    good = np.array([kn.p_good_after.iloc[i] for i in range(len(PROMPTS))])
    q = stack([encode(tiny_llama, [p.prompt], p.good) for p in PROMPTS])
    assert np.allclose(good, intervene(tiny_llama, q, [SET], 0.0)[0].numpy(), atol=1e-6)
    t = effect_tests(frame, "singular")
    assert t["prompts"] == 3 and 0 <= t["p_ttest"] <= 1 and t["p_empirical_floor"] == pytest.approx(0.25)
    assert t["change"] == pytest.approx(float((kn.p_singular_after - kn.p_singular_before).mean()))
    assert t["significant"] == (t["p_ttest"] < 0.05 and t["p_vs_uniform"] < 0.05 and t["p_vs_matched"] < 0.05)
    flips = flip_rates(frame).set_index("set")
    assert set(flips.columns) == {"top prediction changed", "singular vs plural flipped", "good vs bad flipped"}
    assert flips.loc["knowledge"].between(0, 1).all()


def test_numbers_of_determiners_and_verbs():
    assert [determiner_number(w) for w in ("this", " That", "these", "those")] == ["singular"] * 2 + ["plural"] * 2
    assert [verb_number(w) for w in ("isn't", "were", "sells", "break")] == ["singular", "plural", "singular",
                                                                            "plural"]
    with pytest.raises(SettingsError):
        determiner_number("the")


def test_blimp_prompts_are_cut_where_the_sentences_differ(tiny_llama):
    """The tiny tokenizer knows this/that/these/those, and is/was but not are/were nor most verbs: no subject-verb
    pair has both words, so every one is dropped (and counted)."""
    if not Path(default_data_dir()).exists():
        pytest.skip("BLiMP data not found beside the repository")
    det, c = task_items(tiny_llama, "determiner")
    assert c["read"] == 1000 and c["kept"] + c["dropped (tokens)"] == c["read"] == sum(map(len, det.values()))
    for item in det["singular"][:50]:
        assert item.good.strip() in ("this", "that") and item.bad.strip() in ("these", "those")
        assert not item.prompt.endswith((" this", " these", " that", " those"))
    sv, c = task_items(tiny_llama, "subject-verb")
    assert c["kept"] == len(sv["singular"]) + len(sv["plural"]) == 0 and c["dropped (tokens)"] == c["read"] == 1000
    with pytest.raises(SettingsError, match="unknown syntax task"):
        task_items(tiny_llama, "anaphor")


def _items(task: str) -> dict[str, list[SyntaxItem]]:
    words = {"singular": (" this", " these"), "plural": (" these", " this")}
    starts = ["the capital of france is", "the dog is in", "the cat lives in", "the river of spain is",
              "the president of italy was", "the city of paris is"]
    return {n: [SyntaxItem(task, n, f"{s} {'' if n == 'singular' else 'and'}".strip(), *words[n], f"{n}{i}")
                for i, s in enumerate(starts)] for n in NUMBERS}


def test_the_study_runs_on_given_prompts(tiny_llama, tmp_path):
    settings = SyntaxSettings(model="tiny-llama", tasks=("determiner",), locate=3, heldout=2, edits=1, n_random=2,
                              steps=2, n_text=0, pararel_facts=0, subset=2)
    start = fingerprint(tiny_llama)
    r = syntax_study(tiny_llama, settings, items={"determiner": _items("determiner")})
    assert fingerprint(tiny_llama) == start
    assert set(r.tables) == set(TABLES)
    loc = r.tables["localisation"]
    assert list(loc.number) == list(NUMBERS) and (loc.prompts == 3).all()
    supp = r.tables["suppression"]
    located = [n for n, k in zip(loc.number, loc.neurons) if k]
    parts = supp.groupby(["number", "prompts_of"]).prompts.first().unstack()
    assert (parts.loc[located, "same number, located on"] == 3).all()
    assert (parts.loc[located, "same number, held out"] == 2).all()
    assert set(supp.quantity) <= {"singular", "plural", "neutral", "good", "bad"} and len(supp) > 0
    assert set(r.tables["edits"].editor) == {"kn-update", "random-kn"} and (r.tables["edits"].n_facts == 1).all()
    assert list(r.tables["comparison"]["prompt set"]) == ["determiner singular", "determiner plural"]
    assert SyntaxStudy.load(r.save(tmp_path / "saved")) == r
    page = render_markdown(r)
    for heading in ("## Headline", "## Syntax beside facts", "## Suppression", "## Editing grammatical number",
                    "## Limitations"):
        assert heading in page


def test_settings_refuse_unknown_tasks_and_tiny_sets():
    with pytest.raises(SettingsError, match="unknown syntax task"):
        SyntaxSettings(tasks=("anaphor",))
    with pytest.raises(SettingsError, match="at least 2"):
        SyntaxSettings(locate=1)


@pytest.mark.integration
def test_a_short_real_run(real_model):
    if not Path(default_data_dir()).exists():
        pytest.skip("BLiMP data not found beside the repository")
    settings = SyntaxSettings(tasks=("subject-verb",), locate=2, heldout=2, edits=1, n_random=1, steps=2, n_text=0,
                              pararel_relations=("P36",), pararel_facts=1, pararel_candidates=20,
                              pararel_min_prompts=2, pararel_max_prompts=3, subset=2)
    r = syntax_study(real_model, settings)
    counts = r.tables["counts"].iloc[0]
    assert counts["kept"] + counts["dropped (tokens)"] == counts["read"] == 1000
    assert len(r.tables["localisation"]) == 2 and len(r.tables["pararel"]) == 1
    print("\n" + r.tables["comparison"].to_string(index=False))
