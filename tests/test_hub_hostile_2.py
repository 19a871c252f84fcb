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

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from svd_probe.errors import CorruptShardError, TransferError
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
        self.paths: list[str] = []
        tiny = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                tiny.paths.append(self.path)
                tiny.answer(self)

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
