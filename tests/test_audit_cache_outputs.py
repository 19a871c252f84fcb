"""svd-probe's own outputs read back as input someone else sent, or a disk damaged: names that
are console markup or escape sequences, layer files that are links, pipes or sparse giants,
manifest fields of the wrong kind, alignment folders and metadata out of shape, and refs that
disagree with their file names. Each test failed on the code before its fix.

The caches are real: a small Llama-layout checkpoint analyzed (and aligned) once per module,
copied per test and damaged by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from cache_fixtures import RANK, copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from safetensors import safe_open
from safetensors.numpy import save_file
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.alignment import AlignmentStore, load_alignment
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.store import MAX_LAYER_BYTES
from svd_probe.errors import CacheDamagedError, CacheMissError
from svd_probe.export import export
from svd_probe.results import CacheQuery, cache_repo, load_analysis


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rewrite_layer(path: Path, change) -> None:
    """Read a layer file, let `change(tensors, metadata)` edit both, write it back."""
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


# --- names from the cache reach the terminal as text ---------------------------------------------


def test_names_from_a_manifest_print_as_text_not_as_markup_or_escape_sequences(
    llama, template, tmp_path, monkeypatch, capsys
):
    """A manifest's model name `[/]` ended `cache list` and `analyze` in rich's MarkupError (a
    traceback), as did a note `[/]` in its dims; an ESC in a name went to the terminal as is."""
    cache = copy(template, tmp_path, llama)

    def hostile(m):
        m["model"] = "[/]evil[bold]"
        m["dims"]["notes"] = ["[/]a note", "\x1b]0;title\x07"]

    edit_manifest(cache.manifest_path, hostile)
    code, out, err = run_cli(["cache", "list", "--cache-dir", cache.root], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "[/]evil[bold]" in out and "\x1b" not in out
    code, out, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "[/]evil[bold]" in out and "note: [/]a note" in out and "\x1b" not in out
    assert "title" not in out  # the note that was an escape sequence is left out
    # A folder name is the cache's too: `cache rm` lists it as text.
    (cache.root / cache.repo).rename(cache.root / "local--[red]\x1b[2J")
    code, out, err = run_cli(
        ["cache", "rm", "[/]evil[bold]", "--all", "--yes", "--cache-dir", cache.root], monkeypatch, capsys
    )
    assert code == 0 and "Traceback" not in err, err
    assert "local--[red]\\x1b[2J" in out and "\x1b" not in out
    assert not list(cache.root.iterdir())


def test_a_layer_file_whose_header_the_error_quotes_ends_with_the_message(
    llama, template, tmp_path, monkeypatch, capsys
):
    """safetensors' error quotes the header's bytes: a dtype `[/]` made the damaged-file message
    console markup, and the CLI's error printer raised MarkupError (a traceback, exit 1)."""
    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header[next(k for k in header if k != "__metadata__")]["dtype"] = "[/]"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    code, _, err = run_cli(
        ["export", llama, "--cache-dir", cache.root, "--out", tmp_path / "s.jsonl"], monkeypatch, capsys
    )
    assert code == 2 and "Traceback" not in err, err
    assert "damaged cache file" in err and "(/)" in err
    assert not (tmp_path / "s.jsonl").exists()


def test_a_manifest_listing_a_key_that_names_no_spectrum_damages_no_layer(llama, template, tmp_path):
    """The manifest is an index: a key `[/]` it lists for a layer made that whole layer file
    "damaged" (export stopped, analyze recomputed it) and put the key into the error's markup."""
    cache = copy(template, tmp_path, llama)
    edit_manifest(cache.manifest_path, lambda m: m["layers"]["1"]["keys"].append("[/]"))
    rows = export(CacheQuery(str(llama), cache_dir=cache.root), format="jsonl", out=tmp_path / "s.jsonl")
    assert rows == len((tmp_path / "s.jsonl").read_text().splitlines()) and rows > 0
    assert load_analysis(CacheQuery(str(llama), cache_dir=cache.root)).layers == [0, 1]


