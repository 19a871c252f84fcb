"""Layer files of a cache someone else wrote: swapped between their check and their read, padded
past what their header describes, or recording matrix shapes that are no sizes. Each test failed
on the code before its fix (the layer file was checked by its name, then opened by its name).

The caches are real: a small Llama-layout checkpoint analyzed and aligned (rank 4) once per
module, copied per test and damaged by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cache_fixtures import RANK, copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from safetensors import safe_open
from safetensors.numpy import save_file

from svd_probe.alignment import AlignmentStore
from svd_probe.cache.store import MAX_LAYER_BYTES, SpectraCache
from svd_probe.errors import CacheDamagedError
from svd_probe.export import export
from svd_probe.results import CacheQuery, load_analysis


def reader(cache: SpectraCache, which: str):
    """(path of layer 1's file, a call that reads it) of the spectra or the alignment folder."""
    if which == "spectra":
        return cache.layer_path(1), lambda: cache.read_layer(1)
    store = AlignmentStore(cache, "O", RANK)
    return store.layer_path(1), lambda: store.read_layer(1)


# Opens the FIFO `argv[1]` for writing (and closes it) once `argv[2]` seconds have passed: a read
# blocked opening it gets end of file. A process of its own, as a blocked safe_open holds the GIL.
_UNBLOCK = """
import os, sys, time
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline + 30:
    time.sleep(0.05)
    if time.monotonic() < deadline:
        continue
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        break
    except OSError:  # no reader (nothing blocked), or the FIFO is gone
        pass
"""


@contextlib.contextmanager
def unblocked_after(path: Path, seconds: float):
    """A read blocked on the FIFO `path` ends after `seconds` (its test then fails, not hangs)."""
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(path), str(seconds)])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


