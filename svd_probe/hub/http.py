"""The one HTTP edge: every request svd-probe sends to a Hub (or a mirror) goes through here.

Owned here, once each:

- **The client.** huggingface_hub's shared session (`get_session()`), so that a user's
  `set_client_factory` (proxies, certificates) and `HF_HUB_OFFLINE` apply to us too. From 2.0 on
  (the floor in pyproject.toml) huggingface_hub builds it on httpx2, which this module imports.
- **The retry policy.** `HttpPolicy` + `with_retries`: transport errors, 408/429/5xx and stalls
  are retried with capped, jittered exponential backoff (Retry-After honoured, bounded); a
  request that got no answer at all while opening a checkpoint (refused, DNS, a timeout, a
  stall) gets `connect_retries` only, so an unreachable Hub is reported in about a second
  (refused: 1.2 s measured with the defaults), not after minutes of backoff.
- **The deadline.** httpx2's timeouts apply between bytes, so a server that trickles one byte a
  second (headers or body) would hold a request forever. Every request therefore runs under an
  overall deadline, `max(deadline, bytes / min_rate)`: by default at least 60 s, and one second
  per MB beyond (a 16 MiB chunk: 60 s; a 64 MiB index: 67 s). A HEAD is one round trip and a
  16 MiB chunk takes seconds on any link that can stream a checkpoint at all; a request still
  unfinished after a minute, or going at under 1 MB/s, is stalled, not slow. A stall costs
  little: bytes already received are kept and the retry asks only for the rest. httpx2 has no
  total timeout and a blocking socket read cannot be interrupted safely from another thread, so
  `within_deadline` runs the request in a daemon thread and stops waiting for it; the abandoned
  request may no longer write anything (see `ranges._Fill`; a small-file download drops its
  connection at the next bytes that arrive: `_Budget`) and ends when the server gives up or the
  process exits. The extra thread per request is lost in the noise: 240 range GETs of 4 KiB
  on loopback took 2.89-2.91 s, against 2.78-3.00 s with the former in-thread reads (best of 5,
  two runs each).
- **The token rule.** The Hub token goes only to the endpoint's own origin (scheme, host, port):
  `headers_for` strips it from a request to any other origin (a signed CDN URL, a mirror's
  storage). The commit is resolved by huggingface_hub's `get_hf_file_metadata`, and config.json
  and the index are fetched by its `hf_hub_download`. Both follow redirects, token included, to
  the same origin and to every origin huggingface_hub counts as a Hub (huggingface.co, hf.co,
  HF_ENDPOINT, the staging Hub), so from an `--endpoint` mirror a redirect to one of those took
  the mirror's token along. Those calls therefore carry `token_home(endpoint)`, a header that a
  request hook on the shared session (`_keep_token_home`) removes before anything is sent,
  stripping the token from every request, redirects included, whose origin is not the
  endpoint's. It is a hook, not a redirect loop of our own, because huggingface_hub's calls (its
  metadata parsing, its cache, its hooks) are what we want to keep; huggingface_hub adds its own
  request IDs the same way.
- **The small-file bound.** `hf_hub_download` writes whatever a GET sends into HF_HOME and compares
  the size with the HEAD's only at the end: a HEAD saying 30 bytes and a GET without end put
  588 MiB in HF_HOME within a 2 s deadline, and the abandoned thread went on writing (998 MiB 3 s
  later). `download` therefore gives each attempt a byte budget (`_Budget`, its `max_bytes`) that
  the hooks on the shared session enforce on every answer to its requests, redirects included:
  at most `max_bytes` reach huggingface_hub, then `MalformedFileError` (see `_take_budget`).
- **The error map.** huggingface_hub's typed errors (it reads `X-Error-Code` first) become ours in
  `typed_error`; a raw error answer of a range read goes through `hf_raise_for_status` first, so
  both kinds take the same map. Readers above this module never see a status code.
- **Offline.** `is_offline()` is huggingface_hub's `HF_HUB_OFFLINE`; `offline_error` and the
  unreachable case are one error class, `HubUnreachableError`, raised at once.

What huggingface_hub lacks (partial-body resume, signed-URL reuse and re-resolution, range
coalescing, several requests in flight) lives in `ranges.py`, on top of this module.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2

from svd_probe.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HubUnreachableError,
    MalformedFileError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SvdProbeError,
    TransferError,
)

T = TypeVar("T")

_PASS_TOKEN = "pass a token: `--token hf_...`, set HF_TOKEN, or run `hf auth login`."
TOKEN_HINT = "Accept the model's terms on its Hub page if it is gated, then " + _PASS_TOKEN
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_ERROR_BODY_LIMIT = 64 * 1024  # an error answer's body is read this far, never further
_NETWORK_HINT = "Check the network, or set --endpoint / HF_ENDPOINT to a reachable mirror."


def session() -> httpx2.Client:
    """huggingface_hub's shared HTTP client (honours its client factory, proxies and offline mode)."""
    from huggingface_hub.utils import get_session

    s = get_session()
    _widen_reads()
    _install_hooks(s)
    return s


