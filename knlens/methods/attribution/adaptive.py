"""Adaptive integration: prompts whose completeness error is above a tolerance are integrated again with
more Gauss–Legendre nodes, up to a budget.

Completeness is checked per prompt: the relative error Σ_l |Σ_i IG_i^l − Δ_l| / Σ_l |Δ_l| of
:attr:`~knlens.Attribution.relative_completeness_error`. A prompt above ``tolerance`` after the first pass
(the grid and steps asked for) is recomputed on Gauss–Legendre nodes — the rule of :mod:`.grids` that
converges fastest (benchmarks/RESULTS.md) — with the same number of nodes, then twice as many, and so on
up to ``max_steps``; the pass with the smallest error is kept. Its grid and steps are the ones recorded in
the result's settings, ``settings.refinement`` lists every pass and its error, and a
:class:`~knlens.core.errors.CompletenessWarning` names each prompt still above the tolerance at the end.

Why the first grid is not simply refined: on Gemma-3 a post-MLP RMSNorm makes P(target) constant along
the path except for α ≲ 0.01, where all of Δ happens; uniform grids (right, left, ...) put almost no node
there (relative error 0.37 with 160 right-Riemann steps), Gauss–Legendre clusters nodes at the ends.

>>> refinements("right", 20, 128)
[20, 40, 80, 128]
>>> refinements("gauss-legendre", 16, 128)
[32, 64, 128]
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

from knlens.core.errors import CompletenessWarning, SettingsError
from knlens.methods.attribution.result import Attribution

__all__ = ["DEFAULT_TOLERANCE", "DEFAULT_MAX_STEPS", "REFINE_GRID", "check_budget", "describe", "refinements",
           "refine"]

DEFAULT_TOLERANCE = 0.05
"""Relative completeness error accepted without refinement (see benchmarks/RESULTS.md, adaptive integration)."""

DEFAULT_MAX_STEPS = 128
"""Most Gauss–Legendre nodes a prompt is refined to."""

REFINE_GRID = "gauss-legendre"


def check_budget(tolerance: float | None, max_steps: int) -> None:
    """Raise :class:`~knlens.core.errors.SettingsError` unless ``tolerance`` is None or positive and
    ``max_steps`` a positive integer.

    >>> check_budget(0.05, 128)
    >>> check_budget(-1.0, 128)
    Traceback (most recent call last):
    ...
    knlens.core.errors.SettingsError: tolerance must be a positive number or None (a fixed grid), got -1.0
    """
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise SettingsError(f"tolerance must be a positive number or None (a fixed grid), got {tolerance!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise SettingsError(f"max_steps must be a positive integer, got {max_steps!r}")


def refinements(grid: str, steps: int, max_steps: int) -> list[int]:
    """Gauss–Legendre node counts tried after a first pass of ``steps`` points of ``grid``: ``steps``
    (unless the first pass was Gauss–Legendre already), doubling, the last one ``max_steps``."""
    done = steps if grid == REFINE_GRID else 0
    counts: list[int] = []
    m = max(steps, 1) * (2 if grid == REFINE_GRID else 1)
    while m < max_steps:
        counts.append(m)
        m *= 2
    if max_steps > max(counts[-1] if counts else 0, done):
        counts.append(max_steps)
    return counts


def _label(a: Attribution) -> str:
    return f"{a.settings.grid} {a.settings.steps}: {a.relative_completeness_error:.3g}"


def refine(first: Sequence[Attribution], rerun: Callable[[list[int], int], list[Attribution]],
           tolerance: float, max_steps: int) -> list[Attribution]:
    """Refine the attributions ``first`` (one per prompt, from one grid) whose relative completeness error
    is above ``tolerance``: ``rerun(indices, m)`` integrates those prompts again on ``m`` Gauss–Legendre
    nodes. Returns one attribution per prompt, the one with the smallest error, its settings recording
    the tolerance and every pass (``settings.refinement``). Warns (:class:`CompletenessWarning`) for the
    prompts still above the tolerance after ``max_steps`` nodes.

    >>> from knlens import attribute, load_model
    >>> model, prompt = load_model("tiny-llama"), "the capital of france is"
    >>> first = attribute(model, [prompt], " paris", steps=2, tolerance=None)
    >>> rerun = lambda idx, m: attribute(model, [prompt], " paris", steps=m, grid="gauss-legendre", tolerance=None)
    >>> [a.settings.refinement for a in refine(first, rerun, tolerance=0.05, max_steps=16)]
    ['right 2: 0.4... -> gauss-legendre 2: 0.007...']
    """
    best = list(first)
    passes = [[_label(a)] for a in first]
    s = first[0].settings
    for m in refinements(s.grid, s.steps, max_steps):
        pending = [i for i, a in enumerate(best) if a.relative_completeness_error > tolerance]
        if not pending:
            break
        for i, a in zip(pending, rerun(pending, m)):
            passes[i].append(_label(a))
            if a.relative_completeness_error < best[i].relative_completeness_error:
                best[i] = a
    out = [dataclasses.replace(a, settings=dataclasses.replace(a.settings, tolerance=tolerance, max_steps=max_steps,
                                                                 refinement=" -> ".join(p)))
           for a, p in zip(best, passes)]
    for a in out:
        if a.relative_completeness_error > tolerance:
            warnings.warn(
                f"integrated gradients of {a.prompt!r} -> {a.target!r}: relative completeness error "
                f"{a.relative_completeness_error:.3g} is above the tolerance {tolerance:g} after "
                f"{a.settings.refinement} (max_steps={max_steps}); its scores are not reliable: raise max_steps",
                CompletenessWarning, stacklevel=3)
    return out


def describe(attributions: Sequence[Attribution]) -> str:
    """One line on how ``attributions`` (one call of :func:`~knlens.attribute`) were integrated: the first
    grid, the refinement rule, the grid and steps each prompt ended on, and how many are still above the
    tolerance — what ``knlens locate`` prints and reports.

    >>> from knlens import attribute, load_model
    >>> attrs = attribute(load_model("tiny-llama"), ["the capital of france is"], " paris", steps=2)
    >>> describe(attrs)
    'right 2, refined on Gauss-Legendre nodes (up to 128) where the relative completeness error > 0.05: ... (1 prompt)'
    >>> describe(attribute(load_model("tiny-llama"), ["the capital of france is"], " paris", steps=2, tolerance=None))
    'fixed grid: right 2 (1 prompt)'
    """
    ended: dict[str, int] = {}
    for a in attributions:
        key = f"{a.settings.grid} {a.settings.steps}"
        ended[key] = ended.get(key, 0) + 1
    where = ", ".join(f"{k} ({n} prompt{'s' if n > 1 else ''})" for k, n in ended.items())
    s = attributions[0].settings
    if s.tolerance is None:
        return f"fixed grid: {where}"
    first = s.refinement.split(":", 1)[0]
    text = (f"{first}, refined on Gauss-Legendre nodes (up to {s.max_steps}) where the relative completeness "
            f"error > {s.tolerance:g}: ended on {where}")
    above = sum(a.relative_completeness_error > s.tolerance for a in attributions)
    if above:
        text += f"; {above} prompt{'s' if above > 1 else ''} still above the tolerance (scores not reliable)"
    return text
