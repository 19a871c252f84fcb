"""A loopback stand-in for the Hugging Face Hub (docs/reference.md §5), for tests and benchmarks.

It serves folders as repos: `HEAD|GET /{org}/{name}/resolve/{revision}/{path}` with
`X-Repo-Commit`, `ETag`, `Accept-Ranges`, Range → 206 + Content-Range, a 302 for large (LFS)
files to a signed `/cdn/...` URL that expires, 404s with `X-Error-Code`, gated repos that want a
Bearer token, and injectable faults. It counts every body byte it sends and records every
request, so tests can assert exact traffic and that no shard was fetched without a Range.

Python's http.server ignores Range; everything about ranges here is implemented by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

FAULT_KINDS = ("cut", "drop", "503", "429", "expire", "stall")
HOSTILE_KINDS = ("redirect", "redirect-loop", "slow-headers", "slow-body", "never-answer")


@dataclass
class Repo:
    repo_id: str
    folder: Path
    commit: str
    revisions: dict[str, str]  # name -> commit
    gated_token: str | None = None


@dataclass
class Record:
    method: str
    url: str
    repo_id: str | None
    file: str | None
    range: str | None
    status: int
    body_bytes: int
    cdn: bool
    authorization: bool
    fault: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # every request header, names lower-cased


@dataclass
class _Fault:
    kind: str
    remaining: int
    match: str
    retry_after: str = "1"


@dataclass
class _Misbehaviour:
    kind: str
    remaining: int
    match: str
    methods: tuple[str, ...]
    location: str | None
    interval: float
    hold: float


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (an abandoned range read, a timed-out test) is normal
    here: socketserver would print its BrokenPipe/ConnectionReset traceback to stderr, where it
    lands in whatever test is capturing stderr at that moment. Other errors still print."""

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


