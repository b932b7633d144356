"""KN value slots on a Gemma-3-shaped model (gated MLP, a norm between W_out and the residual stream): the slot is
``down_proj`` along its neuron axis, the norm after it is the one knlens divides by, and a KN update then writes
the new object's direction into the residual stream — which Dai's step as written does not."""

from __future__ import annotations

import pytest
import torch

import knlens
from knlens import Fact, NeuronSet
from knlens.methods.editing.kn import kn_erase, kn_update
from knlens.methods.editing.slots import post_mlp_gain, token_vector, value_slot, value_vectors

FACT = Fact(["the capital of france is", "the capital city of france is"], " paris", subject="france")
LAYER = 1


@pytest.fixture(scope="module")
def gemma_like(make_tiny_gemma3):
    model = make_tiny_gemma3()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # Gemma's norms start at weight 0 (gain 1): make the post-MLP gains uneven, as trained ones are
        for block in model.blocks:
            w = block.ln2_post.original_component.weight
            w.copy_(0.5 * torch.randn(w.shape, generator=g))
    return model


def _resid_post(model, prompt):
    _, cache = model.run_with_cache(model.to_tokens(prompt))
    return cache


def test_the_slot_is_down_proj_and_the_post_mlp_norm_sits_between_it_and_the_residual(gemma_like):
    slot = value_slot(gemma_like, LAYER)
    assert slot.axis == 1 and "down_proj" in slot.name
    cache = _resid_post(gemma_like, FACT.prompts[0])
    block = gemma_like.blocks[LAYER]
    post, out = cache[f"blocks.{LAYER}.mlp.hook_post"], cache[f"blocks.{LAYER}.mlp.hook_out"]
    torch.testing.assert_close(out, post @ value_vectors(gemma_like, slot), atol=1e-5, rtol=1e-5)
    norm = block.ln2_post.original_component
    torch.testing.assert_close(cache[f"blocks.{LAYER}.hook_resid_post"], cache[f"blocks.{LAYER}.hook_resid_mid"] + norm(out),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post_mlp_gain(gemma_like, LAYER), 1 + norm.weight.detach(), atol=1e-5, rtol=1e-5)


def _written(model, edit, prompt):
    """The change of the residual stream at the prompt's last token that the edit causes, with the part along
    the block's own (normalised) MLP output removed (the norm's common scale moves that part)."""
    before = _resid_post(model, prompt)
    with edit.apply(model):
        after = _resid_post(model, prompt)
    key = f"blocks.{LAYER}.hook_resid_post"
    delta = (after[key] - before[key])[0, -1].double()
    y = (before[key] - before[f"blocks.{LAYER}.hook_resid_mid"])[0, -1].double()
    return delta - (delta @ y) / (y @ y) * y, y


def _cos_outside(a, b, y):
    b = b - (b @ y) / (y @ y) * y
    return float(a @ b / (a.norm() * b.norm()))


def test_a_kn_update_writes_the_new_objects_direction_through_the_norm(gemma_like):
    neuron = int(_resid_post(gemma_like, FACT.prompts[0])[f"blocks.{LAYER}.mlp.hook_post"][0, -1].abs().argmax())
    e_new = token_vector(gemma_like, " berlin").double()
    kw = dict(lambda1=0.0, lambda2=1e-3)  # a small step: the norm acts linearly
    through, y = _written(gemma_like, kn_update(gemma_like, FACT, " berlin", NeuronSet([(LAYER, neuron)]), **kw),
                          FACT.prompts[0])
    as_written, _ = _written(gemma_like, kn_update(gemma_like, FACT, " berlin", NeuronSet([(LAYER, neuron)]),
                                                   post_norm=False, **kw), FACT.prompts[0])
    cos_through, cos_plain = _cos_outside(through, e_new, y), _cos_outside(as_written, e_new, y)
    print(f"\ncos(residual change, e_new) outside the MLP output: through the norm {cos_through:.5f}, "
          f"Dai's step as written {cos_plain:.5f}")
    assert cos_through > 0.999
    gain = post_mlp_gain(gemma_like, LAYER).double()
    assert _cos_outside(as_written, gain * e_new, y) > 0.999  # as written, the residual receives g ⊙ e instead
    assert cos_plain < 0.99


def test_the_correction_is_a_no_op_without_a_post_mlp_norm(tiny_llama, gemma_like):
    assert post_mlp_gain(tiny_llama, LAYER) is None
    a = kn_update(tiny_llama, FACT, " berlin", NeuronSet([(LAYER, 3)]))
    b = kn_update(tiny_llama, FACT, " berlin", NeuronSet([(LAYER, 3)]), post_norm=False)
    assert a.digest == b.digest
    erase = kn_erase(gemma_like, NeuronSet([(LAYER, 3)]))
    gain = post_mlp_gain(gemma_like, LAYER)
    unk = gemma_like.W_U[:, gemma_like.tokenizer.unk_token_id].detach()
    torch.testing.assert_close(erase.slices[0].new[:, 0] * gain, unk.float(), atol=1e-5, rtol=1e-5)
    assert knlens.fingerprint(gemma_like) == erase.fingerprint
