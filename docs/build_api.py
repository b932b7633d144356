"""Build the HTML API reference of knlens from its docstrings (``make docs``), offline.

Every module of the package is documented (a package's ``__all__`` would otherwise hide the submodules it
does not re-export); docstrings are read as reStructuredText with Google-style sections, so ``:func:`` /
``:class:`` / ``:mod:`` roles become links and ``Arguments:`` blocks become lists. No page loads anything
from the network (math and mermaid rendering, which pdoc takes from a CDN, stay off); the build fails if a
page points at a remote script, style or image.

    python docs/build_api.py [OUTPUT_DIR]      # default docs/api; open OUTPUT_DIR/index.html
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"knlens.__main__"}  # importing it would run the command line


def modules(package: Path = ROOT / "knlens") -> list[str]:
    """Dotted names of every module of the package, parents before children."""
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in SKIP:
            names.append(name)
    return sorted(names)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "api"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import pdoc
    import pdoc.render

    import knlens
    from knlens.viz.html import remote_sources

    # "google" is pdoc's reStructuredText processing (roles, directives) plus Google-style sections, which a
    # few docstrings use ("Arguments:" of knlens.methods.tracing.trace.trace); "restructuredtext" alone
    # renders those as one paragraph
    pdoc.render.configure(docformat="google", math=False, mermaid=False, search=True, show_source=True,
                          footer_text=f"knlens {knlens.__version__}")
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        # every module is named, so a package's walk meets its submodules a second time: harmless
        warnings.filterwarnings("ignore", message="The module specification")
        pdoc.pdoc(*modules(), output_directory=out)
    pages = sorted(out.rglob("*.html"))
    remote = {str(p.relative_to(out)): r for p in pages if (r := remote_sources(p.read_text(encoding="utf-8")))}
    if remote:
        print(f"pages that need the network: {remote}", file=sys.stderr)
        return 1
    print(f"{len(pages)} pages in {out} (open {out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
