"""The documentation's own checks: docstrings point at sections of docs/methods.md that exist, and the
notebook runner stores small outputs without this machine's paths (no kernel is started here)."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"docs/methods\.md, ([A-Za-z][A-Za-z \-]*[A-Za-z])")


def _headings() -> set[str]:
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    return {m.group(1).strip().lower() for m in re.finditer(r"^#{2,4} (.+)$", text, flags=re.M)}


def test_methods_references_name_sections():
    headings = _headings()
    refs = {(str(p.relative_to(ROOT)), m.group(1).lower()) for folder in ("knlens", "benchmarks")
            for p in (ROOT / folder).rglob("*.py") for m in REFERENCE.finditer(p.read_text(encoding="utf-8"))}
    assert refs, "no docstring points at docs/methods.md"
    assert not {r for r in refs if r[1] not in headings}, f"sections of docs/methods.md: {sorted(headings)}"


def test_no_reference_to_the_old_section_numbers():
    stale = [str(p.relative_to(ROOT)) for p in (ROOT / "knlens").rglob("*.py")
             if re.search(r"methods\.md §\d", p.read_text(encoding="utf-8"))]
    assert not stale


def _runner():
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_outputs_are_tidied():
    runner = _runner()
    nbformat = pytest.importorskip("nbformat")
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(png, format="PNG")
    cell = nbformat.v4.new_code_cell("x")
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr",
                               text=f"{ROOT}/knlens/x.py:3: UserWarning: w\n/tmp/ipykernel_42/123.py:1: UserWarning\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "<Figure at 0x7f00deadbeef>"}, execution_count=1),
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png.getvalue()).decode()}),
        nbformat.v4.new_output("display_data", data={"text/html": "<script>" + "x" * (runner.MAX_OUTPUT_BYTES + 1),
                                                     "text/plain": "view"}),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"language_info": {"name": "python", "version": "3.11.7"}})
    dropped = runner.tidy(nb)
    out = nb.cells[0].outputs
    assert "execution" not in nb.cells[0].metadata
    assert out[0]["text"] == "./knlens/x.py:3: UserWarning: w\n<cell>:1: UserWarning\n"
    assert out[1]["data"]["text/plain"] == "<Figure>"
    assert "image/png" in out[2]["data"]
    assert out[3]["data"] == {"text/plain": dropped[0].split(": ", 1)[1]} and "not stored" in dropped[0]
    assert nb.metadata["kernelspec"]["name"] == "python3" and "version" not in nb.metadata["language_info"]
    nbformat.validate(nb)
