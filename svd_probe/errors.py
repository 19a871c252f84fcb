"""Typed errors of svd-probe.

Every error a user can cause (a bad model name, a corrupt shard, a bad flag, a missing token)
is an `SvdProbeError`. It carries a short message that names the problem and a `hint` that names
the fix; the CLI prints both and exits non-zero, never with a traceback. Library users catch the
specific subclass they care about.
"""

from __future__ import annotations


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` for a message, cut short at `limit` characters: a value from input we do not
    control (a header, an option, a data file) may be megabytes long, and repr shows no control
    characters."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def utf8_text(text: str) -> str:
    """`text` with each character UTF-8 has no bytes for shown as its escape (`\\udcff`): a lone
    surrogate, which is how Python reads a file name's undecodable byte (a local folder
    `bad\\xffname` on Linux) and JSON's "\\ud800". Pages, CSV and parquet files are UTF-8, and
    such a character ended `report` and `export` in a UnicodeEncodeError."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class SvdProbeError(Exception):
    """Base class: a problem the user can fix. `hint` says how."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def __reduce__(self):
        # Subclasses take keyword-only fields (file=, tensor=), which Exception's own pickling
        # (cls(*args)) drops; the reader process sends its errors to the parent pickled.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[SvdProbeError], args: tuple, state: dict) -> SvdProbeError:
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


# --- Model names and checkpoint access -------------------------------------------------------


class UnknownModelError(SvdProbeError):
    """MODEL is neither a known alias, a Hub repo id `org/name`, nor an existing local folder."""


class RepoNotFoundError(SvdProbeError):
    """The Hub (or mirror) has no such repository, or it is private and no token was given."""


class RevisionNotFoundError(SvdProbeError):
    """The repository exists but `--revision` names no branch, tag or commit of it."""


class GatedRepoError(SvdProbeError):
    """The repository is gated or needs authentication."""


class EntryNotFoundError(SvdProbeError):
    """A file the checkpoint layout requires (config.json, an index, a shard) is missing."""


class CorruptShardError(SvdProbeError):
    """A safetensors file has an invalid header or a tensor whose bytes do not match it."""

    def __init__(self, message: str, *, file: str, tensor: str | None = None, hint: str | None = None):
        where = f"{file}" + (f" (tensor {tensor})" if tensor else "")
        super().__init__(f"corrupt shard {where}: {message}", hint)
        self.file = file
        self.tensor = tensor


class MalformedFileError(SvdProbeError):
    """config.json or the index is not what its format promises: not UTF-8 JSON, nested or sized
    beyond reason, not an object, or a weight_map of the wrong shape."""

    def __init__(self, message: str, hint: str | None = None, *, file: str):
        super().__init__(message, hint)
        self.file = file


class UnsafeShardNameError(MalformedFileError):
    """An index entry names a shard outside the repo or folder (`..`, an absolute path, a URL)."""

    def __init__(self, message: str, hint: str | None = None, *, file: str, entry: str):
        super().__init__(message, hint, file=file)
        self.entry = entry


class TransferError(SvdProbeError):
    """A range read kept failing after every retry (network down, server errors)."""

    exit_code = 3


class HubUnreachableError(TransferError):
    """The Hub cannot be asked: offline mode (HF_HUB_OFFLINE, `offline` True), or no answer after
    every retry (connection refused, DNS, a server that never answers). Raised when a checkpoint is
    opened, so a caller can fall back to what it cached."""

    def __init__(self, message: str, hint: str | None = None, *, offline: bool = False):
        super().__init__(message, hint)
        self.offline = offline


class UnsupportedModelError(SvdProbeError):
    """config.json names a `model_type` that no architecture adapter reads."""


class BadConfigError(UnsupportedModelError):
    """A config.json field is missing, malformed or out of range, or disagrees with the shape of a
    checkpoint tensor. `field` names the field (and `tensor` the tensor) at fault."""

    def __init__(self, message: str, hint: str | None = None, *, field: str | None = None, tensor: str | None = None):
        super().__init__(message, hint)
        self.field = field
        self.tensor = tensor


# --- Analysis options and cache --------------------------------------------------------------


class BadOptionError(SvdProbeError):
    """A flag's value is malformed or asks for something the model lacks (e.g. `--layers 99`)."""


class CacheMissError(SvdProbeError):
    """The cache holds no analysis for this model and options; the hint names the command."""


class OfflineCacheMissError(CacheMissError):
    """Offline (or the Hub unreachable), and the cache lacks layers that would need the Hub."""

    exit_code = 3


class CacheDamagedError(SvdProbeError):
    """A cache file (a layer's spectra) is truncated or malformed; `path` names it.

    `analyze` recomputes such a layer by itself; the hint names the command that does.
    """

    def __init__(self, message: str, hint: str | None = None, *, path: str):
        super().__init__(message, hint)
        self.path = path


class CacheLinkError(SvdProbeError):
    """A folder inside the cache folder is a link: reads and writes through it would leave the
    folder the user gave (the cache root itself may be a link: the user chose it)."""

    def __init__(self, message: str, hint: str | None = None, *, path: str):
        super().__init__(message, hint)
        self.path = path


class DiskWriteError(SvdProbeError):
    """A file cannot be written (disk full, quota, read-only): a cache layer or an export is lost
    whole, never left half-written."""


class OutputExistsError(SvdProbeError):
    """An output file exists, or names a folder; svd-probe never overwrites a file unless asked."""


class MissingFigureData(CacheMissError):
    """The cache lacks what one figure draws; `plot` skips that figure with a note."""

    def __str__(self) -> str:
        # One line, for the list of skipped figures that `plot` prints.
        return self.message + (f" (run: {self.hint})" if self.hint else "")


# --- Training --------------------------------------------------------------------------------


class TrainingInputError(SvdProbeError):
    """A data path, tokenizer or model config for `svd-probe train` is missing or malformed."""
