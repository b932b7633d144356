"""Similarity of neuron sets and of attribution vectors.

* :func:`jaccard_consistency` — mean pairwise Jaccard index of neuron sets;
* :func:`niu_similarity` — Niu et al.'s (σ₁² − 1)/(n − 1) of row-normalised vectors (for two vectors
  it is their absolute cosine, :func:`abs_cosine`).

>>> from knlens import NeuronSet
>>> jaccard_consistency([NeuronSet([(0, 1)]), NeuronSet([(0, 1)]), NeuronSet([(1, 2)])])  # (1 + 0 + 0) / 3
0.3333333333333333
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

import torch
from jaxtyping import Float
from torch import Tensor

from knlens.core.errors import InsufficientDataError
from knlens.core.neurons import NeuronSet

__all__ = ["Vectors", "jaccard_consistency", "niu_similarity", "abs_cosine"]

Vectors = Union[Float[Tensor, "n d"], Float[Tensor, "n layer neuron"], Sequence[Any]]
"""Vectors as rows of a tensor, or a sequence of objects with a ``scores`` tensor (e.g. Attributions)."""


def jaccard_consistency(sets: Sequence[NeuronSet]) -> float:
    """Mean pairwise Jaccard index of neuron sets (1 = all identical, 0 = pairwise disjoint).

    Two empty sets count as identical (Jaccard 1). Needs at least two sets.

    >>> jaccard_consistency([NeuronSet([(0, 1), (0, 2)]), NeuronSet([(0, 1)])])
    0.5
    """
    if len(sets) < 2:
        raise InsufficientDataError(f"consistency needs at least two neuron sets, got {len(sets)}")
    pairs = list(itertools.combinations(sets, 2))
    return float(sum(a.jaccard(b) for a, b in pairs) / len(pairs))


def _unit_rows(vectors: Vectors) -> Float[Tensor, "n d"]:
    """Rows flattened to ``[n, d]`` (float64) and scaled to unit length; zero rows stay zero."""
    if isinstance(vectors, Tensor):
        m = vectors.detach().double()
    else:
        m = torch.stack([a.scores.detach().double() for a in vectors])
    m = m.reshape(m.shape[0], -1)
    norms = m.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, m / norms.clamp_min(1e-300), m)


def niu_similarity(vectors: Vectors) -> float:
    """Niu et al.'s localisation similarity of n attribution vectors: (σ₁² − 1) / (n − 1).

    The rows of the ``n × (L·d_mlp)`` matrix are normalised to unit length and σ₁ is its largest singular
    value: 1 for identical (parallel) rows, 0 for mutually orthogonal rows. Zero rows stay zero.

    >>> niu_similarity(torch.ones(4, 10))
    1.0
    >>> round(niu_similarity(torch.eye(3)), 6)
    0.0
    """
    m = _unit_rows(vectors)
    n = m.shape[0]
    if n < 2:
        raise InsufficientDataError(f"similarity needs at least two vectors, got {n}")
    sigma1 = float(torch.linalg.matrix_norm(m, ord=2))
    return float(round((sigma1 ** 2 - 1.0) / (n - 1), 12))


def abs_cosine(vectors: Vectors) -> Float[Tensor, "n n"]:
    """``|cos|`` of every pair of rows (0 where a row is zero): for two rows, :func:`niu_similarity` of the pair.

    >>> abs_cosine(torch.tensor([[1.0, 0.0], [-1.0, 1.0]])).round(decimals=4).tolist()
    [[1.0, 0.7071], [0.7071, 1.0]]
    """
    m = _unit_rows(vectors)
    return (m @ m.T).abs()
