"""Execute the notebooks in place and store their outputs, so that tables and figures show on a code host
without running anything (``make notebooks``).

Each notebook runs top to bottom in a kernel of this interpreter (the project's ``.venv``), registered in
a temporary folder found through ``JUPYTER_PATH`` as ``tests/test_notebooks.py`` does, offline
(``HF_HUB_OFFLINE=1``) and without progress bars (``TQDM_DISABLE=1``), from the repository root. The
outputs are then made small and stable, so that a rerun gives a small diff:

* figures are PNG at ``DPI`` dots per inch (the inline backend's ``print_figure_kwargs``), re-encoded with
  a 256-colour palette when that is smaller (matplotlib's colour maps have 256 colours);
* no execution timestamps (``record_timing=False``), no interpreter version in the metadata, a generic
  ``python3`` kernel spec;
* absolute paths of this machine (the repository, the interpreter's ``site-packages``, the home folder)
  are written relative (``.``, ``<site-packages>``, ``~``), a cell's temporary file in warnings as
  ``<cell>``, and object addresses (``<... at 0x7f...>``) are dropped;
* an output bigger than ``MAX_OUTPUT_BYTES`` (a circuitsvis view carries about 1.3 MB of inline
  JavaScript, which a code host does not run anyway) is replaced by a one-line note saying what was left
  out; run the notebook to see it.

A notebook whose execution fails is left as it was (the error is printed, the exit status is 1).

    python notebooks/execute.py                 # every notebooks/*.ipynb
    python notebooks/execute.py notebooks/02_causal_tracing.ipynb
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "knlens-notebooks"
TIMEOUT_S = 900  # per cell
DPI = 72
MAX_OUTPUT_BYTES = 200_000
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO_KEYS = ("name", "mimetype", "file_extension", "pygments_lexer", "codemirror_mode", "nbconvert_exporter")


def kernel_home(tmp: Path) -> Path:
    """A kernel spec for this interpreter under ``tmp`` (the ``JUPYTER_PATH`` entry), with an IPython
    profile that sets the figure format and resolution."""
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    ipython = tmp / "ipython"
    (ipython / "profile_default").mkdir(parents=True)
    (ipython / "profile_default" / "ipython_kernel_config.py").write_text(
        "c.InlineBackend.figure_formats = {'png'}\n"
        f"c.InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', 'dpi': {DPI}}}\n"
        "c.HistoryManager.enabled = False\n")
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"knlens notebooks ({sys.executable})", "language": "python",
        "env": {"IPYTHONDIR": str(ipython)}}))
    return tmp / "jupyter"


def _local_paths() -> list[tuple[str, str]]:
    """(absolute path, what to write instead), longest first."""
    pairs = [(sysconfig.get_paths()["purelib"], "<site-packages>"), (str(ROOT), "."), (str(Path.home()), "~")]
    return sorted(((a, b) for a, b in pairs if a and a != "/"), key=lambda p: -len(p[0]))


CELL_FILE = re.compile(r"(?:/[^\s:'\"]*)?/ipykernel_\d+/\d+\.py")  # where a warning says a cell's code is
ADDRESS = re.compile(r" at 0x[0-9a-f]{6,}>")


def _scrub(text: Any, paths: list[tuple[str, str]]) -> Any:
    if isinstance(text, list):
        return [_scrub(t, paths) for t in text]
    if not isinstance(text, str):
        return text
    for absolute, relative in paths:
        text = text.replace(absolute, relative)
    return ADDRESS.sub(">", CELL_FILE.sub("<cell>", text))


def _smaller_png(data: str) -> str:
    """The base64 PNG ``data`` with a 256-colour palette, if that is smaller (else ``data``)."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    out = io.BytesIO()
    image.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, format="PNG", optimize=True)
    small = base64.b64encode(out.getvalue()).decode("ascii")
    return small if len(small) < len(data) else data


def _size(output: Any) -> int:
    return len(json.dumps(output.get("data", output.get("text", "")), ensure_ascii=False).encode())


def tidy(nb: Any) -> list[str]:
    """Make ``nb``'s outputs small and free of this machine's paths; returns a line per output left out."""
    paths = _local_paths()
    dropped = []
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            if "text" in output:
                output["text"] = _scrub(output["text"], paths)
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/"):
                    output["data"][mime] = _scrub(value, paths)
                elif mime == "image/png":
                    output["data"][mime] = _smaller_png(value)
            size = _size(output)
            if output.get("output_type") in ("display_data", "execute_result") and size > MAX_OUTPUT_BYTES:
                kinds = ", ".join(sorted(output["data"]))
                note = (f"[output not stored: {size / 1e6:.1f} MB ({kinds}), over the {MAX_OUTPUT_BYTES // 1000} kB "
                        f"kept per output in the committed notebook; run the cell to see it]")
                output["data"] = {"text/plain": note}
                output["metadata"] = {}
                dropped.append(f"cell {index}: {note}")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    info = nb.metadata.get("language_info", {})
    nb.metadata["language_info"] = {k: info[k] for k in LANGUAGE_INFO_KEYS if k in info} or {"name": "python"}
    return dropped


def execute(path: Path, kernel_name: str) -> bool:
    """Run ``path`` and store its tidied outputs; False (and the file untouched) if a cell fails."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=TIMEOUT_S, record_timing=False,
                            resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"{path.name}: failed after {time.perf_counter() - start:.0f} s, left unchanged\n{err}", file=sys.stderr)
        return False
    for line in tidy(nb):
        print(f"{path.name}: {line}")
    nbformat.validate(nb)
    nbformat.write(nb, path)
    size = path.stat().st_size
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s, {size / 1000:.0f} kB stored")
    return True


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    os.environ.update({"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"})
    with tempfile.TemporaryDirectory(prefix="knlens-notebooks-") as tmp:
        os.environ["JUPYTER_PATH"] = str(kernel_home(Path(tmp)))
        ok = [execute(p, KERNEL) for p in paths]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
