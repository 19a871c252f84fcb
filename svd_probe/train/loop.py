"""Pretraining (MLM) and fine-tuning (SST-2) loops, checkpoints, resume, metrics.

A run lives in one `--out` folder:

    checkpoint.pt      model + optimizer + scheduler + step + RNG state of the current phase
    model.safetensors  the pretrained encoder (what `svd-probe analyze` reads), with config.json
    metrics.json       written when the run ends
    train.log          one line per log interval

Determinism: the batch order of step s is a function of (seed, epoch) and the MLM mask of step
s a function of (seed, step), so a resumed run sees exactly the batches an uninterrupted run
sees, and on CPU reaches the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from svd_probe.errors import TrainingInputError
from svd_probe.options import pick_device
from svd_probe.train import data as D
from svd_probe.train.config import MAX_SEQ_LEN, ModelConfig, count_parameters
from svd_probe.train.model import Classifier, MaskedLM, num_parameters, parameter_shapes

CHECKPOINT = "checkpoint.pt"
# Recipe fields that must match for a run folder to be resumed.
_RESUME_KEYS = (
    "pretrain_steps",
    "finetune_steps",
    "finetune_epochs",
    "batch_size",
    "finetune_batch_size",
    "lr",
    "finetune_lr",
    "warmup_frac",
    "weight_decay",
    "seed",
    "seq_len",
)
EVAL_MASK_SEED = 1234  # the same valid-set masks for every run, so runs compare on equal terms


@dataclass
class TrainConfig:
    pretrain_steps: int = 2000
    finetune_steps: int | None = None  # None: finetune_epochs (default 1) over train.tsv
    finetune_epochs: float | None = None
    batch_size: int = 128
    finetune_batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    warmup_frac: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500
    seq_len: int = 128
    log_every: int = 50
    device: str = "auto"
    compile: bool = False
    # Stop a phase after this many steps of it (checkpointed), e.g. to split a run across
    # sessions; the schedule still follows the full step count.
    stop_after: int | None = None

    def validate(self) -> None:
        """Every value a flag or a config file can set, checked before anything is read or written."""

        def bad(msg: str, hint: str | None = None) -> None:
            raise TrainingInputError(f"bad training config: {msg}", hint=hint)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, low in (
            ("pretrain_steps", 0),
            ("batch_size", 1),
            ("finetune_batch_size", 1),
            ("checkpoint_every", 1),
            ("log_every", 1),
            ("seq_len", 8),
            ("seed", 0),
        ):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                bad(f"{name} must be an integer >= {low}, got {v!r}")
        if self.seq_len > MAX_SEQ_LEN:
            bad(f"seq_len must be at most {MAX_SEQ_LEN:,}, got {self.seq_len:,}")
        if self.seed >= 2**31:
            bad(f"seed must be below 2**31, got {self.seed}")
        if self.finetune_steps is not None and (not is_int(self.finetune_steps) or self.finetune_steps < 0):
            bad(f"finetune_steps must be an integer >= 0, got {self.finetune_steps!r}")
        if self.finetune_epochs is not None and (not is_num(self.finetune_epochs) or self.finetune_epochs <= 0):
            bad(f"finetune_epochs must be a finite number > 0, got {self.finetune_epochs!r}")
        if self.stop_after is not None and (not is_int(self.stop_after) or self.stop_after < 1):
            bad(
                f"stop_after must be a positive number of steps, got {self.stop_after!r}",
                hint="--stop-after N stops the current phase after N steps and writes a checkpoint",
            )
        for name in ("lr", "finetune_lr"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                bad(f"{name} must be a finite positive number, got {v!r}", hint="e.g. --lr 1e-3 --finetune-lr 1e-4")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_num(self.warmup_frac) or not 0 <= self.warmup_frac < 1:
            bad(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")


@dataclass
class DataSources:
    tokenizer: str
    data_dir: Path | None = None
    dataset: str | None = None  # "wikitext-103" through `datasets`
    sst2_dir: Path | None = None


@dataclass
class Reporter:
    """Where progress goes: a log file always, a rich progress bar when enabled."""

    log_path: Path | None = None
    progress: Any = None  # rich.progress.Progress or None
    echo: Callable[[str], None] | None = None
    _task: Any = None

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
        if self.echo is not None:
            self.echo(line)

    def start(self, name: str, total: int, done: int) -> None:
        if self.progress is not None:
            self._task = self.progress.add_task(name, total=total, completed=done, loss=float("nan"), sps=0.0)

    def update(self, done: int, loss: float, sps: float) -> None:
        if self.progress is not None and self._task is not None:
            self.progress.update(self._task, completed=done, loss=loss, sps=sps)


def _optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, sched) -> torch.Tensor:
    """One update of both phases: backward, clip the gradient norm at 1.0, AdamW, schedule.
    Returns the gradient norm before clipping."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def rich_progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[sps]:,.0f} samples/s"),
        TimeRemainingColumn(),
        console=console,
    )


