"""General statistics of the analyses: similarity of neuron sets and attribution vectors, Otsu's threshold,
a paired sign-flip permutation test and a bimodality check.

* :func:`jaccard_consistency` — mean pairwise Jaccard index of neuron sets;
* :func:`niu_similarity` — Niu et al.'s (σ₁² − 1)/(n − 1) of row-normalised vectors (for two vectors
  it is their absolute cosine, :func:`abs_cosine`);
* :func:`otsu_threshold` — the cut of a 1-D sample that maximises the between-class variance;
* :func:`paired_permutation_test` — is the mean of paired differences zero? (sign flips, two-sided);
* :func:`bimodality` — Silverman's bandwidth test of unimodality (smoothed bootstrap at the critical
  bandwidth). Hartigan's dip test would be the usual choice; no installed library has it (the PyPI
  package ``diptest`` does, and would be the dependency to add).

>>> from knlens import NeuronSet
>>> jaccard_consistency([NeuronSet([(0, 1)]), NeuronSet([(0, 1)]), NeuronSet([(1, 2)])])  # (1 + 0 + 0) / 3
0.3333333333333333
>>> otsu_threshold([0.1, 0.12, 0.15, 0.8, 0.82, 0.9]) == (0.15 + 0.8) / 2
True
>>> paired_permutation_test([0.3, 0.2, 0.4, 0.1, 0.3])["p"]   # all 32 sign patterns: 2 as extreme
0.0625
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..attribution import Attribution
from ..errors import KnlensError
from ..neurons import NeuronSet

__all__ = ["InsufficientDataError", "jaccard_consistency", "niu_similarity", "abs_cosine", "otsu_threshold",
           "paired_permutation_test", "bimodality"]

Vectors = Union[Float[Tensor, "n d"], Float[Tensor, "n layer neuron"], Sequence[Attribution]]


class InsufficientDataError(KnlensError, ValueError):
    """Too few values (or values without any spread) for the statistic asked for."""


def _finite(values: Sequence[float] | np.ndarray, what: str, minimum: int) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(x).all():
        raise InsufficientDataError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite value(s)")
    if len(x) < minimum:
        raise InsufficientDataError(f"{what} needs at least {minimum} values, got {len(x)}")
    return x


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


def otsu_threshold(values: Sequence[float] | np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample: the cut between consecutive sorted values that maximises the
    between-class variance w₀·w₁·(μ₀ − μ₁)², returned as the midpoint of the cut (exact, no histogram).

    >>> otsu_threshold([0.0, 0.1, 1.0, 1.1])
    0.55
    """
    x = np.sort(_finite(values, "Otsu's threshold", 2))
    if x[0] == x[-1]:
        return float(x[0])
    n = len(x)
    csum = np.cumsum(x)
    k = np.arange(1, n)  # cut after k values
    cuts = x[k - 1] < x[k]  # only between distinct values
    w0, w1 = k / n, (n - k) / n
    mu0 = csum[k - 1] / k
    mu1 = (csum[-1] - csum[k - 1]) / (n - k)
    between = np.where(cuts, w0 * w1 * (mu0 - mu1) ** 2, -np.inf)
    i = int(np.argmax(between))
    return float((x[i] + x[i + 1]) / 2)