#: The header that names, on a request huggingface_hub sends for us, the endpoint its token is
#: meant for. `_keep_token_home` removes it before the request leaves the process.
TOKEN_HOME = "x-svd-probe-token-home"
_GUARD_LOCK = threading.Lock()


def token_home(endpoint: str) -> dict[str, str]:
    """Headers for a huggingface_hub call on `endpoint`'s behalf: the token stays on its origin."""
    return {TOKEN_HOME: endpoint}


def _keep_token_home(request: Any) -> None:
    """A request hook: the token only where the request's origin is its endpoint's (see above)."""
    home = request.headers.pop(TOKEN_HOME, None)
    if home is not None and origin(str(request.url)) != origin(home):
        request.headers.pop("authorization", None)


def _install_hooks(client: Any) -> None:
    """Install our hooks on `client` once (a client factory may build a new one): `_keep_token_home`
    and `_take_budget` on its requests, `_bound_answer` on its answers."""
    with _GUARD_LOCK:
        hooks = dict(client.event_hooks)
        for kind, ours in (("request", (_keep_token_home, _take_budget)), ("response", (_bound_answer,))):
            have = list(hooks.get(kind, []))
            hooks[kind] = have + [hook for hook in ours if hook not in have]
        if hooks != client.event_hooks:
            client.event_hooks = hooks


# --- the byte budget of a small-file download -----------------------------------------------------
#
# How the bound is enforced, and why so. huggingface_hub offers no size limit for `hf_hub_download`:
# `http_get` writes each chunk of the body and compares the total with the expected size after
# the last one. Of the ways in:
# - a `tqdm_class` whose update() raises past the limit: update() comes per DOWNLOAD_CHUNK_SIZE
#   (10 MiB) chunk, never for the body of a redirect or an error answer (which httpx2 and
#   hf_raise_for_status read whole into memory), nor for hf_xet's downloads.
# - hooks on the shared session (httpx2 copies a request's `extensions` to the request of each
#   redirect it follows): every answer's body, socket read by socket read, before any of it
#   reaches huggingface_hub.
# So the hooks. Which requests they bound is named by a header that `download` passes to
#   hf_hub_download (huggingface_hub sends a call's `headers` on its HEAD and its GET, as it does
#   `token_home`'s): not a URL, which a redirect to a CDN changes and which the user's own calls
#   may share, and not every GET of the shared session (a global cap), which is also the user's
#   client for their own huggingface_hub calls: a cap there would break their large downloads.
#   A Range GET is bounded too: huggingface_hub resumes within a call after a dropped
#   connection, with `Range: bytes=N-`.
# The budget covers one attempt (one hf_hub_download call): all the bytes of all its answers,
# and for a 206 answer to `Range: bytes=N-`, N + its bytes, so that neither what arrives nor a
# file in HF_HOME exceeds `max_bytes`. Measured (a HEAD of 30 bytes, a GET without end at
# 100 MiB/s, 2 s deadline): before, 178 MiB in HF_HOME at the error and 450 MiB 3 s later; now
# MalformedFileError after 0.2 s (config) / 0.7 s (index), at most 0 / 60 MiB in HF_HOME while it
# ran (huggingface_hub writes 10 MiB chunks), and 0 after the error (huggingface_hub 2.5 deletes
# its temporary file), the connection dropped.

