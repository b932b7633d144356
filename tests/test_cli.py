"""The ``knlens`` command line on a tiny model: files, tables, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from knlens.cli import main
from knlens.studies.knowledge_neurons_result import LocateResult
from knlens.viz.html import remote_sources

TINY = ["locate", "--model", "tiny-llama", "--prompt", "the capital of france is",
        "--prompt", "the capital city of france is", "--prompt", "france capital city is", "--target", " paris",
        "--steps", "4", "--n-random", "5"]


def test_locate_writes_the_files_and_prints_the_tables(tmp_path, capsys):
    out = tmp_path / "tmp"
    assert main([*TINY, "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    for name in ("result.json", "neurons.csv", "interventions.csv", "completeness.csv", "report.html"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.safetensors")), "the tensors are saved as safetensors"
    saved = LocateResult.load(out)  # written by the result's own save(dir)
    assert saved.fact.prompts[1] == "the capital city of france is" and saved.fact.target == " paris"
    assert saved.settings.model == "tiny-llama" and saved.settings.steps == 4
    assert saved.settings.n_random == 5 and saved.settings.hook_point == "hook_post"
    neurons = pd.read_csv(out / "neurons.csv")
    assert {"layer", "neuron", "mean_score", "n_coarse", "refined"} <= set(neurons.columns)
    iv = pd.read_csv(out / "interventions.csv")
    assert set(iv["action"]) == {"suppress", "enhance"} and set(iv["neurons"]) == {"knowledge", "random"}
    page = (out / "report.html").read_text()
    assert remote_sources(page) == [] and "unpkg.com" not in page
    assert "ColoredTokensMulti" in page and "data:image/png;base64," in page
    # the terminal shows the prompts, the neuron table and the interventions; --quiet: nothing on stderr
    assert "the capital city of france is" in captured.out and "mean_score" in captured.out
    assert "suppress" in captured.out and "p_empirical" in captured.out and "report.html" in captured.out
    assert captured.err == ""


def test_locate_screen_prints_what_it_left_out_and_saves_it(tmp_path, capsys):
    assert main([*TINY, "--screen", "gauss2", "--no-specificity", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "screen: gauss2: integrated exactly layers" in out and "measured screen error beta" in out
    saved = LocateResult.load(tmp_path)
    assert saved.settings.screen.method == "gauss2" and saved.attributions[0].screen.method == "gauss2"


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model-anywhere"], "cannot load model"),
    (["--target", " zebra"], "not in the model's vocabulary"),
    (["--prompt", "  ", "--target", " paris"], "empty"),
    (["--fact", "no-such-fact"], "unknown fact"),
    (["--prompt", "the capital of france is"], "--target"),
    (["--fact", "capital-france", "--prompt", "x", "--target", " y"], "not both"),
    (["--steps", "0"], "--steps"),
], ids=["model", "target", "empty-prompt", "fact", "no-target", "fact-and-prompt", "steps"])
def test_bad_input_exits_2_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["locate", "--model", "tiny-llama", "--quiet"]
    if "--prompt" not in argv and "--fact" not in argv:
        base += ["--prompt", "the capital of france is", "--target", " paris"]
    if "--target" in argv and "--prompt" not in argv:
        base = ["locate", "--model", "tiny-llama", "--quiet", "--prompt", "the capital of france is"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "locate" in capsys.readouterr().err


def test_list_facts(capsys):
    pytest.importorskip("knlens.data", reason="the built-in facts (knlens.data) are not there yet")
    assert main(["locate", "--list-facts"]) == 0
    assert "capital-france" in capsys.readouterr().out


def test_python_m_knlens_reports_bad_input_without_traceback(tmp_path):
    """The real entry point: a separate process, exit status 2, one line on stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "knlens", "locate", "--model", "tiny-llama", "--prompt",
                           "the capital of france is", "--target", " zebra", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.strip()]
    assert errors[-1].startswith("error: ") and "zebra" in errors[-1], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_console_script_is_declared():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'knlens = "knlens.cli:main"' in text


