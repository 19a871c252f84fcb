"""The models of the training lab: one pre-norm block stack, three kinds of attention, two objectives.

    h = embed(tokens)                       # no position embeddings: RoPE carries position
    for each layer:
        h = h + attn(rmsnorm(h))            # bidirectional (mlm) or causal (clm)
        h = h + swiglu(rmsnorm(h))
    logits = h @ embed.weight.T             # tied head, no bias, no final norm

    mlm  MaskedLM: BERT-style masked tokens, logits at the masked positions only
    clm  CausalLM: causal attention, next-token loss at every position

The block stack is `Encoder` under both objectives (the name of its module, `encoder`, fixes the
tensor names below; a causal stack is still one).

Attention variants (shapes for the small preset: d=256, 8 heads of 32):

    mha    qkv [3·H·D, d] (rows: all q heads | all k heads | all v heads), o_proj [d, H·D]
    mla    down [q_latent + kv_latent, d] -> q_norm / kv_norm
           q_up [H·D, q_latent]; kv_up [H·2D, kv_latent], per head [key D | value D]
           o_proj [d, H·D]
    mla-o  as mla, with the output through a shared latent: o_down [o_latent, H·D], o_up [d, o_latent]
           o_norm none          o_up(Σ_h o_down_h · head_h)
           o_norm rms           o_up(rmsnorm(Σ_h o_down_h · head_h)), o_norm.weight [o_latent]
           o_norm rms-per-head  o_up(Σ_h rmsnorm_h(o_down_h · head_h) / √H), o_norm.weight [H, o_latent]
           (o_down_h = o_down[:, h·D:(h+1)·D], head h's slice; RMSNorm weight only, eps norm_eps = 1e-6)

RoPE rotates the first `rope_dims` dimensions of every query and key head (rotate-half
pairing inside that block: dim i pairs with i + rope_dims/2). The cos/sin tables span the
whole head, with cos=1, sin=0 beyond rope_dims, so partial RoPE (mla: 16 of 32) and full RoPE
(mha, mla-o: 32 of 32) run the same kernels on the same sizes: the RoPE width cannot make one
variant slower than another.

On CUDA, a model built under `svd-probe train --kernels triton` (the default; train/kernels.py)
runs RoPE + attention through a hand-written Triton kernel where it applies, and the tied head's
matmul over a vocabulary padded to 64 (the SwiGLU's kernel, slower than inductor's code, only
under benchmarks/train_speed.py's sets); the same functions, the same parameters.

Tensor names (the adapter in svd_probe/adapters/svd_probe_train.py depends on them):
`embed.weight`, `layers.L.{attn_norm,ffn_norm}.weight`, `layers.L.attn.*.weight` (with
`layers.L.attn.o_norm.weight` for mla-o with an output-latent norm),
`layers.L.ffn.{gate_up,down}.{weight,bias}`. Both objectives use the same names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from svd_probe.train import kernels
from svd_probe.train.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the latents arrive in bf16: a weight of the same dtype keeps the fused
        # kernel (it accumulates in fp32 anyway) instead of a slower composite fallback.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Rope(nn.Module):
    """cos/sin tables of shape [T, head_dim]; identity (cos 1, sin 0) beyond rope_dims."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, rope_dims: int, theta: float, max_len: int):
        super().__init__()
        self.head_dim, self.rope_dims = head_dim, rope_dims
        cos = torch.ones(max_len, head_dim)
        sin = torch.zeros(max_len, head_dim)
        if rope_dims:
            half = rope_dims // 2
            inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / rope_dims)
            angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
            cos[:, :rope_dims] = torch.cat([angles.cos(), angles.cos()], dim=-1).float()
            sin[:, :rope_dims] = torch.cat([angles.sin(), angles.sin()], dim=-1).float()
        # Not saved in checkpoints: a function of the config, rebuilt on load.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        r, half = self.rope_dims, self.rope_dims // 2
        if r == self.head_dim:
            return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        # Dims past rope_dims are multiplied by sin = 0; any value serves, so pass them through.
        return torch.cat([-x[..., half:r], x[..., :half], x[..., r:]], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, T, H, head_dim]; the tables are cast once for both."""
        if not self.rope_dims:
            return q, k
        T = q.shape[1]
        cos = self.cos[:T].view(1, T, 1, self.head_dim).to(q.dtype)
        sin = self.sin[:T].view(1, T, 1, self.head_dim).to(q.dtype)
        return q * cos + self._rotate(q) * sin, k * cos + self._rotate(k) * sin


def _attend(q, k, v, key_mask, causal: bool):
    """q, k, v: [B, T, H, D] -> [B, T, H·D], heads contiguous for the output projection.

    Causal attention ignores `key_mask`: padding is on the right, after every real token, so no
    real token can attend to it anyway (and SDPA takes a mask or is_causal, not both)."""
    B, T, H, D = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if causal else key_mask,
        is_causal=causal,
    )
    return out.transpose(1, 2).reshape(B, T, H * D)


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's own latent: x [..., H, L] normalized over L, weight [H, L]."""

    def __init__(self, n_heads: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight.to(x.dtype)


class MHA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.attn_dim, bias=False)
        self.o_proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.rope = Rope(cfg.head_dim, cfg.rope_dims, cfg.rope_theta, cfg.max_seq_len)
        self.causal = cfg.objective == "clm"
        self.fast_attention = kernels.available("attention")  # a plain attribute: dynamo guards on it

    def forward(self, x, key_mask=None):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.h, self.d)
        if self.fast_attention and kernels.attention_applies(qkv[:, :, 0], key_mask, self.rope.rope_dims):
            rope = self.rope
            return self.o_proj(kernels.short_attention(qkv, None, rope.cos, rope.sin, rope.rope_dims, self.causal))
        # unbind, not slicing: its backward is one stack, where each slice's backward would
        # write a zero-filled full-size gradient and copy into it.
        q, k, v = qkv.unbind(2)
        q, k = self.rope(q, k)
        return self.o_proj(_attend(q, k, v, key_mask, self.causal))


