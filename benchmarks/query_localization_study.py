"""Query localization on real data: consistency of knowledge neurons across ParaRel paraphrases, the
query-KN mapping test, and causal traces by token group, on the embedded model.

One command (from the project root)::

    .venv/bin/python benchmarks/query_localization_study.py            # writes benchmarks/QUERY_LOCALIZATION.md

Facts: ParaRel relations read by ``knlens.data.load_pararel`` from ../shared/data (templates whose object
comes last, ≥ 3 paraphrases), kept when the model's greedy next token equals the target's first token on
at least ``--min-correct`` of its first prompts (default 1: ParaRel is hard for a 135M model); each fact
keeps ``--max-prompts`` paraphrases, the correctly answered ones first. Sized for about 15 minutes on 2 CPU cores; every size
is a flag (``--help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import knlens  # noqa: E402
from knlens.analyses.query_localization import consistency_study, mapping_summary, query_kn_mapping  # noqa: E402
from knlens.engine import target_logits  # noqa: E402
from knlens.facts import Fact  # noqa: E402
from knlens.patching import group_effects, trace  # noqa: E402
from knlens.prompts import encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP_ORDER = ["first subject", "middle subject", "last subject", "further", "last"]


LOADER = "knlens.data.load_pararel"


def _read_pararel(relation: str, data_dir: Path, max_facts: int) -> list[Fact]:
    """Stand-in used only while knlens.data is not installed: same selection rules as load_pararel."""
    import json

    pats = [json.loads(l)["pattern"] for l in (data_dir / "pararel/patterns" / f"{relation}.jsonl").open()]
    prompts = []
    for p in pats:
        p = p.strip().rstrip(".").strip()
        if p.endswith("[Y]") and p.count("[X]") == 1 and p not in prompts:
            prompts.append(p[:-3].rstrip())
    facts = []
    for line in (data_dir / "pararel/tuples" / f"{relation}.jsonl").open():
        t = json.loads(line)
        facts.append(Fact([p.replace("[X]", t["sub_label"]) for p in prompts], " " + t["obj_label"],
                          subject=t["sub_label"], relation=relation, name=f"{relation}:{t['sub_label']}"))
        if len(facts) >= max_facts:
            break
    return facts if len(prompts) >= 3 else []


def load_facts(relation: str, data_dir: Path, max_facts: int) -> list[Fact]:
    global LOADER
    try:
        from knlens.data import load_pararel
    except ImportError:
        LOADER = "the script's stand-in reader (knlens.data was not available)"
        return _read_pararel(relation, data_dir, max_facts)
    return list(load_pararel(relation, data_dir=data_dir, object_last=True, min_paraphrases=3,
                             max_facts=max_facts))


@torch.no_grad()
def first_token_correct(model, fact: Fact) -> list[bool]:
    """Per prompt: the model's greedy next token equals the target's first token."""
    q = encode(model, list(fact.prompts), fact.target)
    first = (q.token_index == 0)
    sub = q.select(first)
    return (target_logits(model, sub).argmax(-1) == sub.target).cpu().tolist()


def md_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = list(frame.columns)
    out = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in r]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relations", nargs="+", default=["P1376", "P36", "P30", "P407"])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--candidates", type=int, default=60, help="facts read per relation before filtering")
    ap.add_argument("--facts", type=int, default=24, help="known facts studied (spread over relations)")
    ap.add_argument("--max-prompts", type=int, default=4, help="paraphrases kept per fact (≥ 3)")
    ap.add_argument("--min-correct", type=int, default=1,
                    help="a fact is known when its greedy next token is right on at least this many prompts")
    ap.add_argument("--check-prompts", type=int, default=8, help="prompts checked per candidate fact")
    ap.add_argument("--steps", type=int, default=8, help="integration steps")
    ap.add_argument("--threshold", type=float, default=0.2, help="coarse neurons: score ≥ t · max")
    ap.add_argument("--trace-facts", type=int, default=10, help="facts traced (first prompt each)")
    ap.add_argument("--trace-layer-stride", type=int, default=1, help="trace every k-th layer")
    ap.add_argument("--samples", type=int, default=2, help="noise samples per trace")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "QUERY_LOCALIZATION.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    say = lambda *m: print(f"[{time.time() - t_start:6.0f}s]", *m, file=sys.stderr, flush=True)  # noqa: E731

    model = knlens.load_model(args.model)
    say("model loaded")
    data_dir = Path(args.data_dir)
    per_rel = max(1, -(-args.facts // len(args.relations)))
    facts, n_read, n_correct = [], 0, {}
    for rel in args.relations:
        kept = []
        for f in load_facts(rel, data_dir, args.candidates):
            n_read += 1
            checked = list(f.prompts[:args.check_prompts])
            try:
                ok = first_token_correct(model, Fact(checked, f.target))
            except knlens.KnlensError:  # a target the tokenizer cannot encode
                continue
            right = [p for p, o in zip(checked, ok) if o]
            if len(right) < args.min_correct:
                continue
            rest = [p for p in f.prompts if p not in right]
            prompts = (right + rest)[:max(3, args.max_prompts)]
            kept.append(Fact(prompts, f.target, subject=f.subject, relation=f.relation or rel,
                             name=f.name or f"{rel}:{f.subject}"))
            n_correct[kept[-1].name] = min(len(right), len(prompts))
            if len(kept) >= per_rel:
                break
        facts += kept
        say(f"{rel}: {len(kept)} known facts")
    facts = facts[:args.facts]
    t_filter = time.time() - t_start

    study = consistency_study(model, facts, steps=args.steps, threshold=args.threshold)
    say("consistency done")
    frame, summary = study.to_frame(), study.summary()
    frame.insert(1, "relation", [f.relation for f in facts])
    mapping = pd.concat([query_kn_mapping(model, f, list(fc.sets)) for f, fc in zip(facts, study.facts)],
                        ignore_index=True)
    msum = mapping_summary(mapping)
    nonempty = mapping[mapping.n_neurons > 0]
    msum_ne = mapping_summary(nonempty) if len(nonempty) else msum.iloc[:0]
    say("mapping done")
    t_cons = time.time() - t_start

    traced = [f for f in facts if f.subject and f.subject in f.prompts[0]][:args.trace_facts]
    layers = list(range(0, model.cfg.n_layers, args.trace_layer_stride))
    traces = []
    for f in traced:
        traces.append(trace(model, f, kinds=("mlp", "attn"), samples=args.samples, layers=layers))
        say(f"traced {f.prompts[0]!r}")
    g = group_effects(traces)
    g = g[g.layer.isin(layers)]
    rows = []
    for kind in ("mlp", "attn"):
        for group in GROUP_ORDER:
            s = g[(g.kind == kind) & (g.group == group)]
            if not len(s):
                continue
            best = s.loc[s.effect.idxmax()]
            rows.append({"kind": kind, "token group": group, "facts": int(s.n.max()),
                         "mean over layers": float(s.effect.mean()), "peak": float(best.effect),
                         "peak layer": int(best.layer)})
    groups = pd.DataFrame(rows)
    t_total = time.time() - t_start
    say("done")

    # ------------------------------------------------------------------------------------ report
    th = study.thresholds()
    share = summary[["score", "threshold", "value", "n_facts", "n_consistent", "n_inconsistent",
                     "share_inconsistent", "welch_t", "welch_p", "cross_p"]]
    frame.insert(3, "n_correct", [n_correct.get(f.name, 0) for f in facts])
    per_fact = frame[["fact", "relation", "n_prompts", "n_correct", "mean_neurons", "intersection_neurons",
                      "jaccard", "niu", "mean_p_clean"]]
    p_clean = pd.DataFrame([{"fact": t.prompt, "p_clean": t.p_clean, "p_corrupted": t.p_corrupted,
                             "total effect": t.total_effect} for t in traces])
    lines = [
        "# Query localization on ParaRel — measured",
        "",
        f"Generated by `benchmarks/query_localization_study.py` on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        f"(machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, shared with other jobs; wall time "
        f"{t_total / 60:.1f} min: filtering {t_filter / 60:.1f}, consistency + mapping "
        f"{(t_cons - t_filter) / 60:.1f}, tracing {(t_total - t_cons) / 60:.1f}).",
        "",
        f"Model `{args.model}` ({model.cfg.n_layers} layers, d_mlp {model.cfg.d_mlp}). Relations "
        f"{', '.join(args.relations)}; {n_read} ParaRel facts read with {LOADER} (object-last templates, ≥ 3 paraphrases), "
        f"{len(facts)} kept: the model's greedy next token equals the target's first token on ≥ {args.min_correct} "
        f"of the first {args.check_prompts} prompts. Each kept fact uses {args.max_prompts} paraphrases, the "
        f"correctly answered ones first (on average {sum(n_correct.values()) / max(1, len(n_correct)):.1f} of "
        f"them answered correctly); ParaRel is hard for a 135M model, hence the loose criterion.",
        "",
        f"Neurons per prompt: coarse neurons of integrated gradients (`hook_post`, {args.steps} steps, right "
        f"Riemann grid, P(target)), score ≥ {args.threshold} × the prompt's maximum. Consistency of a fact = mean "
        "pairwise Jaccard of its prompts' sets; Niu similarity = (σ₁² − 1)/(n − 1) of the row-normalised "
        "attribution matrix. A fact is consistent when its score ≥ the threshold.",
        "",
        "## Share of inconsistent facts",
        "",
        md_table(share),
        "",
        "`welch_t`, `welch_p`: Welch t-test of the score between the consistent and inconsistent groups; "
        "`cross_p`: the same groups compared on the other score (Jaccard split → Niu and vice versa).",
        "",
        "## Query-KN mapping: suppressing (×0) neurons on a query",
        "",
        "Relative change of P(target) on query i when suppressing its own coarse neurons, those of a "
        "paraphrase j, or their intersection (all ordered pairs i ≠ j of every fact).",
        "",
        md_table(msum),
        "",
        "Same, restricted to non-empty sets:",
        "",
        md_table(msum_ne),
        "",
        f"## Causal tracing by token group ({len(traces)} facts, first prompt each)",
        "",
        f"Subject embeddings + ν·N(0, I), ν = 3 × std of the token embeddings, {args.samples} noise samples; "
        f"restoring the MLP or attention output of a window of 10 layers around each traced layer "
        f"(layers {layers[0]}, {layers[1] if len(layers) > 1 else ''}, … every {args.trace_layer_stride}). "
        "Indirect effect = P_restored − P_corrupted, averaged over facts per layer, then the mean over the traced "
        "layers and the peak layer.",
        "",
        md_table(groups),
        "",
        md_table(p_clean),
        "",
        "## Per fact",
        "",
        md_table(per_fact),
        "",
        f"Thresholds: Otsu on Jaccard {th[('jaccard', 'otsu')]:.3f}, on Niu {th[('niu', 'otsu')]:.3f}; static "
        f"{study.static_threshold}. Settings: {vars(args)}.",
        "",
        "Reference (methods.md §4, **[unverified]**): 77 % of facts inconsistent in LLaMA3-8B, fewer in GPT-2. "
        "Meng et al. (GPT-2 XL, **[unverified]**): MLP effect strongest at the last subject token in middle "
        "layers, attention at the last token in late layers.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
