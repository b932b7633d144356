"""The editing study on ParaRel (docs/methods.md, the editing study): every editor on facts the model
knows, judged by every convention, with intervals over facts.

For the cases of :mod:`knlens.studies.editing_cases`, in their interleaved order:

1. **neurons** (phase 1, until ``locate_share`` of the budget left is spent) — integrated gradients on each fact's
   answered paraphrases; Dai's refined neurons (``dai`` preset), or the ``fallback_k`` neurons of highest mean
   attribution when refinement keeps none; a relation's **generic** neurons (in the sets of more than
   ``generic_share`` of its located facts, and of two at least) are removed, as Dai et al. do before editing
   (when nothing is left: the top ``fallback_k`` non-generic neurons by mean attribution);
2. **editors** (phase 2, while the budget lasts), each built on the unedited model, applied, measured and undone
   (:func:`~knlens.methods.editing.evaluate.evaluate_edits`):

   * ``kn-update`` — Dai's update of those neurons' value slots (λ₁ = 1, λ₂ = 8);
   * ``kn-update-generic-kept`` — the same on the set before the generic neurons were removed;
   * ``kn-erase`` — the ``kn-update`` slots set to zero (Dai's code);
   * ``kn-consistency-aware`` — Dai's update on the top ``k`` non-generic neurons of mean − std of the
     paraphrases' normalised attributions (Chen et al.), ``k`` = the size of the ``kn-update`` set (equal size);
   * ``random-kn`` — random neurons in the layers of the ``kn-update`` set, moved with its norm;
   * ``rank-one`` — the rank-one (ROME-style) edit of the edit prompt at one layer, key at the subject's last token
     (the *entity* edit);
   * ``rank-one-relation`` — the same edit with the key at the relation's last token (Wei et al.'s *relation* edit);
   * ``random-rank-one`` — ``control_neurons`` random neurons of that layer moved with the rank-one edit's norm;
3. **metrics** — reliability, generality, locality (EasyEdit agreement, gold accuracy, CounterFact NS),
   perplexity change, ``reliability_old`` (is the old object still the answer to the edit prompt), and the
   criteria of :mod:`knlens.studies.editing_probes` (bijective symmetry, synonymous invariance, the relation
   question) on the cases whose relation defines them; each a mean over facts with a bootstrap interval. A
   criterion an editor does not define (:data:`NOT_DEFINED`) has no value, never a number.

An edit that does not change the weights raises :class:`~knlens.core.errors.NoOpEditError` (it is never a row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError
from knlens.core.neurons import NeuronSet
from knlens.core.versions import environment
from knlens.data.text import text_sample
from knlens.methods.attribution.ig import attribute
from knlens.methods.consistent_selection import equal_size_selections
from knlens.methods.editing.covariance import key_covariance
from knlens.methods.editing.edit import Edit
from knlens.methods.editing.editors import Editor, kn_erase_editor, kn_update_editor, random_editor, rank_one_editor
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.rank_one import default_layer
from knlens.methods.editing.result import EditEvaluation
from knlens.methods.selection import generic_neurons, refined_neurons
from knlens.results.study import StudyResult
from knlens.studies.editing_cases import EditCase, EditingSettings, load_candidates, select_cases
from knlens.studies.editing_probes import with_criteria

__all__ = ["EditingEvaluation", "EditingStudy", "EDITORS", "NOT_DEFINED", "editing_study", "run_cases"]

EDITORS = ("kn-update", "kn-update-generic-kept", "kn-erase", "kn-consistency-aware", "random-kn", "rank-one",
           "rank-one-relation", "random-rank-one")

_ERASE = "kn-erase writes no new object (it zeroes the value slots): see the old fact's fate, *_old"
NOT_DEFINED: dict[tuple[str, str], str] = {
    ("kn-erase", m): _ERASE for m in ("symmetry", "symmetry_pn", "synonym", "synonym_pn")}
"""(editor, metric) pairs the criterion does not define, and why: they get no value (the page says so)."""
_ROW_COLUMNS = ["fact", "editor", "metric", "convention", "before", "after"]


@dataclass(frozen=True, eq=False)
class EditingEvaluation(EditEvaluation):
    """An :class:`EditEvaluation` whose per-fact values also hold ``extra`` rows (the study's own metric), so that
    metrics, tables and comparisons include them, and leave out the pairs of :data:`NOT_DEFINED`."""

    extra: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=_ROW_COLUMNS))

    def per_fact(self) -> pd.DataFrame:
        p = pd.concat([super().per_fact(), self.extra[_ROW_COLUMNS]], ignore_index=True)
        undefined = pd.Series([(e, m) in NOT_DEFINED for e, m in zip(p.editor, p.metric)], index=p.index, dtype=bool)
        return p[~undefined].reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class EditingStudy(StudyResult):
    """The study's evaluation (every prompt's raw quantities), the facts counted at each filter, each studied
    fact's neurons and edits, single numbers, timings and versions."""

    study = "editing"
    settings: EditingSettings
    evaluation: EditingEvaluation
    numbers: dict[str, float]

    def to_frame(self) -> pd.DataFrame:
        """Editors × metrics: mean over facts, bootstrap interval, value before the edit."""
        return self.evaluation.metrics()

    def plot(self) -> Any:
        return self.evaluation.plot()