#: The header naming, on a request huggingface_hub sends for `download`, the budget of its answers
#: (a key of `_BUDGETS`); `_take_budget` moves the budget into the request's extensions and removes
#: the header before the request leaves the process.
BUDGET = "x-svd-probe-budget"
_BUDGET_KEY = "svd_probe.budget"
_BUDGETS: dict[str, _Budget] = {}
_RANGE_START = re.compile(r"\s*bytes\s*=\s*(\d{1,20})\s*-")
#: huggingface_hub reads these to send a download to hf_xet, a client of its own (in Rust) that no
#: hook of ours reaches. config.json and an index are small Git files on the Hub (not LFS, so not
#: Xet), and the Hub serves a Xet file over plain HTTP too (huggingface_hub's fallback without
#: hf_xet): a budgeted answer loses them, and the download stays on the session, under the budget.
_XET_HEADERS = ("X-Xet-Hash", "X-Xet-Refresh-Route")


class _Cut(Exception):
    """Ends the requests of an attempt that `within_deadline` gave up on (nobody reads it)."""


@dataclass
class _Budget:
    """The bytes that one attempt of `download` may receive (see above)."""

    what: str  # "config.json of org/name"
    limit: int
    received: int = 0
    abandoned: bool = False

    def abandon(self) -> None:
        self.abandoned = True

    def charge(self, n: int, offset: int) -> None:
        """Count `n` more bytes, which would end at `offset + n` of the file; raise before they
        are handed on if the attempt was abandoned or they go past the limit."""
        if self.abandoned:
            raise _Cut(f"{self.what}: abandoned")
        self.received += n
        if self.received > self.limit or offset + n > self.limit:
            raise MalformedFileError(
                f"{self.what} is over the {self.limit}-byte ({self.limit >> 20} MiB) limit for it: the server "
                f"sent more, and the download was stopped there",
                "The endpoint sends more than the file it announced; check --endpoint / HF_ENDPOINT.",
                file=self.what,
            )


def _take_budget(request: Any) -> None:
    """A request hook: a request of `download`'s carries its budget along (redirects included)."""
    key = request.headers.pop(BUDGET, None)
    if key is not None:
        budget = _BUDGETS.get(key)
        if budget is None:  # its download has returned: nothing more may be asked for it
            raise _Cut("a request of a finished download")
        request.extensions = {**request.extensions, _BUDGET_KEY: budget}
    budget = request.extensions.get(_BUDGET_KEY)
    if budget is not None and budget.abandoned:  # the abandoned thread sends nothing more
        raise _Cut(f"{budget.what}: abandoned")


def _bound_answer(response: Any) -> None:
    """A response hook: the body of an answer to a budgeted request is counted as it arrives."""
    budget = response.request.extensions.get(_BUDGET_KEY)
    if budget is None:
        return
    for name in _XET_HEADERS:
        response.headers.pop(name, None)
    m = _RANGE_START.match(response.request.headers.get("Range", ""))
    offset = int(m.group(1)) if m and response.status_code == 206 else 0  # a 200 starts the file over
    response.stream = _BudgetedStream(response.stream, budget, offset)


class _BudgetedStream(httpx2.SyncByteStream):
    """A response body that charges each piece to a `_Budget` before handing it on (a
    `SyncByteStream`: httpx2 checks a body is one)."""

    def __init__(self, inner: Any, budget: _Budget, offset: int) -> None:
        self._inner = inner
        self._budget = budget
        self._offset = offset

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._inner:
            self._budget.charge(len(piece), self._offset)
            self._offset += len(piece)
            yield piece

    def close(self) -> None:
        self._inner.close()


