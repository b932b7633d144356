"""Edit requests and the editors that turn one into an :class:`~knlens.methods.editing.edit.Edit`.

An :class:`EditRequest` is one fact to rewrite: ``fact.prompts[0]`` is the edit prompt, the other prompts its
paraphrases, ``fact.target`` the true object, ``new_target`` the object to write, ``neighbours`` other facts
whose answers must not move. An *editor* is a function ``editor(model, request, made) -> Edit`` that leaves
the model unchanged; ``made`` holds the edits the earlier editors made for the same request (by name), so that
a control can match one of them (:func:`random_editor`).

* :func:`kn_update_editor`, :func:`kn_erase_editor` — Dai et al.'s edits on given neurons per fact;
* :func:`consistency_editors` — the same KN update on three selections of equal size from the paraphrases'
  attributions (the query's own top k, the top k of the mean, Chen et al.'s consistency-aware top k);
* :func:`rank_one_editor` — the rank-one (ROME-style) edit;
* :func:`memla_editor` — MEMLA's neuron-masked update of given neurons' value vectors (one group per category);
* :func:`random_editor` — random neurons moved by a random direction with the norm of another editor's edit.

>>> from knlens import load_model, Fact, NeuronSet
>>> model = load_model("tiny-llama")
>>> req = EditRequest(Fact(["the capital of france is"], " paris", name="capital-france"), " berlin")
>>> editors = {"kn": kn_update_editor({"capital-france": NeuronSet([(1, 3)])}), "random": random_editor("kn")}
>>> made = {}
>>> for name, editor in editors.items():
...     made[name] = editor(model, req, made)
>>> round(made["random"].delta_norm / made["kn"].delta_norm, 4)
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from knlens.core.errors import FactError, SameTargetError, SettingsError, TargetError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.methods.consistent_selection import equal_size_selections
from knlens.methods.editing.edit import Edit
from knlens.methods.editing.memla import memla_edit
from knlens.methods.editing.kn import kn_erase, kn_update, random_neuron_edit
from knlens.methods.editing.rank_one import rank_one_edit
from knlens.stats.sets import Vectors

__all__ = ["Probe", "EditRequest", "Editor", "kn_update_editor", "kn_erase_editor", "consistency_editors", "rank_one_editor",
           "memla_editor", "random_editor"]


@dataclass(frozen=True)
class Probe:
    """A further prompt an edit is judged on, in a named ``group`` (``"symmetry"``, ``"synonym"``, ...):
    ``target_true`` is what the unedited model should answer, ``target_new`` what the edit implies (``None``:
    only the true object is read, e.g. an old fact whose fate is reported)."""

    group: str
    prompt: str
    target_true: str
    target_new: str | None = None

    def __post_init__(self) -> None:
        Fact(self.prompt, self.target_true)  # the prompt's and the target's checks
        if self.target_new is not None:
            Fact(self.prompt, self.target_new)
        if self.group in ("reliability", "generality", "locality"):
            raise SettingsError(f"a probe's group cannot be {self.group!r}: the request's own prompts make it")


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``fact`` (edit prompt ``fact.prompts[0]``, paraphrases the rest) to ``new_target``; ``neighbours``
    are facts whose answers the edit should leave alone, ``probes`` further prompts to judge it on (the editing
    criteria of :mod:`knlens.methods.editing.criteria`)."""

    fact: Fact
    new_target: str
    neighbours: Sequence[Fact] = ()  # stored as a tuple
    probes: Sequence[Probe] = ()  # stored as a tuple

    def __post_init__(self) -> None:
        if not isinstance(self.new_target, str) or not self.new_target.strip():
            raise TargetError(f"the new target must be a non-empty string, got {self.new_target!r}")
        if self.new_target.strip() == self.fact.target.strip():
            raise SameTargetError(f"the new target {self.new_target!r} is the fact's target: nothing to edit")
        object.__setattr__(self, "neighbours", tuple(self.neighbours))
        object.__setattr__(self, "probes", tuple(self.probes))

    @property
    def name(self) -> str:
        """The fact's name (its first prompt when it has none)."""
        return self.fact.name or self.fact.prompts[0]


Editor = Callable[[Any, EditRequest, Mapping[str, Edit]], Edit]
NeuronsFor = Union[Mapping[str, NeuronSet], Callable[[EditRequest], NeuronSet]]


def _neurons_for(neurons: NeuronsFor, request: EditRequest) -> NeuronSet:
    if callable(neurons):
        return neurons(request)
    if request.name not in neurons:
        raise FactError(f"no neurons given for fact {request.name!r}; neurons are given for {sorted(neurons)[:5]}")
    return neurons[request.name]


