"""MEMLA on the embedded Gemma-3-270M (a norm after W_out): the hooks it optimises through agree with the written
rows (its self-check), the edit moves P(new) up and undoes exactly."""

from __future__ import annotations

import pytest

from knlens import Fact, NeuronSet
from knlens.core.tokens import encode
from knlens.methods.editing.edit import fingerprint
from knlens.methods.editing.memla import memla_edit
from knlens.methods.interventions import per_prompt
from knlens.run.engine import target_probs

pytestmark = pytest.mark.integration


def test_memla_on_gemma(gemma):
    fact = Fact(["The capital of France is"], " Paris")
    start = fingerprint(gemma)
    edit = memla_edit(gemma, fact, " Rome", {"independent": NeuronSet([(5, 10), (5, 11)]),
                                            "specific": NeuronSet([(8, 3)])}, steps=4, lr=1e-2)
    assert fingerprint(gemma) == start and edit.params["steps_run"] == 4
    q = encode(gemma, list(fact.prompts), " Rome")
    before = float(per_prompt(target_probs(gemma, q), q)[0])
    with edit.apply(gemma):
        after = float(per_prompt(target_probs(gemma, q), q)[0])
    assert after > before and after == pytest.approx(edit.params["p_new"], rel=1e-3)
    assert fingerprint(gemma) == start
