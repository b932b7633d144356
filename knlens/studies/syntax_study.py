"""The syntax study (Niu et al., ICLR 2024): do grammatical number and facts localise alike, and what does
suppressing or editing the "number neurons" do? (docs/methods.md, syntax and the KN thesis critique)

For each task of :mod:`knlens.studies.syntax_data` (determiner–noun and subject–verb number) and each number
(singular, plural), on disjoint random parts of the task's prompts:

1. **locate** — ``locate`` prompts, one pooled prompt set, Niu's search (:func:`~knlens.studies.syntax_locate.locate_prompt_set`);
2. **suppress** — zero the set at the last position on the located prompts and on ``heldout`` new prompts of
   both numbers; the change of the singular, plural and neutral word classes and of each prompt's grammatical
   and ungrammatical token, with a t-test and against random sets of the same layers (uniform and matched on
   activation magnitude), and how often the top prediction or the preferred number flips
   (:mod:`knlens.studies.syntax_effects`);
3. **edit** — Dai's KN update of the set's value slots, rewriting ``edits`` other prompts from their grammatical
   to their ungrammatical token (``generality`` more prompts with the same grammatical token as paraphrases,
   two prompts of the other task as neighbours), beside random neurons moved with the same norm
   (:func:`~knlens.methods.editing.evaluate.evaluate_edits`);

and, for the comparison, the same localisation and in-sample suppression on ``pararel_facts`` ParaRel facts the
model knows (each fact's answered paraphrases as its prompt set).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.facts import Fact
from knlens.core.versions import environment
from knlens.data.pararel import load_pararel
from knlens.data.text import text_sample
from knlens.methods.editing.editors import EditRequest, kn_update_editor, random_editor
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.known import known_facts
from knlens.results.study import StudyResult
from knlens.stats.intervals import bootstrap_ci
from knlens.studies.editing_cases import is_single_token
from knlens.studies.syntax_data import NUMBERS, TASKS, SyntaxItem, class_tokens, task_items
from knlens.studies.syntax_effects import Prompt, effect_tests, flip_rates, suppression_frame
from knlens.studies.syntax_locate import Localisation, locate_prompt_set

__all__ = ["SyntaxSettings", "SyntaxStudy", "syntax_study", "pararel_prompt_sets", "TABLES"]

TABLES = ("counts", "classes", "localisation", "neurons", "overlap", "suppression", "flips", "edits", "pararel_counts",
          "pararel", "comparison")


@dataclass(frozen=True)
class SyntaxSettings:
    """Sizes of the study (defaults: the run of ``benchmarks/SYNTAX.md``)."""

    model: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("determiner", "subject-verb")
    locate: int = 24  # prompts per (task, number) whose attributions are pooled
    heldout: int = 12  # new prompts per (task, number) for suppression
    edits: int = 6  # prompts per (task, number) rewritten by the KN editor
    generality: int = 2  # prompts with the same grammatical token as the edited one, as its paraphrases
    steps: int = 8  # Gauss–Legendre nodes of integrated gradients
    n_random: int = 6  # random sets per control
    subset: int = 4  # n of the similarity on random subsets (ParaRel facts have few paraphrases)
    n_text: int = 20  # sentences of the perplexity sample of the edits
    pararel_relations: tuple[str, ...] = ("P36", "P1376")
    pararel_candidates: int = 60  # ParaRel facts read per relation
    pararel_facts: int = 8  # known facts localised for the comparison
    pararel_min_prompts: int = 3
    pararel_max_prompts: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise SettingsError(f"unknown syntax task(s) {unknown or self.tasks}; choose from {sorted(TASKS)}")
        if min(self.locate, self.heldout, self.pararel_min_prompts, self.subset) < 2 or self.n_random < 1:
            raise SettingsError("locate, heldout, pararel_min_prompts and subset must be at least 2, n_random at least 1")


@dataclass(frozen=True, eq=False)
class SyntaxStudy(StudyResult):
    """Every table of the study by name (:data:`TABLES`), single numbers, timings and versions."""

    study = "syntax"
    frame_table = "comparison"  # to_frame(): the comparison of localisation metrics, syntax beside ParaRel facts
    settings: SyntaxSettings
    numbers: dict[str, float]

    def plot(self) -> Any:
        """Relative change of each word class when a set is suppressed, on held-out prompts of its own number."""
        import matplotlib.pyplot as plt

        s = self.tables["suppression"]
        s = s[s.prompts_of == "same number, held out"]
        fig, ax = plt.subplots(figsize=(6, 3))
        labels = [f"{t}\n{n}" for t, n in dict.fromkeys(zip(s.task, s.number))]
        for j, q in enumerate(dict.fromkeys(s.quantity)):
            part = s[s.quantity == q]
            ax.bar(np.arange(len(part)) + 0.15 * j, part.relative * 100, 0.15, label=q)
        ax.set_xticks(np.arange(len(labels)) + 0.3, labels, fontsize=8)
        ax.set_ylabel("relative change of P (%)")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _prompts(items: Sequence[SyntaxItem]) -> list[Prompt]:
    return [Prompt(i.name, i.number, i.prompt, i.good, i.bad) for i in items]


def _suppression(model: Any, loc: Localisation, located: list[Prompt], same: list[Prompt], other: list[Prompt],
                 classes: dict[str, list[int]], s: SyntaxSettings, seed: int) -> tuple[list[dict], pd.DataFrame]:
    """Effect tests per part of the prompts and quantity, and flip rates per part."""
    parts = {"same number, located on": located, "same number, held out": same, "other number, held out": other}
    prompts = [p._replace(name=f"{part}|{p.name}", context=part) for part, ps in parts.items() for p in ps]
    frame = suppression_frame(model, prompts, loc.neurons, classes, loc.magnitude, n_random=s.n_random, seed=seed)
    tests, flips = [], []
    for part in parts:
        sub = frame[frame.context == part]
        tests += [{"prompts_of": part, **effect_tests(sub, q)} for q in [*classes, "good", "bad"]]
        flips.append(flip_rates(sub).assign(prompts_of=part))
    return tests, pd.concat(flips, ignore_index=True)


def _edit_requests(items: list[SyntaxItem], pool: list[SyntaxItem], neighbours: list[Prompt],
                   s: SyntaxSettings) -> list[EditRequest]:
    """Each item rewritten to its ungrammatical token; paraphrases: pool prompts with the same grammatical token."""
    out = []
    for item in items:
        same = [p.prompt for p in pool if p.good == item.good and p.prompt != item.prompt][:s.generality]
        near = tuple(Fact([n.prompt], n.good, name=n.name) for n in neighbours)
        out.append(EditRequest(Fact([item.prompt, *same], item.good, name=item.name), item.bad, near))
    return out


def pararel_prompt_sets(model: Any, s: SyntaxSettings, data_dir: str | None = None
                        ) -> tuple[list[list[Prompt]], pd.DataFrame]:
    """Known ParaRel facts (answered on ≥ ``pararel_min_prompts`` paraphrases; those kept, at most
    ``pararel_max_prompts``), interleaved across relations, as prompt sets; and per relation the counts."""
    groups, counts = [], []
    for rel in s.pararel_relations:
        read = load_pararel(rel, data_dir=data_dir, min_paraphrases=s.pararel_min_prompts,
                            max_facts=s.pararel_candidates, seed=s.seed)
        known = known_facts(model, read, keep_prompts="correct", min_prompts=s.pararel_min_prompts)
        known = [f for f in known if is_single_token(model, f.target)]
        groups.append([[Prompt(f"{f.name}#{i}", f.name or "", p, f.target) for i, p in
                        enumerate(f.prompts[:s.pararel_max_prompts])] for f in known])
        counts.append({"relation": rel, "read": len(read), "known, single-token object": len(known)})
    sets = [g for row in itertools.zip_longest(*groups) for g in row if g is not None][:s.pararel_facts]
    return sets, pd.DataFrame(counts)


def _pararel(model: Any, s: SyntaxSettings, data_dir: str | None, say: Callable[[str], None]
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    sets, counts = pararel_prompt_sets(model, s, data_dir)
    rows = []
    for i, prompts in enumerate(sets):
        loc = locate_prompt_set(model, prompts, steps=s.steps, subset=s.subset, seed=s.seed)
        row = {"fact": prompts[0].context, "prompt": prompts[0].prompt, "target": prompts[0].good, **loc.summary}
        if len(loc.neurons):
            frame = suppression_frame(model, prompts, loc.neurons, {}, loc.magnitude, n_random=s.n_random,
                                      seed=s.seed + i)
            t = effect_tests(frame, "good")
            row.update({"relative": t["relative"], "matched relative": t["matched_change"] / t["p_before"],
                        "significant": t["significant"]})
        rows.append(row)
        say(f"ParaRel fact {i + 1}/{len(sets)}: {row['fact']} ({loc.summary['neurons']} neurons)")
    counts["localised"] = [sum(r["fact"].startswith(f"{rel}-") for r in rows) for rel in counts.relation]
    return pd.DataFrame(rows), counts


def _cell(values: pd.Series, seed: int) -> str:
    v = values.dropna().astype(float)
    if not len(v):
        return "—"
    low, high = bootstrap_ci(v.to_numpy(), seed=seed)
    return f"{v.mean():.3g}" + (f" [{low:.3g}, {high:.3g}]" if np.isfinite(low) else "")


def _comparison(loc: pd.DataFrame, supp: pd.DataFrame, facts: pd.DataFrame, s: SyntaxSettings) -> pd.DataFrame:
    """Localisation metrics of each syntax set beside the ParaRel facts' (mean [bootstrap CI] over facts)."""
    sim = f"similarity (n={s.subset})"
    good = supp[(supp.quantity == "good") & (supp.prompts_of == "same number, located on")].set_index(["task", "number"])
    rows = []
    for r in loc.to_dict("records"):
        g = good.loc[(r["task"], r["number"])] if (r["task"], r["number"]) in good.index else None
        rows.append({"prompt set": f"{r['task']} {r['number']}", "sets": 1, "prompts": f"{r['prompts']}",
                     "neurons": f"{r['neurons']}", "in 2-5": str(r["in 2-5"]), "mean layer": f"{r['mean layer']:.3g}",
                     "similarity (all prompts)": f"{r['similarity']:.3g}", sim: f"{r[sim]:.3g}",
                     "relative ΔP(target), suppressed": "—" if g is None else f"{g['relative']:.3g}",
                     "matched random": "—" if g is None else f"{g['matched_change'] / g['p_before']:.3g}"})
    if len(facts):
        rows.append({"prompt set": "ParaRel facts", "sets": len(facts), "prompts": _cell(facts.prompts, s.seed),
                     "neurons": _cell(facts.neurons, s.seed), "in 2-5": f"{facts['in 2-5'].mean():.0%}",
                     "mean layer": _cell(facts["mean layer"], s.seed),
                     "similarity (all prompts)": _cell(facts.similarity, s.seed), sim: _cell(facts[sim], s.seed),
                     "relative ΔP(target), suppressed": _cell(facts.get("relative", pd.Series(dtype=float)), s.seed),
                     "matched random": _cell(facts.get("matched relative", pd.Series(dtype=float)), s.seed)})
    return pd.DataFrame(rows)


