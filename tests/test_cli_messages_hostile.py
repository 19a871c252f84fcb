"""What the command line prints about hostile names, run as a user runs it: error lines naming a
folder with an escape sequence (and a path too long for 80 columns), the `analyze` summary's
cache line, the commands `demo` and `sweep` suggest for an --out that needs shell quoting, the
notes of `export`, and offline `analyze` naming a damaged cached layer. Each test failed on the
code before its fix.

Caches are real: a small Llama-layout checkpoint analyzed once per module (`cache_fixtures`),
copied per test; `sweep` trains one tiny run on the generated text of `train_fixtures`.
"""

from __future__ import annotations

import csv
import shlex
import shutil

import pytest
from cache_fixtures import copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_cache_robustness import damage, run_raw
from train_fixtures import inputs_fixture  # noqa: F401 - fixture

from svd_probe.analysis import AnalyzeJob, analyze

ESC_NAME = "[red]x\x1b]0;pwned\x07y"  # an OSC sequence (it retitles the terminal), and console markup
ESC_SHOWN = "[red]x\\x1b]0;pwned\\x07y"
# Long, with spaces and shell syntax: it needs quoting and runs past 80 columns.
AWKWARD = "a folder with spaces $(touch pwned) it's " + "long-" * 12 + "name"


