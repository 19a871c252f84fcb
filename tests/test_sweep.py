"""`svd-probe sweep`: the grid (expansion, collapse, names, shards) against hand-written lists,
the pool's device slots, refused options, and a sweep killed midway that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import cli_main, damage_json_file, expected_parameters, inputs_fixture  # noqa: F401

from svd_probe.train.sweep import device_slots

REPO = Path(__file__).resolve().parents[1]


def dry_run(monkeypatch, capsys, tmp_path, *args: str) -> dict:
    code, out, err = cli_main(
        ["sweep", "--size", "tiny", "--out", str(tmp_path / "sw"), "--dry-run", "--json", *args], monkeypatch, capsys
    )
    assert code == 0, err
    return json.loads(out)


def test_grid_collapses_axes_a_variant_lacks(monkeypatch, capsys, tmp_path):
    plan = dry_run(
        monkeypatch,
        capsys,
        tmp_path,
        *("--variant", "mha,mla,mla-o", "--objective", "mlm,clm", "--o-norm", "none,rms"),
        *("--kv-latent", "4", "--o-latent", "8,16", "--seeds", "3,1"),
    )
    per_seed = [
        "mha_mlm",
        "mha_clm",
        "mla_mlm_kv4",
        "mla_clm_kv4",
        "mla-o_mlm_kv4_o8_norm-none",
        "mla-o_mlm_kv4_o16_norm-none",
        "mla-o_mlm_kv4_o8_norm-rms",
        "mla-o_mlm_kv4_o16_norm-rms",
        "mla-o_clm_kv4_o8_norm-none",
        "mla-o_clm_kv4_o16_norm-none",
        "mla-o_clm_kv4_o8_norm-rms",
        "mla-o_clm_kv4_o16_norm-rms",
    ]
    want = [f"{c}/seed-{s}" for s in (3, 1) for c in per_seed]  # seeds outermost, in the order given
    assert [r["name"] for r in plan["runs"]] == want
    assert plan["grid_points"] == 24
    assert all(r["state"] == "new" for r in plan["runs"])
    assert {r["run_dir"] for r in plan["runs"]} == {str(tmp_path / "sw" / n) for n in want}

    by_name = {r["name"]: r for r in plan["runs"]}
    mha, point = by_name["mha_clm/seed-1"], by_name["mla-o_clm_kv4_o16_norm-rms/seed-3"]
    # The command of a run: the shared options, then the point's own, then its folder.
    assert point["command"][:4] == ["svd-probe", "train", "--size", "tiny"]
    assert point["command"][4:] == [
        *("--variant", "mla-o", "--objective", "clm", "--o-norm", "rms", "--kv-latent", "4", "--o-latent", "16"),
        *("--seed", "3", "--out", point["run_dir"], "--no-progress"),
    ]
    assert "--o-norm" not in mha["command"] and "--kv-latent" not in mha["command"]
    # The point's shapes reach the model: the count the formula gives (tiny: d 64, 2 layers, 4 heads
    # of 16, FFN 256, q latent 16; the default vocabulary of bert-base-uncased, 30522).
    tiny = dict(V=30522, d=64, L=2, H=4, D=16, F=256)
    assert point["parameters"] == expected_parameters("mla-o", **tiny, ql=16, kvl=4, ol=16, o_norm="rms")
    assert by_name["mla_mlm_kv4/seed-3"]["parameters"] == expected_parameters("mla", **tiny, ql=16, kvl=4)
    assert mha["parameters"] == expected_parameters("mha", **tiny)


def test_shards_split_the_grid(monkeypatch, capsys, tmp_path):
    grid = ("--variant", "mha,mla-o", "--o-norm", "none,rms,rms-per-head", "--seeds", "0-2")
    full = [r["name"] for r in dry_run(monkeypatch, capsys, tmp_path, *grid)["runs"]]
    assert full == [
        f"{c}/seed-{s}"
        for s in (0, 1, 2)
        for c in ("mha_mlm", "mla-o_mlm_norm-none", "mla-o_mlm_norm-rms", "mla-o_mlm_norm-rms-per-head")
    ]
    parts = [
        [r["name"] for r in dry_run(monkeypatch, capsys, tmp_path, *grid, "--shard", f"{k}/5")["runs"]]
        for k in range(5)
    ]
    assert parts[1] == ["mla-o_mlm_norm-none/seed-0", "mla-o_mlm_norm-rms/seed-1", "mla-o_mlm_norm-rms-per-head/seed-2"]
    assert parts[0] == ["mha_mlm/seed-0", "mla-o_mlm_norm-none/seed-1", "mla-o_mlm_norm-rms/seed-2"]  # 0, 5, 10
    assert sorted(n for p in parts for n in p) == sorted(full)  # disjoint, and together the grid
    assert [len(p) for p in parts] == [3, 3, 2, 2, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--seed", "3"), "sweep does not take --seed"),
        (("--overwrite",), "sweep does not take --overwrite"),
        (("--shard", "4/4"), "bad --shard '4/4'"),
        (("--shard", "1"), "bad --shard '1'"),
        (("--variant", "mha,gqa"), "unknown gqa"),
        (("--o-norm", "rms,rms"), "distinct"),
        (("--o-latent", "0"), "positive integers"),
        (("--pretrain-step", "4"), "No such option: --pretrain-step"),
        (("--batch-size", "many"), "--batch-size"),
        (("--lr", "-1"), "lr must be a finite positive number"),  # the recipe's own check, per run
        # a range is not built past the limit (this one once took all the memory it could get)
        (("--seeds", "0-1000000000000"), "bad --seeds '0-1000000000000': distinct seeds >= 0 (at most 1000)"),
        (("--seeds", "0-999,0-999,0-999"), "(at most 1000)"),
        (("--seeds", "0-1000"), "(at most 1000)"),  # 1001 seeds; 0-999 is allowed
    ],
)
def test_bad_options_are_refused_before_any_run(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = cli_main(["sweep", "--size", "tiny", "--out", str(tmp_path / "sw"), *args], monkeypatch, capsys)
    assert code == 2, (out, err)
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "sw").exists()


def test_device_slots():
    assert device_slots(2, "auto", 4, None) == ["0", "1", "2", "3", "0", "1", "2", "3"]
    assert device_slots(1, "cuda", 2, "5,7") == ["5", "7"]  # the host's own CUDA_VISIBLE_DEVICES is kept
    assert device_slots(3, "auto", 1, None) == [None, None, None]  # one GPU: the runs share it
    assert device_slots(2, "cpu", 8, None) == [None, None]
    assert device_slots(2, "cuda:1", 8, None) == [None, None]  # a device named by the user: all runs on it


def sweep_argv(inputs, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "svd_probe.cli",
        "sweep",
        *("--variant", "mha", "--seeds", "0,1", "--size", "tiny", "--device", "cpu"),
        *("--tokenizer", str(inputs["vocab"]), "--data-dir", str(inputs["wiki"]), "--sst2-dir", str(inputs["sst2"])),
        *("--finetune-steps", "2", "--batch-size", "4", "--finetune-batch-size", "4", "--seq-len", "32"),
        *("--checkpoint-every", "1", "--log-every", "1", "--out", str(out)),
        *extra,
    ]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_sweep_killed_midway_resumes_without_redoing_finished_runs(inputs, tmp_path):
    out = tmp_path / "sw"
    argv = sweep_argv(inputs, out, "--pretrain-steps", "40")
    first, second = out / "mha_mlm" / "seed-0", out / "mha_mlm" / "seed-1"
    proc = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        log = second / "train.log"
        if log.exists() and "pretrain step 2/40" in log.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)  # as a scheduler ending the job would
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "run the same command to resume" in stderr
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    cut_at = torch.load(second / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= cut_at < 40
    finished = {name: (first / name).stat().st_mtime_ns for name in ("metrics.json", "checkpoint.pt", "train.log")}

    again = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 finished, 1 skipped" in again.stderr
    assert f"svd-probe compare {out}" in again.stderr
    assert {name: (first / name).stat().st_mtime_ns for name in finished} == finished  # not touched
    log = (second / "train.log").read_text()
    assert f"resuming pretrain at step {cut_at}" in log
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["seed"] == 1 and metrics["train_config"]["pretrain_steps"] == 40
    assert "pretrain step 40/40" in log


@pytest.mark.slow
def test_a_failed_run_names_its_log(inputs, tmp_path):
    empty = tmp_path / "no-text"
    empty.mkdir()
    out = tmp_path / "sw"
    argv = sweep_argv(inputs, out, "--pretrain-steps", "2", "--seeds", "0")
    argv[argv.index("--data-dir") + 1] = str(empty)
    r = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    log = out / "logs" / "mha_mlm.seed-0.log"
    assert f"failed: mha_mlm/seed-0 (exit 2); log: {log}" in r.stderr
    assert "wiki.train.tokens" in log.read_text()  # the child's own error, in its log


@pytest.mark.parametrize("damage", ["deep", "dev-zero", "fifo", "huge"])
def test_a_damaged_metrics_json_is_not_a_finished_run(tmp_path, damage):
    """`sweep` asks each run folder's metrics.json whether the run is finished. It read the file
    whole (a link to /dev/zero never ended, a FIFO blocked); now the read is bounded
    (config.read_metrics), and a damaged file means "not finished": the run is trained again."""
    from svd_probe.train.config import MAX_METRICS_BYTES, build_train_config, preset
    from svd_probe.train.sweep import is_finished

    metrics = tmp_path / "metrics.json"
    if not damage_json_file(metrics, damage):
        with open(metrics, "wb") as f:
            f.write(b'{"variant": "mha"')
            f.truncate(MAX_METRICS_BYTES + 1)
    assert is_finished(tmp_path, preset("mha", "tiny"), build_train_config()) is False


@pytest.mark.parametrize("kind", ["log-link", "logs-link", "fifo"])
def test_a_sweep_never_appends_its_logs_through_a_link_or_to_a_pipe(inputs, tmp_path, monkeypatch, capsys, kind):
    """A run's log OUT/logs/CONFIG.seed-N.log is appended to: a link there (or a linked logs/)
    made the sweep write the child's whole output into a file outside --out. Refused before any
    run starts."""
    out = tmp_path / "sw"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user_file = elsewhere / "mha_mlm.seed-0.log"
    user_file.write_text("USER DATA\n")
    if kind == "logs-link":
        out.mkdir()
        (out / "logs").symlink_to(elsewhere)
    else:
        (out / "logs").mkdir(parents=True)
        if kind == "fifo":
            os.mkfifo(out / "logs" / "mha_mlm.seed-0.log")
        else:
            (out / "logs" / "mha_mlm.seed-0.log").symlink_to(user_file)
    argv = sweep_argv(inputs, out, "--pretrain-steps", "2", "--seeds", "0")[3:]
    code, _, err = cli_main(argv, monkeypatch, capsys)
    err = " ".join(err.split())
    assert code == 2 and "not a" in err and "Traceback" not in err, err
    assert user_file.read_text() == "USER DATA\n" and not (out / "mha_mlm").exists()
