"""`--init-from RUN_DIR`: start an mla-o model from a trained mha or mla run, then train on.

The output map W_O [d, H·D] of each layer becomes the shared latent by truncated SVD,
W_O ≈ U_D Σ_D V_Dᵀ, split evenly between the factors:

    o_up   = U_D · Σ_D^½            [d, D]
    o_down = Σ_D^½ · V_Dᵀ           [D, H·D]      (o_up · o_down = the best rank-D W_O)

so at D = rank(W_O) (at most min(d, H·D)) the output map is reproduced exactly. An even split
gives both factors the same scale, so neither starts with gradients far larger than the other's.

Everything else is copied:

    mla -> mla-o   every tensor, by name (embeddings, norms, FFNs, down, q_norm, kv_norm, q_up,
                   kv_up). With o_norm none the new model computes the source's function
                   exactly at full rank; an output-latent norm (o_norm rms, rms-per-head) starts
                   at weight 1 and rescales each token's latent, so the function changes.
    mha -> mla-o   embeddings, attn_norm, ffn_norm and the FFNs. mha has no latents, so its
                   query map W_Q [H·D, d] and its key/value map (per head [W_K,h; W_V,h], the
                   kv_up layout) are factored the same way, at q_latent and kv_latent, with the
                   orthonormal side first: down = V_rᵀ, up = U_r Σ_r, latent norm weights 1.
                   The latent RMSNorm divides by the latent's RMS, which for an input of unit RMS
                   spread evenly over directions is about 1, so the start is close to the source's
                   attention but not equal to it (RMSNorm is not linear).

The source's shapes (d_model, n_layers, n_heads, head_dim, ffn_dim, rope_dims, vocab_size, and
for mla the latents) carry over; the caller chooses o_latent, o_norm and, for an mha source, the
query and KV latents (`derive_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from svd_probe.atomic import sha256_file
from svd_probe.errors import TrainingInputError
from svd_probe.train.config import (
    MODEL_TYPE,
    ModelConfig,
    build_config,
    check_size,
    read_config_file,
    read_metrics,
    validate,
)

_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ffn_dim", "rope_dims", "objective")


@dataclass
class SourceRun:
    """A finished run's encoder: its config, its tensors, and the sha256 of model.safetensors."""

    path: Path
    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    sha256: str
    # The source run's own pretraining steps (its metrics.json), so that `compare` can group the
    # runs started from sources of one recipe across seeds; None where it recorded none.
    pretrain_steps: int | None = None

    def record(self) -> dict:
        return {
            "source": str(self.path),
            "variant": self.cfg.variant,
            "sha256": self.sha256,
            "source_pretrain_steps": self.pretrain_steps,
        }


