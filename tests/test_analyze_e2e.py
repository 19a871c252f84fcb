"""`svd-probe analyze` end to end, over the loopback Hub stand-in, against float64 numpy.

The reference is built independently of the package: tensors are read with the `safetensors`
library from the generated files, FP8 is dequantized here per 128×128 block, every matrix of
docs/reference.md §3 is materialized explicitly (VO_h = O_h·V_h, QK_h = Q_hᵀ·K_h, stacks of heads
divided by their own σ₁) and its σ taken with `np.linalg.svd` in float64.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cache.store import SpectraOptions
from svd_probe.cli import app
from svd_probe.errors import TransferError
from svd_probe.results import CacheQuery, load_analysis
from svd_probe.spectra.metrics import numerical_rank

runner = CliRunner()
# The same end-to-end checks run on a GPU machine with SVD_PROBE_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SVD_PROBE_TEST_DEVICE", "cpu")


# --- the independent reference -------------------------------------------------------------------


def read_dequantized(folder, names):
    """float64 arrays of `names`, FP8 weights multiplied by their per-block scale here."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    def raw(name):
        with safe_open(folder / index[name], framework="pt") as f:
            return f.get_tensor(name).to(torch.float64).numpy()

    out = {}
    for name in names:
        w = raw(name)
        if name + "_scale_inv" in index:
            s = raw(name + "_scale_inv")
            full = np.kron(s, np.ones((128, 128)))[: w.shape[0], : w.shape[1]]
            w = w * full
        out[name] = w
    return out


def sv(a):
    return np.linalg.svd(a, compute_uv=False)


def reference_layer(folder, config, layer, fold=True, normalize=True):
    n = config["num_attention_heads"]
    dn, dr, dv = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kvl = config["kv_lora_rank"]
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    names = [p + "input_layernorm.weight"] + [
        a + s
        for s in (
            "q_a_proj.weight",
            "q_a_layernorm.weight",
            "q_b_proj.weight",
            "kv_a_proj_with_mqa.weight",
            "kv_a_layernorm.weight",
            "kv_b_proj.weight",
            "o_proj.weight",
        )
    ]
    t = read_dequantized(folder, names)
    ones = lambda k: np.ones(k)  # noqa: E731
    g_in = t[p + "input_layernorm.weight"] if fold else ones(config["hidden_size"])
    g_q = t[a + "q_a_layernorm.weight"] if fold else ones(config["q_lora_rank"])
    g_kv = t[a + "kv_a_layernorm.weight"] if fold else ones(kvl)
    qb = t[a + "q_b_proj.weight"] * g_q
    kvb = t[a + "kv_b_proj.weight"] * g_kv
    o = t[a + "o_proj.weight"]
    Q = [qb[h * (dn + dr) : h * (dn + dr) + dn] for h in range(n)]
    QP = [qb[h * (dn + dr) + dn : (h + 1) * (dn + dr)] for h in range(n)]
    K = [kvb[h * (dn + dv) : h * (dn + dv) + dn] for h in range(n)]
    V = [kvb[h * (dn + dv) + dn : (h + 1) * (dn + dv)] for h in range(n)]
    O = [o[:, h * dv : (h + 1) * dv] for h in range(n)]  # noqa: E741 - the output projection O
    VO = [O[h] @ V[h] for h in range(n)]
    QK = [Q[h].T @ K[h] for h in range(n)]
    heads = {"Q": Q, "Q_pe": QP, "K": K, "V": V, "O": O, "VO": VO, "QK": QK}
    ref = {f"head.{k}": np.stack([sv(m) for m in ms]) for k, ms in heads.items()}

    def unit(ms):
        return [m / sv(m)[0] for m in ms] if normalize else ms

    ref["stacked.O"] = sv(np.hstack(unit(O)))
    ref["stacked.VO"] = sv(np.hstack(unit(VO)))
    for k in ("Q", "Q_pe", "K", "V"):
        ref[f"stacked.{k}"] = sv(np.vstack(unit(heads[k])))
    ref["stacked.QK"] = sv(np.vstack(unit(QK)))  # heads share the key side
    ref["stacked.KQ"] = sv(np.hstack(unit(QK)))  # heads share the query side
    kva = t[a + "kv_a_proj_with_mqa.weight"] * g_in
    ref["layer.QA"] = sv(t[a + "q_a_proj.weight"] * g_in)
    ref["layer.KVA"] = sv(kva[:kvl])
    ref["layer.KVA_pe"] = sv(kva[kvl:])
    ref["layer.Qjoint"] = sv(np.vstack(Q) @ (t[a + "q_a_proj.weight"] * g_in))
    ref["layer.KVjoint"] = sv(np.vstack(K + V) @ kva[:kvl])
    return ref


