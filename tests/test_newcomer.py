"""A first user's path: `svd-probe demo`, the README's examples run as written, exit codes,
--version / -h / --quiet, 80-column tables, `cache list` / `cache rm`, and the notebook path.

The demo is built once per session (`demo_dir`); tests that read it do not change it. Expected
numbers come from numpy on the cached σ (not from the summary code) or from the README's text.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from svd_probe import cli
from svd_probe.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def rank_at(s: np.ndarray, error: float) -> int:
    """The smallest r with Σ_{i>r} σ² / Σ σ² ≤ error, by a plain loop (the definition)."""
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    for r in range(len(e) + 1):
        if e[r:].sum() / total <= error + 1e-15:
            return r
    return len(e)


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`svd-probe ARGS` through the console-script entry point (its error handling included)."""
    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`svd-probe demo` run once, from a fresh folder, as the README shows it (default --out)."""
    base = tmp_path_factory.mktemp("newcomer")
    import os

    old = os.getcwd()
    os.chdir(base)
    try:
        result = runner.invoke(app, ["demo", "--device", "cpu"], env={"COLUMNS": "80"})
    finally:
        os.chdir(old)
    assert result.exit_code == 0, (result.output, result.exception)
    return base, result.output  # stdout and stderr, interleaved as in a terminal


@pytest.fixture
def in_demo(demo_run, monkeypatch):
    base, _ = demo_run
    monkeypatch.chdir(base)
    return base


# ---- 1. svd-probe demo -------------------------------------------------------------------------


def readme_demo_output() -> list[str]:
    """The output block that follows the README's `svd-probe demo` command."""
    m = re.search(r"```bash\nsvd-probe demo[^\n]*\n```\n\n```\n(.*?)```", README, re.S)
    assert m, "README lost its `svd-probe demo` block"
    return m.group(1).splitlines()


@pytest.mark.slow
def test_demo_output_matches_readme_and_files_exist(demo_run):
    base, stdout = demo_run
    got = [line.rstrip() for line in stdout.splitlines()]
    want = [line.rstrip() for line in readme_demo_output()]
    # The table (title to bottom border) is the same to the character; timings and the port vary.
    table_end = next(i for i, line in enumerate(want) if line.startswith("└"))
    assert got[: table_end + 1] == want[: table_end + 1]
    shape = re.compile(r"\d+(\.\d+)? s on cpu|127\.0\.0\.1:\d+")
    assert [shape.sub("#", line) for line in got[table_end + 1 :]] == [
        shape.sub("#", line) for line in want[table_end + 1 :]
    ]
    demo = base / "svd-probe-demo"
    jsonl = (demo / "spectra.jsonl").read_text().splitlines()
    assert len(jsonl) == 164 and json.loads(jsonl[0])["model"] == "demo/tiny-deepseek-v3"
    assert len((demo / "metrics.csv").read_text().splitlines()) == 164 + 1
    figures = [p for p in (demo / "plots").rglob("*") if p.is_file() and p.name != ".svd-probe-plot.json"]
    assert len(figures) == 9 and all(p.stat().st_size > 1000 for p in figures if p.suffix == ".png")
    assert (figures[0].parent / ".svd-probe-plot.json").is_file()  # so a second demo redraws them


@pytest.mark.slow
def test_demo_stopped_its_server(demo_run):
    _, stdout = demo_run
    port = int(re.search(r"127\.0\.0\.1:(\d+)", stdout).group(1))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.slow
def test_demo_summary_numbers_are_the_cached_spectra(in_demo):
    from svd_probe.results import CacheQuery, load_analysis

    a = load_analysis(CacheQuery("demo/tiny-deepseek-v3", cache_dir="svd-probe-demo/cache"))
    table = "\n".join(readme_demo_output())
    for layer in a.layers:
        o, vo = a.sigma(layer, "O"), a.sigma(layer, "VO")
        row = f"│ {layer:5d} │ {rank_at(o, 0.01):4d} │ {rank_at(o, 0.001):6d} │ {rank_at(vo, 0.01):5d} │ {rank_at(vo, 0.001):7d} │"
        assert row in table, row


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    code, out, err = run_main(["demo", "--out", str(mine)], monkeypatch, capsys)
    assert code == 2
    assert "was not made by `svd-probe demo`" in err and "Traceback" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "mine"


