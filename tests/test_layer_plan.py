"""The per-layer plan: the adapter says once what a layer reads, the shape of each tensor and which
weights each matrix kind comes from; the reader returns storage dtypes with the tensors; the
`models` table and the dtype table use the same facts."""

from __future__ import annotations

import math

import pytest
import safetensors.torch as st_torch
import torch

from svd_probe.adapters import LayerPlan, adapter_for
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.hub.dtypes import DTYPES, coarsest, safetensors_name
from svd_probe.hub.stream import stream_layers
from svd_probe.known_models import KNOWN_CONFIGS, attention_tensor_shapes
from svd_probe.testing.layouts import LAYOUTS, build_layout, write_layout


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_planned_shape_is_the_stored_shape(name):
    layout = build_layout(name)
    ad = adapter_for(layout.config, set(layout.tensors))
    kinds = set(ad.supported_kinds())
    for layer in range(ad.dims().num_layers):
        plan = ad.plan(layer, kinds, True)
        assert isinstance(plan, LayerPlan) and plan.layer == layer
        assert plan.shapes == {n: tuple(layout.tensors[n].shape) for n in plan.tensors}
        # A kind's weights are among what is read, and are projections (2-D), never norms.
        for kind, names in plan.kind_tensors.items():
            assert names and set(names) <= set(plan.tensors), kind
            assert all(layout.tensors[n].dim() == 2 for n in names), (kind, names)


@pytest.mark.parametrize(
    "name,kind,weights",
    [
        ("llama", "VO", ["self_attn.o_proj.weight", "self_attn.v_proj.weight"]),
        ("qwen3", "Q", ["self_attn.q_proj.weight"]),
        ("gpt2", "K", ["attn.c_attn.weight"]),
        ("deepseek_v3", "QK", ["self_attn.kv_b_proj.weight", "self_attn.q_b_proj.weight"]),
        ("deepseek_v3", "KVA_pe", ["self_attn.kv_a_proj_with_mqa.weight"]),
    ],
)
def test_kind_tensors_exclude_the_norms_that_are_read(name, kind, weights):
    layout = build_layout(name)
    ad = adapter_for(layout.config, set(layout.tensors))
    plan = ad.plan(1, {kind}, fold_norms=True)
    p = f"{layout.layer_prefix}1."
    assert list(plan.kind_tensors[kind]) == [p + w for w in weights]
    assert set(plan.tensors) > set(plan.kind_tensors[kind])  # a norm is read for the fold


def test_the_plan_explains_each_shape():
    ad = adapter_for(build_layout("llama").config)
    spec = ad.plan(0, {"K"}, False).specs["model.layers.0.self_attn.k_proj.weight"]
    assert spec.explain() == (
        "[16, 64] = [num_key_value_heads·head_dim, hidden_size] with num_key_value_heads=2, head_dim=8, hidden_size=64"
    )
    g2 = adapter_for(build_layout("gpt2").config).plan(0, {"O"}, False).specs["h.0.attn.c_proj.weight"]
    assert "head_dim=12 (= n_embd/n_head)" in g2.explain()


def test_read_tensors_returns_storage_dtypes_and_storage_follows_the_plan(tmp_path):
    """Mixed dtypes: o_proj F32, v_proj BF16, q/k F16, the norm F64. Each spectrum records the
    coarsest dtype among the weights the plan names for it; the norm never counts."""
    layout = build_layout("llama")
    p = "model.layers.0."
    dtypes = {
        p + "self_attn.o_proj.weight": torch.float32,
        p + "self_attn.v_proj.weight": torch.bfloat16,
        p + "self_attn.q_proj.weight": torch.float16,
        p + "self_attn.k_proj.weight": torch.float16,
        p + "input_layernorm.weight": torch.float64,
    }
    for n, dt in dtypes.items():
        layout.tensors[n] = layout.tensors[n].to(dt)
    folder = write_layout(tmp_path / "m", layout)
    src = open_checkpoint(str(folder))
    ad = adapter_for(src.config, src.tensor_names)
    lt = src.read_tensors(ad.plan(0, {"VO", "Q"}, True))
    assert lt.dtypes == {n: safetensors_name(dt) for n, dt in dtypes.items() if "k_proj" not in n}
    assert all(t.dtype == torch.float32 for t in lt.values())
    assert (lt.storage_dtype("VO"), lt.storage_dtype("Q")) == ("BF16", "F16")
    run = analyze(AnalyzeJob(model=str(folder), cache_dir=tmp_path / "c", device="cpu", layers="0"))
    got = run.analysis.layer_spectra[0].storage_dtypes
    assert (got["head.VO"], got["head.O"], got["head.V"], got["stacked.QK"], got["head.Q"]) == (
        "BF16",
        "F32",
        "BF16",
        "F16",
        "F16",
    )


def test_stream_layers_takes_plans_or_names(tmp_path):
    folder = write_layout(tmp_path / "m", "qwen2")
    src = open_checkpoint(str(folder))
    ad = adapter_for(src.config, src.tensor_names)
    seen = []
    for layer, lt in stream_layers(src, [1, 0], lambda L: ad.plan(L, {"O"}, True), "cpu"):
        assert lt.plan is not None and lt.plan.layer == layer and list(lt) == list(lt.plan.tensors)
        seen.append(layer)
    assert seen == [1, 0]
    names = ad.layer_tensor_names(0, {"V"}, True)
    ((_, lt),) = stream_layers(src, [0], lambda L: names, "cpu")
    assert lt.plan is None and set(lt.dtypes) == set(names)


# --- one dtype table -------------------------------------------------------------------------------


def test_the_dtype_table_agrees_with_safetensors_and_torch():
    ours = {name: d.torch for name, d in DTYPES.items()}
    theirs = st_torch._TYPES  # safetensors' own table
    for name in set(ours) & set(theirs):
        assert ours[name] == theirs[name], name
    assert {"F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64", "I64", "U8", "BOOL"} <= set(ours) & set(theirs)
    for d in DTYPES.values():
        assert d.size == torch.empty((), dtype=d.torch).element_size(), d.name
        assert safetensors_name(d.torch) == d.name
    assert safetensors_name("bfloat16") == "BF16"
    assert coarsest(["F32", "BF16", "F8_E4M3"]) == "F8_E4M3" and coarsest(["F8_E4M3", "F8_E5M2"]) == "F8_E5M2"
    assert coarsest(["F16", "F64"]) == "F16" and coarsest(["I32"]) is None


# --- the models table from the plans ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,fp8", [("llama", False), ("qwen2", False), ("deepseek_v3", True), ("deepseek_v2_lite", False)]
)
def test_catalog_sizes_come_from_the_plan_and_match_real_tensors(name, fp8):
    layout = build_layout(name, **({"fp8": True} if fp8 else {}))
    rows = attention_tensor_shapes(layout.config)
    for tensor, shape, _ in rows:
        assert tuple(layout.tensors[tensor].shape) == shape, tensor
    names = {t for t, _, _ in rows}
    scales = {n for n in layout.tensors if n.startswith("model.layers.0.self_attn.") and n.endswith("_scale_inv")}
    assert scales <= names and (not fp8 or scales)


def test_known_configs_plan_every_alias():
    for alias, cfg in KNOWN_CONFIGS.items():
        total = sum(math.prod(s) for _, s, _ in attention_tensor_shapes(cfg))
        assert total > 0, alias
