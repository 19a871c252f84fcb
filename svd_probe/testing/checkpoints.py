"""Small (and, for benchmarks, real-shaped) checkpoints in real on-disk layouts.

Two levels:

* `write_checkpoint(folder, tensors, config, n_shards, ...)` writes any dict of tensors as
  safetensors shards + `model.safetensors.index.json` + `config.json`. It writes the files
  itself (not through `safetensors.torch.save_file`) so that it controls the order of tensors in
  a shard: real shards are not stored in name order, and a reader must not rely on it. Other
  layouts (llama, bert, gpt2...) are meant to be built on top of it.
* Layout builders: `build_deepseek_v3(folder, ...)`, `build_kimi_k2(folder, ...)` with
  scaled-down dims as keyword arguments (defaults are small and deliberately not multiples of
  128, so FP8 scale tiles are partial), and `build_deepseek_v3_real(folder, ...)`, which uses
  DeepSeek-V3's real attention shapes for the streaming benchmark.

FP8 weights are quantized the way DeepSeek's checkpoints are: per 128×128 tile,
`scale = amax / 448`, `fp8 = w / scale`, and `<name>_scale_inv = scale` stored as F32.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svd_probe.hub.dtypes import safetensors_name

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class LazyTensor:
    """A tensor produced only when written, so multi-GB checkpoints never sit in memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _nbytes(t) -> int:
    return t.nbytes if isinstance(t, LazyTensor) else t.numel() * t.element_size()


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def shard_file_name(i: int, n: int, style: str | Callable[[int, int], str] = "hf") -> str:
    """File name of shard i (1-based) of n.

    "hf": model-00001-of-00005.safetensors (transformers' default)
    "deepseek": model-00001-of-000163.safetensors (DeepSeek-V3's own: total padded to 6 digits)
    "kimi": model-1-of-61.safetensors (Kimi-K2: not zero-padded)
    """
    if callable(style):
        return style(i, n)
    if style == "hf":
        return f"model-{i:05d}-of-{n:05d}.safetensors"
    if style == "deepseek":
        return f"model-{i:05d}-of-{n:06d}.safetensors"
    if style == "kimi":
        return f"model-{i}-of-{n}.safetensors"
    raise ValueError(f"unknown shard naming style {style!r}")


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor | LazyTensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write one safetensors file with tensors in the given (insertion) order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        header[name] = {"dtype": safetensors_name(t.dtype), "shape": list(_shape(t)), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # like the reference writer: data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t in tensors.items():
            if isinstance(t, LazyTensor):
                t = t.make()
                assert (
                    tuple(t.shape) == tuple(header[name]["shape"])
                    and safetensors_name(t.dtype) == header[name]["dtype"]
                ), name
            if t.numel():
                # memoryview, not tobytes(): no extra copy, and the write releases the GIL.
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_checkpoint(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor | LazyTensor],
    config: dict,
    n_shards: int = 1,
    *,
    naming: str | Callable[[int, int], str] = "hf",
    shard_of: Mapping[str, int] | None = None,
    order: str = "shuffled",
    seed: int = 0,
    index: bool | None = None,
    metadata: Mapping[str, str] | None = None,
    workers: int = 1,
) -> dict[str, str]:
    """Write `tensors` as a sharded safetensors checkpoint; return the weight map {name: file}.

    Tensors fill shards in their insertion order, split by cumulative bytes into `n_shards`
    contiguous groups (as real checkpoints are written layer after layer). `shard_of` moves named
    tensors to a given 0-based shard (e.g. a scale away from its weight). Within a shard,
    `order` is "given", "name" or "shuffled" (seeded; real shards are not in name order).
    With n_shards == 1 and index False (default for one shard) the file is `model.safetensors`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    total = sum(_nbytes(tensors[n]) for n in names)
    index = n_shards > 1 if index is None else index
    assign: dict[str, int] = {}
    acc = 0
    for n in names:
        # Shard k holds the tensors whose first byte lies in [k·total/n_shards, (k+1)·total/n_shards).
        assign[n] = min(n_shards - 1, int(acc * n_shards / max(total, 1)))
        acc += _nbytes(tensors[n])
    for n, k in (shard_of or {}).items():
        if n not in tensors or not 0 <= k < n_shards:
            raise ValueError(f"shard_of: bad entry {n!r} -> {k}")
        assign[n] = k
    rng = random.Random(seed)
    weight_map: dict[str, str] = {}
    shards: list[tuple[str, list[str]]] = []
    for k in range(n_shards):
        members = [n for n in names if assign[n] == k]
        if order == "name":
            members.sort()
        elif order == "shuffled":
            rng.shuffle(members)
        elif order != "given":
            raise ValueError(f"unknown order {order!r}")
        fname = shard_file_name(k + 1, n_shards, naming) if index else "model.safetensors"
        shards.append((fname, members))
        for n in members:
            weight_map[n] = fname

    def write(shard: tuple[str, list[str]]) -> None:
        fname, members = shard
        write_safetensors(folder / fname, {n: tensors[n] for n in members}, metadata or {"format": "pt"})

    if workers > 1:  # shards are independent files: write them at once (torch and file I/O drop the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(write, shards))
    else:
        for shard in shards:
            write(shard)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if index:
        idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    return weight_map


# -- values ------------------------------------------------------------------------------------


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block FP8: (float8_e4m3fn weight, F32 scale_inv [ceil(m/bm), ceil(n/bn)])."""
    m, n = w.shape
    bm, bn = block
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    pad = torch.zeros(gm * bm, gn * bn, dtype=torch.float32)
    pad[:m, :n] = w.float()
    tiles = pad.view(gm, bm, gn, bn)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(gm * bm, gn * bn)[:m, :n]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def _matrix(gen: torch.Generator, shape: tuple[int, int], rank: int | None = None) -> torch.Tensor:
    m, n = shape
    if rank is None:
        w = torch.randn(m, n, generator=gen) / math.sqrt(n)
    else:
        w = (torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)) / math.sqrt(n * rank)
    # Uneven row magnitudes, so tiles get different scales and a wrong tile→scale mapping shows.
    return w * torch.exp(torch.randn(m, 1, generator=gen) * 0.5)


