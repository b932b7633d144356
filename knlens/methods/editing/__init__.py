"""Edits as reversible weight changes (docs/methods.md, editing): the :class:`Edit` value, Dai et al.'s
knowledge-neuron edits, a rank-one (ROME-style) edit, and their evaluation."""
