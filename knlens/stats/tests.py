"""Statistical tests and the smallest p-values they can give.

* :func:`paired_permutation_test` — is the mean of paired differences zero? (sign flips, two-sided);
* :func:`empirical_floor`, :func:`wilcoxon_floor` — the smallest p-value of an empirical test with N random
  draws and of scipy's Wilcoxon signed-rank test on n pairs; :func:`floor_note` says in words what that means.

>>> paired_permutation_test([0.3, 0.2, 0.4, 0.1, 0.3])["p"]   # all 32 sign patterns: 2 as extreme
0.0625
>>> empirical_floor(50), wilcoxon_floor(4), wilcoxon_floor(4, alternative="greater")
(0.0196078431372549, 0.125, 0.0625)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from knlens.core.errors import InsufficientDataError
from knlens.stats.samples import finite

__all__ = ["paired_permutation_test", "paired_group_test", "empirical_floor", "wilcoxon_floor", "floor_note"]


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
    d = finite(differences, "the paired permutation test", 1)
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


def paired_group_test(frame: pd.DataFrame, a: str, b: str, value: str, *, by: str, unit: str = "fact",
                      n_permutations: int = 10000, seed: int = 0) -> dict[str, Any]:
    """:func:`paired_permutation_test` of rows ``by == a`` against rows ``by == b``, paired by ``unit``.

    Each unit contributes mean(value | a) − mean(value | b) over its rows; units lacking either group are
    left out. Returns ``comparison, value, n_units, mean_a, mean_b, difference, share_a_above_b, p, p_floor``.

    >>> f = pd.DataFrame({"fact": [1, 1, 2, 2], "set": ["x", "y", "x", "y"], "v": [0.5, 0.1, 0.4, 0.3]})
    >>> r = paired_group_test(f, "x", "y", "v", by="set")
    >>> r["n_units"], round(r["difference"], 3), r["p"]
    (2, 0.25, 0.5)
    """
    means = frame.groupby([unit, by])[value].mean().unstack(by)
    if a not in means or b not in means:
        raise InsufficientDataError(f"no rows with {by} = {a!r} or {b!r} to compare")
    d = (means[a] - means[b]).dropna()
    t = paired_permutation_test(d.to_numpy(), n_permutations=n_permutations, seed=seed)
    return {"comparison": f"{a} − {b}", "value": value, "n_units": t["n"], "mean_a": float(means.loc[d.index, a].mean()),
            "mean_b": float(means.loc[d.index, b].mean()), "difference": t["mean"],
            "share_a_above_b": t["share_positive"], "p": t["p"], "p_floor": t["p_floor"]}


def empirical_floor(n_draws: int) -> float:
    """The smallest empirical p-value ``(1 + k) / (1 + N)`` with ``N`` random draws: ``1 / (1 + N)``.

    >>> empirical_floor(19)
    0.05
    """
    return 1.0 / (1 + n_draws) if n_draws > 0 else float("nan")


def wilcoxon_floor(n: int, alternative: Literal["two-sided", "greater", "less"] = "two-sided") -> float:
    """The smallest p-value scipy's Wilcoxon signed-rank test gives on ``n`` pairs (all differences of one
    sign, distinct): computed by running the test on such a sample, so it follows scipy's method (exact
    for small ``n``). NaN for fewer than 2 pairs, where knlens does not run the test.

    >>> [wilcoxon_floor(n) for n in (3, 4, 5, 6)]
    [0.25, 0.125, 0.0625, 0.03125]
    """
    if n < 2:
        return float("nan")
    ranks = np.arange(1.0, n + 1)
    sample = ranks if alternative != "less" else -ranks
    return float(stats.wilcoxon(sample, alternative=alternative).pvalue)


def floor_note(p: float, floor: float, n: int, unit: str, alpha: float = 0.05) -> str:
    """Plain words on what a p-value can mean given its floor: ``""`` when nothing needs saying.

    >>> floor_note(0.125, 0.125, 4, "prompts")
    'cannot reach p < 0.05 with 4 prompts (smallest possible p = 0.125)'
    """
    if not math.isfinite(floor):
        return f"not computed with {n} {unit}"
    if floor >= alpha:
        return f"cannot reach p < {alpha:g} with {n} {unit} (smallest possible p = {floor:.3g})"
    if not math.isfinite(p):
        return "not computed: no difference to test"
    if math.isclose(p, floor, rel_tol=1e-9):
        return f"at its floor (the most extreme outcome possible with {n} {unit})"
    return ""
