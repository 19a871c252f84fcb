"""Layer streaming: yield one layer's tensors while the next layer is already being read.

Reads run on one background thread (which itself fans out range requests), so the caller's
SVDs overlap the network. At most prefetch + 1 layers exist at once: the one the caller holds
and the ones read ahead. On CUDA the reader copies and dequantizes on a stream of its own, so its
work never queues behind the caller's kernels on the default stream (nor theirs behind it); the
caller's stream waits for a layer's event before its first use. What to read per layer comes from the caller, as the adapter's
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
    device = torch.device(device)
    side = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def read(plan) -> tuple[LayerTensors, object]:
        if side is None:
            return src.read_tensors(plan, device), None
        with torch.cuda.stream(side):
            tensors = src.read_tensors(plan, device)
            event = torch.cuda.Event()
            event.record(side)
        return tensors, event

    def submit() -> None:
        nonlocal nxt
        layer = layers[nxt]
        nxt += 1
        pending.append((layer, pool.submit(read, plan_for_layer(layer))))

    try:
        while nxt < len(layers) or pending:
            if not pending:
                submit()
            layer, fut = pending.popleft()
            # Queue the next layer before waiting: its reads start as soon as this one's finish.
            while len(pending) < prefetch and nxt < len(layers):
                submit()
            tensors, event = fut.result()
            del fut
            if event is not None:
                # The caller's stream waits for the reader's copies; the allocator must not hand
                # these blocks to the reader's stream again before the caller's kernels are done.
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in tensors.values():
                    t.record_stream(current)
            yield layer, tensors
            del tensors  # drop our reference before the next layer lands
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
