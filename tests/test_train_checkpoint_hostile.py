"""A run folder's checkpoint.pt is untrusted input: what a resume refuses before it trusts it.

Each case damages the checkpoint of a real tiny run, stopped after 2 of 4 pretraining steps, then
runs the same command again through the console entry point, as a user would. Each ends with
exit 2, a short message naming the file and the problem, a hint, no traceback, and the run folder
as it was. The command runs in a thread with a deadline, so a run that hangs (a FIFO, before)
fails its test instead of stalling the suite.

Before: an optimizer state without a parameter's moments resumed silently with fresh ones (or
failed mid-step with a KeyError traceback), a checkpoint of any size was read whole, a link was
followed (and the next checkpoint replaced it), and a FIFO blocked the run in its open for good.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_fixtures import cli_main, cli_train_args, inputs_fixture  # noqa: F401

DEADLINE = 120  # seconds; a refused resume takes well under one


def _cli(args: list[str], monkeypatch, capsys, unblock: Callable[[], None] | None = None) -> tuple[int, str, str]:
    """cli_main(args) in a thread: its (exit code, stdout, stderr), or a failure past DEADLINE
    (after `unblock`, which frees the thread where the test knows how)."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = cli_main(args, monkeypatch, capsys)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(DEADLINE)
    if worker.is_alive():
        if unblock is not None:
            unblock()
            worker.join(30)
        pytest.fail(f"svd-probe train was still running after {DEADLINE} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def stopped_run(inputs, tmp_path_factory):
    """(run folder, its command line): a real tiny run stopped after pretraining step 2 of 4."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    args = cli_train_args(inputs, out, steps=(4, 2))
    with pytest.MonkeyPatch.context() as mp:
        # cli_main's capsys is function-scoped; a module fixture captures nothing, so a stub.
        code, _, err = _cli([*args, "--stop-after", "2"], mp, _NoCapture())
    assert code == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    return out, args


class _NoCapture:
    def readouterr(self) -> SimpleNamespace:
        return SimpleNamespace(out="", err="")


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    """A copy of the stopped run to damage, and the command line that resumes it."""
    out, args = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [str(copy) if a == str(out) else a for a in args]


def _snapshot(out: Path) -> dict:
    """Each entry of `out` but train.log: its kind and inode, size and mtime, and the sha256 of a
    plain file's bytes (of its first 16 MiB: a sparse file of 64 GiB is not read whole)."""
    snap = {}
    for p in sorted(out.iterdir()):
        if p.name == "train.log":
            continue
        st = os.lstat(p)
        digest = None
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                digest = hashlib.sha256(f.read(16 << 20)).hexdigest()
        snap[p.name] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return snap


def _refused(out: Path, args: list[str], monkeypatch, capsys, *words: str, unblock=None) -> str:
    """Resume `out`; assert it was refused as described and left the folder alone; the message."""
    before, log = _snapshot(out), (out / "train.log").read_text()
    code, stdout, stderr = _cli(args, monkeypatch, capsys, unblock)
    err = " ".join(stderr.split())
    assert code == 2, stdout + stderr
    assert "Traceback" not in stderr + stdout, stderr
    message = err[err.index("error:") :]
    assert len(message) < 600, message  # a message and a hint, not a dump
    assert str(out / "checkpoint.pt") in message and "hint:" in message, message
    for w in words:
        assert w in message, message
    assert _snapshot(out) == before  # nothing rewritten: no checkpoint, model or metrics
    assert (out / "train.log").read_text().startswith(log)
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    return message


# ---- optimizer moments ---------------------------------------------------------------------------


def _drop_state(opt: dict) -> None:
    """The whole AdamW state of one parameter, as if it had never stepped."""
    del opt["state"][next(iter(opt["state"]))]


def _drop_exp_avg_sq(opt: dict) -> None:
    del next(iter(opt["state"].values()))["exp_avg_sq"]


def _step_zero(opt: dict) -> None:
    """One parameter's counter back to 0 (its bias correction that of a first step)."""
    st = next(iter(opt["state"].values()))
    st["step"] = torch.zeros_like(torch.as_tensor(st["step"]))


@pytest.mark.parametrize(
    "damage,words",
    [
        (_drop_state, ("has no step, exp_avg, exp_avg_sq after 2 steps",)),
        (_drop_exp_avg_sq, ("has no exp_avg_sq",)),
        (_step_zero, ("has stepped 0 times, not 2",)),
        (lambda opt: next(iter(opt["state"].values())).__setitem__("step", torch.tensor(-1e9)), ("-1e+09 times",)),
    ],
    ids=["no-state", "no-exp_avg_sq", "step-zero", "step-negative"],
)
def test_an_optimizer_state_without_moments_is_refused(run_copy, monkeypatch, capsys, damage, words):
    """Before: no state resumed with fresh moments (exit 0); no exp_avg_sq, a KeyError traceback;
    a counter of 0 at step 2, the wrong bias correction (exit 0)."""
    out, args = run_copy
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    damage(ck["optimizer"])
    torch.save(ck, out / "checkpoint.pt")
    message = _refused(out, args, monkeypatch, capsys, "is damaged", "optimizer state for encoder.embed.weight", *words)
    assert "--overwrite" in message


# ---- the file itself -----------------------------------------------------------------------------


def test_a_checkpoint_larger_than_the_run_can_fill_is_not_read(run_copy, monkeypatch, capsys):
    """A loadable checkpoint with 80 MiB more than the tiny model's weights and moments (1.6 MB)
    fill: the bound is theirs plus 64 MiB. Before: read whole, and the run resumed (exit 0)."""
    out, args = run_copy
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["padding"] = torch.zeros(80 << 20, dtype=torch.uint8)
    torch.save(ck, out / "checkpoint.pt")
    size = (out / "checkpoint.pt").stat().st_size
    _refused(
        out, args, monkeypatch, capsys, "is damaged or of another model", f"{size:,} bytes, more than", "--overwrite"
    )


def test_a_sparse_checkpoint_far_beyond_the_bound_is_refused_unread(run_copy, monkeypatch, capsys):
    """64 GiB, almost all of it a hole: refused by its size alone. Before: torch opened it (and
    failed on the zeros where the zip's directory belongs, saying nothing of the size)."""
    out, args = run_copy
    try:
        os.truncate(out / "checkpoint.pt", 64 << 30)
    except OSError as e:
        pytest.skip(f"no sparse file of 64 GiB here: {e}")
    _refused(out, args, monkeypatch, capsys, "is damaged or of another model", f"{64 << 30:,} bytes, more than")


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_checkpoint_that_is_a_link_or_a_pipe_is_refused(run_copy, tmp_path, monkeypatch, capsys, kind):
    """Before: a link was followed (the run resumed from the file it named, and its next
    checkpoint replaced the link); a FIFO blocked the run in its open, here until the deadline
    (then a writer's open and close free it)."""
    out, args = run_copy
    ckpt = out / "checkpoint.pt"
    unblock = None
    if kind == "link":
        elsewhere = tmp_path / "elsewhere.pt"
        shutil.move(ckpt, elsewhere)
        ckpt.symlink_to(elsewhere)
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs FIFOs")
        ckpt.unlink()
        os.mkfifo(ckpt)

        def unblock() -> None:
            os.close(os.open(ckpt, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader's open returns

    _refused(out, args, monkeypatch, capsys, "is a link, pipe, device or folder, not a plain file", unblock=unblock)


# ---- --overwrite ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_overwrite_refuses_a_folder_or_link_at_a_run_files_name(run_copy, tmp_path, monkeypatch, capsys, kind):
    """--overwrite unlinks the run's files; a folder planted at model.safetensors ended it in an
    IsADirectoryError traceback, and a link there was removed and the run went on (exit 0). Now
    refused by name before anything is removed: the folder, its file, the link's target and every
    other file of the run folder are left as they were."""
    out, args = run_copy
    planted = out / "model.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    if kind == "folder":
        planted.mkdir()
        (planted / "keep.txt").write_text("a file of the user's\n")
    else:
        elsewhere.write_text("a file of the user's\n")
        planted.symlink_to(elsewhere)
    (out / "notes.txt").write_text("the user's notes\n")
    before, log = _snapshot(out), (out / "train.log").read_text()
    code, stdout, stderr = _cli([*args, "--overwrite"], monkeypatch, capsys)
    err = " ".join(stderr.split())
    assert code == 2, stdout + stderr
    assert "Traceback" not in stderr + stdout, stderr
    message = err[err.index("error:") :]
    assert len(message) < 600, message
    assert str(planted) in "".join(message.split()), message  # rich may break a long path anywhere
    assert "not a plain file" in message and "move it away" in message, message
    assert _snapshot(out) == before  # the checkpoint, the notes and the planted entry as they were
    assert (out / "train.log").read_text() == log
    if kind == "folder":
        assert planted.is_dir() and (planted / "keep.txt").read_text() == "a file of the user's\n"
    else:
        assert planted.is_symlink() and elsewhere.read_text() == "a file of the user's\n"
