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

# Ranks meet at the end; the slowest may still be a layer behind (about a minute on a CPU for a
# DeepSeek-V3 layer), so the collective timeout is generous.
_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Ranks:
    """This process's place among the ranks of one `analyze` (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owns_group: bool = False
    _device: torch.device | None = None

    @classmethod
    def from_env(cls, device: torch.device) -> tuple[Ranks, torch.device]:
        """Join torchrun's process group if WORLD_SIZE > 1; returns the ranks and this rank's device
        (`cuda` becomes `cuda:LOCAL_RANK`)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
        if world <= 1:
            return cls(), device
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0") or "0")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local, owns, device), device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, todo: list[int] | None) -> tuple[list[int], list[int]]:
        """Rank 0's list of missing layers, for everyone: (all of them, this rank's run of them)."""
        if self.active:
            import torch.distributed as dist

            box: list[Any] = [todo if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            todo = box[0]
        assert todo is not None
        return todo, split_layers(todo, self.rank, self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a barrier: each rank waits for all)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group if `from_env` joined it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


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
