"""Robustness of a fact to small perturbations of its query, with its degenerate neurons intact or suppressed
(Chen et al., 2024, the robustness property; docs/methods.md, robustness to typos).

A perturbed query is one of the fact's prompts with a **one-word typo**: in one word that is neither part of the
subject nor the prompt's last word (the word the answer follows), two adjacent inner letters are swapped
("The capital of France is" → "The cpaital of France is"); the typo changes the tokens of that one word. P is the
mean over prompts of P(whole target | prompt), read on the original and on the perturbed prompts under three
conditions: ``intact``, ``set_suppressed`` (the set given, the DKN set, at 0 at the target position) and
``random_suppressed`` (``n_random`` sets matched on layer and activation magnitude,
:func:`~knlens.methods.controls.matched_control`; their mean). ``retained`` = P(perturbed) / P(original): the
paper's claim is that the fact survives perturbation better with its DKNs intact.

>>> perturbations("The capital city of France is", "France", n=2, seed=0)
['The capiatl city of France is', 'The capital ctiy of France is']
"""

from __future__ import annotations

import random
from typing import Any

import pandas as pd
import torch

from knlens.core.errors import SettingsError
from knlens.core.facts import Fact
from knlens.core.neurons import NeuronSet
from knlens.core.tokens import encode
from knlens.methods.controls import matched_control
from knlens.methods.interventions import intervene, per_prompt
from knlens.run.engine import Engine, activations_at
from knlens.run.hooks import hook_name

__all__ = ["perturbations", "robustness", "CONDITIONS"]

CONDITIONS: tuple[str, ...] = ("intact", "set_suppressed", "random_suppressed")


def perturbations(prompt: str, subject: str | None = None, *, n: int = 3, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct one-word typos of ``prompt`` (see the module docstring); none when no word qualifies."""
    words = prompt.split(" ")
    skip = set((subject or "").split())
    eligible = [i for i, w in enumerate(words[:-1]) if len(w) >= 4 and w.isalpha() and w not in skip]
    options = [(i, j) for i in eligible for j in range(1, len(words[i]) - 2) if words[i][j] != words[i][j + 1]]
    rng = random.Random(seed)
    out: list[str] = []
    for i, j in rng.sample(options, len(options)):
        w = words[i]
        typo = " ".join([*words[:i], w[:j] + w[j + 1] + w[j] + w[j + 2:], *words[i + 1:]])
        if typo not in out:
            out.append(typo)
        if len(out) == n:
            break
    return out


def _magnitude(model: Any, fact: Fact) -> torch.Tensor:
    q = encode(model, list(fact.prompts), fact.target)
    names = [hook_name(l) for l in range(model.cfg.n_layers)]
    acts = activations_at(model, q, names)
    return torch.stack([acts[n].float().abs().mean(0).cpu() for n in names])


def robustness(model: Any, fact: Fact, dkn: NeuronSet, *, n_perturb: int = 3, n_random: int = 5, seed: int = 0,
               engine: Engine = "reference", batch_size: int = 64) -> pd.DataFrame:
    """One row per condition (``intact``, ``set_suppressed``, ``random_suppressed``) with ``p_original``,
    ``p_perturbed``, ``retained`` and ``n_perturbed`` (perturbed prompts read); empty when ``dkn`` is empty or no
    prompt has a word to perturb.

    >>> from knlens import load_model
    >>> m = load_model("tiny-llama")
    >>> fact = Fact(["the capital of france is"], " paris", subject="france")
    >>> robustness(m, fact, NeuronSet([(1, 3), (1, 7)]), n_random=2)["condition"].tolist()
    ['intact', 'set_suppressed', 'random_suppressed']
    """
    if n_perturb < 1 or n_random < 1:
        raise SettingsError(f"n_perturb and n_random must be at least 1, got {n_perturb}, {n_random}")
    columns = ["fact", "condition", "p_original", "p_perturbed", "retained", "n_perturbed"]
    typos = [t for k, p in enumerate(fact.prompts) for t in perturbations(p, fact.subject, n=n_perturb, seed=seed + k)]
    if not len(dkn) or not typos:
        return pd.DataFrame(columns=columns)
    dkn.check(model.cfg.n_layers, model.cfg.d_mlp)
    magnitude = _magnitude(model, fact)
    sets = [NeuronSet(), dkn, *[matched_control(dkn, magnitude, seed=seed + 100 + d) for d in range(n_random)]]
    p = {}
    for kind, prompts in (("original", list(fact.prompts)), ("perturbed", typos)):
        q = encode(model, prompts, fact.target)
        p[kind] = per_prompt(intervene(model, q, sets, 0.0, engine=engine, batch_size=batch_size).cpu(), q).mean(-1)
    rows = []
    for name, pick in zip(CONDITIONS, (slice(0, 1), slice(1, 2), slice(2, None))):
        orig, pert = float(p["original"][pick].mean()), float(p["perturbed"][pick].mean())
        rows.append({"fact": fact.name or fact.prompts[0], "condition": name, "p_original": orig, "p_perturbed": pert,
                     "retained": pert / orig if orig > 0 else float("nan"), "n_perturbed": len(typos)})
    return pd.DataFrame(rows, columns=columns)
