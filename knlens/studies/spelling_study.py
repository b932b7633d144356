"""The spelling-out study (Hiraoka & Inui, "Spelling-out is not Straightforward"; docs/methods.md, spelling-out):
is a token's spelling in its embedding, or rebuilt in the middle layers?

1. **tokens** — the tokenizer's spellable entries (:func:`~knlens.methods.spelling.spellable_tokens`), a random
   sample of ``words`` of them (seed);
2. **reads** — one forward per word's few-shot spelling prompt (:func:`~knlens.methods.spelling.read_spelling`): the
   model's teacher-forced accuracy per character index, the attention from the step emitting each character back
   to the source token by layer, and the features of the probes;
3. **probes** — per (embedding or layer, character index) a 26-way logistic-regression probe on token-disjoint
   train/test splits with a control task (:mod:`knlens.methods.probes`), and the breakthrough layer;
4. **character neurons** — integrated gradients with the spelled character as the target, on ``neuron_words``
   words per character index that the model spells right there (:func:`~knlens.methods.spelling.character_facts`).

Each step is skipped (and said so) when the budget would be overrun before it starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from knlens.core.errors import InsufficientDataError, SettingsError
from knlens.core.versions import environment
from knlens.methods.attribution.ig import attribute_facts
from knlens.methods.probes import MIN_PER_CLASS, breakthrough, probe_table
from knlens.methods.spelling import (DEFAULT_SHOTS, MIN_CHARS, SpellingReads, character_facts, read_spelling,
                                     spellable_tokens)
from knlens.results.study import StudyResult
from knlens.stats.intervals import bootstrap_ci

__all__ = ["SpellingSettings", "SpellingStudy", "spelling_study", "neuron_tables", "TABLES"]

READ_SHARE = 0.5  # share of the budget the reads may use

TABLES = ("counts", "accuracy", "probes", "breakthrough", "attention", "neurons", "neuron_layers", "skipped")


@dataclass(frozen=True)
class SpellingSettings:
    """Sizes of the study (defaults: the run of ``benchmarks/SPELLING.md``)."""

    model: str = "smollm2-135m"
    words: int = 1000  # spellable tokens sampled
    given: tuple[str, ...] = ()  # words to spell instead of a sample of the vocabulary
    n_chars: int = 5  # characters read per word (k = 0 .. n_chars - 1)
    min_chars: int = MIN_CHARS
    shots: tuple[str, ...] = DEFAULT_SHOTS
    test_share: float = 0.25
    min_per_class: int = MIN_PER_CLASS
    neuron_words: int = 6  # words per character index attributed
    steps: int = 8  # Gauss-Legendre nodes of integrated gradients
    top: int = 20  # a word's top neurons (for the share of words holding a neuron)
    budget_minutes: float = 15.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.words < 2 or not 1 <= self.n_chars <= self.min_chars:
            raise SettingsError(f"words must be at least 2 and n_chars in [1, min_chars = {self.min_chars}]")
        if self.neuron_words < 0 or self.steps < 1 or self.top < 1 or self.budget_minutes <= 0:
            raise SettingsError("neuron_words >= 0, steps >= 1, top >= 1 and a positive budget_minutes are needed")


@dataclass(frozen=True, eq=False)
class SpellingStudy(StudyResult):
    """Every table of the study by name (:data:`TABLES`), timings, notes (steps skipped) and versions."""

    study = "spelling"
    settings: SpellingSettings
    notes: tuple[str, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """Probe accuracy by feature (rows) and character index (columns)."""
        p = self.tables["probes"]
        return p.pivot_table(index=["feature_index", "feature"], columns="k", values="accuracy").reset_index()

    def plot(self) -> Any:
        """Probe accuracy and control accuracy by layer, one line per character index."""
        import matplotlib.pyplot as plt

        p = self.tables["probes"]
        fig, ax = plt.subplots(figsize=(6, 3))
        for k, part in p.groupby("k"):
            line, = ax.plot(part.feature_index, part.accuracy, label=f"character {k + 1}")
            ax.plot(part.feature_index, part.control, ls=":", color=line.get_color())
        ax.set_xlabel("feature (0 = embedding, l + 1 = after layer l)")
        ax.set_ylabel("probe accuracy (dotted: control)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def neuron_tables(attributions: dict[int, list[Any]], top: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per character index ``k`` (``attributions[k]``: one attribution per word): the neurons with the highest mean
    score over words, with the share of words holding each in their own top ``top``; and the share of the positive
    attribution per layer (mean over words)."""
    rows, layers = [], []
    for k, attrs in attributions.items():
        if not attrs:
            continue
        scores = torch.stack([a.scores for a in attrs])  # [word, layer, neuron]
        mean = scores.mean(0)
        d = mean.shape[1]
        own = [set(a.top(top)) for a in attrs]
        for i in mean.flatten().topk(5).indices.tolist():
            neuron = (attrs[0].layers[i // d], i % d)
            rows.append({"k": k, "neuron": f"L{neuron[0]}.N{neuron[1]}", "mean score": float(mean.flatten()[i]),
                         f"share of words with it in their top {top}": float(np.mean([neuron in s for s in own])),
                         "words": len(attrs)})
        pos = scores.clamp_min(0).sum(2)
        share = (pos / pos.sum(1, keepdim=True).clamp_min(1e-12)).mean(0)
        layers += [{"k": k, "layer": attrs[0].layers[l], "share of positive attribution": float(share[l])}
                   for l in range(len(share))]
    return pd.DataFrame(rows), pd.DataFrame(layers)


def _accuracy(reads: Any) -> pd.DataFrame:
    rows = []
    for k in range(reads.correct.shape[1]):
        c = reads.correct[:, k].float().numpy()
        low, high = bootstrap_ci(c)
        rows.append({"k": k, "character": k + 1, "top-1 accuracy": float(c.mean()), "ci_low": low, "ci_high": high,
                     "mean P(character)": float(reads.p_char[:, k].mean()), "words": len(c)})
    return pd.DataFrame(rows)


def _read_within(model: Any, words: list[str], s: SpellingSettings, t0: float, notes: list[str],
                 say: Callable[[str], None], chunk: int = 100) -> SpellingReads:
    """:func:`read_spelling` of ``words`` ``chunk`` at a time, stopping once the reads have used
    ``READ_SHARE`` of the budget (the probes and neurons need the rest)."""
    parts = []
    for i in range(0, len(words), chunk):
        if parts and time.time() - t0 > READ_SHARE * s.budget_minutes * 60:
            notes.append(f"reads stopped after {i} of {len(words)} words: {READ_SHARE:.0%} of the budget was used")
            break
        parts.append(read_spelling(model, words[i:i + chunk], shots=s.shots, n_chars=s.n_chars, min_chars=s.min_chars))
        say(f"read {i + len(words[i:i + chunk])} words")
    return SpellingReads(sum((p.words for p in parts), ()), *(torch.cat([getattr(p, f) for p in parts]) for f in
                                                            ("features", "correct", "p_char", "attention")),
                         {w: why for p in parts for w, why in p.skipped.items()})


def spelling_study(model: Any, settings: SpellingSettings = SpellingSettings(), *, data_dir: Any = None,
                   say: Callable[[str], None] = lambda m: None) -> SpellingStudy:
    """Run the study (see the module); ``data_dir`` is unused (the data is the tokenizer's vocabulary)."""
    t0 = time.time()
    s = settings
    budget, notes, timings = s.budget_minutes * 60, [], {}
    vocab = list(s.given) or spellable_tokens(model.tokenizer, min_chars=s.min_chars, exclude=s.shots)
    if not vocab:
        raise InsufficientDataError(f"the tokenizer has no spellable token (a leading space and at least {s.min_chars} "
                                    "lowercase letters); pass the words to spell with given (--given)")
    rng = np.random.default_rng(s.seed)
    sample = [vocab[i] for i in sorted(rng.choice(len(vocab), min(s.words, len(vocab)), replace=False))]
    say(f"{len(vocab)} spellable tokens; reading {len(sample)}")
    reads = _read_within(model, sample, s, t0, notes, say)
    timings["reads"] = time.time() - t0
    counts = pd.DataFrame([{"vocabulary": len(model.tokenizer.get_vocab()), "spellable": len(vocab),
                            "sampled": len(sample), "read": len(reads.words), "skipped": len(reads.skipped)}])
    accuracy = _accuracy(reads)
    att = reads.attention.numpy()
    attention = pd.DataFrame([{"layer": l, "k": k, "attention to the source": float(att[:, l, k].mean())}
                              for l in range(att.shape[1]) for k in range(att.shape[2])])
    say(f"reads done; top-1 accuracy by character {accuracy['top-1 accuracy'].round(2).tolist()}")
    t1 = time.time()
    try:
        probes = probe_table(reads.features.numpy(), list(reads.words), range(s.n_chars), reads.feature_names,
                             test_share=s.test_share, seed=s.seed, min_per_class=s.min_per_class)
    except InsufficientDataError as err:
        notes.append(f"no probes: {err}")
        probes = pd.DataFrame(columns=["feature", "feature_index", "k", "accuracy", "control", "selectivity"])
    timings["probes"] = time.time() - t1
    brk = pd.DataFrame([breakthrough(probes)]) if s.n_chars > 1 and len(probes) else pd.DataFrame()
    say(f"probes done ({timings['probes']:.0f}s)")
    attributions: dict[int, list[Any]] = {}
    t2 = time.time()
    per_fact = None
    for k in range(s.n_chars):
        if not s.neuron_words:
            break
        right = [w for w, c in zip(reads.words, reads.correct[:, k].tolist()) if c][:s.neuron_words]
        if time.time() - t0 + (per_fact or 0.0) * len(right) > budget:
            notes.append(f"character neurons stopped before character {k + 1}: the budget of {s.budget_minutes} min "
                         "would be overrun")
            break
        if not right:
            notes.append(f"character {k + 1}: no word spelled right there, no neurons")
            continue
        t3 = time.time()
        attrs = attribute_facts(model, character_facts(right, k, shots=s.shots, min_chars=s.min_chars),
                                steps=s.steps, grid="gauss-legendre", tolerance=None)
        attributions[k] = [a[0] for a in attrs]
        per_fact = (time.time() - t3) / len(right)
        say(f"character {k + 1}: {len(right)} words attributed ({per_fact:.0f}s each)")
    timings["neurons"] = time.time() - t2
    neurons, layers = neuron_tables(attributions, s.top)
    timings["total"] = time.time() - t0
    tables = {"counts": counts, "accuracy": accuracy, "probes": probes, "breakthrough": brk, "attention": attention,
              "neurons": neurons, "neuron_layers": layers,
              "skipped": pd.DataFrame({"word": list(reads.skipped), "why": list(reads.skipped.values())})}
    return SpellingStudy(s, tables, tuple(notes), timings=timings, versions=environment())
