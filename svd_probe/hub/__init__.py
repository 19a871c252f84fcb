"""Reading checkpoints: Hub repos streamed by HTTP range reads, or local folders, one code path.

    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.stream import stream_layers

    src = open_checkpoint(ref, revision="main", token=None, endpoint=None, concurrency=8)
    src.commit, src.config, src.tensor_names, src.storage_dtype(name), src.bytes_fetched
    lt = src.read_tensors(plan_or_names, device)     # LayerTensors: float32 (FP8 dequantized), .dtypes
    for layer, lt in stream_layers(src, layers, plan_for_layer, device, prefetch=1): ...

Modules: `http` (the one HTTP edge: session, retries, deadlines, token rule, typed Hub errors),
`checkpoint` (open: commit, config, index), `safetensors_header` (parse + validate headers),
`ranges` (HTTP and local preadv range reads, resume, signed URLs), `dequant` (FP8 block scales,
BF16/F16/F32), `source`, `stream`, `dtypes` (the one table of safetensors dtypes).
"""
