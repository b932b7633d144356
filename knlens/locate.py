"""Find a fact's knowledge neurons, check them causally, and keep everything needed to show them.

:func:`locate` is the pipeline behind ``knlens locate`` (methods.md §1), one call per step:

1. :func:`knlens.attribute` — integrated gradients of P(target) for every prompt (paraphrase) of the fact,
   with the completeness error Σ IG − (P(a) − P(0)) of each prompt;
2. :func:`knlens.refined_neurons` — coarse neurons per prompt, refined across prompts (preset ``dai``
   or ``eleuther``);
3. :func:`knlens.measure` — suppress (×0) and enhance (×2) the neurons at the target position, next to
   ``n_random`` random sets with the same number of neurons in each layer, with an empirical p-value;
4. the found neurons' activations at every token of every prompt (one batched forward, cached by a hook).

If no neuron survives refinement, the result says so (``result.refined_empty``) and steps 3–4 use the
``fallback_k`` neurons with the highest mean score instead, labelled as such everywhere.

>>> from knlens import load_model, Fact
>>> model = load_model("tiny-llama")
>>> fact = Fact(["the capital of france is", "the capital city of france is", "france capital city is"], " paris")
>>> result = locate(model, fact, steps=4, n_random=5, progress=False)
>>> list(result.to_frame().columns)
['layer', 'neuron', 'mean_score', 'n_coarse', 'refined', 'tested', 'mean_activation']
>>> result.effects()["action"].tolist()
['suppress', 'suppress', 'enhance', 'enhance']
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .attribution import Attribution, AttributionSettings, attribute
from .engine import chunks
from .facts import Fact
from .hooks import capture, hook_name, hooked
from .interventions import InterventionResult, measure
from .neurons import NeuronSet
from .prompts import encode
from .selection import PRESETS, SelectionPreset, coarse, refined_neurons

__all__ = ["LocateResult", "LocateSettings", "TokenActivations", "locate", "token_activations"]

RESULT_FILES = ("result.json", "neurons.csv", "interventions.csv", "completeness.csv", "attributions.safetensors")


@dataclass(frozen=True)
class LocateSettings:
    """Everything that produced a :class:`LocateResult` (recorded in every saved result)."""

    model: str
    n_layers: int
    d_mlp: int
    dtype: str
    hook_point: str
    steps: int
    grid: str
    quantity: str
    engine: str
    multi_token: str
    preset: str
    n_random: int
    seed: int
    top_k: int
    fallback_k: int
    knlens_version: str


@dataclass(frozen=True, eq=False)
class TokenActivations:
    """Activations of ``neurons`` (at the locate hook point) at every token of one prompt.

    ``values[t, j]`` is neuron ``j`` of ``neurons`` at token ``t``; ``target_position`` is the token whose
    activation integrated gradients used (the last prompt token, or ``[MASK]``).
    """

    prompt: str
    tokens: tuple[str, ...]
    neurons: NeuronSet
    values: Float[Tensor, "pos neuron"]
    target_position: int

    def to_frame(self) -> pd.DataFrame:
        """One row per token (``position, token``) and one column per neuron (``"L3.N17"``)."""
        frame = pd.DataFrame(self.values.double().numpy(), columns=[str(n) for n in self.neurons])
        frame.insert(0, "token", list(self.tokens))
        frame.insert(0, "position", range(len(self.tokens)))
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "tokens": list(self.tokens), "neurons": [list(n) for n in self.neurons],
                "values": self.values.double().tolist(), "target_position": self.target_position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenActivations:
        neurons = NeuronSet(tuple(n) for n in d["neurons"])
        values = torch.tensor(d["values"], dtype=torch.float32).reshape(len(d["tokens"]), len(neurons))
        return cls(d["prompt"], tuple(d["tokens"]), neurons, values, int(d["target_position"]))


@torch.no_grad()
def token_activations(model: Any, fact: Fact, neurons: NeuronSet, *, hook_point: str = "hook_post",
                      batch_size: int = 64) -> list[TokenActivations]:
    """The activations of ``neurons`` at every token of each prompt of ``fact`` (one batched forward).

    The prompts are run as :func:`knlens.encode` builds them (BOS, and ``[MASK]`` for a masked LM), right-
    padded; a caching hook per layer keeps only the requested neurons.

    >>> from knlens import load_model, Fact, NeuronSet
    >>> model = load_model("tiny-gpt2")
    >>> acts = token_activations(model, Fact(["the capital of france is"], " paris"), NeuronSet([(1, 3)]))
    >>> acts[0].tokens, acts[0].values.shape
    (('[BOS]', 'the', 'capital', 'of', 'france', 'is'), torch.Size([6, 1]))
    """
    neurons.check(model.cfg.n_layers, model.cfg.d_mlp)
    q = encode(model, list(fact.prompts), fact.target)
    q = q.select((q.token_index == 0).nonzero()[:, 0])  # one row per prompt, without teacher-forced tokens
    by_layer = neurons.by_layer()
    columns = {n: j for j, n in enumerate(neurons)}
    values = torch.zeros(len(q), q.tokens.shape[1], len(neurons))
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        seen: dict[int, list[Tensor]] = {l: [] for l in by_layer}
        with hooked(model, [(hook_name(l, hook_point), capture(seen[l], neurons=idx)) for l, idx in by_layer.items()]):
            model(sub.tokens, attention_mask=sub.attention_mask)
        for l, idx in by_layer.items():
            act = seen[l][0]  # [rows, pos, len(idx)]
            values[s, :act.shape[1], [columns[(l, i)] for i in idx]] = act.float().cpu()
    out = []
    for i in range(len(q)):
        n = int(q.attention_mask[i].sum())
        ids = q.tokens[i, :n]
        out.append(TokenActivations(prompt=q.prompts[int(q.prompt_index[i])],
                                    tokens=tuple(str(t) for t in model.to_str_tokens(ids)),
                                    neurons=neurons, values=values[i, :n].clone(),
                                    target_position=int(q.position[i])))
    return out


def _jsonable(x: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, recursively (the JSON stays standard)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return _jsonable(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"))


@dataclass(frozen=True, eq=False)
class LocateResult:
    """The knowledge neurons of one fact, their causal check and their activations (see :func:`locate`).

    * ``neurons`` — the refined knowledge neurons (possibly empty; see ``refined_empty``);
    * ``tested`` — the neurons the interventions and token activations use: ``neurons``, or the
      ``fallback_k`` best by mean score when ``neurons`` is empty;
    * ``table`` — ``layer, neuron, mean_score`` (mean IG over prompts), ``n_coarse`` (in how many prompts
      the neuron is coarse), ``refined``, ``tested``, ``mean_activation`` (clean, at the target position);
      the refined neurons and the ``top_k`` best by mean score, best first;
    * ``completeness`` — per prompt: ``p_target``, Σ_l Δ_l, Σ IG, ``abs_error`` = Σ_l |Σ_i IG_i^l − Δ_l| and
      ``relative_error`` = abs_error / Σ_l |Δ_l|;
    * ``interventions`` — the :class:`~knlens.InterventionResult` (knowledge vs random control);
    * ``activations`` — one :class:`TokenActivations` per prompt.
    """

    fact: Fact
    attributions: tuple[Attribution, ...]
    neurons: NeuronSet
    tested: NeuronSet
    table: pd.DataFrame
    completeness: pd.DataFrame
    interventions: InterventionResult
    activations: tuple[TokenActivations, ...]
    settings: LocateSettings
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def refined_empty(self) -> bool:
        return len(self.neurons) == 0

    @property
    def tested_label(self) -> str:
        """What ``tested`` is, in words (used in tables and the report)."""
        if not self.refined_empty:
            return "knowledge neurons (refined)"
        return f"top {len(self.tested)} by mean score (no refined neurons)"

    @property
    def mean_scores(self) -> Float[Tensor, "layer neuron"]:
        """Mean IG score of every neuron over the prompts."""
        return torch.stack([a.scores for a in self.attributions]).mean(0)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.attributions[0].layers

    @property
    def p_target(self) -> float:
        """Mean P(target) of the unpatched model over the prompts."""
        return float(np.mean([a.clean_value for a in self.attributions]))

    def to_frame(self) -> pd.DataFrame:
        """The neuron table (refined neurons and the top neurons by mean score)."""
        return self.table.copy()

    def effects(self) -> pd.DataFrame:
        """Interventions per action (suppress ×0, enhance ×2) and neuron kind (knowledge / random).

        Columns: ``action, neurons, n_neurons, p_before, p_after, relative`` (mean relative change of
        P(target) over prompts and draws), ``relative_std`` (std over random draws of their mean),
        ``delta`` (Dai's Δ = mean change / mean p_before), ``p_empirical`` (share of random draws at least as
        extreme as the knowledge set, (1 + k) / (1 + N)) and ``p_wilcoxon_prompts`` (paired Wilcoxon test
        over prompts, knowledge vs mean random change; NaN when undefined). p-values sit on the knowledge rows.
        """
        frame = self.interventions.frame
        tests = self.interventions.tests().set_index("action")
        rows = []
        for action in frame["action"].unique():
            sub = frame[frame.action == action]
            kn, rnd = sub[sub.neurons == "knowledge"], sub[sub.neurons == "random"]
            per_draw = rnd.groupby("draw")["relative"].mean()
            p_w = float("nan")
            if len(rnd):
                paired = pd.DataFrame({"kn": kn.groupby("prompt")["relative"].mean(),
                                       "rnd": rnd.groupby("prompt")["relative"].mean()}).dropna()
                diff = (paired["kn"] - paired["rnd"]).to_numpy()
                if len(paired) >= 2 and np.any(diff != 0):
                    p_w = float(stats.wilcoxon(paired["kn"], paired["rnd"]).pvalue)
            for kind, part in (("knowledge", kn), ("random", rnd)):
                if not len(part):
                    continue
                is_kn = kind == "knowledge"
                rows.append({
                    "action": action, "neurons": kind, "n_neurons": int(part["n_neurons"].iloc[0]),
                    "p_before": part["p_before"].mean(), "p_after": part["p_after"].mean(),
                    "relative": part["relative"].mean(),
                    "relative_std": float(per_draw.std()) if not is_kn and len(per_draw) > 1 else float("nan"),
                    "delta": part["change"].mean() / part["p_before"].mean(),
                    "p_empirical": float(tests.loc[action, "p_empirical"]) if is_kn else float("nan"),
                    "p_wilcoxon_prompts": p_w if is_kn else float("nan")})
        return pd.DataFrame(rows)

    def per_prompt(self) -> pd.DataFrame:
        """Per prompt and action: P before, P after for the tested neurons, and the random draws' mean."""
        f = self.interventions.frame
        g = f.groupby(["prompt", "action", "neurons"], sort=False).agg(p_before=("p_before", "first"),
                                                                       p_after=("p_after", "mean"))
        out = g["p_after"].unstack("neurons").rename(columns={"knowledge": "p_knowledge", "random": "p_random"})
        out.insert(0, "p_before", g["p_before"].groupby(level=[0, 1], sort=False).first())
        return out.reset_index()

    # ------------------------------------------------------------------ figures
    def plot(self, ax: Any = None) -> Any:
        """Layer × neuron heatmap of the mean scores, the tested neurons circled; returns the figure."""
        from .plotting import neuron_heatmap

        title = (f"mean IG over {len(self.attributions)} prompts of {self.fact.target!r}; circled: "
                 f"{self.tested_label}")
        return neuron_heatmap(self.mean_scores, layers=self.layers, mark=self.tested, ax=ax, title=title)

    def plot_interventions(self) -> Any:
        """Per action: histogram of the random draws' mean relative change, the tested set as a line."""
        import matplotlib.pyplot as plt

        frame = self.interventions.frame
        actions = list(frame["action"].unique())
        fig, axes = plt.subplots(1, len(actions), figsize=(4.2 * len(actions), 2.8), squeeze=False)
        for ax, action in zip(axes[0], actions):
            sub = frame[frame.action == action]
            draws = sub[sub.neurons == "random"].groupby("draw")["relative"].mean().to_numpy() * 100
            kn = sub[sub.neurons == "knowledge"]["relative"].mean() * 100
            if len(draws):
                ax.hist(draws, bins=min(20, max(5, len(draws) // 2)), color="#9ab", label="random sets")
            ax.axvline(kn, color="#c33", lw=2, label="tested set")
            ax.axvline(0, color="black", lw=0.6)
            ax.set_title(f"{action}: ΔP(target) / P", fontsize=9)
            ax.set_xlabel("mean relative change (%)")
        axes[0][0].set_ylabel("random draws")
        axes[0][-1].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig

    def show(self) -> Any:
        """The circuitsvis token view of the tested neurons' activations (inline JavaScript, works offline)."""
        from .report import token_view

        return token_view(self)

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of everything except the full score matrices (those go to safetensors)."""
        return _jsonable({
            "knlens_version": __version__,
            "fact": self.fact.to_dict(),
            "settings": asdict(self.settings),
            "p_target": self.p_target,
            "neurons": [list(n) for n in self.neurons],
            "refined_empty": self.refined_empty,
            "tested": [list(n) for n in self.tested],
            "tested_label": self.tested_label,
            "table": _records(self.table),
            "completeness": _records(self.completeness),
            "effects": _records(self.effects()),
            "interventions": {"settings": self.interventions.settings,
                              "frame": _records(self.interventions.frame)},
            "activations": [a.to_dict() for a in self.activations],
            "attributions": [{"prompt": a.prompt, "target": a.target, "clean_value": a.clean_value,
                              "layers": list(a.layers), "settings": asdict(a.settings)} for a in self.attributions],
            "timings": self.timings,
        })

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``result.json``, ``neurons.csv``, ``interventions.csv``, ``completeness.csv`` and
        ``attributions.safetensors`` (per-prompt scores) into ``directory``; no pickle. Returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {name: d / name for name in RESULT_FILES}
        paths["result.json"].write_text(self.to_json())
        self.table.to_csv(paths["neurons.csv"], index=False)
        self.interventions.frame.to_csv(paths["interventions.csv"], index=False)
        self.completeness.to_csv(paths["completeness.csv"], index=False)
        save_file({k: torch.stack([getattr(a, k) for a in self.attributions]).contiguous().float()
                   for k in ("scores", "activations", "delta", "completeness_error")},
                  paths["attributions.safetensors"])
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> LocateResult:
        """Read a result written by :meth:`save`."""
        d = Path(directory)
        meta = json.loads((d / "result.json").read_text())
        tensors = load_file(d / "attributions.safetensors")
        attrs = tuple(Attribution(prompt=m["prompt"], target=m["target"], clean_value=m["clean_value"],
                                  layers=tuple(m["layers"]), settings=AttributionSettings(**m["settings"]),
                                  **{k: v[i] for k, v in tensors.items()}) for i, m in enumerate(meta["attributions"]))
        fact = Fact.from_dict(meta["fact"])
        iv = meta["interventions"]
        return cls(fact=fact, attributions=attrs, neurons=NeuronSet(tuple(n) for n in meta["neurons"]),
                   tested=NeuronSet(tuple(n) for n in meta["tested"]),
                   table=pd.DataFrame.from_records(meta["table"]),
                   completeness=pd.DataFrame.from_records(meta["completeness"]),
                   interventions=InterventionResult(pd.DataFrame.from_records(iv["frame"]).fillna(
                       {"relative": float("nan")}), iv["settings"]),
                   activations=tuple(TokenActivations.from_dict(a) for a in meta["activations"]),
                   settings=LocateSettings(**meta["settings"]), timings=meta.get("timings", {}))

    def __repr__(self) -> str:
        return (f"LocateResult(fact={self.fact.name or self.fact.prompts[0]!r} → {self.fact.target!r}, "
                f"prompts={len(self.attributions)}, neurons={self.neurons!r}, model={self.settings.model!r})")


def _neuron_table(attrs: Sequence[Attribution], refined: NeuronSet, tested: NeuronSet, cfg: SelectionPreset,
                  top_k: int) -> pd.DataFrame:
    scores = torch.stack([a.scores for a in attrs])  # [prompt, layer, d]
    mean = scores.mean(0)
    acts = torch.stack([a.activations for a in attrs]).mean(0)
    layers = attrs[0].layers
    row_of = {l: i for i, l in enumerate(layers)}
    counts = torch.zeros_like(mean, dtype=torch.long)
    for a in attrs:
        for n in coarse(a, cfg.threshold, strict=cfg.strict_threshold):
            counts[row_of[n.layer], n.index] += 1
    d = mean.shape[1]
    top = mean.flatten().topk(min(top_k, mean.numel())).indices.tolist()
    chosen = NeuronSet([*refined, *tested, *((layers[i // d], i % d) for i in top)])
    frame = pd.DataFrame({
        "layer": [n.layer for n in chosen], "neuron": [n.index for n in chosen],
        "mean_score": [float(mean[row_of[n.layer], n.index]) for n in chosen],
        "n_coarse": [int(counts[row_of[n.layer], n.index]) for n in chosen],
        "refined": [n in refined for n in chosen], "tested": [n in tested for n in chosen],
        "mean_activation": [float(acts[row_of[n.layer], n.index]) for n in chosen]})
    frame = frame.sort_values(["refined", "mean_score"], ascending=[False, False], kind="stable")
    return frame.reset_index(drop=True).astype({"layer": "int64", "neuron": "int64", "n_coarse": "int64"})


def _completeness(attrs: Sequence[Attribution]) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": [a.prompt for a in attrs],
        "p_target": [a.clean_value for a in attrs],
        "delta_sum": [float(a.delta.sum()) for a in attrs],
        "ig_sum": [float(a.scores.sum()) for a in attrs],
        "abs_error": [float(a.completeness_error.sum()) for a in attrs],
        "max_layer_error": [float(a.completeness_error.max()) for a in attrs],
        "relative_error": [a.relative_completeness_error for a in attrs]})


def locate(model: Any, fact: Fact, *, steps: int = 20, grid: str = "right",
           preset: str | SelectionPreset = "dai", hook_point: str = "hook_post", n_random: int = 50, seed: int = 0,
           engine: str = "fast", progress: bool = True, top_k: int = 10, fallback_k: int = 3,
           attributions: Sequence[Attribution] | None = None, batch_size: int = 512) -> LocateResult:
    """Knowledge neurons of ``fact`` on ``model``: attribute → refine → suppress/enhance vs random → activations.

    ``steps``/``grid``/``engine``/``hook_point`` go to :func:`knlens.attribute` (P(target), zero baseline,
    multi-token targets teacher-forced); ``preset`` to :func:`knlens.refined_neurons`; ``n_random``/``seed``
    to :func:`knlens.measure`. ``top_k`` best neurons by mean score join the table; ``fallback_k`` of them
    are tested when no neuron is refined. ``progress`` shows tqdm bars (stderr). ``batch_size`` rows run
    per forward pass (integrated gradients run all (layer, step) cells of a prompt at once up to this size,
    which is much faster on a CPU than small chunks).

    ``attributions`` (one per prompt of ``fact``, from :func:`knlens.attribute`) skips step 1; ``steps``,
    ``grid``, ``engine`` and ``hook_point`` are then read from them. ``preset`` may also be a
    :class:`~knlens.selection.SelectionPreset` with thresholds of your own.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-gpt2")
    >>> res = locate(model, Fact(["the capital of france is", "the capital city of france is"], " paris"),
    ...              steps=4, n_random=3, progress=False)
    >>> len(res.completeness), len(res.activations)
    (2, 2)
    """
    if not isinstance(fact, Fact):
        raise TypeError(f"locate takes a knlens.Fact, got {type(fact).__name__}; build one with "
                        f"Fact(prompts=[...], target=' ...')")
    if isinstance(preset, SelectionPreset):
        cfg, preset_name = preset, repr(preset)
    elif preset in PRESETS:
        cfg, preset_name = PRESETS[preset], preset
    else:
        raise ValueError(f"unknown selection preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if attributions is not None:
        attributions = tuple(attributions)
        if [a.prompt for a in attributions] != list(fact.prompts) or any(a.target != fact.target
                                                                          for a in attributions):
            raise ValueError("attributions do not belong to this fact: give one per prompt of fact.prompts, in "
                             "order, with the fact's target")
        a0 = attributions[0].settings
        steps, grid, engine, hook_point = a0.steps, a0.grid, a0.engine, a0.hook_point
    timings: dict[str, float] = {}
    bar = tqdm(total=4, desc="locate", disable=not progress, leave=False)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)

    try:
        t = time.perf_counter()
        stage("integrated gradients")
        if attributions is None:
            attrs = attribute(model, fact, steps=steps, grid=grid, hook_point=hook_point, engine=engine,
                              batch_size=batch_size, progress=progress)
            timings["attribute_s"] = time.perf_counter() - t
        else:
            attrs = list(attributions)
        bar.update()

        stage("refine")
        refined = refined_neurons(attrs, preset=cfg)
        mean = torch.stack([a.scores for a in attrs]).mean(0)
        layers, d = attrs[0].layers, mean.shape[1]
        best = mean.flatten().topk(min(fallback_k, mean.numel())).indices.tolist()
        tested = refined if len(refined) else NeuronSet((layers[i // d], i % d) for i in best)
        table = _neuron_table(attrs, refined, tested, cfg, top_k)
        bar.update()

        t = time.perf_counter()
        stage("suppress / enhance vs random")
        effects = measure(model, [fact], [tested], n_random=n_random, seed=seed, point=hook_point,
                          batch_size=batch_size)
        timings["interventions_s"] = time.perf_counter() - t
        bar.update()

        t = time.perf_counter()
        stage("token activations")
        acts = token_activations(model, fact, tested, hook_point=hook_point, batch_size=batch_size)
        timings["activations_s"] = time.perf_counter() - t
        bar.update()
    finally:
        bar.close()
    a0 = attrs[0].settings
    settings = LocateSettings(
        model=a0.model, n_layers=int(model.cfg.n_layers), d_mlp=int(model.cfg.d_mlp), dtype=a0.dtype,
        hook_point=hook_point, steps=steps, grid=grid, quantity=a0.quantity, engine=engine,
        multi_token=a0.multi_token, preset=preset_name, n_random=n_random, seed=seed, top_k=top_k,
        fallback_k=fallback_k, knlens_version=__version__)
    return LocateResult(fact=fact, attributions=tuple(attrs), neurons=refined, tested=tested, table=table,
                        completeness=_completeness(attrs), interventions=effects, activations=tuple(acts),
                        settings=settings, timings=timings)
