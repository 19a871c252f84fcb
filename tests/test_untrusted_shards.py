"""Hostile or damaged shards and FP8 scales end in typed errors naming file and tensor.

Before: a duplicate tensor key silently took the last definition; shape [2**63, 0] passed the
header checks and failed in torch; a header nested 200k deep or holding a 5000-digit integer
raised RecursionError / ValueError; an F8 weight whose `_scale_inv` was missing was used unscaled
(σ 8× too small here); NaN or Inf weights made the eigensolver fail with a traceback; and a
header-length error printed a file's first 8 bytes as an integer.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import CorruptShardError, UnsupportedModelError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.safetensors_header import parse_header, parse_header_length
from svd_probe.testing.checkpoints import write_checkpoint
from svd_probe.testing.layouts import build_layout, write_layout


def _blob(header: bytes, data: bytes = b"\0" * 64) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _parse(blob: bytes, file: str = "model.safetensors"):
    n = parse_header_length(blob[:8], file, len(blob))
    return parse_header(blob[8 : 8 + n], file, len(blob))


# --- the header parser ------------------------------------------------------------------------------


def test_a_duplicate_tensor_key_is_refused():
    header = (
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        b' "w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}'
    )
    assert json.loads(header)["w"]["shape"] == [4]  # what json.loads alone would have kept
    with pytest.raises(CorruptShardError, match="defines this key twice") as e:
        _parse(_blob(header))
    assert e.value.tensor == "w" and e.value.file == "model.safetensors"


def test_a_duplicate_key_inside_an_entry_is_refused():
    header = b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'
    with pytest.raises(CorruptShardError, match="twice"):
        _parse(_blob(header))


@pytest.mark.parametrize(
    "shape,offsets",
    [([2**63, 0], [0, 0]), ([2**64 + 5, 0], [0, 0]), ([2**32, 2**32, 0], [0, 0]), ([2**40, 2**40], [0, 8])],
)
def test_shapes_whose_byte_count_overflows_are_refused(shape, offsets):
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    with pytest.raises(CorruptShardError, match="overflows a 64-bit byte count") as e:
        _parse(_blob(header))
    assert e.value.tensor == "w"


def test_a_zero_sized_shape_that_fits_still_parses():
    h = _parse(_blob(json.dumps({"w": {"dtype": "F32", "shape": [2**20, 0], "data_offsets": [0, 0]}}).encode()))
    assert h.tensors["w"].shape == (2**20, 0) and h.tensors["w"].nbytes == 0


@pytest.mark.parametrize(
    "header,needle",
    [
        (b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
        (b'{"__metadata__": ' + b'{"a": ' * 200_000 + b"1" + b"}" * 200_001, "nested too deeply"),
        (b'{"w": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}', "number too long"),
        (b'{"w": \xff\xfe}', "not UTF-8"),
    ],
    ids=["deep-array", "deep-object", "5000-digit-int", "not-utf8"],
)
def test_adversarial_json_is_a_typed_error(header, needle):
    with pytest.raises(CorruptShardError, match=needle):
        _parse(_blob(header), "x.safetensors")


def test_a_huge_value_is_cut_short_in_the_message():
    header = json.dumps({"w": {"dtype": "F" + "7" * 100_000, "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(CorruptShardError) as e:
        _parse(_blob(header))
    assert len(str(e.value)) < 400


@pytest.mark.parametrize(
    "prefix,size,needle",
    [
        (b"PRIVATE!", 10_000, "exceeds"),  # any text file: its first 8 bytes are a huge "length"
        (struct.pack("<Q", 10_007), 500, "past the end"),
        (struct.pack("<Q", 1), 500, "too small"),
    ],
)
def test_header_length_errors_never_print_the_files_bytes_as_a_number(tmp_path, prefix, size, needle):
    number = str(struct.unpack("<Q", prefix)[0])
    with pytest.raises(CorruptShardError, match=needle) as e:
        parse_header_length(prefix, "notes.safetensors", size)
    assert number not in str(e.value)
    # Through a local folder, as a user meets it.
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(prefix + b"x" * (size - 8))
    with pytest.raises(CorruptShardError) as e:
        open_checkpoint(str(folder))
    assert number not in str(e.value)


# --- FP8 scales --------------------------------------------------------------------------------------


def _fp8_layout_without(scale_of: str):
    layout = build_layout("deepseek_v3", fp8=True)
    del layout.tensors[scale_of + "_scale_inv"]
    return layout


def test_a_missing_scale_under_an_fp8_config_names_the_weight(tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    folder = write_layout(tmp_path / "m", _fp8_layout_without(name))
    with pytest.raises(CorruptShardError, match="has no .*o_proj.weight_scale_inv.*declares fp8") as e:
        analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", layers="0"))
    assert e.value.tensor == name
    # Reading the weight alone fails the same way: nothing hands out unscaled values.
    with pytest.raises(CorruptShardError):
        open_checkpoint(str(folder)).read_tensors([name])


def test_unscaled_f8_without_any_quantization_config_is_read_as_stored(tmp_path):
    """Decision: an F8 tensor with no quantization config and no scale tensor is a model cast to
    float8 and saved as is; its stored values are the weights."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(40, 24, generator=g) * 3).to(torch.float8_e4m3fn)
    write_checkpoint(tmp_path / "m", {"a.weight": w}, {"model_type": "x"})
    src = open_checkpoint(str(tmp_path / "m"))
    got = src.read_tensors(["a.weight"])
    assert got.dtypes == {"a.weight": "F8_E4M3"}
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert torch.equal(got["a.weight"], f.get_tensor("a.weight").float())


