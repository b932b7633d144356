"""Causal tracing: knlens against ROME's own tracing code (Meng et al., 2022), same weights, same noise draws.

ROME is a peer, installed beside the benchmarks and never into knlens or its environment::

    git clone https://github.com/kmeng01/rome benchmarks/.peer/rome

Run::

    .venv/bin/python benchmarks/trace_vs_rome.py [--rome benchmarks/.peer/rome] [--threads 1 2]
                                                 [--samples 10 50] [--layers 6 12] [--repeat 3]

Both sides get the same randomly initialised GPT-2-shaped Hugging Face model (``GPT2Config`` with ``--layers``
layers, d_model 768, vocabulary 50257, weights of std ``--init`` = 0.1 so that the clean prediction is peaked;
each side its own copy, as the bridge rewires the model it wraps) and
the same word-level tokenizer (no BOS, as GPT-2's). The prompt is a built-in fact's (lower-cased for the
word-level vocabulary); the target is the clean run's top token, as ROME traces it.

* ROME: ``calculate_hidden_flow`` once per kind, as its ``main()`` does — the hidden state (its
  ``trace_important_states``), then MLP and attention (``trace_important_window``, window 10); every
  (token, layer) cell is one forward of the clean prompt and ``samples`` noised copies.
* knlens: one :func:`knlens.methods.tracing.trace.trace` of the three kinds (residual stream, MLP, attention;
  windows 1/10/10) with the ``fast`` engine; the script stops if it fell back to another engine.

Same noise draws: ROME's ``trace_with_patch`` adds ``ν · RandomState(1).randn(samples, n, d)`` (numpy,
float64) to the subject's token embeddings in every call; knlens is given that same array (a
:class:`~knlens.methods.tracing.corruption.Corruption` whose ``values`` are it). ν = 3 × the std of the token
embeddings (:func:`~knlens.methods.tracing.corruption.embedding_std`) on both sides.

Shims, all at import time except the last: ``experiments/causal_trace.py`` imports ``dsets`` (ROME's data
sets, which need scikit-learn and are not used by tracing) — an empty stub module stands in; ``util.globals``
reads ``globals.yml`` from the working directory — the import runs with ROME's folder as the working
directory; ``make_inputs`` defaults to ``device="cuda"`` — its default is set to ``"cpu"``.

Timing (``benchmarks/timing.py``): one warm-up call of each side, then ``--repeat`` interleaved repeats; the
minimum and median of each side and the ratio of the minima (median ratio beside it). Printed per
configuration: the versions, the load average, the largest difference of the effects (per kind), of P_clean
and of P_corrupted between the two sides, and the times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import torch

from knlens.core.models import mark_in_memory, wrap_hf_model
from knlens.core.versions import environment
from knlens.data.builtin import get_fact
from knlens.methods.tracing.corruption import Corruption, embedding_std
from knlens.methods.tracing.trace import trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, ratio_line  # noqa: E402

HERE = Path(__file__).resolve().parent
KINDS = {"resid": None, "mlp": "mlp", "attn": "attn"}  # knlens kind -> ROME kind
VOCAB = 50257


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def import_rome(path: Path) -> Any:
    """ROME's ``experiments.causal_trace`` module, with the shims the module docstring lists."""
    if not (path / "experiments" / "causal_trace.py").exists():
        print(f"ROME's code is not at {path}. Install it beside the benchmarks with:\n"
              f"    git clone https://github.com/kmeng01/rome {HERE / '.peer' / 'rome'}\n"
              f"(or pass --rome PATH)")
        sys.exit(1)
    sys.path.insert(0, str(path))
    stub = types.ModuleType("dsets")  # its data sets: unused by tracing, and they need scikit-learn
    stub.KnownsDataset = None  # type: ignore[attr-defined]
    sys.modules["dsets"] = stub
    with _working_directory(path):  # util/globals.py opens "globals.yml" relative to the working directory
        import experiments.causal_trace as causal_trace  # type: ignore[import-not-found]
    causal_trace.make_inputs.__defaults__ = ("cpu",)  # its default device is "cuda"
    return causal_trace


def word_tokenizer(words: list[str]) -> Any:
    """A word-level tokenizer of exactly :data:`VOCAB` ids (``words``, then fillers ``w123``), no BOS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[EOS]"] + sorted(set(words))
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    mark_in_memory(tok, "gpt2-shaped-random")
    tok.init_kwargs["add_bos_token"] = False
    return tok


@dataclass(frozen=True)
class RomeNoise(Corruption):
    """The noise ROME's ``trace_with_patch`` adds: ``scale · RandomState(1).randn(samples, n, d)``."""

    def values(self, model: Any, positions: Any, tokens: Any = None) -> torch.Tensor:
        draws = numpy.random.RandomState(1).randn(self.samples, len(positions), model.cfg.d_model)
        return float(self.scale) * torch.from_numpy(draws)  # type: ignore[arg-type]


