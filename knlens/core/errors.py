"""The exceptions knlens raises for bad input. Each message names the problem and the fix."""

from __future__ import annotations


class KnlensError(Exception):
    """Base class of every error knlens raises on purpose."""


class UnknownModelError(KnlensError, ValueError):
    """A model name that is neither embedded, nor a local path, nor loadable from a hub."""


class MissingWeightsError(KnlensError, ImportError):
    """An embedded model whose weights package is not installed."""


class TargetError(KnlensError, ValueError):
    """A target that is empty, unknown to the vocabulary, or not a single token when one is required."""


class PromptError(KnlensError, ValueError):
    """An empty prompt, or one that does not fit the model (no ``[MASK]`` for a masked LM, too long)."""


class NeuronIndexError(KnlensError, IndexError):
    """A layer or neuron index outside the model."""


class HookShapeError(KnlensError, ValueError):
    """A hook that received or returned a tensor of the wrong shape."""


class NonFiniteError(KnlensError, FloatingPointError):
    """NaN or infinite values where finite numbers are required."""


class EngineFallbackWarning(UserWarning):
    """A fast engine disagreed with a plain forward of the model and was replaced by a slower one that
    agrees; the result's settings record the engine that actually ran."""


class ScreenFallbackWarning(UserWarning):
    """A screened integration whose check failed: the layers the screen left out may hold neurons that
    matter, so every layer was integrated exactly; the result's settings record why."""


class EngineCheckError(KnlensError, RuntimeError):
    """Even the slowest engine disagrees with a plain forward of the model: no number can be trusted."""


class SelectionError(KnlensError, ValueError):
    """An unknown selection preset, or selection settings that cannot select anything."""


class ControlError(KnlensError, ValueError):
    """A control or held-out evaluation that cannot be built from the given input (no facts of other
    relations, too few prompts to hold one out, bad bin counts, one neuron set per fact missing)."""


class TracingSettingError(KnlensError, ValueError):
    """A causal-tracing setting that cannot work: a window below 1, an unknown kind, engine or corruption,
    fewer than one noise sample, a non-positive noise scale or batch size."""


class NotKnownError(KnlensError, ValueError):
    """A fact the model does not know (its clean top prediction is not the target) where a method traces
    only known facts, as Meng et al. did; the message names the override."""


class SettingsError(KnlensError, ValueError):
    """A method setting outside its domain: steps, grid, engine, dtype, quantity, batch size, tolerance, an
    unknown hook point, a model config the built-in tokenizer cannot serve."""


class FactError(KnlensError, ValueError):
    """A fact that cannot be built or used: a dictionary with missing or unknown keys, attributions that
    belong to another fact."""


class CommandLineError(KnlensError, ValueError):
    """A misuse of the ``knlens`` command line (missing or conflicting options, a value out of range)."""


class DataNotFoundError(KnlensError, FileNotFoundError):
    """A data set (ParaRel, mParaRel, BLiMP) whose folder or files are not where they were looked for."""


class DataFormatError(KnlensError, ValueError):
    """A data file or record that cannot be read (not JSON, missing keys, a pair that cannot be a fact)."""


class OutputError(KnlensError, OSError):
    """An output folder or file that cannot be created or written."""


class CompletenessWarning(UserWarning):
    """Integrated gradients whose completeness error stayed above the tolerance after the largest
    refinement allowed (``max_steps``): the scores do not add up to the effect they explain."""


class InsufficientDataError(KnlensError, ValueError):
    """Too few values (or values without any spread) for the statistic asked for."""


class ResultFormatError(KnlensError, ValueError):
    """A folder that does not hold a saved knlens result, or one this knlens cannot read."""


class StoreFormatError(KnlensError, ValueError):
    """A folder that is not a knlens results store, one written in another store format, or a key that
    names no stored result."""


class QueryError(KnlensError, ValueError):
    """An SQL query over a results store that DuckDB cannot run (the message is DuckDB's, on one line)."""


class SweepError(KnlensError, ValueError):
    """A sweep that cannot start: an unknown study, a data spec that names no data set, a setting the
    study does not take."""


class RayNotInstalledError(KnlensError, ImportError):
    """The Ray executor asked for where Ray is not installed (``pip install 'knlens[ray]'``)."""


class RayUnreachableError(KnlensError, ConnectionError):
    """A Ray cluster address that cannot be reached (nothing listens there, or Ray refuses to connect); raised
    before any task runs."""


class RayWorkerError(KnlensError, RuntimeError):
    """A Ray worker that cannot serve a sweep (the cluster cannot place one, it cannot load the model, it runs
    another knlens version than the driver), or that died under a task (recorded as that task's error)."""


class SameTargetError(TargetError):
    """An edit whose new target is the old one (the same tokens): there is nothing to change."""


class EditModelError(KnlensError, ValueError):
    """An edit applied to a model other than the one it was made for (its weights' fingerprint differs), one
    that names weights the model does not have, or an architecture whose value vectors cannot be edited."""


class EditStateError(KnlensError, RuntimeError):
    """An edit applied twice, undone when it is not applied, or undone after something else changed the
    weights it wrote (undo later edits first)."""


class NoOpEditError(KnlensError, ValueError):
    """An edit that does not change the model's weights (no neurons, zero step sizes, new values equal to the
    old ones): it would make every evaluation a row of unchanged numbers."""


class NoSymmetryError(KnlensError, ValueError):
    """Bijective symmetry asked of a relation that has no reverse reading: not declared symmetric or bijective
    (``knlens.data.pararel.SYMMETRIC_RELATIONS``), or without templates that ask the subject from the object."""


class UnknownLanguageError(KnlensError, ValueError):
    """A language a multilingual data set has no data for (the message lists the languages it has)."""


class MissingTranslationError(KnlensError, LookupError):
    """A fact asked for in a language that does not have it (no tuple, or no usable template of its relation
    there); the message names the fact and the languages that lack it."""


class TooFewNeuronsError(KnlensError, ValueError):
    """Too few located neurons (or none connected) to cluster them by structure: the message names the count
    and the threshold."""


class OptionLetterError(TargetError):
    """Multiple-choice option letters that are not distinct single tokens of the model's tokenizer (the message
    names them)."""


class TooFewOptionsError(InsufficientDataError):
    """A relation with too few distinct objects to fill the options of a multiple-choice question (the message
    names the relation and the count)."""


class EmptyStageError(SelectionError):
    """A two-stage filter whose stage keeps no neuron; the message names the thresholds that emptied it."""


class ModalityError(KnlensError, NotImplementedError):
    """An input the model cannot read (an image given to a text-only model): the message names the model needed."""


class NoChainError(KnlensError, ValueError):
    """Relations that form no two-hop chain: no hand-written question template joins them, or no first-hop
    object is the subject of a second-hop fact (``knlens.data.two_hop.CHAINS`` lists the chains)."""


class SpellingError(KnlensError, ValueError):
    """A token that cannot be spelled out: too short, not lowercase letters, not one vocabulary entry, or a
    spelling prompt whose characters are not single tokens of the model."""
