"""Shared fixtures. Shapes in knlens' signatures are checked at run time (jaxtyping + beartype)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub; fail fast instead
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray in tests: loopback (127.0.0.1) only, never the
# machine's network address (read when ray is first imported)

import pytest  # noqa: E402
import torch  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("knlens", "beartype.beartype"):
    import knlens  # noqa: E402,F401

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama():
    return knlens.tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return knlens.tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_bert():
    return knlens.tiny_model("bert")


@pytest.fixture(scope="session", params=["llama", "gpt2", "bert"])
def tiny(request):
    return knlens.tiny_model(request.param)


@pytest.fixture(scope="session")
def make_tiny_gemma3():
    """A builder of fresh random 2-block Gemma-3 models on the tiny vocabulary (d_model 32, d_mlp 48): a norm after
    W_out (``ln2_post``) and embeddings scaled by √d_model, as the embedded Gemma has."""
    from transformers import Gemma3TextConfig

    def build():
        config = Gemma3TextConfig(
            vocab_size=len(knlens.core.models.TINY_VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16,
            bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=0.25, architectures=["Gemma3ForCausalLM"])
        return knlens.core.models.random_model(config, name="tiny-gemma3")

    return build


def embedded_model(name: str):
    """An embedded model, or a skip naming the weights package that is not installed."""
    try:
        return knlens.load_model(name)
    except knlens.MissingWeightsError as err:
        pytest.skip(f"embedded model {name} not installed: {err}")


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M."""
    return embedded_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma-3-270M (the `gemma` extra)."""
    return embedded_model("gemma3-270m")
