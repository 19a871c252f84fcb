"""Hostile inputs to `diff`, `align` and the torchrun environment of `analyze`.

The environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) is input too: a
malformed or inconsistent one ends with a short `SvdProbeError`, and a rank started without its
peers gives up after a bounded wait instead of blocking for the two-hour collective timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from svd_probe.distributed import Ranks
from svd_probe.errors import SvdProbeError
from svd_probe.testing.layouts import write_layout

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, words",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": "-2"}, "WORLD_SIZE=-2"),
        ({"WORLD_SIZE": "1", "RANK": "3"}, "RANK=3"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x'"),
        ({"WORLD_SIZE": "2"}, "RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "abc"}, "LOCAL_RANK='abc'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=4"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ],
)
def test_bad_launch_environment_is_a_short_error(clean_env, env, words):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SvdProbeError) as ei:
        Ranks.from_env(torch.device("cpu"))
    assert words in ei.value.message and "torchrun" in (ei.value.hint or "")


def test_unset_environment_is_one_process(clean_env):
    ranks, device = Ranks.from_env(torch.device("cpu"))
    assert (ranks.rank, ranks.world_size, ranks.active, device) == (0, 1, False, torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_without_its_peers_gives_up_after_a_bounded_wait(tmp_path):
    """WORLD_SIZE=2 set by hand, no torchrun and no second rank: the old code waited for rank 1
    for the two-hour collective timeout; now the rendezvous wait is bounded and says why."""
    model = write_layout(tmp_path / "llama", "llama")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(
        WORLD_SIZE="2",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        SVD_PROBE_RENDEZVOUS_TIMEOUT="2",
    )
    cmd = [sys.executable, "-m", "svd_probe.cli", "analyze", str(model), "--cache-dir", str(tmp_path / "c")]
    try:
        r = subprocess.run([*cmd, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=25)
    except subprocess.TimeoutExpired:
        pytest.fail("analyze with WORLD_SIZE=2 and no peer still waited after 25 s")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "could not join the other ranks" in r.stderr and "torchrun" in r.stderr
