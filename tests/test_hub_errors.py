"""Bad inputs against the Hub stand-in: each gets its typed error, a message and a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import GATED_TOKEN

from svd_probe.errors import (
    CorruptShardError,
    EntryNotFoundError,
    GatedRepoError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnknownModelError,
)
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.models import ModelRef, resolve_model


def _open(hub, repo, **kw):
    return open_checkpoint(ModelRef(name=repo, repo_id=repo), endpoint=hub.endpoint, backoff=0.01, **kw)


def test_unknown_repo(fake_hub):
    with pytest.raises(RepoNotFoundError) as ei:
        _open(fake_hub, "nobody/nothing")
    assert "nobody/nothing" in ei.value.message and "--token" in ei.value.hint


def test_unknown_revision(fake_hub):
    with pytest.raises(RevisionNotFoundError) as ei:
        _open(fake_hub, "tiny/deepseek-v3", revision="no-such-branch")
    assert "no-such-branch" in ei.value.message and "--revision" in ei.value.hint


def test_named_revision_pins_commit(fake_hub):
    src = _open(fake_hub, "tiny/deepseek-v3", revision="v1")
    assert src.commit == fake_hub.repos["tiny/deepseek-v3"].commit
    by_commit = _open(fake_hub, "tiny/deepseek-v3", revision=src.commit)
    assert by_commit.commit == src.commit


def test_gated_needs_token(fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(GatedRepoError) as ei:
        _open(fake_hub, "gated/deepseek-v3")
    assert "--token" in ei.value.hint and "HF_TOKEN" in ei.value.hint
    with pytest.raises(GatedRepoError):
        _open(fake_hub, "gated/deepseek-v3", token="hf_wrong")
    src = _open(fake_hub, "gated/deepseek-v3", token=GATED_TOKEN)
    name = "model.layers.0.self_attn.o_proj.weight"
    fake_hub.reset_records()
    assert src.read_tensors([name])[name].shape == (320, 128)
    # The token goes to the Hub, never to the CDN host the shard reads are redirected to.
    hub_reads = [r for r in fake_hub.records if not r.cdn]
    cdn_reads = [r for r in fake_hub.records if r.cdn]
    assert hub_reads and cdn_reads
    assert all(r.authorization for r in hub_reads) and not any(r.authorization for r in cdn_reads)


def test_missing_index_and_lone_file(fake_hub, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fake_hub.add_repo("tiny/no-weights", tmp_path / "empty")
    with pytest.raises(EntryNotFoundError) as ei:
        _open(fake_hub, "tiny/no-weights")
    assert "model.safetensors" in ei.value.message
    (tmp_path / "noconf").mkdir()
    fake_hub.add_repo("tiny/no-config", tmp_path / "noconf")
    with pytest.raises(EntryNotFoundError) as ei:
        _open(fake_hub, "tiny/no-config")
    assert "config.json" in ei.value.message


def test_lone_safetensors_repo(fake_hub, tmp_path):
    from svd_probe.testing.checkpoints import write_checkpoint

    t = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 16).to(torch.bfloat16)}
    write_checkpoint(tmp_path / "lone", t, {"model_type": "llama"}, 1)
    fake_hub.add_repo("tiny/lone", tmp_path / "lone")
    src = _open(fake_hub, "tiny/lone")
    (name,) = t
    assert src.tensor_names == {name}
    assert torch.equal(src.read_tensors([name])[name], t[name].float())


def test_corrupt_shard_over_http(fake_hub, tmp_path, deepseek_ckpt):
    import shutil
    import struct

    folder = tmp_path / "bad"
    shutil.copytree(deepseek_ckpt.folder, folder)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    shard = folder / deepseek_ckpt.weight_map[name]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)  # absurd header length
    shard.write_bytes(bytes(data))
    fake_hub.add_repo("tiny/corrupt", folder)
    src = _open(fake_hub, "tiny/corrupt")
    with pytest.raises(CorruptShardError) as ei:
        src.read_tensors([name])
    assert shard.name in str(ei.value)


def test_unknown_tensor_name(deepseek_ckpt):
    src = open_checkpoint(resolve_model(str(deepseek_ckpt.folder)))
    with pytest.raises(EntryNotFoundError):
        src.read_tensors(["model.layers.0.self_attn.nope.weight"])


def test_resolve_model_errors(tmp_path):
    with pytest.raises(UnknownModelError) as ei:
        resolve_model("definitely-not-a-model")
    assert "svd-probe models" in ei.value.hint
    with pytest.raises(UnknownModelError):
        resolve_model(str(tmp_path / "missing-folder"))
    assert resolve_model("deepseek-v3").repo_id == "deepseek-ai/DeepSeek-V3"


@pytest.mark.slow
def test_hf_endpoint_and_hf_token_from_environment(fake_hub, tmp_path):
    # HF_ENDPOINT is read when huggingface_hub is imported: only a fresh process shows it honoured.
    code = (
        "from svd_probe.hub.checkpoint import open_checkpoint\n"
        "from svd_probe.models import resolve_model\n"
        "src = open_checkpoint(resolve_model('gated/deepseek-v3'))\n"
        "t = src.read_tensors(['model.layers.0.self_attn.kv_b_proj.weight'])\n"
        "print(src.commit, tuple(t['model.layers.0.self_attn.kv_b_proj.weight'].shape))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "HF_TOKEN": GATED_TOKEN, "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert fake_hub.repos["gated/deepseek-v3"].commit in out.stdout and "(256, 136)" in out.stdout
    assert (tmp_path / "hf" / "hub").is_dir()  # config/index cached under HF_HOME


def test_truncated_shard_over_http(fake_hub, tmp_path, deepseek_ckpt):
    import shutil

    folder = tmp_path / "trunc"
    shutil.copytree(deepseek_ckpt.folder, folder)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    shard = folder / deepseek_ckpt.weight_map[name]
    shard.write_bytes(shard.read_bytes()[:5])  # not even the 8-byte header length survives
    fake_hub.add_repo("tiny/truncated", folder)
    with pytest.raises(CorruptShardError) as ei:
        _open(fake_hub, "tiny/truncated").read_tensors([name])
    assert shard.name in str(ei.value)


def test_an_escaped_httpx2_transport_error_is_a_network_error():
    """huggingface_hub 2.x's client raises httpx2's errors: one that escaped every layer below
    still ends as the network message (exit 3), not a traceback. (The check used to import
    httpx, which huggingface_hub 2.x does not install, and so said no to everything.)"""
    import httpx2

    from svd_probe.cli import _is_network_error

    assert _is_network_error(httpx2.ConnectError("connection refused"))
    assert _is_network_error(httpx2.ReadTimeout("timed out"))
    assert not _is_network_error(httpx2.InvalidURL("not a URL"))  # not the network: a bug or bad input
    assert not _is_network_error(ValueError("x"))