def assert_spectra_match(analysis, folder, config, layers, **kw):
    for layer in layers:
        ref = reference_layer(folder, config, layer, **kw)
        got = analysis.layer_spectra[layer].sigma
        assert set(got) == set(ref), f"layer {layer}: kinds {sorted(set(ref) ^ set(got))} differ"
        for key, r in ref.items():
            g = got[key]
            assert g.shape == r.shape, (layer, key, g.shape, r.shape)
            scale = r.max()
            err = np.abs(g - r).max() / scale
            assert err < 1e-4, f"layer {layer} {key}: max error {err:.2e} of σ₁"


def run_cli(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_kind_over_the_hub_matches_float64(fake_hub, deepseek_ckpt, tmp_path):
    fake_hub.clear_faults()
    fake_hub.reset_records()
    r = run_cli(
        "analyze",
        "tiny/deepseek-v3",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--json",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["commit"] == fake_hub.repos["tiny/deepseek-v3"].commit
    assert [row["layer"] for row in summary["layers"]] == [0, 1, 2, 3]  # 3 decoder layers + MTP
    shard_requests = [
        rec for rec in fake_hub.records if rec.file and rec.file.endswith(".safetensors") and rec.method == "GET"
    ]
    assert shard_requests and all(rec.range for rec in shard_requests)

    a = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert a.layers == [0, 1, 2, 3]
    assert_spectra_match(a, deepseek_ckpt.folder, deepseek_ckpt.config, a.layers)
    # Every spectrum records the dtype its weights are stored in (norms, stored BF16, don't count).
    assert set(a.layer_spectra[0].storage_dtypes.values()) == {"F8_E4M3"}


@pytest.mark.slow
def test_options_change_the_numbers_and_the_cache_key(fake_hub, deepseek_ckpt, tmp_path):
    fake_hub.clear_faults()
    args = [
        "analyze",
        "tiny/deepseek-v3",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--layers",
        "1",
        "--json",
    ]
    assert run_cli(*args).exit_code == 0
    r = run_cli(*args, "--no-fold-norms", "--no-normalize-stacked")
    assert r.exit_code == 0, r.output
    plain = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    raw = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path, options=SpectraOptions(False, False)))
    assert plain.cache_dir != raw.cache_dir
    assert_spectra_match(raw, deepseek_ckpt.folder, deepseek_ckpt.config, [1], fold=False, normalize=False)
    assert not np.allclose(plain.sigma(1, "VO"), raw.sigma(1, "VO"))


@pytest.mark.slow
def test_a_rerun_fetches_nothing_and_force_refetches(fake_hub, tmp_path):
    fake_hub.clear_faults()
    args = [
        "analyze",
        "tiny/kimi-k2",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--json",
    ]
    assert run_cli(*args).exit_code == 0
    fake_hub.reset_records()
    r = run_cli(*args)
    assert r.exit_code == 0
    assert json.loads(r.stdout)["stats"]["from_cache"] == 3
    assert fake_hub.bytes_served(".safetensors") == 0
    fake_hub.reset_records()
    r = run_cli(*args, "--force", "--layers", "0")
    assert json.loads(r.stdout)["stats"]["computed"] == 1
    assert fake_hub.bytes_served(".safetensors") > 0


