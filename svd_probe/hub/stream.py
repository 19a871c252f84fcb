"""Layer streaming: yield one layer's tensors while the next layer is already being read.

Reads run on one background thread (which itself fans out range requests), so the caller's
SVDs overlap the network. With prefetch=1 at most two layers exist at once: the one the caller
holds and the one in flight. The tensor list per layer comes from the caller (the adapter),
never from this module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def stream_layers(
    src,
    layers: Iterable[int],
    names_for_layer: Callable[[int], list[str]],
    device: torch.device | str = "cpu",
    prefetch: int = 1,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (layer, {name: float32 tensor on device}) in the order of `layers`."""
    layers = list(layers)
    prefetch = max(0, int(prefetch))
    pool = ThreadPoolExecutor(1, thread_name_prefix="svd-probe-prefetch")
    pending: deque = deque()
    nxt = 0

    def submit() -> None:
        nonlocal nxt
        layer = layers[nxt]
        nxt += 1
        pending.append((layer, pool.submit(src.read_tensors, names_for_layer(layer), device)))

    try:
        while nxt < len(layers) or pending:
            if not pending:
                submit()
            layer, fut = pending.popleft()
            # Queue the next layer before waiting: its reads start as soon as this one's finish.
            while len(pending) < prefetch and nxt < len(layers):
                submit()
            tensors = fut.result()
            del fut
            yield layer, tensors
            del tensors  # drop our reference before the next layer lands
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
