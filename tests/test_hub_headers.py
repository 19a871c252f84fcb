"""safetensors header parsing and validation, and dequantization against independent references."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svd_probe.errors import CorruptShardError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.dequant import dequantize_fp8_blocks
from svd_probe.hub.safetensors_header import MAX_HEADER_BYTES, parse_header, parse_header_length
from svd_probe.models import resolve_model


def _header_of(path):
    data = path.read_bytes()
    n = parse_header_length(data[:8], path.name, len(data))
    return parse_header(data[8 : 8 + n], path.name, len(data)), data


def test_header_matches_safetensors_library(deepseek_ckpt):
    shard = sorted(deepseek_ckpt.folder.glob("*.safetensors"))[0]
    h, data = _header_of(shard)
    with safe_open(str(shard), framework="pt") as f:
        assert set(f.keys()) == set(h.tensors)
        for name in f.keys():
            t = f.get_tensor(name)
            info = h.tensors[name]
            assert tuple(t.shape) == info.shape
            # Same bytes at the offsets we computed as safetensors decoded.
            assert data[info.begin : info.end] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _file(header_obj, data_len=64, raw=None):
    body = raw if raw is not None else json.dumps(header_obj).encode()
    return struct.pack("<Q", len(body)) + body + b"\0" * data_len


@pytest.mark.parametrize(
    "case, header, data_len, needle",
    [
        ("not json", b"{not json", 64, "not valid JSON"),
        ("array", b"[1, 2, 3]", 64, "not an object"),
        ("unknown dtype", {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}, 64, "unknown dtype"),
        ("span mismatch", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, 64, "data_offsets span"),
        ("past end", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, 32, "past the file"),
        ("negative", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, 64, "bad data_offsets"),
        ("bad shape", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 64, "bad shape"),
        (
            "overlap",
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            64,
            "overlap",
        ),
    ],
)
def test_corrupt_headers_raise_typed_error(case, header, data_len, needle):
    raw = header if isinstance(header, bytes) else None
    blob = _file(header, data_len, raw)
    n = parse_header_length(blob[:8], "model-00001-of-000002.safetensors", len(blob))
    with pytest.raises(CorruptShardError) as ei:
        parse_header(blob[8 : 8 + n], "model-00001-of-000002.safetensors", len(blob))
    msg = str(ei.value)
    assert needle in msg and "model-00001-of-000002.safetensors" in msg
    if not isinstance(header, bytes):
        assert ei.value.tensor == "w" and "(tensor w)" in msg


def test_header_length_checks():
    with pytest.raises(CorruptShardError, match="exceeds"):
        parse_header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), "f.safetensors", 10**10)
    with pytest.raises(CorruptShardError, match="past the end"):
        parse_header_length(struct.pack("<Q", 1000), "f.safetensors", 500)
    with pytest.raises(CorruptShardError, match="too short"):
        parse_header_length(b"\1\0", "f.safetensors", 2)


def test_corrupt_local_shard_names_file_and_tensor(tmp_path):
    from svd_probe.testing.checkpoints import build_deepseek_v3

    ck = build_deepseek_v3(tmp_path / "ck", layers=1, mtp_layers=0, n_experts=1, n_shards=2)
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = ck.folder / ck.weight_map[name]
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8 : 8 + n])
    hdr[name]["shape"] = [hdr[name]["shape"][0] + 1, hdr[name]["shape"][1]]  # size no longer matches offsets
    raw = json.dumps(hdr).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :]))
    src = open_checkpoint(resolve_model(str(ck.folder)))
    with pytest.raises(CorruptShardError) as ei:
        src.read_tensors([name])
    assert ei.value.file == shard.name and ei.value.tensor == name


# -- dequantization -------------------------------------------------------------------------------


def _e4m3_to_float_numpy(b: np.ndarray) -> np.ndarray:
    """Decode float8 E4M3 (fn) bytes bit by bit: an independent reference for torch's cast."""
    b = b.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    val = np.where((exp == 15) & ((b & 7) == 7), np.nan, val)
    return (sign * val).astype(np.float32)


def _reference_dequant(f, name):
    w = f.get_tensor(name)
    codes = w.view(torch.uint8).numpy()
    return codes, _e4m3_to_float_numpy(codes)


