"""Cache writes on a background thread, behind a bounded queue.

`analyze` hands each computed layer to a `LayerWriter` as a job (wait for the layer's σ on the
device, copy them to the host, write the layer file with its fsync, update the manifest under
the folder's lock) and goes on with the next layer at once: none of that host work, nor the
device synchronization hidden in the σ copy, stalls the thread that launches the spectra. At
most `depth` jobs wait; `put` blocks when they do, so a slow disk slows the run instead of
filling memory (a waiting job holds one layer's σ: a few MB for DeepSeek-V3).

The writer never leaves half a file: each job's file write is atomic (`svd_probe.atomic`), and
the thread is not a daemon, so the interpreter waits for the job in progress before it exits.
`close()` drains the queue (layers already computed are kept: what Ctrl-C wants); a second
interrupt while draining stops after the job in progress and drops the rest. The first error a
job raises stops the writer and is raised again by the next `put` or by `close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class LayerWriter:
    """Run `put(layer, job)` jobs in order on one thread; `finished()` says which are done.

    Example:
        >>> with LayerWriter(depth=4) as writer:
        ...     writer.put(3, lambda: cache.update_layer(spectra))
        ...     done = writer.finished()  # [(3, <what the job returned>)] once it ran
    """

    def __init__(self, depth: int = 4, name: str = "svd-probe-writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._done: list[tuple[int, Any]] = []
        self._done_lock = threading.Lock()
        self._error: BaseException | None = None
        self._reported = False
        self._abort = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=False)
        self._thread.start()

    def put(self, layer: int, job: Callable[[], Any]) -> None:
        """Queue a job; blocks while `depth` jobs wait. Raises the error of an earlier job."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("LayerWriter is closed")
        while True:
            try:
                self._queue.put((layer, job), timeout=0.5)
                return
            except queue.Full:
                self._raise_error()  # a writer that died must not leave the caller blocked

    def finished(self) -> list[tuple[int, Any]]:
        """(layer, result) of the jobs finished since the last call, in order."""
        with self._done_lock:
            out, self._done = self._done, []
        return out

    def close(self) -> None:
        """Run every queued job, stop the thread, and raise the first job error (if any).

        Interrupted while waiting (a second Ctrl-C), it lets the job in progress finish, drops
        the others and re-raises the interrupt.
        """
        if not self._closed:
            self._closed = True
            self._queue.put((None, _STOP))
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except BaseException:
            self._abort.set()
            raise
        self._raise_error()

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _run(self) -> None:
        while True:
            layer, job = self._queue.get()
            if job is _STOP:
                return
            if self._abort.is_set() or self._error is not None:
                continue  # dropped: interrupted twice, or an earlier job failed
            try:
                result = job()
            except BaseException as e:  # handed to the caller's thread by put/close
                self._error = e
                continue
            with self._done_lock:
                self._done.append((layer, result))
