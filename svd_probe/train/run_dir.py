"""The run folder of `svd-probe train`: what it holds, when it may be written, and what a resumed
run must find there again.

    checkpoint.pt      one dict (see `loop.py`): the current phase's model, optimizer, step and
                       RNG state, plus the model config, the recipe and the data fingerprint
    model.safetensors  the pretrained encoder (what `svd-probe analyze` reads), with config.json
    metrics.json       written when the run ends
    train.log          one line per log interval

Policy: a folder is written only when it is missing, empty, holds a checkpoint (resumed if its
config, recipe and data match), or holds nothing but a train.log (a run killed before its first
checkpoint). Anything else, such as another tool's checkpoint, is refused unless the user says
`--overwrite`, which replaces the five files above and leaves every other file alone (a folder,
link, pipe or device in the place of one is refused by name, never deleted or followed).

Every file is written through `svd_probe.atomic` (temporary name, fsync, rename): a run killed
mid-write leaves the previous version, never half of one.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import torch

from svd_probe.atomic import NotRegularFileError, appendable, atomic_write, atomic_write_json, open_regular
from svd_probe.errors import TrainingInputError
from svd_probe.train import data as D
from svd_probe.train.config import DATA_PARTS, RESUME_KEYS, ModelConfig, TrainConfig, is_source_record
from svd_probe.train.model import Block, pretraining_parameters

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 1: the first lab (a LambdaLR state, no data fingerprint, no "format"); still resumable
PHASES = ("pretrain", "finetune")
PHASE_STATE = ("model", "optimizer", "rng", "timed_samples", "timed_seconds")  # a checkpoint with weights
START_OVER = "start over with --overwrite, or pass a new --out"  # the fix for an unusable run folder
RUN_FILES = (CHECKPOINT, "model.safetensors", "config.json", "metrics.json", "train.log")

# What bounds a checkpoint.pt (checkpoint_limit): the weights and AdamW's moments of the larger
# phase's model, and room for the rest.
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, each the shape of its parameter (amsgrad off: loop.make_optimizer)
SST2_LABELS = 2  # the fine-tuning head (loop: Classifier(cfg, n_labels=2))
TENSOR_SLACK = 4096  # bytes per parameter: the zip records and pickle entries of it, its moments and step (~1.4 kB)
CHECKPOINT_SLACK = 64 * 2**20  # the records (configs, fingerprint, metrics) and the RNG state: a few kB in fact


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds anything but a run of ours, unless told to overwrite."""
    if out.exists() and not out.is_dir():
        raise TrainingInputError(
            f"--out {out} is a file, not a folder", hint="pass a folder (it is created if missing)"
        )
    if not out.is_dir():
        return
    if overwrite:
        refuse_unplain_run_files(out)  # before the data is read, not once the run starts
        return
    log = out / "train.log"
    if not appendable(log):
        # The log is appended to, not replaced: a link would write elsewhere, a FIFO would hang.
        raise TrainingInputError(
            f"{log} is a link, pipe or device, not a plain file",
            hint="remove it, or pass a new --out",
        )
    names = {p.name for p in out.iterdir()}
    leftovers = {n for n in names if n.startswith(".") and n.endswith(".tmp")}  # atomic_write's, after a kill
    if CHECKPOINT in names or names - leftovers <= {"train.log"}:
        return
    ours = sorted(names & set(RUN_FILES))
    raise TrainingInputError(
        f"--out {out} is not empty and holds no checkpoint of a run to resume"
        + (f" (it holds {', '.join(ours)})" if ours else ""),
        hint="pass a new or empty --out, or add --overwrite to replace "
        + ", ".join(RUN_FILES)
        + " there (other files are left alone)",
    )


def refuse_unplain_run_files(out: Path) -> None:
    """--overwrite replaces only plain files: a folder, link, pipe or device at a run file's name
    is refused by name (never emptied, deleted or followed), before any run file goes."""
    for name in RUN_FILES:
        path = out / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise TrainingInputError(
                f"--overwrite replaces the run file {path}, but it is a link, pipe, device or folder, not a plain file",
                hint="move it away (svd-probe deletes none of these), or pass a new --out",
            )


