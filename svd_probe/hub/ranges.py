"""Byte-range reads of checkpoint files: from the Hub (HTTP) or from a local folder (mmap).

Both backends answer the same two questions, so `CheckpointSource` has one code path:
`size(path)` and `read_many([(path, begin, end), ...]) -> [bytearray, ...]`.

The Hub backend speaks docs/reference.md §5 through huggingface_hub's shared HTTP client
(`get_session()`, httpx in huggingface_hub 1.x, httpx2 in 2.x): one `Range` per GET, redirects to
the signed CDN URL followed by hand (so the signed URL is reused for every later range of that
file and re-resolved when it expires), several requests in flight, nearby ranges coalesced,
large ranges split so that one big tensor still uses every connection.
"""

from __future__ import annotations

import email.utils
import importlib
import mmap
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

import numpy as np

from svd_probe.errors import (
    CorruptShardError,
    EntryNotFoundError,
    GatedRepoError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SvdProbeError,
    TransferError,
)

MiB = 1024 * 1024

_PASS_TOKEN = "pass a token: `--token hf_...`, set HF_TOKEN, or run `hf auth login`."
TOKEN_HINT = "Accept the model's terms on its Hub page if it is gated, then " + _PASS_TOKEN


def _httpx_module():
    """The httpx flavour huggingface_hub's session uses (httpx for hf 1.x, httpx2 for hf 2.x)."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.split(".")[0])


def hub_error(response, *, repo_id: str, revision: str, path: str | None, endpoint: str) -> SvdProbeError | None:
    """The typed error for a Hub error answer, or None when it is not one we know.

    Reads X-Error-Code first (what the Hub and huggingface_hub use); a bare 401/403 means the
    repo is private, gated or the token is wrong, which the Hub does not tell apart.
    """
    code = response.headers.get("X-Error-Code")
    status = response.status_code
    where = f"{repo_id} on {endpoint}"
    if code == "RepoNotFound" or (status == 401 and code is None):
        return RepoNotFoundError(
            f"repository {where} not found (HTTP {status})",
            "Check the repo id (aliases: `svd-probe models`). If the repo is private or gated, " + _PASS_TOKEN,
        )
    if code == "RevisionNotFound":
        return RevisionNotFoundError(
            f"revision {revision!r} not found in {where}",
            "Pass an existing branch, tag or 40-hex commit with --revision (default: main).",
        )
    if code == "EntryNotFound" or (status == 404 and path is not None):
        return EntryNotFoundError(
            f"file {path!r} not found in {where} at revision {revision!r}",
            "The checkpoint lacks a file its layout needs; check the repo and revision, or the mirror's copy.",
        )
    if code == "GatedRepo" or status in (401, 403):
        return GatedRepoError(f"access to {where} denied (HTTP {status}: gated or needs authentication)", TOKEN_HINT)
    if status == 404:
        return RepoNotFoundError(
            f"repository {where} not found (HTTP 404)", "Check the repo id and --endpoint / HF_ENDPOINT."
        )
    return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


@dataclass
class ReadStats:
    bytes_fetched: int = 0  # payload bytes received (headers, tensors and coalesced gaps)
    requests: int = 0  # range GETs sent, retries included
    retries: int = 0
    reresolves: int = 0  # signed URLs fetched again after they expired
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {
            "bytes_fetched": self.bytes_fetched,
            "requests": self.requests,
            "retries": self.retries,
            "reresolves": self.reresolves,
        }


def plan_reads(reqs: list[tuple[str, int, int]], max_gap: int, gap_fraction: float, chunk_size: int):
    """Group requests into spans per file, merging neighbours separated by small gaps.

    A gap is merged only while the wasted bytes stay under `gap_fraction` of the useful bytes of
    that file, so coalescing never costs more than a few percent of traffic (the 1.05× budget),
    and only if it is at most `max_gap` (merging saves a round trip, not bandwidth).
    Returns [(path, span_begin, span_end, [request indices])] and the chunks [(span_no, begin, end)].
    """
    by_path: dict[str, list[int]] = {}
    for i, (p, _b, _e) in enumerate(reqs):
        by_path.setdefault(p, []).append(i)
    spans: list[tuple[str, int, int, list[int]]] = []
    for p, idx in by_path.items():
        idx.sort(key=lambda i: (reqs[i][1], reqs[i][2]))
        useful = sum(reqs[i][2] - reqs[i][1] for i in idx)
        budget = gap_fraction * useful
        cur_b, cur_e, members = reqs[idx[0]][1], reqs[idx[0]][2], [idx[0]]
        for i in idx[1:]:
            b, e = reqs[i][1], reqs[i][2]
            gap = b - cur_e
            if gap <= 0 or (gap <= max_gap and gap <= budget):
                budget -= max(gap, 0)
                cur_e = max(cur_e, e)
                members.append(i)
            else:
                spans.append((p, cur_b, cur_e, members))
                cur_b, cur_e, members = b, e, [i]
        spans.append((p, cur_b, cur_e, members))
    chunks: list[tuple[int, int, int]] = []
    for s, (_, b, e, _) in enumerate(spans):
        pos = b
        while pos < e:
            end = min(e, pos + chunk_size)
            chunks.append((s, pos, end))
            pos = end
    return spans, chunks


def _assemble(reqs, spans, span_bufs) -> list[bytearray]:
    out: list[bytearray | None] = [None] * len(reqs)
    for (_p, sb, se, members), buf in zip(spans, span_bufs, strict=False):
        mv = memoryview(buf)
        for i in members:
            _, b, e = reqs[i]
            # The common case (a tensor read alone) hands over the span buffer without a copy.
            out[i] = buf if (b == sb and e == se and len(members) == 1) else bytearray(mv[b - sb : e - sb])
    return out  # type: ignore[return-value]


class HubFiles:
    """Range reads of the files of one Hub repo, pinned to one commit."""

    def __init__(
        self,
        endpoint: str,
        repo_id: str,
        commit: str,
        *,
        token: str | bool | None = None,
        concurrency: int = 8,
        max_gap: int = 1 * MiB,
        gap_fraction: float = 0.02,
        chunk_size: int = 16 * MiB,
        retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        revision: str | None = None,
    ):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.endpoint = endpoint.rstrip("/")
        self.repo_id = repo_id
        self.commit = commit
        self.revision = revision or commit
        self.concurrency = max(1, int(concurrency))
        self.max_gap = max_gap
        self.gap_fraction = gap_fraction
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.stats = ReadStats()
        self._session = get_session()
        self._httpx = importlib.import_module(type(self._session).__module__.split(".")[0])
        # build_hf_headers resolves token=None to HF_TOKEN or the stored login, as huggingface_hub users expect.
        self._headers = dict(build_hf_headers(token=token))
        self._headers["Accept-Encoding"] = "identity"  # byte ranges of the stored file, never of a compressed body
        self._signed: dict[str, str] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="svd-probe-range")

    # -- public -----------------------------------------------------------------------------------

    def resolve_url(self, path: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def size(self, path: str) -> int:
        if path not in self._sizes:
            # The size comes back in every Content-Range; a 1-byte read is the cheapest way to get it.
            self._fetch_into(path, 0, 1, memoryview(bytearray(1)))
        return self._sizes[path]

    def known_size(self, path: str) -> int | None:
        return self._sizes.get(path)

    def read_many(self, reqs: list[tuple[str, int, int]]) -> list:
        """Bytes [begin, end) of each (path, begin, end), as writable buffers (bytearray or uint8 array)."""
        real = [(i, r) for i, r in enumerate(reqs) if r[2] > r[1]]
        out: list[bytearray] = [bytearray() for _ in reqs]
        if not real:
            return out
        sub = [r for _, r in real]
        spans, chunks = plan_reads(sub, self.max_gap, self.gap_fraction, self.chunk_size)
        # np.empty, not bytearray: a bytearray is zero-filled first, which cost a third of the
        # time of a 400 MB read on the benchmark machine; every byte is overwritten anyway.
        bufs = [np.empty(e - b, dtype=np.uint8) for (_, b, e, _) in spans]
        views = [memoryview(b) for b in bufs]
        futs = [
            self._pool.submit(self._fetch_into, spans[s][0], b, e, views[s][b - spans[s][1] : e - spans[s][1]])
            for (s, b, e) in chunks
        ]
        try:
            for f in futs:
                f.result()
        finally:
            for f in futs:
                f.cancel()
        for (i, _), buf in zip(real, _assemble(sub, spans, bufs), strict=False):
            out[i] = buf
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one range, with retries ------------------------------------------------------------------

    def _url_for(self, path: str) -> str:
        with self._lock:
            return self._signed.get(path) or self.resolve_url(path)

    def _fetch_into(self, path: str, begin: int, end: int, mv: memoryview) -> None:
        """Fill `mv` with bytes [begin, end) of `path`, resuming after partial bodies."""
        done = 0
        attempt = 0
        redirects = 0
        reresolves = 0
        while done < end - begin:
            url = self._url_for(path)
            signed = url != self.resolve_url(path)
            try:
                done += self._one_get(path, url, signed, begin + done, end, mv[done:])
                continue
            except _Redirect as r:
                redirects += 1
                if redirects > 10:
                    raise TransferError(
                        f"too many redirects reading {path} from {self.repo_id}", "Check --endpoint / HF_ENDPOINT."
                    ) from None
                with self._lock:
                    self._signed[path] = r.location
                continue
            except _Expired:
                # A signed CDN URL lives about an hour; a long analysis outlives it. Ask the Hub again.
                reresolves += 1
                self.stats.add(reresolves=1)
                with self._lock:
                    if self._signed.get(path) == url:
                        del self._signed[path]
                if reresolves > 3:
                    raise TransferError(
                        f"the CDN keeps refusing freshly signed URLs for {path}", "Retry later; check the mirror."
                    ) from None
                continue
            except _Retryable as r:
                done += r.got if isinstance(r, _ShortBody) else 0
                attempt += 1
                if attempt > self.retries:
                    raise TransferError(
                        f"reading {path} of {self.repo_id} failed after {self.retries} retries: {r.reason}",
                        "Check the network or the mirror, then rerun: finished layers are cached.",
                    ) from None
                self.stats.add(retries=1)
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if r.wait is not None:
                    delay = max(delay, min(r.wait, 120.0))  # honour Retry-After (bounded)
                time.sleep(delay)
            except self._httpx.TransportError as e:  # dropped connection, reset, timeout
                attempt += 1
                if attempt > self.retries:
                    raise TransferError(
                        f"reading {path} of {self.repo_id} failed after {self.retries} retries: {type(e).__name__}: {e}",
                        "Check the network or the mirror, then rerun: finished layers are cached.",
                    ) from None
                self.stats.add(retries=1)
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))

    def _one_get(self, path: str, url: str, signed: bool, begin: int, end: int, mv: memoryview) -> int:
        headers = dict(self._headers)
        headers["Range"] = f"bytes={begin}-{end - 1}"
        if signed and urlparse(url).netloc != urlparse(self.endpoint).netloc:
            headers.pop("authorization", None)  # never send the Hub token to a CDN host
            headers.pop("Authorization", None)
        self.stats.add(requests=1)
        n = end - begin
        got = 0
        with self._session.stream("GET", url, headers=headers, follow_redirects=False, timeout=self.timeout) as r:
            st = r.status_code
            if st in (301, 302, 303, 307, 308) and "location" in r.headers:
                raise _Redirect(urljoin(url, r.headers["location"]))
            if signed and st in (401, 403, 410):
                raise _Expired()
            if st == 429 or st >= 500:
                raise _Retryable(f"HTTP {st}", _retry_after(r.headers.get("Retry-After")))
            if st == 416:
                raise CorruptShardError(
                    f"bytes {begin}-{end - 1} are past the end of the file (HTTP 416)",
                    file=path,
                    hint="The header promises more data than the file holds: the file is truncated.",
                )
            if st == 200:
                # The server ignored Range: reading on would download the whole shard.
                raise TransferError(
                    f"the server answered {path} with the whole file instead of a byte range",
                    "Use an endpoint that supports HTTP Range requests (the Hub and its mirrors do).",
                )
            if st != 206:
                r.read()
                err = hub_error(r, repo_id=self.repo_id, revision=self.revision, path=path, endpoint=self.endpoint)
                if err is not None:
                    raise err
                raise TransferError(
                    f"unexpected HTTP {st} reading {path} of {self.repo_id}", "Check --endpoint / HF_ENDPOINT."
                )
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if m and m.group(3) != "*" and int(m.group(3)) < end:
                # The server clipped the range to the file: a header promised bytes that are not there.
                raise CorruptShardError(
                    f"bytes {begin}-{end - 1} asked for, but the file has only {m.group(3)} bytes",
                    file=path,
                    hint="The file is truncated or its header is damaged; check the repo or the mirror's copy.",
                )
            if not m or int(m.group(1)) != begin or int(m.group(2)) != end - 1:
                raise _Retryable(f"bad Content-Range {r.headers.get('Content-Range')!r} for bytes {begin}-{end - 1}")
            if m.group(3) != "*":
                total = int(m.group(3))
                with self._lock:
                    self._sizes[path] = total
            cl = r.headers.get("Content-Length")
            if cl is not None and int(cl) != n:
                raise _Retryable(f"Content-Length {cl} for a {n}-byte range")
            try:
                for chunk in r.iter_bytes():
                    k = len(chunk)
                    if got + k > n:
                        raise _Retryable("body longer than the range asked for")
                    mv[got : got + k] = chunk
                    got += k
            except self._httpx.TransportError as e:
                self.stats.add(bytes_fetched=got)
                raise _ShortBody(f"connection dropped after {got} of {n} bytes ({type(e).__name__})", got) from None
        self.stats.add(bytes_fetched=got)
        if got < n:
            raise _ShortBody(f"short body: {got} of {n} bytes", got)
        return got


class _Redirect(Exception):
    def __init__(self, location: str):
        self.location = location


class _Expired(Exception):
    pass


class _ShortBody(_Retryable):
    def __init__(self, reason: str, got: int):
        super().__init__(reason)
        self.got = got


class LocalFiles:
    """The same reads on a local folder, through memory maps (the OS page cache does the I/O)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.stats = ReadStats()
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, path: str) -> mmap.mmap | None:
        with self._lock:
            if path not in self._maps:
                full = self.folder / path
                if not full.is_file():
                    raise EntryNotFoundError(
                        f"file {path!r} not found in {self.folder}", "The checkpoint folder is incomplete."
                    )
                if full.stat().st_size == 0:
                    return None
                with open(full, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._maps[path]

    def size(self, path: str) -> int:
        full = self.folder / path
        if not full.is_file():
            raise EntryNotFoundError(
                f"file {path!r} not found in {self.folder}", "The checkpoint folder is incomplete."
            )
        return full.stat().st_size

    def known_size(self, path: str) -> int | None:
        return self.size(path)

    def read_many(self, reqs: list[tuple[str, int, int]]) -> list[bytearray]:
        out = []
        for p, b, e in reqs:
            if e <= b:
                out.append(bytearray())
                continue
            mm = self._map(p)
            if mm is None or e > len(mm):
                raise CorruptShardError(
                    f"bytes {b}-{e - 1} are past the end of the file", file=p, hint="The file is truncated."
                )
            out.append(bytearray(mm[b:e]))  # a copy: the tensor must outlive the map
            self.stats.add(bytes_fetched=e - b, requests=1)
        return out

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                mm.close()
            self._maps.clear()
