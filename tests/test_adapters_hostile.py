"""Adapters and option parsers against hostile or inconsistent config.json, tensor names and options.

Each case was a traceback, a silently different result, or an unbounded wait or allocation before:
- an MLA config with `qk_rope_head_dim: 0` (and tensors to match) ended in an IndexError in the
  spectra code, on the empty Q_pe and KVA_pe matrices;
- a GPT-2 config that spells one field two ways with different values (`n_head: 4`,
  `num_attention_heads: 6`) was split by `n_head`, while transformers runs it with 6 heads;
- a tensor name with a 5000-digit layer number raised ValueError (int's 4300-digit limit), and
  one with a long run of digits took the layer-prefix regex quadratic time (a minute for 100k);
- `--layers` with a 5000-digit number raised ValueError, and a 3 KB `--layers` repeating
  `0-100000` built a list of 3·10⁷ integers (1.1 GB) before removing the duplicates;
- a head split that only tensors not read can refute (a Llama config of 16 heads of 4 for the
  stored 8 of 8 under `--matrices O`: o_proj is square) gave 16 silently wrong per-head spectra,
  where the full analysis refused it.
"""

from __future__ import annotations

import json
import sys
import time
import tracemalloc

import numpy as np
import pytest

from svd_probe.adapters import adapter_for
from svd_probe.adapters.common import find_layers
from svd_probe.analysis import AnalyzeJob, analyze
from svd_probe.errors import BadConfigError, BadOptionError
from svd_probe.hub.checkpoint import open_checkpoint
from svd_probe.options import MAX_LAYER, parse_layers, parse_matrices
from svd_probe.testing.layouts import build_layout, write_layout


def _analyze(folder, cache, **kw):
    return analyze(AnalyzeJob(model=str(folder), cache_dir=cache, device="cpu", **kw))


def _sigma(outcome, layer=0):
    return {k: np.asarray(v) for k, v in outcome.analysis.layer_spectra[layer].sigma.items()}


def _cli(monkeypatch, capsys, *args):
    from svd_probe.cli import main

    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


# --- MLA without decoupled RoPE ------------------------------------------------------------------


def _without_rope(layout):
    """The DeepSeek-V3 layout with its RoPE rows removed: q_b_proj keeps each head's no-RoPE rows,
    kv_a_proj_with_mqa its latent rows; config.json says qk_rope_head_dim 0."""
    c = layout.config
    n, nope, rope, kv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["kv_lora_rank"]
    for name, w in list(layout.tensors.items()):
        if name.endswith("self_attn.q_b_proj.weight"):
            layout.tensors[name] = w.reshape(n, nope + rope, -1)[:, :nope].reshape(n * nope, -1).contiguous()
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            layout.tensors[name] = w[:kv].contiguous()
    layout.config = layout.text_config = {**c, "qk_rope_head_dim": 0}
    return layout


def test_mla_without_rope_rows_is_analysed_like_the_rows_it_has(tmp_path):
    """Old: IndexError (`sigma[:, 0]` of an empty Q_pe) with a traceback. Now Q_pe and KVA_pe,
    which have no rows, are not kinds of the model, and every other spectrum equals the one of
    the same checkpoint with its RoPE rows (which none of them reads)."""
    full = write_layout(tmp_path / "full", build_layout("deepseek_v3"))
    bare = write_layout(tmp_path / "bare", _without_rope(build_layout("deepseek_v3")))
    want = _sigma(_analyze(full, tmp_path / "c1", layers="0"))
    got = _sigma(_analyze(bare, tmp_path / "c2", layers="0"))
    ad = adapter_for(json.loads((bare / "config.json").read_text()))
    assert "Q_pe" not in ad.supported_kinds() and "KVA_pe" not in ad.supported_kinds()
    assert set(got) == {k for k in want if not k.endswith(("Q_pe", "KVA_pe"))}
    for key, sigma in got.items():
        np.testing.assert_allclose(sigma, want[key], rtol=1e-5, atol=1e-6 * want[key].max(), err_msg=key)
    with pytest.raises(BadOptionError, match="no Q_pe"):
        _analyze(bare, tmp_path / "c3", layers="0", matrices="Q_pe")