@pytest.mark.slow
def test_more_matrices_later_compute_only_whats_missing(fake_hub, tmp_path):
    fake_hub.clear_faults()
    base = [
        "analyze",
        "tiny/deepseek-v3",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--layers",
        "0",
        "--json",
    ]
    fake_hub.reset_records()
    assert run_cli(*base, "--matrices", "O").exit_code == 0
    only_o = fake_hub.bytes_served()
    a = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert set(a.layer_spectra[0].sigma) == {"head.O", "stacked.O"}
    assert run_cli(*base, "--matrices", "VO").exit_code == 0
    a = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert set(a.layer_spectra[0].sigma) == {"head.O", "stacked.O", "head.VO", "stacked.VO"}
    fake_hub.reset_records()
    assert run_cli(*base, "--matrices", "O,VO").exit_code == 0
    assert fake_hub.bytes_served() == 0
    assert only_o > 0


@pytest.mark.slow
def test_a_revision_with_another_commit_gets_its_own_cache(fake_hub, deepseek_ckpt, tmp_path):
    other = "f" * 40
    fake_hub.add_repo("tiny/deepseek-revs", deepseek_ckpt.folder, revisions={"v2": other})
    base = [
        "analyze",
        "tiny/deepseek-revs",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--layers",
        "0",
        "--matrices",
        "O",
        "--json",
    ]
    main = json.loads(run_cli(*base).stdout)
    v2 = json.loads(run_cli(*base, "--revision", "v2").stdout)
    assert v2["commit"] == other and main["commit"] != other
    assert main["cache"] != v2["cache"]
    assert load_analysis(CacheQuery("tiny/deepseek-revs", "v2", tmp_path)).commit == other


@pytest.mark.slow
def test_planted_ranks_come_out_of_the_whole_path(fake_hub, tmp_path_factory, tmp_path):
    from svd_probe.testing.checkpoints import build_deepseek_v3

    ck = build_deepseek_v3(
        tmp_path_factory.mktemp("planted") / "ck",
        attn_dtype="f32",
        ranks={"o_proj": 6, "kv_b_proj": 5, "q_b_proj": 7},
        layers=1,
        mtp_layers=0,
        seed=3,
    )
    fake_hub.add_repo("tiny/planted", ck.folder)
    r = run_cli(
        "analyze",
        "tiny/planted",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--json",
    )
    assert r.exit_code == 0, r.output
    a = load_analysis(CacheQuery("tiny/planted", cache_dir=tmp_path))

    def ranks(key):
        return [
            numerical_rank(s, a.shape(0, key.split(".")[1], key.split(".")[0]), 2.0**-23)
            for s in np.atleast_2d(a.layer_spectra[0].sigma[key])
        ]

    assert ranks("head.VO") == [5] * 4  # VO_h = O_h·V_h, and V_h has rank ≤ 5
    assert ranks("head.QK") == [5] * 4  # Q_hᵀ·K_h, K_h from the same rank-5 kv_b
    assert ranks("stacked.O") == [6]  # all heads write into o_proj's 6-dim column space
    assert ranks("stacked.VO") == [6]
    assert ranks("stacked.K") == [5]
    assert ranks("stacked.Q") == [7]
    assert set(a.layer_spectra[0].storage_dtypes.values()) == {"F32"}
    assert_spectra_match(a, ck.folder, ck.config, [0])


def header_spans(folder, shard):
    """{tensor: byte count} and the header size of one shard, read straight from the file."""
    with open(folder / shard, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}, 8 + n


