"""Layer streaming: yield one layer's tensors while the next layer is already being read.

Reads run on one background thread (which itself fans out range requests), so the caller's
SVDs overlap the network. With prefetch=1 at most two layers exist at once: the one the caller
holds and the one in flight. What to read per layer comes from the caller, as the adapter's
`LayerPlan` (whose shapes are checked before any byte is read) or as bare names, never from this
module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from svd_probe.adapters.base import LayerPlan
from svd_probe.hub.source import LayerTensors


def stream_layers(
    src,
    layers: Iterable[int],
    plan_for_layer: Callable[[int], LayerPlan | Iterable[str]],
    device: torch.device | str = "cpu",
    prefetch: int = 1,
) -> Iterator[tuple[int, LayerTensors]]:
    """Yield (layer, `LayerTensors`) in the order of `layers`.

    Args:
        src: a `CheckpointSource`.
        layers: the layers to read, in order.
        plan_for_layer: layer → the adapter's `LayerPlan` (e.g. `lambda L: adapter.plan(L, kinds,
            fold)`), or layer → tensor names.
        device: where tensors are widened to float32.
        prefetch: layers read ahead while the caller works (0: none).
    Returns:
        An iterator of (layer, tensors); `tensors` maps name → float32 tensor and carries
        `.dtypes` (storage dtypes) and `.plan`.
    Example:
        >>> for layer, lt in stream_layers(src, [0, 1], lambda L: adapter.plan(L, {"VO"}, True)):
        ...     factors = adapter.factors(layer, lt, {"VO"}, True)
    """
    layers = list(layers)
    prefetch = max(0, int(prefetch))
    pool = ThreadPoolExecutor(1, thread_name_prefix="svd-probe-prefetch")
    pending: deque = deque()
    nxt = 0

    def submit() -> None:
        nonlocal nxt
        layer = layers[nxt]
        nxt += 1
        pending.append((layer, pool.submit(src.read_tensors, plan_for_layer(layer), device)))

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