# ---- helpers ---------------------------------------------------------------------------------


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def autocast(dev: torch.device):
    # bf16 autocast on the GPU only: CPU bf16 is slow and the CPU path is for tests.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, dev: torch.device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases and norm weights
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=dev.type == "cuda")


def make_scheduler(opt, total_steps: int, warmup_frac: float):
    """Linear warmup to the peak lr, then linear decay to zero at `total_steps`."""
    warmup = max(1, int(round(warmup_frac * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_batch(n_rows: int, batch: int, step: int, seed: int, cache: dict) -> torch.Tensor:
    """Row indices of step `step`: epochs are seeded permutations; the tail of each is dropped."""
    per_epoch = n_rows // batch
    epoch, j = divmod(step, per_epoch)
    if cache.get("epoch") != epoch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        cache["epoch"], cache["perm"] = epoch, torch.randperm(n_rows, generator=g)
    return cache["perm"][j * batch : (j + 1) * batch]


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def rng_state(dev: torch.device) -> dict:
    s = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(dev)
    return s


def set_rng_state(s: dict, dev: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if dev.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], dev)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_encoder(model: torch.nn.Module, cfg: ModelConfig, out: Path) -> None:
    """model.safetensors + config.json: the pretrained encoder, in the layout the adapter reads."""
    from safetensors.torch import save_file

    encoder = model.encoder
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in encoder.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(cfg.hf_config(), out / "config.json")


def load_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.encoder.load_state_dict(load_file(str(path)))


def dry_run_summary(cfg: ModelConfig) -> dict:
    """Parameter count and shapes of the pretraining model, without data or training."""
    with torch.device("meta"):
        model = MaskedLM(cfg)
    return {
        "parameters": num_parameters(model),
        "parameters_formula": count_parameters(cfg),
        "non_embedding_parameters": num_parameters(model) - cfg.vocab_size * cfg.d_model,
        "variant": cfg.variant,
        "config": cfg.to_dict(),
        "shapes": {
            "encoder." + n if not n.startswith("encoder.") else n: s for n, s in parameter_shapes(model).items()
        },
    }


# ---- the run ---------------------------------------------------------------------------------


class _Timer:
    """Samples/s over training steps only, skipping the first steps of a process (compile, warmup)."""

    def __init__(self, dev: torch.device, skip: int):
        self.dev, self.skip, self.samples, self.seconds, self.t0, self.seen = dev, skip, 0, 0.0, None, 0

    def _sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def step_done(self, n: int) -> None:
        self.seen += 1
        if self.seen == self.skip:
            self._sync()
            self.t0 = time.perf_counter()
        elif self.seen > self.skip:
            self.samples += n

    def stop(self) -> None:
        if self.t0 is not None:
            self._sync()
            self.seconds += time.perf_counter() - self.t0
            self.t0 = None

    def rate(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 and self.samples else None


# Files a run writes into its folder; --overwrite replaces these and nothing else.
RUN_FILES = (CHECKPOINT, "model.safetensors", "config.json", "metrics.json", "train.log")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds anything but a run of ours, unless told to overwrite.

    Accepted: a missing or empty folder; one that holds a checkpoint (resumed, if its config and
    recipe match: checked once the checkpoint is read); one that holds only a train.log (a run
    killed before its first checkpoint). Anything else (another tool's checkpoint, a finished run
    whose checkpoint was deleted) would be overwritten, so it is refused.
    """
    if out.exists() and not out.is_dir():
        raise TrainingInputError(
            f"--out {out} is a file, not a folder", hint="pass a folder (it is created if missing)"
        )
    if not out.is_dir() or overwrite:
        return
    names = {p.name for p in out.iterdir()}
    leftovers = {n for n in names if n.startswith("." + CHECKPOINT) and n.endswith(".tmp")}
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


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def data_fingerprint(src: DataSources, tok, pretrain_splits, sst2) -> dict:
    """What a resumed run must read again: sha256 of the tokenizer and of each data source's
    content (not its path: the same files moved elsewhere are the same data), with the sources
    as given, to name them in a mismatch."""
    fp: dict[str, Any] = {"tokenizer": {"source": src.tokenizer, "sha256": tok.fingerprint()}}
    where = os.path.abspath(src.data_dir) if src.data_dir is not None else f"--dataset {src.dataset}"
    fp["pretrain"] = {"source": where, "sha256": D.fingerprint_lines(*pretrain_splits)}
    if sst2 is not None:
        (ts, ty), (ds, dy) = sst2
        fp["sst2"] = {
            "source": os.path.abspath(src.sst2_dir) if src.sst2_dir is not None else None,
            "sha256": D.fingerprint_lines(ts, [str(y) for y in ty], ds, [str(y) for y in dy]),
        }
    else:
        fp["sst2"] = None
    return fp


def _check_same_data(recorded: dict | None, now: dict, out: Path) -> None:
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


class _NonFinite:
    """Watches losses and gradient norms without a host sync per step; checked when the loop
    syncs anyway (logging) and before every checkpoint, so no checkpoint holds a diverged model."""

    def __init__(self, phase: str, lr_flag: str, dev: torch.device):
        self.phase, self.lr_flag = phase, lr_flag
        self.flag = torch.zeros((), dtype=torch.bool, device=dev)

    def watch(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.flag |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)

    def check(self, step: int, model: torch.nn.Module | None = None, lr: float | None = None) -> None:
        bad = bool(self.flag)
        if not bad and model is not None:
            bad = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if bad:
            raise TrainingInputError(
                f"the {self.phase} loss became non-finite by step {step}"
                + (f" (lr {lr:.3g})" if lr is not None else "")
                + "; the run stopped before saving a diverged model",
                hint=f"lower {self.lr_flag} or raise --warmup-frac, then start over with --overwrite (or a new --out)",
            )


def run(
    cfg: ModelConfig,
    tc: TrainConfig,
    src: DataSources,
    out: Path,
    reporter: Reporter | None = None,
    overwrite: bool = False,
) -> dict:
    """Pretrain, export the encoder, fine-tune on SST-2 if given, write metrics.json; resumable."""
    t_start = time.perf_counter()
    tc.validate()
    out = Path(out)
    check_out_dir(out, overwrite)
    dev = pick_device(tc.device)
    reporter = reporter or Reporter()
    # Inputs are checked before anything is written, so a typo costs nothing.
    tok = D.load_tokenizer(src.tokenizer)
    if src.data_dir is None and src.dataset is None:
        raise TrainingInputError(
            "no pretraining text", hint="pass --data-dir (e.g. ../shared/data/wikitext-2) or --dataset wikitext-103"
        )
    sst2 = D.read_sst2_dir(src.sst2_dir) if src.sst2_dir is not None else None
    if src.data_dir is not None:
        train_lines, valid_lines = D.read_wikitext_dir(src.data_dir)
    else:
        assert src.dataset is not None
        train_lines, valid_lines = D.read_wikitext_hub(src.dataset)
    fingerprint = data_fingerprint(src, tok, (train_lines, valid_lines), sst2)
    if tok.vocab_size != cfg.vocab_size:
        cfg = replace(cfg, vocab_size=tok.vocab_size)
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, tc.seq_len))

    if overwrite and out.is_dir():
        _remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    reporter.log_path = reporter.log_path or out / "train.log"
    ckpt_path = out / CHECKPOINT
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: torch raises several types
            raise TrainingInputError(
                f"cannot read the checkpoint {ckpt_path}: {e}",
                hint="start over with --overwrite, or pass a new --out",
            ) from None
        _check_resumable(state, cfg, tc, out)
        _check_same_data(state.get("data"), fingerprint, out)
        if state.get("data") is None:
            reporter.log("the checkpoint records no data fingerprint (older svd-probe); recording this command's")
        reporter.log(f"resuming {state['phase']} at step {state['step']} from {ckpt_path}")
    recipe = {k: getattr(tc, k) for k in _RESUME_KEYS}
    if state is not None and state.get("data") and fingerprint["sst2"] is None:
        fingerprint["sst2"] = state["data"].get("sst2")  # a pretraining-only rerun keeps the record
    saved = {"recipe": recipe, "data": fingerprint}  # in every checkpoint
    prior_wall = state.get("wall_time_s", 0.0) if state else 0.0
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    reporter.log(
        f"run {cfg.variant} seed={tc.seed} device={device_name(dev)} params={count_parameters(cfg):,} out={out}"
    )

    def wall() -> float:
        return prior_wall + time.perf_counter() - t_start

    # -- pretraining
    pre = state.get("pretrain_metrics") if state else None
    if pre is None:
        train_rows = D.pack_sequences(tok, train_lines, tc.seq_len)
        valid_rows = D.pack_sequences(tok, valid_lines, tc.seq_len)
        reporter.log(
            f"pretraining data: {len(train_rows):,} train rows, {len(valid_rows):,} valid rows of {tc.seq_len} tokens"
        )
        pre = _pretrain(
            cfg,
            tc,
            tok,
            train_rows,
            valid_rows,
            dev,
            out,
            state if state and state["phase"] == "pretrain" else None,
            saved,
            reporter,
            wall,
        )
        if pre is None:  # stopped early on purpose; the checkpoint holds the state
            return {"stopped": True}
        state = None
    if not (out / "model.safetensors").exists():
        raise TrainingInputError(
            f"{out} has a finished pretraining checkpoint but no model.safetensors", hint="use a new --out"
        )

    # -- fine-tuning
    ft = {"sst2_dev_accuracy": None, "finetune_samples_per_s": None, "finetune_steps": 0}
    if sst2 is not None:
        ft = _finetune(
            cfg,
            tc,
            tok,
            sst2,
            dev,
            out,
            state if state and state["phase"] == "finetune" else None,
            pre,
            saved,
            reporter,
            wall,
        )
        if ft is None:
            return {"stopped": True}

    metrics = {
        "parameters": count_parameters(cfg),
        "mlm_loss": pre["mlm_loss"],
        "mlm_accuracy": pre["mlm_accuracy"],
        "sst2_dev_accuracy": ft["sst2_dev_accuracy"],
        "pretrain_samples_per_s": pre["pretrain_samples_per_s"],
        "finetune_samples_per_s": ft["finetune_samples_per_s"],
        "wall_time_s": round(wall(), 2),
        "device": device_name(dev),
        "seed": tc.seed,
        "git_commit": git_commit(),
        "variant": cfg.variant,
        "config": cfg.to_dict(),
        "train_config": {**asdict(tc), "finetune_steps": ft["finetune_steps"]},
        "torch_version": torch.__version__,
    }
    write_json(metrics, out / "metrics.json")
    reporter.log(
        "done: "
        + json.dumps(
            {
                k: metrics[k]
                for k in (
                    "mlm_loss",
                    "mlm_accuracy",
                    "sst2_dev_accuracy",
                    "pretrain_samples_per_s",
                    "finetune_samples_per_s",
                    "wall_time_s",
                )
            }
        )
    )
    return metrics


def _check_resumable(state: dict, cfg: ModelConfig, tc: TrainConfig, out: Path) -> None:
    hint = "resume with the same flags, or start over with --overwrite (or a new --out)"
    if state.get("model_config") != cfg.to_dict():
        raise TrainingInputError(f"{out} holds a run of a different model config", hint=hint)
    diff = [k for k in _RESUME_KEYS if state.get("recipe", {}).get(k) != getattr(tc, k)]
    if diff:
        raise TrainingInputError(f"{out} holds a run with a different recipe ({', '.join(diff)})", hint=hint)


def _compiled(model, tc: TrainConfig):
    return torch.compile(model) if tc.compile else model


def _pretrain(cfg, tc, tok, train_rows, valid_rows, dev, out, state, recipe, reporter, wall):
    # Each phase seeds its own initialization, so where a run was interrupted cannot change it.
    torch.manual_seed(tc.seed)
    model = MaskedLM(cfg).to(dev)
    opt = make_optimizer(model, tc.lr, tc.weight_decay, dev)
    sched = make_scheduler(opt, tc.pretrain_steps, tc.warmup_frac)
    step, samples, seconds = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], dev)
        step, samples, seconds = state["step"], state["timed_samples"], state["timed_seconds"]
    batch = min(tc.batch_size, len(train_rows))
    if batch < tc.batch_size:
        reporter.log(f"batch size {tc.batch_size} > {len(train_rows)} rows: using {batch}")
    fwd = _compiled(model, tc)
    timer = _Timer(dev, skip=min(3, max(1, tc.pretrain_steps - step - 1)))
    cache: dict = {}
    stop_at = tc.pretrain_steps if tc.stop_after is None else min(tc.pretrain_steps, step + tc.stop_after)
    reporter.start(f"pretrain {cfg.variant}", tc.pretrain_steps, step)
    loss_sum, n_logged = torch.zeros((), device=dev), 0
    finite = _NonFinite("pretraining", "--lr", dev)

    def checkpoint():
        finite.check(step, model, sched.get_last_lr()[0])
        timer.stop()
        save_atomic(
            {
                "phase": "pretrain",
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng_state(dev),
                "model_config": cfg.to_dict(),
                **recipe,
                "timed_samples": samples + timer.samples,
                "timed_seconds": seconds + timer.seconds,
                "wall_time_s": wall(),
            },
            out / CHECKPOINT,
        )
        if step < stop_at:
            timer.t0 = time.perf_counter() if timer.seen >= timer.skip else None

    model.train()
    while step < stop_at:
        idx = epoch_batch(len(train_rows), batch, step, tc.seed, cache)
        inputs, positions, targets = D.mask_tokens(train_rows[idx], tok, step_generator(tc.seed, step, 1))
        inputs, positions, targets = (t.to(dev, non_blocking=True) for t in (inputs, positions, targets))
        with autocast(dev):
            loss, _ = fwd(inputs, positions, targets)
        finite.watch(loss, _optimizer_step(loss, model, opt, sched))
        step += 1
        timer.step_done(len(idx))
        loss_sum += loss.detach()
        n_logged += 1
        if step % tc.log_every == 0 or step == stop_at:
            mean_loss = loss_sum.item() / n_logged  # the one host sync per log interval
            finite.check(step)
            loss_sum.zero_()
            n_logged = 0
            sps = (
                timer.samples / (timer.seconds + time.perf_counter() - timer.t0) if timer.t0 and timer.samples else 0.0
            )
            reporter.update(step, mean_loss, sps)
            reporter.log(
                f"pretrain step {step}/{tc.pretrain_steps} loss {mean_loss:.4f} lr {sched.get_last_lr()[0]:.2e} samples/s {sps:,.0f}"
            )
        if step % tc.checkpoint_every == 0 or step == stop_at:
            checkpoint()
    if step < tc.pretrain_steps:
        reporter.log(f"stopped after step {step} (--stop-after); rerun the same command to resume")
        return None
    finite.check(step, model)
    timer.stop()
    loss, acc = evaluate_mlm(model, valid_rows, tok, dev, tc.batch_size)
    total_samples, total_seconds = samples + timer.samples, seconds + timer.seconds
    pre = {
        "mlm_loss": loss,
        "mlm_accuracy": acc,
        "pretrain_samples_per_s": round(total_samples / total_seconds, 1)
        if total_seconds > 0 and total_samples
        else None,
    }
    reporter.log(f"pretrain valid: mlm_loss {loss:.4f} mlm_accuracy {acc:.4f}")
    save_encoder(model, cfg, out)
    # The finished phase is recorded by a checkpoint that holds its metrics and no weights.
    save_atomic(
        {
            "phase": "finetune",
            "step": 0,
            "pretrain_metrics": pre,
            "model_config": cfg.to_dict(),
            **recipe,
            "wall_time_s": wall(),
        },
        out / CHECKPOINT,
    )
    return pre


@torch.no_grad()
def evaluate_mlm(model: MaskedLM, rows: torch.Tensor, tok, dev, batch: int) -> tuple[float, float]:
    """Mean MLM loss and accuracy over every masked position of `rows`, with fixed masks."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(rows), batch):
        inputs, positions, targets = D.mask_tokens(rows[i : i + batch], tok, gen)
        with autocast(dev):
            loss, c = model(inputs.to(dev), positions.to(dev), targets.to(dev))
        n = targets.numel()
        loss_sum += loss.item() * n
        correct += int(c)
        count += n
    model.train(was_training)
    return round(loss_sum / count, 5), round(correct / count, 5)


def _finetune(cfg, tc, tok, sst2, dev, out, state, pre, recipe, reporter, wall):
    (train_s, train_y), (dev_s, dev_y) = sst2
    train_ids = D.encode_sentences(tok, train_s, tc.seq_len)
    dev_ids = D.encode_sentences(tok, dev_s, tc.seq_len)
    labels = torch.tensor(train_y)
    n_labels = max(max(train_y), max(dev_y)) + 1
    batch = min(tc.finetune_batch_size, len(train_ids))
    per_epoch = len(train_ids) // batch
    if tc.finetune_steps is not None:
        total = tc.finetune_steps
    else:
        total = max(1, math.ceil((tc.finetune_epochs or 1.0) * per_epoch))
    reporter.log(
        f"fine-tuning data: {len(train_ids):,} train, {len(dev_ids):,} dev sentences; {total} steps of {batch}"
    )

    torch.manual_seed(tc.seed + 1)  # the head's initialization (the encoder is loaded below)
    model = Classifier(cfg, n_labels).to(dev)
    opt = make_optimizer(model, tc.finetune_lr, tc.weight_decay, dev)
    sched = make_scheduler(opt, total, tc.warmup_frac)
    step, samples, seconds = 0, 0, 0.0
    if state is not None and "model" in state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], dev)
        step, samples, seconds = state["step"], state["timed_samples"], state["timed_seconds"]
    else:
        load_encoder_weights(model, out / "model.safetensors")
    fwd = _compiled(model, tc)
    timer = _Timer(dev, skip=min(3, max(1, total - step - 1)))
    cache: dict = {}
    stop_at = total if tc.stop_after is None else min(total, step + tc.stop_after)
    reporter.start(f"finetune {cfg.variant}", total, step)
    loss_sum, n_logged = torch.zeros((), device=dev), 0
    finite = _NonFinite("fine-tuning", "--finetune-lr", dev)

    def checkpoint():
        finite.check(step, model, sched.get_last_lr()[0])
        timer.stop()
        save_atomic(
            {
                "phase": "finetune",
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng_state(dev),
                "model_config": cfg.to_dict(),
                **recipe,
                "pretrain_metrics": pre,
                "timed_samples": samples + timer.samples,
                "timed_seconds": seconds + timer.seconds,
                "wall_time_s": wall(),
            },
            out / CHECKPOINT,
        )
        if step < stop_at:
            timer.t0 = time.perf_counter() if timer.seen >= timer.skip else None

    model.train()
    while step < stop_at:
        idx = epoch_batch(len(train_ids), batch, step, tc.seed + 1, cache)
        ids, pad = D.pad_batch([train_ids[i] for i in idx.tolist()], tok.pad_id)
        ids, pad, y = (
            ids.to(dev, non_blocking=True),
            pad.to(dev, non_blocking=True),
            labels[idx].to(dev, non_blocking=True),
        )
        with autocast(dev):
            logits = fwd(ids, pad)
        loss = F.cross_entropy(logits.float(), y)
        finite.watch(loss, _optimizer_step(loss, model, opt, sched))
        step += 1
        timer.step_done(len(idx))
        loss_sum += loss.detach()
        n_logged += 1
        if step % tc.log_every == 0 or step == stop_at:
            mean_loss = loss_sum.item() / n_logged
            finite.check(step)
            loss_sum.zero_()
            n_logged = 0
            sps = (
                timer.samples / (timer.seconds + time.perf_counter() - timer.t0) if timer.t0 and timer.samples else 0.0
            )
            reporter.update(step, mean_loss, sps)
            reporter.log(
                f"finetune step {step}/{total} loss {mean_loss:.4f} lr {sched.get_last_lr()[0]:.2e} samples/s {sps:,.0f}"
            )
        if step % tc.checkpoint_every == 0 or step == stop_at:
            checkpoint()
    if step < total:
        reporter.log(f"stopped after fine-tuning step {step} (--stop-after); rerun the same command to resume")
        return None
    finite.check(step, model)
    timer.stop()
    acc = evaluate_classifier(model, dev_ids, dev_y, tok, dev, 128)
    reporter.log(f"sst2 dev accuracy {acc:.4f} ({len(dev_ids)} sentences)")
    total_samples, total_seconds = samples + timer.samples, seconds + timer.seconds
    return {
        "sst2_dev_accuracy": acc,
        "finetune_samples_per_s": round(total_samples / total_seconds, 1)
        if total_seconds > 0 and total_samples
        else None,
        "finetune_steps": total,
    }


@torch.no_grad()
def evaluate_classifier(model: Classifier, seqs: list[list[int]], labels: list[int], tok, dev, batch: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(seqs), batch):
        ids, pad = D.pad_batch(seqs[i : i + batch], tok.pad_id)
        with autocast(dev):
            pred = model(ids.to(dev), pad.to(dev)).argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[i : i + batch])).sum())
    model.train()
    return round(correct / len(seqs), 5)


def build_train_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig defaults, then a --config file's training keys, then flags that were given."""
    from svd_probe.train.config import TRAIN_KEYS

    vals = {k: v for k, v in (file_values or {}).items() if k in TRAIN_KEYS}
    vals.update({k: v for k, v in (overrides or {}).items() if v is not None})
    floats = {"lr", "finetune_lr", "warmup_frac", "weight_decay", "finetune_epochs"}
    for k, v in vals.items():
        want = (int, float) if k in floats else int
        if k in TRAIN_KEYS and (isinstance(v, bool) or not isinstance(v, want)):
            raise TrainingInputError(f"bad training config: {k} must be a number, got {v!r}")
    try:
        tc = TrainConfig(**vals)
    except TypeError as e:
        raise TrainingInputError(f"bad training config: {e}") from None
    tc.validate()
    return tc
