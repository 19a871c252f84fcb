"""Atomic file writes: readers see the old file or the whole new one, never a part.

Every file svd-probe writes for later reading (spectra layer files, manifests, refs, training
checkpoints, metrics) goes through `atomic_write`: write to a temporary name in the same folder,
`fsync`, then rename onto the final name. A process killed mid-write leaves the old file (or
nothing) behind, and a crash of the machine cannot leave an empty file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from svd_probe.errors import OutputExistsError

# The temporary file's name is "." + at most this much of the final name + 8 random characters +
# ".tmp": a final name of up to 255 bytes (the usual limit of a file name) keeps a legal one.
_TMP_NAME_KEEP = 64


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, exclusive: bool = False) -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`.

    Args:
        path: the final file name; its folder is created if missing.
        write: writes the whole content to the temporary path it is given.
        exclusive: never replace anything at `path`: the finished file is linked there, which
            fails if a file (or a link, or anything) appeared there while it was written
            (`OutputExistsError`), where a check before the work and a rename after it would
            replace what appeared in between. On a filesystem without hard links, the check is
            made again just before the rename.

    The temporary file is removed if `write` (or anything after it) fails, even on Ctrl-C.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name[:_TMP_NAME_KEEP], suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); the final file gets the mode a plain open() would
    # give it, so exports and reports are readable by whoever the user's umask allows.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_new(tmp: str, path: Path) -> None:
    """Put the finished `tmp` at `path` only if nothing is there (see `atomic_write`)."""
    appeared = OutputExistsError(
        f"{path} appeared while svd-probe wrote it; svd-probe does not overwrite files",
        "Pass --overwrite to replace it, or pick another name.",
    )
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):  # no hard links here (FAT, some network filesystems)
            raise appeared from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def is_disk_full(e: OSError) -> bool:
    """The write failed for want of space: the disk is full, or the user's quota is spent."""
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write` of a bytes object."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """`atomic_write` of `obj` as JSON (keys sorted, trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


def open_append(path: str | os.PathLike, hint: str = "Remove it, or pick another --out.") -> IO[str]:
    """Open the log `path` to append text (created if missing), never through a link and never
    onto a pipe or device: O_NOFOLLOW refuses a link, O_NONBLOCK keeps a FIFO without a reader
    from blocking the open (a blocked open ignores SIGTERM), and anything but a regular file is
    closed again. Those end in OutputExistsError naming the path and `hint`.

    Logs are the one kind of file svd-probe appends to rather than replaces (train.log, a
    sweep's logs/), so they are the one kind `atomic_write`'s rename does not protect.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    refused = OutputExistsError(
        f"{path} is a link, pipe or device, not a plain file; svd-probe appends its log only to a plain file",
        hint,
    )
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EMLINK):  # a link; a FIFO with no reader
            raise refused from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a")
    except BaseException:
        os.close(fd)
        raise


def appendable(path: str | os.PathLike) -> bool:
    """Whether `open_append` would take `path`: absent, or a regular file that is not a link.
    For the checks that refuse a log before any work starts, with their own message."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (hashlib.file_digest is Python 3.11+)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class NotRegularFileError(OSError):
    """`open_regular` (or `read_head`) of a pipe, device or folder, or (links not followed) of a
    link: a read would block, never end, fail or leave the folder it was meant for. `folder`:
    it is a folder, which some callers count as no file at all."""

    def __init__(self, path: str | os.PathLike, what: str, folder: bool = False):
        super().__init__(errno.EINVAL, what, str(path))
        self.folder = folder


def _refuse_unless_regular(st: os.stat_result, path: str | os.PathLike, follow_links: bool) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise NotRegularFileError(path, "a folder, not a file", folder=True)
    if stat.S_ISLNK(st.st_mode):
        raise NotRegularFileError(path, "a link, not a regular file")
    raise NotRegularFileError(path, "not a regular file (a pipe or device)" if follow_links else "not a regular file")


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, follow_links: bool = True) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """The regular file `path` open for reading, with the stat of what was opened: every bounded
    reader of input files opens through this one, and bounds its reads by that stat.

    A pipe, device or folder (and, with `follow_links` False, a link) raises NotRegularFileError
    without a blocking open: it is refused by a stat first (opening some devices does
    something); the open is non-blocking and, links not followed, O_NOFOLLOW, so a FIFO or link
    swapped in after the stat can neither block it nor lead it elsewhere; and the open file is
    checked again by fstat, so what is read is what was checked. FileNotFoundError when absent.
    """
    _refuse_unless_regular(os.stat(path) if follow_links else os.lstat(path), path, follow_links)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link swapped in after the lstat
            raise NotRegularFileError(path, "a link, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(st, path, follow_links)
        with os.fdopen(fd, "rb", closefd=False) as f:
            yield f, st
    finally:
        os.close(fd)


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """At most the first `n` bytes of the regular file `path` (links followed): a huge or growing
    file costs `n` at most. A pipe, device or folder raises NotRegularFileError (`open_regular`)."""
    with open_regular(path) as (f, _):
        return f.read(n)
