"""Two-hop questions from ParaRel: facts (s, r₁, o₁) and (o₁, r₂, o₂) chained on the bridge entity o₁
(Wang et al., EMNLP 2024; docs/methods.md, factual recall in reasoning).

ParaRel's tuples carry labels, not Wikidata URIs, so a chain joins a first-hop object to a second-hop subject
on the exact label. A bridge that is the subject of several second-hop facts with different objects (a city
that is the capital of two regions) is ambiguous and dropped. Each chain of :data:`CHAINS` has one
hand-written template for the composed question, ``[X]`` the subject, cut right before o₂:

========  =======  ===================================================================
first     second   composed question
========  =======  ===================================================================
P17       P36      The capital of the country where [X] is located is
P27       P36      The capital of the country of citizenship of [X] is
P495      P36      The capital of the country where [X] was created is
P131      P36      The capital of the region where [X] is located is
P1001     P36      The capital of the country where [X] is a legal term is
P19       P1376    The city where [X] was born is the capital of
P20       P1376    The city where [X] died is the capital of
P937      P1376    The city where [X] worked is the capital of
P17       P30      The country where [X] is located is on the continent of
P27       P30      The country of citizenship of [X] is on the continent of
P1376     P30      The country whose capital is [X] is on the continent of
P36       P30      The capital of [X] is on the continent of
========  =======  ===================================================================

The single hops are the two ParaRel facts (their own templates), and the chain-of-thought prompt states the
first hop and then asks the second: ``"{hop-1 prompt} {o₁}. {hop-2 prompt about o₁}"``, where o₁ is what the
model itself generates (:mod:`knlens.methods.recall`).

>>> from knlens.core.facts import Fact
>>> first = [Fact(["Eibenstock is located in"], " Germany", subject="Eibenstock", relation="P17", name="a")]
>>> second = [Fact(["The capital of Germany is"], " Berlin", subject="Germany", relation="P36", name="b")]
>>> q = compose(first, second, ("P17", "P36"))[0]
>>> q.question, q.answer, q.cot_prompt(" Germany")
('The capital of the country where Eibenstock is located is', ' Berlin', 'Eibenstock is located in Germany. The capital of Germany is')
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from knlens.core.errors import NoChainError
from knlens.core.facts import Fact
from knlens.data.pararel import load_pararel

__all__ = ["CHAINS", "TwoHop", "compose", "chains_in", "two_hop_questions"]

Chain = tuple[str, str]

CHAINS: dict[Chain, str] = {
    ("P17", "P36"): "The capital of the country where [X] is located is",
    ("P27", "P36"): "The capital of the country of citizenship of [X] is",
    ("P495", "P36"): "The capital of the country where [X] was created is",
    ("P131", "P36"): "The capital of the region where [X] is located is",
    ("P1001", "P36"): "The capital of the country where [X] is a legal term is",
    ("P19", "P1376"): "The city where [X] was born is the capital of",
    ("P20", "P1376"): "The city where [X] died is the capital of",
    ("P937", "P1376"): "The city where [X] worked is the capital of",
    ("P17", "P30"): "The country where [X] is located is on the continent of",
    ("P27", "P30"): "The country of citizenship of [X] is on the continent of",
    ("P1376", "P30"): "The country whose capital is [X] is on the continent of",
    ("P36", "P30"): "The capital of [X] is on the continent of",
}
"""The chains (first relation, second relation) with their composed-question template."""


@dataclass(frozen=True)
class TwoHop:
    """One two-hop question: ``hop1`` asks o₁ (``bridge``) of ``subject``, ``hop2`` asks o₂ (``answer``) of o₁,
    ``question`` asks o₂ of ``subject`` directly. Targets carry their leading space."""

    name: str
    chain: Chain
    subject: str
    bridge: str
    answer: str
    question: str
    hop1: Fact
    hop2: Fact

    def cot_prompt(self, bridge: str, step: str = "") -> str:
        """The chain-of-thought prompt with ``bridge`` as the stated first hop: the first hop-1 prompt, the bridge,
        a period, then the first hop-2 prompt asked of that bridge (``step`` appended to it).

        >>> TwoHop("q", ("P19", "P1376"), "Ann", " Rome", " Italy", "The city where Ann was born is the capital of",
        ...        Fact(["Ann was born in"], " Rome", subject="Ann"),
        ...        Fact(["Rome is the capital of"], " Italy", subject="Rome")).cot_prompt(" Paris")
        'Ann was born in Paris. Paris is the capital of'
        """
        said = bridge.strip()
        second = self.hop2.prompts[0].replace(self.bridge.strip(), said)
        return f"{self.hop1.prompts[0]} {said}. {second}{step}"


def compose(first: Sequence[Fact], second: Sequence[Fact], chain: Chain) -> list[TwoHop]:
    """Every two-hop question of ``chain`` from facts of its first and second relation (``subject`` set on
    each): a first fact whose target (stripped) is the subject of exactly one second-hop object.

    Raises :class:`~knlens.core.errors.NoChainError` when ``chain`` has no template in :data:`CHAINS`.
    """
    if tuple(chain) not in CHAINS:
        raise NoChainError(f"no two-hop template joins {chain[0]} -> {chain[1]}; chains with one: "
                           f"{', '.join(f'{a}->{b}' for a, b in CHAINS)}")
    template = CHAINS[tuple(chain)]  # type: ignore[index]
    by_subject: dict[str, list[Fact]] = defaultdict(list)
    for fact in second:
        if fact.subject is not None:
            by_subject[fact.subject.strip()].append(fact)
    out = []
    for fact in first:
        hops = by_subject.get(fact.target.strip(), [])
        if fact.subject is None or len({h.target for h in hops}) != 1:
            continue  # no second hop, or an ambiguous one
        hop2 = hops[0]
        out.append(TwoHop(f"{fact.name}>{hop2.name}", (chain[0], chain[1]), fact.subject, fact.target, hop2.target,
                          template.replace("[X]", fact.subject), fact, hop2))
    return out


def chains_in(relations: Sequence[str]) -> list[Chain]:
    """The chains of :data:`CHAINS` whose two relations are both in ``relations``; raises
    :class:`~knlens.core.errors.NoChainError` naming them when there is none.

    >>> chains_in(["P17", "P36", "P30"])
    [('P17', 'P36'), ('P17', 'P30'), ('P36', 'P30')]
    """
    rels = {r.strip().upper() for r in relations}
    found = [c for c in CHAINS if c[0] in rels and c[1] in rels]
    if not found:
        raise NoChainError(f"the relations {', '.join(sorted(rels)) or '(none)'} form no two-hop chain; chains: "
                           f"{', '.join(f'{a}->{b}' for a, b in CHAINS)}")
    return found


def _ambiguous(first: Sequence[Fact], second: Sequence[Fact]) -> int:
    targets: dict[str, set[str]] = defaultdict(set)
    for f in second:
        targets[(f.subject or "").strip()].add(f.target)
    return sum(len(targets.get(f.target.strip(), ())) > 1 for f in first)


def two_hop_questions(relations: Sequence[str], data_dir: str | os.PathLike[str] | None = None, *,
                      max_per_chain: int | None = None, max_prompts: int = 4, seed: int = 0
                      ) -> tuple[list[TwoHop], list[dict[str, object]]]:
    """The two-hop questions of every chain among ``relations`` (ParaRel), and per chain the counts: ``joined``
    (first-hop facts whose object is a second-hop subject), ``ambiguous`` (dropped: several second-hop
    objects), ``questions`` and ``sampled`` (at most ``max_per_chain``, a random sample fixed by ``seed``).
    Each hop keeps its first ``max_prompts`` ParaRel prompts. A chain whose relations join on no bridge is
    counted with 0; when no chain joins at all, :class:`~knlens.core.errors.NoChainError` names the relations.
    """
    chains = chains_in(relations)
    facts = {r: load_pararel(r, data_dir, min_paraphrases=1) for r in dict.fromkeys(x for c in chains for x in c)}
    facts = {r: [Fact(f.prompts[:max_prompts], f.target, f.subject, f.relation, f.name) for f in fs]
             for r, fs in facts.items()}
    questions, counts = [], []
    for chain in chains:
        first, second = facts[chain[0]], facts[chain[1]]
        subjects = Counter((f.subject or "").strip() for f in second)
        joined = sum(f.target.strip() in subjects for f in first)
        made = compose(first, second, chain)
        n_made = len(made)
        if max_per_chain is not None and len(made) > max_per_chain:
            made = [made[i] for i in sorted(random.Random(seed).sample(range(len(made)), max_per_chain))]
        counts.append({"chain": f"{chain[0]}->{chain[1]}", "template": CHAINS[chain], "joined": joined,
                       "ambiguous": _ambiguous(first, second), "questions": n_made,
                       "sampled": len(made)})
        questions += made
    if not questions:
        raise NoChainError(f"the relations {', '.join(relations)} have chains with templates but no first-hop object "
                           f"is the subject of a second-hop fact in the data")
    return questions, counts