class MLA(nn.Module):
    """Low-rank queries and keys/values through normalized latents; mla-o also factors the output."""

    # How mla-o applies its factored output; both forms compute the same function
    # (benchmarks/train_speed.py --ablation times both in training, bench_attention.py across widths).
    fuse_shared_output: bool = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d, self.q_latent = cfg.n_heads, cfg.head_dim, cfg.q_latent
        self.down = nn.Linear(cfg.d_model, cfg.q_latent + cfg.kv_latent, bias=False)
        self.q_norm = RMSNorm(cfg.q_latent, cfg.norm_eps)
        self.kv_norm = RMSNorm(cfg.kv_latent, cfg.norm_eps)
        self.q_up = nn.Linear(cfg.q_latent, cfg.attn_dim, bias=False)
        self.kv_up = nn.Linear(cfg.kv_latent, 2 * cfg.attn_dim, bias=False)
        self.shared_output = cfg.variant == "mla-o"
        if self.shared_output:
            # One [o_latent, H·D] matmul over the contiguous head outputs, not H small ones.
            self.o_down = nn.Linear(cfg.attn_dim, cfg.o_latent, bias=False)
            self.o_up = nn.Linear(cfg.o_latent, cfg.d_model, bias=False)
            self.o_norm_kind = cfg.o_norm
            if cfg.o_norm == "rms":
                self.o_norm: nn.Module = RMSNorm(cfg.o_latent, cfg.norm_eps)
            elif cfg.o_norm == "rms-per-head":
                self.o_norm = HeadRMSNorm(cfg.n_heads, cfg.o_latent, cfg.norm_eps)
        else:
            self.o_proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        self.rope = Rope(cfg.head_dim, cfg.rope_dims, cfg.rope_theta, cfg.max_seq_len)
        self.causal = cfg.objective == "clm"
        self.fast_attention = kernels.available("attention")

    def forward(self, x, key_mask=None):
        B, T, _ = x.shape
        c_q, c_kv = self.down(x).split([self.q_latent, self.down.out_features - self.q_latent], dim=-1)
        q = self.q_up(self.q_norm(c_q)).view(B, T, self.h, self.d)
        kv = self.kv_up(self.kv_norm(c_kv)).view(B, T, self.h, 2, self.d)  # per head [key | value]
        if self.fast_attention and kernels.attention_applies(q, key_mask, self.rope.rope_dims):
            rope = self.rope
            heads = kernels.short_attention(q, kv, rope.cos, rope.sin, rope.rope_dims, self.causal)
        else:
            k, v = kv.unbind(3)
            q, k = self.rope(q, k)
            heads = _attend(q, k, v, key_mask, self.causal)
        if self.shared_output:
            if self.o_norm_kind == "rms":
                return self.o_up(self.o_norm(self.o_down(heads)))
            if self.o_norm_kind == "rms-per-head":
                # Each head's latent o_down_h · head_h: one batched matmul over [B, T, H, D].
                w = self.o_down.weight.view(-1, self.h, self.d)  # [L, H, D]
                per_head = torch.einsum("bthe,lhe->bthl", heads.view(B, T, self.h, self.d), w.to(heads.dtype))
                return self.o_up(self.o_norm(per_head).sum(2) * self.h**-0.5)
            if self.fuse_shared_output:
                # o_up(o_down(x)) = x·(W_up·W_down)ᵀ: the same function and the same gradients for
                # both factors (autograd goes through the d×d weight product), but one wide matmul
                # over the tokens instead of two skinny ones with a 64-wide side. At this width the
                # skinny pair is launch- and bandwidth-bound and made mla-o slower than mla, although
                # it needs half the FLOPs; the weight product costs d·D·d, nothing next to T·d·d.
                return F.linear(heads, self.o_up.weight @ self.o_down.weight)
            return self.o_up(self.o_down(heads))
        return self.o_proj(heads)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # gate and up fused into one matmul: rows [gate | up].
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=True)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=True)
        self.fast_swiglu = kernels.available("swiglu")

    def forward(self, x):
        if self.fast_swiglu and x.is_cuda:
            # The GEMM without its bias; the kernel adds it, and sums its gradient in its backward.
            y = F.linear(x, self.gate_up.weight)
            if kernels.swiglu_applies(y):
                h = kernels.swiglu_bias(y.flatten(0, -2), self.gate_up.bias)
                return self.down(h.view(*x.shape[:-1], -1))
            gate, up = (y + self.gate_up.bias.to(y.dtype)).chunk(2, dim=-1)  # fp32 on CUDA
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MHA(cfg) if cfg.variant == "mha" else MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, h, key_mask=None):
        h = h + self.attn(self.attn_norm(h), key_mask)
        return h + self.ffn(self.ffn_norm(h))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02), with the projections that write into the residual stream
        # scaled by 1/sqrt(2·layers) so the stream's variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "o_up.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T]; pad_mask [B, T] True for real tokens (None: no padding)."""
        key_mask = None if pad_mask is None else pad_mask[:, None, None, :]
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, key_mask)
        return h


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """The loss is taken in fp32 from bf16 logits, and in float64 from a float64 model (tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class MaskedLM(nn.Module):
    """Encoder + tied MLM head, evaluated only at the masked positions (~15% of the vocab matmul).

    Every sequence has the same number of masked positions (see data.mask_tokens), so the
    gather has a fixed shape: no host sync and no recompiles under torch.compile.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.pad_vocab = kernels.available("pad-vocab")

    def forward(self, ids, positions, targets, accuracy: bool = True):
        """ids [B, T]; positions, targets [B, k]. Returns (mean loss, number of correct predictions,
        or None with accuracy=False: training skips the argmax, one more pass over the logits)."""
        h = self.encoder(ids)
        picked = torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))
        # B·k masked tokens (4,864 at batch 256): one matmul, no chunking.
        w = self.encoder.embed.weight
        pad = kernels.vocab_padding(h, w.shape[0]) if self.pad_vocab else 0
        loss, correct = _head_chunk(picked.flatten(0, 1), w, targets.flatten(), accuracy, pad)
        return loss / targets.numel(), correct


