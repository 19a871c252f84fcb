"""A cache folder someone else filled, as `align`, `diff` and offline `analyze` read it: layer files
under names `layer_path` never gives, copied over another layer's or past the model's layers,
and hand-edited model dims in a manifest; and `align` asked for what it cannot measure (a rank
of the whole residual stream, no two consecutive layers, `--layers ""`). Each test failed on the
code before its fix.

The caches are real: a small Llama-layout checkpoint analyzed and aligned once per module (and
diffed against itself), copied per test and damaged by hand. Offline runs read a copy filed
under a Hub repo id, with huggingface_hub's own offline switch on.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import RANK, copy, llama_fixture, template_fixture  # noqa: F401 - fixtures
from safetensors import safe_open
from safetensors.numpy import save_file
from test_cache_robustness import run_cli  # the console entry point, stderr's wraps undone

from svd_probe.alignment import AlignmentStore
from svd_probe.cache.store import DiffCache, SpectraOptions, repo_key
from svd_probe.diff import DiffJob, diff, load_diff
from svd_probe.results import CacheQuery

HUB = "org/llama"  # the offline copy's repo id: offline fallbacks are for Hub models only


@pytest.fixture(scope="module")
def diffed(llama, template, tmp_path_factory) -> Path:
    """The template cache plus the diff of `llama` against itself (both layers)."""
    root = tmp_path_factory.mktemp("diffed") / "cache"
    shutil.copytree(template, root)
    diff(DiffJob(str(llama), str(llama), cache_dir=root, device="cpu"))
    return root


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def hub_copy(cache_root: Path, tmp_path: Path) -> Path:
    """A copy of a cache of the local `llama` filed as the Hub repo HUB (its diff too); its root."""
    root = tmp_path / "hub-cache"
    shutil.copytree(cache_root, root)
    (local,) = [p for p in root.iterdir() if p.name.startswith("local--")]
    repo = root / repo_key(HUB)
    local.rename(repo)
    for tuned in repo.glob(f"*/diff/{local.name}"):
        tuned.rename(tuned.parent / repo.name)
    return root


def one(root: Path, pattern: str) -> Path:
    (path,) = root.glob(pattern)
    return path


def unwrapped(err: str) -> str:
    """stderr without spaces: rich wraps long paths at any character."""
    return err.replace(" ", "")


def plant_layer_7(src: Path, alignment: bool) -> Path:
    """A copy of layer 1's file as layer 7's, its metadata saying 7 (a file of a larger model)."""
    with safe_open(src, framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if alignment:
        meta["info"] = json.dumps({**json.loads(meta["info"]), "layer": 7, "prev_layer": 6})
    else:
        meta["layer"] = "7"
    dst = src.with_name("layer-0007.safetensors")
    save_file(tensors, str(dst), metadata=meta)
    return dst


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- alignment files under names layer_path never gives --------------------------------------------


def test_alignment_files_under_other_names_are_no_cached_layers(llama, template, tmp_path, monkeypatch, capsys):
    """`AlignmentStore` parsed layer-file names itself: `layer-00001`, `layer-1_0` (int() takes
    `1_0`) and Arabic-Indic digits counted as cached layers 1, 10 and 1111. A run folder holding
    only such files (and a newer manifest) was taken as the latest run, and `plot` skipped the
    alignment figure ("no readable alignment layers") although the rank-4 run was whole."""
    cache = copy(template, tmp_path, llama)
    good = AlignmentStore(cache, "O", RANK)
    other = AlignmentStore(cache, "O", 2 * RANK)
    other.dir.mkdir()
    shutil.copy(good.manifest_path, other.manifest_path)
    os.utime(other.manifest_path, (good.manifest_path.stat().st_mtime + 60,) * 2)
    for store in (good, other):
        for name in ("layer-00001", "layer-1_0", "layer-\u0661\u0661\u0661\u0661"):
            shutil.copy(good.layer_path(1), store.dir / f"{name}.safetensors")
    out = tmp_path / "plots"
    code, stdout, err = run_cli(
        ["plot", llama, "--kind", "alignment", "--cache-dir", cache.root, "--out", out], monkeypatch, capsys
    )
    assert code == 0 and "Traceback" not in err, err
    assert "skipped" not in err and (out / f"alignment-O-r{RANK}.png").is_file(), stdout + err
    assert (good.cached_layers(), other.cached_layers()) == ([0, 1], [])


# --- a layer file that is another layer's, or of no layer of this model ---------------------------


def test_an_alignment_file_copied_over_anothers_says_whose_it_is(llama, template, tmp_path, monkeypatch, capsys):
    """Layer 0's alignment copied over layer 1's was refused as "metadata is missing or
    malformed", and `plot` (which computes nothing) said it was "recomputing layer 1"."""
    cache = copy(template, tmp_path, llama)
    store = AlignmentStore(cache, "O", RANK)
    shutil.copy(store.layer_path(0), store.layer_path(1))
    code, _, err = run_cli(
        ["plot", llama, "--kind", "alignment", "--cache-dir", cache.root, "--out", tmp_path / "p"], monkeypatch, capsys
    )
    assert code == 0 and "Traceback" not in err, err
    assert "layer-0001.safetensors" in unwrapped(err) and "holds the alignment of layer 0, not of layer 1" in err
    assert "recomputing" not in err


