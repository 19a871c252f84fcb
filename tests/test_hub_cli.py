"""`svd-probe models` and the CLI's handling of an unknown model."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from svd_probe.cli import app
from svd_probe.models import ALIASES


def test_models_table():
    res = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for alias in ("deepseek-v3", "kimi-k2", "moonlight", "llama-3.1-8b"):
        assert alias in res.output
    assert "11.6 GB" in res.output  # DeepSeek-V3: 187 MB × 62 attention layers (docs/reference.md §1)


def test_models_json():
    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["alias"]: r for r in json.loads(res.output)}
    assert set(rows) == set(ALIASES)
    ds = rows["deepseek-v3"]
    assert (ds["repo_id"], ds["heads"], ds["layers"], ds["attention_dtype"]) == (
        "deepseek-ai/DeepSeek-V3",
        128,
        62,
        "F8_E4M3",
    )
    assert abs(ds["bytes_per_layer"] - 187e6) < 1e6
    assert abs(rows["kimi-k2"]["bytes_per_layer"] - 101e6) < 1e6
    assert rows["kimi-k2-thinking"]["attention_dtype"] == "BF16"
    assert rows["llama-3.1-8b"]["kv_heads"] == 8 and rows["llama-3.1-8b"]["attention"] == "GQA"
    assert rows["deepseek-v2-lite"]["heads"] == 16


def test_unknown_model_exits_nonzero_without_traceback(tmp_path, monkeypatch, capsys):
    # In-process through the console-script entry point (`main`), which is what users run.
    from svd_probe.cli import main

    monkeypatch.setenv("SVD_PROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["svd-probe", "analyze", "definitely-not-a-model"])
    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code not in (0, None)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    assert "unknown model" in cap.err and "svd-probe models" in cap.err
