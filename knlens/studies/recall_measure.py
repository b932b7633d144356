"""One two-hop question through the recall study's instruments (docs/methods.md, factual recall in reasoning):

1. **locate** the first hop's knowledge neurons: integrated gradients of its answered prompts (target o₁), Dai's
   coarse sets (score ≥ 0.2 × the prompt's maximum) refined to the neurons coarse in ≥ 70 % of the prompts (no
   minimum count, so one or two prompts can be refined: their intersection), the ``fallback_k`` best neurons by
   mean score when refinement keeps none;
2. **random sets**: ``n_random`` sets matched on activation magnitude (:func:`~knlens.methods.controls.matched_control`,
   |activation| at the first hop's target averaged over its prompts), each with its own single-hop reference;
3. **recall**: the peak recall score (:mod:`knlens.methods.recall`) of each set over the two-hop question, over the
   chain of thought (at the step that emits the bridge, and after it), over the question preceded by a false
   first hop (the conflict prompt; positions of the question only), and over another question of the chain (a
   subject and bridge the set has no fact for);
4. **answers** under each condition — none, and enhance ×2 / suppress ×0 of each set at every position, also at
   every generated step of the chain of thought (:mod:`knlens.methods.recall_answers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.data.two_hop import TwoHop
from knlens.methods.attribution.ig import attribute
from knlens.methods.controls import matched_control
from knlens.methods.generation_hooks import scaling_hooks
from knlens.methods.recall import recall_profile, recalled, reference_levels
from knlens.methods.recall_answers import answer, conflict_prompt, cot_answer
from knlens.methods.selection import best_by_mean, coarse, refine
from knlens.run.engine import activations_at
from knlens.run.hooks import hook_name

__all__ = ["Located", "locate_first_hop", "matched_sets", "recall_rows", "answer_rows", "ACTIONS"]

ACTIONS = {"enhance": 2.0, "suppress": 0.0}


@dataclass(frozen=True)
class Located:
    """The first hop's neurons of a question, how they were chosen, and the prompts they were located on."""

    neurons: NeuronSet
    selection: str
    hop: Fact


def locate_first_hop(model: Any, hop: Fact, *, steps: int = 8, fallback_k: int = 5) -> Located:
    """IG (Gauss–Legendre, ``steps`` nodes) of ``hop``'s prompts, coarse (t = 0.2) and refined (p = 0.7, no minimum
    count) sets, or the ``fallback_k`` best by mean score."""
    attrs = attribute(model, hop, steps=steps, grid="gauss-legendre", tolerance=None)
    refined = refine([coarse(a, 0.2) for a in attrs], 0.7, min_count=1)
    if len(refined):
        return Located(refined, "refined", hop)
    return Located(best_by_mean(attrs, fallback_k), f"top {fallback_k} by mean score", hop)


def matched_sets(model: Any, loc: Located, n_random: int, seed: int) -> list[NeuronSet]:
    """``n_random`` random sets matched on |activation| at the hop's target position, averaged over its prompts."""
    q = encode(model, list(loc.hop.prompts), loc.hop.target)
    names = [hook_name(layer) for layer in range(model.cfg.n_layers)]
    acts = activations_at(model, q, names)
    magnitude = torch.stack([acts[n].float().cpu() for n in names], dim=1).abs().mean(0)
    return [matched_control(loc.neurons, magnitude, seed=seed + d) for d in range(n_random)]


def _peaks(model: Any, neurons: NeuronSet, hop: Fact, texts: dict[str, tuple[str, int]]) -> dict[str, float]:
    ref = reference_levels(model, hop, neurons)
    return {name: recall_profile(model, text, neurons, ref).peak(start) for name, (text, start) in texts.items()}


def recall_rows(model: Any, q: TwoHop, loc: Located, randoms: Sequence[NeuronSet], cot_prompt: str, false: TwoHop,
                threshold: float) -> list[dict[str, Any]]:
    """The peak recall score of the knowledge set and of each random set over the question (``question``), the
    chain of thought ``cot_prompt`` at the bridge-emitting step (``cot emit``) and after it (``cot after``), the
    conflict prompt's question part (``conflict``) and another question of the chain, with another subject and
    bridge (``other question``: how much the set fires on a question it has no fact for); one row per set, with
    ``recalled`` by the rule and ``recalled, specific`` (recalled, and above its peak on the other question)."""
    n_first = model.to_tokens(q.hop1.prompts[0]).shape[1]
    conflict, prefix = conflict_prompt(q, false.bridge)
    texts = {"question": (q.question, 0), "cot emit": (q.hop1.prompts[0], n_first - 1), "cot after": (cot_prompt, n_first),
             "conflict": (conflict, model.to_tokens(prefix).shape[1]), "other question": (false.question, 0)}
    rows = []
    for kind, draw, s in [("knowledge", -1, loc.neurons), *[("matched", d, r) for d, r in enumerate(randoms)]]:
        peaks = _peaks(model, s, loc.hop, texts)
        rows.append({"question": q.name, "chain": "->".join(q.chain), "neurons": kind, "draw": draw,
                     "n_neurons": len(s), **{f"peak {k}": v for k, v in peaks.items()},
                     "recalled": recalled(peaks["question"], threshold),
                     "recalled, specific": recalled(peaks["question"], threshold)
                     and peaks["question"] > peaks["other question"],
                     "recalled in conflict": recalled(peaks["conflict"], threshold)})
    return rows


def answer_rows(model: Any, q: TwoHop, loc: Located, randoms: Sequence[NeuronSet], *, bridge_tokens: int,
                false: TwoHop) -> tuple[list[dict[str, Any]], str]:
    """Accuracy and P(o₂) of the question without and with the chain of thought under each condition (none;
    enhance / suppress of the knowledge set and of each random set), the conflict prompt's answer (no
    intervention: P and correctness of the true o₂ and of the false bridge's o₂); and the unhooked CoT prompt."""
    conditions = [("none", "none", -1, NeuronSet())]
    conditions += [(a, kind, d, s) for a in ACTIONS
                   for kind, d, s in [("knowledge", -1, loc.neurons), *[("matched", d, r) for d, r in enumerate(randoms)]]]
    rows, plain_cot = [], ""
    for action, kind, draw, s in conditions:
        hooks = [] if action == "none" else scaling_hooks(s, ACTIONS[action])
        direct = answer(model, q.question, q.answer, hooks)
        cot = cot_answer(model, q, hooks, bridge_tokens=bridge_tokens)
        plain_cot = cot.prompt if action == "none" else plain_cot
        base = {"question": q.name, "chain": "->".join(q.chain), "action": action, "neurons": kind, "draw": draw}
        rows.append({**base, "cot": False, "p": direct.p, "correct": direct.correct, "bridge correct": float("nan")})
        rows.append({**base, "cot": True, "p": cot.answer.p, "correct": cot.answer.correct,
                     "bridge correct": float(cot.bridge_correct), "bridge": cot.bridge})
    conflict, _ = conflict_prompt(q, false.bridge)
    true, wrong = answer(model, conflict, q.answer), answer(model, conflict, false.answer)
    rows.append({"question": q.name, "chain": "->".join(q.chain), "action": "conflict", "neurons": "none", "draw": -1,
                 "cot": False, "p": true.p, "correct": true.correct, "p false": wrong.p, "false answered": wrong.correct,
                 "bridge": false.bridge.strip()})
    return rows, plain_cot
