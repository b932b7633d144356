"""The ``knlens`` command line on a tiny model: files, tables, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from knlens.cli.main import main
from knlens.viz.report import remote_sources

TINY = ["locate", "--model", "tiny-llama", "--prompt", "the capital of france is",
        "--prompt", "the capital city of france is", "--prompt", "france capital city is", "--target", " paris",
        "--steps", "4", "--n-random", "5"]


def test_locate_writes_the_files_and_prints_the_tables(tmp_path, capsys):
    out = tmp_path / "tmp"
    assert main([*TINY, "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    for name in ("result.json", "neurons.csv", "interventions.csv", "completeness.csv", "attributions.safetensors",
                 "report.html"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "result.json").read_text())
    assert meta["fact"]["prompts"][1] == "the capital city of france is" and meta["fact"]["target"] == " paris"
    assert meta["settings"]["model"] == "tiny-llama" and meta["settings"]["steps"] == 4
    assert meta["settings"]["n_random"] == 5 and meta["settings"]["hook_point"] == "hook_post"
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
    (["locate", *TINY_OPTS, "--fact", "capital-frnace"], "did you mean capital-france"),
    (["trace", *PROMPT], "needs the subject"),
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
    from knlens.cli.main import output_dir
    from knlens.core.errors import KnlensError, OutputError

    assert output_dir(str(tmp_path / "new" / "deep")).is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write") as info:
        output_dir(str(tmp_path / "file" / "sub"))
    assert isinstance(info.value, KnlensError) and isinstance(info.value, OSError)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        output_dir(str(tmp_path / "file"))