def test_an_alignment_layer_past_the_model_is_left_out_offline(llama, template, tmp_path, offline, monkeypatch, capsys):
    """A layer-7 alignment file in the cache of this 2-layer model: offline `align` printed and
    exported a row 6→7, exit 0."""
    root = hub_copy(template, tmp_path)
    plant_layer_7(one(root, f"*/*/*/alignment-O-r{RANK}/layer-0001.safetensors"), alignment=True)
    out = tmp_path / "a.jsonl"
    code, stdout, err = run_cli(
        ["align", HUB, "--rank", RANK, "--cache-dir", root, "--device", "cpu", "--no-figure", "--export", out],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "Traceback" not in err, err
    assert {r["other_layer"] for r in jsonl(out)} == {0, 1}
    assert "6→7" not in stdout and "0→1" in stdout
    assert "layer-0007.safetensors" in unwrapped(err) and "the model has layers 0-1" in err


def test_a_diff_layer_past_the_model_is_left_out(llama, diffed, tmp_path, monkeypatch, capsys):
    """A layer-7 file (and its base reference) in a diff of this 2-layer model: `export --diff`
    exported it as the model's layer 7, exit 0."""
    cache = copy(diffed, tmp_path, llama)
    d = DiffCache(cache.root, cache.repo, cache.commit, cache.repo, cache.commit, SpectraOptions())
    for folder in (d.dir, d.dir / "base"):
        plant_layer_7(folder / "layer-0001.safetensors", alignment=False)
    out = tmp_path / "d.jsonl"
    args = ["export", llama, "--diff", llama, "--cache-dir", cache.root]
    code, _, err = run_cli([*args, "--out", out], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert {r["layer"] for r in jsonl(out)} == {0, 1}
    loaded = load_diff(CacheQuery(str(llama), cache_dir=cache.root), str(llama))
    assert sorted(loaded.layer_spectra) == sorted(loaded.base_spectra) == [0, 1]
    assert any("layer-0007.safetensors" in n and "the model has layers 0-1" in n for n in loaded.notes)
    # Nothing of the model's own left: the miss says why.
    for folder in (d.dir, d.dir / "base"):
        for ly in (0, 1):
            (folder / f"layer-000{ly}.safetensors").unlink()
    code, _, err = run_cli([*args, "--out", tmp_path / "e.jsonl"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "layer-0007.safetensors" in unwrapped(err) and not (tmp_path / "e.jsonl").exists()


# --- model dims hand-edited in a manifest (offline analyze and diff) -------------------------------


def edit_dims(manifest: Path, change) -> None:
    m = json.loads(manifest.read_text())
    change(m)
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.update(num_layers="x"), "num_layers 'x'"),  # TypeError in select_layers
        (lambda d: d.update(num_layers=2.0), "num_layers 2.0"),  # TypeError in range()
        (lambda d: d.update(num_layers=-5), "num_layers -5"),  # an empty summary, exit 0
        (lambda d: d.update(num_mtp_layers=5), "num_mtp_layers 5"),  # more MTP layers than layers: empty, exit 0
        (lambda d: d.pop("num_layers"), "no num_layers"),
    ],
    ids=["text", "float", "negative", "mtp-past-layers", "missing"],
)
def test_offline_analyze_of_damaged_dims_names_the_manifest(
    llama, template, tmp_path, offline, change, named, monkeypatch, capsys
):
    root = hub_copy(template, tmp_path)
    manifest = one(root, "*/*/fold-*/manifest.json")
    edit_dims(manifest, lambda m: change(m["dims"]))
    code, out, err = run_cli(["analyze", HUB, "--cache-dir", root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "manifest.jsonisdamaged" in unwrapped(err)
    assert named in err and "`svd-probe analyze` writes it anew" in err and out == ""


def test_offline_analyze_keeps_a_dims_field_of_a_later_version(llama, template, tmp_path, offline, monkeypatch, capsys):
    """checked_dims keeps a field it does not know (a later version's): not damage."""
    root = hub_copy(template, tmp_path)
    edit_dims(one(root, "*/*/fold-*/manifest.json"), lambda m: m["dims"].update(d_sliding=4096))
    code, out, err = run_cli(["analyze", HUB, "--cache-dir", root, "--device", "cpu", "--json"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert [row["layer"] for row in json.loads(out)["layers"]] == [0, 1]


def test_offline_analyze_of_a_huge_num_layers_allocates_nothing(template, tmp_path):
    """num_layers 2^31 in a hand-edited manifest: offline `analyze` built a list of 2^31 layers
    (killed for memory). As a user runs it, in a process of its own whose data is capped at 4 GiB
    (the old code's MemoryError there is a traceback)."""
    root = hub_copy(template, tmp_path)
    edit_dims(one(root, "*/*/fold-*/manifest.json"), lambda m: m["dims"].update(num_layers=1 << 31))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, resource.getrlimit(resource.RLIMIT_DATA)[1]))

    r = subprocess.run(
        [sys.executable, "-m", "svd_probe.cli", "analyze", HUB, "--cache-dir", str(root), "--device", "cpu"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"},
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "num_layers 2147483648" in r.stderr and "damaged" in r.stderr


def test_offline_diff_of_damaged_dims_names_the_manifest(llama, diffed, tmp_path, offline, monkeypatch, capsys):
    """num_mtp_layers 5 in a diff's manifest of a 2-layer model: offline `diff` summarized no layer
    at all, exit 0 (select_layers took -3 main layers)."""
    root = hub_copy(diffed, tmp_path)
    edit_dims(one(root, "*/*/diff/*/*/fold-*/manifest.json"), lambda m: m["dims"].update(num_mtp_layers=5))
    code, out, err = run_cli(["diff", HUB, HUB, "--cache-dir", root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "num_mtp_layers 5" in err and "`svd-probe diff` writes it anew" in err and out == ""


# --- align asked for what it cannot measure --------------------------------------------------------


@pytest.mark.parametrize("rank", [64, 200])
def test_a_rank_of_the_whole_residual_stream_is_refused(llama, template, tmp_path, rank, monkeypatch, capsys):
    """--rank ≥ d_model printed a table of cosines 1.000 (every layer subspace the whole residual
    stream), exit 0, with only a note about d_v."""
    d_model = json.loads((llama / "config.json").read_text())["hidden_size"]
    assert rank >= d_model
    cache = copy(template, tmp_path, llama)
    args = ["align", llama, "--rank", rank, "--cache-dir", cache.root, "--device", "cpu", "--no-figure"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"d_model {d_model}" in err and f"from 1 to {d_model - 1}" in err and "1.000" not in out
    assert not AlignmentStore(cache, "O", rank).dir.exists()  # refused before any tensor was read


def test_json_without_consecutive_layers_says_why_it_is_empty(llama, template, tmp_path, monkeypatch, capsys):
    """`align --json` of layers with no pair L → L+1 printed `[]` and nothing else."""
    cache = copy(template, tmp_path, llama)
    args = ["align", llama, "--rank", RANK, "--layers", "0", "--json", "--no-figure"]
    code, out, err = run_cli([*args, "--cache-dir", cache.root, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert json.loads(out) == []
    assert "no layer L → L+1 among layers 0" in err and "--layers 0-1" in err


@pytest.mark.parametrize("command", ["align", "analyze", "diff"])
def test_an_empty_layers_option_is_refused_by_every_command(llama, template, tmp_path, command, monkeypatch, capsys):
    """`--layers ""` (a shell variable left unset) meant every layer, while `--layers ,` was
    refused: `align` aligned both layers, exit 0. Every command that takes --layers refuses it."""
    cache = copy(template, tmp_path, llama)
    models = [llama, llama] if command == "diff" else [llama]
    extra = ["--rank", RANK, "--no-figure", "--json"] if command == "align" else []
    args = [command, *models, "--layers", "", *extra, "--cache-dir", cache.root, "--device", "cpu"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "bad --layers value '': no layer in it" in err and out == ""
