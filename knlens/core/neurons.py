"""Addressing neurons: ``Neuron(layer, index)`` and an ordered, immutable ``NeuronSet``.

A neuron is one coordinate of an MLP's hidden activation (by default ``blocks.{layer}.mlp.hook_post``,
the input of ``W_out``).

>>> a = NeuronSet([Neuron(3, 7), Neuron(5, 1)])
>>> b = NeuronSet.from_pairs([(5, 1), (9, 0)])
>>> sorted(a | b), sorted(a & b), sorted(a - b)
([Neuron(layer=3, index=7), Neuron(layer=5, index=1), Neuron(layer=9, index=0)], [Neuron(layer=5, index=1)], [Neuron(layer=3, index=7)])
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import pandas as pd

from knlens.core.errors import NeuronIndexError

__all__ = ["Neuron", "NeuronSet"]


class Neuron(NamedTuple):
    """One MLP neuron: ``layer`` (block index) and ``index`` (coordinate of the hidden layer)."""

    layer: int
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.index}"


class NeuronSet:
    """An immutable set of neurons that keeps insertion order and supports ``| & - ^``.

    Round-trips through a DataFrame (``to_frame``/``from_frame``) and JSON (``to_json``/``from_json``).
    """

    __slots__ = ("_items",)

    def __init__(self, neurons: Iterable[Neuron | tuple[int, int]] = ()) -> None:
        self._items: dict[Neuron, None] = {}
        for n in neurons:
            layer, index = int(n[0]), int(n[1])
            if layer < 0 or index < 0:
                raise NeuronIndexError(f"neuron ({layer}, {index}) has a negative layer or index")
            self._items[Neuron(layer, index)] = None

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> NeuronSet:
        return cls(pairs)

    # --- set protocol ---
    def __iter__(self) -> Iterator[Neuron]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, tuple) and Neuron(*item) in self._items  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronSet) and self._items.keys() == other._items.keys()

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __or__(self, other: NeuronSet) -> NeuronSet:
        return NeuronSet([*self, *other])

    def __and__(self, other: NeuronSet) -> NeuronSet:
        return NeuronSet(n for n in self if n in other)

    def __sub__(self, other: NeuronSet) -> NeuronSet:
        return NeuronSet(n for n in self if n not in other)

    def __xor__(self, other: NeuronSet) -> NeuronSet:
        return (self - other) | (other - self)

    def __repr__(self) -> str:
        shown = ", ".join(str(n) for n in list(self)[:8])
        more = f", … (+{len(self) - 8})" if len(self) > 8 else ""
        return f"NeuronSet([{shown}{more}])"

    @staticmethod
    def union(sets: Iterable[NeuronSet]) -> NeuronSet:
        return NeuronSet(n for s in sets for n in s)

    @staticmethod
    def intersection(sets: Iterable[NeuronSet]) -> NeuronSet:
        sets = list(sets)
        if not sets:
            return NeuronSet()
        return NeuronSet(n for n in sets[0] if all(n in s for s in sets[1:]))

    def jaccard(self, other: NeuronSet) -> float:
        """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets."""
        union = len(self | other)
        return 1.0 if union == 0 else len(self & other) / union

    # --- views ---
    @property
    def layers(self) -> list[int]:
        return [n.layer for n in self]

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [index, ...]}`` in insertion order."""
        out: dict[int, list[int]] = {}
        for n in self:
            out.setdefault(n.layer, []).append(n.index)
        return out

    def layer_counts(self) -> Counter[int]:
        return Counter(self.layers)

    def check(self, n_layers: int, d_mlp: int) -> NeuronSet:
        """Raise :class:`NeuronIndexError` if a neuron lies outside a model with this shape."""
        for n in self:
            if n.layer >= n_layers:
                raise NeuronIndexError(f"neuron {n}: layer {n.layer} is out of range (the model has "
                                       f"{n_layers} layers, 0..{n_layers - 1})")
            if n.index >= d_mlp:
                raise NeuronIndexError(f"neuron {n}: index {n.index} is out of range (layers have {d_mlp} "
                                       f"neurons, 0..{d_mlp - 1})")
        return self

    # --- round trips ---
    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": self.layers, "neuron": [n.index for n in self]}, dtype="int64")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> NeuronSet:
        return cls(zip(frame["layer"].astype(int), frame["neuron"].astype(int)))

    def to_json(self) -> str:
        return json.dumps([[n.layer, n.index] for n in self])

    @classmethod
    def from_json(cls, text: str) -> NeuronSet:
        return cls(tuple(p) for p in json.loads(text))