class CausalLM(nn.Module):
    """Causal block stack + tied LM head; next-token loss at every position of a packed row."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.objective != "clm":
            raise ValueError("CausalLM needs objective='clm' (causal attention)")
        self.encoder = Encoder(cfg)
        self.pad_vocab = kernels.available("pad-vocab")

    def forward(self, ids, targets, accuracy: bool = True):
        """ids, targets [B, T] (targets: ids shifted by one). Returns (mean loss, number correct,
        or None with accuracy=False)."""
        h = self.encoder(ids)
        w = self.encoder.embed.weight
        pad = kernels.vocab_padding(h, w.shape[0]) if self.pad_vocab else 0
        return lm_head_loss(h.flatten(0, 1), w, targets.flatten(), accuracy=accuracy, pad=pad)


# Tokens per chunk of the LM head's loss: 4,096 × a 30,522-word vocabulary is 0.5 GB of float32
# logits, where a whole batch of 128 × 128 would hold 2 GB of them, plus as much for their
# gradient, in every process sharing the GPU.
LM_HEAD_CHUNK = 4096


def _head_chunk(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, accuracy: bool = True, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss (and number correct) of one chunk; `pad` rows of zeros appended to the
    weight for the matmul only (kernels.vocab_padding), the same loss and gradients."""
    w = weight.to(h.dtype)
    if pad:
        # 30,522 logits a row are 61,044 bytes, not a multiple of 16: the GEMMs and the softmax
        # fall back to unaligned kernels. Padded rows are aligned; the slice drops them.
        logits = (h @ F.pad(w, (0, 0, 0, pad)).T)[:, : w.shape[0]]
    else:
        logits = h @ w.T
    loss = F.cross_entropy(_at_least_fp32(logits), targets, reduction="sum")
    return loss, ((logits.argmax(-1) == targets).sum() if accuracy else None)


