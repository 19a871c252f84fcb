"""Shared fixtures: a loopback Hub stand-in and small generated checkpoints (session-scoped).

huggingface_hub reads HF_HOME / HF_ENDPOINT when it is imported, so the test HF cache is set
here, before any test module imports it: tests never touch the user's cache or token.
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="svd-probe-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_ENDPOINT", None)
os.environ.pop("HF_TOKEN", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402

GATED_TOKEN = "hf_test_gated_token_0123456789"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ARG001 - pytest's hook
    """Skip `triton_interpreter` tests where Triton's interpreter is older than 3.9: Triton 3.6's
    (the one torch 2.11 brings on the GPU machine) refuses range loops with a run-time bound, which
    the kernels have and which compiled Triton 3.6 runs (checked 2026-12-03)."""
    try:
        import triton

        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - no Triton: the tests' importorskip says so
        return
    if (major, minor) >= (3, 9):
        return
    skip = pytest.mark.skip(
        reason=f"Triton {triton.__version__}'s interpreter refuses range loops with a run-time bound"
    )
    for item in items:
        if "triton_interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def deepseek_ckpt(tmp_path_factory):
    """Small DeepSeek-V3-layout checkpoint: 3 layers + 1 MTP, FP8 with partial tiles, 5 shards."""
    from svd_probe.testing.checkpoints import build_deepseek_v3

    return build_deepseek_v3(tmp_path_factory.mktemp("ckpt") / "deepseek-v3-tiny")


@pytest.fixture(scope="session")
def kimi_ckpt(tmp_path_factory):
    """Small Kimi-K2-layout checkpoint: `model-1-of-4.safetensors` shard names, no MTP."""
    from svd_probe.testing.checkpoints import build_kimi_k2

    return build_kimi_k2(tmp_path_factory.mktemp("ckpt") / "kimi-k2-tiny")


@pytest.fixture(scope="session")
def fake_hub(deepseek_ckpt, kimi_ckpt):
    """A running FakeHub serving the checkpoints above:

    - `tiny/deepseek-v3` (also as revision "v1"), `tiny/kimi-k2`,
    - `gated/deepseek-v3` (needs `Bearer GATED_TOKEN`).
    Tests that inject faults must `clear_faults()`; `reset_records()` before counting bytes.
    """
    from svd_probe.testing.fake_hub import FakeHub

    hub = FakeHub().start()
    commit = hub.add_repo("tiny/deepseek-v3", deepseek_ckpt.folder)
    hub.repos["tiny/deepseek-v3"].revisions["v1"] = commit
    hub.add_repo("tiny/kimi-k2", kimi_ckpt.folder)
    hub.add_repo("gated/deepseek-v3", deepseek_ckpt.folder, gated_token=GATED_TOKEN)
    yield hub
    hub.stop()
