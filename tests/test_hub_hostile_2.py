"""A hostile or broken server, second round: answers that ended in tracebacks.

Each case failed on the code before its fix (a second adversarial review of svd_probe/hub/):
`Content-Range: bytes 0-0/*` ended in KeyError, a 5000-digit Content-Range number in ValueError
(Python's int-string digit limit), a redirect to `http://[::1/x` or to a host name of 300
letters in ValueError / UnicodeError (range reads and the commit's HEAD alike), and an FP8
`_scale_inv` (dtype F8_E4M3, which a header may declare) ended in torch's NotImplementedError
for aminmax.

The hostile servers are tiny handlers here (`_Tiny`); the Hub stand-in serves what is honest.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from svd_probe.errors import (
    CorruptShardError,
    HubUnreachableError,
    MalformedFileError,
    SvdProbeError,
    TransferError,
)
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.ranges import HubFiles
from svd_probe.models import ModelRef
from svd_probe.testing.fake_hub import FakeHub, _QuietServer
from svd_probe.testing.layouts import build_layout, write_layout

QUICK = dict(backoff=0.01, max_backoff=0.02, retries=1, deadline=5.0)
REPO = "tiny/deepseek-v3"
COMMIT = "0" * 40
SHARD = "model-00001-of-00001.safetensors"


class _Tiny:
    """A loopback server whose every GET is answered by `answer(handler)`; records the paths."""

    def __init__(self) -> None:
        self.answer: Callable[[BaseHTTPRequestHandler], None] = lambda h: h.send_error(500)
        self.head: Callable[[BaseHTTPRequestHandler], None] = lambda h: h.send_error(405)
        self.paths: list[str] = []  # GETs only
        self.heads: list[str] = []
        self.hung_up = threading.Event()  # a streamed answer met a client that had gone
        tiny = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                tiny.paths.append(self.path)
                tiny.answer(self)

            def do_HEAD(self):
                tiny.heads.append(self.path)
                tiny.head(self)

        self.server = _QuietServer(  # a client hanging up prints nothing
            ("127.0.0.1", 0), Handler
        )
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny():
    t = _Tiny()
    yield t
    t.close()


def _files(tiny: _Tiny, **kw) -> HubFiles:
    return HubFiles(tiny.endpoint, REPO, COMMIT, **{**QUICK, **kw})


def _range(h: BaseHTTPRequestHandler) -> tuple[int, int]:
    a, b = h.headers["Range"].split("=", 1)[1].split("-")
    return int(a), int(b)


def _answer(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes = b"") -> None:
    h.send_response(status)
    for k, v in {"Content-Length": str(len(body)), **headers}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


# --- Content-Range numbers the client cannot use ----------------------------------------------------


def test_a_content_range_without_a_total_is_a_typed_error(tiny):
    """`bytes 0-0/*` (RFC 9110: length unknown): the size lookup ended in KeyError."""

    def star(h):
        a, b = _range(h)
        _answer(h, 206, {"Content-Range": f"bytes {a}-{b}/*"}, b"\0" * (b - a + 1))

    tiny.answer = star
    files = _files(tiny)
    try:
        with pytest.raises(TransferError, match=r"did not say how large .*'\*'") as ei:
            files.size(SHARD)
        assert ei.value.hint
    finally:
        files.close()


@pytest.mark.parametrize("where", ["total", "first"])
def test_a_content_range_number_of_5000_digits_is_a_typed_error(tiny, where):
    """int() refuses more than 4300 digits with ValueError, which escaped as a traceback."""
    huge = "9" * 5000

    def long_number(h):
        a, b = _range(h)
        cr = f"bytes {a}-{b}/{huge}" if where == "total" else f"bytes {huge}-{b}/100"
        _answer(h, 206, {"Content-Range": cr}, b"\0" * (b - a + 1))

    tiny.answer = long_number
    files = _files(tiny)
    try:
        with pytest.raises(TransferError, match="bad Content-Range") as ei:
            files.read_many([(SHARD, 0, 8)])
        assert huge not in ei.value.message  # cut short, never the whole header
    finally:
        files.close()


# --- redirects to locations that are no URL ---------------------------------------------------------

BAD_LOCATIONS = {
    "unclosed IPv6": "http://[::1/x",  # urllib: ValueError("Invalid IPv6 URL")
    "300-letter host": "http://" + "a" * 300 + "/x",  # the resolver's idna codec: UnicodeError
    "empty label": "http://a..b/x",  # the same
}


@pytest.mark.parametrize("case", sorted(BAD_LOCATIONS))
def test_a_range_read_redirected_to_a_malformed_location_is_a_typed_error(tiny, case):
    location = BAD_LOCATIONS[case]
    tiny.answer = lambda h: _answer(h, 302, {"Location": location + "?sig=secret"})
    files = _files(tiny)
    try:
        with pytest.raises(TransferError, match="malformed location") as ei:
            files.read_many([(SHARD, 0, 8)])
        assert "secret" not in ei.value.message  # a signed location is never shown
        assert len(tiny.paths) == 1  # refused, not retried: the server will say the same again
    finally:
        files.close()


def test_a_commit_head_redirected_to_a_malformed_location_is_a_typed_error(deepseek_ckpt):
    """huggingface_hub follows the HEAD's redirects itself; its urljoin raised ValueError."""
    with FakeHub() as hub:
        hub.add_repo(REPO, deepseek_ckpt.folder)
        hub.misbehave("redirect", match="config.json", methods=("HEAD",), location="http://[::1/x")
        with pytest.raises(TransferError, match="malformed redirect") as ei:
            open_checkpoint(ModelRef(name=REPO, repo_id=REPO), endpoint=hub.endpoint, **QUICK)
        assert ei.value.hint
        assert hub.faults_fired() == ["redirect"]


