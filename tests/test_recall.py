"""The recall study (knlens/data/two_hop.py, knlens/methods/recall*.py, generation_hooks.py, the study and its page):
the chain builder on hand-made tuples, the recall score of a planted neuron, hooks active at every generated step
and removed afterwards (errors included), bad input; a short real run on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knlens import Fact, NeuronSet
from knlens.cli import main
from knlens.core.errors import NoChainError, SettingsError
from knlens.core.tokens import encode
from knlens.data.pararel import default_data_dir
from knlens.data.two_hop import CHAINS, TwoHop, chains_in, compose, two_hop_questions
from knlens.methods.generation_hooks import generate, scaling_hooks
from knlens.methods.recall import recall_profile, recall_scores, recalled, reference_levels
from knlens.methods.recall_answers import answer, cot_answer
from knlens.run.engine import forward
from knlens.run.hooks import capture, hooked

P17 = [Fact(["a is located in"], " germany", subject="a", relation="P17", name="P17-0"),
       Fact(["b is located in"], " france", subject="b", relation="P17", name="P17-1"),
       Fact(["c is located in"], " spain", subject="c", relation="P17", name="P17-2"),
       Fact(["d is located in"], " japan", subject="d", relation="P17", name="P17-3")]
P36 = [Fact(["the capital of germany is"], " berlin", subject="germany", relation="P36", name="P36-0"),
       Fact(["the capital of france is"], " paris", subject="france", relation="P36", name="P36-1"),
       Fact(["the capital of spain is"], " madrid", subject="spain", relation="P36", name="P36-2"),
       Fact(["the capital city of spain is"], " rome", subject="spain", relation="P36", name="P36-3")]


def _mlp_hooks(model, layer=0):
    return model.hook_dict[f"blocks.{layer}.mlp.hook_post"].fwd_hooks


def test_chains_join_on_the_bridge_and_drop_ambiguous_and_missing_second_hops():
    made = compose(P17, P36, ("P17", "P36"))
    # germany and france join; spain has two capitals (ambiguous); japan has no second hop
    assert [(q.subject, q.bridge, q.answer) for q in made] == [("a", " germany", " berlin"), ("b", " france", " paris")]
    q = made[0]
    assert q.question == CHAINS[("P17", "P36")].replace("[X]", "a") and q.hop1 is P17[0] and q.hop2 is P36[0]
    assert q.cot_prompt(" france") == "a is located in france. the capital of france is"
    assert compose(P17, [], ("P17", "P36")) == []


def test_the_chain_builder_reads_pararel_files(tmp_path):
    root = tmp_path / "pararel"
    for rel, patterns, tuples in [
            ("P17", ["[X] is located in [Y] .", "[X], located in [Y]."], [("a", "Germany"), ("b", "Peru"), ("c", "Spain")]),
            ("P36", ["The capital of [X] is [Y] ."], [("Germany", "Berlin"), ("Spain", "Madrid"), ("Spain", "Toledo")]),
            ("P19", ["[X] was born in [Y] ."], [("x", "Lima")])]:
        for folder, rows in [("patterns", [{"pattern": p} for p in patterns]),
                             ("tuples", [{"sub_label": s, "obj_label": o} for s, o in tuples])]:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{rel}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    questions, counts = two_hop_questions(["P17", "P36"], tmp_path)
    assert counts == [{"chain": "P17->P36", "template": CHAINS[("P17", "P36")], "joined": 2, "ambiguous": 1,
                       "questions": 1, "sampled": 1}]
    assert questions[0].question == "The capital of the country where a is located is"
    assert questions[0].hop1.prompts == ("a is located in", "a, located in") and questions[0].answer == " Berlin"
    with pytest.raises(NoChainError, match="P17, P19"):
        two_hop_questions(["P17", "P19"], tmp_path)
    (root / "patterns" / "P20.jsonl").write_text(json.dumps({"pattern": "[X] died in [Y] ."}))
    (root / "patterns" / "P1376.jsonl").write_text(json.dumps({"pattern": "[X] is the capital of [Y] ."}))
    (root / "tuples" / "P20.jsonl").write_text(json.dumps({"sub_label": "y", "obj_label": "Oslo"}))
    (root / "tuples" / "P1376.jsonl").write_text(json.dumps({"sub_label": "Lima", "obj_label": "Peru"}))
    with pytest.raises(NoChainError, match="no first-hop object"):
        two_hop_questions(["P20", "P1376"], tmp_path)


def test_bad_input_raises_specific_errors(tiny_llama):
    with pytest.raises(NoChainError, match="P19 -> P36"):
        compose(P17, P36, ("P19", "P36"))
    with pytest.raises(NoChainError, match="P101, P106"):
        chains_in(["P106", "P101"])
    with pytest.raises(SettingsError, match="silent"):
        recall_scores(torch.ones(3, 2), torch.zeros(2))
    with pytest.raises(SettingsError, match="max_new_tokens"):
        generate(tiny_llama, "the capital of", 0)


def test_no_chain_on_the_command_line_is_one_error_line(capsys):
    assert main(["study", "recall", "--model", "tiny-llama", "--quiet", "--relations", "P19", "P101"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "P101, P19" in err[0] and "form no two-hop chain" in err[0]


def _planted(model, token: str, value: float, layer: int = 0, index: int = 5):
    """Hooks that make neuron ``(layer, index)`` fire on ``token``: ``value`` wherever the input embedding is that
    token's, 0 elsewhere."""
    row = model.W_E[model.tokenizer.convert_tokens_to_ids(token)]
    where: dict[str, torch.Tensor] = {}

    def find(act, hook):
        where["on"] = torch.isclose(act, row.to(act.dtype)).all(-1)

    def fire(act, hook):
        out = act.clone()
        out[..., index] = torch.where(where["on"], value, 0.0).to(act.dtype)
        return out
    return [("hook_embed", find), (f"blocks.{layer}.mlp.hook_post", fire)]


