"""What `train` and `sweep` read from folders a user may have received, edited or damaged: a
resumed checkpoint's records and optimizer state, the sweep's grid and its run folders."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import cli_main, cli_train_args, inputs_fixture  # noqa: F401

from svd_probe import cli

STEPS = (4, 2)


@pytest.fixture(scope="module")
def cut_run(inputs, tmp_path_factory) -> Path:
    """A run folder stopped after pretraining step 2 of 4 (a checkpoint with weights)."""
    out = tmp_path_factory.mktemp("cut") / "run"
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = _run(cli_train_args(inputs, out, "--stop-after", "2", steps=STEPS), mp)
    finally:
        mp.undo()
    assert code == 0, err
    assert (out / "checkpoint.pt").is_file()
    return out


def _run(args: list[str], monkeypatch) -> tuple[int, str, str]:
    """cli_main for a module fixture too (no capsys there): the console entry point as a user runs it."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _edited_copy(cut_run: Path, tmp_path: Path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoint.pt")
    return run


def _first_exp_avg(state: dict) -> None:
    st = state["optimizer"]["state"][0]
    st["exp_avg"] = torch.zeros(2, *st["exp_avg"].shape)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.__setitem__("timed_samples", "many"),
        lambda s: s.__setitem__("wall_time_s", "x"),
        lambda s: s.__setitem__("recipe", [1]),
        lambda s: s.__setitem__("data", "x"),
        lambda s: s.__setitem__("data", {"tokenizer": {"source": "v"}, "pretrain": None, "sst2": None}),
        lambda s: s.__setitem__("init_from", "x"),
        # fine-tuning's weights without the pretraining's metrics: the run pretrained again from
        # scratch, silently, and dropped the fine-tuning's state
        lambda s: s.update(phase="finetune"),
    ],
    ids=["timed_samples", "wall_time_s", "recipe", "data", "data-sha256", "init_from", "finetune-no-pretrain"],
)
def test_a_checkpoint_whose_records_are_of_the_wrong_type_is_refused(inputs, cut_run, tmp_path, monkeypatch, edit):
    run = _edited_copy(cut_run, tmp_path, edit)
    code, _, err = _run(cli_train_args(inputs, run, steps=STEPS), monkeypatch)
    assert code == 2, err
    assert "Traceback" not in err and "is damaged" in err and "--overwrite" in err
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize(
    "edit, words",
    [
        (_first_exp_avg, "exp_avg of shape"),
        (lambda s: s["optimizer"]["param_groups"][0].__setitem__("weight_decay", 0.9), "optimizer group 0"),
    ],
    ids=["exp_avg-shape", "weight_decay"],  # a counter not the checkpoint's step: test_train_checkpoint_hostile
)
def test_a_checkpoint_whose_optimizer_is_not_this_runs_is_refused(inputs, cut_run, tmp_path, monkeypatch, edit, words):
    """Before: a traceback mid-step (shape, step) or a run silently trained with weight decay 0.9."""
    run = _edited_copy(cut_run, tmp_path, edit)
    code, _, err = _run(cli_train_args(inputs, run, steps=STEPS), monkeypatch)
    assert code == 2, err
    assert "Traceback" not in err and "does not fit" in err and words in " ".join(err.split())
    assert not (run / "metrics.json").exists()


def test_the_untouched_checkpoint_still_resumes(inputs, cut_run, tmp_path, monkeypatch):
    run = _edited_copy(cut_run, tmp_path, lambda s: None)
    code, _, err = _run(cli_train_args(inputs, run, "--stop-after", "1", steps=STEPS), monkeypatch)
    assert code == 0, err
    assert "resuming pretrain at step 2" in (run / "train.log").read_text()


def test_a_grid_of_millions_of_runs_is_refused_at_once(inputs, tmp_path, monkeypatch, capsys):
    """Before: 300 sizes on each latent axis (27 million runs) were listed one by one, for hours."""
    sizes = ",".join(str(i) for i in range(1, 301))
    t0 = time.perf_counter()
    code, _, err = cli_main(
        ["sweep", "--size", "tiny", "--variant", "mla-o", "--q-latent", sizes, "--kv-latent", sizes]
        + ["--o-latent", sizes, "--tokenizer", str(inputs["vocab"]), "--out", str(tmp_path / "sw"), "--dry-run"],
        monkeypatch,
        capsys,
    )
    assert time.perf_counter() - t0 < 5
    assert code == 2 and "27,000,000 runs" in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "sw").exists()


def test_a_run_folder_linked_out_of_the_sweep_is_refused(inputs, tmp_path, monkeypatch, capsys):
    """Before: OUT/mha_mlm a link to another folder, the sweep trained its run there."""
    sweep, elsewhere = tmp_path / "sw", tmp_path / "elsewhere"
    sweep.mkdir()
    elsewhere.mkdir()
    (sweep / "mha_mlm").symlink_to(elsewhere)
    args = cli_train_args(inputs, sweep, steps=(2, 0))[1:]
    args = args[: args.index("--out")]
    code, _, err = cli_main(["sweep", "--variant", "mha", "--out", str(sweep), *args], monkeypatch, capsys)
    assert code == 2, err
    assert "mha_mlm is a link" in " ".join(err.split()) and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []
