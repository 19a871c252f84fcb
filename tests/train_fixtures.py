"""Helpers shared by the training-lab tests: generated inputs, a small recipe, the CLI as a user
runs it, and the parameter-count formula (the oracle the model's own count is checked against).

Imported by the test modules (`from train_fixtures import ...`); the fixtures `inputs` and `tok`
become fixtures of every module that imports `inputs_fixture` and `tok_fixture`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from svd_probe import cli
from svd_probe.testing.text_samples import write_sst2, write_vocab, write_wikitext
from svd_probe.train import data as D
from svd_probe.train.config import TrainConfig
from svd_probe.train.loop import DataSources

VARIANTS = ("mha", "mla", "mla-o")


@pytest.fixture(scope="module", name="inputs")
def inputs_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-inputs")
    wiki = write_wikitext(root / "wikitext")
    # A test split, as WikiText ships one; the generator writes train and valid only.
    (wiki / "wiki.test.tokens").write_text((wiki / "wiki.valid.tokens").read_text())
    return {"vocab": write_vocab(root / "vocab.txt"), "wiki": wiki, "sst2": write_sst2(root / "SST-2")}


@pytest.fixture(scope="module", name="tok")
def tok_fixture(inputs):
    return D.load_tokenizer(str(inputs["vocab"]))


def small_recipe(**kw) -> TrainConfig:
    base = dict(
        pretrain_steps=8,
        finetune_steps=6,
        batch_size=8,
        finetune_batch_size=8,
        seq_len=32,
        lr=3e-3,
        finetune_lr=1e-3,
        checkpoint_every=2,
        log_every=2,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def sources(inputs, **kw) -> DataSources:
    base = dict(tokenizer=str(inputs["vocab"]), data_dir=inputs["wiki"], sst2_dir=inputs["sst2"])
    base.update(kw)
    return DataSources(**base)


def cli_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the console entry point as a user would; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["svd-probe", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    captured = capsys.readouterr()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, captured.out, captured.err


def cli_train_args(inputs, out: Path, *extra: str, steps: tuple[int, int] = (3, 2)) -> list[str]:
    """A tiny CPU `train` command line on the generated inputs."""
    return [
        "train",
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--tokenizer",
        str(inputs["vocab"]),
        "--data-dir",
        str(inputs["wiki"]),
        "--sst2-dir",
        str(inputs["sst2"]),
        "--pretrain-steps",
        str(steps[0]),
        "--finetune-steps",
        str(steps[1]),
        "--batch-size",
        "4",
        "--finetune-batch-size",
        "4",
        "--seq-len",
        "32",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def expected_parameters(
    variant, V, d, L, H, D, F, ql=None, kvl=None, ol=None, o_norm="none", n_labels: int | None = None
) -> int:
    """Parameters of the pretraining model (or, with n_labels, of the classifier), written out from
    the model's description, independently of the package."""
    embed = V * d  # the LM head is tied: no extra weights
    norms = 2 * d  # attention and FFN RMSNorm weights
    swiglu = (d * F + F) + (d * F + F) + (F * d + d)  # gate, up (with bias), down (with bias)
    if variant == "mha":
        attn = d * (3 * H * D) + (H * D) * d
    else:
        attn = d * (ql + kvl)  # the joint down-projection
        attn += ql + kvl  # latent RMSNorms
        attn += ql * (H * D)  # query up
        attn += kvl * (H * 2 * D)  # key and value up
        attn += (H * D) * d if variant == "mla" else (H * D) * ol + ol * d
        if variant == "mla-o":
            attn += {"none": 0, "rms": ol, "rms-per-head": H * ol}[o_norm]  # output-latent norm weights
    total = embed + L * (norms + attn + swiglu)
    if n_labels is not None:
        total += d * n_labels + n_labels  # the classification head
    return total


def damage_json_file(path: Path, damage: str) -> bool:
    """Put a damaged JSON file at `path`: "deep" (a nest 100,000 deep), "dev-zero" (a link to an
    endless device), "fifo" (a pipe; skips the test where there are none). False for any other
    `damage`, which the caller writes itself."""
    if damage == "deep":
        path.write_text("[" * 100_000)
    elif damage == "dev-zero":
        path.symlink_to("/dev/zero")
    elif damage == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs FIFOs")
        os.mkfifo(path)
    else:
        return False
    return True