@pytest.mark.parametrize("value", [3.0, -2.0])
def test_the_recall_score_of_a_planted_neuron(tiny_llama, value):
    """A neuron that fires only on "germany": score 1 where the text reads germany, 0 elsewhere, whatever its sign;
    the planting hooks run before the reading ones (attached first)."""
    kn = NeuronSet([(0, 5)])
    text = "berlin is located in germany and the capital of germany is"
    with hooked(tiny_llama, _planted(tiny_llama, "germany", value)):
        ref = reference_levels(tiny_llama, Fact(["the capital of germany"], " is"), kn)
        question = recall_profile(tiny_llama, "the capital of the country where berlin is located is", kn, ref)
        cot = recall_profile(tiny_llama, text, kn, ref)
    assert ref.tolist() == [value]
    assert question.peak() == 0.0 and not recalled(question.peak())
    at = [i for i, t in enumerate(cot.tokens) if t == "germany"]
    assert len(at) == 2 and cot.scores[at].tolist() == [1.0, 1.0] and recalled(cot.peak())
    assert float(cot.scores.abs().sum()) == 2.0 and cot.peak_position() == at[0]
    assert cot.peak(start=at[0] + 1) == 1.0 and cot.peak(start=-1) == 0.0
    # unplanted, the same neuron does not follow germany
    plain = recall_profile(tiny_llama, text, kn, ref)
    assert not torch.equal(plain.scores, cot.scores) and _mlp_hooks(tiny_llama) == []


def test_hooks_are_active_at_every_generated_step_and_removed_afterwards(tiny_llama):
    seen: list[torch.Tensor] = []
    hooks = [*scaling_hooks(NeuronSet([(0, 4), (0, 9)]), 0.0), ("blocks.0.mlp.hook_post", capture(seen))]
    g = generate(tiny_llama, "the capital of france is", 4, hooks=hooks, stop=None)
    assert len(g.new_tokens) == 4 and len(seen) == 4               # one forward per generated token
    assert [s.shape[1] for s in seen] == [6, 7, 8, 9]              # each over the text so far, the new token included
    assert all(float(s[..., [4, 9]].abs().max()) == 0.0 for s in seen) and all(float(s.abs().max()) > 0 for s in seen)
    assert _mlp_hooks(tiny_llama) == []
    # the suppressed generation is what a plain forward with the same hooks predicts at each step
    tokens = torch.tensor([list(g.prompt_tokens) + list(g.new_tokens)])
    logits = forward(tiny_llama, tokens, scaling_hooks(NeuronSet([(0, 4), (0, 9)]), 0.0))
    assert logits[0, len(g.prompt_tokens) - 1:-1].argmax(-1).tolist() == list(g.new_tokens)