#: The socket read size of httpcore2's HTTP/1.1 connections. httpcore2 reads a body 64 KiB per
#: `recv()`, and for each piece h11 and httpx2 do Python work with the GIL held: 2.5 client CPU s
#: per GB of range bodies on the dev VM, which `analyze` pays on the interpreter that also
#: launches the GPU work. Range bodies are 16 MiB, so svd-probe raises it to 1 MiB: 1.0-1.2 CPU s
#: per GB and 2-2.5× the loopback throughput at 8 in flight; 4 MiB gains nothing more
#: (benchmarks/README.md, "Read size, width and the stand-in's TCP_NODELAY"). `recv()` returns
#: what the socket holds, so small answers are unaffected. httpcore2 has no per-client option for
#: it, only this class attribute (httpcore's maintainers tuned it from 4 to 64 KiB in
#: encode/httpcore#136), so it is set once, process-wide, and never lowered.
READ_SIZE = 1 << 20


@functools.cache
def _widen_reads() -> None:
    # Imported here, with the session: a local checkpoint's reads never load the transport.
    import httpcore2

    if httpcore2.HTTP11Connection.READ_NUM_BYTES < READ_SIZE:
        httpcore2.HTTP11Connection.READ_NUM_BYTES = READ_SIZE


# --- policy, retries, deadline -------------------------------------------------------------------


