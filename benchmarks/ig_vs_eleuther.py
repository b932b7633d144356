"""knlens integrated gradients vs EleutherAI ``knowledge-neurons`` 0.0.2, side by side, same weights.

Install the peer implementation next to this script (never into the project's environment: its pins
could break it)::

    .venv/bin/pip install --no-deps --target benchmarks/.peer knowledge-neurons==0.0.2

Run::

    .venv/bin/python benchmarks/ig_vs_eleuther.py            # GPT-2-small shape, 10- and 30-token prompts
    .venv/bin/python benchmarks/ig_vs_eleuther.py --bert     # also BERT-base shape (masked LM)

Both sides get the *same* randomly initialised HF model (seeded ``GPT2Config()`` defaults: 12 layers,
d_model 768, d_mlp 3072, vocab 50257; ``BertConfig()`` for BERT) and the same in-memory word-level
tokenizer (no download). The peer runs its ``get_scores`` (every layer, m = 20, batch 10, ``linspace``
grid, hook on the pre-GELU ``c_fc`` output for GPT-2, on the post-GELU ``intermediate`` for BERT); knlens
runs :func:`knlens.attribute` on the same full-model scan with ``hook_point="hook_pre"`` (GPT-2) /
``"hook_post"`` (BERT) and ``grid="linspace"``. Printed: wall time of each, the ratio, and agreement
(Pearson of the full [layer, neuron] score matrices, top-20 overlap). ``--quadrature`` adds knlens with
Gauss–Legendre at the fewest steps whose error against a 256-step reference is no larger than the
peer's m = 20 error ("equal accuracy"). ``--screen gauss2`` adds knlens with screened integration
(:mod:`knlens.methods.attribution.screen`, guaranteeing the prompt's coarse neurons at 0.3 × its top score,
EleutherAI's cut, and its top 20): its agreement is the top-20 overlap and whether the coarse neurons equal
the peer's, its layers integrated exactly and whether its check fell back.

Timing (``benchmarks/timing.py``): one untimed warm-up call of each side, then ``--repeat`` calls of the
sides in turn; the ratios are taken between minima, with the ratio of medians beside them.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

PEER = Path(__file__).resolve().parent / ".peer"
sys.path.insert(0, str(PEER))
try:
    from knowledge_neurons import KnowledgeNeurons  # type: ignore[import-not-found]
except ImportError:
    print("EleutherAI knowledge-neurons is not installed next to this benchmark. Install it with:\n"
          f"    .venv/bin/pip install --no-deps --target {PEER} knowledge-neurons==0.0.2\n"
          "(not into .venv: its dependency pins could break the project environment)")
    sys.exit(1)

from knlens import attribute, coarse  # noqa: E402
from knlens.core.models import mark_in_memory, wrap_hf_model  # noqa: E402
from knlens.methods.attribution.result import Screen  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare  # noqa: E402

WORDS = """the a of is in on at to and by from with for as capital city country language president river
born died located official currency france paris germany berlin italy rome spain madrid japan tokyo china
beijing english french german italian spanish japanese chinese euro yen dollar which where who what lives
speaks works plays known called old new big small first last great famous north south east west""".split()


def make_tokenizer(vocab_size: int, masked: bool):
    """A word-level tokenizer of exactly ``vocab_size`` ids (real words, then fillers ``w123``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if masked else ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words = specials + WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if masked:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                      model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                      bos_token="[BOS]", eos_token="[EOS]",
                                      model_input_names=["input_ids", "attention_mask"])
    return tok


