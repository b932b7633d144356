"""Judge edits the way the field does: reliability, generality, locality and perplexity (docs/methods.md,
editing evaluation).

For each request, the model is read once before any edit; then each editor builds its edit on the unedited
model, the edit is applied, the model is read again, and the edit is undone (also when reading fails). The
prompts read are the edit prompt, its paraphrases, the neighbours' prompts and the request's probes (the
editing criteria: :mod:`knlens.methods.editing.criteria`). Every reading is teacher forced on the true and on
the new object of each prompt (a probe without a new object: the true one only); the result keeps the raw
quantities (NLLs, argmax ids) and reduces them to each convention afterwards
(:class:`~knlens.methods.editing.result.EditEvaluation`). At the end the model's weights are checked to be the
ones it started with.

>>> from knlens import load_model, Fact, NeuronSet
>>> from knlens.methods.editing.editors import EditRequest, kn_update_editor
>>> model = load_model("tiny-llama")
>>> req = EditRequest(Fact(["the capital of france is", "the capital city of france is"], " paris",
...                        name="capital-france"), " berlin",
...                   neighbours=[Fact(["the capital of italy is"], " rome")])
>>> ev = evaluate_edits(model, [req], {"kn": kn_update_editor({"capital-france": NeuronSet([(1, 3)])})},
...                     text=["the dog is in paris", "this cat speaks french"])
>>> sorted(ev.frame.group.unique()), list(ev.metrics().metric)[:2]
(['generality', 'locality', 'reliability'], ['reliability', 'reliability_es'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from knlens.core.errors import EditStateError, SettingsError
from knlens.core.tokens import encode, encode_texts
from knlens.core.versions import __version__
from knlens.data.text import text_sample
from knlens.methods.editing.edit import Edit, fingerprint, model_name
from knlens.methods.editing.editors import EditRequest, Editor
from knlens.methods.editing.result import EditEvaluation, EditEvaluationSettings
from knlens.run.engine import chunks, forward, target_logits

__all__ = ["evaluate_edits", "text_nll"]


@torch.no_grad()
def _read(model: Any, prompts: Sequence[str], target: str, batch_size: int) -> list[dict[str, Any]]:
    """Per prompt: mean per-token NLL of ``target`` (teacher forced), argmax ids along it, token accuracy."""
    q = encode(model, list(prompts), target)
    logp, top = [], []
    for s in chunks(len(q), batch_size):
        sub = q.select(torch.arange(len(q))[s])
        logits = target_logits(model, sub).float()
        logp.append(logits.log_softmax(-1)[torch.arange(len(sub), device=logits.device), sub.target].cpu())
        top.append(logits.argmax(-1).cpu())
    lp, am, tgt, idx = torch.cat(logp), torch.cat(top), q.target.cpu(), q.prompt_index.cpu()
    out = []
    for i in range(len(prompts)):
        rows = idx == i
        out.append({"nll": float(-lp[rows].mean()), "argmax": " ".join(map(str, am[rows].tolist())),
                    "acc": float((am[rows] == tgt[rows]).float().mean())})
    return out


def _prompts(request: EditRequest) -> list[tuple[str, str, str, str | None]]:
    """(group, prompt, true target, new target) of every prompt the request is judged on."""
    fact, new = request.fact, request.new_target
    out: list[tuple[str, str, str, str | None]] = [("reliability", fact.prompts[0], fact.target, new)]
    out += [("generality", p, fact.target, new) for p in fact.prompts[1:]]
    out += [("locality", p, n.target, new) for n in request.neighbours for p in n.prompts]
    out += [(pr.group, pr.prompt, pr.target_true, pr.target_new) for pr in request.probes]
    return out


_UNREAD = {"nll": math.nan, "argmax": "", "acc": math.nan}  # a probe without a new object


def _measure(model: Any, request: EditRequest, batch_size: int) -> list[dict[str, Any]]:
    """One reading per prompt and object: the prompts that share an object are read together."""
    items = _prompts(request)
    wanted = [(i, which, target) for i, (_, _, true, new) in enumerate(items)
              for which, target in (("true", true), ("new", new)) if target is not None]
    read: dict[tuple[int, str], dict[str, Any]] = {}
    for target in dict.fromkeys(t for _, _, t in wanted):
        at = [(i, which) for i, which, t in wanted if t == target]
        for key, r in zip(at, _read(model, [items[i][1] for i, _ in at], target, batch_size)):
            read[key] = r
    rows = []
    for i, (g, p, t, n) in enumerate(items):
        tr, nw = read[(i, "true")], read.get((i, "new"), _UNREAD)
        rows.append({"group": g, "prompt": p, "target_true": t, "target_new": n, "nll_true": tr["nll"],
                     "acc_true": tr["acc"], "argmax_true": tr["argmax"], "nll_new": nw["nll"], "acc_new": nw["acc"],
                     "argmax_new": nw["argmax"]})
    return rows


def _rows(request: EditRequest, editor: str, before: list[dict[str, Any]], after: list[dict[str, Any]]
          ) -> list[dict[str, Any]]:
    rows = []
    for b, a in zip(before, after):
        tb, ta = b["argmax_true"].split(), a["argmax_true"].split()
        row = {"fact": request.name, "editor": editor, **{k: b[k] for k in ("group", "prompt", "target_true",
                                                                            "target_new")}}
        for k in ("nll_true", "acc_true", "nll_new", "acc_new", "argmax_true", "argmax_new"):
            row[f"{k}_before"], row[f"{k}_after"] = b[k], a[k]
        row["agreement"] = sum(x == y for x, y in zip(tb, ta)) / len(tb)
        rows.append(row)
    return rows


@torch.no_grad()
def text_nll(model: Any, texts: Sequence[str], *, batch_size: int = 16) -> tuple[float, int]:
    """Total next-token NLL of ``texts`` (every token after the first of each text) and the number of tokens;
    the perplexity is ``exp(total / tokens)``.

    >>> from knlens import load_model
    >>> total, n = text_nll(load_model("tiny-gpt2"), ["the dog", "the capital of france"])
    >>> n
    6
    """
    total, count = 0.0, 0
    for s in chunks(len(texts), batch_size):
        tokens, mask = encode_texts(model, texts[s])
        logp = forward(model, tokens, attention_mask=mask).float().log_softmax(-1)[:, :-1]
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        valid = mask[:, 1:].bool()
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return total, count


def evaluate_edits(model: Any, requests: Sequence[EditRequest], editors: Mapping[str, Editor], *,
                   text: Sequence[str] | None = None, n_text: int = 100, seed: int = 0, batch_size: int = 64,
                   level: float = 0.95, n_boot: int = 2000, progress: bool = False) -> EditEvaluation:
    """Evaluate every editor on every request (see the module docstring).

    ``text``: the sentences whose perplexity is measured before and after each edit; ``None`` takes ``n_text``
    sentences of part 1 of :func:`~knlens.data.text.text_sample` (disjoint from the key statistics' part 0);
    ``n_text=0`` with no ``text`` skips the perplexity. ``level``/``n_boot``/``seed``: the bootstrap
    intervals over facts.
    """
    if not editors:
        raise SettingsError("no editors to evaluate")
    if not requests:
        raise SettingsError("no edit requests to evaluate")
    if text is not None:
        texts, described = list(text), f"given ({len(text)} sentences)"
    elif n_text > 0:
        texts = text_sample(n_text, part=1, seed=seed)
        described = f"text_sample part 1 (BLiMP + ParaRel sentences), n={n_text}, seed={seed}"
    else:
        texts, described = [], "none"
    start = fingerprint(model)
    base = text_nll(model, texts) if texts else (math.nan, 0)
    rows: list[dict[str, Any]] = []
    fluency: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    for request in tqdm(requests, desc="edits", disable=not progress):
        before = _measure(model, request, batch_size)
        made: dict[str, Edit] = {}
        for name, editor in editors.items():
            edit = editor(model, request, made)
            if not isinstance(edit, Edit):
                raise SettingsError(f"editor {name!r} returned a {type(edit).__name__}, not an Edit")
            made[name] = edit
            with edit.apply(model, weights=start):  # the weights are checked against start at the end
                after = _measure(model, request, batch_size)
                nll = text_nll(model, texts) if texts else (math.nan, 0)
            rows += _rows(request, name, before, after)
            if texts:
                fluency.append({"fact": request.name, "editor": name, "n_tokens": base[1],
                                "nll_before": base[0] / base[1], "nll_after": nll[0] / nll[1],
                                "ppl_before": math.exp(base[0] / base[1]), "ppl_after": math.exp(nll[0] / nll[1])})
            sizes.append({"fact": request.name, "editor": name, "editor_kind": edit.editor,
                          "n_changed": edit.n_changed, "delta_norm": edit.delta_norm,
                          "parameters": " ".join(dict.fromkeys(s.name for s in edit.slices))})
    if fingerprint(model) != start:
        raise EditStateError("the model's weights differ from the ones the evaluation started with")
    settings = EditEvaluationSettings(model=model_name(model), fingerprint=start, editors=tuple(editors),
                                      text=described, n_text=len(texts), level=level, n_boot=n_boot, seed=seed,
                                      knlens_version=__version__)
    return EditEvaluation(pd.DataFrame(rows), pd.DataFrame(fluency, columns=[
        "fact", "editor", "n_tokens", "nll_before", "nll_after", "ppl_before", "ppl_after"]), pd.DataFrame(sizes),
        facts=tuple(r.fact for r in requests), settings=settings)
