"""`diff` and `align` against untrusted names and old caches, round 3, run as a user runs them
(the console entry point): a local folder whose name has an undecodable byte in a diff's csv and
parquet export, a folder with a space and `$(...)` in the suggested `diff` and `align` commands,
a cached layer compared with a layer not asked for, an alignment run cached at a rank of the
whole residual stream, and control characters and markup in the names `diff` and `align` print.
Each test but the last failed on the code before its fix; the last guards output that was
already clean.

The checkpoints are the small Llama layout of `svd_probe.testing.layouts`, aligned once per
module (`cache_fixtures`); the diffs are of a checkpoint against a copy of itself under a
hostile name.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cache_fixtures import RANK, copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_align_diff_hostile_2 import HUB, hub_copy, jsonl
from test_cache_robustness import run_cli, run_raw

import svd_probe.alignment as alignment_module
from svd_probe.alignment import AlignmentStore, align
from svd_probe.cache.store import SpectraCache
from svd_probe.cli.app import alert, err, out
from svd_probe.diff import DiffJob, diff

# Control characters but the newline: what must never reach the terminal from a name.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def named(llama: Path, folder: Path) -> Path:
    """A copy of the `llama` checkpoint under another (hostile) folder name."""
    shutil.copytree(llama, folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub's own offline switch on (as test_align_diff_hostile_2's)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def wide(monkeypatch):
    """The three consoles at 2000 columns: a hint is printed whole on one line, never wrapped."""
    for console in (out, err, alert):
        monkeypatch.setattr(console, "_width", 2000)


def shell_words(command: str, cwd: Path) -> list[str]:
    """The words bash reads from a pasted command line (printf prints them, NUL-separated; a
    `$(...)` in it would run)."""
    r = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], cwd=cwd, capture_output=True, timeout=20)
    assert not (cwd / "PWNED").exists(), "pasting the command ran the folder name's $(touch PWNED)"
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split("\0")[:-1]


# --- 1. diff: undecodable bytes in the export, unquoted paths in the suggested command ------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_diff_of_a_folder_with_an_undecodable_byte_exports(llama, tmp_path, fmt, monkeypatch, capsys):
    """`export BASE --diff TUNED --format csv/parquet` of a local folder `bad\\xffname` ended in a
    UnicodeEncodeError traceback: `base_model` and `tuned_model` held the lone surrogate Python
    reads the byte as, which UTF-8 has no bytes for."""
    bad = named(llama, tmp_path / os.fsdecode(b"bad\xffname"))
    cache = tmp_path / "cache"
    diff(DiffJob(str(bad), str(llama), cache_dir=cache, device="cpu"))
    path = tmp_path / f"d.{fmt}"
    args = ["export", bad, "--diff", llama, "--cache-dir", cache, "--format", fmt, "--out", path]
    code, _, stderr = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in stderr, stderr
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = pq.read_table(path).to_pylist()
    assert rows and {(r["base_model"], r["tuned_model"]) for r in rows} == {("bad\\udcffname", "llama")}
    assert {r["model"] for r in rows} == {"llama − bad\\udcffname"}


def test_the_suggested_diff_command_names_each_folder_as_one_word(llama, tmp_path, wide, monkeypatch, capsys):
    """The hint of `export --diff` with nothing diffed joined the paths with spaces: a folder
    `my $(touch PWNED) model` was three words when pasted, and its `$(...)` ran. The words bash
    reads from the hint are now exactly the command's, and pasting it runs nothing else."""
    base = named(llama, tmp_path / "my $(touch PWNED) model")
    tuned = named(llama, tmp_path / "tuned 'v2'")
    cache = tmp_path / "a cache"
    for model in (base, tuned):
        run_cli(["analyze", model, "--cache-dir", cache, "--device", "cpu", "--json"], monkeypatch, capsys)
    code, _, stderr = run_raw(
        ["export", base, "--diff", tuned, "--cache-dir", cache, "--out", tmp_path / "d.csv"], monkeypatch, capsys
    )
    assert code == 2 and "Traceback" not in stderr, stderr
    (hint,) = re.findall(r"^hint: Run: (.*)$", stderr, flags=re.M)
    words = shell_words(hint, tmp_path)
    assert words == ["svd-probe", "diff", str(base), str(tuned), "--cache-dir", str(cache)]
    # Pasted (as bash reads it), the command computes the diff the export asked for.
    code, _, stderr = run_cli([*words[1:], "--device", "cpu", "--json"], monkeypatch, capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(
        ["export", base, "--diff", tuned, "--cache-dir", cache, "--out", tmp_path / "d.csv"], monkeypatch, capsys
    )
    assert code == 0 and (tmp_path / "d.csv").is_file(), stderr


def test_the_suggested_align_command_names_the_folder_as_one_word(llama, tmp_path, wide, monkeypatch, capsys):
    """`plot --kind alignment` of an analysis never aligned suggests `svd-probe align MODEL`: the
    folder `my $(touch PWNED) model` was three words there too."""
    model = named(llama, tmp_path / "my $(touch PWNED) model")
    cache = tmp_path / "a cache"
    run_cli(["analyze", model, "--cache-dir", cache, "--device", "cpu", "--json"], monkeypatch, capsys)
    code, _, stderr = run_raw(
        ["plot", model, "--kind", "alignment", "--cache-dir", cache, "--out", tmp_path / "p"], monkeypatch, capsys
    )
    assert code == 1 and "Traceback" not in stderr, stderr  # 1: no figure could be drawn
    (command,) = re.findall(r"\(run: (svd-probe align .*)\)$", stderr, flags=re.M)
    words = shell_words(command, tmp_path)
    # --rank 32: the model's d_model is 64, which refuses --rank 64.
    assert words == ["svd-probe", "align", str(model), "--rank", "32", "--cache-dir", str(cache)]


# --- 2. align: a cached comparison with a layer not asked for ----------------------------------------


def test_a_layer_alone_is_compared_with_no_layer_before(llama, template, tmp_path, monkeypatch, capsys):
    """Both layers aligned, then `align --layers 1`: layer 1's cached file holds its comparison
    with layer 0, and it was printed (row 0→1, `--json` rows of layer 0 → 1) and exported, though
    layer 0 was not asked; `LayerAlignment.prev` is "empty when that layer was not asked"."""
    cache = copy(template, tmp_path, llama)
    args = ["align", llama, "--rank", RANK, "--layers", "1", "--cache-dir", cache.root, "--device", "cpu"]
    code, stdout, stderr = run_cli([*args, "--no-figure", "--json"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert json.loads(stdout) == [] and "no layer L → L+1 among layers 1" in stderr
    path = tmp_path / "a.jsonl"
    code, stdout, stderr = run_cli([*args, "--no-figure", "--export", path], monkeypatch, capsys)
    assert code == 0 and "0→1" not in stdout, stdout
    rows = jsonl(path)
    assert rows and {r["layer"] for r in rows} == {1} and "layer_next" not in {r["comparison"] for r in rows}
    # Both asked: the cached comparison is the answer, its file not rewritten.
    store = AlignmentStore(cache, "O", RANK)
    before = store.layer_path(1).stat().st_mtime_ns
    args[args.index("1")] = "0-1"
    code, stdout, stderr = run_cli([*args, "--no-figure", "--json"], monkeypatch, capsys)
    assert code == 0 and {(r["layer"], r["other_layer"]) for r in json.loads(stdout)} == {(0, 1)}
    assert store.layer_path(1).stat().st_mtime_ns == before


def test_offline_a_layer_alone_is_compared_with_no_layer_before(template, tmp_path, offline, monkeypatch, capsys):
    """The same, offline: `align` answers from `load_alignment(layers=[1])`, which kept the 0 → 1
    comparison of the file."""
    root = hub_copy(template, tmp_path)
    args = ["align", HUB, "--rank", RANK, "--layers", "1", "--cache-dir", root, "--device", "cpu", "--no-figure"]
    code, stdout, stderr = run_cli([*args, "--json"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert json.loads(stdout) == [] and "nothing was fetched" in stderr


# --- 3. an alignment run cached at a rank of the whole residual stream -------------------------------


def old_run(llama: Path, cache: SpectraCache, monkeypatch) -> AlignmentStore:
    """A run at rank d_model as `align` wrote it before such ranks were refused, the newest."""
    d_model = json.loads((llama / "config.json").read_text())["hidden_size"]
    with monkeypatch.context() as m:
        m.setattr(alignment_module, "_check_rank_fits", lambda rank, d_model: None)
        align(str(llama), rank=d_model, cache_dir=cache.root, device="cpu")
    store = AlignmentStore(cache, "O", d_model)
    t = AlignmentStore(cache, "O", RANK).manifest_path.stat().st_mtime + 60
    os.utime(store.manifest_path, (t, t))
    return store


def test_a_run_at_the_whole_residual_stream_is_left_out_of_the_figure(llama, template, tmp_path, monkeypatch, capsys):
    """`plot --kind alignment` drew the newest run, one at rank d_model cached before `align`
    refused such ranks: every cosine 1. It is left out with a note; the rank-4 run is drawn."""
    cache = copy(template, tmp_path, llama)
    stale = old_run(llama, cache, monkeypatch)
    assert stale.dir.name == "alignment-O-r64" and stale.manifest_path.is_file()
    plots = tmp_path / "plots"
    code, stdout, stderr = run_cli(
        ["plot", llama, "--kind", "alignment", "--cache-dir", cache.root, "--out", plots], monkeypatch, capsys
    )
    assert code == 0 and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in plots.glob("alignment-*.png")) == [f"alignment-O-r{RANK}.png"]
    assert "alignment-O-r64 left out: its rank 64 is not below d_model 64" in stderr


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_only_a_run_at_the_whole_residual_stream_is_no_figure(llama, template, tmp_path, manifest, monkeypatch, capsys):
    """The only run cached is at rank d_model (with its manifest, or without, whose layer files
    say d_model): `plot` drew its cosines of 1; now it skips the figure and says why."""
    cache = copy(template, tmp_path, llama)
    stale = old_run(llama, cache, monkeypatch)
    shutil.rmtree(AlignmentStore(cache, "O", RANK).dir)
    if not manifest:
        stale.manifest_path.unlink()
    plots = tmp_path / "plots"
    code, _, stderr = run_cli(
        ["plot", llama, "--kind", "alignment", "--cache-dir", cache.root, "--out", plots], monkeypatch, capsys
    )
    assert code == 1 and "Traceback" not in stderr, stderr  # 1: no figure could be drawn
    assert not list(plots.glob("alignment-*")) and "skipped alignment" in stderr
    assert "its rank 64 is not below d_model 64" in stderr and "--rank 32" in stderr


# --- 4. names with control characters and markup, as diff and align print them ------------------------


def test_diff_and_align_print_hostile_names_as_text(llama, tmp_path, monkeypatch, capsys):
    """A guard (this output was already clean): a folder `x\\x1b]0;pwned\\x07y` (an escape that
    retitles the terminal) and a cache folder with `[/]` and `[bold]` in it, through `diff` and
    `align` tables and notes: no control character reaches the terminal, and the markup is shown
    as typed."""
    base = named(llama, tmp_path / "x\x1b]0;pwned\x07y")
    tuned = named(llama, tmp_path / "m[bold]x")
    cache = tmp_path / "c[" / "]x[bold]\x1b[31mcache"
    printed = ""
    for args in (
        ["diff", base, tuned],
        ["diff", base, tuned, "--layers", "1"],
        ["align", base, "--rank", RANK, "--no-figure", "--layers", "0"],
        ["align", tuned, "--rank", RANK, "--out", tmp_path / "p\x1bq"],
    ):
        code, stdout, stderr = run_raw([*args, "--cache-dir", cache, "--device", "cpu"], monkeypatch, capsys)
        assert code == 0 and "Traceback" not in stderr, stderr
        printed += stdout + stderr
    assert not CONTROL.search(printed), repr(CONTROL.search(printed))
    assert "x\\x1b]0;pwned\\x07y" in printed and "m[bold]x" in printed and "no layer L → L+1" in printed