@dataclass
class FakeHub:
    """Start with `with FakeHub() as hub:` (or `.start()`); `hub.endpoint` is its base URL.

    lfs_suffixes: files answered with a 302 to the signed CDN path (the Hub does this for LFS
    files; config and index are served directly, like real small files).
    sign_ttl: lifetime of a signed URL in seconds.
    cdn_host: host name used in the signed redirect URLs (None: a path on the same origin).
    """

    lfs_suffixes: tuple[str, ...] = (".safetensors",)
    sign_ttl: float = 3600.0
    # The Hub's CDN is another host, so clients must drop the Authorization header there;
    # "localhost" vs "127.0.0.1" gives the stand-in a second origin on the same socket.
    cdn_host: str = "localhost"
    # A full base URL ("http://127.0.0.1:PORT") of another stand-in that serves the signed paths
    # (set by `cdn_on`); wins over cdn_host.
    cdn_endpoint: str | None = None
    repos: dict[str, Repo] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    # Bytes a second at which each ranged body is sent (None: as fast as the socket takes them):
    # a stand-in for a WAN link, where every connection is held back by its latency.
    rate: float | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._hostile: list[_Misbehaviour] = []
        self._stopping = threading.Event()
        self.stalled: list[str] = []  # files of requests held by a "stall" fault, in order
        self._secret = os.urandom(16)
        self._server: ThreadingHTTPServer | None = None
        self.in_flight = 0  # ranged bodies being sent right now
        self.max_in_flight = 0  # the most at once since the last reset_records()
        self._thread: threading.Thread | None = None

    # -- setup ----------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revisions: dict[str, str] | None = None,
        gated_token: str | None = None,
        commit: str | None = None,
    ) -> str:
        """Serve `folder` as `repo_id`; return its commit. `revisions` maps extra branch/tag names
        to commits ("main" always maps to this one). `gated_token`: answer 401/403 GatedRepo
        unless `Authorization: Bearer <gated_token>` is sent."""
        folder = Path(folder)
        if commit is None:
            h = hashlib.sha1(repo_id.encode())
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    h.update(f"{f.relative_to(folder)}:{f.stat().st_size}".encode())
            commit = h.hexdigest()
        revs = {"main": commit, **(revisions or {})}
        with self._lock:
            self.repos[repo_id] = Repo(repo_id, folder, commit, revs, gated_token)
        return commit

    def inject(self, kind: str, count: int = 1, match: str = ".safetensors", retry_after: str = "1") -> None:
        """Make the next `count` ranged GETs of files whose path contains `match` fail with `kind`:
        "stall" (hold the request `retry_after` seconds, then answer normally: a slow link, or
        a window in which a test can kill the client mid-read),
        "cut" (body stops halfway, connection closed), "drop" (connection closed before any
        answer), "503", "429" (with Retry-After), "expire" (the signed CDN URL is refused as expired)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append(_Fault(kind, count, match, retry_after))

    def misbehave(
        self,
        kind: str,
        *,
        match: str,
        count: int = 1,
        methods: tuple[str, ...] = ("GET", "HEAD"),
        location: str | None = None,
        interval: float = 0.2,
        hold: float = 5.0,
    ) -> None:
        """Make the next `count` requests whose URL path contains `match` (and whose method is in
        `methods`) meet a hostile server, before any routing, gating or Range handling:
        "redirect" (302 to `location`, no Hub headers), "redirect-loop" (302 to the same path),
        "slow-headers" (a status line, then header bytes one per `interval` s, never finished),
        "slow-body" (the normal answer, its body one byte per `interval` s),
        "never-answer" (the request is read, nothing is sent).
        A misbehaving answer gives up after `hold` seconds (it closes the connection), so that a
        client's abandoned request and the server's thread both end soon after a test."""
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"misbehaviour kind must be one of {HOSTILE_KINDS}")
        if kind == "redirect" and not location:
            raise ValueError("a redirect needs a location")
        with self._lock:
            self._hostile.append(_Misbehaviour(kind, count, match, tuple(methods), location, interval, hold))

    def cdn_on(self, other: FakeHub) -> None:
        """Serve this hub's signed shard URLs from `other` (another origin: another port): it checks
        the same signatures and serves the same repos, and records what it receives."""
        other._secret = self._secret
        other.repos = self.repos
        self.cdn_endpoint = other.endpoint

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._hostile.clear()

    def reset_records(self) -> None:
        with self._lock:
            self.records.clear()
            self.max_in_flight = self.in_flight

    def bytes_served(self, match: str | None = ".safetensors") -> int:
        with self._lock:
            return sum(r.body_bytes for r in self.records if r.file and (match is None or match in r.file))

    def faults_fired(self) -> list[str]:
        with self._lock:
            return [r.fault for r in self.records if r.fault]

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._stopping.set()  # misbehaving answers still holding a connection give up now
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- internals used by the handler ------------------------------------------------------------

    def _take_fault(self, file: str, stage: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.remaining > 0 and f.match in file and (f.kind == "expire") == (stage == "cdn-auth"):
                    f.remaining -= 1
                    return f
        return None

    def _take_misbehaviour(self, method: str, path: str) -> _Misbehaviour | None:
        with self._lock:
            for m in self._hostile:
                if m.remaining > 0 and m.match in path and method in m.methods:
                    m.remaining -= 1
                    return m
        return None

    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def _record(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    # TCP_NODELAY, as web servers and CDNs set it: with Nagle's algorithm on, a small body sent
    # after the headers waited for the client's delayed ACK, 44 ms a 4 KiB range on loopback
    # (benchmarks/README.md, "Read size, width and the stand-in's TCP_NODELAY"), a cost the real
    # Hub does not have.
    disable_nagle_algorithm = True
    hub: FakeHub

    def log_message(self, *args):  # quiet: tests read `hub.records` instead
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    # -- routing ------------------------------------------------------------------------------------

    def _serve(self, head: bool):
        url = urlsplit(self.path)
        parts = url.path.lstrip("/").split("/")
        rec = Record(
            self.command,
            self.path,
            None,
            None,
            self.headers.get("Range"),
            0,
            0,
            parts[0] == "cdn",
            "authorization" in {k.lower() for k in self.headers.keys()},
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self._slow: _Misbehaviour | None = None
        try:
            if url.path == "/_stats":  # for benchmarks that run the stand-in in another process
                return self._stats(rec)
            m = self.hub._take_misbehaviour(self.command, url.path)
            if m is not None:
                rec.fault = m.kind
                if m.kind == "slow-body":
                    self._slow = m  # answered normally below, the body trickled by _send_file
                else:
                    self.hub._record(rec)  # now: the answer may take `hold` seconds
                    return self._misbehave(m, rec)
            if parts[0] == "cdn" and len(parts) >= 5:
                self._cdn(parts, url.query, head, rec)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts, head, rec)
            else:
                self._error(404, None, "Not Found", rec)
        finally:
            if rec.fault not in ("redirect", "redirect-loop", "slow-headers", "never-answer"):
                self.hub._record(rec)

    def _misbehave(self, m: _Misbehaviour, rec: Record) -> None:
        stop = self.hub._stopping
        if m.kind in ("redirect", "redirect-loop"):
            rec.status = 302
            self.send_response(302)
            self.send_header("Location", (m.location or "") if m.kind == "redirect" else self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.close_connection = True
        if m.kind == "never-answer":
            stop.wait(m.hold)
            return
        # slow-headers: a well-formed start, then one byte at a time of a header that never ends.
        deadline = time.monotonic() + m.hold
        first = b"HTTP/1.1 200 OK\r\nX-Repo-Commit: " + b"0" * 40 + b"\r\nX-Padding: "
        try:
            self.wfile.write(first)
            while time.monotonic() < deadline and not stop.wait(m.interval):
                self.wfile.write(b"a")
        except OSError:  # the client hung up
            pass

    def _stats(self, rec: Record):
        import json

        hub = self.hub
        with hub._lock:
            recs = list(hub.records)
        body = json.dumps(
            {
                "bytes_served": sum(r.body_bytes for r in recs if r.file and r.file.endswith(".safetensors")),
                "requests": len(recs),
                "ranged_206": sum(1 for r in recs if r.status == 206),
                "shard_gets_without_range": sum(
                    1 for r in recs if r.method == "GET" and r.file and r.file.endswith(".safetensors") and not r.range
                ),
            }
        ).encode()
        if "reset" in self.path:
            hub.reset_records()
        rec.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, rec: Record, extra: dict | None = None):
        body = json.dumps({"error": message}).encode()
        rec.status = status
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self, parts, head, rec):
        hub = self.hub
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        revision = unquote(parts[3])
        file = "/".join(unquote(p) for p in parts[4:])
        rec.repo_id, rec.file = repo_id, file
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found", rec)
        if repo.gated_token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                return self._error(
                    401, "GatedRepo", "Access to this model is restricted. You must be authenticated.", rec
                )
            if auth != f"Bearer {repo.gated_token}":
                return self._error(
                    403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.", rec
                )
        commit = repo.revisions.get(revision) or (revision if revision in repo.revisions.values() else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", rec)
        if commit != repo.commit:  # other commits are known by name only; all serve the one folder
            pass
        full = repo.folder / file
        if not full.is_file() or ".." in Path(file).parts:
            return self._error(404, "EntryNotFound", "Entry not found", rec, {"X-Repo-Commit": commit})
        size = full.stat().st_size
        etag = '"' + hashlib.sha1(f"{file}:{size}:{full.stat().st_mtime_ns}".encode()).hexdigest() + '"'
        if file.endswith(hub.lfs_suffixes):
            expires = int(time.time() + hub.sign_ttl)
            cdn_path = f"/cdn/{quote(repo_id)}/{commit}/{quote(file)}"
            loc = f"{cdn_path}?expires={expires}&sig={hub._sign(cdn_path, expires)}"
            if hub.cdn_endpoint:
                loc = hub.cdn_endpoint.rstrip("/") + loc
            elif hub.cdn_host:
                loc = f"http://{hub.cdn_host}:{self.server.server_address[1]}{loc}"
            rec.status = 302
            self.send_response(302)
            self.send_header("Location", loc)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Size", str(size))
            self.send_header("X-Linked-Etag", etag)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_file(full, file, size, head, rec, {"X-Repo-Commit": commit, "ETag": etag})

    def _cdn(self, parts, query, head, rec):
        hub = self.hub
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        file = "/".join(unquote(p) for p in parts[4:])
        rec.repo_id, rec.file = repo_id, file
        q = parse_qs(query)
        path_only = self.path.split("?", 1)[0]
        try:
            expires = int(q["expires"][0])
            sig = q["sig"][0]
        except (KeyError, ValueError):
            return self._error(403, None, "AccessDenied", rec)
        if not hmac.compare_digest(sig, hub._sign(path_only, expires)):
            return self._error(403, None, "SignatureDoesNotMatch", rec)
        fault = None if head else hub._take_fault(file, "cdn-auth")
        if expires < time.time() or fault is not None:
            rec.fault = fault.kind if fault else None
            return self._error(403, None, "Request has expired", rec)
        repo = hub.repos.get(repo_id)
        full = repo.folder / file if repo else None
        if full is None or not full.is_file():
            return self._error(404, None, "NoSuchKey", rec)
        size = full.stat().st_size
        self._send_file(full, file, size, head, rec, {})

    # -- bodies -------------------------------------------------------------------------------------

    def _send_file(self, full: Path, file: str, size: int, head: bool, rec: Record, extra: dict):
        rng = self.headers.get("Range")
        start, end = 0, size  # [start, end)
        status = 200
        if rng is not None:
            m = _RANGE.match(rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return self._error(416, None, "Invalid range", rec, {"Content-Range": f"bytes */{size}"})
            a, b = m.group(1), m.group(2)
            if a == "":  # suffix range: the last b bytes
                start, end = max(0, size - int(b)), size
            else:
                start, end = int(a), size if b == "" else min(size, int(b) + 1)
            if start >= size or start >= end:
                return self._error(416, None, "Range Not Satisfiable", rec, {"Content-Range": f"bytes */{size}"})
            status = 206
        fault = None
        if not head and rng is not None:
            fault = self.hub._take_fault(file, "body")
        if fault is not None and fault.kind == "stall":
            rec.fault = fault.kind
            with self.hub._lock:  # visible to the test while the request is still held
                self.hub.stalled.append(file)
            time.sleep(float(fault.retry_after))
            fault = None
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "503":
                return self._error(503, None, "Service Unavailable", rec)
            if fault.kind == "429":
                return self._error(429, None, "Too Many Requests", rec, {"Retry-After": fault.retry_after})
            if fault.kind == "drop":
                rec.status = 0
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        n = end - start
        rec.status = status
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        send = n if fault is None else n // 2  # "cut": half the promised body, then hang up
        hub = self.hub
        with hub._lock:
            hub.in_flight += 1
            hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
        sent = 0
        try:
            with open(full, "rb") as f:
                if self._slow is not None:  # one byte per interval, then hang up after `hold`
                    slow, until = self._slow, time.monotonic() + self._slow.hold
                    f.seek(start)
                    try:
                        while sent < send and time.monotonic() < until and not hub._stopping.wait(slow.interval):
                            self.wfile.write(f.read(1))
                            sent += 1
                    except OSError:
                        pass
                    send = sent  # nothing more to send: a short body is closed below
                t0 = time.monotonic()
                while sent < send:
                    piece = send - sent if hub.rate is None else min(send - sent, 256 * 1024)
                    k = self.connection.sendfile(f, start + sent, piece)
                    if not k:
                        break
                    sent += k
                    if hub.rate is not None and (ahead := sent / hub.rate - (time.monotonic() - t0)) > 0:
                        time.sleep(ahead)
        finally:
            with hub._lock:
                hub.in_flight -= 1
        rec.body_bytes = sent
        if fault is not None or sent < n:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> None:
    """`python -m svd_probe.testing.fake_hub org/name=FOLDER ...`: serve folders until killed.

    Prints the endpoint on the first line. GET /_stats (or /_stats?reset) reports traffic.
    Running the stand-in in its own process keeps its Python work off the client's GIL.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m svd_probe.testing.fake_hub")
    ap.add_argument("repos", nargs="+", help="org/name=FOLDER")
    ap.add_argument("--cdn-host", default="localhost")
    args = ap.parse_args(argv)
    hub = FakeHub(cdn_host=args.cdn_host).start()
    for spec in args.repos:
        repo_id, folder = spec.split("=", 1)
        hub.add_repo(repo_id, folder)
    print(hub.endpoint, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
        sys.exit(0)


if __name__ == "__main__":
    main()