@pytest.mark.slow
def test_crash_mid_layer_resumes_without_refetching_finished_layers(fake_hub, deepseek_ckpt, tmp_path):
    """A layer whose reads keep failing aborts the run with a TransferError; the layers before it
    stay cached, and the rerun fetches only the missing layer and ends with the same spectra."""
    fake_hub.clear_faults()
    folder, wmap = deepseek_ckpt.folder, deepseek_ckpt.weight_map
    layer3 = deepseek_ckpt.attention_tensor_names(3)
    shards3 = {wmap[n] for n in layer3}
    # The MTP layer (3) is the only attention in shard 4: make every read of that shard fail.
    shard4 = next(f for f in shards3 if f.startswith("model-00004"))
    assert not {wmap[n] for ly in range(3) for n in deepseek_ckpt.attention_tensor_names(ly)} & {shard4}
    fake_hub.inject("503", count=10_000, match=shard4, retry_after="0")
    request = AnalyzeJob(
        "tiny/deepseek-v3",
        endpoint=fake_hub.endpoint,
        cache_dir=tmp_path,
        device=DEVICE,
        read_options={"retries": 2, "backoff": 0.01},
    )
    with pytest.raises(TransferError):
        analyze(request)
    fake_hub.clear_faults()
    assert load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path)).layers == [0, 1, 2]

    fake_hub.reset_records()
    run = analyze(request)
    assert (len(run.computed), len(run.from_cache)) == (1, 3)
    spans = {}
    headers = 0
    for shard in shards3:
        sizes, hdr = header_spans(folder, shard)
        spans.update(sizes)
        headers += hdr
    needed = sum(spans[n] for n in layer3)
    served = fake_hub.bytes_served()
    assert needed <= served <= 1.05 * (needed + headers)
    full = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert full.layers == [0, 1, 2, 3]
    assert_spectra_match(full, folder, deepseek_ckpt.config, [0, 3])


@pytest.mark.slow
def test_killed_process_resumes_from_its_cache(fake_hub, deepseek_ckpt, tmp_path):
    """SIGKILL `svd-probe analyze` while it is reading a layer; the rerun resumes from the cache."""
    import signal
    import subprocess
    import sys
    import time

    fake_hub.clear_faults()
    fake_hub.stalled.clear()
    shard4 = next(f for f in set(deepseek_ckpt.weight_map.values()) if f.startswith("model-00004"))  # layer 3 only
    fake_hub.inject("stall", count=1, match=shard4, retry_after="30")
    cmd = [
        sys.executable,
        "-m",
        "svd_probe.cli",
        "analyze",
        "tiny/deepseek-v3",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not fake_hub.stalled and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert fake_hub.stalled, "the run never reached layer 3's reads"
        # Layers computed while layer 3's reads were held must be complete files, nothing partial.
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    fake_hub.clear_faults()
    cached = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path)).layers
    assert cached and 3 not in cached

    fake_hub.reset_records()
    r = run_cli(
        "analyze",
        "tiny/deepseek-v3",
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(tmp_path),
        "--device",
        DEVICE,
        "--json",
    )
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)["stats"]
    assert stats["from_cache"] == len(cached) and stats["computed"] == 4 - len(cached)
    full = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert full.layers == [0, 1, 2, 3]
    assert_spectra_match(full, deepseek_ckpt.folder, deepseek_ckpt.config, [3])


@pytest.mark.slow
def test_live_progress_shows_layers_bytes_and_eta(fake_hub, tmp_path, monkeypatch):
    """In a terminal (forced here) analyze draws a bar: layer k/N, MB fetched, MB/s and an ETA."""
    fake_hub.clear_faults()
    monkeypatch.setenv("SVD_PROBE_PROGRESS", "1")
    r = runner.invoke(
        app,
        ["analyze", "tiny/kimi-k2", "--endpoint", fake_hub.endpoint, "--cache-dir", str(tmp_path), "--device", DEVICE],
    )
    assert r.exit_code == 0, r.output
    out = r.output
    assert "layer 3/3" in out and "MB/s" in out and "ETA" in out
    assert re.search(r"\d[\d,]*\.\d MB ", out)


