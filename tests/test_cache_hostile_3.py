"""A cache folder someone else filled, third audit: layer files copied under another layer's name
or from a larger model, per-head spectra of unequal head counts, links planted at the lock file and
in a diff's folders, layer files named twice, and files dated past what a date can say. Each test
failed on the code before its fix.

The caches are real: a small Llama-layout checkpoint analyzed (and aligned) once per module,
copied per test and damaged by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cache_fixtures import copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from test_audit_cache_outputs import rewrite_layer
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.cache.store import DiffCache, SpectraOptions
from svd_probe.results import CacheQuery, load_analysis


def unwrapped(err: str) -> str:
    """stderr without spaces: rich wraps long paths at any character (`local--llam a-…`)."""
    return err.replace(" ", "")


def exported_layers(path: Path) -> set[int]:
    return {json.loads(line)["layer"] for line in path.read_text().splitlines()}


# --- layer files that are not this layer's, or not this model's ----------------------------------


def test_a_layer_file_copied_under_another_layers_name_is_damage(llama, template, tmp_path, monkeypatch, capsys):
    """Layer 0's file copied over layer 1's (its metadata still says layer 0) was exported as
    layer 1, exit 0: two layers of identical spectra, silently."""
    cache = copy(template, tmp_path, llama)
    shutil.copy(cache.layer_path(0), cache.layer_path(1))
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(["export", llama, "--cache-dir", cache.root, "--out", out], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "layer-0001.safetensors" in unwrapped(err) and "spectra of layer '0', not of layer 1" in err
    assert "--layers 1" in err and not out.exists()
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root), on_damaged="skip")
    assert a.layers == [0] and any("layer-0001" in n for n in a.notes)


def test_a_layer_past_the_models_layers_is_left_out(llama, template, tmp_path, monkeypatch, capsys):
    """A file of layer 7 (from a larger model, its metadata saying 7) in the cache of this 2-layer
    model was exported and plotted as this model's layer 7."""
    cache = copy(template, tmp_path, llama)
    shutil.copy(cache.layer_path(1), cache.layer_path(7))
    rewrite_layer(cache.layer_path(7), lambda t, m: m.update(layer="7"))
    assert json.loads(cache.manifest_path.read_text())["dims"]["num_layers"] == 2
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(["export", llama, "--cache-dir", cache.root, "--out", out], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert exported_layers(out) == {0, 1}
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root))
    assert a.layers == [0, 1]
    assert any("layer-0007.safetensors" in n and "layers 0-1" in n for n in a.notes), a.notes
    # Nothing of the model's own: the miss says why.
    for ly in (0, 1):
        cache.layer_path(ly).unlink()
    code, _, err = run_cli(
        ["export", llama, "--cache-dir", cache.root, "--out", tmp_path / "t.jsonl"], monkeypatch, capsys
    )
    assert code == 2 and "Traceback" not in err, err
    assert "layer-0007.safetensors" in unwrapped(err) and not (tmp_path / "t.jsonl").exists()


# --- per-head spectra of one layer are of one set of heads ----------------------------------------


