"""One table of every test ``locate`` runs, each with the smallest p-value it could give and a note when
it cannot reach significance.

Rows come from the in-sample interventions (neurons selected and measured on the same prompts), the
held-out ones (:mod:`knlens.methods.heldout`) and the specificity control (:mod:`knlens.methods.specificity`):

* ``p_empirical`` — one-sided, in the expected direction (down for suppress, up for enhance), against a
  random control's draws: ``(1 + k) / (1 + N)``, floor ``1 / (1 + N)``;
* ``p_wilcoxon`` — two-sided Wilcoxon signed-rank test, paired over prompts (held out: over folds), of the
  knowledge set's relative change against the control's mean; with 4 pairs it cannot go below 0.125;
* ``p_specific`` — one-sided, the share of other relations' facts moved at least as much as the fact itself.

>>> from knlens import load_model, Fact, NeuronSet, measure
>>> model = load_model("tiny-llama")
>>> iv = measure(model, [Fact(["the capital of france is", "the capital city of france is"], " paris")],
...              [NeuronSet([(1, 3)])], n_random=3)
>>> t = significance_table(iv)
>>> bool(t.loc[t.test.str.startswith("p_wilcoxon"), "note"].str.startswith("cannot reach").all())
True
"""

from __future__ import annotations

import pandas as pd

from knlens.stats.tests import floor_note
from knlens.methods.heldout import HeldOut
from knlens.methods.interventions import InterventionResult
from knlens.methods.specificity import Specificity

__all__ = ["significance_table", "ALPHA"]

ALPHA = 0.05  # the level the notes refer to
_CONTROL_LABEL = {"uniform": "vs uniform random sets", "matched": "vs magnitude-matched random sets"}


def _intervention_rows(evaluation: str, iv: InterventionResult, pair_unit: str) -> list[dict]:
    tests = iv.tests(by="prompt")
    rows = []
    for t in tests.itertuples(index=False):
        t = t._asdict()
        kn, factor = t["knowledge_relative"], iv.settings.actions[t["action"]]
        wrong_way = (kn > 0) if factor < 1 else (kn < 0)
        other_way = f"the tested set moves P(target) the other way ({100 * kn:+.1f} %)" if wrong_way else ""
        for control in iv.settings.controls:
            tag = "" if control == "uniform" else f"_{control}"
            p_emp, p_w = t[f"p_empirical{tag}"], t[f"p_wilcoxon{tag}"]
            n_draws, n_pairs = int(t["n_random_draws"]), int(t["n_pairs"])
            rows.append({"evaluation": evaluation, "action": t["action"], "comparison": _CONTROL_LABEL[control],
                         "test": "p_empirical (one-sided)", "n": n_draws, "p": p_emp,
                         "p_floor": t["p_empirical_floor"],
                         "note": other_way or floor_note(p_emp, t["p_empirical_floor"], n_draws, "random draws", ALPHA)})
            rows.append({"evaluation": evaluation, "action": t["action"], "comparison": _CONTROL_LABEL[control],
                         "test": f"p_wilcoxon (two-sided, over {pair_unit})", "n": n_pairs, "p": p_w,
                         "p_floor": t["p_wilcoxon_floor"],
                         "note": floor_note(p_w, t["p_wilcoxon_floor"], n_pairs, pair_unit, ALPHA)})
    return rows


def significance_table(in_sample: InterventionResult, held: HeldOut | None = None,
                       spec: Specificity | None = None) -> pd.DataFrame:
    """Columns ``evaluation, action, comparison, test, n, p, p_floor, note`` (``note`` is empty when the
    test could reach p < 0.05, did not sit at its floor, and the effect went the expected way)."""
    rows = _intervention_rows("in-sample", in_sample, "prompts")
    if held is not None:
        rows += _intervention_rows("held-out", held.interventions, "held-out prompts")
    if spec is not None:
        for t in spec.summary().itertuples(index=False):
            rows.append({"evaluation": "specificity", "action": t.action, "comparison": "vs other relations' facts",
                         "test": "p_specific (one-sided)", "n": int(t.n_facts), "p": t.p_specific,
                         "p_floor": t.p_specific_floor,
                         "note": floor_note(t.p_specific, t.p_specific_floor, int(t.n_facts), "other facts", ALPHA)})
    return pd.DataFrame(rows, columns=["evaluation", "action", "comparison", "test", "n", "p", "p_floor", "note"])
