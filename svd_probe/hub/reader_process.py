"""Range reads from a Hub in a process of their own (`open_checkpoint(..., reader="process")`).

Why: the HTTP client's Python work (httpx, h11, the copy of each body into its buffer) holds the
GIL of the process it runs in. `analyze` launches its GPU work from that same interpreter, and
every reader thread contends with the launching thread each time it lets go of the GIL for a
kernel. On the dev VM, a thread issuing small torch ops ran at 1-3% of its speed while 8 requests
were in flight, at 6-12% with 2, and at 89% beside this process reader (benchmarks/README.md,
"Read size, width and the stand-in's TCP_NODELAY": what the reads cost a thread of small ops).
Here the reads run in a child process with its own GIL.

How:
- The child process runs one `HubFiles`, which keeps the same retries, deadlines, token rule and
  width rule.
- The child fills each span of a `read_many` call into a memfd (anonymous shared memory, Linux).
  It passes the descriptors over the pipe (SCM_RIGHTS).
- The parent maps them and hands out views, as `HubFiles` does with its own buffers. The bytes
  are never copied between the processes, and a mapping lives as long as the arrays that view it.
- Errors come back pickled and are raised in the parent; `SvdProbeError` pickles its fields.
- The child ignores Ctrl-C. The parent stops it on `close()`, or when the parent exits (it is a
  daemon).

No library does this: multiprocessing's shared_memory needs a name in /dev/shm, which containers
often size at 64 MB, and its lifetime is manual; a memfd has neither limit.
"""

from __future__ import annotations

import functools
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from svd_probe.errors import BadOptionError, TransferError
from svd_probe.hub.ranges import HubFiles, ReadStats, read_through

_DIED = "the reader process ended unexpectedly (killed, or out of memory)"
_DIED_HINT = "Rerun: finished layers are cached."


def refuse_unusable() -> None:
    """Raise `BadOptionError` where a reader process cannot run: off Linux (no memfds), or under
    a main script that runs work at import (the spawned child imports it: band's check, shared
    with its worker processes)."""
    from svd_probe.spectra.band import _spawn_safe

    if not (sys.platform.startswith("linux") and hasattr(os, "memfd_create")):
        raise BadOptionError("reader='process' needs Linux (memfd_create)", "Use the default reader (threads).")
    if not _spawn_safe():
        raise BadOptionError(
            "reader='process' starts a process that imports this program's main script, "
            "and this script runs work at import",
            'Put the script\'s work under `if __name__ == "__main__":`, or use the default reader.',
        )


class ProcessFiles:
    """`HubFiles` in a child process, with the same interface: size, known_size, read_many,
    stats, close. One call runs at a time over the pipe. Each call's requests still go out in
    parallel inside the child."""

    def __init__(self, endpoint: str, repo_id: str, commit: str, **options: Any):
        refuse_unusable()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(child, os.getpid(), endpoint, repo_id, commit, options),
            name="svd-probe-reader",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._broken = False  # the pipe is out of step (an interrupted call) or the child is gone
        self.stats = ReadStats()
        self._sizes: dict[str, int] = {}
        self.endpoint, self.repo_id, self.commit = endpoint, repo_id, commit
        try:
            self._call("hello")  # raises what the child's HubFiles raised, if anything
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
        spans, fds = self._call("read", reqs)
        bufs = []
        for fd, (_p, b, e, _m) in zip(fds, spans, strict=True):
            try:
                # The mapping outlives the descriptor, and lives as long as the arrays viewing it.
                bufs.append(np.frombuffer(mmap.mmap(fd, e - b), dtype=np.uint8))
            finally:
                os.close(fd)
        return spans, bufs

    def close(self) -> None:
        with self._lock:
            if self._proc.is_alive():
                try:
                    self._conn.send(("close", ()))
                except OSError:
                    pass
                self._proc.join(timeout=5)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(timeout=5)
            self._conn.close()

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


def _serve(conn, parent: int, endpoint: str, repo_id: str, commit: str, options: dict) -> None:
    """The child: one HubFiles, answering the parent's calls until "close" or the pipe ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    files: HubFiles | None = None
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
        fds: list[int] = []
        maps: list[mmap.mmap] = []
        status: str = "ok"
        payload: Any = None
        try:
            if setup_error is not None:
                raise setup_error
            assert files is not None
            if op == "size":
                payload = files.size(*args)
            elif op == "read":
                spans, bufs = files.read_spans(args[0], functools.partial(_memfd, fds, maps))
                del bufs
                payload = spans
        except BaseException as e:
            status, payload = "error", _picklable(e)
            for fd in fds:
                os.close(fd)
            fds = []
        stats = files.stats.as_dict() if files is not None else {}
        sizes = dict(files._sizes) if files is not None else {}
        try:
            conn.send((status, payload, stats, sizes, len(fds)))
            for fd in fds:
                send_handle(conn, fd, parent)
        except (EOFError, OSError):
            break
        finally:
            for fd in fds:
                os.close(fd)
            for m in maps:
                try:
                    m.close()
                except BufferError:  # a view still held here; freed with it
                    pass
    if files is not None:
        files.close()


def _memfd(fds: list[int], maps: list[mmap.mmap], n: int) -> np.ndarray:
    """A span buffer of `n` bytes in a fresh memfd, its descriptor and mapping kept for the reply."""
    fd = os.memfd_create("svd-probe-read", os.MFD_CLOEXEC)
    fds.append(fd)
    os.ftruncate(fd, n)
    maps.append(mmap.mmap(fd, n))
    return np.frombuffer(maps[-1], dtype=np.uint8)


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return TransferError(f"{type(e).__name__}: {e}", _DIED_HINT)
