"""config.json against the checkpoint: malformed fields and shapes that disagree end in typed errors.

Each case was silently wrong or a traceback before: `num_key_value_heads: 0` sliced K and V as if
every head had its own; `num_hidden_layers: 1.5` analysed one layer; `"sixty-four"` or `[4]`
raised ValueError / TypeError; a tensor of the wrong shape was read whole before anything was
checked. Now each names the field (and the tensor), exits non-zero through the CLI without a
traceback, and a shape mismatch is found in the header, before a tensor byte is read.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from svd_probe.adapters import adapter_for
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import BadConfigError, SvdProbeError, UnsupportedModelError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.testing.layouts import build_layout, write_layout


def _folder_with(tmp_path, name="llama", **changes):
    """The layout written as is, with config.json fields changed (None deletes a field)."""
    layout = build_layout(name)
    folder = write_layout(tmp_path / name, layout, n_shards=2)
    config = dict(layout.config)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _analyze(folder, tmp_path, **kw):
    return analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "cache", device="cpu", **kw))


# --- malformed fields -----------------------------------------------------------------------------

BAD_FIELDS = [
    ("num_hidden_layers", 1.5, "not an integer"),
    ("num_hidden_layers", 1e9, "not an integer"),
    ("num_hidden_layers", 1e30, "not an integer"),
    ("num_hidden_layers", "sixty-four", "not an integer"),
    ("num_hidden_layers", [4], "not an integer"),
    ("num_hidden_layers", True, "not an integer"),
    ("num_hidden_layers", 10**9, "from 1 to"),
    ("num_hidden_layers", 0, "from 1 to"),
    ("num_attention_heads", 0, "from 1 to"),
    ("num_attention_heads", -4, "from 1 to"),
    ("num_attention_heads", "8", "not an integer"),
    ("num_key_value_heads", 0, "from 1 to"),
    ("num_key_value_heads", -2, "from 1 to"),
    ("hidden_size", 64.0, "not an integer"),
    ("head_dim", {"x": 1}, "not an integer"),
    ("num_attention_heads", None, "has no num_attention_heads"),
    ("num_hidden_layers", None, "has no num_hidden_layers"),
    ("hidden_size", None, "has no hidden_size"),
]


@pytest.mark.parametrize("field,value,needle", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_a_malformed_field_is_named(tmp_path, field, value, needle):
    folder = _folder_with(tmp_path, **{field: value})
    with pytest.raises(BadConfigError) as e:
        _analyze(folder, tmp_path)
    assert e.value.field == field and field in e.value.message and needle in e.value.message
    assert e.value.hint
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("layer-*"))


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("gpt2", "n_head", 0),
        ("gpt2", "n_layer", "2"),
        ("bert", "num_attention_heads", 2.5),
        ("deepseek_v3", "kv_lora_rank", None),
        ("deepseek_v3", "qk_rope_head_dim", -1),
        ("deepseek_v3", "num_nextn_predict_layers", "one"),
        ("deepseek_v3", "q_lora_rank", 0),
    ],
)
def test_every_layout_validates_its_fields(tmp_path, name, field, value):
    folder = _folder_with(tmp_path, name, **{field: value})
    with pytest.raises(BadConfigError) as e:
        _analyze(folder, tmp_path)
    assert e.value.field == field


def test_the_cli_prints_the_field_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    from svd_probe.cli import main

    folder = _folder_with(tmp_path, num_hidden_layers="sixty-four")
    monkeypatch.setattr(sys, "argv", ["svd-probe", "analyze", str(folder), "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "num_hidden_layers" in err and "sixty-four" in err


def test_a_layer_count_beyond_the_checkpoint_is_refused_before_any_header(tmp_path):
    # 1e9 layers grew memory without bound; 40 layers of a 2-layer checkpoint failed at layer 2.
    folder = _folder_with(tmp_path, num_hidden_layers=40)
    with pytest.raises(BadConfigError, match=r"num_hidden_layers is 40.*layers 0-1 only") as e:
        _analyze(folder, tmp_path)
    assert e.value.field == "num_hidden_layers"
    src = open_checkpoint(str(folder))
    with pytest.raises(BadConfigError):
        adapter_for(src.config, src.tensor_names)
    assert src.bytes_fetched == 0  # the index lists the names: no shard header was needed


def test_tensors_of_another_layout_are_refused(tmp_path):
    layout = build_layout("llama")
    folder = write_layout(tmp_path / "m", layout)
    (folder / "config.json").write_text(json.dumps({**build_layout("gpt2").config}))
    with pytest.raises(UnsupportedModelError, match="does not look like a gpt2 checkpoint"):
        _analyze(folder, tmp_path)


# --- fields that parse but disagree with the tensors ------------------------------------------------


@pytest.mark.parametrize(
    "changes,tensor,field",
    [
        # The layout has 8 heads, 2 key/value heads of width 8 in a 64-wide stream. (Fields that
        # multiply out to the stored shapes, e.g. 4 heads of 16 with 1 kv head, cannot be told
        # from the truth by shapes; those the config is taken at its word for.)
        ({"num_key_value_heads": 4}, ("k_proj",), "num_key_value_heads"),
        ({"num_key_value_heads": 1}, ("k_proj",), "num_key_value_heads"),
        ({"num_attention_heads": 4}, ("q_proj", "o_proj"), "num_attention_heads"),
        ({"head_dim": 16}, ("q_proj", "o_proj", "k_proj"), "head_dim"),
        ({"hidden_size": 32}, ("input_layernorm", "q_proj", "o_proj", "k_proj"), "hidden_size"),
    ],
)
def test_a_field_that_disagrees_with_a_tensor_names_both(tmp_path, changes, tensor, field):
    folder = _folder_with(tmp_path, **changes)
    with pytest.raises(BadConfigError) as e:
        _analyze(folder, tmp_path)
    assert any(t in e.value.tensor for t in tensor) and field in e.value.field.split(", ")
    msg = e.value.message
    assert "config.json implies" in msg and f"{field}=" in msg


def test_a_mis_shaped_tensor_is_refused_before_its_bytes_are_read(tmp_path):
    """A q_proj with a wrong shape (here: 4 extra rows) is found in the shard header: the reader
    fetches headers only, not the tensor (a 2 GiB tensor used to be read whole first)."""
    layout = build_layout("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    big = torch.randn(64 + 4, 64).to(torch.bfloat16)
    layout.tensors[name] = big
    folder = write_layout(tmp_path / "m", layout)
    src = open_checkpoint(str(folder))
    ad = adapter_for(src.config, src.tensor_names)
    plan = ad.plan(0, {"Q"}, True)
    with pytest.raises(BadConfigError) as e:
        src.read_tensors(plan)
    assert e.value.tensor == name
    assert "[68, 64]" in e.value.message and "[64, 64] = [num_attention_heads·head_dim, hidden_size]" in e.value.message
    assert src.bytes_fetched == src.stats["header_bytes"]  # headers, not one tensor byte
    # Without a plan (bare names) the reader has no expectation and reads the tensor as stored.
    assert src.read_tensors([name])[name].shape == (68, 64)


def test_mla_heads_that_disagree_with_kv_b_are_named(tmp_path):
    layout = build_layout("deepseek_v3")
    n = layout.config["num_attention_heads"]
    folder = write_layout(tmp_path / "m", layout)
    cfg = {**layout.config, "num_attention_heads": n * 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadConfigError) as e:
        _analyze(folder, tmp_path, matrices="VO")
    assert e.value.tensor.endswith(("kv_b_proj.weight", "o_proj.weight"))
    assert "num_attention_heads" in e.value.field


def test_weight_block_size_is_validated(tmp_path):
    folder = _folder_with(
        tmp_path, "deepseek_v3", quantization_config={"quant_method": "fp8", "weight_block_size": [0, 128]}
    )
    with pytest.raises(BadConfigError, match="weight_block_size"):
        open_checkpoint(str(folder))
    (folder / "config.json").write_text(
        json.dumps({**build_layout("deepseek_v3").config, "quantization_config": "fp8"})
    )
    with pytest.raises(BadConfigError, match="quantization_config"):
        open_checkpoint(str(folder))


def test_valid_configs_still_work_and_errors_are_typed(tmp_path):
    # The same helpers on a good config give the documented dims.
    d = adapter_for(build_layout("llama").config).dims()
    assert (d.n_heads, d.n_kv_groups, d.d_qk, d.num_layers) == (8, 2, 8, 2)
    assert issubclass(BadConfigError, UnsupportedModelError) and issubclass(BadConfigError, SvdProbeError)