# --- FP8 scales stored as FP8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, float("nan")], ids=["finite", "nan"])
def test_an_fp8_scale_is_checked_not_a_crash(tmp_path, bad):
    """A header may declare a `_scale_inv` as F8_E4M3; torch has no aminmax for float8, so the
    finiteness check raised NotImplementedError. Now the scale is widened first: finite scales
    read (the same values as an F32 scale holding them), a NaN is named."""
    layout = build_layout("deepseek_v3", fp8=True)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    scale = name + "_scale_inv"
    s = layout.tensors[scale].to(torch.float8_e4m3fn)
    if bad is not None:
        s[0, 0] = bad
    layout.tensors[scale] = s
    src = open_checkpoint(str(write_layout(tmp_path / "m", layout)))
    if bad is None:
        got = src.read_tensors([name])[name]
        w = layout.tensors[name].to(torch.float32)
        grid = s.to(torch.float32).repeat_interleave(16, 0).repeat_interleave(16, 1)[: w.shape[0], : w.shape[1]]
        assert torch.equal(got, w * grid)
    else:
        with pytest.raises(CorruptShardError, match="NaN or infinite") as ei:
            src.read_tensors([name])
        assert ei.value.tensor == scale


# --- a small file whose GET streams without end ------------------------------------------------------
#
# config.json and the index come through huggingface_hub's `hf_hub_download`, which wrote every byte
# a GET sent into HF_HOME and compared the size only at the end: a HEAD saying 30 bytes, then a GET
# that never ended, put 588 MiB in HF_HOME before the deadline's error, and the abandoned request
# (a daemon thread) went on writing after it (998 MiB three seconds later).

MiB = 1 << 20
INDEX = "model.safetensors.index.json"
CONFIG_BODY = b'{"model_type": "deepseek_v3"}'
# One attempt, and a deadline that is the deadline (min_rate high: not stretched for 64 MiB).
ONE_TRY = dict(backoff=0.01, max_backoff=0.02, retries=0, connect_retries=0, deadline=3.0, min_rate=1e12)