def prompt_of(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


def agreement(ours: torch.Tensor, theirs: torch.Tensor, k: int = 20) -> tuple[float, int]:
    pearson = float(torch.corrcoef(torch.stack([ours.flatten().double(), theirs.flatten().double()]))[0, 1])
    top = lambda s: set(s.flatten().topk(k).indices.tolist())  # noqa: E731
    return pearson, len(top(ours) & top(theirs))


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def knlens_scores(model, prompt, target, **kw) -> torch.Tensor:
    return attribute(model, [prompt], target, steps=kw.pop("steps", 20), tolerance=None, **kw)[0].scores


def spread(attr, n_layers: int) -> torch.Tensor:
    """A screened attribution's scores on the full [layer, neuron] grid, the layers it left out at -inf."""
    full = torch.full((n_layers, attr.scores.shape[1]), -torch.inf)
    full[list(attr.layers)] = attr.scores
    return full


def run_case(name, kn, model, prompt, target, peer_target, hook_point, ids_ours, ids_theirs, args, rows):
    assert ids_ours == ids_theirs, f"token ids differ: knlens {ids_ours} vs peer {ids_theirs}"
    n_tok = len(ids_ours)
    sides = {"EleutherAI": lambda: kn.get_scores(prompt, peer_target, batch_size=10, steps=20, pbar=False).detach(),
             "knlens": lambda: knlens_scores(model, prompt, target, hook_point=hook_point, grid="linspace",
                                             batch_size=args.batch_size)}
    if args.screen:
        scr = Screen(method=args.screen, threshold=0.3, min_count=1, top_k=20)  # EleutherAI's cut, one prompt
        sides["screened"] = lambda: attribute(model, [prompt], target, steps=20, tolerance=None, grid="linspace",
                                              hook_point=hook_point, batch_size=args.batch_size, screen=scr)[0]
    t = compare(sides, repeat=args.repeat)
    t_theirs, theirs = t["EleutherAI"].min, t["EleutherAI"].value
    t_ours, ours = t["knlens"].min, t["knlens"].value
    med = lambda name: t["EleutherAI"].median / t[name].median  # noqa: E731
    pearson, overlap = agreement(ours, theirs)
    rows.append((name, n_tok, "knlens fast, linspace m=20", t_ours, t_theirs / t_ours, med("knlens"), pearson, overlap))
    rows.append((name, n_tok, "EleutherAI get_scores m=20 b=10", t_theirs, 1.0, 1.0, 1.0, 20))
    print(f"  {name} {n_tok} tokens: EleutherAI {t_theirs:.2f} s, knlens {t_ours:.2f} s, "
          f"ratio {t_theirs / t_ours:.1f}x (median {med('knlens'):.1f}x), Pearson {pearson:.6f}, top-20 overlap "
          f"{overlap}/20", flush=True)
    if args.screen:
        a = t["screened"].value
        s = spread(a, theirs.shape[0])
        same = set(coarse(s, 0.3, strict=True)) == set(coarse(theirs, 0.3, strict=True))
        o = len(set(s.flatten().topk(20).indices.tolist()) & set(theirs.flatten().topk(20).indices.tolist()))
        c = a.screen
        rows.append((name, n_tok, f"knlens fast, screened {args.screen} (exact on {len(a.layers)} of "
                     f"{theirs.shape[0]} layers{', fell back' if c.fell_back else ''}; coarse neurons "
                     f"{'equal' if same else 'DIFFER'})", t["screened"].min, t_theirs / t["screened"].min,
                     med("screened"), float("nan"), o))
        print(f"    screened {args.screen}: {t['screened'].min:.2f} s, ratio {t_theirs / t['screened'].min:.1f}x, "
              f"layers {list(a.layers)}, fell back {c.fell_back} {c.why}, coarse neurons equal {same}, "
              f"top-20 overlap {o}/20", flush=True)
    if args.quadrature:
        ref = knlens_scores(model, prompt, target, hook_point=hook_point, grid="gauss-legendre", steps=256,
                            batch_size=args.batch_size)
        err = lambda s: float((s - ref).abs().max() / ref.abs().max())  # noqa: E731
        peer_err = err(theirs)
        for m in (2, 3, 4, 5, 6, 8, 10, 12, 16):
            t_gl, gl = timed(lambda: knlens_scores(model, prompt, target, hook_point=hook_point,
                                                   grid="gauss-legendre", steps=m, batch_size=args.batch_size),
                             args.repeat)
            if err(gl) <= peer_err:
                p, o = agreement(gl, theirs)
                rows.append((name, n_tok, f"knlens fast, gauss-legendre m={m} (equal accuracy)", t_gl,
                             t_theirs / t_gl, float("nan"), p, o))
                print(f"    equal accuracy: gauss-legendre m={m} error {err(gl):.2e} <= peer's {peer_err:.2e}; "
                      f"{t_gl:.2f} s, ratio {t_theirs / t_gl:.1f}x", flush=True)
                break


def gpt2_cases(args, rows):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config()  # GPT-2 small: 12 layers, d 768, d_mlp 3072, vocab 50257
    torch.manual_seed(args.seed)
    theirs_hf = GPT2LMHeadModel(cfg).eval()
    ours_hf = copy.deepcopy(theirs_hf)  # the bridge rewires its HF model: each side gets its own copy
    tok = make_tokenizer(cfg.vocab_size, masked=False)
    mark_in_memory(tok, "gpt2-small-random")
    model = wrap_hf_model("gpt2-small-random", ours_hf, tok, device="cpu", dtype=torch.float32)
    model.cfg.default_prepend_bos = False  # the peer feeds the prompt without BOS: so do we here
    kn = KnowledgeNeurons(theirs_hf, copy.deepcopy(tok), model_type="gpt", device="cpu")
    for n_words in args.lengths:
        prompt = prompt_of(n_words, seed=n_words)
        ids_ours = model.to_tokens(prompt, prepend_bos=False)[0].tolist()
        ids_theirs = kn.tokenizer(prompt)["input_ids"]
        run_case("gpt2-small", kn, model, prompt, " paris", " paris", "hook_pre", ids_ours, ids_theirs, args, rows)


def bert_cases(args, rows):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(num_hidden_layers=args.bert_layers)
    torch.manual_seed(args.seed)
    theirs_hf = BertForMaskedLM(cfg).eval()
    ours_hf = copy.deepcopy(theirs_hf)
    tok = make_tokenizer(cfg.vocab_size, masked=True)
    mark_in_memory(tok, "bert-base-random")
    model = wrap_hf_model("bert-base-random", ours_hf, tok, device="cpu", dtype=torch.float32)
    kn = KnowledgeNeurons(theirs_hf, copy.deepcopy(tok), model_type="bert", device="cpu")
    from knlens.core.tokens import encode
    for n_words in args.lengths:
        prompt = prompt_of(n_words - 3, seed=n_words) + " [MASK]"  # + [CLS], [SEP]: n_words tokens
        q = encode(model, [prompt], " paris")
        ids_ours = q.tokens[0].tolist()
        ids_theirs = kn.tokenizer(prompt)["input_ids"]
        run_case(f"bert-base ({args.bert_layers} layers)", kn, model, prompt, " paris", "paris", "hook_post",
                 ids_ours, ids_theirs, args, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per side, interleaved, after a warm-up")
    ap.add_argument("--batch-size", type=int, default=256, help="knlens cells per chunk (its default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bert", action="store_true", help="also the BERT-base-shaped masked LM")
    ap.add_argument("--bert-layers", type=int, default=12)
    ap.add_argument("--no-gpt2", action="store_true")
    ap.add_argument("--quadrature", action="store_true", help="also Gauss-Legendre at equal accuracy")
    ap.add_argument("--screen", choices=["gradxact", "gauss2", "gauss3", "gauss4"],
                    help="also knlens with screened integration")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    rows: list[tuple] = []
    if not args.no_gpt2:
        gpt2_cases(args, rows)
    if args.bert:
        bert_cases(args, rows)
    print("\n| model | tokens | method | wall s (min) | speed-up vs EleutherAI (min; median) | Pearson | top-20 overlap |")
    print("|---|---|---|---|---|---|---|")
    for name, n, method, t, ratio, ratio_med, p, o in rows:
        med = "" if ratio_med != ratio_med else f"; {ratio_med:.1f}x"
        print(f"| {name} | {n} | {method} | {t:.2f} | {ratio:.1f}x{med} | {'—' if p != p else f'{p:.6f}'} | {o}/20 |")


if __name__ == "__main__":
    main()