def controls(text: str) -> list[str]:
    """The characters below 0x20 (and DEL) other than the line break: what a terminal would act on."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or c == "\x7f"]


def line_starting(text: str, prefix: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return line[len(prefix) :]


# --- 1. error lines: no escape sequence, no fold ----------------------------------------------------


def test_an_error_naming_a_folder_with_an_escape_sequence_prints_it_escaped(llama, tmp_path, monkeypatch, capsys):
    """`_fail` escaped messages for console markup only: "no cached analysis of x\\x1b]0;…" wrote
    the ESC and BEL to the terminal as they are."""
    folder = tmp_path / ESC_NAME
    shutil.copytree(llama, folder)
    args = ["export", folder, "--cache-dir", tmp_path / "empty", "--out", tmp_path / "m.csv"]
    code, out, err = run_raw(args, monkeypatch, capsys)
    assert code == 2 and "no cached analysis" in err and "Traceback" not in err, err
    assert controls(out + err) == [], err
    assert ESC_SHOWN in line_starting(err, "error: "), err  # shown as its escapes; `[red]` as itself


def test_an_error_line_is_never_folded_so_a_copied_command_is_whole(llama, tmp_path, monkeypatch, capsys):
    """rich folded the hint `Run: svd-probe analyze '<folder>' --cache-dir <folder>` at 80 columns,
    a newline in the middle of a path: pasted, it was two commands. Now the line is one line (the
    terminal wraps it), and the shell reads back the exact folders."""
    folder = tmp_path / AWKWARD
    root = tmp_path / ("cache " + "deep/" * 10 + "root")
    shutil.copytree(llama, folder)
    code, _, err = run_raw(["export", folder, "--cache-dir", root, "--out", tmp_path / "m.csv"], monkeypatch, capsys)
    assert code == 2, err
    hint = line_starting(err, "hint: Run: ")
    assert len(hint) > 200  # a line that rich folded at 80 columns
    assert shlex.split(hint) == ["svd-probe", "analyze", str(folder), "--cache-dir", str(root)]
    assert line_starting(err, "error: ").endswith(f" in {root}")  # the cache folder, whole


# --- 2. the analyze summary's lines -------------------------------------------------------------------


def test_the_analyze_summary_prints_a_cache_folder_with_an_escape_sequence_escaped(
    llama, tmp_path, monkeypatch, capsys
):
    """`summary_footer` escaped its lines for markup only: a --cache-dir `c\\x1b]0;…\\x07` reached
    the terminal raw in the summary's last line, `cache <folder>`."""
    root = tmp_path / ("c" + ESC_NAME)
    code, out, err = run_raw(["analyze", llama, "--cache-dir", root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert controls(out + err) == [], out
    assert line_starting(out, "cache ").startswith(str(tmp_path) + "/c" + ESC_SHOWN + "/"), out


# --- 3. suggested commands quote the user's --out ----------------------------------------------------


@pytest.mark.slow
def test_demo_suggests_commands_that_quote_its_folder(tmp_path, monkeypatch, capsys):
    """`demo` printed `svd-probe analyze {checkpoint} --cache-dir {cache}` unquoted: an --out
    `a folder with spaces $(touch pwned) …` pasted as many words, and ran the `$(...)`."""
    root = tmp_path / AWKWARD
    code, out, err = run_raw(["demo", "--out", root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    analyze_line = line_starting(err, "  svd-probe analyze ")
    assert shlex.split("svd-probe analyze " + analyze_line, comments=True) == [
        "svd-probe", "analyze", str(root / "checkpoint"), "--matrices", "QK", "--cache-dir", str(root / "cache"),
    ]  # fmt: skip
    plot_line = line_starting(err, "  svd-probe plot ")
    words = shlex.split("svd-probe plot " + plot_line)
    assert words[words.index("--cache-dir") + 1] == str(root / "cache")
    passed = line_starting(out, "cache root  ").split("(pass ", 1)[1].removesuffix(" to export, plot, report)")
    assert shlex.split(passed) == ["--cache-dir", str(root / "cache")]


@pytest.mark.slow
def test_sweep_suggests_a_compare_command_that_quotes_its_folder(inputs, tmp_path, monkeypatch, capsys):
    """`sweep` ended with `tables: svd-probe compare {out}` unquoted: an --out that needs quoting
    pasted as many words (here bash refused the lone `'`)."""
    out_dir = tmp_path / AWKWARD
    args = [
        "sweep",
        *("--variant", "mha", "--seeds", "0", "--size", "tiny", "--device", "cpu"),
        *("--tokenizer", inputs["vocab"], "--data-dir", inputs["wiki"], "--sst2-dir", inputs["sst2"]),
        *("--pretrain-steps", "1", "--finetune-steps", "1", "--batch-size", "2", "--finetune-batch-size", "2"),
        *("--seq-len", "16", "--checkpoint-every", "1", "--log-every", "1", "--out", out_dir),
    ]
    code, _, err = run_raw(args, monkeypatch, capsys)
    assert code == 0 and "1 finished" in err, err
    assert shlex.split(line_starting(err, "tables: ")) == ["svd-probe", "compare", str(out_dir)]


# --- 4. export prints the notes of what it left out ----------------------------------------------------


def test_export_prints_the_loaders_notes(llama, template, tmp_path, monkeypatch, capsys):
    """A layer file past the model's layers (copied in from a larger model) is left out of the
    export with a note, which `plot` and `load_analysis(...).notes` give; `export` said nothing,
    and wrote a file one layer short of what the cache folder holds."""
    cache = copy(template, tmp_path, llama)
    stray = cache.layer_path(7)
    shutil.copyfile(cache.layer_path(1), stray)
    out = tmp_path / "m.csv"
    code, stdout, err = run_raw(
        ["export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", out], monkeypatch, capsys
    )
    assert code == 0 and out.is_file(), err
    notes = [ln[len("note: ") :] for ln in err.splitlines() if ln.startswith("note: ")]
    assert notes == [f"{stray} left out: the model has layers 0-1 (its manifest says so); delete the file"], err
    with open(out, newline="") as f:
        assert {row["layer"] for row in csv.DictReader(f)} == {"0", "1"}


def test_quiet_export_and_align_export_still_say_what_they_wrote(llama, template, tmp_path, monkeypatch, capsys):
    """`-q` keeps results, files written among them (its help says so): `-q export` and `-q align
    --export` printed nothing, while `-q plot` and `-q report` name their files."""
    cache = copy(template, tmp_path, llama)
    table = tmp_path / "m.csv"
    code, stdout, err = run_raw(
        ["-q", "export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", table], monkeypatch, capsys
    )
    with open(table, newline="") as f:
        rows = sum(1 for _ in csv.DictReader(f))
    assert code == 0 and f"wrote {rows} rows to {table}" in stdout, (stdout, err)
    aligned = tmp_path / "a.csv"
    args = ["-q", "align", llama, "--rank", "4", "--cache-dir", cache.root, "--device", "cpu", "--export", aligned]
    code, stdout, err = run_raw(args, monkeypatch, capsys)
    with open(aligned, newline="") as f:
        rows = sum(1 for _ in csv.DictReader(f))
    assert code == 0 and f"wrote {rows} rows to {aligned}" in stdout, (stdout, err)


# --- 5. offline analyze says what is wrong with a damaged cached layer ------------------------------------


@pytest.fixture
def served_llama(fake_hub, llama) -> str:
    repo = "hostile-cli/llama"
    fake_hub.add_repo(repo, llama)
    return repo


def test_offline_analyze_names_the_damage_of_a_cached_layer(served_llama, fake_hub, tmp_path, monkeypatch, capsys):
    """Offline, a truncated cached layer file made `analyze` say "cannot compute layer 1" and no
    more: the CacheDamagedError naming the file and its damage went to the notes, which a failed
    `analyze` does not print."""
    from huggingface_hub import constants

    from svd_probe.cache.store import SpectraCache, SpectraOptions
    from svd_probe.results import CacheQuery, cache_repo, load_analysis

    fake_hub.clear_faults()
    analyze(AnalyzeJob(served_llama, endpoint=fake_hub.endpoint, cache_dir=tmp_path, device="cpu"))
    a = load_analysis(CacheQuery(served_llama, cache_dir=tmp_path))
    path = SpectraCache(tmp_path, cache_repo(a.ref), a.commit, SpectraOptions()).layer_path(1)
    damage(path, "truncated")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["analyze", served_llama, "--endpoint", fake_hub.endpoint, "--cache-dir", tmp_path, "--device", "cpu"]
    code, _, err = run_raw(args, monkeypatch, capsys)
    message = line_starting(err, "error: ")
    assert code == 3 and "cannot compute layer 1 " in message, err
    assert f"damaged cache file {path}: " in message, err
    assert "Layers 0 are cached" in line_starting(err, "hint: "), err