def kn_update_editor(neurons: NeuronsFor, **options: Any) -> Editor:
    """Dai et al.'s update on ``neurons[fact name]`` (or ``neurons(request)``); ``options`` go to
    :func:`~knlens.methods.editing.kn.kn_update` (``lambda1``, ``lambda2``, ``vectors``, ``sign``)."""
    def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
        return kn_update(model, request.fact, request.new_target, _neurons_for(neurons, request), **options)
    return editor


def kn_erase_editor(neurons: NeuronsFor, **options: Any) -> Editor:
    """Dai et al.'s erase of ``neurons[fact name]``; ``options`` go to :func:`~knlens.methods.editing.kn.kn_erase`."""
    def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
        return kn_erase(model, _neurons_for(neurons, request), **options)
    return editor


def consistency_editors(attributions: Mapping[str, Vectors], k: int, *, beta1: float = 1.0, beta2: float = 1.0,
                        exclude: NeuronSet | None = None, **options: Any) -> dict[str, Editor]:
    """KN updates on three selections of exactly ``k`` neurons from each fact's per-paraphrase
    ``attributions[fact name]`` (:func:`~knlens.methods.consistent_selection.equal_size_selections`, query =
    the edit prompt): ``kn-query``, ``kn-mean`` and ``kn-consistency-aware`` (β₁·mean − β₂·std)."""
    def make(selection: str) -> Editor:
        def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
            if request.name not in attributions:
                raise FactError(f"no attributions given for fact {request.name!r}")
            sets = equal_size_selections(attributions[request.name], k, query=0, beta1=beta1, beta2=beta2,
                                         exclude=exclude)
            return kn_update(model, request.fact, request.new_target, sets[selection], **options)
        return editor
    return {f"kn-{s}": make(s) for s in ("query", "mean", "consistency-aware")}


def rank_one_editor(**options: Any) -> Editor:
    """The rank-one edit of the edit prompt; ``options`` go to :func:`~knlens.methods.editing.rank_one.rank_one_edit`
    (``layer``, ``covariance``, ``prefixes``, ``steps``, ...)."""
    def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
        return rank_one_edit(model, request.fact, request.new_target, **options)
    return editor


Groups = Union[NeuronSet, Mapping[str, NeuronSet]]
GroupsFor = Union[Mapping[str, Groups], Callable[[EditRequest], Groups]]


def memla_editor(neurons: GroupsFor, **options: Any) -> Editor:
    """MEMLA's neuron-masked edit (:func:`~knlens.methods.editing.memla.memla_edit`) of ``neurons[fact name]``
    (or ``neurons(request)``): a NeuronSet, or named groups such as ``{"independent": ..., "specific": ...}``;
    ``options`` go to ``memla_edit`` (``steps``, ``lr``, ``commit``, ...)."""
    def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
        if callable(neurons):
            groups = neurons(request)
        elif request.name in neurons:
            groups = neurons[request.name]
        else:
            raise FactError(f"no neurons given for fact {request.name!r}; neurons are given for {sorted(neurons)[:5]}")
        return memla_edit(model, request.fact, request.new_target, groups, **options)
    return editor


def _counts_like(edit: Edit, n_neurons: int | None) -> dict[int, int]:
    """Random neurons per layer for a control of ``edit``: its own layer counts, or ``n_neurons`` in its layer
    (a rank-one edit's ``layer``, else the layer holding most of its neurons)."""
    neurons = edit.params.get("neurons")
    counts = dict(neurons.layer_counts()) if isinstance(neurons, NeuronSet) else {}
    if n_neurons is None:
        if not counts:
            raise SettingsError(f"random_editor: give n_neurons for a {edit.editor} edit (it names no neurons)")
        return counts
    layer = edit.params.get("layer", max(counts, key=counts.get) if counts else None)
    if layer is None:
        raise SettingsError(f"random_editor: the {edit.editor} edit names no layer to draw neurons from")
    return {int(layer): n_neurons}


def random_editor(like: str, *, n_neurons: int | None = None, seed: int = 0) -> Editor:
    """Random neurons moved in a random direction with the Frobenius norm of the edit editor ``like`` made for
    the same request: the same layers and neuron counts as a KN edit, or ``n_neurons`` in the layer of a
    rank-one edit. ``like`` must come earlier in the editors."""
    def editor(model: Any, request: EditRequest, made: Mapping[str, Edit]) -> Edit:
        if like not in made:
            raise SettingsError(f"random_editor({like!r}) needs the editor {like!r} to run before it; ran: {list(made)}")
        ref = made[like]
        return random_neuron_edit(model, _counts_like(ref, n_neurons), ref.delta_norm, seed=seed,
                                  exclude=ref.params.get("neurons"))
    return editor
