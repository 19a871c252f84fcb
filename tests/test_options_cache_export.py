"""Option parsing, cache keys and files, the results loader and `export`, without a checkpoint."""

import json

import numpy as np
import pandas as pd
import pytest

from svd_probe.adapters.base import ModelDims
from svd_probe.cache.store import LayerSpectra, SpectraCache, SpectraOptions, default_cache_root, repo_key
from svd_probe.errors import BadOptionError, CacheMissError
from svd_probe.export import export
from svd_probe.kinds import spectrum_keys
from svd_probe.options import parse_layers, parse_matrices, select_layers
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.spectra.metrics import energy_rank

DIMS = ModelDims(
    "deepseek_v3",
    num_layers=62,
    num_mtp_layers=1,
    d_model=7168,
    n_heads=128,
    n_kv_groups=128,
    d_qk=128,
    d_rope=64,
    d_v=128,
    q_latent=1536,
    kv_latent=512,
)


def test_layers_parse_ranges_and_lists():
    assert select_layers(parse_layers("0-3,10,60"), DIMS, True) == [0, 1, 2, 3, 10, 60]
    assert select_layers(parse_layers(None), DIMS, True) == list(range(62))
    assert select_layers(parse_layers(None), DIMS, False) == list(range(61))
    assert select_layers(parse_layers("61"), DIMS, True) == [61]


@pytest.mark.parametrize(
    "spec,needle", [("99", "no layer 99"), ("3-1", "end before start"), ("a", "not a layer"), ("0-2,x", "not a layer")]
)
def test_bad_layers_are_refused_with_the_valid_range(spec, needle):
    with pytest.raises(BadOptionError) as e:
        select_layers(parse_layers(spec), DIMS, True)
    assert needle in e.value.message
    if spec == "99":
        assert "0-60" in e.value.message and "MTP layer 61" in e.value.message


def test_mtp_layer_refused_under_no_mtp():
    with pytest.raises(BadOptionError) as e:
        select_layers(parse_layers("61"), DIMS, False)
    assert "--no-mtp" in e.value.message


def test_matrices_parse_case_insensitively_in_canonical_order():
    supported = ("Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ", "QA", "KVA", "KVA_pe")
    assert parse_matrices("vo,O,qa", supported) == ["O", "VO", "QA"]
    assert parse_matrices(None, ("Q", "K", "V", "O", "VO", "QK", "KQ")) == ["Q", "K", "V", "O", "VO", "QK", "KQ"]
    with pytest.raises(BadOptionError, match="unknown matrix kind 'XY'"):
        parse_matrices("VO,XY", supported)
    with pytest.raises(BadOptionError, match="no QA"):
        parse_matrices("QA", ("Q", "K", "V", "O", "VO", "QK", "KQ"))


def test_spectrum_keys_follow_scopes():
    assert {str(k) for k in spectrum_keys(["VO", "KQ", "QA"])} == {"head.VO", "stacked.VO", "stacked.KQ", "layer.QA"}


def test_cache_key_changes_with_options_and_commit(tmp_path):
    a = SpectraCache(tmp_path, "models--o--m", "a" * 40, SpectraOptions())
    b = SpectraCache(tmp_path, "models--o--m", "a" * 40, SpectraOptions(fold_norms=False))
    c = SpectraCache(tmp_path, "models--o--m", "a" * 40, SpectraOptions(normalize_stacked=False))
    d = SpectraCache(tmp_path, "models--o--m", "b" * 40, SpectraOptions())
    assert len({a.dir, b.dir, c.dir, d.dir}) == 4
    assert repo_key("org/name") == "models--org--name"


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_PROBE_CACHE", str(tmp_path / "env"))
    assert default_cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert default_cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("SVD_PROBE_CACHE")
    assert "svd-probe" in str(default_cache_root(None))


def _write_fixture(root, model="deepseek-ai/DeepSeek-V3", commit="c" * 40, layers=(0, 1)):
    rng = np.random.default_rng(0)
    cache = SpectraCache(root, repo_key(model), commit, SpectraOptions())
    SpectraCache.write_ref(root, repo_key(model), "main", commit)
    cache.write_manifest({"model": "deepseek-v3", "commit": commit, "dims": {"d_model": 16}})
    written = {}
    for ly in layers:
        heads = np.sort(rng.random((4, 6)), axis=1)[:, ::-1]
        stacked = np.sort(rng.random(16), axis=0)[::-1]
        sig = {"head.VO": heads, "stacked.VO": stacked, "layer.QA": stacked[:8]}
        cache.write_layer(
            LayerSpectra(
                ly,
                sig,
                {"head.VO": (16, 6), "stacked.VO": (16, 24), "layer.QA": (8, 16)},
                {k: "F8_E4M3" for k in sig},
                {"seconds": 1.0},
            )
        )
        written[ly] = sig
    return cache, written