@pytest.mark.parametrize("rows", [3, 24])
def test_per_head_spectra_of_unequal_head_counts_are_damage(llama, template, tmp_path, rows, monkeypatch, capsys):
    """head.VO of 3 rows beside head.O of 8 ended `plot` and `report` in pandas' ValueError (a
    traceback, exit 1); of 24 rows, `plot` drew each O row three times as if grouped, exit 0."""
    cache = copy(template, tmp_path, llama)

    def resize(t, _meta):
        vo = t["head.VO"]
        assert vo.shape[0] == 8 and t["head.O"].shape[0] == 8 and t["head.V"].shape[0] == 2
        t["head.VO"] = np.ascontiguousarray(vo[:rows] if rows < 8 else np.concatenate([vo] * (rows // 8)))

    rewrite_layer(cache.layer_path(1), resize)
    code, _, err = run_cli(
        ["plot", llama, "--cache-dir", cache.root, "--out", tmp_path / "plots", "--kind", "headwise"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "Traceback" not in err, err
    assert f"head.VO {rows}" in err and "layer-0001.safetensors" in unwrapped(err)
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli(["export", llama, "--cache-dir", cache.root, "--out", out], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "disagree on the number of heads" in err and f"head.V 2, head.VO {rows}" in err and not out.exists()


# --- links planted where the cache writes ---------------------------------------------------------


def test_a_lock_file_that_is_a_link_is_not_followed(llama, template, tmp_path, monkeypatch, capsys):
    """A `.lock` planted as a link to a missing file: `analyze` created that file (O_CREAT through
    the link), outside the cache, and went on, exit 0."""
    cache = copy(template, tmp_path, llama)
    outside = tmp_path / "outside" / "made-by-svd-probe"
    outside.parent.mkdir()
    (cache.dir / ".lock").unlink()
    (cache.dir / ".lock").symlink_to(outside)
    cache.layer_path(1).unlink()  # a layer to compute, so the lock is taken
    code, _, err = run_cli(["analyze", llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert ".lockisalinkinsidethecachefolder" in unwrapped(err) and "Remove the link" in err
    assert not outside.exists() and not cache.layer_path(1).exists()


@pytest.mark.parametrize("where", ["diff", "base"])
def test_a_link_inside_a_diffs_folder_is_not_written_through(llama, template, tmp_path, where, monkeypatch, capsys):
    """`diff/` (or a diff's `base/`) planted as a link: `svd-probe diff` wrote its layer files,
    manifest and lock where the link pointed, exit 0."""
    cache = copy(template, tmp_path, llama)
    diff = DiffCache(cache.root, cache.repo, cache.commit, cache.repo, cache.commit, SpectraOptions())
    link = cache.root / cache.repo / cache.commit / "diff" if where == "diff" else diff.dir / "base"
    link.parent.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    code, _, err = run_cli(["diff", llama, llama, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{where}isalinkinsidethecachefolder" in unwrapped(err)
    assert not list(outside.iterdir())


# --- cache list -----------------------------------------------------------------------------------


def test_each_layer_is_listed_once_whatever_else_is_named_like_a_layer_file(
    llama, template, tmp_path, monkeypatch, capsys
):
    """`layer-00001.safetensors` beside `layer-0001.safetensors` made `cache list` list layer 1
    twice; `layer-1_0.safetensors` was read as a cached layer 10 (int() takes `1_0`)."""
    cache = copy(template, tmp_path, llama)
    shutil.copy(cache.layer_path(1), cache.dir / "layer-00001.safetensors")
    shutil.copy(cache.layer_path(1), cache.dir / "layer-1_0.safetensors")
    shutil.copy(cache.layer_path(1), cache.dir / "layer-\u0661\u0661\u0661\u0661.safetensors")  # Arabic-Indic 1111
    code, out, err = run_cli(["cache", "list", "--json", "--cache-dir", cache.root], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    (entry,) = json.loads(out)["analyses"]
    assert entry["layers"] == [0, 1]
    assert cache.cached_layers() == [0, 1]


def test_cache_list_of_a_file_dated_past_year_9999(llama, template, monkeypatch, capsys):
    """A copied cache file dated in the year 33658 (a tmpfs keeps such a date): `cache list` ended
    in datetime's ValueError, a traceback."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("needs /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        root = Path(shm) / "cache"
        shutil.copytree(template, root)
        layer = next(root.rglob("layer-0001.safetensors"))
        os.utime(layer, (1e12, 1e12))
        if layer.stat().st_mtime < 1e12:
            pytest.skip("this file system clamps the date")
        code, out, err = run_cli(["cache", "list", "--json", "--cache-dir", root], monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        (entry,) = json.loads(out)["analyses"]
        assert entry["layers"] == [0, 1] and entry["updated"] == ""
        code, out, err = run_cli(["cache", "list", "--cache-dir", root], monkeypatch, capsys)
        assert code == 0 and "Traceback" not in err, err
        assert "llama" in out


@pytest.mark.parametrize("n_heads", [24, 1 << 31])
def test_manifest_head_counts_that_disagree_with_the_layer_files_are_not_believed(llama, template, tmp_path, n_heads):
    """Without head.VO cached, the head-wise figure takes the head count from the manifest's dims:
    n_heads 24 drew this 8-head layer as 24 heads (V's and O's rows repeated, exit 0), and 2^31
    asked numpy for 16 GiB (a traceback)."""
    from svd_probe.plots.figures import headwise_ranks

    cache = copy(template, tmp_path, llama)
    for ly in (0, 1):
        rewrite_layer(cache.layer_path(ly), lambda t, m: t.pop("head.VO"))

    def edit(m):
        m["dims"]["n_heads"] = n_heads
        for entry in m["layers"].values():
            entry["keys"].remove("head.VO")

    manifest = json.loads(cache.manifest_path.read_text())
    edit(manifest)
    cache.manifest_path.write_text(json.dumps(manifest))
    a = load_analysis(CacheQuery(str(llama), cache_dir=cache.root))
    assert "n_heads" not in a.dims and a.dims["n_kv_groups"] == 2 and a.dims["d_model"] == 64
    assert any(f"n_heads {n_heads:,}" in n and "hold 8" in n for n in a.notes), a.notes
    result = headwise_ranks(a, layer=1, kinds=("V", "O"))
    assert len(result.data) == 8 and sorted(result.data["head"]) == list(range(8))
    # V is per key/value group: head h reads group h // 4.
    v = load_analysis(CacheQuery(str(llama), cache_dir=cache.root)).metrics()
    v = v[(v["layer"] == 1) & (v["scope"] == "head") & (v["matrix"] == "V")].sort_values("head")["rank_1pct"]
    by_head = result.data.sort_values("head")["V"].to_numpy()
    assert list(by_head) == [int(x) for x in np.repeat(v.to_numpy(), 4)]


def test_cache_rm_with_no_answer_deletes_nothing_and_says_why(llama, template, tmp_path):
    """`cache rm` from a script with stdin closed ended in click's bare "Aborted!" (exit 1, no
    error, no hint); now a usage error naming --yes, and nothing is deleted."""
    import subprocess
    import sys

    cache = copy(template, tmp_path, llama)
    before = sorted(p.relative_to(cache.root) for p in cache.root.rglob("*"))
    r = subprocess.run(
        [sys.executable, "-m", "svd_probe.cli", "cache", "rm", "llama", "--all", "--cache-dir", str(cache.root)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error:" in r.stderr and "--yes" in r.stderr and "Aborted" not in r.stderr
    assert sorted(p.relative_to(cache.root) for p in cache.root.rglob("*")) == before