def test_hooks_are_removed_after_an_error(tiny_llama):
    def boom(text):
        raise KeyboardInterrupt("stopped by the user")
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_llama, "the capital of france is", 3, hooks=scaling_hooks(NeuronSet([(0, 1)]), 2.0), stop=boom)
    assert _mlp_hooks(tiny_llama) == []
    before = forward(tiny_llama, tiny_llama.to_tokens("the capital of"))
    assert torch.equal(before, forward(tiny_llama, tiny_llama.to_tokens("the capital of")))


def test_answers_agree_with_a_plain_forward_and_cot_hooks_every_step(tiny_llama):
    q = encode(tiny_llama, ["the capital of france is"], " paris city")
    logits = forward(tiny_llama, q.tokens, scaling_hooks(NeuronSet([(1, 2)]), 2.0))
    probs = logits[1, q.position].softmax(-1)[torch.arange(2), q.target]
    a = answer(tiny_llama, "the capital of france is", " paris city", scaling_hooks(NeuronSet([(1, 2)]), 2.0))
    assert a.p == pytest.approx(float(probs.prod()), rel=1e-5)
    assert a.correct == bool((logits[1, q.position].argmax(-1) == q.target).all())
    two = TwoHop("q", ("P17", "P36"), "a", " germany", " berlin", "the capital of the country where a is located is",
                 Fact(["a is located in"], " germany", subject="a"),
                 Fact(["the capital of germany is"], " berlin", subject="germany"))
    seen: list[torch.Tensor] = []
    cot = cot_answer(tiny_llama, two, [("blocks.1.mlp.hook_post", capture(seen))], bridge_tokens=3)
    n_new = len(seen) - 1                                           # the generated steps, then the answer
    assert 1 <= n_new <= 3 and cot.prompt == two.cot_prompt(cot.bridge) and _mlp_hooks(tiny_llama, 1) == []
    assert seen[-1].shape[1] == tiny_llama.to_tokens(cot.prompt).shape[1]


@pytest.mark.integration
def test_the_study_runs_on_the_embedded_model_and_writes_its_page(real_model, tmp_path):
    from knlens.studies.recall_study import TABLES, RecallSettings, RecallStudy, recall_study
    from knlens.viz.recall_page import render_markdown

    if not Path(default_data_dir()).exists():
        pytest.skip("ParaRel data not found beside the repository")
    questions, _ = two_hop_questions(["P1376", "P30"])
    picked = [q for q in questions if q.subject in ("Lisbon", "Cairo", "Bangkok")]  # both hops known by SmolLM2
    s = RecallSettings(relations=("P1376", "P30"), max_questions=1, attribute_prompts=1, steps=2,
                       n_random=1, bridge_tokens=2)
    r = recall_study(real_model, s, questions=picked)
    assert set(r.tables) == set(TABLES) and r.numbers["questions"] == 1.0
    counts = r.tables["counts"].iloc[0]
    assert counts["sampled"] == 3 and counts["both known"] <= min(counts["first hop known"], counts["second hop known"])
    assert counts["both known"] >= 1 and counts["studied"] == 1
    rec = r.tables["recall"]
    assert list(rec.neurons) == ["knowledge", "matched"] and rec["peak cot emit"].notna().all()
    assert (rec["recalled, specific"] <= rec["recalled"]).all() and rec["peak other question"].notna().all()
    acc = r.tables["accuracy"]
    assert len(acc) == 2 * (1 + 2 * 2)                                   # (no) CoT x (none, 2 actions x 2 sets)
    none = acc[(acc.action == "none") & ~acc.cot].iloc[0]
    assert none["accuracy"] == r.numbers["accuracy without CoT"]
    assert RecallStudy.load(r.save(tmp_path / "saved")) == r
    page = render_markdown(r)
    for heading in ("## Headline", "## Questions and filters", "## Recall scores", "## Limitations"):
        assert heading in page
