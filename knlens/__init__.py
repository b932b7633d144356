"""knlens: find, test and edit the neurons that carry knowledge in transformer language models.

>>> import knlens
>>> model = knlens.load_model("tiny-llama")
>>> fact = knlens.Fact(["the capital of france is", "the capital city of france is"], " paris")
>>> attributions = knlens.attribute(model, fact, steps=8)
>>> neurons = knlens.refined_neurons(attributions, preset="eleuther")

Research studies live in :mod:`knlens.studies` (query localization, consistency of neurons).
"""

from knlens.core.versions import __version__

from knlens.methods.attribution.grids import GRIDS, quadrature
from knlens.methods.attribution.result import Attribution, AttributionSettings
from knlens.methods.attribution.ig import attribute, attribute_facts, integrated_gradients
from knlens.methods.attribution.amig import attribute_amig, attribute_amig_facts
from knlens.run.engine import activations_at, target_probs
from knlens.core.errors import (HookShapeError, KnlensError, MissingWeightsError, NeuronIndexError, NonFiniteError,
                                PromptError, TargetError, UnknownModelError)
from knlens.core.facts import Fact
from knlens.run.hooks import (add, compose, hook_name, hooked, mean_ablate, neuron_hooks, patch_from, replace_rows,
                              scale, set_value, zero_ablate)
from knlens.methods.interventions import InterventionResult, intervene, measure
from knlens.methods.editing.edit import Edit, fingerprint
from knlens.methods.editing.criteria import (criterion_values, entity_relation_editors, relation_probes,
                                             symmetry_request, synonym_request)
from knlens.methods.editing.editors import EditRequest, Probe
from knlens.methods.editing.evaluate import evaluate_edits
from knlens.methods.editing.kn import kn_erase, kn_update, random_neuron_edit
from knlens.methods.editing.rank_one import rank_one_edit
from knlens.methods.editing.memla import memla_edit
from knlens.methods.editing.editors import memla_editor
from knlens.methods.multilingual.edit_matrix import cross_lingual_edits
from knlens.methods.multilingual.edit_matrix_result import EditMatrix
from knlens.methods.multilingual.degenerate import DegeneratePairs, degenerate_pairs
from knlens.methods.editing.result import EditEvaluation
from knlens.methods.controls import random_control
from knlens.methods.known import answers, known_facts
from knlens.data.builtin import builtin_facts, get_fact
from knlens.data.blimp import load_blimp
from knlens.data.pararel import load_mpararel, load_pararel
from knlens.studies.knowledge_neurons_result import LocateResult, LocateSettings
from knlens.methods.activations import TokenActivations, token_activations
from knlens.studies.knowledge_neurons import locate, locate_facts
from knlens.methods.tracing.corruption import Corruption
from knlens.methods.tracing.result import Trace
from knlens.methods.tracing.trace import trace, trace_facts
from knlens.viz.edit_page import render_edit_html, write_edit_html
from knlens.viz.report import render_html, write_html
from knlens.viz.tokens import token_view
from knlens.results.contract import Result, load_result, same
from knlens.core.models import EMBEDDED_MODELS, TINY_MODELS, load_model, random_model, tiny_model
from knlens.core.neurons import Neuron, NeuronSet
from knlens.core.tokens import Queries, encode, single_token, target_tokens
from knlens.methods.selection import (PRESETS, coarse, drop_generic, generic_neurons, refine, refine_facts,
                                      refined_neurons)

__all__ = [
    "__version__",
    "Attribution", "AttributionSettings", "EMBEDDED_MODELS", "Fact", "GRIDS", "HookShapeError",
    "InterventionResult", "KnlensError", "MissingWeightsError", "Neuron", "NeuronIndexError", "NeuronSet",
    "NonFiniteError", "PRESETS", "PromptError", "Queries", "TINY_MODELS", "TargetError", "UnknownModelError",
    "activations_at", "add", "attribute", "attribute_amig", "attribute_amig_facts", "attribute_facts", "coarse",
    "compose", "drop_generic", "encode", "generic_neurons",
    "hook_name", "hooked", "integrated_gradients", "intervene", "load_model", "mean_ablate", "measure",
    "neuron_hooks", "patch_from", "quadrature", "random_control", "refine", "refine_facts", "refined_neurons",
    "replace_rows", "scale", "set_value", "single_token", "target_probs", "target_tokens", "tiny_model", "random_model",
    "zero_ablate", "answers", "known_facts", "builtin_facts", "get_fact", "load_blimp", "load_mpararel",
    "load_pararel", "LocateResult", "LocateSettings", "TokenActivations", "locate", "locate_facts", "token_activations",
    "Corruption", "Trace", "trace", "trace_facts", "render_html", "token_view", "write_html",
    "Result", "load_result", "same",
    "Edit", "EditEvaluation", "EditRequest", "evaluate_edits", "fingerprint", "kn_erase", "kn_update",
    "random_neuron_edit", "rank_one_edit", "Probe", "criterion_values", "entity_relation_editors",
    "relation_probes", "symmetry_request", "synonym_request", "render_edit_html", "write_edit_html",
    "memla_edit", "memla_editor", "cross_lingual_edits", "EditMatrix", "degenerate_pairs", "DegeneratePairs",
]