def lm_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LM_HEAD_CHUNK,
    accuracy: bool = True,
    pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of the tied head `h @ weight.T` against `targets`, and the number correct
    (None with accuracy=False).

    h [N, d], weight [V, d], targets [N]. Over `chunk` tokens at a time, each chunk's logits
    recomputed in the backward pass (activation checkpointing) rather than kept: the same loss
    and gradient as one big matmul (tests compare them in float64), at a fraction of the memory,
    for one more head matmul forward.
    """
    if h.shape[0] <= chunk:
        loss, correct = _head_chunk(h, weight, targets, accuracy, pad)
        return loss / h.shape[0], correct
    from torch.utils.checkpoint import checkpoint

    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    count = torch.zeros((), dtype=torch.long, device=h.device)
    for i in range(0, h.shape[0], chunk):
        loss_i, correct_i = checkpoint(
            _head_chunk, h[i : i + chunk], weight, targets[i : i + chunk], accuracy, pad, use_reentrant=False
        )
        total = total + loss_i
        if correct_i is not None:
            count = count + correct_i
    return total / h.shape[0], (count if accuracy else None)


class Classifier(nn.Module):
    """Block stack + a linear head: on the first ([CLS]) token for mlm, on the last real token
    for clm.

    Why the last token for clm (and not the logits of label words such as "positive"): under
    causal attention only the last position has read the whole sentence, so it is the clm
    counterpart of the encoder's [CLS] (the sentence ends in [SEP], the separator pretraining puts
    after every line, so the position is the same kind of token in every sentence). A linear head
    there has the same parameters as the mlm head, so the two objectives are compared on equal
    terms, and it does not depend on whether a small model pretrained on WikiText has learned to
    put mass on a label word, which label-word scoring would measure instead.
    """

    def __init__(self, cfg: ModelConfig, n_labels: int = 2):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.last_token = cfg.objective == "clm"
        self.head = nn.Linear(cfg.d_model, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, pad_mask=None):
        h = self.encoder(ids, pad_mask)
        if not self.last_token:
            return self.head(h[:, 0])
        if pad_mask is None:
            return self.head(h[:, -1])
        last = (pad_mask.sum(1) - 1).clamp(min=0)  # right padding: the last True of each row
        return self.head(h[torch.arange(h.shape[0], device=h.device), last])


def pretraining_model(cfg: ModelConfig) -> MaskedLM | CausalLM:
    """The model of the pretraining phase: MaskedLM (mlm) or CausalLM (clm)."""
    return CausalLM(cfg) if cfg.objective == "clm" else MaskedLM(cfg)


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters()}


def pretraining_parameters(cfg: ModelConfig) -> int:
    """Parameters of the pretraining model of `cfg`, without allocating any: one block is built on
    the meta device and counted n_layers times (building all of them there takes 8 s at 1000
    layers), plus the tied embedding."""
    with torch.device("meta"):
        return cfg.n_layers * num_parameters(Block(cfg)) + cfg.vocab_size * cfg.d_model


def num_parameters(model: nn.Module) -> int:
    # Tied weights are one Parameter, which named_parameters() yields once.
    return sum(p.numel() for p in model.parameters())


def dry_run_summary(cfg: ModelConfig) -> dict:
    """Parameter count and shapes of the pretraining model, without data, training or memory."""
    with torch.device("meta"):
        model = pretraining_model(cfg)
    n = num_parameters(model)
    return {
        "parameters": n,
        "non_embedding_parameters": n - cfg.vocab_size * cfg.d_model,
        "variant": cfg.variant,
        "objective": cfg.objective,
        "o_norm": cfg.o_norm,
        "config": cfg.to_dict(),
        "shapes": parameter_shapes(model),
    }