# --- GPT-2's two spellings of a field ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,fields",
    [
        ({"num_attention_heads": 6}, "n_head, num_attention_heads"),
        ({"hidden_size": 24}, "n_embd, hidden_size"),
        ({"num_hidden_layers": 1}, "n_layer, num_hidden_layers"),
    ],
)
def test_gpt2_fields_spelled_twice_must_agree(tmp_path, monkeypatch, capsys, extra, fields):
    """Old: n_head 4 with num_attention_heads 6 gave 4-head spectra (transformers runs 6 heads,
    and the square c_attn/c_proj shapes cannot tell); hidden_size / num_hidden_layers likewise."""
    layout = build_layout("gpt2")
    folder = write_layout(tmp_path / "m", layout, n_shards=1)
    (folder / "config.json").write_text(json.dumps({**layout.config, **extra}))
    with pytest.raises(BadConfigError) as e:
        adapter_for(json.loads((folder / "config.json").read_text()))
    assert e.value.field == fields and "two names of one field" in e.value.message
    code, err = _cli(monkeypatch, capsys, "analyze", str(folder), "--device", "cpu", "--cache-dir", str(tmp_path / "c"))
    assert code not in (0, None) and "Traceback" not in err and fields.split(", ")[1] in err
    assert not list((tmp_path / "c").rglob("layer-*"))


def test_gpt2_fields_spelled_twice_alike_still_work(tmp_path):
    layout = build_layout("gpt2")
    c = layout.config
    base = write_layout(tmp_path / "a", layout, n_shards=1)
    twice = write_layout(tmp_path / "b", layout, n_shards=1)
    generic = {"num_attention_heads": c["n_head"], "hidden_size": c["n_embd"], "num_hidden_layers": c["n_layer"]}
    (twice / "config.json").write_text(json.dumps({**c, **generic}))
    want, got = _sigma(_analyze(base, tmp_path / "c1")), _sigma(_analyze(twice, tmp_path / "c2"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


# --- tensor names with long layer numbers ---------------------------------------------------------


def test_a_layer_number_too_long_for_int_is_not_a_layer(tmp_path):
    """Old: ValueError (int's 4300-digit limit) with a traceback, before any header was read."""
    layout = build_layout("llama")
    o = "model.layers.0.self_attn.o_proj.weight"
    layout.tensors["model.layers." + "7" * 5000 + ".self_attn.o_proj.weight"] = layout.tensors[o].clone()
    folder = write_layout(tmp_path / "m", layout)
    clean = write_layout(tmp_path / "clean", build_layout("llama"))
    got = _sigma(_analyze(folder, tmp_path / "c1", layers="1"), 1)
    want = _sigma(_analyze(clean, tmp_path / "c2", layers="1"), 1)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_finding_the_layers_takes_no_time_on_long_digit_runs():
    """Old: the regex `^(.*?)(\\d+)\\.suffix$` backtracked quadratically: 6 s for this 40k-digit
    name (a minute at 100k; a header may hold 100 MB of names)."""
    names = {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)}
    t = time.perf_counter()
    layers = find_layers(names | {"1" * 40_000 + ".x"}, "self_attn.o_proj.weight")
    assert time.perf_counter() - t < 1.0
    assert layers.prefix == "model.layers." and layers.present == {0, 1}
    long_layer = "model.layers." + "2" * 40_000 + ".self_attn.o_proj.weight"
    assert find_layers(names | {long_layer}, "self_attn.o_proj.weight").present == {0, 1}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.12.self_attn.o_proj.weight", ("model.layers.", 12)),
        ("0.self_attn.o_proj.weight", ("", 0)),
        ("h12.self_attn.o_proj.weight", ("h", 12)),
        ("model.layers.x.self_attn.o_proj.weight", None),
        (".self_attn.o_proj.weight", None),
        ("model.layers.1self_attn.o_proj.weight", None),
        ("model.layers.1.self_attn.o_proj.weight.extra", None),
        ("model.layers.1234567.self_attn.o_proj.weight", None),  # more digits than any layer number
    ],
)
def test_layer_names_parse_as_the_regex_did(name, expected):
    """As `^(.*?)(\\d+)\\.suffix$` parsed them, but for layer numbers beyond any model."""
    layers = find_layers({name}, "self_attn.o_proj.weight")
    if expected is None:
        assert layers.present == frozenset()
    else:
        assert (layers.prefix, set(layers.present)) == (expected[0], {expected[1]})