def _old_object_rows(ev: EditEvaluation) -> pd.DataFrame:
    """Per fact and editor: EasyEdit accuracy of the old object on the edit prompt, after and before."""
    f = ev.frame[ev.frame.group == "reliability"]
    g = f.groupby(["fact", "editor"], sort=False)[["acc_true_after", "acc_true_before"]].mean().reset_index()
    return g.rename(columns={"acc_true_after": "after", "acc_true_before": "before"}).assign(
        metric="reliability_old", convention="EasyEdit (old object)")[_ROW_COLUMNS]


@dataclass(frozen=True)
class _Located:
    """A case with its paraphrases' attributions and its KN set before generic neurons are removed."""

    case: EditCase
    attrs: Any  # the paraphrases' attributions (or their scores as one tensor)
    raw: NeuronSet
    refined: bool
    seconds: float
    skipped: str = ""  # why no KN set could be made


def _locate(model: Any, cases: Sequence[EditCase], s: EditingSettings, deadline: float,
            say: Callable[[str], None]) -> list[_Located]:
    """Phase 1: the cases' attributions and KN sets (Dai's refined set, else the top ``fallback_k`` by mean
    normalised attribution), in order, until ``deadline`` (a ``time.time()``) or ``max_located``."""
    out = []
    for case in cases:
        if out and (time.time() > deadline or (s.max_located is not None and len(out) >= s.max_located)):
            break
        t = time.time()
        attrs = attribute(model, case.request.fact, steps=s.steps, grid="gauss-legendre", tolerance=None)
        refined, skipped = refined_neurons(attrs, "dai"), ""
        try:
            raw = refined if len(refined) else equal_size_selections(attrs, s.fallback_k, query=0)["mean"]
        except InsufficientDataError as err:
            raw, skipped = NeuronSet(), str(err)
        out.append(_Located(case, attrs, raw, bool(len(refined)), time.time() - t, skipped))
    say(f"located {len(out)} of {len(cases)} facts")
    return out


def _generic(located: Sequence[_Located], share: float) -> tuple[dict[str, NeuronSet], pd.DataFrame]:
    """Per relation: the neurons in the KN sets of more than ``share`` of its located facts (and of two at least)."""
    generic, rows = {}, []
    for rel in dict.fromkeys(x.case.relation for x in located):
        sets = [x.raw for x in located if x.case.relation == rel and not x.skipped]
        if not sets:
            generic[rel] = NeuronSet()
            continue
        limit = max(share, 1.0 / len(sets))
        generic[rel] = generic_neurons(sets, max_share=limit)
        counts = pd.Series([str(n) for x in sets for n in x if n in generic[rel]]).value_counts()
        rows.append({"relation": rel, "located": len(sets), "generic if in more than": f"{limit * len(sets):.1f} facts",
                     "generic neurons": len(generic[rel]),
                     "most frequent": " ".join(f"{k} ({v})" for k, v in counts.head(5).items())})
    return generic, pd.DataFrame(rows, columns=["relation", "located", "generic if in more than", "generic neurons",
                                                "most frequent"])


