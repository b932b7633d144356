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