# --- --layers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["9" * 5000, "0-" + "9" * 5000, "1" * 7])
def test_a_layer_number_with_too_many_digits_is_refused(spec):
    """Old: ValueError from int() (over 4300 digits), a traceback through the CLI."""
    with pytest.raises(BadOptionError, match="beyond any model") as e:
        parse_layers(spec)
    assert len(e.value.message) < 300


def test_the_cli_refuses_a_5000_digit_layer_without_a_traceback(tmp_path, monkeypatch, capsys):
    folder = write_layout(tmp_path / "m", build_layout("llama"))
    code, err = _cli(monkeypatch, capsys, "analyze", str(folder), "--layers", "9" * 5000, "--device", "cpu")
    assert code not in (0, None) and "Traceback" not in err and "beyond any model" in err


def test_repeated_layer_ranges_take_bounded_memory():
    """Old: every range was expanded into one list before duplicates were removed: 30 copies of
    0-100000 (270 bytes) held 3·10⁶ integers (over 100 MB; 1.1 GB for a 3 KB option)."""
    spec = ",".join([f"0-{MAX_LAYER}"] * 30)
    tracemalloc.start()
    try:
        got = parse_layers(spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == list(range(MAX_LAYER + 1))
    assert peak < 20 * 2**20, peak


@pytest.mark.parametrize(
    "spec,expected",
    [("0,2-4,2", [0, 2, 3, 4]), ("5-7,0-9", [5, 6, 7, 0, 1, 2, 3, 4, 8, 9]), ("3,3, 3", [3]), ("4 - 6", [4, 5, 6])],
)
def test_layers_keep_their_first_order_each_once(spec, expected):
    assert parse_layers(spec) == expected


# --- a head split that only tensors not read can refute ----------------------------------------------
#
# Old: the config-vs-header shape check covered only the tensors read. o_proj [H, n·d] is all that
# `--matrices O` reads, and 16 heads of 4 fit it as well as the true 8 of 8, so a wrong split gave 16
# silently wrong per-head spectra; k_proj's rows (g·d) refute it, and the full analysis refused.
# Now every tensor the full analysis of the layer reads has its header shape checked (LayerPlan.checked).


def _refusal(folder, cache, **kw) -> BadConfigError:
    with pytest.raises(BadConfigError) as e:
        _analyze(folder, cache, **kw)
    return e.value


def _as_shown(e: BadConfigError) -> tuple:
    return e.message, e.hint, e.field, e.tensor


# (layout, config changes that keep the read tensors' shapes, matrices that read only those)
_SPLITS_ONLY_UNREAD_TENSORS_REFUTE = [
    # 16 heads of 4 for 8 of 8: q_proj and o_proj are [64, 64] either way; k_proj [16, 64] is not 2·4 rows.
    ("llama", {"num_attention_heads": 16, "head_dim": 4}, "O"),
    ("llama", {"num_attention_heads": 16, "head_dim": 4}, "Q"),
    # MLA, 8 heads with v_head_dim 3 for 4 of 6: o_proj [64, 24] fits; kv_b_proj [4·(8+6), 16] and
    # q_b_proj (q_proj without a query latent) [4·(8+4), ·] do not.
    ("deepseek_v3", {"num_attention_heads": 8, "v_head_dim": 3}, "O"),
    ("deepseek_v2_lite", {"num_attention_heads": 8, "v_head_dim": 3}, "O"),
    # A latent split moved by one row: kv_a_proj_with_mqa [16 + 4, 64] fits 17 + 3, so KVA (16
    # rows read as 17) and KVA_pe would be wrong; kv_a_layernorm [16] and kv_b_proj refute it.
    ("deepseek_v3", {"kv_lora_rank": 17, "qk_rope_head_dim": 3}, "KVA"),
]


@pytest.mark.parametrize("name,changes,matrices", _SPLITS_ONLY_UNREAD_TENSORS_REFUTE)
def test_a_split_only_unread_tensors_refute_is_refused_as_the_full_analysis_refuses_it(
    tmp_path, monkeypatch, capsys, name, changes, matrices
):
    layout = build_layout(name)
    folder = write_layout(tmp_path / "m", layout)
    (folder / "config.json").write_text(json.dumps({**layout.config, **changes}))
    # The tensors `matrices` reads do fit the wrong config: only the others can refute it.
    src = open_checkpoint(str(folder))
    ad = adapter_for(src.config, src.tensor_names)
    plan = ad.plan(0, set(parse_matrices(matrices, ad.supported_kinds())), True)
    assert all(tuple(src.shape(n)) == plan.specs[n].shape for n in plan.tensors)
    with pytest.raises(BadConfigError) as e:
        src.read_tensors(plan)
    assert src.bytes_fetched == src.stats["header_bytes"]  # refused from headers: no tensor byte read
    # The same refusal, word for word, as the full analysis gives.
    full = _refusal(folder, tmp_path / "c-full")
    narrow = _refusal(folder, tmp_path / "c-narrow", matrices=matrices)
    assert _as_shown(narrow) == _as_shown(full) == _as_shown(e.value)
    assert narrow.tensor not in plan.tensors and "config.json implies" in narrow.message
    assert any(f"{k}={v}" in narrow.message for k, v in changes.items())
    cli_args = ("analyze", str(folder), "--device", "cpu", "--cache-dir", str(tmp_path / "c-cli"))
    code, err = _cli(monkeypatch, capsys, *cli_args, "--matrices", matrices)
    full_code, full_err = _cli(monkeypatch, capsys, *cli_args)
    assert code == full_code and code not in (0, None)
    assert "Traceback" not in err and narrow.tensor in err and "config.json implies" in err
    assert err == full_err
    assert not list(tmp_path.rglob("layer-*"))  # nothing computed, nothing cached


def test_the_refuting_tensor_may_lie_in_a_shard_the_read_does_not_need(tmp_path):
    """k_proj alone in a second shard: its header (only that, no tensor byte) is fetched and
    refutes the split; with the right config the same read fetches that header and succeeds."""
    from svd_probe.testing.checkpoints import write_checkpoint

    layout = build_layout("llama")
    k = "model.layers.0.self_attn.k_proj.weight"
    where = {n: 0 for n in layout.tensors} | {k: 1}
    bad = {**layout.config, "num_attention_heads": 16, "head_dim": 4}
    for folder, config in ((tmp_path / "bad", bad), (tmp_path / "good", layout.config)):
        write_checkpoint(folder, layout.tensors, config, n_shards=2, shard_of=where)
    src = open_checkpoint(str(tmp_path / "bad"))
    assert src.shard_of(k) != src.shard_of("model.layers.0.self_attn.o_proj.weight")
    ad = adapter_for(src.config, src.tensor_names)
    with pytest.raises(BadConfigError) as e:
        src.read_tensors(ad.plan(0, {"O"}, True))
    assert e.value.tensor == k and src.stats["headers_read"] == 2
    assert src.bytes_fetched == src.stats["header_bytes"]
    good = open_checkpoint(str(tmp_path / "good"))
    lt = good.read_tensors(adapter_for(good.config, good.tensor_names).plan(0, {"O"}, True))
    o_bytes = 64 * 64 * 2  # o_proj, BF16: the only tensor read
    assert list(lt) == ["model.layers.0.self_attn.o_proj.weight"]
    assert good.bytes_fetched == good.stats["header_bytes"] + o_bytes and good.stats["headers_read"] == 2


def _trained(folder, variant, o_norm="none"):
    from dataclasses import replace

    import torch

    from svd_probe.train.config import preset
    from svd_probe.train.model import pretraining_model
    from svd_probe.train.run_dir import save_encoder

    torch.manual_seed(0)
    cfg = replace(preset(variant, "tiny"), vocab_size=40, o_norm=o_norm)
    model = pretraining_model(cfg)
    folder.mkdir(parents=True)
    save_encoder(model, cfg, folder)
    return folder


@pytest.mark.parametrize(
    "name",
    ["llama", "qwen3", "qwen2", "gpt2", "bert", "deepseek_v3", "deepseek_v2_lite", "kimi_multimodal", "mha", "mla-o"],
)
def test_a_right_config_analysed_for_o_alone_gives_the_full_analysis_o_spectra(tmp_path, name):
    """Every layer (MTP included), GQA, fused c_attn, MLA with and without a query latent, a
    `language_model.` decoder and the lab's own encoders: `--matrices O` reads and checks, and
    its O spectra are those of the full analysis, bit for bit."""
    if name in ("mha", "mla-o"):
        folder = _trained(tmp_path / "m", name, o_norm="rms" if name == "mla-o" else "none")
    else:
        folder = write_layout(tmp_path / "m", name, n_shards=3)
    full = _analyze(folder, tmp_path / "c-full")
    narrow = _analyze(folder, tmp_path / "c-narrow", matrices="O")
    assert narrow.layers == full.layers and narrow.computed == full.layers
    for layer in full.layers:
        got, want = _sigma(narrow, layer), _sigma(full, layer)
        assert set(got) == {"head.O", "stacked.O"}
        for key, sigma in got.items():
            np.testing.assert_array_equal(sigma, want[key], err_msg=f"layer {layer} {key}")


def test_tensors_a_checkpoint_lacks_are_not_asked_for_by_the_check(tmp_path):
    """A checkpoint with no q_proj and k_proj (a K/V-only export) is still read for O and V: the
    check covers what the checkpoint has, and only the tensors read must be there."""
    layout = build_layout("llama")
    clean = write_layout(tmp_path / "clean", layout)
    for name in [n for n in layout.tensors if n.endswith(("q_proj.weight", "k_proj.weight"))]:
        del layout.tensors[name]
    folder = write_layout(tmp_path / "m", layout)
    got = _sigma(_analyze(folder, tmp_path / "c1", matrices="O,V,VO"))
    want = _sigma(_analyze(clean, tmp_path / "c2"))
    assert set(got) == {"head.O", "stacked.O", "head.V", "stacked.V", "head.VO", "stacked.VO"}
    assert all(np.array_equal(got[k], want[k]) for k in got)


# --- a config that declares fewer layers than the checkpoint holds -------------------------------


@pytest.mark.parametrize(
    "name, field, fewer",
    [
        ("llama", "num_hidden_layers", {"num_hidden_layers": 1}),
        ("gpt2", "n_layer", {"n_layer": 1}),
        ("bert", "num_hidden_layers", {"num_hidden_layers": 1}),
        # config says no MTP layer: the checkpoint's last layer (its MTP layer) goes unread
        ("deepseek_v3", "num_hidden_layers", {"num_nextn_predict_layers": 0}),
    ],
)
def test_layers_past_the_config_are_named_in_the_summary(tmp_path, monkeypatch, capsys, name, field, fewer):
    """Old: a config.json declaring fewer layers than the checkpoint holds analysed those alone,
    and the summary read as the whole checkpoint's, without a word. Now a note names the layers
    left out (the analysis itself is what config.json describes)."""
    layout = build_layout(name)
    folder = write_layout(tmp_path / "m", layout, n_shards=1)
    held = max(find_layers(_names(folder), _probe_of(name)).present) + 1
    config = {**layout.config, **fewer}
    (folder / "config.json").write_text(json.dumps(config))
    declared = held - 1
    dims = adapter_for(config, _names(folder)).dims()
    assert dims.num_layers == declared
    from svd_probe.cli import main

    argv = [
        "svd-probe",
        "analyze",
        str(folder),
        "--device",
        "cpu",
        "--matrices",
        "O",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    flat = " ".join(out.split())  # the model's notes stand under the summary
    assert e.value.code in (0, None) and "Traceback" not in err, err
    assert f"attention tensors for layer {declared}, past the {declared} that config.json declares ({field}" in flat


def _names(folder) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "np") as f:
            names |= set(f.keys())
    return names


def _probe_of(name: str) -> str:
    from svd_probe.adapters import bert, gpt2, llama, mla

    return {"llama": llama, "gpt2": gpt2, "bert": bert, "deepseek_v3": mla}[name]._PROBE