def _sets(x: _Located, generic: NeuronSet, k: int) -> tuple[dict[str, NeuronSet], str]:
    """The editors' neuron sets: ``kn`` (refined minus generic, else the top ``k`` by mean normalised attribution
    among the non-generic), ``aware`` (consistency-aware, same size, non-generic) and ``raw`` (generic kept)."""
    if x.skipped:
        raise InsufficientDataError(x.skipped)
    kn = x.raw - generic if x.refined else NeuronSet()
    source = "refined" if len(kn) else f"top {k} mean"
    if not len(kn):
        kn = equal_size_selections(x.attrs, k, query=0, exclude=generic)["mean"]
    aware = equal_size_selections(x.attrs, len(kn), query=0, exclude=generic)["consistency-aware"]
    return {"kn": kn, "aware": aware, "raw": x.raw}, source


def _editors(sets: Mapping[str, NeuronSet], layer: int, cov: Any, s: EditingSettings, seed: int) -> dict[str, Editor]:
    kn, aware, raw = sets["kn"], sets["aware"], sets["raw"]
    return {"kn-update": kn_update_editor(lambda r: kn), "kn-update-generic-kept": kn_update_editor(lambda r: raw),
            "kn-erase": kn_erase_editor(lambda r: kn, neutral="zero"),
            "kn-consistency-aware": kn_update_editor(lambda r: aware),
            "random-kn": random_editor("kn-update", seed=seed),
            "rank-one": rank_one_editor(layer=layer, steps=s.rank_one_steps, covariance=cov),
            "rank-one-relation": rank_one_editor(layer=layer, steps=s.rank_one_steps, covariance=cov, key_at="relation"),
            "random-rank-one": random_editor("rank-one", n_neurons=s.control_neurons, seed=seed)}


def _kept(made: dict[str, Edit], name: str, editor: Editor) -> Editor:
    def wrapped(model: Any, request: Any, previous: Mapping[str, Edit]) -> Edit:
        made[name] = editor(model, request, previous)
        return made[name]
    return wrapped


def _fact_row(x: _Located, sets: Mapping[str, NeuronSet], source: str, made: Mapping[str, Edit]) -> dict[str, Any]:
    request, kn, rank = x.case.request, sets["kn"], made.get("rank-one")
    return {"fact": request.name, "relation": x.case.relation, "edit prompt": request.fact.prompts[0],
            "old": request.fact.target, "new": request.new_target, "prompts": len(request.fact.prompts),
            "neighbours": len(request.neighbours), "neurons": " ".join(map(str, kn)), "n_neurons": len(kn),
            "source": source, "layers": " ".join(str(l) for l in sorted({n.layer for n in kn})),
            "generic kept": " ".join(map(str, sets["raw"])), "generic removed": len(sets["raw"] - kn),
            "consistency-aware": " ".join(map(str, sets["aware"])), "overlap": len(kn & sets["aware"]),
            "rank-one steps": rank.params["steps_run"] if rank else np.nan,
            "rank-one final nll": rank.params["final_nll"] if rank else np.nan, "skipped": ""}


