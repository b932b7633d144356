"""Random control sets for interventions.

Two random controls stand beside a fact's knowledge neurons, both with the same number of neurons in
each layer, drawn from the rest of that layer:

* ``uniform`` (:func:`random_control`): any neuron of the layer;
* ``matched`` (:func:`matched_control`): a neuron whose |activation| at the target position falls in the
  same quantile bin of its layer as the knowledge neuron it replaces (deciles by default). Knowledge
  neurons are usually among the most active ones, and scaling a large activation moves the output more
  than scaling a small one, so the uniform control alone flatters them.

The smallest p-value a test against them can reach is in :mod:`knlens.stats.tests`.

>>> import torch
>>> from knlens.core.neurons import NeuronSet
>>> magnitude = torch.arange(20.0).reshape(1, 20)            # neuron i of layer 0 has |activation| i
>>> matched_control(NeuronSet([(0, 19)]), magnitude, n_bins=4, seed=0).by_layer()[0][0] >= 15
True
"""

from __future__ import annotations


import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.errors import ControlError
from knlens.core.neurons import NeuronSet

__all__ = ["CONTROLS", "random_control", "magnitude_bins", "matched_control", "matched_widening"]

CONTROLS = ("uniform", "matched")  # the random controls measure() can draw


def random_control(neurons: NeuronSet, d_mlp: int, *, seed: int = 0) -> NeuronSet:
    """A random set with the same number of neurons in each layer, avoiding ``neurons`` themselves.

    >>> random_control(NeuronSet([(1, 3), (1, 7)]), d_mlp=10, seed=0).layer_counts()
    Counter({1: 2})
    """
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for layer, idx in sorted(neurons.by_layer().items()):
        allowed = torch.tensor([i for i in range(d_mlp) if i not in set(idx)])
        if len(allowed) < len(idx):
            raise ControlError(f"layer {layer} has {d_mlp} neurons: too few to draw {len(idx)} others")
        choice = allowed[torch.randperm(len(allowed), generator=gen)[:len(idx)]]
        picked += [(layer, int(i)) for i in choice]
    return NeuronSet(picked)


def magnitude_bins(magnitude: Float[Tensor, "layer d"], n_bins: int = 10) -> Int[Tensor, "layer d"]:
    """Quantile bin (0 = smallest) of every neuron's magnitude within its layer: equal-count bins by rank.

    >>> magnitude_bins(torch.tensor([[0.3, 0.1, 0.9, 0.5]]), n_bins=2).tolist()
    [[0, 0, 1, 1]]
    """
    d = magnitude.shape[1]
    if not 1 <= n_bins <= d:
        raise ControlError(f"n_bins must be between 1 and the {d} neurons of a layer, got {n_bins}")
    rank = magnitude.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return rank * n_bins // d


def matched_control(neurons: NeuronSet, magnitude: Float[Tensor, "layer d"], *, n_bins: int = 10,
                    seed: int = 0) -> NeuronSet:
    """A random set matched on activation magnitude: for each neuron of ``neurons``, a neuron of the same
    layer whose ``magnitude`` (|activation| at the target position, ``[n_layers, d_mlp]``) is in the same
    quantile bin of that layer (:func:`magnitude_bins`), never one of ``neurons`` nor drawn twice.

    When a bin has no neuron left (more knowledge neurons in one bin than other neurons there), the draw
    takes the nearest bins too, widening one bin at a time; :func:`matched_widening` counts how often.

    >>> m = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0, 6.0]])       # two bins of 3: small and large
    >>> [n.index in (3, 4, 5) for n in matched_control(NeuronSet([(0, 5)]), m, n_bins=2, seed=1)]
    [True]
    """
    bins = magnitude_bins(magnitude, n_bins)
    gen = torch.Generator().manual_seed(seed)
    picked: list[tuple[int, int]] = []
    for layer, idx in sorted(neurons.by_layer().items()):
        taken = set(idx)
        for i in idx:
            for width in range(n_bins):
                near = (bins[layer] - bins[layer, i]).abs() <= width
                cands = [j for j in near.nonzero()[:, 0].tolist() if j not in taken]
                if cands:
                    break
            else:
                raise ControlError(f"layer {layer} has {magnitude.shape[1]} neurons: too few to draw "
                                   f"{len(idx)} others")
            j = cands[int(torch.randint(len(cands), (1,), generator=gen))]
            taken.add(j)
            picked.append((layer, j))
    return NeuronSet(picked)


def matched_widening(neurons: NeuronSet, magnitude: Float[Tensor, "layer d"], n_bins: int = 10) -> int:
    """How many neurons of ``neurons`` have fewer other neurons in their own bin than knowledge neurons there
    (their matched draws may come from a neighbouring bin); 0 when every draw can stay in its bin.

    >>> m = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.3, 0.7]])        # bins of 3: {0, 1, 4} and {2, 3, 5}
    >>> matched_widening(NeuronSet([(0, 2)]), m, n_bins=2), matched_widening(NeuronSet([(0, 2), (0, 3), (0, 5)]), m, n_bins=2)
    (0, 3)
    """
    bins = magnitude_bins(magnitude, n_bins)
    short = 0
    for layer, idx in neurons.by_layer().items():
        for b in {int(bins[layer, i]) for i in idx}:
            mine = sum(int(bins[layer, i]) == b for i in idx)
            others = int((bins[layer] == b).sum()) - mine
            short += max(0, mine - others)
    return short