# -- DeepSeek-V3 / Kimi-K2 layout ----------------------------------------------------------------

ATTN_MATRICES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclass
class Checkpoint:
    """What a builder wrote, and the names tests need."""

    folder: Path
    config: dict
    weight_map: dict[str, str]
    num_layers: int  # attention layers, MTP included
    attn_dtype: str
    planted: dict[str, torch.Tensor] = field(default_factory=dict)  # float32 matrices before quantization

    def attention_weight_names(self, layer: int) -> list[str]:
        """Weights and norms one layer's MLA analysis reads (no scales: the reader adds them)."""
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        names = [p + "input_layernorm.weight", a + "q_a_layernorm.weight", a + "kv_a_layernorm.weight"]
        if a + "q_a_proj.weight" not in self.weight_map:
            names.remove(a + "q_a_layernorm.weight")
            names.append(a + "q_proj.weight")
        return names + [a + m + ".weight" for m in ATTN_MATRICES if a + m + ".weight" in self.weight_map]

    def attention_tensor_names(self, layer: int) -> list[str]:
        """The above plus the FP8 `_scale_inv` companions: every tensor an analysis downloads."""
        names = self.attention_weight_names(layer)
        return names + [n + "_scale_inv" for n in names if n + "_scale_inv" in self.weight_map]

    def all_attention_tensor_names(self) -> list[str]:
        return [n for layer in range(self.num_layers) for n in self.attention_tensor_names(layer)]


def _mla_config(
    model_type: str,
    *,
    hidden,
    heads,
    q_lora_rank,
    kv_lora_rank,
    nope,
    rope,
    v,
    layers,
    mtp_layers,
    first_dense,
    n_experts,
    moe_inter,
    dense_inter,
    vocab,
    fp8: bool,
) -> dict:
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": dense_inter,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": mtp_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora_rank,
        "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "n_routed_experts": n_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": min(2, n_experts),
        "first_k_dense_replace": first_dense,
        "moe_layer_freq": 1,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "torch_dtype": "bfloat16",
    }
    if fp8:
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    return cfg