def remove_run_files(out: Path) -> None:
    """--overwrite: the run's own files go; nothing else in the folder is touched, and a run
    file that is no plain file stops it (`refuse_unplain_run_files`) with none removed."""
    refuse_unplain_run_files(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def save_checkpoint(state: dict, out: Path) -> None:
    atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def checkpoint_limit(cfg: ModelConfig) -> int:
    """The most bytes a checkpoint.pt of a run of `cfg` can take: the parameters of its larger
    phase's model (fine-tuning's classifier: the pretraining model plus the SST-2 head) times
    1 + ADAMW_MOMENTS, TENSOR_SLACK per parameter tensor, and CHECKPOINT_SLACK for the records.

    Derived from the model, not a fixed constant: `loop._train` loads the checkpoint once the
    run's config is final (the tokenizer's vocabulary included), so the model is known there, and
    a constant that let through the 2 B parameters the lab allows (config.MAX_PARAMETERS: 24 GB
    with the moments) would bound nothing for the small models it mostly trains. A checkpoint of
    a larger model than the command's is refused here instead of by `check_resumable`."""
    with torch.device("meta"):  # one block, counted n_layers times (as pretraining_parameters)
        per_block = len(list(Block(cfg).parameters()))
    values = pretraining_parameters(cfg) + cfg.d_model * SST2_LABELS + SST2_LABELS
    tensors = cfg.n_layers * per_block + 3  # the blocks', the embedding, the head's weight and bias
    itemsize = torch.get_default_dtype().itemsize  # the dtype the parameters are built in
    return values * itemsize * (1 + ADAMW_MOMENTS) + tensors * TENSOR_SLACK + CHECKPOINT_SLACK


def load_checkpoint(out: Path, limit: int) -> dict | None:
    """The checkpoint dict of `out`, None when there is none; a damaged one is a typed error.

    `limit` (checkpoint_limit) bounds the file before torch reads any of it. The file is opened
    once (`atomic.open_regular`: never through a link, never blocking on a FIFO); what was opened
    is checked (a plain file of at most `limit` bytes) and torch loads from that same open file,
    so nothing can swap the file between the check and the load."""
    path = out / CHECKPOINT
    not_plain = TrainingInputError(
        f"the checkpoint {path} is a link, pipe, device or folder, not a plain file",
        hint="remove it, or pass a new --out",
    )
    try:
        with open_regular(path, follow_links=False) as (f, info):
            if info.st_size > limit:
                raise TrainingInputError(
                    f"the checkpoint {path} is damaged or of another model: {info.st_size:,} bytes, more than "
                    f"this run's model and optimizer state take ({limit:,} bytes at most)",
                    hint="resume with the flags of the run that wrote it, " + START_OVER,
                )
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated or foreign file: torch raises several types
                raise TrainingInputError(f"cannot read the checkpoint {path}: {e}", hint=START_OVER) from None
    except FileNotFoundError:
        return None
    except NotRegularFileError:
        raise not_plain from None
    except OSError as e:
        raise TrainingInputError(f"cannot read the checkpoint {path}: {e.strerror or e}", hint=START_OVER) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "phase" not in state:
        raise TrainingInputError(f"{path} is not a checkpoint of svd-probe train", hint=START_OVER)
    problem = _checkpoint_problem(state)
    if problem:
        raise TrainingInputError(f"the checkpoint {path} is damaged: {problem}", hint=START_OVER)
    return state


def _checkpoint_problem(state: dict) -> str | None:
    """What makes `state` no checkpoint that `run` writes, or None. The step's upper bound is the
    phase's length, which run_phase checks (fine-tuning's depends on the data)."""
    fmt, phase, step = state.get("format", 1), state["phase"], state["step"]
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > CHECKPOINT_FORMAT:
        return f"format {fmt} is newer than this svd-probe's {CHECKPOINT_FORMAT} (upgrade svd-probe to resume it)"
    if fmt not in range(1, CHECKPOINT_FORMAT + 1):
        return f"format {fmt!r}, not 1 to {CHECKPOINT_FORMAT}"
    if phase not in PHASES:
        return f"phase {phase!r}, not {' or '.join(PHASES)}"
    if isinstance(step, bool) or step < 0:
        return f"step {step!r}, not a count of steps"
    if "model" in state:
        missing = [k for k in PHASE_STATE if k not in state]
        if missing:
            return f"it holds weights but no {', '.join(missing)}"
        if not all(isinstance(state[k], dict) for k in ("model", "optimizer", "rng")):
            return "its model, optimizer or rng state is not a dict"
        if not _count(state["timed_samples"], integer=True) or not _count(state["timed_seconds"]):
            return "its timed_samples or timed_seconds is not a count >= 0"
        if phase == "finetune" and not isinstance(state.get("pretrain_metrics"), dict):
            # `run` pretrains where it finds no pretrain_metrics: it would start over, silently,
            # and drop the fine-tuning's weights. Every fine-tuning checkpoint run writes has them.
            return "it holds fine-tuning weights but not the pretraining's metrics"
    elif phase == "pretrain" or step != 0 or not isinstance(state.get("pretrain_metrics"), dict):
        # Only the phase boundary {phase: finetune, step: 0, pretrain_metrics} holds no weights.
        return f"{phase} step {step} without weights"
    return _record_problem(state)


def _count(x: Any, integer: bool = False) -> bool:
    """A finite number >= 0 (an int where `integer`; never a bool)."""
    typed = isinstance(x, int) if integer else isinstance(x, int | float)
    return typed and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _record_problem(state: dict) -> str | None:
    """What the resume reads besides the tensors: each of the type that `run` writes."""
    if "wall_time_s" in state and not _count(state["wall_time_s"]):
        return f"wall_time_s {state['wall_time_s']!r}, not a number of seconds >= 0"
    for key in ("model_config", "recipe"):
        if key in state and not isinstance(state[key], dict):
            return f"its {key} is not a dict"
    data = state.get("data")
    if data is not None and not (isinstance(data, dict) and all(is_source_record(data.get(k)) for k in DATA_PARTS)):
        return "its data fingerprint is not {tokenizer, pretrain, sst2} records of source and sha256"
    if not is_source_record(state.get("init_from")):
        return "its init_from is not a record of source and sha256"
    pre = state.get("pretrain_metrics")
    if pre is not None and not (isinstance(pre, dict) and "pretrain_samples_per_s" in pre):
        return "its pretrain_metrics are not those of a finished pretraining"
    return None


def write_json(obj: Any, path: Path) -> None:
    atomic_write_json(path, obj, indent=2)


def save_encoder(model: torch.nn.Module, cfg: ModelConfig, out: Path) -> None:
    """model.safetensors + config.json: the pretrained encoder, in the layout the adapter reads."""
    from safetensors.torch import save_file

    encoder = model.encoder
    assert isinstance(encoder, torch.nn.Module)
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in encoder.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(cfg.hf_config(), out / "config.json")


def load_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    encoder = model.encoder
    assert isinstance(encoder, torch.nn.Module)
    encoder.load_state_dict(load_file(str(path)))


# ---- what a resumed run must see again -----------------------------------------------------------


def data_fingerprint(tokenizer_spec: str, tok: D.Tok, pretrain_source: str, pretrain_splits, sst2) -> dict:
    """sha256 of the tokenizer and of each data source's content (not its path: the same files
    moved elsewhere are the same data), with the sources as given, to name them in a mismatch."""
    fp: dict[str, Any] = {
        "tokenizer": {"source": tokenizer_spec, "sha256": tok.fingerprint()},
        "pretrain": {"source": pretrain_source, "sha256": D.fingerprint_lines(*pretrain_splits)},
        "sst2": None,
    }
    if sst2 is not None:
        (ts, ty), (ds, dy), source = sst2
        fp["sst2"] = {
            "source": source,
            "sha256": D.fingerprint_lines(ts, [str(y) for y in ty], ds, [str(y) for y in dy]),
        }
    return fp


def check_same_data(recorded: dict | None, now: dict, out: Path) -> None:
    """Refuse a resume whose tokenizer or data differ from the checkpoint's, naming both."""
    if recorded is None:  # a checkpoint of an older svd-probe: nothing to compare with
        return
    for key, label, flag in (
        ("tokenizer", "tokenizer", "--tokenizer"),
        ("pretrain", "pretraining data", "--data-dir or --dataset"),
        ("sst2", "SST-2 data", "--sst2-dir"),
    ):
        a, b = recorded.get(key), now.get(key)
        if a is None or b is None or a["sha256"] == b["sha256"]:
            continue
        raise TrainingInputError(
            f"{out} holds a run trained with different {label}: the checkpoint has {a['source']} "
            f"(sha256 {a['sha256'][:12]}), this command gives {b['source']} (sha256 {b['sha256'][:12]})",
            hint=f"pass the {flag} the run used, or start over with --overwrite (or a new --out)",
        )


def check_same_init(recorded: dict | None, now: dict | None, out: Path) -> None:
    """Refuse a resume that starts from other weights (--init-from) than the checkpoint's run."""
    a = recorded["sha256"] if recorded else None
    b = now["sha256"] if now else None
    if a != b:

        def name(r: dict | None) -> str:
            return f"--init-from {r['source']} (sha256 {r['sha256'][:12]})" if r else "a random initialization"

        raise TrainingInputError(
            f"{out} holds a run started from {name(recorded)}; this command starts from {name(now)}",
            hint="pass the --init-from the run used, or start over with --overwrite (or a new --out)",
        )


def check_resumable(state: dict, cfg: ModelConfig, tc: TrainConfig, out: Path) -> None:
    """Refuse a resume under another model config or recipe."""
    hint = "resume with the same flags, or start over with --overwrite (or a new --out)"
    recorded = state.get("model_config")
    if not isinstance(recorded, dict) or ModelConfig.from_dict(recorded).to_dict() != cfg.to_dict():
        raise TrainingInputError(f"{out} holds a run of a different model config", hint=hint)
    recipe = state.get("recipe") or {}
    diff = [k for k in RESUME_KEYS if recipe.get(k) != getattr(tc, k)]
    if diff:
        raise TrainingInputError(f"{out} holds a run with a different recipe ({', '.join(diff)})", hint=hint)


def describe_source(path: Path | None, dataset: str | None) -> str:
    return os.path.abspath(path) if path is not None else f"--dataset {dataset}"
