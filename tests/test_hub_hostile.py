"""A hostile or broken Hub, and hostile checkpoint files: the token stays home, every request ends.

Each case here failed before the HTTP edge (svd_probe/hub/http.py) and the checks in
svd_probe/hub/checkpoint.py existed: the token followed a redirect to another host, an index
entry `../..` made the client read another (gated) repo, a server trickling bytes kept the run
waiting forever, a redirect loop was reported as a missing header, offline mode and an
unreachable Hub ended in tracebacks, and config/index JSON that `json.loads` chokes on escaped
as RecursionError or ValueError.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import GATED_TOKEN
from safetensors.torch import save_file

from svd_probe.errors import (
    BadOptionError,
    EntryNotFoundError,
    HubUnreachableError,
    MalformedFileError,
    SvdProbeError,
    TransferError,
    UnsafeShardNameError,
)
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.http import TOKEN_HOME
from svd_probe.hub.source import INDEX_FILE
from svd_probe.models import ModelRef, resolve_model
from svd_probe.testing.fake_hub import FakeHub

# Deadlines and backoff small enough that a stalled request costs the test well under a second.
QUICK = dict(backoff=0.01, max_backoff=0.02, retries=1, deadline=0.6)
NAME = "model.layers.0.self_attn.o_proj.weight"
REPO = "tiny/deepseek-v3"


@pytest.fixture
def hubs(deepseek_ckpt):
    """A fresh Hub stand-in and a second server (another origin) that records what it receives."""
    with FakeHub() as hub, FakeHub() as other:
        commit = hub.add_repo(REPO, deepseek_ckpt.folder)
        hub.add_repo("gated/deepseek-v3", deepseek_ckpt.folder, gated_token=GATED_TOKEN)
        other.add_repo(REPO, deepseek_ckpt.folder, commit=commit)
        other.add_repo("gated/deepseek-v3", deepseek_ckpt.folder, commit=commit)  # not gated: it answers anyone
        yield hub, other


def _open(hub, repo=REPO, **kw):
    return open_checkpoint(ModelRef(name=repo, repo_id=repo), endpoint=hub.endpoint, **{**QUICK, **kw})


def _expected(ck, name):
    from test_hub_stream import expected  # the safetensors library's answer, scales applied

    return expected(ck, name)


# --- the token never leaves its host ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["host", "port"])
def test_head_redirect_to_another_origin_never_carries_the_token(hubs, where):
    hub, other = hubs
    path = "/gated/deepseek-v3/resolve/main/config.json"
    port = other.endpoint.rsplit(":", 1)[1]
    base = f"http://localhost:{port}" if where == "host" else other.endpoint  # another name, or another port
    hub.misbehave("redirect", match=path, methods=("HEAD",), location=base + path)
    try:
        _open(hub, "gated/deepseek-v3", token=GATED_TOKEN)
    except SvdProbeError:
        pass  # refusing the redirect is fine; forwarding the token is not
    assert hub.faults_fired() == ["redirect"]
    assert all("authorization" not in r.headers for r in other.records), other.records
    assert any("authorization" in r.headers for r in hub.records)  # the Hub itself did get it


_OPEN_IN_CHILD = """
import sys
from svd_probe.errors import SvdProbeError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.models import ModelRef
endpoint, repo, token = sys.argv[1:4]
try:
    open_checkpoint(ModelRef(name=repo, repo_id=repo), endpoint=endpoint, token=token,
                    backoff=0.01, max_backoff=0.02, retries=1, deadline=5)
except SvdProbeError as e:
    print("refused:", e.message)