# ---- 2. the README's Python runs as written after the demo --------------------------------------


@pytest.mark.slow
def test_readme_python_blocks_run_after_the_demo(in_demo, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python block"
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "Analysis(demo/tiny-deepseek-v3 @ a2e7467f5888, layers 0-3," in printed
    assert "2 layers computed" in printed or "0 layers computed" in printed


# ---- 3. exit codes -------------------------------------------------------------------------------


def test_exit_codes_are_documented(monkeypatch, capsys):
    section = README[README.index("### Exit codes") :]
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in section, code


def test_exit_2_bad_input_without_traceback(monkeypatch, capsys):
    code, _, err = run_main(["analyze", "deepseek-v4"], monkeypatch, capsys)
    assert code == 2
    assert "did you mean deepseek-v3?" in err
    assert "kimi-k2-thinking" not in err  # the closest alias, not the list of all
    assert "Traceback" not in err


def test_exit_2_usage_error(monkeypatch, capsys):
    code, _, err = run_main(["analyze", "x", "--no-such-flag"], monkeypatch, capsys)
    assert code == 2 and "No such option" in err


def test_exit_3_hub_unreachable(tmp_path, monkeypatch, capsys):
    # A port nobody listens on: bound, then closed.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    args = ["analyze", "org/model", "--endpoint", f"http://127.0.0.1:{port}", "--cache-dir", str(tmp_path)]
    code, _, err = run_main(args, monkeypatch, capsys)
    assert code == 3, err
    assert "error:" in err and "Traceback" not in err


def test_exit_1_file_system_error_without_traceback(monkeypatch, capsys):
    @app.command("_fs_error_probe", hidden=True)
    def _probe() -> None:
        raise PermissionError(13, "Permission denied", "/root/forbidden")

    try:
        code, _, err = run_main(["_fs_error_probe"], monkeypatch, capsys)
    finally:
        app.registered_commands.pop()
    assert code == 1
    assert "Permission denied (/root/forbidden)" in err and "Traceback" not in err


@pytest.mark.slow
def test_exit_130_and_resume_message_on_ctrl_c(fake_hub, deepseek_ckpt, tmp_path):
    """A real SIGINT to a real process, while the stand-in slows every ranged read down."""
    import os
    import signal
    import time

    fake_hub.add_repo("newcomer/interrupt", deepseek_ckpt.folder)
    cache = tmp_path / "cache"
    fake_hub.inject("stall", count=1000, match=".safetensors", retry_after="0.4")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["analyze", "newcomer/interrupt", "--endpoint", fake_hub.endpoint, "--cache-dir", str(cache)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "svd_probe.cli", *args, "--device", "cpu", "--concurrency", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(cache.rglob("layer-0000.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        fake_hub.clear_faults()
        proc.kill()
    assert proc.returncode == 130, err
    cached = len(list(cache.rglob("layer-*.safetensors")))
    m = re.search(r"interrupted: (\d+) of (\d+) layers cached in (\S+); run the same command to resume", err)
    assert m, err
    assert int(m.group(1)) == cached and int(m.group(2)) == 4 and 1 <= cached < 4
    assert Path(m.group(3)) == cache and "Traceback" not in err


# ---- 4. --version, -h, --quiet -------------------------------------------------------------------


def test_version():
    from svd_probe import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"svd-probe {__version__}\n"


@pytest.mark.slow
def test_h_is_help_on_every_command():
    group = typer.main.get_command(app)
    names = [[n] for n in group.commands if n != "cache"] + [["cache", "list"], ["cache", "rm"], []]
    for name in names:
        short = runner.invoke(app, [*name, "-h"], env={"COLUMNS": "80"})
        long = runner.invoke(app, [*name, "--help"], env={"COLUMNS": "80"})
        assert short.exit_code == 0 and short.stdout == long.stdout and "Usage:" in short.stdout, name


def test_quiet_keeps_results_and_errors_only(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    code, out, err = run_main(["--quiet", "cache", "list", "--cache-dir", str(cache)], monkeypatch, capsys)
    assert code == 0 and "is empty" in out and err == ""
    code, _, err = run_main(["-q", "analyze", "deepseek-v4"], monkeypatch, capsys)
    assert code == 2 and "did you mean" in err  # errors still print
    code, _, err = run_main(["cache", "list", "--cache-dir", str(cache)], monkeypatch, capsys)
    assert code == 0  # the next call is not quiet any more


@pytest.mark.slow
def test_quiet_demo_prints_no_notes(demo_run, monkeypatch, capsys):
    base, _ = demo_run
    monkeypatch.chdir(base)
    code, out, err = run_main(["-q", "demo", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "0 layers computed, 4 from cache" in out
    assert err == ""


# ---- 5. 80 columns -------------------------------------------------------------------------------


def test_help_fits_80_columns_and_never_cuts_an_option():
    group = typer.main.get_command(app)
    names = [[n] for n in group.commands if n != "cache"] + [["cache", "list"], ["cache", "rm"], []]
    for name in names:
        command = group
        for part in name:
            command = command.commands[part]  # type: ignore[attr-defined]
        result = runner.invoke(app, [*name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        text = result.stdout
        assert max(len(line) for line in text.splitlines()) <= 80, name
        assert "…" not in text, name
        assert "\\[" not in text, name  # rich's markup escape, printed as is by click's plain help
        for param in getattr(command, "params", []):
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in text, (name, opt)
            if param.name != "help" and param.param_type_name == "option":
                assert param.help and param.help.strip(), (name, param.opts)


def test_models_fits_80_columns_and_keeps_names_whole(monkeypatch):
    from svd_probe.cli.app import out
    from svd_probe.models import ALIASES

    # rich reads $COLUMNS once, when the console is made: a COLUMNS=80 in the test's own
    # environment pinned `out` at 80 and the env below was ignored. Set the width itself.
    monkeypatch.setattr(out, "_width", 80)
    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"}, terminal_width=80)
    text = result.stdout
    assert result.exit_code == 0
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    for alias, a in ALIASES.items():
        assert f"│ {alias} " in text and f" {a.repo_id} " in text
    assert "llama-3.1-8b: gated" in text  # the note column became a footnote
    monkeypatch.setattr(out, "_width", 200)
    wide = runner.invoke(app, ["models"], env={"COLUMNS": "200"}, terminal_width=200).stdout
    assert max(len(line) for line in wide.splitlines()) > 80  # the wide run was wide
    assert "│ note " in wide or "┃ note " in wide


@pytest.mark.slow
def test_analyze_summary_fits_80_and_follows_matrices(in_demo, tmp_path):
    from svd_probe.results import CacheQuery, load_analysis

    args = ["analyze", "svd-probe-demo/checkpoint", "--matrices", "QK", "--cache-dir", str(tmp_path), "--device", "cpu"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.stdout
    table = text[: text.index("layers computed")]
    assert max(len(line) for line in table.splitlines()) <= 80 and "…" not in table
    assert "QK 1%" in text and "median head QK 1%" in text and "O 1%" not in text
    a = load_analysis(CacheQuery("svd-probe-demo/checkpoint", cache_dir=tmp_path))
    for layer in a.layers:
        qk = a.sigma(layer, "QK")
        row = f"│ {layer:5d} │ {rank_at(qk, 0.01):5d} │ {rank_at(qk, 0.001):7d} │"
        assert row in text, row
    assert re.search(r"│ +- +│", table) is None  # no empty cells


# ---- 7. cache list / cache rm --------------------------------------------------------------------


def _copy_cache(demo_run, tmp_path) -> Path:
    import shutil

    base, _ = demo_run
    dst = tmp_path / "cache"
    shutil.copytree(base / "svd-probe-demo" / "cache", dst)
    return dst


@pytest.mark.slow
def test_cache_list_json_and_table(demo_run, tmp_path, monkeypatch, capsys):
    cache = _copy_cache(demo_run, tmp_path)
    code, out, _ = run_main(["cache", "list", "--cache-dir", str(cache), "--json"], monkeypatch, capsys)
    assert code == 0
    listed = {e["model"]: e for e in json.loads(out)["analyses"]}
    demo = listed["demo/tiny-deepseek-v3"]
    folder = Path(demo["path"])
    assert demo["revisions"] == ["main"] and demo["commit"] == folder.parent.name
    assert demo["layers"] == [0, 1, 2, 3]
    assert demo["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert demo["options"]["fold_norms"] is True
    result = runner.invoke(app, ["cache", "list", "--cache-dir", str(cache)], env={"COLUMNS": "80"}, terminal_width=80)
    assert "demo/tiny-deepseek-v3" in result.stdout and "main → a2e7467f5888" in result.stdout
    assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80


@pytest.mark.slow
def test_cache_rm_asks_then_deletes_only_that_model(demo_run, tmp_path, monkeypatch, capsys):
    cache = _copy_cache(demo_run, tmp_path)
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    before = {p for p in cache.rglob("*")}
    no = runner.invoke(app, ["cache", "rm", "demo/tiny-deepseek-v3", "--cache-dir", str(cache)], input="n\n")
    assert no.exit_code == 1 and {p for p in cache.rglob("*")} == before
    code, _, err = run_main(
        ["cache", "rm", "demo/tiny-deepseek-v3", "--revision", "v9", "--cache-dir", str(cache)], monkeypatch, capsys
    )
    assert code == 2 and "--revision" in err
    yes = runner.invoke(app, ["cache", "rm", "demo/tiny-deepseek-v3", "--cache-dir", str(cache), "--yes"])
    assert yes.exit_code == 0, yes.output
    assert not (cache / "models--demo--tiny-deepseek-v3").exists()
    assert any(p.name.startswith("local--checkpoint") for p in cache.iterdir())  # the other model stays
    assert outside.read_text() == "keep"


def test_cache_rm_never_follows_a_symlink_out_of_the_cache(tmp_path):
    from svd_probe.cache.listing import list_cache

    victim = tmp_path / "elsewhere" / ("a" * 40) / "fold-norm-x"
    victim.mkdir(parents=True)
    (victim / "manifest.json").write_text('{"model": "victim"}')
    (victim / "layer-0000.safetensors").write_bytes(b"x")
    cache = tmp_path / "cache"
    (cache / "models--org--victim").mkdir(parents=True)
    (cache / "models--org--victim" / ("a" * 40)).symlink_to(victim.parent)
    assert list_cache(cache) == []  # a symlinked commit folder is not listed, so never removed
    result = runner.invoke(app, ["cache", "rm", "victim", "--all", "--yes", "--cache-dir", str(cache)])
    assert result.exit_code != 0
    assert (victim / "layer-0000.safetensors").exists()


# ---- 8. the notebook path ------------------------------------------------------------------------


@pytest.mark.slow
def test_analysis_repr_is_short_and_html_shows_the_summary(in_demo):
    from svd_probe.results import CacheQuery, load_analysis

    a = load_analysis(CacheQuery("demo/tiny-deepseek-v3", cache_dir="svd-probe-demo/cache"))
    assert len(repr(a)) < 400 and repr(a).startswith("Analysis(demo/tiny-deepseek-v3 @ a2e7467f5888, layers 0-3")
    html = a._repr_html_()
    assert html.startswith("<table>") and "<th>O 1%</th>" in html
    o = a.sigma(0, "O")
    assert f"<tr><td>0</td><td>{rank_at(o, 0.01)}</td><td>{rank_at(o, 0.001)}</td>" in html


@pytest.mark.slow
def test_analyze_progress_option(in_demo, tmp_path, capsys):
    from svd_probe.analysis import AnalyzeJob, analyze
    from svd_probe.errors import BadOptionError

    job = AnalyzeJob("svd-probe-demo/checkpoint", layers="0-1", matrices="O", cache_dir=tmp_path, device="cpu")
    assert analyze(job, progress="tqdm").stats["computed"] == 2
    assert "2/2" in capsys.readouterr().err  # tqdm's bar reached the end
    assert analyze(job, progress=None).stats["from_cache"] == 2
    with pytest.raises(BadOptionError):
        analyze(job, progress="bars")


@pytest.mark.slow
def test_quickstart_notebook_runs_offline(in_demo):
    """Every code cell of examples/quickstart.ipynb, in order, in one namespace (as a kernel would);
    nbclient and ipykernel are not test dependencies, so the cells run through exec."""
    nb = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    assert nb["nbformat"] == 4
    ns: dict = {"__name__": "__notebook__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        exec(compile("\n".join(lines), f"quickstart.ipynb cell {i}", "exec"), ns)
    assert "a" in ns and ns["a"].display == "demo/tiny-deepseek-v3"