def build(layers: int, words: list[str], seed: int, init: float) -> tuple[Any, Any, Any]:
    """The knlens model, ROME's ModelAndTokenizer parts (HF model, tokenizer): the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    theirs = GPT2LMHeadModel(GPT2Config(n_layer=layers, vocab_size=VOCAB, initializer_range=init)).eval()
    for p in theirs.parameters():
        p.requires_grad_(False)
    tok = word_tokenizer(words)
    model = wrap_hf_model("gpt2-shaped-random", copy.deepcopy(theirs), copy.deepcopy(tok), dtype=torch.float32)
    model.cfg.default_prepend_bos = False  # ROME feeds GPT-2 prompts without BOS
    return model, theirs, tok


def run_case(rome: Any, model: Any, theirs: Any, tok: Any, prompt: str, subject: str, samples: int,
             repeat: int) -> list[str]:
    mt = rome.ModelAndTokenizer(model=theirs, tokenizer=tok)
    nu = 3 * embedding_std(model)
    with torch.no_grad():
        top = int(model(model.to_tokens(prompt))[0, -1].argmax())
    target = " " + tok.decode([top])
    corruption = RomeNoise("noise", scale=nu, samples=samples)
    ids = tok.encode(prompt)
    assert model.to_tokens(prompt)[0].tolist() == ids, "the two sides tokenize the prompt differently"

    def rome_side() -> dict[str, Any]:
        return {k: rome.calculate_hidden_flow(mt, prompt, subject, samples=samples, noise=nu, kind=rk)
                for k, rk in KINDS.items()}

    def knlens_side() -> Any:
        return trace(model, prompt, target, subject=subject, kinds=tuple(KINDS), corruption=corruption,
                     known_only=False)

    load = os.getloadavg()[0]
    t = compare({"ROME": rome_side, "knlens": knlens_side}, repeat=repeat)
    theirs_out, ours = t["ROME"].value, t["knlens"].value
    assert ours.settings.engine == "fast", f"knlens fell back: {ours.settings.engine_note}"
    span = theirs_out["resid"]["subject_range"]
    assert tuple(span) == tuple(ours.subject_span), f"subject spans differ: ROME {span}, knlens {ours.subject_span}"
    diffs = {}
    for k, r in theirs_out.items():
        eff = (r["scores"] - r["low_score"]).T  # ROME: [token, layer] probabilities; knlens: [layer, token] effects
        diffs[k] = float((eff - ours.effects[k]).abs().max())
    d_clean = max(abs(r["high_score"].item() - ours.p_clean) for r in theirs_out.values())
    d_corr = max(abs(r["low_score"] - ours.p_corrupted) for r in theirs_out.values())
    n_tok = len(ids)
    biggest = max(float(e.abs().max()) for e in ours.effects.values())
    print(f"  {n_tok} tokens, subject {tuple(span)}, K = {samples}, largest |effect| {biggest:.3f}: ROME {t['ROME'].min:.2f} s "
          f"(median {t['ROME'].median:.2f}), knlens {t['knlens'].min:.2f} s (median {t['knlens'].median:.2f}), "
          f"ratio {ratio_line(t, 'ROME', 'knlens')}; max |effect difference| "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
          + f"; P_clean {ours.p_clean:.4f} (diff {d_clean:.1e}), P_corrupted {ours.p_corrupted:.4f} "
          f"(diff {d_corr:.1e}); load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return [f"{t['ROME'].min:.2f} / {t['ROME'].median:.2f}", f"{t['knlens'].min:.2f} / {t['knlens'].median:.2f}",
            ratio_line(t, "ROME", "knlens"), f"{max(diffs.values()):.1e}", f"{max(d_clean, d_corr):.1e}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rome", type=Path, default=HERE / ".peer" / "rome", help="ROME's repository (git clone)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples", type=int, nargs="+", default=[10, 50], help="noise samples K")
    ap.add_argument("--layers", type=int, nargs="+", default=[6], help="GPT-2-shaped models of these depths")
    ap.add_argument("--fact", default="capital-france", help="a built-in fact (knlens.data.get_fact)")
    ap.add_argument("--prompt-index", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=float, default=0.1,
                    help="std of the random weights (GPT-2's 0.02 gives P_clean ~ 1/vocabulary)")
    args = ap.parse_args()
    rome = import_rome(args.rome.resolve())
    fact = get_fact(args.fact)
    prompt, subject = fact.prompts[args.prompt_index].lower(), fact.subject.lower()
    words = [w for p in fact.prompts for w in p.lower().replace("'", " ").split()]
    print("versions:", "  ".join(f"{k} {v}" for k, v in environment().items()))
    print(f"ROME {args.rome} (commit {_commit(args.rome)}); prompt {prompt!r}, subject {subject!r}", flush=True)
    rows = []
    for layers in args.layers:
        model, theirs, tok = build(layers, words, args.seed, args.init)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for samples in args.samples:
                print(f"GPT-2 shape, {layers} layers, {threads} thread(s):", flush=True)
                rows.append([str(layers), str(threads), str(samples),
                             *run_case(rome, model, theirs, tok, prompt, subject, samples, args.repeat)])
    print("\n| layers | threads | K | ROME s, min / median | knlens s, min / median | speed-up (min, median) "
          "| max abs effect difference | max abs P_clean, P_corrupted difference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def _commit(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
