"""Configs of the training lab: the model (`ModelConfig`: variant, shapes, presets) and the recipe
(`TrainConfig`: steps, batches, learning rates, checkpointing), from flags and JSON config files.

Precedence, lowest first: the `--size` preset (or the dataclass defaults), then `--config
file.json`, then explicit flags. Every value is validated before anything is read or written, and
every problem a user can cause here is a `TrainingInputError` with a hint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from svd_probe.atomic import NotRegularFileError, read_head
from svd_probe.errors import TrainingInputError, shown

VARIANTS = ("mha", "mla", "mla-o")
OBJECTIVES = ("mlm", "clm")  # masked LM (bidirectional encoder) or causal LM (decoder)
O_NORMS = ("none", "rms", "rms-per-head")  # mla-o: a norm on the shared output latent
SIZES = ("small", "tiny")
MODEL_TYPE = "svd_probe_encoder"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of one encoder. Latent sizes are ignored by the variants that lack them."""

    variant: str = "mha"
    vocab_size: int = 30522
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    head_dim: int = 32
    ffn_dim: int = 1024
    rope_dims: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    q_latent: int = 64  # mla, mla-o
    kv_latent: int = 32  # mla, mla-o
    o_latent: int = 64  # mla-o
    o_norm: str = "none"  # mla-o: none, rms (one norm on the summed latent), rms-per-head
    objective: str = "mlm"  # mlm or clm: bidirectional or causal attention
    max_seq_len: int = 128

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hf_config(self) -> dict[str, Any]:
        """config.json beside model.safetensors: our fields plus the generic names tools look for."""
        d = {"model_type": MODEL_TYPE, "architectures": ["SvdProbeEncoder"], **self.to_dict()}
        d.update(hidden_size=self.d_model, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads)
        if self.variant == "mha":
            for k in ("q_latent", "kv_latent", "o_latent", "o_norm"):
                d.pop(k)
        elif self.variant == "mla":
            d.pop("o_latent")
            d.pop("o_norm")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A config recorded by an earlier run (metrics.json, a checkpoint); fields added since
        then take their defaults (o_norm none, objective mlm: what those runs trained)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Latent sizes and RoPE widths per variant, as the issue specifies them for `--size small`.
_SMALL: dict[str, dict[str, Any]] = {
    "mha": dict(rope_dims=32),
    "mla": dict(rope_dims=16, q_latent=64, kv_latent=32),
    "mla-o": dict(rope_dims=32, q_latent=64, kv_latent=32, o_latent=64),
}
# `--size tiny`: a CPU smoke-test model, a quarter of the width; latents keep small's ratios.
_TINY_BASE: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, head_dim=16, ffn_dim=256)
_TINY: dict[str, dict[str, Any]] = {
    "mha": dict(rope_dims=16),
    "mla": dict(rope_dims=8, q_latent=16, kv_latent=8),
    "mla-o": dict(rope_dims=16, q_latent=16, kv_latent=8, o_latent=16),
}

# `svd-probe train --kernels`: the training step's hand-written Triton kernels on CUDA ("triton")
# or the torch code only ("torch"); train/kernels.py. "triton" is the default: the whole
# stepgraph step of mha took 8.35 ms against the torch code's 8.73 ms (30,659 against 29,316
# samples/s, batch 256 x 128, one H100, 2026-12-07; benchmarks/README.md, "The kernels timed").
KERNELS_CHOICES = ("triton", "torch")
KERNELS_DEFAULT = "triton"

