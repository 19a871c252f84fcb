"""`analyze` without the Hub, and what it asks the Hub for before refusing a request.

Offline means huggingface_hub's own switch, HF_HUB_OFFLINE=1: in a subprocess through the
environment as a user sets it, in-process through the constant huggingface_hub reads it into at
import. The Hub stand-in records every request, so "nothing fetched" is counted, not assumed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.cli import app
from svd_probe.errors import OfflineCacheMissError

runner = CliRunner()
# A repo of its own, so requests still in flight from other tests' runs are not counted here.
REPO = "offline/deepseek-v3"


@pytest.fixture(scope="module", autouse=True)
def _serve_repo(fake_hub, deepseek_ckpt):
    fake_hub.add_repo(REPO, deepseek_ckpt.folder)


def mine(fake_hub) -> list:
    """The stand-in's records of requests for this module's repo."""
    return [rec for rec in fake_hub.records if rec.repo_id == REPO]


def analyze_args(fake_hub, cache, *extra):
    return [
        "analyze",
        REPO,
        "--endpoint",
        fake_hub.endpoint,
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        "--matrices",
        "O,VO",
        *extra,
    ]


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


@pytest.mark.slow
def test_offline_analyze_summarizes_what_is_cached(fake_hub, tmp_path, monkeypatch):
    fake_hub.clear_faults()
    first = runner.invoke(app, analyze_args(fake_hub, tmp_path, "--layers", "0-1", "--json"))
    assert first.exit_code == 0, first.output
    commit = json.loads(first.stdout)["commit"]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.reset_records()
    r = runner.invoke(app, analyze_args(fake_hub, tmp_path, "--layers", "0-1", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["commit"] == commit and [row["layer"] for row in summary["layers"]] == [0, 1]
    assert summary["stats"]["computed"] == 0 and summary["stats"]["bytes_fetched"] == 0
    assert any("offline mode" in n and commit[:12] in n for n in summary["notes"])
    assert "offline mode" in r.stderr
    assert mine(fake_hub) == []
    # The rows equal those of the online run.
    assert summary["layers"] == json.loads(first.stdout)["layers"]


@pytest.mark.slow
def test_offline_analyze_lists_the_layers_it_cannot_compute(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    fake_hub.clear_faults()
    analyze(AnalyzeJob(REPO, endpoint=fake_hub.endpoint, cache_dir=tmp_path, device="cpu", layers="0"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.reset_records()
    with pytest.raises(OfflineCacheMissError) as e:
        analyze(AnalyzeJob(REPO, endpoint=fake_hub.endpoint, cache_dir=tmp_path, device="cpu"))
    assert "cannot compute layers 1,2,3" in e.value.message and e.value.exit_code == 3
    assert "--layers" in e.value.hint and "Layers 0 are cached" in e.value.hint
    assert mine(fake_hub) == []


def test_offline_with_nothing_cached_reports_the_network_error(fake_hub, tmp_path, offline, capsys, monkeypatch):
    from svd_probe.cli import main

    monkeypatch.setattr(sys, "argv", ["svd-probe", *analyze_args(fake_hub, tmp_path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 3 and "offline" in err.lower() and "Traceback" not in err


@pytest.mark.slow
def test_hf_hub_offline_in_the_environment(fake_hub, tmp_path):
    """As a user runs it: HF_HUB_OFFLINE=1 in the environment of a fresh process."""
    fake_hub.clear_faults()
    assert runner.invoke(app, analyze_args(fake_hub, tmp_path, "--layers", "1")).exit_code == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "svd_probe.cli", *analyze_args(fake_hub, tmp_path)]
    fake_hub.reset_records()
    partial = subprocess.run([*cmd, "--layers", "1", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert partial.returncode == 0, partial.stderr
    assert json.loads(partial.stdout)["stats"]["computed"] == 0 and "offline mode" in partial.stderr
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "cannot compute layers 0,2,3" in " ".join(missing.stderr.split())
    assert "Traceback" not in missing.stderr + partial.stderr
    assert mine(fake_hub) == []


@pytest.mark.slow
def test_an_unreachable_hub_falls_back_to_the_cache(fake_hub, tmp_path):
    fake_hub.clear_faults()
    assert runner.invoke(app, analyze_args(fake_hub, tmp_path, "--layers", "2")).exit_code == 0
    dead = closed_port_endpoint()
    out = analyze(AnalyzeJob(REPO, endpoint=dead, cache_dir=tmp_path, device="cpu", layers="2", matrices="O,VO"))
    assert out.computed == [] and out.analysis.layers == [2]
    assert any("unreachable" in n for n in out.notes)


@pytest.mark.slow
def test_export_and_plot_never_touch_the_network(fake_hub, tmp_path):
    fake_hub.clear_faults()
    assert runner.invoke(app, analyze_args(fake_hub, tmp_path, "--layers", "0")).exit_code == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT=closed_port_endpoint())
    base = [sys.executable, "-m", "svd_probe.cli"]
    cache = ["--cache-dir", str(tmp_path)]
    fake_hub.reset_records()
    exp = subprocess.run(
        [*base, "export", REPO, *cache, "--out", str(tmp_path / "s.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exp.returncode == 0, exp.stderr
    plot = subprocess.run(
        [*base, "plot", REPO, *cache, "--out", str(tmp_path / "p"), "--kind", "layerwise"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "p" / "layerwise.png").is_file() and mine(fake_hub) == []


# --- refused before any request ------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--layers", "0-2,x"], "not a layer"),
        (["--layers", "3-1"], "end before start"),
        (["--layers", "0-99999999999"], "beyond any model"),
        (["--matrices", "VO,VQ"], "unknown matrix kind 'VQ'"),
    ],
)
def test_malformed_options_are_refused_before_any_request(fake_hub, tmp_path, extra, needle):
    fake_hub.clear_faults()
    fake_hub.reset_records()
    r = runner.invoke(app, analyze_args(fake_hub, tmp_path, *extra))
    assert r.exit_code != 0 and needle in str(r.exception)
    assert mine(fake_hub) == []


@pytest.mark.parametrize(
    "extra,needle", [(["--layers", "7"], "no layer 7"), (["--matrices", "QA", "--layers", "9"], "no layer 9")]
)
def test_a_layer_the_model_lacks_is_refused_after_config_json(fake_hub, tmp_path, extra, needle):
    fake_hub.clear_faults()
    fake_hub.reset_records()
    r = runner.invoke(app, [*analyze_args(fake_hub, tmp_path), *extra])
    assert r.exit_code != 0 and needle in str(r.exception)
    assert {rec.file for rec in mine(fake_hub)} <= {"config.json"}
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_kind_the_model_lacks_is_refused_before_the_index_of_a_local_folder(tmp_path):
    from svd_probe.errors import BadOptionError
    from svd_probe.testing.layouts import write_layout

    folder = write_layout(tmp_path / "llama", "llama")
    (folder / "model.safetensors.index.json").write_text("not json")  # reading it would fail
    with pytest.raises(BadOptionError, match="no QA matrices"):
        analyze(AnalyzeJob(str(folder), cache_dir=tmp_path / "c", matrices="QA"))
    with pytest.raises(BadOptionError, match="no layer 5"):
        analyze(AnalyzeJob(str(folder), cache_dir=tmp_path / "c", layers="5"))
