"""knlens: find, test and edit the neurons that carry knowledge in transformer language models.

>>> import knlens
>>> model = knlens.load_model("tiny-llama")
>>> fact = knlens.Fact(["the capital of france is", "the capital city of france is"], " paris")
>>> attributions = knlens.attribute(model, fact, steps=8)
>>> neurons = knlens.refined_neurons(attributions, preset="eleuther")

Research analyses live in :mod:`knlens.analyses` (query localization, consistency of neurons).
"""

__version__ = "0.1.0"

from .attribution import GRIDS, Attribution, AttributionSettings, attribute, integrated_gradients, quadrature
from .engine import activations_at, target_probs
from .errors import (HookShapeError, KnlensError, MissingWeightsError, NeuronIndexError, NonFiniteError,
                     PromptError, TargetError, UnknownModelError)
from .facts import Fact
from .hooks import (add, compose, hook_name, hooked, mean_ablate, neuron_hooks, patch_from, replace_rows, scale,
                    set_value, zero_ablate)
from .interventions import InterventionResult, intervene, measure, random_control
from .known import answers, known_facts
from .data import builtin_facts, get_fact, load_blimp, load_mpararel, load_pararel
from .locate import LocateResult, LocateSettings, TokenActivations, locate, token_activations
from .patching import Corruption, Trace, trace, trace_facts
from .report import render_html, token_view, write_html
from .models import EMBEDDED_MODELS, TINY_MODELS, load_model, random_model, tiny_model
from .neurons import Neuron, NeuronSet
from .prompts import Queries, encode, single_token, target_tokens
from .selection import PRESETS, coarse, drop_generic, generic_neurons, refine, refine_facts, refined_neurons

__all__ = [
    "Attribution", "AttributionSettings", "EMBEDDED_MODELS", "Fact", "GRIDS", "HookShapeError",
    "InterventionResult", "KnlensError", "MissingWeightsError", "Neuron", "NeuronIndexError", "NeuronSet",
    "NonFiniteError", "PRESETS", "PromptError", "Queries", "TINY_MODELS", "TargetError", "UnknownModelError",
    "activations_at", "add", "attribute", "coarse", "compose", "drop_generic", "encode", "generic_neurons",
    "hook_name", "hooked", "integrated_gradients", "intervene", "load_model", "mean_ablate", "measure",
    "neuron_hooks", "patch_from", "quadrature", "random_control", "refine", "refine_facts", "refined_neurons",
    "replace_rows", "scale", "set_value", "single_token", "target_probs", "target_tokens", "tiny_model", "random_model",
    "zero_ablate", "answers", "known_facts", "builtin_facts", "get_fact", "load_blimp", "load_mpararel",
    "load_pararel", "LocateResult", "LocateSettings", "TokenActivations", "locate", "token_activations",
    "Corruption", "Trace", "trace", "trace_facts", "render_html", "token_view", "write_html",
]