@dataclass(frozen=True)
class HttpPolicy:
    """How hard and how long to try. Every field can be passed to `open_checkpoint` by name.

    retries: attempts after the first, for transport errors, 408/429/5xx, stalls, short bodies.
    connect_retries: while opening a checkpoint, attempts after the first when nothing answered
        at all (refused, DNS, a timeout, a stall): a dead endpoint is reported in about a second.
        An HTTP answer (429, 5xx) still gets `retries`.
    backoff, max_backoff: the first wait and the cap of the doubling waits (jittered to 50-100%).
    max_retry_after: the longest Retry-After honoured.
    timeout: seconds without a byte (connect, read, write) before a request fails.
    deadline, min_rate: a request must finish within max(deadline, bytes / min_rate) seconds.
    """

    retries: int = 8
    connect_retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    timeout: float = 60.0
    deadline: float = 60.0
    min_rate: float = 1e6

    @classmethod
    def split(cls, options: dict) -> tuple[HttpPolicy, dict]:
        """(the policy named by `options`, the options that are not policy fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {
            k: v for k, v in options.items() if k not in names
        }

    def deadline_for(self, nbytes: int = 0) -> float:
        return max(self.deadline, nbytes / self.min_rate)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d

    def client_timeout(self) -> Any:
        return httpx2.Timeout(self.timeout, connect=min(self.timeout, 10.0))


class Retry(Exception):
    """A transient failure of one attempt: `with_retries` waits and tries again."""

    def __init__(self, reason: str, *, wait: float | None = None, url: str | None = None, unanswered: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.wait = wait
        self.url = url
        self.unanswered = unanswered  # no HTTP answer at all (not a 429/5xx, not a cut body)


def with_retries(
    attempt: Callable[[], T],
    policy: HttpPolicy,
    *,
    what: str,
    url: str,
    give_up: Callable[[str, str], SvdProbeError] | None = None,
    connect_retries: int | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Call `attempt()` until it returns, retrying transient failures as `policy` says.

    `attempt` raises `Retry` (or lets an httpx2 transport error through) for what may pass, and a
    typed `SvdProbeError` for what will not. After the last retry, `give_up(message, hint)` makes
    the error (default: TransferError). `connect_retries` (when given) bounds the attempts at which
    nothing answered at all. The message names the URL without its query (signatures, tokens).
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    failures = 0
    while True:
        try:
            return attempt()
        except Retry as r:
            failure = r
        except OfflineModeIsEnabled:
            raise offline_error(url) from None
        except httpx2.TooManyRedirects:
            raise TransferError(
                f"{what}: redirect loop at {redact(url)}", "The endpoint redirects in circles; check --endpoint."
            ) from None
        except httpx2.TransportError as e:
            failure = Retry(
                f"{type(e).__name__}: {e}",
                url=_url_of(e) or url,
                unanswered=True,  # a transport error that reaches here came before any answer
            )
        failures += 1
        limit = connect_retries if (failure.unanswered and connect_retries is not None) else policy.retries
        if failures > limit:
            message = f"{what} failed after {failures - 1} retries: {failure.reason} ({redact(failure.url or url)})"
            raise (give_up or TransferError)(message, _NETWORK_HINT) from None
        if on_retry is not None:
            on_retry()
        time.sleep(policy.delay(failures, failure.wait))


def within_deadline(
    fn: Callable[[], T], seconds: float, *, url: str, on_abandon: Callable[[], None] | None = None
) -> T:
    """`fn()`, or `Retry` if it has not returned within `seconds`.

    `fn` runs in a daemon thread, which is left behind on a stall (a blocking read cannot be
    interrupted safely); `on_abandon` is called first, to fence off what it may still write.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="svd-probe-http", daemon=True).start()
    if not done.wait(seconds):
        if on_abandon is not None:
            on_abandon()
        raise Retry(f"no complete answer within {seconds:g} s (stalled)", url=url, unanswered=True)
    if "error" in box:
        raise box["error"]
    return box["value"]


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delay-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# --- URLs and the token rule ---------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `url`, with the scheme's default port; port -1 (no origin's) where
    urllib cannot read it. `http://h:+8080/` is one: urllib refuses the port and httpx2 reads 8080,
    so taking the default port there made a redirect to another port look like the endpoint's
    origin, and the token went with it."""
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        return p.scheme.lower(), (p.hostname or "").lower(), -1
    return p.scheme.lower(), (p.hostname or "").lower(), port or _DEFAULT_PORTS.get(p.scheme.lower(), 0)


def redact(url: str) -> str:
    """`url` without credentials, query or fragment: safe to print (signed URLs carry secrets)."""
    p = urlsplit(url)
    host = p.hostname or ""
    try:
        port = f":{p.port}" if p.port else ""
    except ValueError:
        port = ""
    return f"{p.scheme}://{host}{port}{p.path}" if p.scheme else p.path


def hub_headers(token: str | bool | None) -> dict[str, str]:
    """Headers for requests to the Hub: huggingface_hub's (user agent, token: `token`, else HF_TOKEN
    or the stored login), and `Accept-Encoding: identity` (byte ranges of the stored file)."""
    from huggingface_hub.utils import build_hf_headers

    from svd_probe.errors import BadOptionError

    if isinstance(token, str) and not (token.isascii() and token.isprintable() and " " not in token):
        # httpx2 refuses such a header with the token in its message, which reached the user;
        # neither the message nor the hint may show it.
        raise BadOptionError(
            "--token holds a space, a line break or a character outside printable ASCII",
            "Pass the token itself (hf_...), without quotes or a trailing newline.",
        )
    headers = dict(build_hf_headers(token=token))
    headers["Accept-Encoding"] = "identity"
    return headers


def headers_for(url: str, headers: dict[str, str], endpoint: str) -> dict[str, str]:
    """`headers` for a request to `url`: the token only where `url` is on the endpoint's origin."""
    if origin(url) == origin(endpoint):
        return dict(headers)
    return {k: v for k, v in headers.items() if k.lower() != "authorization"}


def _url_of(e: Exception) -> str | None:
    """The URL an httpx2 or huggingface_hub error was about, when it says."""
    for holder in (e, getattr(e, "response", None)):
        try:
            return str(holder.request.url)  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):  # httpx2 raises RuntimeError when no request is set
            continue
    return None


# --- errors --------------------------------------------------------------------------------------


def is_offline() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE, read when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def offline_error(url: str, repo_id: str | None = None) -> HubUnreachableError:
    """The error for offline mode: `url` (a request's URL or the endpoint) and the repo, if known."""
    target = redact(url) + (f" for {repo_id}" if repo_id else "")
    return HubUnreachableError(
        f"offline mode is on (HF_HUB_OFFLINE): not asking {target}",
        "Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to read from the Hub.",
        offline=True,
    )


def unreachable(message: str, hint: str) -> HubUnreachableError:
    """`give_up` for the requests that open a checkpoint: no answer means the Hub is unreachable."""
    return HubUnreachableError(message, hint, offline=False)