def _build_mla(
    folder,
    *,
    model_type,
    naming,
    hidden,
    heads,
    q_lora_rank,
    kv_lora_rank,
    qk_nope_head_dim,
    qk_rope_head_dim,
    v_head_dim,
    layers,
    mtp_layers,
    first_dense,
    n_experts,
    moe_intermediate,
    dense_intermediate,
    vocab,
    n_shards,
    attn_dtype,
    ranks,
    seed,
    keep_planted,
) -> Checkpoint:
    if attn_dtype not in ("fp8", "bf16", "f32"):
        raise ValueError("attn_dtype must be fp8, bf16 or f32")
    gen = torch.Generator().manual_seed(seed)
    fp8 = attn_dtype == "fp8"
    cfg = _mla_config(
        model_type,
        hidden=hidden,
        heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        nope=qk_nope_head_dim,
        rope=qk_rope_head_dim,
        v=v_head_dim,
        layers=layers,
        mtp_layers=mtp_layers,
        first_dense=first_dense,
        n_experts=n_experts,
        moe_inter=moe_intermediate,
        dense_inter=dense_intermediate,
        vocab=vocab,
        fp8=fp8,
    )
    if not fp8:
        cfg["torch_dtype"] = "bfloat16" if attn_dtype == "bf16" else "float32"
    ranks = dict(ranks or {})
    t: dict[str, torch.Tensor] = {}
    planted: dict[str, torch.Tensor] = {}
    wdtype = {"bf16": torch.bfloat16, "f32": torch.float32}.get(attn_dtype)

    def linear(
        name: str, shape: tuple[int, int], rank: int | None = None, quantize: bool = True, is_attn: bool = False
    ):
        w = _matrix(gen, shape, rank)
        if is_attn and keep_planted:
            planted[name] = w
        if fp8 and quantize:
            q, s = quantize_fp8_blocks(w)
            t[name] = q
            t[name + "_scale_inv"] = s
        else:
            t[name] = w.to(wdtype or torch.bfloat16)

    def norm(name: str, dim: int):
        t[name] = (1.0 + 0.2 * torch.randn(dim, generator=gen)).to(torch.bfloat16)

    H = hidden
    t["model.embed_tokens.weight"] = (torch.randn(vocab, H, generator=gen) * 0.02).to(torch.bfloat16)
    n_attn = layers + mtp_layers
    for L in range(n_attn):
        p = f"model.layers.{L}."
        a = p + "self_attn."
        if L >= layers:  # the MTP layer's own input stage, as in DeepSeek-V3's layer 61
            norm(p + "enorm.weight", H)
            norm(p + "hnorm.weight", H)
            linear(p + "eh_proj.weight", (H, 2 * H), quantize=False)
        norm(p + "input_layernorm.weight", H)
        if q_lora_rank:
            linear(a + "q_a_proj.weight", (q_lora_rank, H), ranks.get("q_a_proj"), is_attn=True)
            norm(a + "q_a_layernorm.weight", q_lora_rank)
            linear(
                a + "q_b_proj.weight",
                (heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank),
                ranks.get("q_b_proj"),
                is_attn=True,
            )
        else:
            linear(
                a + "q_proj.weight",
                (heads * (qk_nope_head_dim + qk_rope_head_dim), H),
                ranks.get("q_proj"),
                is_attn=True,
            )
        linear(
            a + "kv_a_proj_with_mqa.weight",
            (kv_lora_rank + qk_rope_head_dim, H),
            ranks.get("kv_a_proj_with_mqa"),
            is_attn=True,
        )
        norm(a + "kv_a_layernorm.weight", kv_lora_rank)
        linear(
            a + "kv_b_proj.weight",
            (heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank),
            ranks.get("kv_b_proj"),
            is_attn=True,
        )
        linear(a + "o_proj.weight", (H, heads * v_head_dim), ranks.get("o_proj"), is_attn=True)
        norm(p + "post_attention_layernorm.weight", H)
        m = p + "mlp."
        if L < first_dense:
            for proj, shape in (
                ("gate_proj", (dense_intermediate, H)),
                ("up_proj", (dense_intermediate, H)),
                ("down_proj", (H, dense_intermediate)),
            ):
                linear(m + proj + ".weight", shape)
        else:
            t[m + "gate.weight"] = (torch.randn(n_experts, H, generator=gen) * 0.02).to(torch.bfloat16)
            t[m + "gate.e_score_correction_bias"] = torch.zeros(n_experts, dtype=torch.float32)
            for e in list(range(n_experts)) + ["shared"]:
                q = m + ("shared_experts." if e == "shared" else f"experts.{e}.")
                for proj, shape in (
                    ("gate_proj", (moe_intermediate, H)),
                    ("up_proj", (moe_intermediate, H)),
                    ("down_proj", (H, moe_intermediate)),
                ):
                    linear(q + proj + ".weight", shape)
        if L >= layers:
            norm(p + "shared_head.norm.weight", H)
            t[p + "shared_head.head.weight"] = (torch.randn(vocab, H, generator=gen) * 0.02).to(torch.bfloat16)
    # The final norm and head are written after the decoder layers and before the MTP layer in
    # DeepSeek's shards; here they simply go last, which is enough for the reader's purposes.
    norm("model.norm.weight", H)
    t["lm_head.weight"] = (torch.randn(vocab, H, generator=gen) * 0.02).to(torch.bfloat16)

    # Move some scales away from their weights: real checkpoints have scales in other shards.
    shard_of: dict[str, int] = {}
    if n_shards > 1 and fp8:
        probe = write_plan(t, n_shards)
        moved = 0
        for L in range(n_attn):
            for mname in ("o_proj", "kv_b_proj"):
                w = f"model.layers.{L}.self_attn.{mname}.weight"
                if w in probe and moved < 2:
                    shard_of[w + "_scale_inv"] = (probe[w] + 1) % n_shards
                    moved += 1
    wm = write_checkpoint(folder, t, cfg, n_shards, naming=naming, shard_of=shard_of, order="shuffled", seed=seed)
    return Checkpoint(
        Path(folder), cfg, wm, n_attn, {"fp8": "F8_E4M3", "bf16": "BF16", "f32": "F32"}[attn_dtype], planted
    )


