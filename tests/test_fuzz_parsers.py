"""Fuzzing the parsers of untrusted input: safetensors headers, config.json fields and dims.

Every input, random or adversarial, ends in a typed `SvdProbeError` or in a result that obeys
the parser's own invariants; never in another exception.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from svd_probe.adapters import adapter_for
from svd_probe.errors import SvdProbeError
from svd_probe.hub.dtypes import DTYPES
from svd_probe.hub.safetensors_header import MAX_HEADER_BYTES, parse_header, parse_header_length
from svd_probe.hub.source import _quantization
from svd_probe.testing.layouts import build_layout

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a hostile config or header throws at a field meant to hold a small whole number.
hostile_scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, -4, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1.5, 1e9, 1e30, 64.0]),
    st.text(max_size=12),
    st.sampled_from(["sixty-four", "8", ""]),
    st.booleans(),
    st.none(),
)
hostile = st.one_of(
    hostile_scalar,
    st.lists(hostile_scalar, max_size=3),
    st.dictionaries(st.text(max_size=4), hostile_scalar, max_size=2),
)


# --- safetensors headers ---------------------------------------------------------------------------


@FUZZ
@given(prefix=st.binary(min_size=0, max_size=12), size=st.integers(min_value=0, max_value=2**40))
def test_header_length_is_checked_or_refused(prefix, size):
    try:
        n = parse_header_length(prefix, "f.safetensors", size)
    except SvdProbeError as e:
        if len(prefix) >= 8:
            # The decoded length is the file's first 8 bytes: never shown (numbers the message
            # states itself, the file size and the limit, are taken out first).
            number = str(struct.unpack("<Q", prefix[:8])[0])
            msg = str(e).replace(str(size), "").replace(str(MAX_HEADER_BYTES), "")
            assert len(number) < 4 or number not in msg
        return
    assert 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size


@FUZZ
@given(raw=st.binary(max_size=300), data_len=st.integers(min_value=0, max_value=1000))
def test_random_bytes_as_a_header(raw, data_len):
    try:
        parse_header(raw, "f.safetensors", 8 + len(raw) + data_len)
    except SvdProbeError:
        pass


dims = st.one_of(st.integers(min_value=0, max_value=6), st.sampled_from([2**32, 2**63, 2**64, -1]), hostile_scalar)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), hostile_scalar),
        "shape": st.one_of(st.lists(dims, max_size=4), hostile),
        "data_offsets": st.one_of(st.lists(st.integers(min_value=-2, max_value=200), min_size=2, max_size=2), hostile),
    },
)


@FUZZ
@given(
    entries=st.dictionaries(st.text(max_size=6), st.one_of(entry, hostile), max_size=5),
    metadata=st.one_of(st.none(), hostile, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
    data_len=st.integers(min_value=0, max_value=256),
)
def test_structured_headers_parse_consistently_or_are_refused(entries, metadata, data_len):
    obj = dict(entries)
    if metadata is not None:
        obj["__metadata__"] = metadata
    try:
        raw = json.dumps(obj).encode()
    except (ValueError, TypeError):
        assume(False)
        return
    file_size = 8 + len(raw) + data_len
    try:
        h = parse_header(raw, "f.safetensors", file_size)
    except SvdProbeError:
        return
    spans = []
    for t in h.tensors.values():
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype].size
        assert 8 + len(raw) <= t.begin <= t.end <= file_size
        spans.append((t.begin, t.end))
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


# --- config.json ---------------------------------------------------------------------------------------

LAYOUT_FIELDS = {
    "llama": ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_hidden_layers"),
    "qwen3": ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "num_hidden_layers"),
    "bert": ("num_attention_heads", "hidden_size", "num_hidden_layers"),
    "gpt2": ("n_head", "n_embd", "n_layer", "num_hidden_layers"),
    "deepseek_v3": (
        "num_attention_heads",
        "hidden_size",
        "num_hidden_layers",
        "num_nextn_predict_layers",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ),
}
_LAYOUTS = {name: build_layout(name) for name in LAYOUT_FIELDS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUT_FIELDS))
@FUZZ
@given(data=st.data())
def test_configs_validate_or_refuse(name, data):
    layout = _LAYOUTS[name]
    fields = LAYOUT_FIELDS[name]
    changed = data.draw(st.dictionaries(st.sampled_from(fields), hostile, min_size=1, max_size=3))
    config = {**layout.config, **changed}
    names = data.draw(st.sampled_from([None, set(layout.tensors)]))
    try:
        ad = adapter_for(config, names)
    except SvdProbeError:
        return
    d = ad.dims()
    assert d.num_layers >= 1 and d.n_heads >= 1 and d.d_model >= 1 and d.n_heads % d.n_kv_groups == 0
    kinds = set(ad.supported_kinds())
    for fold in (True, False):
        plan = ad.plan(0, kinds, fold)
        assert set(plan.specs) == set(plan.tensors) and set(plan.kind_tensors) == kinds
        for spec in plan.specs.values():
            assert all(isinstance(x, int) and x >= 0 for x in spec.shape)


@pytest.mark.slow
@FUZZ
@given(
    q=st.one_of(hostile, st.fixed_dictionaries({}, optional={"quant_method": hostile, "weight_block_size": hostile}))
)
def test_quantization_config_validates_or_refuses(q):
    try:
        method, block = _quantization({"quantization_config": q})
    except SvdProbeError:
        return
    assert all(isinstance(b, int) and b >= 1 for b in block)
    assert method is None or isinstance(method, str)