def typed_error(e: Exception, *, repo_id: str, revision: str, path: str | None, endpoint: str) -> SvdProbeError | None:
    """Our error for one of huggingface_hub's (or None: transient, or not one we know).

    huggingface_hub has already read X-Error-Code; what it leaves generic is told apart by status
    like the Hub does: a bare 401 is a missing repo or a private one, 403 a gated one.
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id} on {endpoint}"
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(e, hf.OfflineModeIsEnabled):
        return offline_error(endpoint, repo_id)
    if isinstance(e, hf.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return GatedRepoError(f"access to {where} denied (HTTP {status}: gated or needs authentication)", TOKEN_HINT)
    if isinstance(e, hf.RepositoryNotFoundError) or (isinstance(e, hf.HfHubHTTPError) and status == 401):
        return RepoNotFoundError(
            f"repository {where} not found (HTTP {status})",
            "Check the repo id (aliases: `svd-probe models`). If the repo is private or gated, " + _PASS_TOKEN,
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"revision {revision!r} not found in {where}",
            "Pass an existing branch, tag or 40-hex commit with --revision (default: main).",
        )
    remote_missing = isinstance(e, hf.EntryNotFoundError) and not isinstance(e, hf.LocalEntryNotFoundError)
    if remote_missing or (isinstance(e, hf.HfHubHTTPError) and status == 404 and path is not None):
        return EntryNotFoundError(
            f"file {path!r} not found in {where} at revision {revision!r}",
            "The checkpoint lacks a file its layout needs; check the repo and revision, or the mirror's copy.",
        )
    if isinstance(e, hf.HfHubHTTPError) and status == 403:
        return GatedRepoError(f"access to {where} denied (HTTP 403: gated or needs authentication)", TOKEN_HINT)
    if isinstance(e, hf.HfHubHTTPError) and status == 404:
        return RepoNotFoundError(
            f"repository {where} not found (HTTP 404)", "Check the repo id and --endpoint / HF_ENDPOINT."
        )
    return None


def error_for_response(
    response: Any, *, repo_id: str, revision: str, path: str | None, endpoint: str
) -> SvdProbeError | None:
    """Our error for an error answer read by hand (a range read): through huggingface_hub's
    `hf_raise_for_status`, then `typed_error`. Reads at most 64 KiB of the (streamed) body."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import hf_raise_for_status

    body = bytearray()
    try:
        for chunk in response.iter_bytes():
            body += chunk[: _ERROR_BODY_LIMIT - len(body)]
            if len(body) >= _ERROR_BODY_LIMIT:
                break
    except httpx2.HTTPError:
        pass
    detached = httpx2.Response(
        response.status_code,
        headers=[
            (k, v) for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")
        ],
        content=bytes(body),
        request=response.request,
    )
    try:
        hf_raise_for_status(detached)
    except HfHubHTTPError as e:
        return typed_error(e, repo_id=repo_id, revision=revision, path=path, endpoint=endpoint)
    return None


def _transient_status(e: Exception) -> Retry | None:
    response = getattr(e, "response", None)
    if response is None or response.status_code not in RETRY_STATUSES:
        return None
    return Retry(f"HTTP {response.status_code}", wait=retry_after(response.headers.get("Retry-After")), url=_url_of(e))


# --- the two huggingface_hub calls: metadata (HEAD) and small-file download ---------------------