def write_plan(tensors: Mapping[str, torch.Tensor | LazyTensor], n_shards: int) -> dict[str, int]:
    """The 0-based shard `write_checkpoint` will put each tensor in (before `shard_of` overrides)."""
    total = sum(_nbytes(x) for x in tensors.values())
    acc, plan = 0, {}
    for n, x in tensors.items():
        plan[n] = min(n_shards - 1, int(acc * n_shards / max(total, 1)))
        acc += _nbytes(x)
    return plan


def build_deepseek_v3(
    folder: str | Path,
    *,
    hidden: int = 320,
    heads: int = 4,
    q_lora_rank: int | None = 200,
    kv_lora_rank: int = 136,
    qk_nope_head_dim: int = 32,
    qk_rope_head_dim: int = 16,
    v_head_dim: int = 32,
    layers: int = 3,
    mtp_layers: int = 1,
    first_dense: int = 1,
    n_experts: int = 8,
    moe_intermediate: int = 256,
    dense_intermediate: int = 400,
    vocab: int = 256,
    n_shards: int = 5,
    attn_dtype: str = "fp8",
    ranks: Mapping[str, int] | None = None,
    seed: int = 0,
    keep_planted: bool = True,
) -> Checkpoint:
    """A scaled-down DeepSeek-V3 checkpoint (real tensor names, sharding and FP8 scheme).

    Defaults: 3 decoder layers (layer 0 dense, 1-2 MoE) + 1 MTP layer (index 3), 4 heads,
    hidden 320, q_lora 200, kv_lora 136: no dim a multiple of 128, so scale tiles are partial.
    Experts hold most bytes. Two `_scale_inv` tensors sit in another shard than their weights.

    attn_dtype: "fp8" (block-quantized with `_scale_inv`, as DeepSeek-V3), "bf16" or "f32"
    (exact, no quantization noise: use it when a test needs exact planted ranks).
    ranks: plant a rank per attention matrix, e.g. {"o_proj": 3, "kv_b_proj": 5}: the float32
    matrix before quantization is a product of rank-r factors (quantization adds small noise;
    per-head slices have rank ≤ r). `Checkpoint.planted` holds those float32 matrices.
    q_lora_rank=None gives the DeepSeek-V2-Lite form (one `q_proj`).
    """
    return _build_mla(
        folder,
        model_type="deepseek_v3",
        naming="deepseek",
        hidden=hidden,
        heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim,
        layers=layers,
        mtp_layers=mtp_layers,
        first_dense=first_dense,
        n_experts=n_experts,
        moe_intermediate=moe_intermediate,
        dense_intermediate=dense_intermediate,
        vocab=vocab,
        n_shards=n_shards,
        attn_dtype=attn_dtype,
        ranks=ranks,
        seed=seed,
        keep_planted=keep_planted,
    )


