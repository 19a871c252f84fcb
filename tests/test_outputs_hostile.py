"""The output side (`export`, `plot`, `report`, `cache list`) against hostile paths and cache
contents: a dangling link under the --out name, two models of one name, a manifest's NaN and
lone surrogates, console markup in a path the user chose, and a model folder named `..`. Each
test failed on the code before its fix.

The caches are real: a small Llama-layout checkpoint analyzed once per module (`cache_fixtures`),
copied per test and damaged by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cache_fixtures import copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.plots.render import DEFAULT_OUT_ROOT
from svd_probe.plots.style import model_slug


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as JSON (RFC 8259) and JavaScript do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_dangling_link_under_the_out_name_is_not_replaced_without_overwrite(
    command, llama, template, tmp_path, monkeypatch, capsys
):
    """`--out link` where the link leads nowhere passed the "exists" check (exists() follows
    links), and the atomic rename replaced the user's link by the export, exit 0."""
    cache = copy(template, tmp_path, llama)
    link = tmp_path / "out.file"
    link.symlink_to(tmp_path / "not-yet-there")
    args = [command, llama, "--cache-dir", cache.root, "--out", link]
    if command == "report":
        args += ["--kind", "layerwise", "--dpi", "10"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "exists (a link)" in err and "--overwrite" in err
    assert link.is_symlink() and not (tmp_path / "not-yet-there").exists()
    code, _, err = run_cli([*args, "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert not link.is_symlink() and link.is_file()  # replaced, not written through
    assert not (tmp_path / "not-yet-there").exists()


def test_plot_refuses_two_models_of_one_name_rather_than_drawing_one(llama, template, tmp_path, monkeypatch, capsys):
    """Two local folders `llama` (or one model named twice) got one folder `<out>/llama/`: the
    second model's figures were silently not drawn, exit 0."""
    cache = copy(template, tmp_path, llama)
    twin = tmp_path / "elsewhere" / "llama"
    shutil.copytree(llama, twin)
    config = json.loads((twin / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # another checkpoint, of the same folder name
    (twin / "config.json").write_text(json.dumps(config))
    analyze(AnalyzeJob(model=str(twin), cache_dir=cache.root, device="cpu", layers="0"))
    out = tmp_path / "plots"
    for models in ([llama, twin], [llama, llama]):
        args = ["plot", *models, "--cache-dir", cache.root, "--out", out, "--kind", "layerwise", "--dpi", "10"]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert "named twice" in err and "llama" in err and "rename one" in err
        assert not out.exists()  # refused before anything is written


def test_cache_list_json_stays_json_when_a_manifest_holds_nan(llama, template, tmp_path, monkeypatch, capsys):
    """A manifest's options {"fold_norms": NaN, "x": Infinity} (Python's json reads both) went
    to `cache list --json` as is: output no strict JSON reader (JavaScript, RFC 8259) takes."""
    cache = copy(template, tmp_path, llama)
    edit_manifest(cache.manifest_path, lambda m: m["options"].update(fold_norms=float("nan"), x=float("inf")))
    code, out, err = run_cli(["cache", "list", "--cache-dir", cache.root, "--json"], monkeypatch, capsys)
    assert code == 0, err
    (entry,) = strict_json(out)["analyses"]
    assert "fold_norms" not in entry["options"] and "x" not in entry["options"]
    assert entry["options"]["normalize_stacked"] is True  # the finite options are kept


def test_report_of_a_manifest_with_a_lone_surrogate_escapes_it(llama, template, tmp_path, monkeypatch, capsys):
    """A version string "\\ud800" (valid JSON; Python reads it as a lone surrogate) ended
    `report` in a UnicodeEncodeError traceback when the page was encoded to UTF-8."""
    cache = copy(template, tmp_path, llama)
    edit_manifest(cache.manifest_path, lambda m: m["versions"].update(torch="v\ud800<b>"))
    page = tmp_path / "report.html"
    args = ["report", llama, "--cache-dir", cache.root, "--out", page, "--kind", "layerwise", "--dpi", "10"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    text = page.read_text(encoding="utf-8")
    assert "v\\ud800&lt;b&gt;" in text and "<b>" not in text


def test_paths_the_user_names_print_as_text_not_markup(llama, template, tmp_path, monkeypatch, capsys):
    """`report --out 'r[/]x.html'` wrote the page, then ended in rich's MarkupError traceback
    printing `wrote …` (and `[bold]` vanished from the name it printed); `cache list` of an
    empty cache folder `e[/]mpty` did the same."""
    cache = copy(template, tmp_path, llama)
    for name in ("r[/]x.html", "r[bold]y.html"):
        page = tmp_path / name
        args = ["report", llama, "--cache-dir", cache.root, "--out", page, "--kind", "layerwise", "--dpi", "10"]
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        assert f"wrote {page}" in " ".join(out.split()) and page.is_file()
    empty = tmp_path / "e[/]mpty"  # the folder `]mpty` in `e[`
    empty.mkdir(parents=True)
    code, out, err = run_cli(["cache", "list", "--cache-dir", empty], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert f"the cache {empty} is empty" in " ".join(out.split())


@pytest.mark.parametrize("name", [".", "..", ""])
def test_a_model_named_dots_gets_a_folder_of_its_own(name):
    """`svd-probe align ..` (the checkpoint is the parent folder) drew into plots/.. , the folder
    plots/ is in, and `align .` into plots/ itself: the slug was the name, dots kept."""
    slug = model_slug(name)
    assert slug and slug.strip(".")
    folder = (DEFAULT_OUT_ROOT / slug).resolve()
    assert folder.parent == DEFAULT_OUT_ROOT.resolve()


def test_export_and_plot_print_the_out_paths_as_text(llama, template, tmp_path, monkeypatch, capsys):
    """`export --out 'e[/]x.csv'` and `plot --out 'p[/]x'` wrote their files, then ended in rich's
    MarkupError printing `wrote …`; `[bold]` in a name vanished from what was printed."""
    cache = copy(template, tmp_path, llama)
    for name in ("e[/]x.csv", "e[bold]y.csv"):
        table = tmp_path / name
        args = ["export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", table]
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        assert f"to {table}" in " ".join(out.split()) and table.is_file()  # a result: on stdout
    folder = tmp_path / "p[/]x"
    args = ["plot", llama, "--cache-dir", cache.root, "--out", folder, "--kind", "layerwise", "--dpi", "10"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    drawn = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))  # not its marker
    assert drawn and all(str(p) in " ".join(out.split()) for p in drawn)


def test_a_file_that_appears_while_an_output_is_written_is_kept(tmp_path):
    """--out was checked before the work and the result renamed onto it after: a file created
    there in between (another run, the user) was silently replaced. Without --overwrite the
    finished file is now linked into place, which fails where anything appeared."""
    from svd_probe.atomic import atomic_write
    from svd_probe.errors import OutputExistsError

    out = tmp_path / "table.csv"

    def write_while_someone_creates(tmp: str) -> None:
        Path(tmp).write_text("ours\n")
        out.write_text("theirs\n")  # appears during the work

    with pytest.raises(OutputExistsError, match="appeared while svd-probe wrote it"):
        atomic_write(out, write_while_someone_creates, exclusive=True)
    assert out.read_text() == "theirs\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    out.unlink()
    (tmp_path / "elsewhere").write_text("keep\n")
    out.symlink_to(tmp_path / "nowhere")  # a dangling link counts as something there too
    with pytest.raises(OutputExistsError):
        atomic_write(out, lambda tmp: Path(tmp).write_text("ours\n"), exclusive=True)
    assert out.is_symlink()
    atomic_write(out, lambda tmp: Path(tmp).write_text("ours\n"))  # --overwrite: replaced
    assert not out.is_symlink() and out.read_text() == "ours\n"
    atomic_write(tmp_path / "new.csv", lambda tmp: Path(tmp).write_text("x\n"), exclusive=True)
    assert (tmp_path / "new.csv").read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "new.csv", "table.csv"]


def test_an_out_name_of_250_characters_is_written(llama, template, tmp_path, monkeypatch, capsys):
    """The temporary file's name was "." + the whole final name + 8 + ".tmp": a legal 250-byte
    --out failed with "File name too long"."""
    cache = copy(template, tmp_path, llama)
    table = tmp_path / ("t" * 246 + ".csv")
    args = ["export", llama, "--cache-dir", cache.root, "--format", "csv", "--out", table]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert table.is_file() and table.read_text().count("\n") > 1