def test_layer_files_round_trip_and_leave_no_temporaries(tmp_path):
    cache, written = _write_fixture(tmp_path)
    assert cache.cached_layers() == [0, 1]
    back = cache.read_layer(1)
    np.testing.assert_array_equal(back.sigma["head.VO"], written[1]["head.VO"])
    assert back.shapes["stacked.VO"] == (16, 24) and back.storage_dtypes["head.VO"] == "F8_E4M3"
    assert not list(cache.dir.glob(".*tmp"))
    # A torn write (a temp file left by a killed process) is not mistaken for a layer.
    (cache.dir / ".layer-0002.safetensors.tmp").write_bytes(b"partial")
    assert cache.cached_layers() == [0, 1]


def test_export_jsonl_has_one_record_per_spectrum(tmp_path):
    _, written = _write_fixture(tmp_path)
    out = tmp_path / "s.jsonl"
    n = export(CacheQuery("deepseek-v3", cache_dir=tmp_path), format="jsonl", out=out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert n == len(lines) == 2 * (4 + 1 + 1)
    rec = next(r for r in lines if r["layer"] == 1 and r["matrix"] == "VO" and r["scope"] == "head" and r["head"] == 2)
    assert set(rec) == {"model", "revision", "layer", "matrix", "scope", "head", "sigma"}
    assert rec["model"] == "deepseek-v3" and rec["revision"] == "c" * 40
    np.testing.assert_allclose(rec["sigma"], written[1]["head.VO"][2])
    assert all(r["head"] is None for r in lines if r["scope"] != "head")
    assert {r["matrix"] for r in lines} == {"VO", "QA"}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_metrics_table(tmp_path, fmt):
    _, written = _write_fixture(tmp_path)
    out = tmp_path / f"m.{fmt}"
    n = export(CacheQuery("deepseek-v3", cache_dir=tmp_path), format=fmt, out=out, at_rank=3)
    df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    assert len(df) == n == 12
    row = df[(df.layer == 0) & (df.matrix == "VO") & (df.scope == "stacked")].iloc[0]
    s = written[0]["stacked.VO"]
    assert row["rank_1pct"] == energy_rank(s, 0.01) and row["rank_0.1pct"] == energy_rank(s, 0.001)
    assert row["full_rank"] == 16 and (row["m"], row["n"]) == (16, 24)
    assert np.isclose(row["rel_error_at_3"], np.sqrt((s[3:] ** 2).sum() / (s**2).sum()))


def test_export_refuses_unknown_format(tmp_path):
    _write_fixture(tmp_path)
    with pytest.raises(BadOptionError, match="xml"):
        export(CacheQuery("deepseek-v3", cache_dir=tmp_path), format="xml", out=tmp_path / "x")


def test_loading_a_missing_analysis_names_the_analyze_command(tmp_path):
    with pytest.raises(CacheMissError) as e:
        load_analysis(CacheQuery("kimi-k2", cache_dir=tmp_path))
    assert "svd-probe analyze kimi-k2" in e.value.hint
    _write_fixture(tmp_path)
    with pytest.raises(CacheMissError) as e:
        load_analysis(CacheQuery("deepseek-v3", cache_dir=tmp_path, options=SpectraOptions(fold_norms=False)))
    assert "--no-fold-norms" in e.value.hint


def test_hints_repeat_an_explicit_cache_dir(tmp_path):
    _write_fixture(tmp_path)
    with pytest.raises(CacheMissError) as e:
        load_analysis(CacheQuery("deepseek-v3", cache_dir=tmp_path, options=SpectraOptions(fold_norms=False)))
    assert e.value.hint.endswith(f"--no-fold-norms --cache-dir {tmp_path}")
    a = load_analysis(CacheQuery("deepseek-v3", cache_dir=tmp_path))
    with pytest.raises(CacheMissError) as e:
        a.sigma(0, "KQ")
    assert e.value.hint == f"Run: svd-probe analyze deepseek-v3 --layers 0 --matrices KQ --cache-dir {tmp_path}"


def test_export_takes_any_energy_errors(tmp_path):
    _, written = _write_fixture(tmp_path)
    out = tmp_path / "m.csv"
    export(CacheQuery("deepseek-v3", cache_dir=tmp_path), format="csv", out=out, errors=(0.05, 0.2))
    df = pd.read_csv(out)
    assert "rank_5pct" in df and "rank_20pct" in df and "rank_1pct" not in df
    row = df[(df.layer == 1) & (df.scope == "stacked")].iloc[0]
    assert row["rank_20pct"] == energy_rank(written[1]["stacked.VO"], 0.2)


@pytest.mark.parametrize("spec", ["", "1.5", "a,0.1", "0"])
def test_bad_errors_are_refused(spec):
    from svd_probe.options import parse_errors

    with pytest.raises(BadOptionError):
        parse_errors(spec)


# --- the vocabulary: kinds, scopes and `scope.kind` keys -------------------------------------------


def test_spectrum_keys_parse_format_and_order():
    from svd_probe.kinds import ALL_KINDS, SpectrumKey, sort_keys

    k = SpectrumKey.parse("stacked.VO")
    assert (k.scope, k.kind, str(k)) == ("stacked", "VO", "stacked.VO")
    assert SpectrumKey("stacked", "VO") == k and hash(SpectrumKey("stacked", "VO")) == hash(k)
    keys = [SpectrumKey.parse(s) for s in ("layer.QA", "stacked.O", "head.VO", "head.Q", "stacked.KQ")]
    assert [str(x) for x in sorted(keys)] == ["head.Q", "head.VO", "stacked.O", "stacked.KQ", "layer.QA"]
    # Every kind exists in at least one scope; the string form round-trips for all of them.
    every = spectrum_keys(ALL_KINDS)
    assert {x.kind for x in every} == set(ALL_KINDS) and len(every) == 7 + 8 + 5
    assert all(SpectrumKey.parse(str(x)) == x for x in every)
    assert sort_keys(["stacked.O", "head.XY", "head.O", "junk"]) == ["head.O", "stacked.O", "head.XY", "junk"]


@pytest.mark.parametrize("text", ["head.KQ", "layer.VO", "stacked.QA", "foo.O", "VO", "head.", ".VO", "head.vo"])
def test_keys_that_name_no_spectrum_are_refused(text):
    from svd_probe.kinds import SpectrumKey, parse_key

    with pytest.raises(ValueError):
        SpectrumKey.parse(text)
    assert parse_key(text) is None


def test_asking_an_analysis_for_a_spectrum_no_scope_has_is_a_bad_option(tmp_path):
    _write_fixture(tmp_path)
    a = load_analysis(CacheQuery("deepseek-v3", cache_dir=tmp_path))
    with pytest.raises(BadOptionError, match="KQ exists in scope stacked"):
        a.sigma(0, "KQ", scope="head")


# --- option parsers ----------------------------------------------------------------------------------


def test_layer_lists_keep_their_order_and_are_bounded():
    from svd_probe.options import MAX_LAYER

    assert parse_layers("5,0-2,1") == [5, 0, 1, 2]
    assert parse_layers([3, 1, 3]) == [3, 1]
    assert parse_layers("all") is None and parse_layers(None) is None
    assert parse_layers("0-3,") == [0, 1, 2, 3]
    for bad in (f"0-{MAX_LAYER + 1}", ",", "", [-1], [True], ["3"]):  # "": no layer in it
        with pytest.raises(BadOptionError):
            parse_layers(bad)
    with pytest.raises(BadOptionError, match="--spectra-layers"):
        parse_layers("x", flag="--spectra-layers")


def test_matrices_in_one_scope():
    assert parse_matrices(None, scope="layer") == ["QA", "KVA", "KVA_pe", "Qjoint", "KVjoint"]
    assert parse_matrices("kq,O", scope="stacked", keep_order=True) == ["KQ", "O"]
    with pytest.raises(BadOptionError, match="QA has no stacked spectra"):
        parse_matrices("QA", scope="stacked")
    with pytest.raises(BadOptionError, match="unknown matrix kind 'XY'"):
        parse_matrices(["O", "XY"], scope="stacked")


def test_cache_query_drives_export_and_loading(tmp_path):
    _write_fixture(tmp_path, commit="d" * 40)
    q = CacheQuery("deepseek-v3", revision="d" * 40, cache_dir=tmp_path)
    assert load_analysis(q).commit == "d" * 40  # a commit needs no ref
    assert export(q, format="jsonl", out=tmp_path / "a.jsonl") == 12
    with pytest.raises(CacheMissError, match="revision v9"):
        load_analysis(CacheQuery("deepseek-v3", revision="v9", cache_dir=tmp_path))


def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path):
    import os

    from svd_probe.atomic import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
