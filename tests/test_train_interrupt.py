"""`svd-probe train` under Ctrl-C and SIGTERM, time-based checkpoints, and a complete `--help`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from train_fixtures import cli_train_args, inputs_fixture, small_recipe, sources  # noqa: F401
from typer.testing import CliRunner

from svd_probe.cli import app
from svd_probe.train.config import preset
from svd_probe.train.loop import run

REPO = Path(__file__).resolve().parents[1]


class SignalAt:
    """A TrainProgress that sends `sig` to this process when the phase reaches step `at`, as a user
    pressing Ctrl-C (or a scheduler sending SIGTERM) mid-run would."""

    def __init__(self, sig: int, at: int):
        self.sig, self.at, self.lines = sig, at, []

    def phase_started(self, phase, total, done):
        pass

    def phase_step(self, phase, done, loss, samples_per_s):
        if done == self.at:
            os.kill(os.getpid(), self.sig)

    def message(self, line):
        self.lines.append(line)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_and_saves_it(inputs, tmp_path, sig):
    out = tmp_path / "run"
    progress = SignalAt(sig, at=3)
    recipe = small_recipe(pretrain_steps=50, log_every=1, checkpoint_every=1000, checkpoint_minutes=0)
    before = signal.getsignal(sig)
    stopped = run(preset("mha", "tiny"), recipe, sources(inputs), out, progress)
    assert stopped == {
        "stopped": True,
        "reason": "interrupted",
        "signal": signal.Signals(sig).name,
        "phase": "pretrain",
        "step": 3,
        "out": str(out),
    }
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3  # none was due before
    assert any("interrupted" in ln and "run the same command to resume" in ln for ln in progress.lines)
    assert signal.getsignal(sig) is before  # the handler is the caller's again


@pytest.mark.slow
def test_time_based_checkpoints(inputs, tmp_path):
    """checkpoint_every far away, checkpoint_minutes ~0: every step is checkpointed by time. The
    callback fails at step 3 (after step 2's checkpoint), as a crash would."""

    class CrashAt:
        def phase_started(self, *a):
            pass

        def phase_step(self, phase, done, loss, sps):
            if done == 3:
                raise RuntimeError("crash")

        def message(self, line):
            pass

    for minutes, want in ((1e-9, 2), (0, None)):
        out = tmp_path / f"run-{minutes}"
        recipe = small_recipe(pretrain_steps=50, log_every=1, checkpoint_every=1000, checkpoint_minutes=minutes)
        with pytest.raises(RuntimeError, match="crash"):
            run(preset("mha", "tiny"), recipe, sources(inputs), out, CrashAt())
        ckpt = out / "checkpoint.pt"
        assert (torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None) == want


def _train_subprocess(inputs, out: Path, *extra: str) -> subprocess.Popen:
    args = cli_train_args(inputs, out, "--log-every", "1", "--checkpoint-every", "100000", *extra, steps=(100000, 2))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "svd_probe.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    log = out / "train.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(rf"pretrain step {step}/", log.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"train ended early: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("train did not reach the step in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_cli_saves_on_a_real_signal_and_resumes(inputs, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _train_subprocess(inputs, out)
    _wait_for_step(out, proc, 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    m = re.search(
        r"interrupted at pretrain step (\d+); checkpoint saved in (.+); run the same command to resume", stderr
    )
    assert m, stderr
    step = int(m.group(1))
    assert step >= 3 and Path(m.group(2)) == out and "Traceback" not in stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    if sig == signal.SIGINT:
        return  # resuming is the same after either signal; once is enough (each run starts torch)
    # The same command resumes from there (here for two more steps).
    again = _train_subprocess(inputs, out, "--stop-after", "2")
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 2
    assert f"resuming pretrain at step {step}" in (out / "train.log").read_text()


# ---- --help --------------------------------------------------------------------------------------


def test_train_help_is_complete_and_fits_80_columns():
    command = typer.main.get_command(app).commands["train"]
    for p in command.params:
        if p.name == "help":
            continue
        assert p.help and p.help.strip(), f"{p.opts} has no help"
        takes_value = not getattr(p, "is_flag", False)
        shows_default = (p.show_default not in (None, False)) or "[default:" in p.help
        if takes_value and p.name not in ("config", "out_dir", "data_dir", "dataset", "sst2_dir", "init_from", "seeds"):
            assert shows_default, f"{p.opts} shows no default"
        assert "issue" not in p.help
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert result.exit_code == 0
    text = result.output
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # no option name or text cut off
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    for want in (
        "Pretraining batch. [default: 128]",
        "--pretrain-steps",
        "[default: 2000]",
        "--seed",
        "[default: 0]",
        "--d-model",
        "[default: 256 small, 64 tiny]",
        "--checkpoint-minutes",
        "[default: 5]",
        "--overwrite",
    ):
        assert want in flat, want