# ------------------------------------------------------------------ misuses of every subcommand
TINY_OPTS = ["--model", "tiny-llama", "--quiet"]
PROMPT = [*TINY_OPTS, "--prompt", "the capital of france is", "--target", " paris"]
TRACE = ["trace", *PROMPT, "--subject", "france"]
CONS = ["consistency", *TINY_OPTS, "--fact", "capital-france"]
MISUSES = [
    # argparse's own errors are one line too (not a usage block)
    (["locate", *PROMPT, "--steps", "abc"], "invalid int value: 'abc'"),
    (["locate", *PROMPT, "--grid", "simpson"], "invalid choice: 'simpson'"),
    (["locate", *PROMPT, "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["locate", *PROMPT, "--steps", "-3"], "--steps must be at least 1"),
    (["locate", *PROMPT, "--n-random", "-1"], "--n-random"),
    (["locate", *TINY_OPTS, "--prompt", "the capital of france is", "--target", ""], "target is empty"),
    (["locate", *TINY_OPTS, "--fact", "capital-frnace"], "did you mean 'capital-france'?"),
    (["trace", *PROMPT], "needs the subject"),
    (["study", "query-localisation"], "invalid choice: 'query-localisation'"),
    (["study", "query-localization", "--min-prompts", "2"], "need 3 ≤ min_prompts ≤ max_prompts"),
    (["trace", *PROMPT, "--subject", "germany"], "does not occur in the prompt"),
    ([*TRACE, "--window", "0"], "--window must be at least 1"),
    ([*TRACE, "--samples", "0"], "--samples must be at least 1"),
    ([*TRACE, "--noise-factor", "-1"], "noise scale must be positive"),
    ([*TRACE, "--kinds", "everything"], "invalid choice: 'everything'"),
    (["trace", *TINY_OPTS, "--fact", "capital-france", "--prompt-index", "9"], "--prompt-index 9"),
    ([*TRACE, "--corruption", "substitute"], "needs --other"),
    (["consistency", *TINY_OPTS], "no facts"),
    (["consistency", *PROMPT], "at least two prompts"),
    ([*CONS, "--steps", "0"], "--steps must be at least 1"),
    ([*CONS, "--threshold", "2"], "--threshold must be in (0, 1]"),
    ([*CONS, "--max-facts", "0"], "--max-facts must be at least 1"),
    ([*CONS, "--top-k", "0"], "--top-k must be at least 1"),
    (["consistency", *TINY_OPTS, "--relation", "P36", "--data-dir", "{tmp}/no-data-here"],
     "data folder not found"),
]


@pytest.mark.parametrize("argv, message", MISUSES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MISUSES])
def test_every_subcommand_misuse_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_unknown_relation_without_the_data_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    """The ParaRel folder is looked up before the model is loaded; missing, it is a DataNotFoundError."""
    monkeypatch.setenv("KNLENS_DATA", str(tmp_path / "empty"))
    assert main(["consistency", "--model", "no-such-model-anywhere", "--relation", "P9999", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data folder not found" in err[0] and "KNLENS_DATA" in err[0]


@pytest.mark.parametrize("command", [["locate", *PROMPT, "--steps", "2", "--n-random", "1"], TRACE, CONS])
def test_unwritable_out_fails_before_any_work(command, tmp_path, capsys, monkeypatch):
    """--out under a regular file cannot be created (also as root): one line, and no model is loaded."""
    (tmp_path / "a-file").write_text("")
    import knlens.core.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(knlens.core.models, "load_model", no_model)
    assert main([*command, "--out", str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write to --out") and "a-file" in err[0], err


def test_output_dir_creates_the_folder_and_raises_output_error(tmp_path):
    from knlens.cli.common import output_dir
    from knlens.core.errors import KnlensError, OutputError

    assert output_dir(str(tmp_path / "new" / "deep")).is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write") as info:
        output_dir(str(tmp_path / "file" / "sub"))
    assert isinstance(info.value, KnlensError) and isinstance(info.value, OSError)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        output_dir(str(tmp_path / "file"))



def test_write_outputs_saves_the_result_then_the_extras(tmp_path, capsys):
    """``--out``: the result's own save(dir) first, then the readable extras; ``wrote`` lists what changed."""
    from knlens.cli.common import write_outputs
    from knlens.core.errors import OutputError

    class Saved:
        def save(self, directory):
            (directory / "result.json").write_text("{}")
            (directory / "tensors.safetensors").write_bytes(b"")
            return directory

    (tmp_path / "old.txt").write_text("there before, left alone")
    written = write_outputs(tmp_path, Saved(), {"table.csv": lambda p: p.write_text("a\n")})
    assert [p.name for p in written] == ["result.json", "tensors.safetensors", "table.csv"]
    assert capsys.readouterr().out == "\nwrote " + ", ".join(str(p) for p in written) + "\n"

    def denied(path):
        raise PermissionError(13, "Permission denied")
    with pytest.raises(OutputError, match="cannot write the results to --out .*: Permission denied"):
        write_outputs(tmp_path, Saved(), {"x.csv": denied})

# ------------------------------------------------------------------ one fact lookup, with close-match hints
def test_unknown_fact_names_the_close_match():
    from knlens.cli.common import builtin_fact
    from knlens.data.builtin import UnknownFactError

    assert builtin_fact("capital-france").name == "capital-france"
    with pytest.raises(UnknownFactError) as info:
        builtin_fact("capital-frnace")
    assert str(info.value) == ("unknown fact 'capital-frnace'; did you mean 'capital-france'? "
                               "(knlens locate --list-facts lists them)")
    with pytest.raises(UnknownFactError, match="did you mean 'capital-france'"):
        builtin_fact("Capital-France")  # case is ignored in the hint, not in the lookup
    with pytest.raises(UnknownFactError) as info:
        builtin_fact("zzzz")
    assert str(info.value) == "unknown fact 'zzzz' (knlens locate --list-facts lists them)"


def test_close_names_keeps_the_matches_near_the_best():
    from knlens.core.names import close_names

    names = ["capital-france", "capital-greece", "capital-china", "symbol-gold"]
    assert close_names("capital-frnace", names) == ["capital-france"]
    assert close_names("capital-xx", ["capital-aa", "capital-bb", "capital-cc", "capital-dd"]) == [
        "capital-aa", "capital-bb", "capital-cc"]  # equally close: the first three
    assert close_names("zzzz", names) == [] and close_names("x", []) == []


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("command", ["locate", "trace", "consistency"])
def test_every_subcommand_hints_the_close_fact_before_loading(command, capsys, monkeypatch):
    import knlens.core.models

    monkeypatch.setattr(knlens.core.models, "load_model", _no_model)
    assert main([command, *TINY_OPTS, "--fact", "capital-frnace"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: unknown fact 'capital-frnace'; did you mean 'capital-france'? "
                            "(knlens locate --list-facts lists them)\n")
    assert captured.out == ""


# ------------------------------------------------------------------ the one error handler, on every subcommand
RUNNABLE = {"locate": ["locate", *PROMPT, "--steps", "2", "--n-random", "1"], "trace": TRACE, "consistency": CONS,
            "edit": ["edit", *PROMPT, "--new", " berlin", "--n-text", "0"],
            "study": ["study", "query-localization", "--model", "tiny-llama", "--quiet"]}


@pytest.mark.parametrize("command", sorted(RUNNABLE))
def test_a_knlens_error_inside_any_subcommand_is_one_line(command, capsys, monkeypatch):
    """Raised deep in the command (here by the model loader), a multi-line KnlensError becomes one line."""
    import knlens.core.models
    from knlens.core.errors import UnknownModelError

    def fail(*args, **kwargs):
        raise UnknownModelError("cannot load model 'x':\n  first reason\n  second reason")
    monkeypatch.setattr(knlens.core.models, "load_model", fail)
    assert main(RUNNABLE[command]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: cannot load model 'x': first reason second reason\n"
    assert captured.out == ""


@pytest.mark.parametrize("command", sorted(RUNNABLE))
def test_argparse_misuse_of_any_subcommand_is_one_line(command, capsys):
    assert main([*RUNNABLE[command], "--no-such-option"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --no-such-option (see knlens --help)\n"
    assert main([*RUNNABLE[command], "--model"]) == 2  # an option without its value: the subcommand's parser
    prog = " ".join(RUNNABLE[command][:2] if command == "study" else [command])  # study: the study's own parser
    assert capsys.readouterr().err == f"error: argument --model: expected one argument (see knlens {prog} --help)\n"


@pytest.mark.parametrize("command", sorted(RUNNABLE))
def test_the_handler_leaves_bugs_and_interrupts_alone(command, capsys, monkeypatch):
    """Only KnlensError is bad input: a bug keeps its traceback; Ctrl-C exits 130."""
    import knlens.core.models

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(knlens.core.models, "load_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(RUNNABLE[command])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(knlens.core.models, "load_model", interrupt)
    assert main(RUNNABLE[command]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


# ------------------------------------------------------------------ one package: layout and imports
def test_every_subcommand_is_one_module_with_add_parser_and_run():
    import argparse

    from knlens.cli import (build_parser, consistency, degenerate, edit, locate, qrnca, query, study, summary, sweep,
                            trace, twostage)

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["locate", "trace", "consistency", "edit", "study", "sweep", "query", "summary",
                                 "degenerate", "qrnca", "twostage"]
    for module in (locate, trace, consistency, edit, study, sweep, query, summary, degenerate, qrnca, twostage):
        name = module.__name__.rsplit(".", 1)[1]
        assert sub.choices[name].get_default("run") is module.run


def test_cli_modules_import_only_downward():
    """common imports no subcommand; a subcommand imports common and its own parts (``<command>_<part>.py``, which
    import common only), never another subcommand; no tricks."""
    import ast

    import knlens.cli

    folder = Path(knlens.cli.__file__).parent
    assert sorted(p.name for p in folder.glob("*.py")) == ["__init__.py", "common.py", "consistency.py",
                                                           "degenerate.py", "edit.py", "locate.py", "locate_languages.py",
                                                           "qrnca.py", "query.py", "study.py", "summary.py", "sweep.py",
                                                           "trace.py", "twostage.py"]
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        cli = {m for m in imported if m.startswith("knlens.cli")}
        assert "importlib" not in imported, path.name
        if path.name == "common.py":
            assert cli == set(), cli
        elif path.name != "__init__.py":
            parts = {f"knlens.cli.{p.stem}" for p in folder.glob(f"{path.stem}_*.py")}
            assert cli - parts == {"knlens.cli.common"}, (path.name, cli)
