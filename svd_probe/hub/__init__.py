"""Reading checkpoints: Hub repos streamed by HTTP range reads, or local folders, one code path.

    from svd_probe.hub.checkpoint import open_checkpoint
    from svd_probe.hub.stream import stream_layers

    src = open_checkpoint(ref, revision="main", token=None, endpoint=None, concurrency=8)
    src.commit, src.config, src.tensor_names, src.storage_dtype(name), src.bytes_fetched
    tensors = src.read_tensors(names, device)        # float32, FP8 dequantized on `device`
    for layer, tensors in stream_layers(src, layers, names_for_layer, device, prefetch=1): ...

Modules: `http` (the one HTTP edge: session, retries, deadlines, token rule, typed Hub errors),
`checkpoint` (open: commit, config, index), `safetensors_header` (parse + validate headers),
`ranges` (HTTP and mmap range reads, resume, signed URLs), `dequant` (FP8 block scales,
BF16/F16/F32), `source`, `stream`, `known_configs` + `catalog` (the `svd-probe models` table).
"""