def file_metadata(
    repo_id: str,
    path: str,
    *,
    revision: str,
    token: str | bool | None,
    endpoint: str,
    policy: HttpPolicy,
    label: str | None = None,
) -> Any:
    """huggingface_hub's `get_hf_file_metadata` of `path` at `revision`, under our retries and
    deadline; errors typed. `label` is the revision named in messages (default `revision`).

    Returns the `HfFileMetadata` (commit_hash, etag, size, location).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    if is_offline():
        raise offline_error(url)

    def head() -> Any:
        try:
            session()  # the token guard on the client huggingface_hub is about to use
            return get_hf_file_metadata(
                url, token=token, timeout=policy.timeout, endpoint=endpoint, headers=token_home(endpoint)
            )
        except HfHubHTTPError as e:
            raise _transient_status(e) or _typed_or_generic(
                e, repo_id, label or revision, path, endpoint, url
            ) from None
        except (ValueError, httpx2.InvalidURL):
            # huggingface_hub follows the redirects of a HEAD itself: urllib, httpx2 and the
            # resolver raise ValueError, InvalidURL or UnicodeError (a ValueError) for a Location
            # that is no URL one can request (`http://[::1/x`, a 300-letter host name).
            raise TransferError(
                f"{redact(url)} answered with a malformed redirect or header", "Check --endpoint / HF_ENDPOINT."
            ) from None

    return with_retries(
        lambda: within_deadline(head, policy.deadline_for(0), url=url),
        policy,
        what=f"asking {endpoint} for {path} of {repo_id}",
        url=url,
        give_up=unreachable,
        connect_retries=policy.connect_retries,
    )


def download(
    repo_id: str,
    path: str,
    *,
    commit: str,
    token: str | bool | None,
    endpoint: str,
    policy: HttpPolicy,
    max_bytes: int,
    label: str | None = None,
) -> Path:
    """huggingface_hub's `hf_hub_download` of a small file pinned to `commit` (cached in HF_HOME
    as usual), under our retries and a deadline sized for `max_bytes`; errors typed. At most
    `max_bytes` of its answers are received (`_Budget`): past that, `MalformedFileError`."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download, hf_hub_url

    url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint)
    what = f"{path} of {repo_id}"

    def get(budget: _Budget) -> Path:
        key = uuid.uuid4().hex
        _BUDGETS[key] = budget
        try:
            # Pinned to the commit: a branch moving during the run cannot mix two checkpoints.
            session()  # the token guard and the budget's hooks, as in file_metadata
            return Path(
                hf_hub_download(
                    repo_id,
                    path,
                    revision=commit,
                    token=token,
                    endpoint=endpoint,
                    etag_timeout=policy.timeout,
                    headers={**token_home(endpoint), BUDGET: key},
                )
            )
        except hf.LocalEntryNotFoundError as e:
            # Not cached, and the Hub could not be asked: huggingface_hub says why in the cause.
            cause = e.__cause__ or e.__context__
            if isinstance(cause, hf.OfflineModeIsEnabled):
                raise offline_error(url) from None
            if isinstance(cause, httpx2.TransportError):
                raise Retry(f"{type(cause).__name__}: {cause}", url=url, unanswered=True) from None
            raise TransferError(f"could not fetch {path} of {repo_id} from {endpoint}: {e}", _NETWORK_HINT) from None
        except hf.HfHubHTTPError as e:
            raise _transient_status(e) or _typed_or_generic(e, repo_id, label or commit, path, endpoint, url) from None
        except (SvdProbeError, Retry, hf.OfflineModeIsEnabled, httpx2.TransportError, httpx2.TooManyRedirects):
            raise
        except Exception as e:  # a cache that is not writable, a size mismatch: say so, no traceback
            raise TransferError(
                f"could not fetch {path} of {repo_id} from {endpoint}: {type(e).__name__}: {e}",
                "Check the network, --endpoint / HF_ENDPOINT, and that HF_HOME is writable.",
            ) from None
        finally:
            _BUDGETS.pop(key, None)

    def attempt() -> Path:
        budget = _Budget(what, max_bytes)  # one per attempt: an abandoned one ends with its thread
        return within_deadline(lambda: get(budget), policy.deadline_for(max_bytes), url=url, on_abandon=budget.abandon)

    return with_retries(
        attempt,
        policy,
        what=f"fetching {what}",
        url=url,
        give_up=unreachable,
        connect_retries=policy.connect_retries,
    )


def _typed_or_generic(e: Exception, repo_id: str, revision: str, path: str, endpoint: str, url: str) -> SvdProbeError:
    err = typed_error(e, repo_id=repo_id, revision=revision, path=path, endpoint=endpoint)
    if err is not None:
        return err
    status = getattr(getattr(e, "response", None), "status_code", "?")
    return TransferError(f"HTTP {status} for {redact(url)}", "Check --endpoint / HF_ENDPOINT.")