def giant(path: Path, key: str) -> None:
    """A layer file whose one tensor is past MAX_LAYER_BYTES (sparse: no disk used)."""
    count = MAX_LAYER_BYTES // 8 + 1
    header = {"__metadata__": {"format": "1"}, key: {"dtype": "F64", "shape": [count], "data_offsets": [0, 8 * count]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 8 * count)


def bytes_read() -> int | None:
    """Bytes this process has read through read() calls so far (Linux), else None."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


# --- a file swapped in after its check is not read through ------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and links")
@pytest.mark.parametrize("which", ["spectra", "alignment"])
@pytest.mark.parametrize("swap", ["link", "fifo", "giant"])
def test_a_layer_file_swapped_right_after_its_check_is_not_read_through(
    llama, template, tmp_path, monkeypatch, which, swap
):
    """The file was checked by lstat, then opened by its name in safe_open: a link swapped in
    between was followed out of the cache (here to a copy of the same layer, a file of the
    user's, read back as if it were the cache's), a FIFO blocked the read forever (the whole
    process: safe_open holds the GIL), and a sparse 256 MiB file was read whole. Now the file
    opened is the file checked."""
    cache = copy(template, tmp_path, llama)
    path, read = reader(cache, which)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(path, outside)
    before = outside.read_bytes()

    def replace() -> None:
        path.unlink()
        if swap == "link":
            path.symlink_to(outside)
        elif swap == "fifo":
            os.mkfifo(path)
        else:
            giant(path, "stacked.VO" if which == "spectra" else "head_layer")

    # The check's lstat, by either name (os.lstat, or pathlib's, which does not call it).
    real_lstat, real_path_lstat = os.lstat, pathlib.Path.lstat
    swapped: list[Path] = []

    def after(p, st):
        if Path(p) == path and not swapped:  # the check saw the cache's own file; now it is gone
            swapped.append(path)
            replace()
        return st

    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: after(p, real_lstat(p, *a, **k)))
    monkeypatch.setattr(pathlib.Path, "lstat", lambda self, *a, **k: after(self, real_path_lstat(self, *a, **k)))
    start = time.monotonic()
    with unblocked_after(path, 5.0), pytest.raises(CacheDamagedError) as info:
        got = read()
        pytest.fail(f"read the swapped-in file as the cache's layer: {got!r:.200}")
    took = time.monotonic() - start
    monkeypatch.undo()
    assert swapped, "the layer file was never checked"
    assert took < 4.0, f"blocked {took:.1f} s on the FIFO"
    assert info.value.path == str(path)
    want = "MiB a layer file holds" if swap == "giant" else "a link, pipe or device, not a regular file"
    assert want in info.value.message, info.value.message
    assert outside.read_bytes() == before


# --- a file larger than its header says is refused before its data is read ---------------------------


@pytest.mark.parametrize("which", ["spectra", "alignment"])
def test_a_layer_file_padded_past_its_header_is_refused_unread(llama, template, tmp_path, which):
    """A header padded with 17 MiB of spaces (valid JSON; safetensors reads up to 100 MB) was read
    and parsed whole, and the file taken. The header is bounded now, and a file longer than the
    data its header describes (here 200 MiB of zeros after it, sparse) is refused before any of
    its data is read."""
    cache = copy(template, tmp_path, llama)
    path, read = reader(cache, which)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    padded = data[8 : 8 + n] + b" " * (17 << 20)
    path.write_bytes(struct.pack("<Q", len(padded)) + padded + data[8 + n :])
    start = bytes_read()
    with pytest.raises(CacheDamagedError) as info:
        read()
    assert info.value.path == str(path) and "over the 16 MiB a layer file's header holds" in info.value.message
    if start is not None:
        assert bytes_read() - start < 1 << 20  # the 8 bytes of the header's length, not the header

    path.write_bytes(data)
    assert read() is not None  # the file as written reads
    with open(path, "r+b") as f:
        f.truncate(len(data) + (200 << 20))
    start = bytes_read()
    with pytest.raises(CacheDamagedError) as info:
        read()
    assert f"{len(data):,} bytes its header describes" in info.value.message, info.value.message
    if start is not None:
        assert bytes_read() - start < 1 << 20


# --- recorded shapes are sizes, and hold the σ stored ---------------------------------------------------


def rewrite_shape(path: Path, key: str, shape) -> None:
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shapes = json.loads(meta["shapes"])
    shapes[key] = shape
    meta["shapes"] = json.dumps(shapes)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("key", "shape", "why"),
    [
        ("stacked.VO", [2**40, 64], "is not two sizes"),
        ("stacked.VO", [64, 2**31 + 1], "is not two sizes"),
        ("stacked.VO", [0, 64], "is not two sizes"),
        ("stacked.VO", [2, 3], "holds 64 singular values, more than the 2 of the 2 × 3 matrix"),
        ("head.VO", [4, 64], "holds 64 singular values, more than the 4 of the 4 × 64 matrix"),
    ],
    ids=["2^40", "2^31+1", "zero", "fewer-than-stored", "head-fewer-than-stored"],
)
def test_a_recorded_shape_that_is_no_size_or_too_small_is_damage_not_data(
    llama, template, tmp_path, key, shape, why, monkeypatch, capsys
):
    """The (m, n) a layer file records for a spectrum were checked only to be ints >= 0: a
    matrix of 2^40 rows, of 0 rows, or of 2 × 3 behind 64 singular values was exported as it
    was (m, n and full_rank columns), by export and the CLI alike."""
    from test_cache_robustness import run_cli

    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    rewrite_shape(path, key, shape)
    out = tmp_path / "m.csv"
    with pytest.raises(CacheDamagedError) as info:
        export(CacheQuery(str(llama), cache_dir=cache.root), format="csv", out=out)
    assert info.value.path == str(path) and why in info.value.message, info.value.message
    assert not out.exists()
    code, _, err = run_cli(["export", llama, "--cache-dir", cache.root, "--out", out], monkeypatch, capsys)
    assert code == 2 and "damaged cache file" in err and "Traceback" not in err, err
    assert not out.exists()
    # The layer beside it still loads, with a note naming this one.
    skipped = load_analysis(CacheQuery(str(llama), cache_dir=cache.root), on_damaged="skip")
    assert skipped.layers == [0] and any(why in n for n in skipped.notes)


@pytest.mark.parametrize(("key", "empty"), [("stacked.VO", (0,)), ("head.VO", (4, 0)), ("head.VO", (0, 64))])
def test_an_empty_spectrum_is_damage_not_data(llama, template, tmp_path, key, empty, monkeypatch, capsys):
    """A spectrum of no singular values passed every check of a layer file: export wrote the
    layer without that spectrum's rows, exit 0 (86-90 rows where 91 belong)."""
    from test_cache_robustness import run_cli

    cache = copy(template, tmp_path, llama)
    path = cache.layer_path(1)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = np.zeros(empty, dtype=np.float64)
    save_file(tensors, str(path), metadata=meta)
    out = tmp_path / "m.csv"
    code, _, err = run_cli(["export", llama, "--cache-dir", cache.root, "--out", out], monkeypatch, capsys)
    assert code == 2 and "damaged cache file" in err and key in err and "Traceback" not in err, err
    assert not out.exists()


# --- links inside the cache folder ----------------------------------------------------------------


def _tree(folder: Path) -> dict:
    """Each file under `folder`: its size and mtime (what a write would change)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("where", ["commit", "options", "alignment"])
def test_a_link_inside_the_cache_is_not_read_or_written_through(llama, template, tmp_path, where, monkeypatch, capsys):
    """A folder of the cache replaced by a link to a folder elsewhere (a shared cache another
    user filled). Before: `analyze --force` wrote its layer files and manifest there, `export`
    read from there, and `align` wrote its alignment there, each with exit 0."""
    from test_cache_robustness import run_cli

    cache = copy(template, tmp_path, llama)
    folder = {
        "commit": cache.dir.parent,
        "options": cache.dir,
        "alignment": AlignmentStore(cache, "O", RANK).dir,
    }[where]
    outside = tmp_path / "elsewhere"
    shutil.move(str(folder), str(outside))
    folder.symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    out = tmp_path / "m.csv"
    commands = [
        ["analyze", llama, "--cache-dir", cache.root, "--device", "cpu", "--force"],
        ["export", llama, "--cache-dir", cache.root, "--out", out],
        ["align", llama, "--rank", str(RANK), "--cache-dir", cache.root, "--device", "cpu", "--force"],
    ]
    for args in commands if where != "alignment" else commands[2:]:  # only align reads its folder
        code, _, err = run_cli(args, monkeypatch, capsys)
        text = " ".join(err.split())
        assert code == 2 and "is a link inside the cache folder" in text and "Traceback" not in err, (args, err)
        assert "--cache-dir" in text
    assert _tree(outside) == before  # nothing written there
    assert not out.exists()