def test_fp8_dequant_matches_per_block_numpy(deepseek_ckpt):
    ck = deepseek_ckpt
    src = open_checkpoint(resolve_model(str(ck.folder)))
    names = [n for n in ck.all_attention_tensor_names() if n.endswith("proj.weight") or n.endswith("mqa.weight")]
    got = src.read_tensors(names)
    moved = 0
    for name in names:
        assert src.storage_dtype(name) == "F8_E4M3"
        wfile, sfile = ck.weight_map[name], ck.weight_map[name + "_scale_inv"]
        moved += wfile != sfile
        with safe_open(str(ck.folder / wfile), framework="pt") as f:
            _, vals = _reference_dequant(f, name)
        with safe_open(str(ck.folder / sfile), framework="pt") as f:
            scale = f.get_tensor(name + "_scale_inv").numpy()
        m, n = vals.shape
        assert scale.shape == (math.ceil(m / 128), math.ceil(n / 128))
        assert m % 128 or n % 128  # the fixture's dims make partial edge tiles
        ref = np.empty_like(vals)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
                ref[blk] = vals[blk] * scale[i, j]
        np.testing.assert_array_equal(got[name].numpy(), ref, err_msg=name)
        assert got[name].dtype == torch.float32
    assert moved >= 1, "fixture must put at least one attention scale in another shard than its weight"


def test_fp8_dequant_close_to_planted(deepseek_ckpt):
    # The generator quantized known float32 matrices: dequantized values are within FP8 precision.
    ck = deepseek_ckpt
    src = open_checkpoint(resolve_model(str(ck.folder)))
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 152 rows: a partial row tile
    w = src.read_tensors([name])[name]
    p = ck.planted[name]
    assert torch.allclose(w, p, rtol=0.07, atol=1e-3 * p.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_dtypes_widen_exactly(tmp_path, dtype):
    from svd_probe.testing.checkpoints import write_checkpoint

    g = torch.Generator().manual_seed(3)
    tensors = {
        "b.weight": torch.randn(33, 17, generator=g).to(dtype),
        "a.weight": torch.randn(7, generator=g).to(dtype),
    }
    write_checkpoint(tmp_path / "m", tensors, {"model_type": "x"}, 1)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    src = open_checkpoint(resolve_model(str(tmp_path / "m")))
    got = src.read_tensors(["a.weight", "b.weight"])
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        for n in ("a.weight", "b.weight"):
            assert got[n].dtype == torch.float32
            assert torch.equal(got[n], f.get_tensor(n).float())
            assert src.storage_dtype(n) == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]


def test_dequant_rejects_wrong_scale_grid():
    w = torch.zeros(200, 130, dtype=torch.float8_e4m3fn)
    with pytest.raises(CorruptShardError, match="scale_inv"):
        dequantize_fp8_blocks(w, torch.ones(1, 2))
    full = dequantize_fp8_blocks(torch.ones(256, 128).to(torch.float8_e4m3fn), torch.tensor([[2.0], [3.0]]))
    assert full[:128].eq(2).all() and full[128:].eq(3).all()


def test_generator_layout_properties(deepseek_ckpt, kimi_ckpt):
    ck = deepseek_ckpt
    shards = sorted(set(ck.weight_map.values()))
    assert shards[0] == "model-00001-of-000005.safetensors" and len(shards) == 5
    assert sorted(set(kimi_ckpt.weight_map.values()))[0] == "model-1-of-4.safetensors"
    assert ck.config["num_nextn_predict_layers"] == 1 and "model.layers.3.eh_proj.weight" in ck.weight_map  # MTP layer
    # Tensors are not stored in name order, and experts hold most bytes.
    h, _ = _header_of(ck.folder / shards[1])
    by_offset = [t.name for t in sorted(h.tensors.values(), key=lambda t: t.begin)]
    assert by_offset != sorted(by_offset)
    total = sum((ck.folder / s).stat().st_size for s in shards)
    experts = 0
    for s in shards:
        hh, _ = _header_of(ck.folder / s)
        experts += sum(t.nbytes for t in hh.tensors.values() if ".mlp.experts." in t.name)
    assert experts > 0.5 * total


def test_planted_rank_is_exact_in_f32(tmp_path):
    from svd_probe.testing.checkpoints import build_deepseek_v3

    ck = build_deepseek_v3(
        tmp_path / "r",
        layers=1,
        mtp_layers=0,
        n_experts=1,
        n_shards=2,
        attn_dtype="f32",
        ranks={"o_proj": 3, "kv_b_proj": 5},
    )
    src = open_checkpoint(resolve_model(str(ck.folder)))
    a = "model.layers.0.self_attn."
    got = src.read_tensors([a + "o_proj.weight", a + "kv_b_proj.weight"])
    for name, r in ((a + "o_proj.weight", 3), (a + "kv_b_proj.weight", 5)):
        s = torch.linalg.svdvals(got[name].double())
        assert s[r - 1] > 1e-3 * s[0] and s[r] < 1e-5 * s[0]  # float32 storage rounding only
        assert torch.equal(got[name], ck.planted[name])
