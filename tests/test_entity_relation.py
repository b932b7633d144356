"""Entity versus relation (knlens/methods/tracing/severed.py, knlens/studies/entity_relation.py): severed tracing equals
the corrupted run when everything is frozen and the clean run when nothing is corrupted, its batched rows agree
with one-row forwards, and the study's averages carry intervals."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from knlens import Fact, tiny_model
from knlens.core.errors import InsufficientDataError, TracingSettingError
from knlens.methods.tracing.corruption import Corruption
from knlens.methods.tracing.severed import severed_restore, severed_trace
from knlens.methods.tracing.trace import restore, trace

PROMPT, TARGET, SUBJECT = "the capital city of france is", " paris", "france"
L = 4


@pytest.fixture(scope="module")
def model():
    """Four blocks: with two, a frozen output above the restored layer could reach the last token through no block."""
    return tiny_model("llama", n_layers=L)


def test_everything_frozen_gives_the_corrupted_run(model):
    n = len(model.to_tokens(PROMPT)[0])
    frozen = {k: torch.ones(L, n, dtype=torch.bool) for k in ("mlp", "attn")}
    for corrupt, t in (("subject", 5), ("relation", 2)):
        at = torch.zeros(L, n, dtype=torch.bool)
        at[0, t] = True  # a clean state before the last token, all paths after it frozen
        p_corr = restore(model, PROMPT, TARGET, subject=SUBJECT, corrupt=corrupt)
        got = severed_restore(model, PROMPT, TARGET, subject=SUBJECT, corrupt=corrupt, restored=at, frozen=frozen)
        assert got == pytest.approx(p_corr, abs=1e-8)
        alone = severed_restore(model, PROMPT, TARGET, subject=SUBJECT, corrupt=corrupt, restored=at)
        assert alone == pytest.approx(restore(model, PROMPT, TARGET, subject=SUBJECT, corrupt=corrupt,
                                              restored={"resid": at}), abs=1e-6)
        assert abs(alone - p_corr) > 1e-5, "the restored state matters when nothing is frozen"


def test_nothing_corrupted_gives_the_clean_run(model):
    same = Corruption("substitute", other=SUBJECT)  # the subject written over itself: the clean run
    s = severed_trace(model, PROMPT, TARGET, subject=SUBJECT, corruption=same, known_only=False)
    assert s.p_corrupted == pytest.approx(s.p_clean, abs=1e-6)
    for sever in ("none", "mlp", "attn"):
        assert torch.allclose(s.effects[sever], torch.zeros(L), atol=1e-6)


def test_severed_rows_agree_with_one_forward_each(model):
    s = severed_trace(model, PROMPT, TARGET, subject=SUBJECT, samples=3, known_only=False, batch_size=64)
    assert s.settings["engine"] == "batched" and s.token == 5
    plain = trace(model, PROMPT, TARGET, subject=SUBJECT, samples=3, kinds=("resid",), known_only=False)
    assert torch.allclose(s.effects["none"], plain.effects["resid"][:, 5], atol=1e-6)
    n = len(model.to_tokens(PROMPT)[0])
    for sever in ("mlp", "attn"):
        for layer in range(L):
            at = torch.zeros(L, n, dtype=torch.bool)
            at[layer, 5] = True
            fr = torch.zeros(L, n, dtype=torch.bool)
            fr[layer + 1:, 5] = True
            p = severed_restore(model, PROMPT, TARGET, subject=SUBJECT, restored=at, frozen={sever: fr},
                                corruption=Corruption(samples=3))
            assert float(s.effects[sever][layer]) == pytest.approx(p - s.p_corrupted, abs=1e-6)
    assert float(s.effects["mlp"][0]) != pytest.approx(float(s.effects["none"][0]), abs=1e-6)
    assert len(s.to_frame()) == 3 * L


def test_bad_severs(model):
    with pytest.raises(TracingSettingError, match="unknown sever"):
        severed_trace(model, PROMPT, TARGET, subject=SUBJECT, severs=("resid",), known_only=False)
    with pytest.raises(TracingSettingError, match="only 'mlp' and 'attn'"):
        severed_restore(model, PROMPT, TARGET, subject=SUBJECT, frozen={"resid": torch.ones(L, 7, dtype=bool)})


def test_study_tables_from_traced_facts(model):
    from knlens.studies.entity_relation import summarise, trace_fact

    facts = [Fact(["the capital city of france is"], " paris", subject="france", name="a"),
             Fact(["the official language of spain is"], " spanish", subject="spain", name="b")]
    parts = [trace_fact(model, f, samples=1, known_only=False) for f in facts]
    groups, severed, totals = (pd.concat(p) for p in zip(*parts))
    tables = summarise(groups, severed, totals)
    g = tables["groups"]
    assert set(g.corruption) == {"subject", "relation"} and (g.n == 2).all()
    row = g[(g.corruption == "subject") & (g.kind == "mlp") & (g.group == "last") & (g.layer == 3)].iloc[0]
    per_fact = groups[(groups.corruption == "subject") & (groups.kind == "mlp") & (groups.group == "last")
                      & (groups.layer == 3)].effect
    assert row.effect == pytest.approx(per_fact.mean()) and row.ci_low <= row.effect <= row.ci_high
    a = tables["attn_vs_mlp"]
    assert ((a["attn - mlp"] - (a["attn peak"] - a["mlp peak"])).abs() < 1e-9).all() and a.p.between(0, 1).all()
    s = tables["severed_summary"]
    assert len(s) == 4 and (s.n == 2).all()
    assert s["drop mlp"].tolist() == pytest.approx((s["mean effect"] - s["mlp severed"]).tolist())
    assert len(tables["total"]) == 2
    with pytest.raises(InsufficientDataError):
        summarise(pd.DataFrame(), severed, totals)
    from knlens.studies.entity_relation import EntityRelationStudy, EntityRelationStudySettings
    from knlens.viz.entity_relation_page import render_markdown

    counts = pd.DataFrame([{"relation": "P36", "read": 2, "subject in prompt": 2, "known": 2, "traced": 2}])
    page = render_markdown(EntityRelationStudy(EntityRelationStudySettings(), {**tables, "counts": counts}))
    assert "## Severed paths" in page and "2 traced of 2 known of 2 read" in page


def test_cli_bad_settings_are_one_error_line(capsys):
    from knlens.cli import main

    assert main(["study", "entity-relation", "--model", "tiny-llama", "--quiet", "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples must be at least 1" in err[0]


def test_no_known_fact_is_one_error_line(capsys):
    """The tiny model knows no ParaRel fact (its vocabulary lacks them): one line, exit 2."""
    from pathlib import Path

    from knlens.cli import main
    from knlens.data.pararel import default_data_dir

    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    assert main(["study", "entity-relation", "--model", "tiny-llama", "--quiet", "--relations", "P36",
                 "--candidates", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
