"""Every docstring example in the package runs and prints what it says (tiny in-memory models only)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import knlens

# __main__ runs the command line on import
MODULES = sorted(m.name for m in pkgutil.walk_packages(knlens.__path__, "knlens.") if m.name != "knlens.__main__")


def n_examples(name: str) -> int:
    return sum(len(t.examples) for t in doctest.DocTestFinder().find(importlib.import_module(name)))


@pytest.mark.parametrize("name", [n for n in MODULES if n_examples(n)])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_core_modules_have_examples():
    for name in ("knlens.run.hooks", "knlens.run.engine", "knlens.core.tokens", "knlens.methods.tracing.trace", "knlens.run.staircase",
                 "knlens.methods.attribution.ig", "knlens.methods.selection", "knlens.methods.interventions"):
        assert n_examples(name) > 0, name
