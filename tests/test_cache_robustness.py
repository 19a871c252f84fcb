"""The spectra cache against what the world does to it: odd revision strings, damaged files,
concurrent runs, unreadable manifests, read-only and full disks, long folder names, and the
export's output file.

Checkpoints are the small real-layout ones of `svd_probe.testing.layouts`, read from a folder;
damage is done to the cache files by hand, disks are real (a tmpfs, a read-only bind mount)
where the machine lets us mount them.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from safetensors.numpy import save_file

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.store import LayerSpectra, SpectraCache, SpectraOptions, ref_file_name, repo_key
from svd_probe.errors import CacheDamagedError, DiskWriteError, OutputExistsError
from svd_probe.export import export
from svd_probe.models import resolve_model
from svd_probe.results import CacheQuery, cache_repo, load_analysis
from svd_probe.testing.layouts import write_layout

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A 2-layer Llama-layout checkpoint folder (layer files of ~14 KB)."""
    return write_layout(tmp_path_factory.mktemp("ck") / "llama", "llama")


@pytest.fixture(scope="module")
def analyzed(llama, tmp_path_factory) -> Path:
    """A cache holding both layers of `llama`, analyzed once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("template") / "cache"
    analyze(AnalyzeJob(model=str(llama), cache_dir=root, device="cpu"))
    return root


def cached(analyzed: Path, tmp_path: Path, llama: Path) -> SpectraCache:
    """A fresh copy of the analyzed cache under tmp_path (the cache root is tmp_path itself)."""
    import shutil

    shutil.copytree(analyzed, tmp_path, dirs_exist_ok=True)
    a = load_analysis(CacheQuery(str(llama), cache_dir=tmp_path))
    return SpectraCache(tmp_path, cache_repo(a.ref), a.commit, SpectraOptions())


def run_raw(args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Through the console-script entry point: (exit code, stdout, stderr) exactly as written."""
    from svd_probe.cli import main

    monkeypatch.setattr(sys, "argv", ["svd-probe", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    """As `run_raw`, with stderr's wraps undone."""
    code, out, err = run_raw(args, monkeypatch, capsys)
    return code, out, " ".join(err.split())


def job(folder, cache, **kw) -> AnalyzeJob:
    return AnalyzeJob(model=str(folder), cache_dir=cache, device="cpu", **kw)


def snapshot(root: Path) -> dict:
    """Every file under root with its inode, size and mtime: any write changes it."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@contextlib.contextmanager
def mounted(*cmds: list[str], target: Path):
    """Run mount commands (root only; skip the test where the machine forbids them)."""
    target.mkdir(parents=True, exist_ok=True)
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip(f"cannot mount here: {' '.join(cmd)}: {r.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# --- revisions -----------------------------------------------------------------------------------

REVISIONS = [".", "..", "/", "%", "a/../../b", "refs/pr/1", "v1.0", "x" * 300, "ünïcödé-分支", "%2F", ".hidden"]


@pytest.mark.parametrize("revision", REVISIONS, ids=range(len(REVISIONS)))
def test_any_revision_string_is_stored_inside_refs(tmp_path, revision):
    repo = "models--o--m"
    assert SpectraCache.write_ref(tmp_path, repo, revision, COMMIT)
    path = SpectraCache.ref_path(tmp_path, repo, revision)
    assert path.parent == tmp_path / repo / "refs" and path.is_file()
    assert len(path.name.encode()) <= 255 and not path.name.startswith(".")
    if len(revision) < 40:  # short names round-trip; long ones end in a hash
        assert unquote(path.name) == revision
    assert SpectraCache.read_ref(tmp_path, repo, revision).commit == COMMIT
    # Nothing else was written, and other revisions do not see it.
    assert [p for p in (tmp_path / repo).rglob("*") if p.is_file()] == [path]
    assert SpectraCache.read_ref(tmp_path, repo, "main") is None


def test_distinct_revisions_get_distinct_ref_files():
    names = {ref_file_name(r) for r in REVISIONS + ["x" * 299, "%2E", "%25"]}
    assert len(names) == len(REVISIONS) + 3


@pytest.mark.slow
def test_revision_dot_does_not_wedge_the_cache(llama, tmp_path, monkeypatch, capsys):
    for rev in (".", "..", "main", "."):
        code, _, err = run_cli(
            ["analyze", llama, "--cache-dir", tmp_path, "--revision", rev, "--json"], monkeypatch, capsys
        )
        assert code == 0, err
    assert (tmp_path / cache_repo(resolve_model(str(llama))) / "refs").is_dir()
    assert load_analysis(CacheQuery(str(llama), ".", tmp_path)).layers == [0, 1]


def test_a_refs_file_left_by_an_older_version_is_repaired(llama, tmp_path):
    repo_dir = tmp_path / cache_repo(resolve_model(str(llama)))
    repo_dir.mkdir(parents=True)
    (repo_dir / "refs").write_text("f" * 40)  # what `--revision .` used to leave
    assert SpectraCache.read_ref(tmp_path, repo_dir.name, "main") is None
    out = analyze(job(llama, tmp_path))
    assert (repo_dir / "refs").is_dir()
    assert SpectraCache.read_ref(tmp_path, repo_dir.name, "main").commit == out.commit


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\xff\xfe\x00", b"[" * 100_000, b"1" * 5000, b'{"revision": "main", "commit": 7}', b"[]"],
    ids=["empty", "text", "not-utf8", "deep", "digits", "bad-commit", "list"],
)
def test_unreadable_refs_read_as_absent(tmp_path, content):
    path = SpectraCache.ref_path(tmp_path, "models--o--m", "main")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert SpectraCache.read_ref(tmp_path, "models--o--m", "main") is None
    assert SpectraCache.write_ref(tmp_path, "models--o--m", "main", COMMIT)  # and are replaced
    assert SpectraCache.read_ref(tmp_path, "models--o--m", "main").commit == COMMIT


def test_refs_are_read_bounded_and_never_through_a_link_or_a_pipe(tmp_path):
    """A refs file is read at most MAX_REF_BYTES + 1 bytes (a sparse 2 GB one cost 2 GB of memory
    before), and one that is a link (it could point anywhere) or a FIFO (a read would block) reads
    as absent, by `read_ref` and by `cache list`'s `read_refs` alike."""
    import tracemalloc

    from svd_probe.cache.listing import read_refs
    from svd_probe.cache.store import MAX_REF_BYTES

    repo = "models--o--m"
    refs = tmp_path / repo / "refs"
    refs.mkdir(parents=True)
    good = json.dumps({"revision": "main", "commit": COMMIT}).encode()
    huge = SpectraCache.ref_path(tmp_path, repo, "main")
    with open(huge, "wb") as f:
        f.write(good)
        f.truncate(2 << 30)  # sparse: 2 GB on paper, nothing on disk
    tracemalloc.start()
    try:
        assert SpectraCache.read_ref(tmp_path, repo, "main") is None
        assert read_refs(tmp_path / repo) == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_REF_BYTES, peak
    huge.write_bytes(good + b" " * (MAX_REF_BYTES - len(good)))  # at the bound: still read
    assert SpectraCache.read_ref(tmp_path, repo, "main").commit == COMMIT
    huge.unlink()
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(good)
    huge.symlink_to(outside)
    assert SpectraCache.read_ref(tmp_path, repo, "main") is None and read_refs(tmp_path / repo) == {}
    huge.unlink()
    if hasattr(os, "mkfifo"):
        os.mkfifo(huge)
        assert SpectraCache.read_ref(tmp_path, repo, "main") is None and read_refs(tmp_path / repo) == {}


def test_a_revision_too_long_to_read_back_is_not_recorded(tmp_path):
    """write_ref records only what read_ref reads back: a revision whose record would pass
    MAX_REF_BYTES is resolved afresh each time instead; one just under it round-trips."""
    from svd_probe.cache.store import MAX_REF_BYTES

    long_one = "分" * (MAX_REF_BYTES // 6 + 1)  # JSON writes each as \\uXXXX, six bytes
    assert not SpectraCache.write_ref(tmp_path, "models--o--m", long_one, COMMIT)
    assert SpectraCache.read_ref(tmp_path, "models--o--m", long_one) is None
    assert not (tmp_path / "models--o--m").exists()
    shorter = "分" * (MAX_REF_BYTES // 6 - 20)
    assert SpectraCache.write_ref(tmp_path, "models--o--m", shorter, COMMIT)
    assert SpectraCache.read_ref(tmp_path, "models--o--m", shorter).commit == COMMIT


def test_refs_of_earlier_versions_still_read(tmp_path):
    path = tmp_path / "models--o--m" / "refs" / "refs%2Fpr%2F1"
    path.parent.mkdir(parents=True)
    path.write_text(COMMIT)
    assert SpectraCache.read_ref(tmp_path, "models--o--m", "refs/pr/1").commit == COMMIT


# --- damaged layer files -------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty-but-valid":
        save_file({}, str(path), metadata={"format": "1"})
    elif how == "lacks-a-key":  # a whole file, but without a spectrum the manifest lists
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "stacked.VO"}
        save_file(tensors, str(path), metadata=meta)
    elif how == "bad-metadata":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path), metadata={"shapes": "[" * 50_000})
    elif how in ("head-flattened", "negative"):  # the bytes add up, the shapes or values do not
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if how == "head-flattened":
            key = next(k for k in tensors if k.startswith("head."))
            tensors[key] = tensors[key].reshape(-1)
        else:
            tensors["stacked.VO"] = -tensors["stacked.VO"]
        save_file(tensors, str(path), metadata=meta)
    else:
        raise ValueError(how)


DAMAGE = ["truncated", "garbage", "empty-but-valid", "lacks-a-key", "bad-metadata", "head-flattened", "negative"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_layer_file_is_reported_and_recomputed_alone(llama, analyzed, tmp_path, how, monkeypatch, capsys):
    cache = cached(analyzed, tmp_path, llama)
    want = cache.read_layer(1).sigma
    path = cache.layer_path(1)
    damage(path, how)
    code, out, err = run_cli(
        ["analyze", llama, "--cache-dir", tmp_path, "--device", "cpu", "--json"], monkeypatch, capsys
    )
    assert code == 0, err
    assert str(path) in err and "Traceback" not in err
    stats = json.loads(out)["stats"]
    assert (stats["computed"], stats["from_cache"]) == (1, 1)
    again = load_analysis(CacheQuery(str(llama), cache_dir=tmp_path))
    assert set(again.layer_spectra[1].sigma) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(again.layer_spectra[1].sigma[k], v)


@pytest.mark.parametrize("how", DAMAGE)
def test_export_stops_at_a_damaged_layer_and_names_it(llama, analyzed, tmp_path, how, monkeypatch, capsys):
    cache = cached(analyzed, tmp_path, llama)
    damage(cache.layer_path(1), how)
    out = tmp_path / "s.jsonl"
    with pytest.raises(CacheDamagedError) as e:
        export(CacheQuery(str(llama), cache_dir=tmp_path), format="jsonl", out=out)
    assert e.value.path == str(cache.layer_path(1)) and str(cache.layer_path(1)) in e.value.message
    assert "--layers 1" in e.value.hint
    assert not out.exists() and not list(tmp_path.glob(".s.jsonl*"))
    code, _, err = run_cli(["export", llama, "--cache-dir", tmp_path, "--out", out], monkeypatch, capsys)
    assert code == 2 and "damaged cache file" in err and "Traceback" not in err


@pytest.mark.slow
def test_plot_draws_the_other_layers_and_notes_the_damaged_one(llama, analyzed, tmp_path):
    from svd_probe.plots import make_plots

    cache = cached(analyzed, tmp_path, llama)
    damage(cache.layer_path(0), "truncated")
    report = make_plots([CacheQuery(str(llama), cache_dir=tmp_path)], tmp_path / "plots", kinds="layerwise", dpi=30)
    assert any(str(cache.layer_path(0)) in n for n in report.notes)
    assert set(report.result("layerwise").data["layer"]) == {1}


# --- concurrent runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_on_disjoint_layers_both_land_in_the_manifest(fake_hub, tmp_path):
    """Both runs read the manifest before either writes a layer (every shard read is held 0.3 s),
    then write their layers in turn: each layer must be listed, with its keys."""
    fake_hub.clear_faults()
    fake_hub.inject("stall", count=10_000, match=".safetensors", retry_after="0.3")
    try:
        base = [sys.executable, "-m", "svd_probe.cli", "analyze", "tiny/deepseek-v3", "--endpoint", fake_hub.endpoint]
        base += ["--cache-dir", str(tmp_path), "--device", "cpu", "--matrices", "O,VO"]
        procs = [
            subprocess.Popen([*base, "--layers", spec], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for spec in ("0,1", "2,3")
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
    finally:
        fake_hub.clear_faults()
    a = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert a.layers == [0, 1, 2, 3]
    listed = a.manifest["layers"]
    assert sorted(listed, key=int) == ["0", "1", "2", "3"]
    assert all(set(listed[k]["keys"]) == {"head.O", "head.VO", "stacked.O", "stacked.VO"} for k in listed)


def test_update_layer_merges_kinds_and_lists_them(tmp_path):
    cache = SpectraCache(tmp_path, "models--o--m", COMMIT, SpectraOptions())
    s = np.array([3.0, 2.0, 1.0])
    cache.update_layer(LayerSpectra(4, {"stacked.O": s}, {"stacked.O": (3, 5)}, {"stacked.O": "BF16"}))
    merged = cache.update_layer(LayerSpectra(4, {"stacked.VO": 2 * s}, {"stacked.VO": (3, 7)}))
    assert set(merged.sigma) == {"stacked.O", "stacked.VO"} and merged.shapes["stacked.O"] == (3, 5)
    back = cache.read_layer(4, cache.expected_keys(cache.read_manifest(), 4))
    np.testing.assert_array_equal(back.sigma["stacked.VO"], 2 * s)
    assert back.storage_dtypes == {"stacked.O": "BF16"}
    assert cache.read_manifest()["layers"]["4"]["keys"] == ["stacked.O", "stacked.VO"]
    replaced = cache.update_layer(LayerSpectra(4, {"stacked.Q": s}, {"stacked.Q": (3, 3)}), merge=False)
    assert set(replaced.sigma) == {"stacked.Q"} == set(cache.read_layer(4).sigma)


# --- manifests -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "content",
    [b"[]", b"null", b'"a string"', b"\xff\xfe\x00\x01", b"[" * 100_000, b"1" * 5000, b"{"],
    ids=["list", "null", "string", "not-utf8", "deep", "digits", "truncated"],
)
def test_an_unreadable_manifest_is_rebuilt_with_a_note(llama, analyzed, tmp_path, content, monkeypatch, capsys):
    cache = cached(analyzed, tmp_path, llama)
    cache.layer_path(1).unlink()
    manifest = cache.manifest_path
    manifest.write_bytes(content)
    # Reading it back gives a note, not a traceback.
    a = load_analysis(CacheQuery(str(llama), cache_dir=tmp_path))
    assert a.layers == [0] and any("manifest.json" in n for n in a.notes)
    code, _, err = run_cli(
        ["analyze", llama, "--cache-dir", tmp_path, "--device", "cpu", "--json"], monkeypatch, capsys
    )
    assert code == 0 and "manifest.json is unreadable" in err and "Traceback" not in err
    rebuilt = json.loads(manifest.read_text())
    assert rebuilt["model"] == "llama" and sorted(rebuilt["layers"]) == ["0", "1"]
    assert rebuilt["dims"]["num_layers"] == 2


# --- read-only, full disks and long names ---------------------------------------------------------


def test_a_rerun_with_everything_cached_writes_nothing(llama, analyzed, tmp_path):
    cached(analyzed, tmp_path, llama)
    before = snapshot(tmp_path)
    again = analyze(job(llama, tmp_path))
    assert again.computed == [] and snapshot(tmp_path) == before


def test_a_read_only_cache_that_holds_everything_just_works(llama, tmp_path, monkeypatch, capsys):
    src = tmp_path / "cache"
    analyze(job(llama, src, layers="0"))
    ro = tmp_path / "ro"
    with mounted(["mount", "--bind", str(src), str(ro)], ["mount", "-o", "remount,ro,bind", str(ro)], target=ro):
        code, out, err = run_cli(["analyze", llama, "--cache-dir", ro, "--layers", "0", "--json"], monkeypatch, capsys)
        assert code == 0, err
        assert json.loads(out)["stats"]["from_cache"] == 1
        # A layer that needs writing fails with a message, not a traceback.
        code, _, err = run_cli(["analyze", llama, "--cache-dir", ro, "--layers", "1"], monkeypatch, capsys)
        assert code == 2 and "Read-only file system" in err and "--cache-dir" in err and "Traceback" not in err


def test_a_full_disk_loses_the_layer_cleanly(llama, tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], target=disk):
        # Leave room for the manifest and about one 14 KB layer file.
        (disk / "filler").write_bytes(b"\0" * (40 * 1024))
        code, _, err = run_cli(["analyze", llama, "--cache-dir", disk, "--device", "cpu"], monkeypatch, capsys)
        assert code == 2, err
        assert "the disk is full" in err and "Traceback" not in err
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        cache = next(disk.rglob("manifest.json")).parent
        written = sorted(cache.glob("layer-*.safetensors"))
        assert len(written) < 2
        for p in written:  # what is there is whole
            SpectraCache(disk, cache.parent.parent.name, cache.parent.name, SpectraOptions()).read_layer(
                int(p.stem.split("-")[1])
            )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a" * 250, "ü" * 120, "b" * 250])
def test_long_folder_names_give_valid_cache_keys(llama, tmp_path, name):
    import shutil

    folder = tmp_path / name
    shutil.copytree(llama, folder)
    key = repo_key(None, folder)
    assert len(key.encode()) <= 120
    assert key != repo_key(None, tmp_path / ("c" * 250))
    out = analyze(job(folder, tmp_path / "cache", layers="0"))
    assert out.cache_dir.is_dir() and load_analysis(CacheQuery(str(folder), cache_dir=tmp_path / "cache")).layers == [0]


# --- export's output file ------------------------------------------------------------------------


@pytest.mark.slow
def test_export_never_overwrites_a_file_or_writes_into_a_folder(llama, tmp_path, monkeypatch, capsys):
    analyze(job(llama, tmp_path / "cache", layers="0"))
    q = CacheQuery(str(llama), cache_dir=tmp_path / "cache")
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputExistsError, match="is a folder"):
        export(q, format="csv", out=folder)
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(".out*"))
    mine = tmp_path / "mine.csv"
    mine.write_text("precious")
    code, _, err = run_cli(["export", llama, "--cache-dir", tmp_path / "cache", "--out", mine], monkeypatch, capsys)
    assert code == 2 and "--overwrite" in err and mine.read_text() == "precious"
    code, _, err = run_cli(
        ["export", llama, "--cache-dir", tmp_path / "cache", "--out", mine, "--overwrite", "--format", "csv"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert mine.read_text().startswith("model,revision,layer")


def test_export_refuses_a_device_or_pipe_even_with_overwrite(llama, tmp_path, monkeypatch, capsys):
    """The atomic rename would put a regular file where the pipe (or /dev/full) was."""
    analyze(job(llama, tmp_path / "cache", layers="0"))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run_cli(
        ["export", llama, "--cache-dir", tmp_path / "cache", "--out", fifo, "--overwrite"], monkeypatch, capsys
    )
    assert code == 2 and "is not a regular file" in err and "Traceback" not in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_cache_list_reads_a_deeply_nested_manifest_as_unreadable(llama, tmp_path, monkeypatch, capsys):
    analyze(job(llama, tmp_path / "cache", layers="0"))
    (manifest,) = (tmp_path / "cache").rglob("manifest.json")
    manifest.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (ref,) = (tmp_path / "cache").rglob("refs/*")
    (ref.parent / "deep").write_bytes(b"[" * 4000)  # within the 4096 bytes read of a ref
    code, out, err = run_cli(["cache", "list", "--cache-dir", tmp_path / "cache"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "llama" in out


def test_a_huge_manifest_is_read_bounded_and_noted(llama, analyzed, tmp_path):
    """A sparse manifest past 64 MiB (no disk used) is not read into memory: a note, then {}."""
    cache = cached(analyzed, tmp_path, llama)
    with open(cache.manifest_path, "wb") as f:
        f.truncate((64 << 20) + 1)
    notes: list[str] = []
    assert cache.read_manifest(notes) == {} and "is unreadable: it is over 64 MiB" in notes[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_manifests_that_are_pipes_or_huge_are_read_as_absent_without_blocking(llama, analyzed, tmp_path):
    """The spectra manifest and the alignment manifest share one reader: a FIFO in a manifest's
    place would block a read forever, and a sparse 2 GB alignment manifest was read whole."""
    import tracemalloc

    from svd_probe.alignment import AlignmentStore

    cache = cached(analyzed, tmp_path, llama)
    cache.manifest_path.unlink()
    os.mkfifo(cache.manifest_path)
    notes: list[str] = []
    assert cache.read_manifest(notes) == {} and "not a regular file" in notes[0]
    store = AlignmentStore(cache, "O", 4)
    store.dir.mkdir()
    os.mkfifo(store.manifest_path)
    assert store.read_manifest() == {}
    store.manifest_path.unlink()
    with open(store.manifest_path, "wb") as f:
        f.write(b'{"layers": {}}')
        f.truncate(2 << 30)
    tracemalloc.start()
    try:
        assert store.read_manifest() == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (64 << 20) + (8 << 20), peak  # the bound, not 2 GB


@pytest.mark.slow
def test_export_on_a_full_disk_leaves_no_temporary_file(llama, tmp_path):
    analyze(job(llama, tmp_path / "cache"))
    disk = tmp_path / "disk"
    with mounted(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], target=disk):
        with pytest.raises(DiskWriteError, match="No space left") as info:
            export(CacheQuery(str(llama), cache_dir=tmp_path / "cache"), format="jsonl", out=disk / "s.jsonl")
        assert info.value.hint == "Free space on that disk, or pick another --out."
        assert list(disk.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json"])
def test_a_local_folder_with_a_pipe_for_its_index_or_config_is_refused(llama, tmp_path, name, monkeypatch, capsys):
    """A FIFO as the index was skipped in silence (the folder analyzed from its shard headers,
    exit 0), and as config.json reported as missing; each is now named for what it is."""
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(llama, folder)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    code, _, err = run_cli(
        ["analyze", folder, "--cache-dir", tmp_path / "cache", "--device", "cpu"], monkeypatch, capsys
    )
    assert code != 0 and "is not a regular file" in err and "Traceback" not in err, err