def _corrupt_copy(src_folder, dst):
    """A copy of the checkpoint whose first attention shard claims a header longer than the file."""
    import shutil

    shutil.copytree(src_folder, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["gated", "corrupt", "bad-layers", "bad-matrices", "bad-device", "unknown-model", "bad-flag"]
)
def test_bad_input_exits_non_zero_with_a_message_and_no_traceback(
    case, fake_hub, deepseek_ckpt, tmp_path, monkeypatch, capsys
):
    """What a user sees, through the real entry point: exit code 2, the problem, the fix."""
    import sys

    from svd_probe.cli import main

    fake_hub.clear_faults()
    ep = ["--endpoint", fake_hub.endpoint, "--cache-dir", str(tmp_path / "cache")]
    args, needles = {
        "gated": (["gated/deepseek-v3", *ep], ["gated/deepseek-v3", "--token"]),
        "corrupt": ([str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache")], ["corrupt shard", "header"]),
        "bad-layers": (
            ["tiny/deepseek-v3", *ep, "--layers", "2-9"],
            ["no layer 4, 5, 6, 7, 8, 9", "layers 0-2 and MTP layer 3"],
        ),
        "bad-matrices": (
            ["tiny/deepseek-v3", *ep, "--matrices", "VO,VQ"],
            ["unknown matrix kind 'VQ'", "Q,Q_pe,K,V,O,VO"],
        ),
        "bad-device": (["tiny/deepseek-v3", *ep, "--device", "tpu"], ["bad --device 'tpu'", "auto, cpu or cuda"]),
        "unknown-model": (["not-a-model", *ep], ["unknown model 'not-a-model'", "svd-probe models"]),
        "bad-flag": (["tiny/deepseek-v3", "--layer", "3"], ["No such option: --layer"]),
    }[case]
    if case == "corrupt":
        shard = _corrupt_copy(deepseek_ckpt.folder, tmp_path / "ck")
        needles = [*needles, shard]
    monkeypatch.setattr(sys, "argv", ["svd-probe", "analyze", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    # Nothing half-written is left as a layer file.
    assert not list((tmp_path / "cache").rglob("layer-*.safetensors"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reader process needs memfds (Linux)")
def test_analyze_with_the_reader_process_matches_float64(fake_hub, deepseek_ckpt, tmp_path):
    """`--reader process`: the HTTP client in a child process, the same spectra; the summary says
    which reader ran, and on the CPU `auto` (the default) is threads."""
    fake_hub.clear_faults()
    args = ["analyze", "tiny/deepseek-v3", "--endpoint", fake_hub.endpoint, "--cache-dir", str(tmp_path)]
    args += ["--device", DEVICE, "--layers", "0-1", "--json"]
    r = run_cli(*args, "--reader", "process")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)["stats"]
    assert stats["computed"] == 2 and stats["bytes_fetched"] > 0 and stats["requests_in_flight"] == 2
    assert stats["reader"] == "process"
    a = load_analysis(CacheQuery("tiny/deepseek-v3", cache_dir=tmp_path))
    assert a.layers == [0, 1]
    assert_spectra_match(a, deepseek_ckpt.folder, deepseek_ckpt.config, a.layers)
    r = run_cli(*args, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["reader"] == ("process" if DEVICE == "cuda" else "thread")
    r = run_cli(*args, "--reader", "fork")
    assert r.exit_code == 2 and "fork" in r.output
    # analyze ends what it started: no reader process is left, and no shard of a folder stays open.
    assert not _reader_children()
    folder = str(deepseek_ckpt.folder.resolve())

    def shard_fds() -> set[str]:  # this process's descriptors open on a file of the folder
        return {f for f in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{f}").startswith(folder)}

    before = shard_fds()  # other tests of this session may hold some: only this call's count
    r = run_cli("analyze", str(deepseek_ckpt.folder), "--cache-dir", str(tmp_path / "local"), "--layers", "0")
    assert r.exit_code == 0, r.output
    assert not shard_fds() - before


def _reader_children() -> list[int]:
    """This process's children running the reader process (Linux /proc)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"reader_process" in cmd:
            out.append(int(pid))
    return out