def run_cases(model: Any, cases: Sequence[EditCase], settings: EditingSettings, *,
              editors: Callable[..., dict[str, Editor]] | None = None, started: float | None = None,
              say: Callable[[str], None] = lambda _: None) -> tuple[EditingEvaluation, pd.DataFrame, pd.DataFrame]:
    """Locate ``cases`` (phase 1, ``locate_share`` of the budget left), find each relation's generic neurons among
    them, then edit and judge the located cases in order until the budget (counted from ``started``) or
    ``max_facts`` is reached. Returns the evaluation, one row per fact edited (or skipped) and the generic
    neurons per relation. ``editors(sets, layer, cov, settings, seed)`` replaces the study's editor set (tests).
    The cases' probes (:func:`~knlens.studies.editing_probes.with_criteria`) are read with every editor."""
    s, t0 = settings, time.time() if started is None else started
    layer = default_layer(model) if s.rank_one_layer is None else s.rank_one_layer
    cov = key_covariance(model, layer, n_texts=s.covariance_texts, seed=s.seed)
    texts = text_sample(s.n_text, part=1, seed=s.seed) if s.n_text > 0 else None
    left = 60 * s.budget_minutes - (time.time() - t0)
    located = _locate(model, cases, s, time.time() + s.locate_share * left, say)
    generic, generic_table = _generic(located, s.generic_share)
    parts, facts, extra, seconds = [], [], [], []
    for i, x in enumerate(located):
        elapsed, mean = time.time() - t0, float(np.mean(seconds)) if seconds else 0.0
        if (s.max_facts is not None and len(parts) >= s.max_facts) or elapsed + mean > 60 * s.budget_minutes:
            say(f"stopping after {len(parts)} facts ({elapsed / 60:.1f} min; an edited fact takes {mean:.0f} s)")
            break
        t, request = time.time(), x.case.request
        try:
            sets, source = _sets(x, generic[x.case.relation], s.fallback_k)
        except InsufficientDataError as err:
            facts.append({"fact": request.name, "relation": x.case.relation, "skipped": str(err)})
            continue
        made: dict[str, Edit] = {}
        chosen = (editors or _editors)(sets, layer, cov, s, s.seed + i)
        ev = evaluate_edits(model, [request], {n: _kept(made, n, e) for n, e in chosen.items()}, text=texts,
                            n_text=0, seed=s.seed)
        parts.append(ev)
        extra.append(_old_object_rows(ev))
        seconds.append(time.time() - t)
        facts.append({**_fact_row(x, sets, source, made), "seconds": x.seconds + seconds[-1]})
        say(f"{len(parts)} facts edited ({request.name}, {x.seconds + seconds[-1]:.0f} s)")
    if not parts:
        raise InsufficientDataError("no fact was edited: the budget ran out first or every case was skipped")
    first = parts[0]
    ev = EditingEvaluation(pd.concat([p.frame for p in parts], ignore_index=True),
                           pd.concat([p.fluency for p in parts], ignore_index=True),
                           pd.concat([p.edits for p in parts], ignore_index=True),
                           facts=tuple(f for p in parts for f in p.facts), settings=first.settings,
                           extra=pd.concat(extra, ignore_index=True))
    return ev, pd.DataFrame(facts), generic_table


def _shared_neurons(facts: pd.DataFrame) -> float:
    """Share of the edited facts' KN neurons before generic neurons are removed (``generic kept``) that another
    edited fact of the same relation also has."""
    done = facts[facts.skipped == ""]
    shared, total = 0, 0
    for _, g in done.groupby("relation"):
        sets = [set(x.split()) for x in g["generic kept"]]
        for i, mine in enumerate(sets):
            others = set().union(*(sets[:i] + sets[i + 1:]))
            shared, total = shared + len(mine & others), total + len(mine)
    return shared / total if total else float("nan")


def editing_study(model: Any, settings: EditingSettings = EditingSettings(), *, data_dir: str | None = None,
                  say: Callable[[str], None] = lambda _: None) -> EditingStudy:
    """Run the study on ``model`` (see the module): select cases from ParaRel, add the criteria's probes, then
    edit while the budget lasts."""
    t0 = time.time()
    cases, counts = select_cases(model, load_candidates(settings, data_dir), settings, say)
    cases, criteria = with_criteria(model, cases, data_dir=data_dir, max_templates=settings.max_prompts)
    filtered = time.time() - t0
    ev, facts, generic = run_cases(model, cases, settings, started=t0, say=say)
    done = facts[facts.skipped == ""]
    studied = done.groupby("relation").size()
    counts["located"] = counts.relation.map(generic.set_index("relation").located).fillna(0).astype(int)
    counts["studied"] = counts.relation.map(studied).fillna(0).astype(int)
    numbers = {"facts": float(len(done)), "cases": float(len(cases)), "skipped": float((facts.skipped != "").sum()),
               "located": float(generic.located.sum()),
               "refined": float((done.source == "refined").sum()), "mean_neurons": float(done.n_neurons.mean()),
               "shared_neurons": _shared_neurons(facts), "mean_seconds_per_fact": float(done.seconds.mean())}
    timings = {"filter": filtered, "total": time.time() - t0}
    criteria["studied"] = criteria.relation.map(studied).fillna(0).astype(int)
    return EditingStudy(settings, {"counts": counts, "facts": facts, "generic": generic, "criteria": criteria},
                        evaluation=ev, numbers=numbers, timings=timings, versions=environment())
