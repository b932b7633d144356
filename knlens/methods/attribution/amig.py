"""Architecture-adapted multilingual integrated gradients (AMIG; Chen et al., AAAI 2024; docs/methods.md, AMIG).

IG from the zero baseline asks what a layer's neurons add to "nothing"; AMIG asks what they add to the same
prompt with one token made neutral. For every prompt token ``j`` (the prompt's own tokens: not BOS, CLS, SEP,
``[MASK]`` or padding, nor a teacher-forced gold token) the token is replaced by a neutral one (EOS for a
left-to-right model, ``[MASK]`` for a masked LM) and ``a'_j``, the activation of the hook point at the target
position of that replaced prompt, is read from one plain forward. Layer ``l`` is then moved along each path
``a'_j + α(a − a'_j)`` (every other layer and position clean, as in IG) and the paths are averaged:

* ``scaling="textbook"``: ``AMIG_i = mean_j (a_i − a'_{j,i}) · G_{j,i}``, the mean of the IG of each path,
  with ``G_j = Σ_k w_k ∂f(a'_j + α_k(a − a'_j)) / ∂x`` (quadrature from :mod:`.grids`). Completeness holds
  path by path, so ``Σ_i AMIG_i = mean_j [f(a) − f(a'_j)]`` up to the quadrature error: ``delta`` is that
  mean (f with layer ``l`` alone set to ``a'_j`` at the target position) and ``completeness_error`` the gap.
* ``scaling="authors"`` (the default, as their code): ``AMIG_i = a_i · mean_j G_{j,i}`` (gradient sum × a/m).
  It equals the textbook form plus ``mean_j a'_{j,i} · G_{j,i}``, the baseline's own gradient term, and has
  no completeness property: its ``completeness_error`` (against the same ``delta``) measures that extra term,
  not the integration, and is reported as it is.

Each path is one query row of the IG engines with its own baseline (a
:data:`~knlens.methods.attribution.baselines.BaselineFunction` looking the row's ``a'_j`` up), so AMIG runs on
the ``fast`` staircase (or ``batched`` / ``reference``, same numbers) with the engines' self-checks; the paths
of one prompt share its length and run together. Cost: IG's times the number of prompt tokens.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")
>>> a = attribute_amig(model, "the capital of france is", " paris", steps=8, scaling="textbook")[0]
>>> a.scores.shape, a.settings.method, a.settings.baseline
(torch.Size([2, 48]), 'amig/textbook', 'AMIG: each of 5 prompt tokens replaced by [EOS], paths averaged')
>>> a.relative_completeness_error < 0.1      # Σ scores ≈ mean_j f(a) − f(a'_j) per layer
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from knlens.core.errors import FactError, PromptError, SettingsError
from knlens.core.facts import Fact
from knlens.core.models import is_masked_lm
from knlens.core.tokens import MultiToken, Queries, encode, stack
from knlens.core.versions import __version__, environment
from knlens.methods.attribution.cells import ig_queries
from knlens.methods.attribution.grids import Grid, quadrature
from knlens.methods.attribution.ig import _attributions, _prompts_and_target, _resolve_layers
from knlens.methods.attribution.result import Attribution, AttributionSettings
from knlens.run.engine import ENGINES, Engine, Quantity, activations_at
from knlens.run.hooks import hook_name
from knlens.run.placement import model_dtype, precision_and_place, resolve_dtype

__all__ = ["Scaling", "SCALINGS", "attribute_amig", "attribute_amig_facts", "neutral_token", "amig_paths"]

Scaling = Literal["authors", "textbook"]
SCALINGS: tuple[str, ...] = ("authors", "textbook")


def neutral_token(model: Any, neutral: str | int | None = None) -> int:
    """The id of the neutral token: ``[MASK]`` for a masked LM, EOS otherwise; ``neutral`` overrides it (a
    token string of the vocabulary, or an id). Raises :class:`~knlens.core.errors.SettingsError`.

    >>> from knlens import load_model
    >>> neutral_token(load_model("tiny-llama")), neutral_token(load_model("tiny-bert"))
    (3, 4)
    """
    tok = model.tokenizer
    if neutral is None:
        masked = is_masked_lm(model)
        found = tok.mask_token_id if masked else tok.eos_token_id
        if found is None:
            raise SettingsError(f"the tokenizer has no {'mask' if masked else 'EOS'} token to use as AMIG's "
                                f"neutral token; pass neutral=<a token of the vocabulary>")
        return int(found)
    if isinstance(neutral, str):
        found = tok.convert_tokens_to_ids(neutral)
        if found is None or (tok.unk_token_id is not None and found == tok.unk_token_id and neutral != tok.unk_token):
            raise SettingsError(f"the neutral token {neutral!r} is not one token of the vocabulary")
        return int(found)
    if not 0 <= int(neutral) < int(model.cfg.d_vocab):
        raise SettingsError(f"the neutral token id {neutral} is outside the vocabulary of {model.cfg.d_vocab}")
    return int(neutral)


def _special_ids(tok: Any) -> set[int]:
    ids = (getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "cls", "sep", "mask"))
    return {int(i) for i in ids if i is not None}


def amig_paths(model: Any, q: Queries, names: list[str], neutral: int
               ) -> tuple[Queries, Float[Tensor, "path layer d"], Int[Tensor, "path"]]:
    """AMIG's paths of the rows of ``q``: one query row per (row, replaced prompt token), equal to its row but
    with ``prompt_index`` numbering the paths; the baselines ``a'_j`` at the hook points ``names`` (one plain
    forward of each row with token ``j`` replaced by ``neutral``, read at the target position); the row each
    path belongs to. A row with no replaceable token raises :class:`~knlens.core.errors.PromptError`.

    >>> from knlens import load_model, encode
    >>> model = load_model("tiny-gpt2")
    >>> paths, base, owner = amig_paths(model, encode(model, ["france is"], " paris"), ["blocks.0.mlp.hook_post"], 3)
    >>> len(paths), base.shape, owner.tolist()                  # BOS is not replaced
    (2, torch.Size([2, 1, 48]), [0, 0])
    """
    specials, masked = _special_ids(model.tokenizer), is_masked_lm(model)
    owner, where = [], []
    for r in range(len(q)):
        last = int(q.attention_mask[r].sum()) - 1 if masked else int(q.position[r] - q.token_index[r])
        row = q.tokens[r].tolist()
        pos = [j for j in range(last + 1) if row[j] not in specials]
        if not pos:
            raise PromptError(f"the prompt {q.prompts[int(q.prompt_index[r])]!r} has no token AMIG can replace "
                              f"(only special tokens)")
        owner += [r] * len(pos)
        where += pos
    owner_t = torch.tensor(owner)
    paths = q.select(owner_t)
    replaced = paths.tokens.clone()
    replaced[torch.arange(len(paths)), torch.tensor(where)] = neutral
    acts = activations_at(model, dataclasses.replace(paths, tokens=replaced), names)
    base = torch.stack([acts[n].float() for n in names], dim=1)
    labels = tuple(f"{q.prompts[int(q.prompt_index[r])]} [token {j} -> neutral]" for r, j in zip(owner, where))
    index = torch.arange(len(paths), device=paths.prompt_index.device)
    return dataclasses.replace(paths, prompt_index=index, prompts=labels), base, owner_t


def _path_baseline(base: Tensor) -> Any:
    def amig_token_baseline(model: Any, row: Queries, names: list[str], clean: Tensor) -> Tensor:
        """The path's ``a'_j``, looked up by the path number the row carries."""
        return base[int(row.prompt_index[0])]

    return amig_token_baseline


def _combine(paths: list[dict[str, Any]], scaling: str) -> dict[str, Any]:
    """One row's AMIG from its paths' IG rows."""
    acts = paths[0]["activations"]
    if scaling == "textbook":
        scores = torch.stack([p["scores"] for p in paths]).mean(0)
    else:
        scores = acts * torch.stack([p["integral"] for p in paths]).mean(0)
    delta = torch.stack([p["delta"] for p in paths]).mean(0)
    return {"scores": scores, "activations": acts, "delta": delta,
            "completeness_error": (scores.sum(-1) - delta).abs(), "clean": paths[0]["clean"],
            "engine": "+".join(dict.fromkeys(p["engine"] for p in paths)),
            "note": "; ".join(dict.fromkeys(p["note"] for p in paths if p["note"]))}


def attribute_amig(model: Any, fact: Fact | str | Sequence[str], target: str | None = None, **kwargs: Any
                   ) -> list[Attribution]:
    """AMIG attributions of every prompt of ``fact`` (one :class:`Attribution` each); the keyword arguments are
    :func:`attribute_amig_facts`'.

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-bert")
    >>> [a.settings.method for a in attribute_amig(model, Fact(["the capital of france is"], " paris"), steps=4)]
    ['amig/authors']
    """
    return _amig_items(model, [_prompts_and_target(fact, target)], **kwargs)[0]


def attribute_amig_facts(model: Any, facts: Sequence[Fact], **kwargs: Any) -> list[list[Attribution]]:
    """AMIG of several facts in one pass (their rows of one length share the engines' runs), one list per fact.

    Keyword arguments: ``scaling`` (``"authors"``, default, or ``"textbook"``), ``neutral`` (the neutral token:
    string or id; default EOS or ``[MASK]``), and IG's ``hook_point``, ``layers``, ``steps`` (20), ``grid``
    (``"right"``; ``"left"`` is Dai's ``i/m, i = 0..m−1``), ``quantity``, ``multi_token``, ``token_reduce``,
    ``engine``, ``batch_size``, ``progress``, ``device``, ``dtype`` (see :func:`~knlens.attribute`). The grid
    is fixed (no adaptive refinement: the authors' form has no completeness error to aim at).

    >>> from knlens import load_model, Fact
    >>> model = load_model("tiny-llama")
    >>> out = attribute_amig_facts(model, [Fact(["the capital of france is"], " paris"),
    ...                                    Fact(["the capital of spain is"], " madrid")], steps=4)
    >>> [[a.target for a in attrs] for attrs in out]
    [[' paris'], [' madrid']]
    """
    bad = [type(f).__name__ for f in facts if not isinstance(f, Fact)]
    if bad:
        raise FactError(f"attribute_amig_facts takes knlens.Fact values, got {', '.join(dict.fromkeys(bad))}")
    return _amig_items(model, [_prompts_and_target(f, None) for f in facts], **kwargs) if facts else []


def _amig_items(model: Any, items: list[tuple[list[str], str]], *, scaling: Scaling = "authors",
                neutral: str | int | None = None, hook_point: str = "hook_post", layers: Sequence[int] | None = None,
                steps: int = 20, grid: Grid = "right", quantity: Quantity = "prob",
                multi_token: MultiToken = "teacher_forcing", token_reduce: Literal["mean", "sum"] = "mean",
                engine: Engine = "fast", batch_size: int = 256, progress: bool = False,
                device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
                ) -> list[list[Attribution]]:
    if scaling not in SCALINGS:
        raise SettingsError(f"unknown AMIG scaling {scaling!r}; use 'authors' (gradient sum × a/m, their code) "
                            f"or 'textbook' (× (a − a')/m)")
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine {engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"batch_size must be a positive integer, got {batch_size!r}")
    run_dtype = resolve_dtype(dtype)
    layer_ids = _resolve_layers(model, layers)
    names = [hook_name(l, hook_point) for l in layer_ids]
    alphas, weights = quadrature(grid, steps)
    neutral_id = neutral_token(model, neutral)
    qs = [encode(model, prompts, target, multi_token=multi_token) for prompts, target in items]
    q = stack(qs)
    with precision_and_place(model, device, run_dtype) as where:
        paths, base, owner = amig_paths(model, q.to(where), names, neutral_id)
        rows = ig_queries(model, paths, names, alphas, weights, _path_baseline(base), quantity, engine,
                          batch_size, progress)
    combined = [_combine([rows[k] for k in (owner == r).nonzero()[:, 0].tolist()], scaling) for r in range(len(q))]
    n_tokens = torch.bincount(owner, minlength=len(q))
    out, start = [], 0
    for q_i, (prompts, target) in zip(qs, items):
        mine, start = combined[start:start + len(q_i)], start + len(q_i)
        counts = sorted(set(n_tokens[start - len(q_i):start].tolist()))
        settings = AttributionSettings(
            method=f"amig/{scaling}", model=str(getattr(model.cfg, "model_name", "?")), hook_point=hook_point,
            steps=steps, grid=grid, quantity=quantity,
            baseline=(f"AMIG: each of {'/'.join(map(str, counts))} prompt tokens replaced by "
                      f"{model.tokenizer.convert_ids_to_tokens(neutral_id)}, paths averaged"),
            engine="+".join(dict.fromkeys(r["engine"] for r in mine)),
            engine_note="; ".join(dict.fromkeys(r["note"] for r in mine if r["note"])),
            multi_token="single" if int(q_i.token_index.max()) == 0 else f"teacher_forcing/{token_reduce}",
            dtype=str(run_dtype or model_dtype(model)).removeprefix("torch."), knlens_version=__version__,
            versions=environment())
        out.append(_attributions(q_i.to("cpu"), mine, prompts, target, layer_ids, token_reduce, settings))
    return out