# Recipe fields that must match for a run folder to be resumed (not: how often to log or
# checkpoint, where to stop, the device).
RESUME_KEYS = (
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


# Keys a --config file may hold besides the model fields: the training recipe, and how often to
# checkpoint.
TRAIN_KEYS = set(RESUME_KEYS) | {"checkpoint_every", "checkpoint_minutes"}
_MODEL_KEYS = {f.name for f in fields(ModelConfig)}

# Bounds on what a config can make the program allocate. Far above any model this lab trains
# (the small preset: 13 M parameters), far below what would exhaust a machine before an error.
MAX_PARAMETERS = 2_000_000_000
# Tokens of a tokenizer (so rows of the tied embedding and columns of the head's logits), bounded
# on the tokenizer itself (data.load_tokenizer) and on a config's vocab_size (--dry-run). Real
# vocabularies hold 30,522 (bert-base-uncased) to 256,000 (Gemma) tokens; 2^20 is four times the
# largest. Past it the vocabulary alone exhausts a machine before a step: `tokenizers` took 6.8 s
# and 1.1 GB to load 2 million tokens, 123 s and 9.4 GB for 25 million (a 207 MB vocab.txt, under
# data.MAX_TOKENIZER_BYTES), and at the bound the small preset's embedding is 268 M parameters
# (1 GiB of float32; 4 GiB with its gradient and AdamW's two moments).
MAX_VOCAB = 1 << 20
# Bounds on what a config file (input svd-probe does not control) can make one training step
# allocate. The lab trains 128-token rows in batches of 256 (32,768 tokens); the bounds are 64x
# the row and 16x the batch. They are not a memory estimate: the tied head's logits alone take
# tokens x vocab floats (under mlm 15% of the tokens), 18.6 GB for a tiny model at 4 x 65,536
# tokens on the CPU, where MAX_SEQ_LEN was 65,536 and a SIGTERM waited minutes for the step.
MAX_SEQ_LEN = 8_192
MAX_BATCH_TOKENS = 1 << 19
_MAX_DIM = {
    "vocab_size": MAX_VOCAB,
    "d_model": 1 << 16,
    "n_layers": 1024,
    "n_heads": 1024,
    "head_dim": 4096,
    "ffn_dim": 1 << 18,
    "q_latent": 1 << 16,
    "kv_latent": 1 << 16,
    "o_latent": 1 << 16,
    "max_seq_len": MAX_SEQ_LEN,
}
CONFIG_FILE_MAX_BYTES = 1 << 20


@dataclass
class TrainConfig:
    """The recipe of a run, and how it is run (device, compile, checkpointing, stopping)."""

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
    # Also checkpoint when this many minutes have passed since the last checkpoint (0: never), so
    # a crash or a kill -9 loses minutes, not the steps since the last `checkpoint_every`.
    checkpoint_minutes: float = 5.0
    seq_len: int = 128
    log_every: int = 50
    device: str = "auto"
    compile: bool = False
    # The training step's hand-written Triton kernels on CUDA ("triton", where they apply and
    # pass their self-check) or the torch code only ("torch"): train/kernels.py.
    kernels: str = KERNELS_DEFAULT
    # Stop a phase after this many steps of it (checkpointed), e.g. to split a run across
    # sessions; the schedule still follows the full step count.
    stop_after: int | None = None
    # Start pretraining from this run's weights (mla-o from mha or mla: train/init_from.py).
    init_from: str | None = None

    def recipe(self) -> dict[str, Any]:
        """The fields that decide what a run computes: a checkpoint resumes only under the same."""
        return {k: getattr(self, k) for k in RESUME_KEYS}

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
                bad(f"{name} must be an integer >= {low}, got {_short(v)}")
        if self.seq_len > MAX_SEQ_LEN:
            bad(f"seq_len must be at most {MAX_SEQ_LEN:,}, got {self.seq_len:,}")
        for name in ("batch_size", "finetune_batch_size"):
            tokens = getattr(self, name) * self.seq_len
            if tokens > MAX_BATCH_TOKENS:
                bad(
                    f"{name} x seq_len must be at most {MAX_BATCH_TOKENS:,} tokens a step, got "
                    f"{getattr(self, name):,} x {self.seq_len:,} = {tokens:,}"
                )
        if self.seed >= 2**31:
            bad(f"seed must be below 2**31, got {self.seed}")
        if self.finetune_steps is not None and (not is_int(self.finetune_steps) or self.finetune_steps < 0):
            bad(f"finetune_steps must be an integer >= 0, got {_short(self.finetune_steps)}")
        if self.finetune_epochs is not None and (not is_num(self.finetune_epochs) or self.finetune_epochs <= 0):
            bad(f"finetune_epochs must be a finite number > 0, got {_short(self.finetune_epochs)}")
        if self.stop_after is not None and (not is_int(self.stop_after) or self.stop_after < 1):
            bad(
                f"stop_after must be a positive number of steps, got {_short(self.stop_after)}",
                hint="--stop-after N stops the current phase after N steps and writes a checkpoint",
            )
        for name in ("lr", "finetune_lr"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                bad(
                    f"{name} must be a finite positive number, got {_short(v)}",
                    hint="e.g. --lr 1e-3 --finetune-lr 1e-4",
                )
        if not is_num(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            bad(f"checkpoint_minutes must be a finite number >= 0, got {_short(self.checkpoint_minutes)}")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad(f"weight_decay must be a finite number >= 0, got {_short(self.weight_decay)}")
        if not is_num(self.warmup_frac) or not 0 <= self.warmup_frac < 1:
            bad(f"warmup_frac must be in [0, 1), got {_short(self.warmup_frac)}")
        if self.kernels not in KERNELS_CHOICES:
            bad(f"kernels must be triton or torch, got {_short(self.kernels)}", hint="--kernels triton|torch")


def check_variant(variant: object) -> str:
    if not isinstance(variant, str):
        raise TrainingInputError(
            f"variant must be a string, got {type(variant).__name__}", hint=f"use one of: {', '.join(VARIANTS)}"
        )
    v = variant.lower()
    if v not in VARIANTS:
        raise TrainingInputError(f"unknown variant {variant!r}", hint=f"use one of: {', '.join(VARIANTS)}")
    return v


def preset(variant: str, size: str = "small") -> ModelConfig:
    variant = check_variant(variant)
    if size == "small":
        return ModelConfig(variant=variant, **_SMALL[variant])
    if size == "tiny":
        return ModelConfig(variant=variant, **_TINY_BASE, **_TINY[variant])
    raise TrainingInputError(f"unknown size {size!r}", hint=f"use one of: {', '.join(SIZES)}")


MAX_METRICS_BYTES = 16 * 2**20  # a run's metrics.json is a few kB


def _read_json_object(path: Path, limit: int, *, name: str, what: str, hint: str) -> dict[str, Any]:
    """The JSON object in the regular file `path`, of at most `limit` bytes; else a
    TrainingInputError that says `name` (how messages name the file) is not `what`, with `hint`.

    Read through `atomic.read_head`: a pipe, device or folder is refused without a blocking
    open, and at most `limit` + 1 bytes are read whatever the file's size said, so one that grows
    (or is replaced) after the check, or a link to /dev/zero, costs `limit` at most."""
    size = f"{limit / 2**20:g} MiB"

    def refuse(message: str) -> TrainingInputError:
        return TrainingInputError(f"{name} {message}", hint=hint)

    try:
        data = read_head(path, limit + 1)
    except FileNotFoundError:
        raise refuse("not found") from None
    except NotRegularFileError:
        raise refuse("is not a regular file (a pipe, device or folder)") from None
    except OSError as e:
        raise TrainingInputError(f"cannot read {name}: {e.strerror or e}", hint=hint) from None
    if len(data) > limit:
        raise refuse(f"is over {size}, too large to be {what}")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise refuse(f"is nested too deeply to be {what}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise refuse(f"is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise refuse(f"is not {what}: it must hold a JSON object, not a {type(value).__name__}")
    return value


def read_metrics(path: Path) -> dict:
    """A metrics.json as a JSON object, read bounded (a huge file or a link to /dev/zero costs
    MAX_METRICS_BYTES at most); TrainingInputError, naming it, where it is not one. `compare`,
    `sweep` (is a run finished?) and `--init-from` (the source's steps) read it through this
    (here, beside `read_config_file`, so that `compare` loads without torch)."""
    return _read_json_object(
        Path(path),
        MAX_METRICS_BYTES,
        name=str(path),
        what="a metrics.json of svd-probe train",
        hint="pass finished run folders (svd-probe train --out ...)",
    )


DATA_PARTS = ("tokenizer", "pretrain", "sst2")  # a run's data fingerprint: a record of each


def is_source_record(r: object) -> bool:
    """None, or {source, sha256} of strings: a data fingerprint's part or an init_from source, as
    `svd-probe train` records them in its checkpoint and metrics.json."""
    return r is None or (isinstance(r, dict) and isinstance(r.get("source"), str) and isinstance(r.get("sha256"), str))


_RUN_CONFIG_KEYS = {"model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads"}
_GENERIC_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}


def read_config_file(path: Path, *, keep_model_type: bool = False) -> dict[str, Any]:
    """A JSON object of model fields and/or training keys, read bounded (CONFIG_FILE_MAX_BYTES);
    anything else is an error. A run's config.json is one too: its generic keys are dropped,
    `model_type` kept where `keep_model_type` (--init-from checks it, from the same read)."""
    data = _read_json_object(
        Path(path),
        CONFIG_FILE_MAX_BYTES,
        name=f"config file {path}",
        what="a training config",
        hint="pass --config PATH to a JSON object of model fields and training keys",
    )
    # A config.json written by a run (model_type, generic names) is accepted as input too. The
    # generic names are read by other tools, so they must say what the lab's fields say: a
    # {"hidden_size": 512} alone was dropped in silence and the run trained d_model 256.
    model_type = data.get("model_type")
    for generic, field in _GENERIC_NAMES.items():
        if generic in data and (field not in data or data[field] != data[generic]):
            said = f"its {field} {shown(data[field])}" if field in data else f"no {field}"
            raise TrainingInputError(
                f"config file {path} has {generic} {shown(data[generic])} but {said}",
                hint=f"the lab reads {field}: set it (to the same value where both are kept)",
            )
    data = {k: v for k, v in data.items() if k not in _RUN_CONFIG_KEYS}
    unknown = sorted(set(data) - _MODEL_KEYS - TRAIN_KEYS)
    if unknown:
        raise TrainingInputError(
            f"config file {path} has unknown keys: {', '.join(unknown)}",
            hint=f"model keys: {', '.join(sorted(_MODEL_KEYS))}; training keys: {', '.join(sorted(TRAIN_KEYS))}",
        )
    if keep_model_type:
        data["model_type"] = model_type
    return data


def build_config(
    variant: str | None,
    size: str = "small",
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelConfig:
    """Preset, then the config file's model fields, then flags that were given (not None)."""
    file_values = dict(file_values or {})
    # None is "not given"; any other value is checked ("" or false was taken for mha in silence).
    if variant is None:
        variant = file_values.get("variant")
    if variant is None:
        variant = "mha"
    cfg = preset(variant, size)
    model_vals = {k: v for k, v in file_values.items() if k in _MODEL_KEYS and k != "variant"}
    model_vals.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg = replace(cfg, **model_vals)
    except TypeError as e:
        raise TrainingInputError(f"bad model config: {e}") from None
    validate(cfg)
    check_size(cfg)
    return cfg


def check_size(cfg: ModelConfig) -> None:
    """Refuse a model whose parameters alone would exhaust the machine, before allocating any."""
    from svd_probe.train.model import pretraining_parameters  # the model owns its parameter count

    n = pretraining_parameters(cfg)
    if n > MAX_PARAMETERS:
        raise TrainingInputError(
            f"bad model config: {n:,} parameters, more than the lab trains ({MAX_PARAMETERS:,})",
            hint="lower d_model, n_layers, ffn_dim or the vocabulary size",
        )


def validate(cfg: ModelConfig) -> None:
    def bad(msg: str, hint: str | None = None):
        raise TrainingInputError(f"bad model config: {msg}", hint=hint)

    check_variant(cfg.variant)
    if cfg.objective not in OBJECTIVES:
        bad(f"objective must be one of {', '.join(OBJECTIVES)}, got {_short(cfg.objective)}")
    if cfg.o_norm not in O_NORMS:
        bad(f"o_norm must be one of {', '.join(O_NORMS)}, got {_short(cfg.o_norm)}")
    if cfg.o_norm != "none" and cfg.variant != "mla-o":
        bad(
            f"o_norm {cfg.o_norm} needs the shared output latent of mla-o, not {cfg.variant}",
            hint="add --variant mla-o, or drop --o-norm",
        )
    for name in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "head_dim",
        "ffn_dim",
        "q_latent",
        "kv_latent",
        "o_latent",
        "max_seq_len",
    ):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f"{name} must be a positive integer, got {_short(v)}")
        if v > _MAX_DIM[name]:
            bad(f"{name} must be at most {_MAX_DIM[name]:,}, got {v:,}")
    r = cfg.rope_dims
    if not isinstance(r, int) or isinstance(r, bool) or r < 0 or r % 2 or r > cfg.head_dim:
        bad(f"rope_dims must be an even integer in [0, head_dim={cfg.head_dim}], got {_short(r)}")
    for name in ("rope_theta", "norm_eps"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            bad(f"{name} must be a finite positive number, got {_short(v)}")


def _short(v: object, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def build_train_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig defaults, then a --config file's training keys, then flags that were given (not None)."""
    vals = {k: v for k, v in (file_values or {}).items() if k in TRAIN_KEYS}
    vals.update({k: v for k, v in (overrides or {}).items() if v is not None})
    floats = {"lr", "finetune_lr", "warmup_frac", "weight_decay", "finetune_epochs", "checkpoint_minutes"}
    for k, v in vals.items():
        want = (int, float) if k in floats else int
        if k in TRAIN_KEYS and (isinstance(v, bool) or not isinstance(v, want)):
            raise TrainingInputError(f"bad training config: {k} must be a number, got {_short(v)}")
    try:
        tc = TrainConfig(**vals)
    except TypeError as e:
        raise TrainingInputError(f"bad training config: {e}") from None
    tc.validate()
    return tc