def test_another_fp8_scheme_is_refused_not_read_unscaled(tmp_path):
    w = torch.ones(8, 8).to(torch.float8_e4m3fn)
    tensors = {"a.weight": w, "a.weight_scale": torch.tensor([0.5])}
    write_checkpoint(tmp_path / "m", tensors, {"model_type": "x", "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(UnsupportedModelError, match="a.weight_scale"):
        open_checkpoint(str(tmp_path / "m")).read_tensors(["a.weight"])


def test_a_scale_grid_of_the_wrong_shape_is_refused_before_reading(tmp_path):
    layout = build_layout("deepseek_v3", fp8=True)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    layout.tensors[name + "_scale_inv"] = torch.ones(500, 500)  # a 1 MB scale for a tiny weight
    folder = write_layout(tmp_path / "m", layout)
    src = open_checkpoint(str(folder))
    with pytest.raises(CorruptShardError, match="scale_inv has shape") as e:
        src.read_tensors([name])
    assert e.value.tensor == name + "_scale_inv"
    assert src.bytes_fetched == src.stats["header_bytes"]


# --- non-finite values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(tmp_path, bad):
    layout = build_layout("llama")
    name = "model.layers.1.self_attn.v_proj.weight"
    layout.tensors[name][3, 5] = bad
    folder = write_layout(tmp_path / "m", layout)
    with pytest.raises(CorruptShardError, match="1 of its .* values are NaN or infinite") as e:
        analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu"))
    assert e.value.tensor == name
    # Layer 0 came before the damage and was cached; nothing of layer 1 was.
    cache_layers = sorted(p.name for p in (tmp_path / "c").rglob("layer-*.safetensors"))
    assert cache_layers == ["layer-0000.safetensors"]


def test_a_non_finite_fp8_scale_is_named(tmp_path):
    layout = build_layout("deepseek_v3", fp8=True)
    scale = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    layout.tensors[scale][0, 0] = float("inf")
    folder = write_layout(tmp_path / "m", layout)
    with pytest.raises(CorruptShardError) as e:
        analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", layers="1"))
    assert e.value.tensor == scale


def test_finite_fp8_is_unchanged(tmp_path):
    # The checks add no rounding: dequantized values equal tile-by-tile numpy.
    layout = build_layout("deepseek_v3", fp8=True)
    folder = write_layout(tmp_path / "m", layout)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    got = open_checkpoint(str(folder)).read_tensors([name])[name].numpy()
    w = layout.tensors[name].to(torch.float32).numpy()
    s = layout.tensors[name + "_scale_inv"].numpy()
    ref = w * np.kron(s, np.ones((16, 16), dtype=np.float32))[: w.shape[0], : w.shape[1]]  # float32 products
    np.testing.assert_array_equal(got, ref)