def _hub_head(h: BaseHTTPRequestHandler, size: int) -> None:
    """A Hub's HEAD of a file: its commit, an ETag of its own (the cache's blob name), its size."""
    import hashlib

    etag = hashlib.sha256(h.path.rsplit("/", 1)[-1].encode()).hexdigest()
    _answer(h, 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Length": str(size)})
    # _answer wrote no body (a HEAD has none): Content-Length is the file's, as on the Hub


def _stream(tiny: _Tiny, h: BaseHTTPRequestHandler, *, piece: int, pause: float, seconds: float) -> None:
    """200, no length (the body ends when the connection does), `piece` bytes every `pause` s for
    `seconds`: without end as far as the client can tell. Sets `tiny.hung_up` if the client goes."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    block = b" " * piece
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            h.wfile.write(block)
            if pause:
                time.sleep(pause)
    except OSError:  # BrokenPipe, ConnectionReset: the client hung up
        tiny.hung_up.set()


def _bytes_under(folder: Path) -> int:
    """Bytes in the files under `folder` (while huggingface_hub may still be writing or deleting)."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache in `tmp_path` (its constant is read at each call)."""
    import huggingface_hub.constants

    folder = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder


def _route(tiny: _Tiny, hostile: str, stream: Callable[[BaseHTTPRequestHandler], None]) -> None:
    """HEADs say config.json is CONFIG_BODY's size and the index 30 bytes; GETs of config.json
    answer CONFIG_BODY, except that the GET of `hostile` is `stream`."""

    def head(h):
        _hub_head(h, len(CONFIG_BODY) if h.path.endswith("/config.json") else 30)

    def get(h):
        if h.path.endswith("/" + hostile):
            stream(h)
        elif h.path.endswith("/config.json"):
            _answer(h, 200, {}, CONFIG_BODY)
        else:
            h.send_error(404)

    tiny.head = head
    tiny.answer = get


@pytest.mark.parametrize(
    "case, limit",
    [("config.json", 4 * MiB), ("config.json, redirected", 4 * MiB), (INDEX, 64 * MiB)],
    ids=["config", "config-redirected", "index"],
)
def test_a_small_file_streamed_without_end_stops_at_its_limit(tiny, hf_cache, case, limit):
    """The HEAD says 30 bytes, the GET never ends (1 MiB every 10 ms for 5 s): a typed error naming
    the file and its limit, with at most the limit (+ 1 MiB) in HF_HOME at the error and 1.5 s on,
    the connection dropped, no retry. "redirected": the GET of config.json is a 302 to another
    origin, whose answer never ends (the limit goes with the request, not its URL)."""
    path = case.split(",")[0]
    if "redirected" in case:
        cdn = _Tiny()
        cdn.answer = lambda h: _stream(cdn, h, piece=MiB, pause=0.01, seconds=5.0)
        _route(tiny, path, lambda h: _answer(h, 302, {"Location": f"{cdn.endpoint}/cdn/{path}?sig=1"}))
    else:
        cdn = tiny
        _route(tiny, path, lambda h: _stream(tiny, h, piece=MiB, pause=0.01, seconds=5.0))
    try:
        with pytest.raises(Exception) as ei:
            open_checkpoint(ModelRef(name=REPO, repo_id=REPO), endpoint=tiny.endpoint, **ONE_TRY)
        at_error = _bytes_under(hf_cache)
        time.sleep(1.5)
        later = _bytes_under(hf_cache)
        sizes = f"HF cache: {at_error} bytes at the error, {later} 1.5 s later; error: {ei.value!r}"
        assert at_error <= limit + MiB and later <= limit + MiB, sizes
        assert isinstance(ei.value, MalformedFileError), repr(ei.value)
        assert ei.value.file == f"{path} of {REPO}"
        assert path in ei.value.message and f"{limit}-byte" in ei.value.message
        assert ei.value.hint
        assert cdn.hung_up.wait(2.0)  # the stream was cut: the server saw the client go
        assert sum(p.endswith("/" + path) for p in tiny.paths) == 1  # not retried: it would say the same
    finally:
        if cdn is not tiny:
            cdn.close()


def test_an_abandoned_download_stops_writing(tiny, hf_cache, monkeypatch):
    """The index trickles in (256 KiB every 50 ms, for 6 s) and the 1 s deadline gives up on it
    long before its 64 MiB limit: the abandoned request, left in its daemon thread, must not go on
    writing into HF_HOME. (huggingface_hub writes in chunks of DOWNLOAD_CHUNK_SIZE, 10 MiB: made
    256 KiB here, so that what lands on disk follows what arrives.)"""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    _route(tiny, INDEX, lambda h: _stream(tiny, h, piece=256 * 1024, pause=0.05, seconds=6.0))
    with pytest.raises(HubUnreachableError, match="stalled"):
        open_checkpoint(ModelRef(name=REPO, repo_id=REPO), endpoint=tiny.endpoint, **{**ONE_TRY, "deadline": 1.0})
    assert tiny.hung_up.wait(1.5)  # the abandoned request dropped the connection
    time.sleep(0.2)
    settled = _bytes_under(hf_cache)
    time.sleep(1.5)
    later = _bytes_under(hf_cache)
    assert later <= settled <= 64 * MiB + MiB, f"HF cache: {settled} bytes, then {later}"


def test_a_small_file_announced_as_xet_comes_over_plain_http(tiny, hf_cache):
    """A HEAD with X-Xet-Hash would send huggingface_hub to hf_xet (its own Rust client, which no
    limit of ours reaches). config.json and the index are small Git files on the Hub: they are
    fetched over HTTP, under the limit, whatever the HEAD says."""
    from svd_probe.hub import http

    def head(h):
        _answer(
            h,
            200,
            {
                "X-Repo-Commit": COMMIT,
                "ETag": '"xet0"',
                "Content-Length": str(len(CONFIG_BODY)),
                "X-Xet-Hash": "a" * 64,
                "X-Xet-Refresh-Route": f"{tiny.endpoint}/api/xet-refresh",
            },
        )

    tiny.head = head
    tiny.answer = lambda h: _answer(h, 200, {}, CONFIG_BODY) if h.path.endswith("/config.json") else h.send_error(404)
    policy = http.HttpPolicy(**ONE_TRY)
    got = http.download(
        REPO, "config.json", commit=COMMIT, token=False, endpoint=tiny.endpoint, policy=policy, max_bytes=4 * MiB
    )
    assert got.read_bytes() == CONFIG_BODY
    assert hf_cache in got.parents  # in huggingface_hub's cache, as before
    assert not any("xet" in p for p in tiny.paths)


def test_a_small_file_still_lands_in_the_cache_and_reads_offline(tiny, hf_cache, monkeypatch):
    """The limit leaves an honest download alone: a redirected config.json is cached as usual, and
    offline mode finds it there afterwards."""
    import huggingface_hub.constants

    from svd_probe.hub import http

    cdn = _Tiny()
    try:
        cdn.answer = lambda h: _answer(h, 200, {}, CONFIG_BODY)
        _route(tiny, "config.json", lambda h: _answer(h, 302, {"Location": f"{cdn.endpoint}/cdn/config.json"}))
        common = dict(commit=COMMIT, token=False, endpoint=tiny.endpoint, policy=http.HttpPolicy(**ONE_TRY))
        got = http.download(REPO, "config.json", max_bytes=4 * MiB, **common)
        assert got.read_bytes() == CONFIG_BODY and hf_cache in got.parents
        assert cdn.paths == ["/cdn/config.json"]
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        again = http.download(REPO, "config.json", max_bytes=4 * MiB, **common)
        assert again == got and len(cdn.paths) == 1  # from the cache, not one more request
    finally:
        cdn.close()


def test_the_cli_says_which_file_went_past_its_limit(tiny, hf_cache, tmp_path, monkeypatch, capsys):
    """Through the console-script entry point, with the default policy (8 retries, 60 s deadline):
    the message and hint at once, no retry, no traceback."""
    from svd_probe.cli import main

    _route(tiny, "config.json", lambda h: _stream(tiny, h, piece=MiB, pause=0.01, seconds=5.0))
    monkeypatch.setenv("SVD_PROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys, "argv", ["svd-probe", "analyze", REPO, "--endpoint", tiny.endpoint, "--device", "cpu"])
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as ei:
        main()
    assert time.monotonic() - t0 < 5.0
    assert ei.value.code not in (0, None)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    assert "config.json of tiny/deepseek-v3 is over the 4194304-byte (4 MiB) limit" in cap.err
    assert "hint:" in cap.err
    assert sum(p.endswith("/config.json") for p in tiny.paths) == 1
    assert _bytes_under(hf_cache) <= 5 * MiB


def test_a_download_resumed_by_huggingface_hub_keeps_one_budget(tiny, hf_cache):
    """huggingface_hub resumes a GET cut short (RemoteProtocolError) with `Range: bytes=N-`: the
    budget counts N. Here each answer promises 3 MiB, the first stops 1 byte short, the resumed
    one (206) would take the file to 6 MiB."""

    def get(h):
        if not h.path.endswith("/config.json"):
            return h.send_error(404)
        start = int(h.headers["Range"].split("=")[1].split("-")[0]) if h.headers["Range"] else 0
        status, headers = (206, {"Content-Range": f"bytes {start}-{start + 3 * MiB - 1}/*"}) if start else (200, {})
        h.send_response(status)
        for k, v in {"Content-Length": str(3 * MiB), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(b" " * (3 * MiB - (0 if start else 1)))
        except OSError:
            tiny.hung_up.set()

    tiny.head = lambda h: _hub_head(h, len(CONFIG_BODY))
    tiny.answer = get
    with pytest.raises(SvdProbeError) as ei:
        open_checkpoint(ModelRef(name=REPO, repo_id=REPO), endpoint=tiny.endpoint, **ONE_TRY)
    assert _bytes_under(hf_cache) <= 4 * MiB + MiB
    assert [p.endswith("/config.json") for p in tiny.paths] == [True, True]  # resumed once
    assert isinstance(ei.value, MalformedFileError) and "4194304-byte" in ei.value.message