def paired_permutation_test(differences: Sequence[float] | np.ndarray, *, n_permutations: int = 10000,
                            seed: int = 0) -> dict[str, Any]:
    """Two-sided sign-flip permutation test of ``mean(differences) == 0`` (one difference per unit, e.g. fact).

    Under the null each difference is as likely positive as negative. All ``2ⁿ`` sign patterns are
    enumerated when there are at most ``n_permutations`` of them (an exact p-value); otherwise
    ``n_permutations`` random patterns give p = (1 + #as extreme) / (1 + n_permutations). ``p_floor`` is the
    smallest p-value the test can reach with these n (0.0625 for n = 5: fewer units cannot be significant
    at 0.05).

    >>> r = paired_permutation_test([1.0, -1.0, 1.0, -1.0])
    >>> r["mean"], r["p"]
    (0.0, 1.0)
    """
    d = _finite(differences, "the paired permutation test", 1)
    if n_permutations < 1:
        raise InsufficientDataError(f"n_permutations must be at least 1, got {n_permutations}")
    n = len(d)
    observed = abs(d.mean())
    if 2 ** n <= n_permutations:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        extreme = np.abs(signs @ d / n) >= observed - 1e-12
        p, floor, exact = float(extreme.mean()), 2.0 / 2 ** n, True
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_permutations, n))
        extreme = np.abs(signs @ d / n) >= observed - 1e-12
        p, floor, exact = float((1 + extreme.sum()) / (1 + n_permutations)), 1.0 / (1 + n_permutations), False
    return {"n": n, "mean": float(d.mean()), "share_positive": float((d > 0).mean()), "p": p, "p_floor": floor,
            "exact": exact}


def _kde_modes(x: np.ndarray, h: float, points: int = 1024) -> int:
    """Number of local maxima of the Gaussian kernel density estimate of ``x`` with bandwidth ``h``."""
    grid = np.linspace(x.min() - 3 * h, x.max() + 3 * h, points)
    dens = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / h) ** 2).sum(1)
    inner = dens[1:-1]
    return int(((inner > dens[:-2]) & (inner >= dens[2:])).sum())


def _critical_bandwidth(x: np.ndarray) -> float:
    """The smallest bandwidth at which the Gaussian KDE of ``x`` has one mode (bisection; the number of
    modes of a Gaussian KDE never grows with the bandwidth)."""
    lo, hi = 0.0, float(np.ptp(x))
    while _kde_modes(x, hi) > 1:  # pragma: no cover - one mode at h = range for any sample
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid > 0 and _kde_modes(x, mid) <= 1:
            hi = mid
        else:
            lo = mid
    return hi


def bimodality(values: Sequence[float] | np.ndarray, *, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Silverman's (1981) bandwidth test of unimodality: is one mode enough for this 1-D sample?

    ``h_crit`` is the smallest Gaussian-kernel bandwidth at which the density estimate has a single mode;
    a sample with two well-separated groups needs a large ``h_crit`` to merge them. ``n_boot``
    smoothed-bootstrap samples are drawn from that one-mode estimate (rescaled to the sample's variance);
    p = (1 + #{estimates at ``h_crit`` with more than one mode}) / (1 + n_boot), and a small ``p`` rejects
    unimodality. The test is conservative (its level is below the nominal one), which makes a rejection
    credible and a non-rejection weak evidence of unimodality with few values.

    A two-component Gaussian mixture compared by BIC was the other candidate; on a skewed one-mode sample
    (exponential, n = 40) it prefers two components, so it checks normality, not the number of modes.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> two = np.concatenate([rng.normal(0.2, 0.05, 30), rng.normal(0.8, 0.05, 30)])
    >>> bimodality(two)["p"] < 0.05
    True
    """
    x = _finite(values, "the bimodality check", 4)
    if n_boot < 1:
        raise InsufficientDataError(f"n_boot must be at least 1, got {n_boot}")
    sd = float(x.std(ddof=1))
    if sd == 0:
        raise InsufficientDataError("the bimodality check needs values with some spread; all are equal")
    n = len(x)
    h = _critical_bandwidth(x)
    rng = np.random.default_rng(seed)
    shrink = 1.0 / np.sqrt(1.0 + h ** 2 / sd ** 2)
    more = 0
    for _ in range(n_boot):
        y = x[rng.integers(0, n, n)] + h * rng.standard_normal(n)
        y = x.mean() + (y - x.mean()) * shrink
        more += _kde_modes(y, h) > 1
    return {"n": n, "h_crit": h, "p": float((1 + more) / (1 + n_boot)), "n_boot": n_boot}
