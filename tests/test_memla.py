"""MEMLA's neuron-masked edit (knlens/methods/editing/memla.py): only the masked value vectors move, half the learned
update is written, the loss is 2.5·NLL(new) + 2·P(old), the edit undoes exactly and refuses what it must."""

from __future__ import annotations

import math

import pytest
import torch

from knlens import Fact, NeuronSet, load_model
from knlens.cli import main
from knlens.core.errors import EditModelError, EditStateError, NoOpEditError, SameTargetError, SettingsError
from knlens.core.tokens import encode
from knlens.methods.editing.edit import Edit, fingerprint
from knlens.methods.editing.editors import EditRequest, memla_editor
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.memla import memla_edit, memla_loss, sequence_logprob
from knlens.methods.editing.slots import value_slot
from knlens.methods.interventions import per_prompt
from knlens.run.engine import target_logits, target_probs

FACT = Fact(["the capital of france is", "the capital city of france is"], " paris", name="capital-france")
GROUPS = {"independent": NeuronSet([(1, 3), (1, 7)]), "specific": NeuronSet([(0, 5), (1, 9)])}


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def edit(model):
    return memla_edit(model, FACT, " berlin", GROUPS, steps=8, lr=0.01)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_the_masked_rows_move_and_the_model_is_not_written_while_optimising(model, edit):
    before = _snapshot(model)
    assert fingerprint(model) == edit.fingerprint  # memla_edit wrote nothing
    assert all(p.grad is None for p in model.parameters())
    with edit.apply(model):
        after = _snapshot(model)
    masked = {}
    for layer, rows in (GROUPS["independent"] | GROUPS["specific"]).by_layer().items():
        slot = value_slot(model, layer)
        masked[slot.name] = (slot.axis, rows)
    for name, p in before.items():
        if name not in masked:
            assert torch.equal(p, after[name]), name
            continue
        axis, rows = masked[name]
        changed = (p != after[name]).any(dim=1 - axis).nonzero()[:, 0].tolist()
        assert changed == sorted(rows), name                      # exactly the masked rows, every one of them
    assert edit.n_changed > 0 and edit.params["neurons"] == GROUPS["independent"] | GROUPS["specific"]


def test_half_of_the_learned_update_is_committed(model, edit):
    assert edit.params["commit"] == 0.5
    layers = sorted(edit.params["update"], key=int)
    assert len(layers) == len(edit.slices) == 2
    for s, layer in zip(edit.slices, layers):                      # one slice per layer, in layer order
        assert s.name == value_slot(model, int(layer)).name
        update = edit.params["update"][layer]                      # [k, d_model], rows in sorted neuron order
        old_rows = s.old if s.axis == 0 else s.old.T
        new_rows = s.new if s.axis == 0 else s.new.T
        assert torch.equal(new_rows, (old_rows.double() + 0.5 * update.double()).to(old_rows.dtype))
        assert bool(update.any())


def test_loss_is_the_weighted_sum_of_nll_new_and_p_old(model):
    # hand-made: NLL(new) = 1, P(old) = 0.25 -> 2.5 + 0.5
    assert float(memla_loss(torch.tensor([-1.0]), torch.tensor([math.log(0.25)]))) == pytest.approx(3.0)
    # with the whole update committed, the recorded loss is the formula on the edited model's plain forward
    e = memla_edit(model, FACT, " berlin is", GROUPS, steps=4, lr=0.01, commit=1.0)
    prompt = FACT.prompts[0]
    with e.apply(model):
        qn, qo = encode(model, [prompt], " berlin is"), encode(model, [prompt], " paris")
        p_new, p_old = per_prompt(target_probs(model, qn), qn)[0], per_prompt(target_probs(model, qo), qo)[0]
        assert float(sequence_logprob(target_logits(model, qn), qn).exp()[0]) == pytest.approx(float(p_new), rel=1e-4)
    assert e.params["loss"] == pytest.approx(2.5 * -math.log(p_new) + 2 * float(p_old), rel=1e-4)
    assert e.params["p_new"] == pytest.approx(float(p_new), rel=1e-3)   # hooks == weights (the self-check)


def test_undo_is_exact_and_the_edit_refuses_what_it_must(model, edit, tmp_path):
    start = fingerprint(model)
    handle = edit.apply(model)
    with pytest.raises(EditStateError):
        edit.apply(model)
    handle.undo()
    assert fingerprint(model) == start
    loaded = Edit.load(edit.save(tmp_path / "e"))
    assert loaded.digest == edit.digest and loaded.params["groups"] == GROUPS
    with pytest.raises(EditModelError):
        loaded.apply(load_model("tiny-gpt2"))


def test_stops_early_and_refuses_bad_input(model):
    e = memla_edit(model, FACT, " berlin", GROUPS["independent"], steps=60, lr=0.2, stop_p=0.5)
    assert e.params["steps_run"] < 60 and e.params["p_new_full"] > 0.5
    with pytest.raises(NoOpEditError, match="before any step"):
        memla_edit(model, FACT, " berlin", GROUPS, stop_p=1e-12)
    with pytest.raises(SettingsError, match="share"):
        memla_edit(model, FACT, " berlin", {"a": NeuronSet([(1, 3)]), "b": NeuronSet([(1, 3), (0, 1)])})
    with pytest.raises(NoOpEditError, match="empty"):
        memla_edit(model, FACT, " berlin", {"independent": NeuronSet()})
    with pytest.raises(SameTargetError):
        memla_edit(model, FACT, " paris", GROUPS)
    with pytest.raises(SettingsError, match="commit"):
        memla_edit(model, FACT, " berlin", GROUPS, commit=0.0)


def test_memla_on_a_post_norm_architecture_passes_its_self_check(make_tiny_gemma3):
    """Gemma-3's norm after W_out: the update enters before it, so the hooks and the written rows agree."""
    gemma = make_tiny_gemma3()
    e = memla_edit(gemma, FACT, " berlin", GROUPS, steps=5, lr=0.05)
    assert e.params["p_new"] > 0 and fingerprint(gemma) == e.fingerprint


def test_memla_editor_in_the_evaluation_and_the_command_line(model, capsys):
    req = EditRequest(FACT, " berlin", neighbours=[Fact(["the capital of italy is"], " rome")])
    ev = evaluate_edits(model, [req], {"memla": memla_editor({"capital-france": GROUPS}, steps=3)}, n_text=0)
    assert set(ev.edits.editor_kind) == {"memla"}
    assert main(["edit", "--model", "tiny-llama", "--quiet", "--prompt", "the capital of france is", "--target",
                 " paris", "--n-text", "0", "--new", " berlin", "--editor", "memla", "--neurons", "1:3,1:7",
                 "--control"]) == 0
    out = capsys.readouterr().out
    assert "memla" in out and "random" in out