def load_source(run_dir: Path) -> SourceRun:
    """config.json + model.safetensors of a run of `svd-probe train` (mha or mla)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    hint = "pass --init-from a finished mha or mla run folder of svd-probe train"
    config, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise TrainingInputError(f"--init-from {run_dir} holds no config.json and model.safetensors", hint=hint)
    values = read_config_file(config, keep_model_type=True)
    model_type = values.pop("model_type")
    if model_type != MODEL_TYPE:
        raise TrainingInputError(f"--init-from {run_dir} is a {model_type!r} checkpoint, not {MODEL_TYPE}", hint=hint)
    cfg = build_config(None, "small", values)
    if cfg.variant not in ("mha", "mla"):
        raise TrainingInputError(
            f"--init-from {run_dir} is an {cfg.variant} run; mla-o starts from mha or mla", hint=hint
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise TrainingInputError(f"cannot read {weights}: {e}", hint=hint) from None
    _check_tensors(cfg, tensors, weights)
    return SourceRun(run_dir, cfg, tensors, sha256_file(weights), _source_steps(run_dir / "metrics.json"))


def _source_steps(metrics: Path) -> int | None:
    """pretrain_steps of the source's metrics.json, if it is there and says so (else None)."""
    try:
        steps = read_metrics(metrics)["train_config"]["pretrain_steps"]
    except (TrainingInputError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from svd_probe.train.model import Encoder

    with torch.device("meta"):
        want = {n: tuple(p.shape) for n, p in Encoder(cfg).state_dict().items()}
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    extra = sorted(set(got) - set(want))[:3]
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        wrong = sorted(n for n in set(want) & set(got) if want[n] != got[n])[:3]
        raise TrainingInputError(
            f"{path} does not match its config.json"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; wrong shape: {', '.join(f'{n} {got[n]} (config: {want[n]})' for n in wrong)}" if wrong else "")
            + (f"; not of this model: {', '.join(extra)}" if extra else ""),
            hint="pass --init-from a run folder written by svd-probe train",
        )
    # The weights are factored by SVD and copied: a NaN or an infinity ended the SVD in a
    # LinAlgError traceback, and integer weights (no run writes them) trained silently.
    for n in sorted(tensors):
        t = tensors[n]
        if not t.is_floating_point():
            raise TrainingInputError(
                f"{path}: {n} holds {str(t.dtype).removeprefix('torch.')} values, not floating-point weights",
                hint="pass --init-from a run folder written by svd-probe train",
            )
        if not bool(torch.isfinite(t).all()):
            raise TrainingInputError(
                f"{path}: {n} holds NaN or infinite values",
                hint="start from a run that trained without diverging",
            )


def derive_config(
    source: ModelConfig,
    o_latent: int | None = None,
    o_norm: str | None = None,
    q_latent: int | None = None,
    kv_latent: int | None = None,
    given: dict | None = None,
) -> ModelConfig:
    """The mla-o config that `source` initializes: its shapes, the latents chosen here.

    Defaults keep the presets' ratios: o_latent d/4; for an mha source q_latent d/4 and
    kv_latent d/8 (small: 64, 32, 64 at d = 256). `given` holds other flags the user set; each
    must agree with the source, since the weights come from it.
    """
    for name, value in (given or {}).items():
        if value is not None and getattr(source, name) != value:
            raise TrainingInputError(
                f"--init-from takes {name} from the source run ({getattr(source, name)}), not {value}",
                hint=f"drop --{name.replace('_', '-')}, or start from another run",
            )
    d = source.d_model
    if source.variant == "mla":
        for name, value in (("q_latent", q_latent), ("kv_latent", kv_latent)):
            if value is not None and value != getattr(source, name):
                raise TrainingInputError(
                    f"--init-from an mla run keeps its {name} ({getattr(source, name)}), not {value}",
                    hint=f"drop --{name.replace('_', '-')}",
                )
        q_latent, kv_latent = source.q_latent, source.kv_latent
    # None: the default; any value given (0 too, which `or` took for "not given") is validated.
    cfg = replace(
        source,
        variant="mla-o",
        o_latent=max(1, d // 4) if o_latent is None else o_latent,
        o_norm="none" if o_norm is None else o_norm,
        q_latent=max(1, d // 4) if q_latent is None else q_latent,
        kv_latent=max(1, d // 8) if kv_latent is None else kv_latent,
    )
    validate(cfg)  # before the rank bounds compare the latents with numbers
    rank = min(d, cfg.attn_dim)
    for name in ("o_latent",) + (("q_latent", "kv_latent") if source.variant == "mha" else ()):
        bound = {"o_latent": rank, "q_latent": rank, "kv_latent": min(d, 2 * cfg.attn_dim)}[name]
        if getattr(cfg, name) > bound:
            raise TrainingInputError(
                f"--init-from: {name} {getattr(cfg, name)} exceeds the rank of the map it factors ({bound})",
                hint=f"pass --{name.replace('_', '-')} {bound} or less",
            )
    check_size(cfg)
    return cfg


def _factor(w: torch.Tensor, rank: int, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of w [m, n] in float64: (up [m, r], down [r, n]) with up · down the best
    rank-r approximation. balanced: Σ^½ on each side; else down = Vᵀ (orthonormal rows)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if balanced:
        root = s.sqrt()
        return u * root, root[:, None] * vh
    return u * s, vh


def initial_state(target: ModelConfig, source: SourceRun) -> dict[str, torch.Tensor]:
    """The encoder state dict of `target` (mla-o) built from `source` (float64 SVDs, then float32)."""
    src, t = source.cfg, source.tensors
    for name in _SHAPE_FIELDS:
        if getattr(src, name) != getattr(target, name):
            raise TrainingInputError(
                f"--init-from {source.path}: the source's {name} is {getattr(src, name)}, this run's {getattr(target, name)}",
                hint="use the tokenizer and shapes of the source run (its config.json)"
                if name == "vocab_size"
                else "start from a run of the same shapes",
            )
    H, D, d = target.n_heads, target.head_dim, target.d_model
    state: dict[str, torch.Tensor] = {}
    for name, value in t.items():
        if ".attn." not in name:
            state[name] = value.float().clone()
    for layer in range(target.n_layers):
        p = f"layers.{layer}.attn."
        up, down = _factor(t[p + "o_proj.weight"], target.o_latent, balanced=True)
        state[p + "o_up.weight"], state[p + "o_down.weight"] = up.float(), down.float()
        if target.o_norm == "rms":
            state[p + "o_norm.weight"] = torch.ones(target.o_latent)
        elif target.o_norm == "rms-per-head":
            state[p + "o_norm.weight"] = torch.ones(H, target.o_latent)
        if src.variant == "mla":
            for part in ("down", "q_norm", "kv_norm", "q_up", "kv_up"):
                state[p + part + ".weight"] = t[p + part + ".weight"].float().clone()
            continue
        w_q, w_k, w_v = t[p + "qkv.weight"].double().view(3, H * D, d).unbind(0)
        w_kv = torch.stack([w_k.view(H, D, d), w_v.view(H, D, d)], dim=1).reshape(2 * H * D, d)  # per head [k | v]
        q_up, q_down = _factor(w_q, target.q_latent, balanced=False)
        kv_up, kv_down = _factor(w_kv, target.kv_latent, balanced=False)
        state[p + "down.weight"] = torch.cat([q_down, kv_down]).float()
        state[p + "q_up.weight"], state[p + "kv_up.weight"] = q_up.float(), kv_up.float()
        state[p + "q_norm.weight"] = torch.ones(target.q_latent)
        state[p + "kv_norm.weight"] = torch.ones(target.kv_latent)
    return state