# --- layer files are opened only when they are regular files of a bounded size ----------------------


def test_a_sparse_giant_layer_file_is_refused_before_it_is_read(llama, template, tmp_path):
    """A layer file whose header claims one tensor past MAX_LAYER_BYTES (sparse: no disk used)
    was read whole (a 2 GiB one took 4.3 GB of memory) before being called damaged."""
    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    count = MAX_LAYER_BYTES // 8 + 1
    meta = {"format": "1", "layer": "1", "shapes": "{}", "storage_dtypes": "{}", "info": "{}"}
    header = {"__metadata__": meta, "stacked.VO": {"dtype": "F64", "shape": [count], "data_offsets": [0, 8 * count]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 8 * count)
    tracemalloc.start()
    try:
        with pytest.raises(CacheDamagedError) as info:
            load_analysis(CacheQuery(str(llama), cache_dir=cache.root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The tensor alone is 256 MiB; what is left is the manifest's read buffer (64 MiB, untouched).
    assert peak < 96 << 20, peak
    assert info.value.path == str(path) and "MiB a layer file holds" in info.value.message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_layer_file_that_is_a_link_or_a_pipe_is_not_read_and_stops_export(
    llama, template, tmp_path, monkeypatch, capsys
):
    """A link in a layer file's place was followed (read out of the cache: here a layer file of
    the user's elsewhere), and a pipe was skipped in silence, so export wrote a shorter data set
    and exit 0. Both are now damaged layers: export stops naming the file, analyze replaces it
    (the rename replaces the link itself, never the file it points to)."""
    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(cache.layer_path(0), outside)  # a valid file, of another layer
    before = outside.read_bytes()
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(CacheDamagedError, match="a link, pipe or device") as info:
        export(CacheQuery(str(llama), cache_dir=cache.root), format="csv", out=tmp_path / "m.csv")
    assert info.value.path == str(path) and not (tmp_path / "m.csv").exists()
    code, _, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert not path.is_symlink() and path.is_file() and outside.read_bytes() == before
    path.unlink()
    os.mkfifo(path)
    code, _, err = run_cli(
        ["export", llama, "--cache-dir", cache.root, "--out", tmp_path / "s.jsonl"], monkeypatch, capsys
    )
    assert code == 2 and "damaged cache file" in err and "Traceback" not in err, err
    assert not (tmp_path / "s.jsonl").exists()


def test_a_manifest_that_is_a_link_is_not_followed(llama, template, tmp_path):
    """read_json_object followed a link in a manifest's place, out of the cache folder."""
    cache = copy(template, tmp_path, llama)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"model": "a file of the user's", "dims": {"d_model": 1}}))
    cache.manifest_path.unlink()
    cache.manifest_path.symlink_to(outside)
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root))
    assert a.display == "llama" and a.manifest == {}
    assert any("is a link, not a file" in n for n in a.notes)


