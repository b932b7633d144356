"""The multilingual study (Chen et al., AAAI 2024; Cao et al., 2024; docs/methods.md, the multilingual study):
one fact in many languages — which neurons it shares across them, what those do, and how to select them.

On the facts of :func:`~knlens.studies.multilingual_facts.select_facts` (known in every chosen language):

1. **attribute** (until ``locate_share`` of the budget left is spent, at most ``max_facts`` facts) — IG (or AMIG)
   of each fact's first ``attribute_prompts`` answered prompts in every language (:func:`~knlens.methods.multilingual.likn.attribute_languages`);
2. **LIKN** — each language's neurons (coarse ≥ ``threshold`` × max in more than ``p`` of its prompts), their
   intersection (language-independent, LIKN) and remainders (language-specific): sizes, overlap of language
   pairs, layer distribution (:func:`~knlens.methods.multilingual.likn.language_neurons`);
3. **suppression** — suppress (×0) and enhance (×2) each fact's LIKN set in every language's prompts beside
   random sets of the same layers (uniform and activation-matched)
   (:func:`~knlens.methods.multilingual.likn.likn_effects`);
4. **MATRICE vs intersection** — stability of both selections when each language keeps a random half of its
   queries, and the causal effect of the sets selected without one language on that held-out language
   (:mod:`knlens.methods.multilingual.matrice`);
5. **degenerate pairs** — among a language's top ``degenerate_top`` neurons, pairs whose single suppression lowers
   P by < 20 % but whose joint suppression lowers it by > 25 %, for ``degenerate_facts`` facts;
6. **specific sets** — each language's specific set suppressed and enhanced in every language;
7. **cross-lingual edits** — each of ``edit_facts`` facts edited in each language through its LIKN set (KN update)
   and through MEMLA, judged in every language (reliability, generality, locality)
   (:mod:`knlens.studies.multilingual_edits`).

After the attribution, the held-out comparison may use a quarter of the time left; the degenerate pairs start
while a fifth of what is left then has not passed, the specific sets take source languages while 30 % of the rest
has not; the edits, the slowest phase, take edit languages until the budget ends. A phase cut short is named in the
``notes`` table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.versions import environment
from knlens.data.multilingual import MultilingualFact
from knlens.methods.multilingual.degenerate import DegeneratePairs
from knlens.methods.multilingual.edit_matrix_result import EditMatrix
from knlens.methods.multilingual.likn import attribute_languages, effects_by_language, language_neurons, likn_effects
from knlens.methods.multilingual.likn_result import LanguageAttributions, LanguageNeurons
from knlens.methods.multilingual.matrice import heldout_language_effects, resample_stability
from knlens.results.study import StudyResult
from knlens.studies.multilingual_edits import degenerate_within, edit_matrix_within
from knlens.studies.multilingual_facts import MultilingualSettings, select_facts, shorten

__all__ = ["MultilingualStudy", "multilingual_study", "attribute_within", "TABLES"]

TABLES = ("filters", "counts", "facts", "likn_sizes", "overlap", "layers", "likn_effects", "specific_effects",
          "stability", "heldout", "degenerate", "edit_matrix", "edit_skips", "edit_sizes", "notes")
_EFFECT_COLUMNS = ["action", "knowledge_relative", "random_relative", "matched_relative", "p_empirical",
                   "p_empirical_matched", "p_empirical_floor", "n_facts", "facts_without_set"]


@dataclass(frozen=True, eq=False)
class MultilingualStudy(StudyResult):
    """Every table of the study by name (:data:`TABLES`), the language neurons of the attributed facts, the edit
    matrix and degenerate pairs (None when their phase did not run; ``notes`` says why), single numbers, timings
    and versions."""

    study = "multilingual"
    frame_table = "likn_effects"  # to_frame(): the LIKN sets' suppress / enhance effect per language beside the random controls
    settings: MultilingualSettings
    numbers: dict[str, float]
    neurons: LanguageNeurons | None = None
    edits: EditMatrix | None = None
    degenerate: DegeneratePairs | None = None

    def plot(self) -> Any:
        """Language × layer heatmap of the neurons (:meth:`LanguageNeurons.plot`)."""
        if self.neurons is None:
            raise InsufficientDataError("no fact was attributed: no neurons to plot")
        return self.neurons.plot()


def _merge(parts: Sequence[LanguageAttributions]) -> LanguageAttributions:
    first = parts[0]
    return LanguageAttributions(tuple(m for p in parts for m in p.facts), first.languages,
                                {k: v for p in parts for k, v in p.by_fact.items()}, first.method, first.steps,
                                first.grid, first.hook_point, first.model)


def attribute_within(model: Any, facts: Sequence[MultilingualFact], s: MultilingualSettings, deadline: float,
                     say: Callable[[str], None] = lambda _: None) -> tuple[LanguageAttributions, pd.DataFrame]:
    """Attribute ``facts`` one by one in every language until ``deadline`` (a ``time.time()``; the next fact is
    started only when the mean time of one fits) or ``max_facts``; the attributions and one row per fact."""
    parts, rows = [], []
    for m in (shorten(m, s.attribute_prompts) for m in facts):
        mean = sum(r["seconds"] for r in rows) / len(rows) if rows else 0.0
        if parts and (len(parts) >= s.max_facts or time.time() + mean > deadline):
            break
        t = time.time()
        parts.append(attribute_languages(model, [m], attribution=s.attribution, scaling=s.scaling, steps=s.steps,
                                         grid=s.grid))  # type: ignore[arg-type]
        errors = [a.relative_completeness_error for by_lang in parts[-1].by_fact.values() for attrs in by_lang.values()
                  for a in attrs]
        rows.append({"fact": m.key, "relation": m.relation, "subject": m[s.languages[0]].subject,
                     "target": m[s.languages[0]].target,
                     **{f"prompts_{l}": len(m[l].prompts) for l in s.languages}, "seconds": time.time() - t,
                     # AMIG in the authors' scaling has no completeness property: its "error" is no check
                     "completeness error (median)": float(np.median(errors))
                     if s.attribution == "ig" or s.scaling == "textbook" else float("nan")})
        say(f"attributed {len(parts)} facts ({m.key}, {rows[-1]['seconds']:.0f} s)")
    if not parts:
        raise InsufficientDataError(f"no fact is known in all of {', '.join(s.languages)}: nothing to attribute "
                                    f"(see the filter counts; try fewer languages or more candidates)")
    return _merge(parts), pd.DataFrame(rows)


def _effects(result: Any, neurons: LanguageNeurons, **extra: Any) -> pd.DataFrame:
    table = effects_by_language(result, neurons)
    return table[["language", *_EFFECT_COLUMNS]].assign(**extra)


def _specific_effects(model: Any, facts: Sequence[MultilingualFact], neurons: LanguageNeurons,
                      s: MultilingualSettings, deadline: float) -> tuple[pd.DataFrame, str]:
    """Each language's specific sets suppressed and enhanced in every language (rows: ``source``, ``language``),
    source languages in order while the time lasts; and a note naming those left out."""
    out: list[pd.DataFrame] = []
    for i, source in enumerate(neurons.languages):
        if time.time() > deadline:
            return (pd.concat(out, ignore_index=True) if out else pd.DataFrame(),
                    f"specific sets of {', '.join(neurons.languages[i:])} not measured: the budget ran out")
        try:
            res = likn_effects(model, facts, neurons, which="specific", source=source, n_random=s.n_random,
                               seed=s.seed)
        except SettingsError:  # every fact's specific set is empty in this language: counted, not measured
            out.append(pd.DataFrame([{"source": source, "n_facts": 0, "facts_without_set": len(facts)}]))
            continue
        out.append(_effects(res, neurons, source=source))
    table = pd.concat(out, ignore_index=True)
    return table[["source", *[c for c in table.columns if c != "source"]]], ""


def _stability(attrs: LanguageAttributions, s: MultilingualSettings) -> pd.DataFrame:
    """Per selection (intersection, MATRICE uniform, MATRICE confidence-weighted): mean Jaccard stability over
    the resamplable facts, mean set size, share of empty resamples."""
    rows = []
    for weighting in ("uniform", "confidence"):
        st = resample_stability(attrs, n_resamples=s.n_resamples, seed=s.seed, k=s.k, threshold=s.threshold, p=s.p,
                                weighting=weighting)  # type: ignore[arg-type]
        st["method"] = st["method"].replace({"matrice": f"matrice ({weighting})"})
        rows.append(st if weighting == "uniform" else st[st.method != "intersection"])
    st = pd.concat(rows, ignore_index=True)
    g = st.groupby("method", sort=False)
    out = pd.DataFrame({"stability": g["stability"].mean(), "stability_min": g["stability"].min(),
                        "mean_size": g["mean_size"].mean(), "empty_share": g["empty"].sum() / (g.size() * s.n_resamples),
                        "n_facts": g["stability"].count(), "facts_not_resamplable": g["stability"].apply(
                            lambda x: int(x.isna().sum()))})
    return out.reset_index()


def _heldout(model: Any, facts: Sequence[MultilingualFact], attrs: LanguageAttributions,
             s: MultilingualSettings, deadline: float, say: Callable[[str], None]) -> pd.DataFrame:
    """MATRICE (uniform) and intersection selected without each held-out language, measured on it."""
    if len(attrs.languages) < 3:
        return pd.DataFrame()
    out = []
    for lang in s.held_out or attrs.languages:
        if out and time.time() > deadline:
            say(f"held-out comparison stopped before {lang}: the budget ran out")
            break
        t = heldout_language_effects(model, facts, attrs, lang, k=s.k, threshold=s.threshold, p=s.p,
                                     n_random=s.n_random, seed=s.seed)
        out.append(t.assign(held_out=lang))
    table = pd.concat(out, ignore_index=True)
    return table[["held_out", *[c for c in table.columns if c != "held_out"]]]


def _share(end: float, share: float) -> float:
    """The time (``time.time()``) when ``share`` of what is left until ``end`` has passed."""
    return time.time() + share * max(0.0, end - time.time())


def multilingual_study(model: Any, settings: MultilingualSettings = MultilingualSettings(), *,
                       data_dir: str | None = None, say: Callable[[str], None] = lambda _: None) -> MultilingualStudy:
    """Run the study on ``model`` (see the module): select facts from mParaRel, then attribute and measure while the
    budget lasts."""
    s, t0 = settings, time.time()
    end = t0 + 60 * s.budget_minutes
    known, filters, counts = select_facts(model, s, data_dir, say)
    timings = {"filter": time.time() - t0}
    attrs, facts_table = attribute_within(model, known, s, time.time() + s.locate_share * (end - time.time()), say)
    facts = list(attrs.facts)
    timings["attribute"] = time.time() - t0 - timings["filter"]
    attributed = facts_table.groupby("relation").size()
    filters = pd.concat([filters, pd.DataFrame([{"relation": r, "filter": "attributed", "facts": int(attributed.get(r, 0))}
                                                for r in s.relations])], ignore_index=True)
    neurons = language_neurons(model, facts, threshold=s.threshold, p=s.p, attributions=attrs)
    t = time.time()
    tables: dict[str, pd.DataFrame] = {"filters": filters, "counts": counts, "facts": facts_table,
                                       "likn_sizes": neurons.summary(), "overlap": neurons.overlap(),
                                       "layers": neurons.layer_stats()}
    if any(len(neurons.independent(m.key)) for m in facts):
        res = likn_effects(model, facts, neurons, n_random=s.n_random, seed=s.seed)
        tables["likn_effects"] = _effects(res, neurons)
    else:
        tables["likn_effects"] = pd.DataFrame(columns=["language", *_EFFECT_COLUMNS])
    timings["suppression"] = time.time() - t
    t = time.time()
    tables["stability"] = _stability(attrs, s)
    tables["heldout"] = _heldout(model, facts, attrs, s, _share(end, 0.25), say)
    timings["matrice"] = time.time() - t
    t = time.time()
    degenerate, deg_note = degenerate_within(model, facts, attrs, s, _share(end, 0.2), say)
    tables["degenerate"] = degenerate.summary() if degenerate is not None else pd.DataFrame()
    timings["degenerate"] = time.time() - t
    t = time.time()
    tables["specific_effects"], spec_note = _specific_effects(model, facts, neurons, s, _share(end, 0.3))
    timings["specific"] = time.time() - t
    t = time.time()
    edits, edit_note = edit_matrix_within(model, facts, neurons, s, end, say)
    tables["edit_matrix"] = edits.to_frame() if edits is not None else pd.DataFrame()
    tables["edit_skips"] = edits.skip_counts().rename_axis(columns=None) if edits is not None else pd.DataFrame()
    tables["edit_sizes"] = edits.edits if edits is not None else pd.DataFrame()
    timings["edits"] = time.time() - t
    tables["notes"] = pd.DataFrame({"note": [n for n in (edit_note, deg_note, spec_note) if n]}, dtype=str)
    sizes = neurons.sizes
    numbers = {"facts_known_in_all": float(len(known)), "facts_attributed": float(len(facts)),
               "mean_neurons": float(sizes.n_neurons.mean()),
               "mean_independent": float(sizes.groupby("fact").n_independent.first().mean()),
               "facts_without_independent": float((sizes.groupby("fact").n_independent.first() == 0).sum()),
               "mean_seconds_per_fact": float(facts_table.seconds.mean())}
    timings["total"] = time.time() - t0
    return MultilingualStudy(s, tables, numbers, neurons, edits, degenerate, timings=timings,
                             versions=environment())
