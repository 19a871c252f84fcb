"""Small CLI defects a README check found: counts in the singular for 1 ("1 analysis", not
"1 analyses"), `sweep --dry-run`'s help against its table, and a control's summary saying it is
a control. Checkpoints are the small real-layout ones of `svd_probe.testing.layouts`."""

from __future__ import annotations

import json
import shutil

import pytest
import typer
from cache_fixtures import llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone
from train_fixtures import cli_main

from svd_probe.cli import app
from svd_probe.cli.app import plural


def words(text: str) -> str:
    """Text with every run of whitespace one space: rich wraps titles and lines at any width."""
    return " ".join(text.split())


@pytest.fixture
def cache(template, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(template, root)
    return root


# ---- 1. counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [(0, "0 analyses"), (1, "1 analysis"), (2, "2 analyses"), (11, "11 analyses")])
def test_plural_is_singular_for_one_only(n, text):
    assert plural(n, "analysis", "analyses") == text


def test_cache_list_footer_counts_one_analysis(cache, llama, monkeypatch, capsys):
    code, out, err = run_cli(["cache", "list", "--cache-dir", cache], monkeypatch, capsys)
    assert code == 0, err
    assert "1 analysis, " in err and "analyses" not in err, err
    code, _, err = run_cli(
        ["analyze", llama, "--cache-dir", cache, "--device", "cpu", "--control", "shuffled", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    code, out, err = run_cli(["cache", "list", "--cache-dir", cache], monkeypatch, capsys)
    assert code == 0 and "2 analyses, " in err, err


def test_plot_and_report_count_one_file_figure_and_model(cache, llama, tmp_path, monkeypatch, capsys):
    args = [llama, "--cache-dir", cache, "--kind", "layerwise", "--dpi", "30"]
    code, out, err = run_cli(["plot", *args, "--out", tmp_path / "plots"], monkeypatch, capsys)
    assert code == 0, err
    assert "wrote 1 file:" in out and "1 files" not in out, out
    page = tmp_path / "page.html"
    code, out, err = run_cli(["report", *args, "--out", page], monkeypatch, capsys)
    assert code == 0, err
    assert words(out).endswith("MB, 1 figure, 1 model)"), out


def dry_run_table(monkeypatch, capsys, tmp_path, *args: str) -> str:
    code, out, err = cli_main(
        ["sweep", "--size", "tiny", "--out", str(tmp_path / "sw"), "--dry-run", *args], monkeypatch, capsys
    )
    assert code == 0, err
    return out


def test_sweep_dry_run_counts_one_run_of_one_grid_point(monkeypatch, capsys, tmp_path):
    out = dry_run_table(monkeypatch, capsys, tmp_path, "--variant", "mha")
    assert out.splitlines()[-1] == "1 run (of 1 grid point)", out
    out = dry_run_table(monkeypatch, capsys, tmp_path, "--variant", "mha,mla")
    assert out.splitlines()[-1] == "2 runs (of 2 grid points)", out
    out = dry_run_table(monkeypatch, capsys, tmp_path, "--variant", "mha,mla", "--shard", "0/2")
    assert out.splitlines()[-1] == "1 run (of 2 grid points)", out


# ---- 2. sweep --dry-run: the help says what the table shows ------------------------------------


def test_sweep_dry_run_help_names_only_what_the_table_shows(monkeypatch, capsys, tmp_path):
    sweep = typer.main.get_command(app).commands["sweep"]  # type: ignore[attr-defined]
    (param,) = [p for p in sweep.params if p.name == "dry_run"]
    help_text = param.help or ""
    # What the table itself is said to show: the help before it turns to --json.
    table_part, _, json_part = help_text.partition("--json")
    assert "command" not in table_part, help_text  # the table has no command column (80 columns)
    assert "command" in json_part, help_text
    for column in ("state", "name", "parameters"):
        assert column in table_part, (column, help_text)

    out = dry_run_table(monkeypatch, capsys, tmp_path, "--variant", "mha")
    row = out.splitlines()[0]
    assert row.split()[:2] == ["new", "mha_mlm/seed-0"] and row.endswith(" parameters"), out
    assert max(len(line) for line in out.splitlines()) <= 80 and "svd-probe" not in out, out
    code, out, err = cli_main(
        ["sweep", "--size", "tiny", "--out", str(tmp_path / "sw"), "--variant", "mha", "--dry-run", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    (run,) = json.loads(out)["runs"]  # what the help says --json adds
    assert run["command"][:2] == ["svd-probe", "train"] and run["run_dir"] and run["log"]


# ---- 3. a control's summary says it is one -----------------------------------------------------


@pytest.mark.parametrize("mode", ["gaussian", "shuffled"])
def test_control_summary_says_it_is_a_control(cache, llama, mode, monkeypatch, capsys):
    code, out, err = run_cli(
        ["analyze", llama, "--cache-dir", cache, "--device", "cpu", "--control", mode], monkeypatch, capsys
    )
    assert code == 0, err
    title = words(out[: out.index("┏")])
    assert title.startswith(f"{mode} CONTROL (randomized weights) of llama @ "), out
    footer = out[out.index("└") :].splitlines()[1]
    assert footer.startswith(f"control: {mode} copies of the weights (") and footer.endswith("not the model's own")
    assert len(footer) <= 80, footer

    code, real, err = run_cli(["analyze", llama, "--cache-dir", cache, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    assert "CONTROL" not in real and "control:" not in real, real
    assert words(real).startswith("llama @ "), real
