"""Where `plot` writes its files, and which existing files it may replace.

Rerunning `svd-probe plot` into the same folder is the normal way to redraw figures, so `plot`
cannot refuse every existing file the way `export` does. Instead it keeps a record in each folder
it writes (RECORD: file name -> SHA-256 of the bytes it wrote) and replaces an existing file only
when the record names it with those same bytes. Any other file under a figure's name (a user's
own `layerwise.png`, a figure edited since, a link) is replaced only with `overwrite`. A folder,
device, pipe or socket under that name is refused even then, as `export.check_output_file` does.

Every path is checked before anything is written, so a refusal leaves the folder as it was. The
files are written atomically (`export.write_output_file`), so a link under a figure's name is
replaced, never written through. The record is rewritten after the folder's files, on Ctrl-C
too, and names only what was really written.

Why by hand: matplotlib, pandas and the atomic writer know nothing of who wrote a file before.
The record is input this process does not control: it is read bounded (`cache.store
.read_json_object`), and a damaged, foreign or oversized record only means that nothing in the
folder counts as plot's own.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from svd_probe.atomic import atomic_write_json, sha256_file
from svd_probe.errors import OutputExistsError
from svd_probe.export import write_output_file

RECORD = ".svd-probe-plot.json"
RECORD_FORMAT = 1
# A record names at most this many files (plot writes tens a folder); entries past it are dropped.
MAX_RECORDED = 10_000
# A file larger than this is not hashed: no figure or data table plot writes comes near it.
MAX_HASHED_BYTES = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def read_record(folder: Path) -> tuple[dict[str, str], str | None]:
    """The files plot wrote in `folder` ({name: sha256}), and why the record is not usable
    (None: usable or absent). Entries that are not a plain file name and a SHA-256 are dropped."""
    from svd_probe.cache.store import read_json_object

    path = folder / RECORD
    if path.is_symlink():  # read_json_object refuses the rest that is not a regular file
        return {}, "it is not a regular file"
    obj, why = read_json_object(path)
    if obj is None:
        return {}, why
    files = obj.get("files")
    if obj.get("format") != RECORD_FORMAT or not isinstance(files, dict):
        return {}, f"it is not a format-{RECORD_FORMAT} record of svd-probe plot"
    kept: dict[str, str] = {}
    for name, digest in files.items():
        if len(kept) >= MAX_RECORDED:
            break
        if _plain_name(name) and isinstance(digest, str) and _SHA256.fullmatch(digest):
            kept[name] = digest
    return kept, None


def _refuse_special(path: Path) -> os.stat_result | None:
    """`path`'s lstat (None: absent); OutputExistsError where it is neither a regular file nor a
    link, which the atomic rename would replace by a file (a folder, device, pipe or socket)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise OutputExistsError(
            f"{path} exists and is not a regular file (a folder, device, pipe or socket)",
            "Move it away, or pick another --out.",
        )
    return st


@dataclass
class PlotOutput:
    """The files one `plot` run will write: `add` each, then `write_all` checks them all and
    writes them (or raises OutputExistsError, having written nothing)."""

    overwrite: bool = False
    jobs: list[tuple[Path, Callable[[str], object]]] = field(default_factory=list)

    def add(self, path: Path, write: Callable[[str], object]) -> Path:
        """Queue `write(tmp_path)` for `path` (a later job for the same path replaces it)."""
        path = Path(path)
        self.jobs = [(p, w) for p, w in self.jobs if p != path]
        self.jobs.append((path, write))
        return path

    def _folders(self) -> dict[Path, list[tuple[Path, Callable[[str], object]]]]:
        by_folder: dict[Path, list[tuple[Path, Callable[[str], object]]]] = {}
        for path, write in self.jobs:
            by_folder.setdefault(path.parent, []).append((path, write))
        return by_folder

    def check(self) -> dict[Path, dict[str, str]]:
        """Raise OutputExistsError if any queued path may not be written (see the module
        docstring); else each folder's record ({} where it is absent or unusable)."""
        records: dict[Path, dict[str, str]] = {}
        for folder, jobs in self._folders().items():
            if folder.exists() and not folder.is_dir():
                raise OutputExistsError(f"--out {folder} is not a folder", "Pick a folder for --out.")
            record, why = read_record(folder)
            records[folder] = record
            refused = []
            record_path = folder / RECORD
            _refuse_special(record_path)
            if why is not None and not self.overwrite:
                raise OutputExistsError(
                    f"{record_path} is not svd-probe plot's record of its files ({why})",
                    "Pass --overwrite to replace it and the figures, or pick another --out.",
                )
            for path, _ in jobs:
                st = _refuse_special(path)
                if st is None or self.overwrite:
                    continue
                ours = (
                    stat.S_ISREG(st.st_mode)
                    and path.name in record
                    and st.st_size <= MAX_HASHED_BYTES
                    and sha256_file(path) == record[path.name]
                )
                if not ours:
                    refused.append(path.name)
            if refused:
                shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
                raise OutputExistsError(
                    f"{folder} holds {shown}, not written by svd-probe plot (or changed since); "
                    "svd-probe does not overwrite files",
                    "Pass --overwrite to replace them, or pick another --out.",
                )
        return records

    def write_all(self) -> list[Path]:
        """Check every queued path, then write them in order; returns the paths written."""
        records = self.check()
        written: list[Path] = []
        for folder, jobs in self._folders().items():
            record = records[folder]
            try:
                for path, write in jobs:
                    digest: list[str] = []

                    def write_and_hash(tmp: str, write=write, digest=digest) -> None:
                        write(tmp)
                        digest.append(sha256_file(Path(tmp)))

                    write_output_file(path, write_and_hash)
                    record.pop(path.name, None)  # re-inserted last: the newest entries survive MAX_RECORDED
                    record[path.name] = digest[0]
                    written.append(path)
            finally:
                # What was written, also when a write failed or on Ctrl-C.
                if any(p.parent == folder for p in written):
                    kept = dict(list(record.items())[-MAX_RECORDED:])
                    try:
                        atomic_write_json(folder / RECORD, {"format": RECORD_FORMAT, "files": kept})
                    except OSError:
                        pass  # the figures are written; without a record they count as the user's
        return written
