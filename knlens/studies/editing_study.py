"""The editing study on ParaRel (docs/methods.md, the editing study): every editor on facts the model
knows, judged by every convention, with intervals over facts.

For each case of :mod:`knlens.studies.editing_cases` (in their interleaved order, while the time budget lasts):

1. **neurons** — integrated gradients on the fact's answered paraphrases; Dai's refined neurons (``dai`` preset),
   or the ``fallback_k`` neurons of highest mean attribution when refinement keeps none (recorded per fact);
2. **editors**, each built on the unedited model, applied, measured and undone
   (:func:`~knlens.methods.editing.evaluate.evaluate_edits`):

   * ``kn-update`` — Dai's update of those neurons' value slots (λ₁ = 1, λ₂ = 8);
   * ``kn-erase`` — the same slots set to zero (Dai's code);
   * ``kn-consistency-aware`` — Dai's update on the top ``k`` of mean − std of the paraphrases' normalised
     attributions (Chen et al.), ``k`` = the size of the ``kn-update`` set (equal set size);
   * ``random-kn`` — random neurons in the layers of the ``kn-update`` set, moved with its norm;
   * ``rank-one`` — the rank-one (ROME-style) edit of the edit prompt at one layer;
   * ``random-rank-one`` — ``control_neurons`` random neurons of that layer moved with the rank-one edit's norm;
3. **metrics** — reliability, generality, locality (EasyEdit agreement, gold accuracy, CounterFact NS),
   perplexity change, and ``reliability_old`` (is the old object still the answer to the edit prompt), each a
   mean over facts with a bootstrap interval; plus the rows of every function in :data:`EXTRA_CRITERIA`.

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
from knlens.methods.selection import best_by_mean, refined_neurons
from knlens.results.contract import Result
from knlens.studies.editing_cases import EditCase, EditingSettings, load_candidates, select_cases

__all__ = ["Criterion", "EXTRA_CRITERIA", "EditingEvaluation", "EditingStudy", "EDITORS", "editing_study",
           "run_cases"]

Criterion = Callable[[Any, EditCase, Mapping[str, Edit]], pd.DataFrame]
"""An extra criterion: given the model, a case and the edits made for it (by editor name; apply each with
``with edit.apply(model): ...``), one row per (editor, metric) with columns ``fact, editor, metric, convention,
before, after`` (``before``: the value on the unedited model)."""

EXTRA_CRITERIA: list[Criterion] = []
"""The hook for criteria beyond the field's (issue 11: bijective symmetry, synonymous invariance, entity versus
relation editing): every function here runs on every case, and its rows join the metrics table."""

EDITORS = ("kn-update", "kn-erase", "kn-consistency-aware", "random-kn", "rank-one", "random-rank-one")
_ROW_COLUMNS = ["fact", "editor", "metric", "convention", "before", "after"]


@dataclass(frozen=True, eq=False)
class EditingEvaluation(EditEvaluation):
    """An :class:`EditEvaluation` whose per-fact values also hold ``extra`` rows (the study's own metric and the
    :data:`EXTRA_CRITERIA`), so that metrics, tables and comparisons include them."""

    extra: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=_ROW_COLUMNS))

    def per_fact(self) -> pd.DataFrame:
        return pd.concat([super().per_fact(), self.extra[_ROW_COLUMNS]], ignore_index=True)


@dataclass(frozen=True, eq=False)
class EditingStudy(Result):
    """The study's evaluation (every prompt's raw quantities), the facts counted at each filter, each studied
    fact's neurons and edits, single numbers, timings and versions."""

    study = "editing"
    settings: EditingSettings
    evaluation: EditingEvaluation
    tables: dict[str, pd.DataFrame]
    numbers: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

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


def _neurons(model: Any, case: EditCase, s: EditingSettings) -> tuple[NeuronSet, NeuronSet, str]:
    """The KN set (refined, or the top mean), the consistency-aware set of its size, and how the KN set was made."""
    attrs = attribute(model, case.request.fact, steps=s.steps, grid="gauss-legendre", tolerance=None)
    kn, source = refined_neurons(attrs, "dai"), "refined"
    if not len(kn):
        kn, source = best_by_mean(attrs, s.fallback_k), f"top {s.fallback_k} mean"
    aware = equal_size_selections(attrs, len(kn), query=0)["consistency-aware"]
    return kn, aware, source


def _editors(kn: NeuronSet, aware: NeuronSet, layer: int, cov: Any, s: EditingSettings, seed: int) -> dict[str, Editor]:
    return {"kn-update": kn_update_editor(lambda r: kn), "kn-erase": kn_erase_editor(lambda r: kn, neutral="zero"),
            "kn-consistency-aware": kn_update_editor(lambda r: aware),
            "random-kn": random_editor("kn-update", seed=seed),
            "rank-one": rank_one_editor(layer=layer, steps=s.rank_one_steps, covariance=cov),
            "random-rank-one": random_editor("rank-one", n_neurons=s.control_neurons, seed=seed)}


def _kept(made: dict[str, Edit], name: str, editor: Editor) -> Editor:
    def wrapped(model: Any, request: Any, previous: Mapping[str, Edit]) -> Edit:
        made[name] = editor(model, request, previous)
        return made[name]
    return wrapped


def run_cases(model: Any, cases: Sequence[EditCase], settings: EditingSettings, *,
              criteria: Sequence[Criterion] | None = None, editors: Callable[..., dict[str, Editor]] | None = None,
              started: float | None = None, say: Callable[[str], None] = lambda _: None
              ) -> tuple[EditingEvaluation, pd.DataFrame]:
    """Locate, edit and judge ``cases`` in order until the budget (counted from ``started``) or ``max_facts`` is
    reached; the evaluation and one row per studied fact. ``editors(kn, aware, layer, cov, settings, seed)``
    replaces the study's editor set (tests); ``criteria`` defaults to :data:`EXTRA_CRITERIA`."""
    s, t0 = settings, time.time() if started is None else started
    criteria = EXTRA_CRITERIA if criteria is None else criteria
    layer = default_layer(model) if s.rank_one_layer is None else s.rank_one_layer
    cov = key_covariance(model, layer, n_texts=s.covariance_texts, seed=s.seed)
    texts = text_sample(s.n_text, part=1, seed=s.seed) if s.n_text > 0 else None
    parts, facts, extra, seconds = [], [], [], []
    for i, case in enumerate(cases):
        elapsed, mean = time.time() - t0, float(np.mean(seconds)) if seconds else 0.0
        if (s.max_facts is not None and len(facts) >= s.max_facts) or elapsed + mean > 60 * s.budget_minutes:
            say(f"stopping after {len(facts)} facts ({elapsed / 60:.1f} min; a fact takes {mean:.0f} s)")
            break
        t = time.time()
        request = case.request
        try:
            kn, aware, source = _neurons(model, case, s)
        except InsufficientDataError as err:
            facts.append({"fact": request.name, "relation": case.relation, "skipped": str(err)})
            continue
        made: dict[str, Edit] = {}
        chosen = (editors or _editors)(kn, aware, layer, cov, s, s.seed + i)
        ev = evaluate_edits(model, [request], {n: _kept(made, n, e) for n, e in chosen.items()}, text=texts,
                            n_text=0, seed=s.seed)
        parts.append(ev)
        extra += [_old_object_rows(ev)] + [c(model, case, made) for c in criteria]
        rank = made.get("rank-one")
        facts.append({"fact": request.name, "relation": case.relation, "edit prompt": request.fact.prompts[0],
                      "old": request.fact.target, "new": request.new_target, "prompts": len(request.fact.prompts),
                      "neighbours": len(request.neighbours), "neurons": " ".join(map(str, kn)), "n_neurons": len(kn),
                      "source": source, "layers": " ".join(str(l) for l in sorted({n.layer for n in kn})),
                      "consistency-aware": " ".join(map(str, aware)), "overlap": len(kn & aware),
                      "rank-one steps": rank.params["steps_run"] if rank else np.nan,
                      "rank-one final nll": rank.params["final_nll"] if rank else np.nan,
                      "seconds": time.time() - t, "skipped": ""})
        seconds.append(time.time() - t)
        say(f"{len(parts)} facts edited ({request.name}, {time.time() - t:.0f} s)")
    if not parts:
        raise InsufficientDataError("no fact was edited: the budget ran out first or every case was skipped")
    first = parts[0]
    ev = EditingEvaluation(pd.concat([p.frame for p in parts], ignore_index=True),
                           pd.concat([p.fluency for p in parts], ignore_index=True),
                           pd.concat([p.edits for p in parts], ignore_index=True),
                           facts=tuple(f for p in parts for f in p.facts), settings=first.settings,
                           extra=pd.concat(extra, ignore_index=True))
    return ev, pd.DataFrame(facts)


def _shared_neurons(facts: pd.DataFrame) -> float:
    """Share of the studied facts' KN neurons that another studied fact of the same relation also has (Dai et al.
    would call neurons of more than 10 % of a relation's facts generic and drop them before editing)."""
    done = facts[facts.skipped == ""]
    shared, total = 0, 0
    for _, g in done.groupby("relation"):
        sets = [set(x.split()) for x in g.neurons]
        for i, mine in enumerate(sets):
            others = set().union(*(sets[:i] + sets[i + 1:]))
            shared, total = shared + len(mine & others), total + len(mine)
    return shared / total if total else float("nan")


def editing_study(model: Any, settings: EditingSettings = EditingSettings(), *, data_dir: str | None = None,
                  criteria: Sequence[Criterion] | None = None, say: Callable[[str], None] = lambda _: None
                  ) -> EditingStudy:
    """Run the study on ``model`` (see the module): select cases from ParaRel, then edit while the budget lasts."""
    t0 = time.time()
    cases, counts = select_cases(model, load_candidates(settings, data_dir), settings, say)
    filtered = time.time() - t0
    ev, facts = run_cases(model, cases, settings, criteria=criteria, started=t0, say=say)
    done = facts[facts.skipped == ""]
    studied = done.groupby("relation").size()
    counts["studied"] = counts.relation.map(studied).fillna(0).astype(int)
    numbers = {"facts": float(len(done)), "cases": float(len(cases)), "skipped": float((facts.skipped != "").sum()),
               "refined": float((done.source == "refined").sum()), "mean_neurons": float(done.n_neurons.mean()),
               "shared_neurons": _shared_neurons(facts), "mean_seconds_per_fact": float(done.seconds.mean())}
    timings = {"filter": filtered, "total": time.time() - t0}
    return EditingStudy(settings, ev, {"counts": counts, "facts": facts}, numbers, timings, environment())
