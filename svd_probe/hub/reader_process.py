"""Range reads from a Hub in a process of their own (`open_checkpoint(..., reader="process")`).

Why: the HTTP client's Python work (httpx2, h11, the copy of each body into its buffer) holds the
GIL of the process it runs in. `analyze` launches its GPU work from that same interpreter, and
every reader thread contends with the launching thread each time it lets go of the GIL for a
kernel. On the dev VM, a thread issuing small torch ops ran at 1-3% of its speed while 8 requests
were in flight, at 6-12% with 2, and at 89% beside this process reader (benchmarks/README.md,
"Read size, width and the stand-in's TCP_NODELAY": what the reads cost a thread of small ops).
Here the reads run in a child process with its own GIL.

How:
- The child process runs one `HubFiles`, which keeps the same retries, deadlines, token rule and
  width rule.
- The child fills each call's spans into one memfd (anonymous shared memory, Linux), its arena,
  grown to the largest call and reused by every later one. It passes the descriptor over the
  pipe (SCM_RIGHTS) when the arena grows.
- The parent keeps the arena mapped and copies each span out of it into a buffer of its own
  before the next call may start, since the caller owns what `read_many` returns for as long as it
  likes. A fresh memfd per call, handed out as views, was slower: shared memory gets no
  transparent huge pages by default, so each of its 4 KiB pages costs a fault and zeroing on first
  write, and the child read at half the threads' speed (0.47 against 0.89 GB/s on one H200,
  benchmarks/README.md); the copy out of warm pages runs at memory speed, without the GIL.
- Errors come back pickled and are raised in the parent; `SvdProbeError` pickles its fields.
- The child ignores Ctrl-C. The parent stops it on `close()`; when the parent exits, its socket
  closes and the child ends after the call in hand (its requests are bounded by their deadlines).
- Memory: the arena holds the largest single call (one layer's attention tensors: 187 MB for
  DeepSeek-V3), rounded up to 16 MiB, in shared memory beside the parent's own buffers.

No library does this: multiprocessing's shared_memory needs a name in /dev/shm, which containers
often size at 64 MB, and its lifetime is manual; a memfd has neither limit.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from svd_probe.errors import BadOptionError, TransferError
from svd_probe.hub.ranges import HubFiles, ReadStats, read_through

_DIED = "the reader process ended unexpectedly (killed, or out of memory)"
_DIED_HINT = "Rerun: finished layers are cached."
_START_HINT = "Read in threads (--reader thread, or reader='thread')."


class ReaderStartError(TransferError):
    """The reader process did not come up (no interpreter to run it with, or one that cannot
    import svd_probe, as in a frozen app): `reader="auto"` reads in threads instead."""


READERS = ("auto", "thread", "process")  # `open_checkpoint(reader=...)`, `analyze --reader`


def refuse_unusable() -> None:
    """Raise `BadOptionError` where a reader process cannot run: off Linux (no memfds)."""
    if not (sys.platform.startswith("linux") and hasattr(os, "memfd_create")):
        raise BadOptionError("reader='process' needs Linux (memfd_create)", "Use the default reader (threads).")


def usable() -> bool:
    """Whether a reader process can run here (`refuse_unusable` raises nothing)."""
    try:
        refuse_unusable()
    except BadOptionError:
        return False
    return True


def pick_reader(reader: str, device_type: str) -> str:
    """The reader `analyze` asks `open_checkpoint` for: "thread" or "process" as given, and
    "auto" where the GPU computes: the process where one can run, else threads (the process
    leaves the GIL to the thread that launches the kernels: over HTTP on one H200, 62
    DeepSeek-V3 layers took 36.2-36.6 s against 40.5-41.2 s with threads, benchmarks/README.md,
    "The reader process"). On the CPU "auto" is threads: the spectra are LAPACK calls that let
    go of the GIL anyway, and a process costs a start."""
    if reader not in READERS:
        raise BadOptionError(f"unknown reader {reader!r}", "Use auto, thread or process.")
    return "thread" if reader == "auto" and device_type != "cuda" else reader


class ProcessFiles:
    """`HubFiles` in a child process, with the same interface: size, known_size, read_many,
    stats, close. One call runs at a time over the pipe. Each call's requests still go out in
    parallel inside the child."""

    reader = "process"

    def __init__(self, endpoint: str, repo_id: str, commit: str, **options: Any):
        refuse_unusable()
        # A plain subprocess, not multiprocessing's spawn: spawn imports the parent's main script
        # in the child (the svd-probe CLI's typer and rich: 0.78 s on the dev VM against 0.14 s, for nothing) and
        # runs it again if it works at import. Its own session keeps the terminal's Ctrl-C to the
        # parent. The options (the token among them) go over the socket, never on a command line.
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The child imports from the parent's sys.path (as spawn does), so it runs this same
        # svd_probe even where a script put it on the path by hand.
        code = f"import sys; sys.path[:] = {sys.path!r}; from svd_probe.hub.reader_process import _main; _main({theirs.fileno()})"
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:  # no interpreter at sys.executable
            mine.close()
            raise ReaderStartError(
                f"reading from {repo_id}: the reader process did not start ({e})", _START_HINT
            ) from e
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.RLock()
        self._arena: mmap.mmap | None = None  # the child's arena, mapped here
        self._broken = False  # the pipe is out of step (an interrupted call) or the child is gone
        self.stats = ReadStats()
        self._sizes: dict[str, int] = {}
        self.endpoint, self.repo_id, self.commit = endpoint, repo_id, commit
        try:
            self._conn.send((endpoint, repo_id, commit, options))
        except OSError:  # the child is gone already
            self._broken = True
        try:
            self._call("hello")  # raises what the child's HubFiles raised, if anything
        except TransferError as e:
            self.close()
            if self._broken:  # the child never answered
                raise ReaderStartError(f"reading from {repo_id}: the reader process did not start", _START_HINT) from e
            raise
        except BaseException:
            self.close()
            raise

    def size(self, path: str) -> int:
        return self._call("size", path)[0]

    def known_size(self, path: str) -> int | None:
        return self._sizes.get(path)

    def read_many(self, reqs: list[tuple[str, int, int]]) -> list:
        """Bytes [begin, end) of each (path, begin, end), as writable buffers (see `HubFiles`)."""
        return read_through(reqs, self._read_spans)

    def _read_spans(self, reqs: list[tuple[str, int, int]]) -> tuple[list, list]:
        with self._lock:  # the child refills the arena on the next call: copy out first
            (spans, places), fds = self._call("read", reqs)
            if fds:  # the arena grew: map it again
                try:
                    old, self._arena = self._arena, mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
                finally:
                    os.close(fds[0])
                if old is not None:
                    old.close()
            arena = self._arena
            bufs = []
            for off, n in places:
                if arena is None or off + n > len(arena):  # never, unless the child is out of step
                    self._broken = True
                    raise TransferError(f"reading from {self.repo_id}: {_DIED}", _DIED_HINT)
                buf = np.empty(n, dtype=np.uint8)
                np.copyto(buf, np.frombuffer(arena, dtype=np.uint8, count=n, offset=off))
                bufs.append(buf)
            return spans, bufs

    def close(self) -> None:
        with self._lock:
            if self._proc.poll() is None:
                try:
                    self._conn.send(("close", ()))
                except OSError:
                    pass
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._conn.close()
            if self._arena is not None:
                self._arena.close()
                self._arena = None

    def _call(self, op: str, *args: Any) -> tuple[Any, list[int]]:
        with self._lock:
            if self._broken:
                raise TransferError(f"reading from {self.repo_id}: the reader process was stopped", _DIED_HINT)
            try:
                self._conn.send((op, args))
                status, payload, stats, sizes, nfds = self._conn.recv()
                fds = [recv_handle(self._conn) for _ in range(nfds)]
            except (EOFError, OSError) as e:
                self._broken = True
                raise TransferError(f"reading from {self.repo_id}: {_DIED}", _DIED_HINT) from e
            except BaseException:
                # Ctrl-C mid-call: the child's answer would arrive for the next call. Stop it.
                self._broken = True
                self._proc.kill()
                raise
        for k, v in stats.items():
            setattr(self.stats, k, v)
        self._sizes.update(sizes)
        if status == "error":
            raise payload
        return payload, fds


def _main(fd: int) -> None:
    """The child: one HubFiles, answering the parent's calls until "close" or the socket ends
    (the parent closed it, or exited)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    try:
        endpoint, repo_id, commit, options = conn.recv()
    except (EOFError, OSError):
        return
    files: HubFiles | None = None
    arena = _Arena()
    try:
        files = HubFiles(endpoint, repo_id, commit, **options)
        setup_error: BaseException | None = None
    except BaseException as e:
        setup_error = e
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "close":
            break
        status: str = "ok"
        payload: Any = None
        try:
            if setup_error is not None:
                raise setup_error
            assert files is not None
            if op == "size":
                payload = files.size(*args)
            elif op == "read":
                arena.places = []
                spans, bufs = files.read_spans(args[0], arena.alloc)
                del bufs
                payload = (spans, arena.places)
        except BaseException as e:
            status, payload = "error", _picklable(e)
            if op == "read":
                # A failed read leaves its other requests running into their buffers (`HubFiles`):
                # the next call gets a fresh arena; this one is freed when they are done with it.
                arena.retire()
                arena = _Arena()
        stats = files.stats.as_dict() if files is not None else {}
        sizes = dict(files._sizes) if files is not None else {}
        grown = status == "ok" and arena.size != arena.shared
        try:
            conn.send((status, payload, stats, sizes, int(grown)))
            if grown:
                send_handle(conn, arena.fd, 0)  # the pid is unused on Unix
                arena.shared = arena.size
        except (EOFError, OSError):
            break
    if files is not None:
        files.close()


class _Arena:
    """The child's one memfd: each call's span buffers are laid out in it from offset 0, 64-byte
    aligned; it grows (in 16 MiB steps) when a call needs more, and never shrinks. A grown arena
    is mapped again; views of an earlier mapping stay valid (the same pages)."""

    STEP = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.fd = os.memfd_create("svd-probe-reads", os.MFD_CLOEXEC)
        self.size = 0
        self.shared = 0  # the size the parent has mapped
        self.map: mmap.mmap | None = None
        self.places: list[tuple[int, int]] = []  # (offset, length) of this call's buffers

    def alloc(self, n: int) -> np.ndarray:
        off = -(-(self.places[-1][0] + self.places[-1][1]) // 64) * 64 if self.places else 0
        if self.map is None or off + n > self.size:
            self.size = -(-(off + n) // self.STEP) * self.STEP
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        self.places.append((off, n))
        return np.frombuffer(self.map, dtype=np.uint8, count=n, offset=off)

    def retire(self) -> None:
        """Close the descriptor; the mapping lives on while views of it do."""
        os.close(self.fd)
        self.map = None


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return TransferError(f"{type(e).__name__}: {e}", _DIED_HINT)