def _overlap(sets: dict[tuple[str, str], Any]) -> pd.DataFrame:
    return pd.DataFrame([{"a": " ".join(a), "b": " ".join(b), "a neurons": len(sets[a]), "b neurons": len(sets[b]),
                          "shared": len(sets[a] & sets[b]), "jaccard": sets[a].jaccard(sets[b])}
                         for a, b in itertools.combinations(sets, 2)])


def syntax_study(model: Any, settings: SyntaxSettings = SyntaxSettings(), *, data_dir: str | None = None,
                 items: Mapping[str, Mapping[str, list[SyntaxItem]]] | None = None,
                 say: Callable[[str], None] = lambda _: None) -> SyntaxStudy:
    """Run the study on ``model`` (see the module) and return every table. ``items`` (task -> number -> prompts)
    replaces the BLiMP prompts (e.g. hand-written ones a tiny test model can read)."""
    s, t0, times = settings, time.time(), {}
    need = s.locate + s.heldout + s.edits
    by_task, counts, classes, class_rows = {}, [], {}, []
    for task in s.tasks:
        if items is None:
            by_task[task], c = task_items(model, task, data_dir, seed=s.seed)
        else:
            by_task[task] = {n: list(items[task][n]) for n in NUMBERS}
            c = {"read": sum(map(len, by_task[task].values())), "given": True}
        counts.append({"task": task, "phenomenon": TASKS[task], **c,
                       **{f"used ({n})": min(len(by_task[task][n]), need) for n in NUMBERS}})
        classes[task], words = class_tokens(model, task)
        class_rows.append(words)
        short = [n for n in NUMBERS if len(by_task[task][n]) < s.locate + s.heldout]
        if short:
            raise InsufficientDataError(f"{task}: too few {short[0]} prompts ({len(by_task[task][short[0]])}) for "
                                        f"locate + heldout = {s.locate + s.heldout}")
    texts = text_sample(s.n_text, part=1, seed=s.seed) if s.n_text else None
    locs, sets, supp, flips, edits, neurons = [], {}, [], [], [], []
    for k, (task, number) in enumerate(itertools.product(s.tasks, NUMBERS)):
        t = time.time()
        mine, other = by_task[task][number], by_task[task][NUMBERS[1 - NUMBERS.index(number)]]
        located = _prompts(mine[:s.locate])
        loc = locate_prompt_set(model, located, steps=s.steps, subset=s.subset, seed=s.seed)
        sets[(task, number)] = loc.neurons
        locs.append({"task": task, "number": number, **loc.summary, "neurons list": " ".join(map(str, loc.neurons))})
        neurons += [{"task": task, "number": number, **r} for r in loc.neuron_rows]
        say(f"{task} {number}: {len(loc.neurons)} neurons {' '.join(map(str, loc.neurons))} ({time.time() - t:.0f} s)")
        if not len(loc.neurons):
            continue
        held = slice(s.locate, s.locate + s.heldout)
        tests, fl = _suppression(model, loc, located, _prompts(mine[held]), _prompts(other[held]), classes[task], s,
                                 s.seed + 1000 * k)
        supp += [{"task": task, "number": number, **r} for r in tests]
        flips.append(fl.assign(task=task, number=number))
        other_task = [x for x in s.tasks if x != task]
        near = _prompts(by_task[other_task[0]][number][:2]) if other_task else _prompts(other[:2])
        pool = mine[s.locate + s.heldout + s.edits:] + mine[:s.locate]
        requests = _edit_requests(mine[s.locate + s.heldout:need], pool, near, s)
        if requests:
            ev = evaluate_edits(model, requests, {"kn-update": kn_update_editor(lambda r: loc.neurons),
                                                  "random-kn": random_editor("kn-update", seed=s.seed + k)},
                                text=texts, n_text=0, seed=s.seed)
            edits.append(ev.metrics().assign(task=task, number=number, facts=len(requests)))
        times[f"{task} {number}"] = time.time() - t
    t = time.time()
    facts, pcounts = _pararel(model, s, data_dir, say) if s.pararel_facts else (pd.DataFrame(), pd.DataFrame())
    times["pararel"] = time.time() - t
    loc_frame, supp_frame = pd.DataFrame(locs), pd.DataFrame(supp)
    tables = {"counts": pd.DataFrame(counts), "classes": pd.concat(class_rows, ignore_index=True),
              "localisation": loc_frame, "neurons": pd.DataFrame(neurons), "overlap": _overlap(sets),
              "suppression": supp_frame, "flips": pd.concat(flips, ignore_index=True) if flips else pd.DataFrame(),
              "edits": pd.concat(edits, ignore_index=True) if edits else pd.DataFrame(), "pararel": facts,
              "pararel_counts": pcounts, "comparison": _comparison(loc_frame, supp_frame, facts, s)}
    times["total"] = time.time() - t0
    numbers = {"significant": float(supp_frame.significant.sum()) if len(supp_frame) else 0.0,
               "tests": float(len(supp_frame)), "pararel_facts": float(len(facts))}
    return SyntaxStudy(s, tables, numbers, timings=times, versions=environment())
