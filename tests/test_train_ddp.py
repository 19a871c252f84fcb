"""`svd-probe train` under torchrun: two Gloo ranks on the CPU train what one process trains on
the same global batch, and resume together from rank 0's checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import cli_train_args, inputs_fixture  # noqa: F401

from svd_probe.errors import TrainingInputError
from svd_probe.train.config import TrainConfig
from svd_probe.train.loop import Ddp, check_batch

REPO = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[str]:
    """The logged loss of each step (log_every 1), as train.log writes it."""
    lines = (run_dir / "train.log").read_text().splitlines()
    return [ln.split(" loss ")[1].split()[0] for ln in lines if " step " in ln and " loss " in ln]


def test_the_global_batch_must_split_across_ranks():
    check_batch(TrainConfig(batch_size=8, finetune_batch_size=4), 4)
    with pytest.raises(TrainingInputError, match="--batch-size 6 does not split evenly across 4 ranks"):
        check_batch(TrainConfig(batch_size=6), 4)
    with pytest.raises(TrainingInputError, match="--finetune-batch-size 3"):
        check_batch(TrainConfig(batch_size=8, finetune_batch_size=3), 2)


def test_each_rank_takes_its_own_rows_of_the_global_batch():
    ids, targets = torch.arange(24).reshape(6, 4), torch.arange(6)
    parts = [Ddp(rank, 3).take((ids, targets)) for rank in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]  # rows in rank order
    assert torch.equal(torch.cat([p[0] for p in parts]), ids)  # together: the single process's batch
    assert Ddp(0, 1).take((ids,))[0] is ids


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_resume_together(inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)

    def args(out: Path, *extra: str) -> list[str]:
        a = cli_train_args(
            inputs, out, "--variant", "mla-o", "--o-norm", "rms", "--log-every", "1", *extra, steps=(5, 3)
        )
        a[a.index("--batch-size") + 1] = "8"  # global: 4 rows per rank
        a[a.index("--finetune-batch-size") + 1] = "8"
        return a

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = subprocess.run(
        [sys.executable, "-m", "svd_probe.cli", *args(single)], env=env, capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for extra in (("--stop-after", "2"), ()):  # cut after 2 pretraining steps, then resumed to the end
        r = subprocess.run(
            [*torchrun, "-m", "svd_probe.cli", *args(ddp, *extra)], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stdout + r.stderr
    log = (ddp / "train.log").read_text()
    assert "ddp_ranks=2 (batch 4 per rank)" in log and "resuming pretrain at step 2" in log
    assert log.count("run mla-o") == 2  # rank 0 alone writes the log

    # The same losses at every step (pretraining 1-5, fine-tuning 1-3), the same weights.
    assert losses(single) == losses(ddp)
    assert len(losses(single)) == 8
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    ca = torch.load(single / "checkpoint.pt", weights_only=True)["model"]
    cb = torch.load(ddp / "checkpoint.pt", weights_only=True)["model"]
    for name in ca:  # the fine-tuned classifier, head included
        torch.testing.assert_close(cb[name], ca[name], rtol=1e-4, atol=1e-5, msg=name)