def build_kimi_k2(
    folder: str | Path, *, heads: int = 2, mtp_layers: int = 0, n_shards: int = 4, seed: int = 1, **kw
) -> Checkpoint:
    """A scaled-down Kimi-K2 checkpoint: DeepSeek-V3 tensor names, `model_type: kimi_k2`, half
    the heads, no MTP layer (as the real one; pass mtp_layers=1 to add one) and shards named
    `model-1-of-4.safetensors` (not zero-padded). Other keywords as `build_deepseek_v3`."""
    opts = dict(
        hidden=320,
        q_lora_rank=200,
        kv_lora_rank=136,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        layers=3,
        first_dense=1,
        n_experts=8,
        moe_intermediate=256,
        dense_intermediate=400,
        vocab=256,
        attn_dtype="fp8",
        ranks=None,
        keep_planted=True,
    )
    opts.update(kw)
    return _build_mla(
        folder,
        model_type="kimi_k2",
        naming="kimi",
        heads=heads,
        mtp_layers=mtp_layers,
        n_shards=n_shards,
        seed=seed,
        **opts,
    )


def build_deepseek_v3_real(
    folder: str | Path,
    *,
    layers: int = 4,
    experts_per_layer: int = 14,
    n_shards: int = 6,
    seed: int = 0,
    workers: int = 1,
) -> Checkpoint:
    """DeepSeek-V3's real attention shapes (187 MB per layer, FP8 + scales) for `layers` layers,
    plus real-shaped experts (44 MB each) so attention is a small share of the bytes, as in the
    real checkpoint. Defaults: ~3.2 GB on disk. Values are random FP8 (no NaN); for benchmarks.
    `workers` > 1 writes that many shards at once (the files are the same).
    """
    H, heads, ql, kvl, nope, rope, v, inter = 7168, 128, 1536, 512, 128, 64, 128, 2048
    cfg = _mla_config(
        "deepseek_v3",
        hidden=H,
        heads=heads,
        q_lora_rank=ql,
        kv_lora_rank=kvl,
        nope=nope,
        rope=rope,
        v=v,
        layers=layers,
        mtp_layers=0,
        first_dense=0,
        n_experts=experts_per_layer,
        moe_inter=inter,
        dense_inter=18432,
        vocab=129280,
        fp8=True,
    )
    gen = torch.Generator().manual_seed(seed)
    # One pool of random FP8 bytes (no NaN codes 0x7F/0xFF) sliced for every tensor: generating
    # gigabytes of fresh randomness would dominate the benchmark's setup time.
    pool = torch.randint(0, 0x7F, (64 * 1024 * 1024,), dtype=torch.uint8, generator=gen)
    pool |= torch.randint(0, 2, pool.shape, dtype=torch.uint8, generator=gen) << 7

    def fp8(shape, salt):
        def make():
            n = math.prod(shape)
            reps = math.ceil((n + salt) / pool.numel())
            flat = pool.repeat(reps)[salt : salt + n] if reps > 1 else pool[salt : salt + n]
            return flat.clone().view(torch.float8_e4m3fn).reshape(shape)

        return LazyTensor(tuple(shape), torch.float8_e4m3fn, make)

    def scale(shape):
        g = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
        return (torch.rand(g, generator=gen) * 1e-3 + 1e-4).float()

    t: dict = {}
    salt = 0
    for L in range(layers):
        p = f"model.layers.{L}."
        a = p + "self_attn."
        t[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for name, shape in (
            ("q_a_proj", (ql, H)),
            ("q_b_proj", (heads * (nope + rope), ql)),
            ("kv_a_proj_with_mqa", (kvl + rope, H)),
            ("kv_b_proj", (heads * (nope + v), kvl)),
            ("o_proj", (H, heads * v)),
        ):
            salt += 4097
            t[a + name + ".weight"] = fp8(shape, salt % pool.numel())
            t[a + name + ".weight_scale_inv"] = scale(shape)
        t[a + "q_a_layernorm.weight"] = torch.ones(ql, dtype=torch.bfloat16)
        t[a + "kv_a_layernorm.weight"] = torch.ones(kvl, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        for e in range(experts_per_layer):
            for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter))):
                salt += 4097
                n = f"{p}mlp.experts.{e}.{proj}.weight"
                t[n] = fp8(shape, salt % pool.numel())
                t[n + "_scale_inv"] = scale(shape)
    wm = write_checkpoint(folder, t, cfg, n_shards, naming="deepseek", order="shuffled", seed=seed, workers=workers)
    return Checkpoint(Path(folder), cfg, wm, layers, "F8_E4M3")
