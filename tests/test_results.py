"""Every result type keeps the one result contract (knlens.results.contract): saved to a folder and loaded
back it is the same value (tensors bit for bit, tables exactly), with the same key, and saving the loaded one
writes the same bytes. Each result is built on the tiny random models with small settings."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import pandas as pd
import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.core.errors import ResultFormatError
from knlens.methods.activations import token_activations
from knlens.methods.attribution.result import Screen
from knlens.methods.attention import attention_patch, synapse_scaling
from knlens.methods.editing.editors import EditRequest, kn_update_editor, random_editor
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.heldout import held_out
from knlens.methods.interventions import measure
from knlens.methods.specificity import specificity
from knlens.methods.tracing.corruption import Corruption
from knlens.methods.tracing.result import group_effects
from knlens.results.contract import RESULT_JSON, RESULT_TENSORS, Result, same
from knlens.studies.consistency import consistency_study, fact_consistency
from knlens.studies.query_localization import compare_selections, entity_vs_relation, query_kn_mapping

PROMPTS = ("the capital of france is", "the capital city of france is", "france capital city is",
           "the city of paris is the capital of")
FACT = Fact(PROMPTS[:2], " paris", subject="france", relation="capital", name="capital-france")
FACT4 = Fact(PROMPTS, " paris", relation="capital", name="capital-france-4")
GERMANY = Fact(["the capital of germany is", "the capital city of germany is"], " berlin", subject="germany",
               relation="capital", name="capital-germany")
OTHERS = [Fact(["the official language of japan is"], " japanese", relation="language", name="lang-japan"),
          Fact(["the currency of japan is the"], " yen", relation="currency", name="currency-japan")]
KN = NeuronSet([(1, 3), (0, 7)])


def _trace(model: Any, **kw: Any) -> Any:
    return knlens.trace(model, PROMPTS[0], " paris", subject="france", samples=2, known_only=False, **kw)


BUILDERS = {
    "attribution": lambda m: knlens.attribute(m, FACT, steps=2)[0],
    "attribution-gpt2": lambda m: knlens.attribute(m, FACT, steps=3, tolerance=None)[1],
    "attribution-screened": lambda m: knlens.attribute(m, FACT, steps=2, screen=Screen(threshold=0.9, top_k=0,
                                                                                       safety=1.0))[0],
    "trace": lambda m: _trace(m, kinds=("mlp", "attn")),
    "group_effects": lambda m: group_effects([_trace(m, kinds=("mlp",)), _trace(m, kinds=("mlp",), seed=3)]),
    "interventions": lambda m: measure(m, [FACT, GERMANY], [KN, NeuronSet()], n_random=2),
    "heldout": lambda m: held_out(m, FACT4, knlens.attribute(m, FACT4, steps=2), "eleuther", n_random=2),
    "specificity": lambda m: specificity(m, FACT, KN, others=OTHERS),
    "token_activations": lambda m: token_activations(m, FACT, KN)[1],
    "attention_patch": lambda m: attention_patch(m, PROMPTS[0], " paris", KN, source=PROMPTS[1]),
    "attention_patch-corrupted": lambda m: attention_patch(m, PROMPTS[0], " paris", KN, subject="france",
                                                           source=Corruption("noise", samples=2)),
    "synapse_scaling": lambda m: synapse_scaling(m, PROMPTS[0], " paris", KN, alphas=(0.0, 2.0), n_controls=2),
    "locate": lambda m: knlens.locate(m, FACT4, steps=2, n_random=2, progress=False, specificity=OTHERS),
    "locate-small": lambda m: knlens.locate(m, FACT, steps=2, n_random=1, progress=False, specificity=False),
    "fact_consistency": lambda m: fact_consistency(m, FACT, steps=2, top_k=4),
    "consistency": lambda m: consistency_study(m, [FACT, GERMANY], steps=2),
    "query_kn_mapping": lambda m: query_kn_mapping(m, FACT, [KN, NeuronSet([(1, 3)])], n_random=1,
                                                   exclude=NeuronSet([(0, 7)])),
    "compare_selections": lambda m: compare_selections(m, FACT4, {"a": KN, "b": NeuronSet([(1, 1)])}, query=0,
                                                       held_out=[2], others=OTHERS[:1]),
    "entity_vs_relation": lambda m: entity_vs_relation(m, PROMPTS[0], " paris", subject="france", samples=1,
                                                       known_only=False),
    "edit_evaluation": lambda m: evaluate_edits(m, [EditRequest(FACT, " berlin", tuple(OTHERS))],
                                                {"kn": kn_update_editor({"capital-france": KN}),
                                                 "random": random_editor("kn")}, text=[PROMPTS[3]]),
}
MODELS = {"attribution-gpt2": "tiny_gpt2", "token_activations": "tiny_gpt2", "synapse_scaling": "tiny_gpt2"}


def _perturbed(value: Any) -> Any:
    """A copy of ``value`` with one number changed (the first tensor element or numeric table cell found,
    depth first), or None when it holds no number."""
    if isinstance(value, torch.Tensor):
        if not value.numel():
            return None
        out = value.clone()
        flat = out.view(-1)
        flat[0] = ~flat[0] if out.dtype == torch.bool else (0 if math.isnan(float(flat[0])) else flat[0] + 1)
        return out
    if isinstance(value, pd.DataFrame):
        for j, column in enumerate(value.columns):
            col = value[column]
            if len(col) and col.dtype.kind in "biuf":
                out = value.copy()
                x = col.iloc[0]
                out.iloc[0, j] = (not x) if col.dtype.kind == "b" else (0 if pd.isna(x) else x + 1)
                return out
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            p = _perturbed(getattr(value, f.name))
            if p is not None:
                return dataclasses.replace(value, **{f.name: p})
        return None
    if isinstance(value, (tuple, list)):
        for i, x in enumerate(value):
            p = _perturbed(x)
            if p is not None:
                return type(value)([*value[:i], p, *value[i + 1:]])
    if isinstance(value, dict):
        for k, x in value.items():
            p = _perturbed(x)
            if p is not None:
                return {**value, k: p}
    return None


def _other_settings(settings: Any) -> Any:
    """``settings`` with its first number or text changed (or its first tuple's first item repeated)."""
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if isinstance(v, (int, float, str)) and f.name not in ("versions", "knlens_version"):
            new = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, (int, float)) else v + "x"
            return dataclasses.replace(settings, **{f.name: new})
        if isinstance(v, tuple) and v:
            return dataclasses.replace(settings, **{f.name: v + v[:1]})
    raise AssertionError(f"{type(settings).__name__} has no number or text to change")


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
    model = request.getfixturevalue(MODELS.get(request.param, "tiny_llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, BUILDERS[request.param](model)


def test_result_keeps_the_contract(built):
    name, r = built
    assert isinstance(r, Result) and r.study != "result", name
    params = type(r).__dataclass_params__
    assert params.frozen and not params.eq, "a result is @dataclass(frozen=True, eq=False)"
    assert dataclasses.is_dataclass(r.settings) and not isinstance(r.settings, dict)
    assert r.settings.__dataclass_params__.frozen
    assert isinstance(r.to_frame(), pd.DataFrame)
    import matplotlib.pyplot as plt

    fig = r.plot()
    plt.close("all") if fig is not None else None
    assert r.key.startswith(f"{r.study}/") and len(r.key.split("/")) == 3


def test_result_round_trips(built, tmp_path):
    name, r = built
    d = r.save(tmp_path / "a")
    assert (d / RESULT_JSON).is_file() and (d / RESULT_TENSORS).is_file()
    back = type(r).load(d)
    assert type(back) is type(r) and same(back, r) and back == r, name
    assert back.key == r.key
    back.save(tmp_path / "b")
    for f in (RESULT_JSON, RESULT_TENSORS):
        assert (tmp_path / "b" / f).read_bytes() == (d / f).read_bytes(), f
    assert same(back.to_frame(), r.to_frame())
    assert same(Result.load(d), r)  # the folder says which type it holds


def test_result_comparison_can_fail(built):
    name, r = built
    changed = _perturbed(r)
    assert changed is not None, f"{name} holds no number to change"
    assert not same(changed, r) and changed != r
    other = dataclasses.replace(r, settings=_other_settings(r.settings))
    assert other.key != r.key and not same(other, r)


def test_locate_writes_readable_tables_and_loads_from_the_contract_files(tiny_llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = knlens.locate(tiny_llama, FACT4, steps=2, n_random=1, progress=False, specificity=OTHERS)
    d = r.save(tmp_path / "out")
    assert {p.name for p in d.iterdir()} == {RESULT_JSON, RESULT_TENSORS, "neurons.csv", "interventions.csv",
                                             "completeness.csv", "heldout.csv", "specificity.csv"}
    for extra in ("neurons.csv", "interventions.csv", "completeness.csv", "heldout.csv", "specificity.csv"):
        (d / extra).unlink()  # load reads only the contract's two files
    assert same(knlens.LocateResult.load(d), r)


def test_consistency_study_keeps_the_vectors(tiny_llama, tmp_path):
    study = consistency_study(tiny_llama, [FACT, GERMANY], steps=2)
    back = type(study).load(study.save(tmp_path))
    assert all(f.vectors is not None for f in back.facts)
    assert same(back.pairs("niu"), study.pairs("niu"))


def test_a_folder_without_a_result_is_refused(tmp_path, tiny_llama):
    with pytest.raises(ResultFormatError, match="no saved result"):
        knlens.Trace.load(tmp_path)
    (tmp_path / RESULT_JSON).write_text('{"format": "something else"}')
    with pytest.raises(ResultFormatError, match="not a knlens result"):
        Result.load(tmp_path)
    a = knlens.attribute(tiny_llama, FACT, steps=2)[0]
    a.save(tmp_path / "attribution")
    with pytest.raises(ResultFormatError, match="not a Trace"):
        knlens.Trace.load(tmp_path / "attribution")