"""


@pytest.mark.parametrize("request_of", ["file_metadata", "hf_hub_download"])
def test_a_mirror_redirect_to_hf_endpoint_never_carries_the_mirror_token(hubs, request_of):
    """huggingface_hub follows a HEAD redirect, with the token, to any origin it counts as a Hub
    (huggingface.co, hf.co, HF_ENDPOINT): from an `--endpoint` mirror, the mirror's token went to
    HF_ENDPOINT's host, both from the commit's HEAD (`file_metadata`, of `resolve/main`) and from
    the HEAD `hf_hub_download` sends before fetching config.json (of `resolve/<commit>`). Here
    HF_ENDPOINT names the second server, in a child process, so that huggingface_hub reads it at
    import as it does for a user. (The download's GET itself was safe: httpx2 strips the token
    from a redirect to another origin.)"""
    hub, other = hubs
    revision = "main" if request_of == "file_metadata" else hub.repos["gated/deepseek-v3"].commit
    path = f"/gated/deepseek-v3/resolve/{revision}/config.json"
    hub.misbehave("redirect", match=path, methods=("HEAD",), location=other.endpoint + path)
    env = {**os.environ, "HF_ENDPOINT": other.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HOME"] = str(Path(os.environ.get("HF_HOME", "/tmp")) / f"mirror-redirect-{request_of}")
    out = subprocess.run(
        [sys.executable, "-c", _OPEN_IN_CHILD, hub.endpoint, "gated/deepseek-v3", GATED_TOKEN],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert hub.faults_fired() == ["redirect"], (out.stdout, hub.faults_fired())
    assert other.records, "the redirect was not followed: the test shows nothing"
    assert all("authorization" not in r.headers for r in other.records), [r.headers for r in other.records]
    assert all(TOKEN_HOME not in r.headers for r in hub.records + other.records)  # never sent
    assert any(r.headers.get("authorization") == f"Bearer {GATED_TOKEN}" for r in hub.records)


def test_range_reads_on_another_host_never_carry_the_token(hubs, deepseek_ckpt):
    hub, other = hubs
    hub.cdn_on(other)  # signed shard URLs now point at the second server
    src = _open(hub, "gated/deepseek-v3", token=GATED_TOKEN)
    assert torch.equal(src.read_tensors([NAME])[NAME], _expected(deepseek_ckpt, NAME))
    cdn = [r for r in other.records if r.cdn]
    assert cdn and all(r.status == 206 for r in cdn)
    assert not any("authorization" in r.headers for r in other.records)
    resolve = [r for r in hub.records if not r.cdn]
    assert resolve and all(r.headers.get("authorization") == f"Bearer {GATED_TOKEN}" for r in resolve)


def test_redirect_loop_on_head_is_reported_as_a_loop(hubs):
    hub, _ = hubs
    hub.misbehave("redirect-loop", match="config.json", methods=("HEAD",), count=1000)
    with pytest.raises(TransferError) as ei:
        _open(hub)
    assert "redirect" in ei.value.message.lower()
    assert "X-Repo-Commit" not in ei.value.message


def test_redirect_loop_on_range_reads_ends(hubs):
    hub, _ = hubs
    src = _open(hub)
    hub.misbehave("redirect-loop", match="/cdn/", methods=("GET",), count=1000)
    with pytest.raises(TransferError) as ei:
        src.read_tensors([NAME])
    assert "redirect" in ei.value.message.lower()


# --- index entries are names inside the repo, never paths out of it ------------------------------

BAD_NAMES = [
    "../x.safetensors",
    "../../gated/deepseek-v3/resolve/main/model-00001-of-00005.safetensors",
    "sub/../../x.safetensors",
    "/etc/passwd",
    "sub\\..\\x.safetensors",
    "sub//x.safetensors",
    "./x.safetensors",
    "sub/",
    "",
    "x\x00.safetensors",
    "x\n.safetensors",
    "http://evil.example/x.safetensors",
    "C:x.safetensors",
    "x.safetensors?download=1",
    "x.safetensors#frag",
]


def _meta_copy(ck, folder: Path) -> Path:
    """config.json and the index only: enough for every check made before a shard is opened."""
    folder.mkdir(parents=True)
    for name in ("config.json", INDEX_FILE):
        shutil.copy(ck.folder / name, folder / name)
    return folder


def _evil_copy(ck, folder: Path, shard_name: str, *, shards: bool = False) -> Path:
    shutil.copytree(ck.folder, folder) if shards else _meta_copy(ck, folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"][NAME] = shard_name
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_unsafe_shard_names_are_refused_locally(deepseek_ckpt, tmp_path, bad):
    folder = _evil_copy(deepseek_ckpt, tmp_path / "model", bad)
    # A real safetensors file just outside the folder: the old reader opened it.
    save_file({NAME: torch.zeros(320, 128)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UnsafeShardNameError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert ei.value.entry == NAME and NAME in ei.value.message and INDEX_FILE in ei.value.message


def test_traversal_in_the_index_never_reaches_another_repo(hubs, deepseek_ckpt, tmp_path):
    hub, _ = hubs
    shard = deepseek_ckpt.weight_map[NAME]
    folder = _evil_copy(deepseek_ckpt, tmp_path / "evil", f"../../gated/deepseek-v3/resolve/main/{shard}", shards=True)
    hub.add_repo("tiny/evil", folder)
    with pytest.raises(UnsafeShardNameError) as ei:
        _open(hub, "tiny/evil", token=GATED_TOKEN)
    assert ei.value.entry == NAME
    assert all(r.repo_id in (None, "tiny/evil") for r in hub.records), [r.url for r in hub.records]


def test_a_shard_in_a_subfolder_is_fine(deepseek_ckpt, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(deepseek_ckpt.folder, folder)
    shard = deepseek_ckpt.weight_map[NAME]
    (folder / "sub").mkdir()
    (folder / shard).rename(folder / "sub" / shard)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {k: (f"sub/{v}" if v == shard else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    src = open_checkpoint(resolve_model(str(folder)))
    assert torch.equal(src.read_tensors([NAME])[NAME], _expected(deepseek_ckpt, NAME))


# --- every request ends: slow bodies, slow headers, silence -------------------------------------


@pytest.mark.slow
def test_a_slow_body_is_abandoned_then_resumed(hubs, deepseek_ckpt):
    hub, _ = hubs
    src = _open(hub, retries=3)
    src.headers({deepseek_ckpt.weight_map[NAME]})
    hub.reset_records()
    # 5 bytes a second: even the smallest range read here (a 12-byte scale) outlives the deadline.
    hub.misbehave("slow-body", match="/cdn/", methods=("GET",), interval=0.2)
    t0 = time.monotonic()
    got = src.read_tensors([NAME])[NAME]
    elapsed = time.monotonic() - t0
    assert torch.equal(got, _expected(deepseek_ckpt, NAME))
    assert src.stats["retries"] >= 1
    assert elapsed < 3.0  # one deadline (0.6 s), not the server's 5 s trickle
    # The server records the slow answer when it ends: once the abandoned client hangs up.
    for _ in range(100):
        if hub.faults_fired():
            break
        time.sleep(0.05)
    assert hub.faults_fired() == ["slow-body"]
    # The bytes the slow answer did deliver were kept: the retry asked only for the rest.
    (slow,) = [r for r in hub.records if r.fault == "slow-body"]
    assert slow.body_bytes > 0
    first, last = (int(x) for x in slow.range.split("=")[1].split("-"))
    # The server may have sent a byte or two more after the client stopped listening.
    resumed = [r for r in hub.records if r.status == 206 and r.range and r.range.endswith(f"-{last}")]
    starts = {int(r.range.split("=")[1].split("-")[0]) for r in resumed}
    assert any(first < k <= first + slow.body_bytes for k in starts), (slow, resumed)


@pytest.mark.slow
def test_a_body_that_keeps_trickling_is_a_transfer_error_naming_the_url(hubs):
    hub, _ = hubs
    src = _open(hub)
    hub.misbehave("slow-body", match="/cdn/", methods=("GET",), count=1000, interval=0.05)
    t0 = time.monotonic()
    with pytest.raises(TransferError) as ei:
        src.read_tensors([NAME])
    assert time.monotonic() - t0 < 4.0
    msg = ei.value.message
    assert "/cdn/" in msg and "sig=" not in msg and "expires=" not in msg  # the URL, not its signature
    assert ei.value.hint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["slow-headers", "never-answer"])
def test_a_head_that_never_completes_is_unreachable_not_a_hang(hubs, kind):
    hub, _ = hubs
    hub.misbehave(kind, match="config.json", methods=("HEAD",), count=1000)
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError) as ei:
        _open(hub)
    assert time.monotonic() - t0 < 4.0
    assert ei.value.offline is False
    assert f"{hub.endpoint}/{REPO}/resolve/main/config.json" in ei.value.message


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["slow-headers", "never-answer"])
def test_a_range_read_that_never_completes_ends(hubs, kind):
    hub, _ = hubs
    src = _open(hub, timeout=60.0)  # the per-read timeout alone would wait a minute per attempt
    hub.misbehave(kind, match="/cdn/", methods=("GET",), count=1000)
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        src.read_tensors([NAME])
    assert time.monotonic() - t0 < 4.0


@pytest.mark.slow
def test_a_single_stall_is_retried_and_succeeds(hubs, deepseek_ckpt):
    hub, _ = hubs
    hub.misbehave("never-answer", match="config.json", methods=("HEAD",))
    src = _open(hub, retries=2)
    assert src.commit == hub.repos[REPO].commit
    assert hub.faults_fired() == ["never-answer"]


# --- offline, unreachable --------------------------------------------------------------------------


def test_offline_mode_refuses_at_once(hubs, monkeypatch):
    import huggingface_hub.constants

    hub, _ = hubs
    # huggingface_hub reads HF_HUB_OFFLINE when imported: set its constant, as its own tests do.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError) as ei:
        _open(hub)
    assert time.monotonic() - t0 < 1.0
    assert ei.value.offline is True and "HF_HUB_OFFLINE" in str(ei.value)
    assert hub.records == []  # not one request


@pytest.mark.slow  # a fresh interpreter: about 4 s
def test_offline_cli_says_so_without_a_traceback(tmp_path, hubs):
    hub, _ = hubs
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "SVD_PROBE_CACHE": str(tmp_path / "cache"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "svd_probe.cli", "analyze", REPO, "--endpoint", hub.endpoint, "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    assert "offline" in out.stderr.lower()
    assert hub.records == []


@pytest.mark.slow
def test_unreachable_hub_is_a_typed_error_and_fast():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError) as ei:
        open_checkpoint(ModelRef(name=REPO, repo_id=REPO), endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5.0  # default options: not eight backed-off retries
    assert ei.value.offline is False and f"127.0.0.1:{port}" in ei.value.message
    assert isinstance(ei.value, TransferError) and ei.value.exit_code == 3


# --- check_config: refuse early, before the index or a shard header ------------------------------


def test_check_config_runs_before_the_index_is_fetched(hubs, deepseek_ckpt):
    hub, _ = hubs
    seen = []

    def check(config):
        seen.append(config)
        raise BadOptionError("layer 99 is not in this model", "Pick --layers within 0-3.")

    with pytest.raises(BadOptionError):
        _open(hub, check_config=check)
    assert seen == [deepseek_ckpt.config]
    assert not any(r.file and r.file != "config.json" for r in hub.records), [r.url for r in hub.records]
    with pytest.raises(BadOptionError):
        open_checkpoint(resolve_model(str(deepseek_ckpt.folder)), check_config=check)
    assert seen[1] == deepseek_ckpt.config
    ok = _open(hub, check_config=lambda c: None)
    assert ok.config == deepseek_ckpt.config


# --- config.json and the index are untrusted JSON -------------------------------------------------

BAD_JSON = {
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "5000-digit int": b'{"hidden_size": ' + b"9" * 5000 + b"}",
    "not utf-8": b'{"model_type": "\xff\xfe"}',
    "utf-16": '{"model_type": "llama"}'.encode("utf-16"),
    "not an object": b"[4]",
    "null": b"null",
    "truncated": b'{"model_type": "lla',
    "empty": b"",
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("which", ["config.json", INDEX_FILE])
@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_is_a_typed_error_naming_the_file(deepseek_ckpt, tmp_path, which, case):
    folder = tmp_path / "model"
    _meta_copy(deepseek_ckpt, folder)
    (folder / which).write_bytes(BAD_JSON[case])
    with pytest.raises(MalformedFileError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert which in ei.value.message and ei.value.hint
    assert "\xff" not in ei.value.message  # says where, never echoes the bytes


@pytest.mark.slow
@pytest.mark.parametrize(
    "which,cap", [("config.json", 4 * 1024 * 1024), (INDEX_FILE, 64 * 1024 * 1024)], ids=["config", "index"]
)
def test_huge_json_is_refused_before_it_is_read(deepseek_ckpt, tmp_path, which, cap):
    folder = tmp_path / "model"
    _meta_copy(deepseek_ckpt, folder)
    body = json.loads((folder / which).read_text())
    raw = json.dumps(body).encode()
    (folder / which).write_bytes(raw[:-1] + b" " * (cap + 1 - len(raw)) + b"}")  # valid JSON, 1 byte too big
    assert (folder / which).stat().st_size == cap + 1
    with pytest.raises(MalformedFileError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert which in ei.value.message and str(cap) in ei.value.message.replace(",", "")


def test_huge_config_on_the_hub_is_never_downloaded(hubs, deepseek_ckpt, tmp_path):
    hub, _ = hubs
    folder = tmp_path / "big"
    shutil.copytree(deepseek_ckpt.folder, folder)
    (folder / "config.json").write_bytes(b'{"model_type": "deepseek_v3"' + b" " * (5 * 1024 * 1024) + b"}")
    hub.add_repo("tiny/big-config", folder)
    with pytest.raises(MalformedFileError):
        _open(hub, "tiny/big-config")
    assert hub.bytes_served("config.json") == 0


@pytest.mark.parametrize(
    "weight_map",
    [None, [], "x", {"a": 1}, {"a": ["x.safetensors"]}, {"a": None}],
    ids=["missing", "list", "string", "int value", "list value", "null value"],
)
def test_weight_map_of_the_wrong_shape(deepseek_ckpt, tmp_path, weight_map):
    folder = tmp_path / "model"
    _meta_copy(deepseek_ckpt, folder)
    index = {"metadata": {}} if weight_map is None else {"weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(MalformedFileError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert INDEX_FILE in ei.value.message


def test_duplicate_index_keys_are_refused(deepseek_ckpt, tmp_path):
    folder = tmp_path / "model"
    _meta_copy(deepseek_ckpt, folder)
    shard = deepseek_ckpt.weight_map[NAME]
    raw = json.dumps({"weight_map": {NAME: shard}})[:-2] + f', "{NAME}": "other.safetensors"}}}}'
    (folder / INDEX_FILE).write_text(raw)
    with pytest.raises(MalformedFileError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert NAME in ei.value.message


@pytest.mark.slow  # a 22 MB index written and parsed
def test_too_many_index_entries(deepseek_ckpt, tmp_path):
    folder = tmp_path / "model"
    _meta_copy(deepseek_ckpt, folder)
    n = 1_000_001  # DeepSeek-V3 lists about 92k tensors and Kimi-K2 about 140k: a million is far beyond
    body = "{" + ",".join(f'"t{i}":"a.safetensors"' for i in range(n)) + "}"
    (folder / INDEX_FILE).write_text('{"weight_map": ' + body + "}")
    with pytest.raises(MalformedFileError) as ei:
        open_checkpoint(resolve_model(str(folder)))
    assert "1000001" in ei.value.message.replace(",", "")


def test_index_not_found_is_still_entry_not_found(hubs, tmp_path):
    hub, _ = hubs
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    hub.add_repo("tiny/nothing", tmp_path / "m")
    with pytest.raises(EntryNotFoundError):
        _open(hub, "tiny/nothing")


@pytest.mark.parametrize("location", ["http://127.0.0.1:+8080/x", "https://mirror.example:+8443/x"])
def test_a_port_urllib_cannot_read_is_no_origin_of_the_endpoints(location):
    """`:+8080`: urllib refuses the port and took the scheme's default instead, so a redirect
    from an endpoint on port 80 (or 443) to another port looked like the endpoint's origin and
    carried the token (found by a helper's audit, with the stand-in as the second server). The
    HTTP client the requests go through reads the port it will really connect to."""
    import httpx2

    from svd_probe.hub.http import headers_for

    endpoint = "http://127.0.0.1" if location.startswith("http:") else "https://mirror.example"
    assert httpx2.URL(location).port not in (None, 80, 443)  # where the client would connect
    headers = {"authorization": "Bearer secret123", "user-agent": "svd-probe"}
    assert headers_for(location, headers, endpoint) == {"user-agent": "svd-probe"}
    assert headers_for(endpoint + "/x", headers, endpoint) == headers  # its own origin keeps it


@pytest.mark.parametrize("token", ["hf_secret123\n", "hf_secret123\r\nX-Evil: 1", "hf_secret123é", "hf secret"])
def test_a_malformed_token_is_refused_without_showing_it(token):
    """A --token with a line break ended after two retries in "Illegal header value b'Bearer
    hf_secret123\\n'" (the token on the user's screen), one with a non-ASCII letter in a
    traceback. Refused at once, and neither the message nor the hint shows it."""
    from svd_probe.errors import BadOptionError
    from svd_probe.hub.http import hub_headers

    with pytest.raises(BadOptionError) as e:
        hub_headers(token)
    assert "secret" not in e.value.message + (e.value.hint or "")
    assert hub_headers("hf_secret123")["authorization"] == "Bearer hf_secret123"
