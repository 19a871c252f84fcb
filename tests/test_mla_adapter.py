"""The MLA adapter slices DeepSeek-layout tensors into heads exactly as docs/reference.md §1 says.

The expectations are built by hand, row by row, from the documented layout: per head, q_b_proj
has d_nope rows then d_rope rows; kv_b_proj has d_nope key rows then d_v value rows (interleaved
per head, *not* a first half of keys); o_proj's columns are head-major.
"""

import numpy as np
import pytest
import torch

from svd_probe.adapters import adapter_for, supported_model_types
from svd_probe.errors import UnsupportedModelError

N, D_NOPE, D_ROPE, D_V, H, QL, KVL = 3, 4, 2, 5, 11, 7, 6


def _config(q_lora=QL, model_type="deepseek_v3"):
    return {
        "model_type": model_type,
        "hidden_size": H,
        "num_attention_heads": N,
        "num_hidden_layers": 2,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": q_lora,
        "kv_lora_rank": KVL,
        "qk_nope_head_dim": D_NOPE,
        "qk_rope_head_dim": D_ROPE,
        "v_head_dim": D_V,
    }


def _tensors(prefix="model.layers.1.", q_latent=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a = prefix + "self_attn."
    t = {
        prefix + "input_layernorm.weight": r(H).abs() + 0.5,
        a + "kv_a_proj_with_mqa.weight": r(KVL + D_ROPE, H),
        a + "kv_a_layernorm.weight": r(KVL).abs() + 0.5,
        a + "kv_b_proj.weight": r(N * (D_NOPE + D_V), KVL),
        a + "o_proj.weight": r(H, N * D_V),
    }
    if q_latent:
        t[a + "q_a_proj.weight"] = r(QL, H)
        t[a + "q_a_layernorm.weight"] = r(QL).abs() + 0.5
        t[a + "q_b_proj.weight"] = r(N * (D_NOPE + D_ROPE), QL)
    else:
        t[a + "q_proj.weight"] = r(N * (D_NOPE + D_ROPE), H)
    return t


ALL = {"Q", "Q_pe", "K", "V", "O", "VO", "QK", "KQ", "QA", "KVA", "KVA_pe"}


@pytest.mark.parametrize("fold", [True, False])
def test_heads_and_latents_follow_the_documented_layout(fold):
    t = _tensors()
    ad = adapter_for(_config(), set(t))
    names = ad.layer_tensor_names(1, ALL, fold)
    assert set(names) == {n for n in t if fold or "norm" not in n}
    f = ad.factors(1, {n: t[n] for n in names}, ALL, fold)
    a = "model.layers.1.self_attn."
    x = {k: v.numpy().astype(np.float64) for k, v in t.items()}
    g_in = x["model.layers.1.input_layernorm.weight"] if fold else np.ones(H)
    g_q = x[a + "q_a_layernorm.weight"] if fold else np.ones(QL)
    g_kv = x[a + "kv_a_layernorm.weight"] if fold else np.ones(KVL)
    for h in range(N):
        qb = x[a + "q_b_proj.weight"]
        row0 = h * (D_NOPE + D_ROPE)
        np.testing.assert_allclose(f.q[h].numpy(), qb[row0 : row0 + D_NOPE] * g_q, rtol=1e-6)
        np.testing.assert_allclose(f.q_pe[h].numpy(), qb[row0 + D_NOPE : row0 + D_NOPE + D_ROPE] * g_q, rtol=1e-6)
        kvb = x[a + "kv_b_proj.weight"]
        row0 = h * (D_NOPE + D_V)
        np.testing.assert_allclose(f.k[h].numpy(), kvb[row0 : row0 + D_NOPE] * g_kv, rtol=1e-6)
        np.testing.assert_allclose(f.v[h].numpy(), kvb[row0 + D_NOPE : row0 + D_NOPE + D_V] * g_kv, rtol=1e-6)
        np.testing.assert_allclose(f.o[h].numpy(), x[a + "o_proj.weight"][:, h * D_V : (h + 1) * D_V], rtol=1e-6)
    np.testing.assert_allclose(f.layer["QA"].numpy(), x[a + "q_a_proj.weight"] * g_in, rtol=1e-6)
    kva = x[a + "kv_a_proj_with_mqa.weight"] * g_in
    np.testing.assert_allclose(f.layer["KVA"].numpy(), kva[:KVL], rtol=1e-6)
    np.testing.assert_allclose(f.layer["KVA_pe"].numpy(), kva[KVL:], rtol=1e-6)


def test_only_the_tensors_a_kind_needs_are_named():
    ad = adapter_for(_config(), None)
    a = "model.layers.0.self_attn."
    assert ad.layer_tensor_names(0, {"O"}, True) == [a + "o_proj.weight"]
    assert set(ad.layer_tensor_names(0, {"VO"}, True)) == {
        a + "o_proj.weight",
        a + "kv_b_proj.weight",
        a + "kv_a_layernorm.weight",
    }
    assert set(ad.layer_tensor_names(0, {"VO"}, False)) == {a + "o_proj.weight", a + "kv_b_proj.weight"}
    assert set(ad.layer_tensor_names(0, {"QA"}, True)) == {
        a + "q_a_proj.weight",
        "model.layers.0.input_layernorm.weight",
    }


def test_no_query_latent_reads_q_proj_with_the_input_norm_folded():
    t = _tensors(q_latent=False)
    cfg = _config(q_lora=None, model_type="deepseek_v2")
    ad = adapter_for(cfg, set(t))
    assert "QA" not in ad.supported_kinds()
    names = ad.layer_tensor_names(1, {"Q", "Q_pe"}, True)
    assert set(names) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"}
    f = ad.factors(1, {n: t[n] for n in names}, {"Q", "Q_pe"}, True)
    qp = t["model.layers.1.self_attn.q_proj.weight"].numpy() * t["model.layers.1.input_layernorm.weight"].numpy()
    np.testing.assert_allclose(f.q[2].numpy(), qp[2 * (D_NOPE + D_ROPE) : 2 * (D_NOPE + D_ROPE) + D_NOPE], rtol=1e-6)
    assert f.q.shape == (N, D_NOPE, H)


def test_a_language_model_prefix_is_discovered_from_the_names():
    t = _tensors(prefix="language_model.model.layers.1.")
    t["language_model.model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    ad = adapter_for(_config(model_type="kimi_k2"), set(t))
    names = ad.layer_tensor_names(1, {"O"}, True)
    assert names == ["language_model.model.layers.1.self_attn.o_proj.weight"]


def test_dims_count_the_mtp_layer():
    d = adapter_for(_config(), None).dims()
    assert (d.num_layers, d.num_mtp_layers, d.n_heads, d.kv_latent, d.q_latent) == (3, 1, N, KVL, QL)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        adapter_for({"model_type": "mamba"}, None)
    assert "mamba" in e.value.message
    for t in ("deepseek_v3", "kimi_k2"):
        assert t in e.value.hint
    assert "deepseek_v3" in supported_model_types()