# --- manifest fields of the wrong kind read as unknown ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", {"a": 1}), ("model", "two\nlines"), ("dims", [1]), ("dims.d_model", "x"), ("dims.n_heads", -5)],
)
def test_manifest_fields_of_the_wrong_kind_read_as_unknown(
    llama, template, tmp_path, field, value, monkeypatch, capsys
):
    """A model that is no name gave `plot` and `report` a traceback (and export wrote it as is), a
    `dims` list ended `analyze` in AttributeError, a size "x" or -5 ended `report` in
    ValueError. Each now reads as absent: the query's name, the adapter's dims."""
    cache = copy(template, tmp_path, llama)

    def change(m):
        if field.startswith("dims."):
            m["dims"][field[5:]] = value
        else:
            m[field] = value

    edit_manifest(cache.manifest_path, change)
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root))
    assert a.display == "llama" and isinstance(a.dims, dict)
    assert all(type(v) is int and v >= 0 for k, v in a.dims.items() if k in ("d_model", "n_heads"))
    code, _, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    report = ["report", llama, "--cache-dir", cache.root, "--out", tmp_path / "r.html", "--kind", "planner"]
    code, _, err = run_cli(report, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err


def test_cache_list_json_of_a_manifest_with_deep_options(llama, template, tmp_path, monkeypatch, capsys):
    """Options nested 600 deep parse (json.loads' C decoder), but `cache list --json` printed them
    through the indenting encoder, which recursed past the limit: RecursionError."""
    cache = copy(template, tmp_path, llama)
    text = cache.manifest_path.read_text()
    manifest = json.loads(text)
    manifest["options"]["deep"] = "X"
    cache.manifest_path.write_text(json.dumps(manifest).replace('"X"', "[" * 600 + "]" * 600))
    code, out, err = run_cli(["cache", "list", "--cache-dir", cache.root, "--json"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    (entry,) = json.loads(out)["analyses"]
    assert "deep" not in entry["options"] and entry["options"]["fold_norms"] is True


# --- the alignment cache ---------------------------------------------------------------------------


def test_an_alignment_folder_whose_rank_is_no_number_is_left_alone(llama, template, tmp_path):
    """`alignment-O-r²`: "²".isdigit() is True, int("²") a ValueError (a traceback in `plot`)."""
    cache = copy(template, tmp_path, llama)
    store = AlignmentStore(cache, "O", RANK)
    store.dir.rename(cache.dir / "alignment-O-r²")
    with pytest.raises(CacheMissError, match="no alignment cached"):
        load_alignment(CacheQuery(str(llama), cache_dir=cache.root))


def _align_recomputes_layer_1(llama, cache, monkeypatch, capsys) -> None:
    """`svd-probe align` of the damaged cache: exit 0, no traceback, layer 1 recomputed."""
    code, out, err = run_cli(
        ["align", llama, "--rank", RANK, "--cache-dir", cache.root, "--device", "cpu", "--no-figure", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "Traceback" not in err, err
    assert "recomputing layer 1" in err and json.loads(out)


@pytest.mark.parametrize(
    "ranks",
    [{"head": "x", "layer": 4}, {"head": 4, "layer": 4, "read": [1]}, {"head": 4, "layer": 4, "prev_write": "x"}],
)
def test_alignment_ranks_of_the_wrong_kind_are_a_damaged_layer(llama, template, tmp_path, ranks, monkeypatch, capsys):
    """A layer file's `ranks` of the wrong kind passed read_layer and ended `align`, `plot` and
    the export in ValueError or AttributeError when the rows were built."""
    cache = copy(template, tmp_path, llama)
    store = AlignmentStore(cache, "O", RANK)
    path = store.layer_path(1)

    def change(tensors, meta):
        info = json.loads(meta["info"])
        info["ranks"] = ranks
        meta["info"] = json.dumps(info)

    rewrite_layer(path, change)
    with pytest.raises(CacheDamagedError, match="metadata is missing or malformed"):
        store.read_layer(1)
    _align_recomputes_layer_1(llama, cache, monkeypatch, capsys)
    assert store.read_layer(1).ranks["head"] == RANK


@pytest.mark.parametrize("d_model", [0, 2**31 + 1])
def test_an_alignment_d_model_out_of_range_is_a_damaged_layer(llama, template, tmp_path, d_model, monkeypatch, capsys):
    """A layer file's `d_model` is the width its cosines are compared with: 2**31 + 1 was taken
    as is (0 was refused, as "metadata is malformed", naming no field). Now each is refused by
    name, and `align` recomputes the layer."""
    cache = copy(template, tmp_path, llama)
    store = AlignmentStore(cache, "O", RANK)
    path = store.layer_path(1)
    want = store.read_layer(1).d_model

    def change(tensors, meta):
        info = json.loads(meta["info"])
        info["d_model"] = d_model
        meta["info"] = json.dumps(info)

    rewrite_layer(path, change)
    with pytest.raises(CacheDamagedError, match="its d_model is not an int from 1 to 2,147,483,648") as e:
        store.read_layer(1)
    assert str(path) in str(e.value) and "--force" in (e.value.hint or ""), e.value
    _align_recomputes_layer_1(llama, cache, monkeypatch, capsys)
    assert store.read_layer(1).d_model == want


def test_alignment_arrays_of_unknown_names_are_left_out(llama, template, tmp_path, monkeypatch, capsys):
    """Every array of a layer file was checked and named in the damage note: an array `[/]` made
    the note console markup (MarkupError), and made a sound file "damaged"."""
    cache = copy(template, tmp_path, llama)
    store = AlignmentStore(cache, "O", RANK)
    want = store.read_layer(1)
    rewrite_layer(store.layer_path(1), lambda t, _: t.update({"[/]": t["head_layer"] * 0 + 5}))
    assert store.read_layer(1).ranks == want.ranks
    code, _, err = run_cli(
        ["align", llama, "--rank", RANK, "--cache-dir", cache.root, "--device", "cpu", "--no-figure"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "Traceback" not in err and "recomputing" not in err, err


# --- refs ----------------------------------------------------------------------------------------------


def test_cache_rm_believes_only_the_ref_file_a_revision_names(llama, tmp_path, monkeypatch, capsys):
    """A ref file `x` that records revision main (and the older commit) made `cache rm` of main
    delete that older commit and main's own ref, keeping the commit main names."""
    folder = tmp_path / "ck"
    shutil.copytree(llama, folder)
    root = tmp_path / "cache"
    first = analyze(AnalyzeJob(model=str(folder), cache_dir=root, device="cpu", layers="0")).analysis
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # a new fingerprint: a second commit of the folder
    (folder / "config.json").write_text(json.dumps(config))
    second = analyze(AnalyzeJob(model=str(folder), cache_dir=root, device="cpu", layers="0")).analysis
    repo = root / cache_repo(first.ref)
    assert first.commit != second.commit
    (repo / "refs" / "x").write_text(json.dumps({"revision": "main", "commit": first.commit}))
    code, out, err = run_cli(["cache", "rm", "ck", "--yes", "--cache-dir", root], monkeypatch, capsys)
    assert code == 0, err
    assert (repo / first.commit).is_dir() and not (repo / second.commit).exists()
    assert not (repo / "refs" / "main").exists() and (repo / "refs" / "x").is_file()


def test_a_diff_manifest_names_print_as_text(llama, tmp_path, monkeypatch, capsys):
    """A cached diff's manifest names both sides: a base model `[/]b` ended `svd-probe diff` in
    MarkupError (its table title), and a tuned model that was an object went into the title and
    the --json `model` as its repr."""
    tuned = tmp_path / "tuned"
    shutil.copytree(llama, tuned)
    root = tmp_path / "cache"
    args = ["diff", llama, tuned, "--cache-dir", root, "--device", "cpu", "--layers", "0"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    (path,) = (p for p in root.rglob("diff/**/manifest.json") if p.parent.name != "base")

    def hostile(m):
        m["base"]["model"] = "[/]b"
        m["tuned"]["model"] = {"x": 1}

    edit_manifest(path, hostile)
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "tuned − [/]b" in out
    code, out, err = run_cli([*args, "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["tuned"]["model"] == "tuned"


@pytest.mark.parametrize("name", ["x[/]y", "x[bold]y"])
def test_an_error_quoting_a_path_prints_it_as_text(tmp_path, monkeypatch, capsys, name):
    """Every error goes through the CLI's one printer, which read its message as console markup:
    a folder named with `[/]` (a user's, or one a file named) ended in rich's MarkupError
    traceback, and `[bold]` vanished from the path it printed."""
    missing = str(tmp_path / name)
    code, _, err = run_cli(["analyze", missing], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and "MarkupError" not in err, err
    assert f"error: no such folder: {missing}" in err
