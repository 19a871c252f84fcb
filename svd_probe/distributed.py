"""`analyze` across processes, launched by `torchrun` (torch.distributed as it is).

With WORLD_SIZE > 1 in the environment (torchrun sets it, with RANK, LOCAL_RANK and the
rendezvous), `Ranks.from_env` joins the process group: NCCL when the analysis runs on CUDA (each
rank on GPU LOCAL_RANK), Gloo on the CPU. Without it nothing is initialized and every call here
is a no-op, so one process behaves exactly as before.

How `analyze` uses it: rank 0 alone reads the cache and decides which layers are missing; the
list is broadcast, and `share` cuts it into one contiguous run of layers per rank (contiguous, so
that each rank reads the headers of as few shards as it can). Each rank reads only its own
layers' bytes and writes its layer files into the shared cache through the flock'd
`SpectraCache.update_layer`, which lists them in the manifest as well. Then rank 0 gathers the
ranks' figures and reports. The split depends only on the missing layers and the world size,
so a rerun with another world size, or one process, computes exactly what is still missing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from svd_probe.errors import SvdProbeError

# Ranks meet at the end; the slowest may still be a layer behind (about a minute on a CPU for a
# DeepSeek-V3 layer), so the collective timeout is generous.
_TIMEOUT = datetime.timedelta(hours=2)
# Joining is not: torchrun starts every rank at once, so a rank still alone after this long was
# started without its peers (WORLD_SIZE set by hand, a stale environment) and would wait forever.
RENDEZVOUS_TIMEOUT_ENV = "SVD_PROBE_RENDEZVOUS_TIMEOUT"
_RENDEZVOUS_TIMEOUT_S = 300.0
_LAUNCH_HINT = (
    "Launch it with `torchrun --nproc_per_node N svd-probe analyze ...` (which sets RANK, WORLD_SIZE, "
    "LOCAL_RANK, MASTER_ADDR and MASTER_PORT consistently), or unset WORLD_SIZE and RANK to run one process."
)


class LaunchEnvironmentError(SvdProbeError):
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) is malformed or
    inconsistent, or the other ranks never joined."""


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvironmentError(f"environment variable {name}={raw!r} is not an integer", _LAUNCH_HINT) from None


def _rendezvous_timeout() -> datetime.timedelta:
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else _RENDEZVOUS_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e7:  # also NaN and inf
        raise LaunchEnvironmentError(
            f"environment variable {RENDEZVOUS_TIMEOUT_ENV}={raw!r} is not a number of seconds",
            f"Give a positive number of seconds to wait for the other ranks, e.g. {int(_RENDEZVOUS_TIMEOUT_S)}.",
        )
    return datetime.timedelta(seconds=seconds)


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, checked: integers, WORLD_SIZE ≥ 1,
    0 ≤ RANK < WORLD_SIZE (RANK set when WORLD_SIZE > 1), 0 ≤ LOCAL_RANK ≤ RANK (< LOCAL_WORLD_SIZE
    when set); `LaunchEnvironmentError` otherwise."""
    world = _env_int("WORLD_SIZE", 1)
    assert world is not None
    if world < 1:
        raise LaunchEnvironmentError(f"WORLD_SIZE={world} is not a number of processes (at least 1)", _LAUNCH_HINT)
    rank = _env_int("RANK", None if world > 1 else 0)
    if rank is None:
        raise LaunchEnvironmentError(f"WORLD_SIZE={world} is set but RANK is not", _LAUNCH_HINT)
    if not 0 <= rank < world:
        raise LaunchEnvironmentError(f"RANK={rank} is not in 0-{world - 1} (WORLD_SIZE={world})", _LAUNCH_HINT)
    local = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", None)
    assert local is not None
    if local < 0 or (local_world is not None and not 0 <= local < local_world) or local > rank:
        where = f" (LOCAL_WORLD_SIZE={local_world})" if local_world is not None else ""
        raise LaunchEnvironmentError(
            f"LOCAL_RANK={local} does not fit RANK={rank} of WORLD_SIZE={world}{where}", _LAUNCH_HINT
        )
    return rank, world, local


def _check_rendezvous(world: int) -> None:
    """MASTER_ADDR and a MASTER_PORT in 1-65535, which the env:// rendezvous needs."""
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v, "").strip()]
        if missing:
            raise LaunchEnvironmentError(
                f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not",
                _LAUNCH_HINT,
            )
        port = _env_int("MASTER_PORT", None)
        if port is None or not 0 < port < 65536:
            raise LaunchEnvironmentError(f"MASTER_PORT={port} is not a TCP port (1-65535)", _LAUNCH_HINT)


@dataclass
class Ranks:
    """This process's place among the ranks of one `analyze` (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owns_group: bool = False
    _device: torch.device | None = None
    _group: Any = None  # the group of every rank with the long collective timeout

    @classmethod
    def from_env(cls, device: torch.device) -> tuple[Ranks, torch.device]:
        """Join torchrun's process group if WORLD_SIZE > 1; returns the ranks and this rank's device
        (`cuda` becomes `cuda:LOCAL_RANK`)."""
        rank, world, local = launch_environment()
        if world <= 1:
            return cls(), device
        import torch.distributed as dist

        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist.is_initialized():  # joined by the caller: its group, its timeouts
            return cls(dist.get_rank(), dist.get_world_size(), local, False, device), device
        _check_rendezvous(world)
        wait = _rendezvous_timeout()
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            # Joining waits at most `wait`; the collectives then run in a group of every rank
            # with the generous timeout.
            dist.init_process_group(backend, timeout=wait)
            group = dist.new_group(backend=backend, timeout=_TIMEOUT)
        except (RuntimeError, ValueError, OSError) as e:  # DistStoreError is a RuntimeError
            if dist.is_initialized():
                dist.destroy_process_group()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise LaunchEnvironmentError(
                f"rank {rank} of {world} could not join the other ranks at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} within {wait.total_seconds():g} s ({first})",
                _LAUNCH_HINT + f" {RENDEZVOUS_TIMEOUT_ENV} sets the wait in seconds.",
            ) from None
        return cls(dist.get_rank(), dist.get_world_size(), local, True, device, group), device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, todo: list[int] | None) -> tuple[list[int], list[int]]:
        """Rank 0's list of missing layers, for everyone: (all of them, this rank's run of them)."""
        if self.active:
            import torch.distributed as dist

            box: list[Any] = [todo if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=self._group)
            todo = box[0]
        assert todo is not None
        return todo, split_layers(todo, self.rank, self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a barrier: each rank waits for all)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def close(self) -> None:
        """Leave the process group if `from_env` joined it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
            self._group = None


def split_layers(todo: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous run of `todo`: sizes differ by at most one, lower ranks first.

    Example:
        >>> split_layers([1, 2, 3, 4, 5], 0, 2), split_layers([1, 2, 3, 4, 5], 1, 2)
        ([1, 2, 3], [4, 5])
    """
    n = len(todo)
    base, extra = divmod(n, world_size)
    begin = rank * base + min(rank, extra)
    return todo[begin : begin + base + (1 if rank < extra else 0)]
