"""Fuzzing the readers of config.json and the index: every input ends in a result or a typed error.

Random bytes, random JSON, adversarial JSON (deep nesting, 5000-digit integers, bad UTF-8) and
shard names built from traversal pieces go through `parse_json_object`, `check_weight_map` and a
whole local `open_checkpoint`. The only exceptions allowed are `SvdProbeError`s. Whatever is
accepted is checked against independent oracles: the JSON equals `json.loads`' answer, and every
accepted shard name stays inside its folder (posixpath) and inside its repo's resolve URL (the
path httpx2 really requests, after it normalises dot segments).
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svd_probe.errors import MalformedFileError, SvdProbeError, UnsafeShardNameError
from svd_probe.hub.checkpoint import check_weight_map, open_checkpoint, parse_json_object
from svd_probe.hub.ranges import HubFiles
from svd_probe.models import resolve_model

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)

PIECES = ["..", ".", "", "a", "sub", "x.safetensors", "%2e%2e", "C:", "http:", "\\", "?", "#", "\x00", "\n", " "]
shard_names = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("/".join),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join),
    st.text(max_size=40),
    st.just("model-00001-of-00005.safetensors"),
    st.just("sub/model-1.safetensors"),
)


def adversarial_json() -> st.SearchStrategy[bytes]:
    deep = st.integers(1, 300_000).map(lambda n: b"[" * n + b"]" * n)
    deep_obj = st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"0" + b"}" * n)
    huge_int = st.integers(4000, 6000).map(lambda n: b'{"n": ' + b"7" * n + b"}")
    with_bad_utf8 = st.tuples(json_values, st.binary(min_size=1, max_size=4)).map(
        lambda t: json.dumps(t[0]).encode()[:10] + b"\xff" + t[1] + json.dumps(t[0]).encode()[10:]
    )
    return st.one_of(deep, deep_obj, huge_int, with_bad_utf8)


def _inside_folder(name: str) -> bool:
    root = "/root"
    joined = posixpath.normpath(posixpath.join(root, name))
    return joined.startswith(root + "/") and joined == f"{root}/{name}"


@pytest.mark.slow  # 200 examples, some of them 600 kB: about 6 s
@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()), adversarial_json()))
def test_parse_json_object_result_or_typed_error(data):
    try:
        obj = parse_json_object(data, "config.json")
    except MalformedFileError as e:
        assert "config.json" in e.message and e.file == "config.json"
        return
    assert isinstance(obj, dict) and obj == json.loads(data.decode("utf-8"))


@pytest.mark.slow  # 200 examples: about 5 s
@FUZZ
@given(
    st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(["weight_map", "metadata"]),
            st.one_of(json_values, st.dictionaries(st.text(max_size=30), shard_names | json_values, max_size=8)),
        ),
    )
)
def test_check_weight_map_result_or_typed_error(index):
    if not isinstance(index, dict):
        index = {"weight_map": index}
    try:
        wm = check_weight_map(index, "model.safetensors.index.json")
    except UnsafeShardNameError as e:
        assert e.entry in index["weight_map"]
        return
    except MalformedFileError:
        return
    assert wm is index["weight_map"] and wm
    hub = HubFiles("https://hub.example", "org/repo", "0" * 40)
    try:
        for name in set(wm.values()):
            assert isinstance(name, str) and _inside_folder(name), name
            url = httpx2.URL(hub.resolve_url(name))
            assert url.host == "hub.example" and url.path.startswith(f"/org/repo/resolve/{'0' * 40}/"), url
    finally:
        hub.close()


@pytest.mark.slow
@FUZZ
@given(shard_names)
def test_a_name_outside_the_folder_is_never_accepted(name):
    try:
        check_weight_map({"weight_map": {"t": name}}, "index")
    except UnsafeShardNameError as e:
        assert e.entry == "t"
        return
    assert _inside_folder(name)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64), adversarial_json()),
    index=st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=20), shard_names, min_size=1, max_size=5).map(
            lambda wm: json.dumps({"weight_map": wm}).encode()
        ),
        json_values.map(lambda v: json.dumps(v).encode()),
        adversarial_json(),
    ),
)
def test_open_a_local_folder_result_or_typed_error(config, index):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        (folder / "config.json").write_bytes(config)
        if index is not None:
            (folder / "model.safetensors.index.json").write_bytes(index)
        try:
            src = open_checkpoint(resolve_model(str(folder)))
        except SvdProbeError:
            return
        assert isinstance(src.config, dict)
        assert all(_inside_folder(s) for s in set(src.weight_map.values()))
        src.close()
