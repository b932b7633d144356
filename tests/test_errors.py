"""Every error knlens raises on purpose is a specific KnlensError subclass (knlens/core/errors.py), never a bare
built-in exception or the KnlensError base class."""

from __future__ import annotations

import ast
from pathlib import Path

import knlens.core.errors as errors

ROOT = Path(errors.__file__).parents[1]  # the package, knlens/
BUILTIN = {"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "FileNotFoundError", "OSError",
           "ImportError", "Exception", "KnlensError"}
# known exceptions, each with its reason; remove an entry when its raise is converted
ALLOWED = {
    ("data/builtin.py", "RuntimeError"),  # a guard against duplicate names in the hand-written tables (a bug)
    ("studies/knowledge_neurons.py", "TypeError"),  # locate(model, "a string"): a programming error
}


def _raised(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            names.add(node.exc.func.id)
    return names


def test_raised_errors_are_specific_knlens_errors():
    found = {(str(p.relative_to(ROOT)), name) for p in ROOT.rglob("*.py") for name in _raised(p) if name in BUILTIN}
    assert found <= ALLOWED, sorted(found - ALLOWED)


def test_every_error_class_is_a_knlens_error_and_says_what_it_is():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and c.__module__ == errors.__name__]
    assert len(classes) > 10
    for c in classes:
        assert c.__doc__, c
        assert issubclass(c, errors.KnlensError) or issubclass(c, Warning), c
