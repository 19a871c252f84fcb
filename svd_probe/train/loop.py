"""Pretraining and fine-tuning: one phase runner, one checkpoint dict, a pure learning-rate function.

    run(cfg, tc, sources, out)
        load_data(sources)                    every input read and checked before anything is written
        pretraining  (MLM on WikiText)        -> model.safetensors + config.json (what `analyze` reads)
        fine-tuning  (SST-2, with --sst2-dir) -> dev accuracy
        metrics.json

Both phases are a `Phase`: a model, a step count, a peak learning rate, a function from the step
number to a batch, and a loss. `run_phase` owns everything else, written once: resume, the
learning-rate schedule (`lr_at`), the optimizer step, logging, the non-finite-loss guard,
checkpointing, stopping and timing.

The checkpoint (run_dir.CHECKPOINT) is one dict:

    format          CHECKPOINT_FORMAT
    phase, step     "pretrain" or "finetune", and the number of optimizer steps taken in it
    model, optimizer, rng          the phase's state (absent at the phase boundary, see below)
    model_config, recipe, data     what a resume must match (config, RESUME_KEYS, data fingerprint)
    pretrain_metrics               once pretraining has ended
    timed_samples, timed_seconds   for samples/s across resumes; wall_time_s

When pretraining ends, the encoder is exported and a checkpoint {phase: finetune, step: 0,
pretrain_metrics} without weights records the boundary; fine-tuning starts from model.safetensors.

Determinism: the batch order of step s is a function of (seed, epoch) and the MLM mask of step s a
function of (seed, step); the learning rate is a function of the step. So a resumed run sees
exactly the batches and rates an uninterrupted run sees, and on CPU reaches the same weights bit
for bit (tests/test_train.py). Pretraining batches are cut and masked on the training device:
the batch order is the same everywhere, the masks of one seed differ between CPU and CUDA (two
generators), each a function of (seed, step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from svd_probe.atomic import open_append
from svd_probe.errors import TrainingInputError
from svd_probe.options import pick_device
from svd_probe.train import data as D
from svd_probe.train import kernels
from svd_probe.train.config import ModelConfig, TrainConfig
from svd_probe.train.init_from import initial_state, load_source
from svd_probe.train.model import CausalLM, Classifier, MaskedLM, pretraining_model, pretraining_parameters
from svd_probe.train.run_dir import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    START_OVER,
    check_out_dir,
    check_resumable,
    check_same_data,
    check_same_init,
    checkpoint_limit,
    data_fingerprint,
    describe_source,
    load_checkpoint,
    load_encoder_weights,
    remove_run_files,
    save_checkpoint,
    save_encoder,
    write_json,
)

__all__ = [
    "DataSources",
    "Phase",
    "TrainProgress",
    "TrainingData",
    "load_data",
    "lr_at",
    "run",
    "run_phase",
    "run_seeds",
    "save_encoder",
]

EVAL_MASK_SEED = 1234  # the same valid-set masks for every run, so runs compare on equal terms


@dataclass
class DataSources:
    """Where a run's data comes from (paths as the user gave them)."""

    tokenizer: str
    data_dir: Path | None = None
    dataset: str | None = None  # "wikitext-103" through `datasets`
    sst2_dir: Path | None = None


@dataclass
class TrainingData:
    """Every input of a run, read and checked once (and shared by the seeds of one command)."""

    tok: D.Tok
    train_lines: list[str]
    valid_lines: list[str]
    test_lines: list[str] | None  # evaluated (clm: test perplexity), never trained on
    sst2: tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]] | None
    fingerprint: dict


def load_data(src: DataSources) -> TrainingData:
    """Read the tokenizer, WikiText and SST-2 named by `src`; every problem is a TrainingInputError."""
    tok = D.load_tokenizer(src.tokenizer)
    if src.data_dir is None and src.dataset is None:
        raise TrainingInputError(
            "no pretraining text",
            hint="pass --data-dir (a WikiText-2 folder: README, Training lab) or --dataset wikitext-103",
        )
    sst2 = D.read_sst2_dir(src.sst2_dir) if src.sst2_dir is not None else None
    if src.data_dir is not None:
        train_lines, valid_lines = D.read_wikitext_dir(src.data_dir)
        test_lines = D.read_wikitext_test(src.data_dir)
    else:
        assert src.dataset is not None
        train_lines, valid_lines, test_lines = D.read_wikitext_hub(src.dataset, ("train", "validation", "test"))
    fingerprint = data_fingerprint(
        src.tokenizer,
        tok,
        describe_source(src.data_dir, src.dataset),
        (train_lines, valid_lines),
        None if sst2 is None else (*sst2, describe_source(src.sst2_dir, None)),
    )
    return TrainingData(tok, train_lines, valid_lines, test_lines, sst2, fingerprint)


# ---- what the loop tells its caller --------------------------------------------------------------


class TrainProgress(Protocol):
    """Progress of a run, for the caller to show (the CLI draws a rich bar: cli/train.py)."""

    def phase_started(self, phase: str, total: int, done: int) -> None: ...

    def phase_step(self, phase: str, done: int, loss: float, samples_per_s: float) -> None: ...

    def message(self, line: str) -> None: ...


class _Silent:
    def phase_started(self, phase: str, total: int, done: int) -> None:
        pass

    def phase_step(self, phase: str, done: int, loss: float, samples_per_s: float) -> None:
        pass

    def message(self, line: str) -> None:
        pass


class _RunLog:
    """train.log (always) and the caller's progress (when given); under DDP, rank 0's only."""

    def __init__(self, path: Path, progress: TrainProgress, enabled: bool = True):
        self.path, self.progress, self.enabled = path, progress, enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open_append(self.path) as f:
            f.write(line + "\n")
        self.progress.message(line)


# ---- pieces of a step ----------------------------------------------------------------------------


def lr_at(step: int, total: int, warmup_frac: float, peak: float) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over the first
    `warmup_frac` of the steps to `peak`, then linear decay to zero at `total`."""
    warmup = max(1, int(round(warmup_frac * total)))
    if step < warmup:
        return peak * ((step + 1) / warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, dev: torch.device):
    """AdamW; weight decay on the matrices, none on biases and norm weights."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("norm.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=dev.type == "cuda")


def autocast(dev: torch.device):
    # bf16 autocast on the GPU only: CPU bf16 is slow and the CPU path is for tests.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_batch(
    n_rows: int, batch: int, step: int, seed: int, cache: dict, device: torch.device | None = None
) -> torch.Tensor:
    """Row indices of step `step`: epochs are seeded permutations; the tail of each is dropped.

    The permutation is drawn on the CPU (the same batch order on every device) and moved to
    `device` once an epoch without waiting for the GPU (a blocking copy would drain its queue),
    so a step's indices are a slice of a tensor already there."""
    per_epoch = n_rows // batch
    epoch, j = divmod(step, per_epoch)
    if cache.get("epoch") != epoch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        cache["epoch"], cache["perm"] = (
            epoch,
            torch.randperm(n_rows, generator=g).to(device or "cpu", non_blocking=True),
        )
    return cache["perm"][j * batch : (j + 1) * batch]


def step_generator(seed: int, step: int, salt: int, device: torch.device | None = None) -> torch.Generator:
    """The generator of step `step`, on `device` (seeding one costs no kernel and no sync)."""
    return torch.Generator(device=device or "cpu").manual_seed((seed * 1_000_003 + step) * 7 + salt)


def rng_state(dev: torch.device) -> dict:
    s = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(dev)
    return s


def set_rng_state(s: dict, dev: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if dev.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class _Timer:
    """Samples/s over training steps only, skipping the first steps of a process (compile, warmup)."""

    def __init__(self, dev: torch.device, skip: int):
        self.dev, self.skip = dev, skip
        self.samples, self.seconds, self.seen = 0, 0.0, 0
        self.t0: float | None = None

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def step_done(self, n: int) -> None:
        self.seen += 1
        if self.seen == self.skip:
            self._sync()
            self.t0 = time.perf_counter()
        elif self.seen > self.skip:
            self.samples += n

    def pause(self) -> None:
        if self.t0 is not None:
            self._sync()
            self.seconds += time.perf_counter() - self.t0
            self.t0 = None

    def resume(self) -> None:
        if self.seen >= self.skip:
            self.t0 = time.perf_counter()

    def running_rate(self) -> float:
        if self.t0 is None or not self.samples:
            return 0.0
        return self.samples / (self.seconds + time.perf_counter() - self.t0)


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


class StopRequest:
    """Set by SIGINT or SIGTERM: the loop finishes the step in progress, checkpoints and returns."""

    def __init__(self) -> None:
        self.signal: str | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While training, the first SIGINT (Ctrl-C) or SIGTERM asks for a clean stop: the steps done
    are checkpointed and the run says how to resume. A second one ends the process at once, as
    without this handler. Outside the main thread (where Python delivers no signals) it does nothing."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in wanted}

    def handler(signum: int, frame: Any) -> None:
        if request.signal is None:
            request.signal = signal.Signals(signum).name
            return
        signal.signal(signum, signal.SIG_DFL)  # the second one: stop now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    for s in wanted:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


# ---- data parallel (torchrun) --------------------------------------------------------------------


@dataclass(frozen=True)
class Ddp:
    """This process's rank and the world size (1: no torch.distributed)."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def take(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's rows of the global batch, which every rank draws whole (the same indices and
        MLM masks as a single process). The ranks' slices in rank order are that batch, and every
        row carries as many loss terms (MLM masks a fixed count per row), so the mean of the
        ranks' mean losses, which DDP's averaged gradient follows, is the single process's loss."""
        if self.world == 1:
            return tensors
        return tuple(t[self.rank * (len(t) // self.world) : (self.rank + 1) * (len(t) // self.world)] for t in tensors)

    def any(self, flag: bool, dev: torch.device) -> bool:
        """True on every rank when it is true on one (a collective: every rank must call it)."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
            t /= self.world
        return t


@contextlib.contextmanager
def distributed(device: str) -> Iterator[tuple[Ddp, torch.device]]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): the process group, from torchrun's
    environment variables only (NCCL on CUDA, Gloo on the CPU), and this rank's device
    (cuda:LOCAL_RANK). Without it: rank 0 of 1 and `pick_device(device)`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        yield Ddp(0, 1), dev
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if own:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Ddp(dist.get_rank(), dist.get_world_size()), dev
    finally:
        if own:
            dist.destroy_process_group()


def check_batch(tc: TrainConfig, world: int) -> None:
    """--batch-size and --finetune-batch-size are global: split evenly across the ranks."""
    for flag, value in (("--batch-size", tc.batch_size), ("--finetune-batch-size", tc.finetune_batch_size)):
        if value % world:
            raise TrainingInputError(
                f"{flag} {value} does not split evenly across {world} ranks (it is the global batch)",
                hint=f"pass a {flag} divisible by {world}",
            )


# ---- the phase runner ----------------------------------------------------------------------------

Batch = tuple[torch.Tensor, ...]


@dataclass
class Phase:
    """What differs between pretraining and fine-tuning; `run_phase` does the rest."""

    name: str  # "pretrain" or "finetune": the checkpoint's phase, the log's word
    label: str  # "pretraining" or "fine-tuning", for messages
    model: torch.nn.Module
    steps: int
    peak_lr: float
    lr_flag: str  # the flag that sets peak_lr, named when the loss diverges
    batch: Callable[[int], tuple[Batch, int]]  # step -> (tensors on any device, number of samples)
    loss: Callable[[Callable[..., Any], Batch], torch.Tensor]  # (forward, device tensors) -> loss
    extra: dict = field(default_factory=dict)  # saved in every checkpoint of the phase
    # Every batch has the same shapes: compiled on CUDA, the step runs as CUDA graphs.
    static_shapes: bool = False


# The torch.compile mode inside the whole-step graph: one without cudagraphs of its own
# ("default" or "max-autotune-no-cudagraphs"; benchmarks/train_speed.py --stepgraph-compile).
STEP_GRAPH_COMPILE = "default"
# Real training steps run before the capture: the first compiles, and every lazy thing (AdamW's
# state, Triton's autotuning, cuBLAS workspaces, the autograd engine's device threads) must have
# happened before a capture, which runs nothing. PyTorch's examples warm up 3 times (11 with DDP).
STEP_GRAPH_WARMUP = 3


def graph_stage(calls: int, warmup: int) -> str:
    """What call `calls` (0-based) of a whole-step-graph TrainStep does: "warmup" (a real step,
    eager launches on a side stream), "capture" (record the step, then replay it: the step of this
    call), "replay". Every call is one optimizer step, so the count matches an eager run."""
    if calls < warmup:
        return "warmup"
    return "capture" if calls == warmup else "replay"


def to_capturable(opt: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """Make `opt` (AdamW, CUDA; fused there, make_optimizer) a step a CUDA graph can hold:
    capturable, the learning rate the device tensor `lr` (filled in place before each replay),
    the `step` counters float32 on the parameters' device.

    Applied after any load_state_dict, which restores the saved groups' flags (an eager
    checkpoint says capturable False and holds lr as a float)."""
    for group in opt.param_groups:
        group["capturable"], group["lr"] = True, lr
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"]).to(device=p.device, dtype=torch.float32)


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() in the eager form whichever step ran: lr a float, capturable False. So a
    checkpoint of a graphed run resumes eagerly (even on the CPU, where capturable AdamW cannot
    step) and the reverse (TrainStep applies to_capturable after the load)."""
    sd = opt.state_dict()
    groups = [{**g, "lr": float(g["lr"]), "capturable": False} for g in sd["param_groups"]]
    return {**sd, "param_groups": groups}


class TrainStep:
    """One optimizer step: forward + backward + gradient clipping + AdamW, with no host sync.

    `compile_mode`: None runs the model eagerly; otherwise a torch.compile mode ("default",
    "reduce-overhead", "max-autotune-no-cudagraphs", ...). "reduce-overhead" replays the forward
    and backward as CUDA graphs. Why: at batch 256 × 128 the compiled small model issues a few
    hundred kernels a step, and the figures point to the host's launches as the limit (H200,
    compiled: mha 27,897 samples/s with rounds from 15,840 to 30,096, and mla, with more and
    smaller kernels, 26% slower; at batch 1024, where launches amortize, the H100 ran GPU-bound
    with rounds within ±0.3%, docs/results.md). That is an inference until
    benchmarks/train_speed.py has run on the GPU. A replay is a few launches, so the host can stay
    ahead of the GPU and its jitter stops showing in the rate. It needs static shapes (one graph
    per shape) and a step marker before each forward, so the outputs of the previous step's graphs
    may be overwritten.

    `step_graph` (CUDA, static shapes, one process): the whole step as ONE torch.cuda.CUDAGraph,
    forward + loss + backward + clip_grad_norm_ + the AdamW step, with the model compiled in
    `compile_mode` (one without cudagraphs of its own). Under "reduce-overhead" the lr setting,
    the clipping, AdamW and zero_grad still ran eagerly: 5.8 ms of host launches in a 7.8 ms step
    (H200, benchmarks/README.md). PyTorch's "whole network capture": `warmup` real steps on a
    side stream, gradients set to None, the capture into static input buffers, then one replay a
    step; the learning rate is a device tensor filled before the replay. The outputs are static
    too: (loss, grad_norm) of a replay are overwritten by the next one, so a caller consumes them
    in stream order before the next call (run_phase adds them to device sums) or copies them.
    The MLM loss is capture-safe as it is: data.mask_tokens masks exactly masked_count positions
    a row, so the head gathers a fixed [B, k] (no boolean indexing, no host sync).

    Used by `run_phase` and by benchmarks/train_speed.py, so the benchmark times this step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        loss: Callable[[Callable[..., Any], Batch], torch.Tensor],
        dev: torch.device,
        compile_mode: str | None = None,
        module: torch.nn.Module | None = None,
        step_graph: bool = False,
        warmup: int = STEP_GRAPH_WARMUP,
    ):
        """`module`: what the forward runs, when not `model` itself (DistributedDataParallel(model))."""
        self.model, self.opt, self.loss, self.dev = model, opt, loss, dev
        self.params = [p for p in model.parameters() if p.requires_grad]  # listed once, not per step
        base = module if module is not None else model
        if compile_mode is None:
            self.fwd: Callable[..., Any] = base
        else:
            self.fwd = torch.compile(base, mode=None if compile_mode == "default" else compile_mode)
        self.graphed = compile_mode == "reduce-overhead"
        self.step_graph, self.warmup, self.calls = step_graph, warmup, 0
        if step_graph:
            if dev.type != "cuda":
                raise ValueError("a whole-step CUDA graph needs a CUDA device")
            if self.graphed:
                raise ValueError("step_graph takes a compile mode without cudagraphs of its own")
            self.lr = torch.zeros((), dtype=torch.float32, device=dev)
            to_capturable(opt, self.lr)
            self.graph: torch.cuda.CUDAGraph | None = None
            self.static_in: Batch = ()
            self.static_out: tuple[torch.Tensor, torch.Tensor] | None = None
            self.side = torch.cuda.Stream(dev)
            self.capture_s: float | None = None

    @property
    def untimed_steps(self) -> int:
        """Steps before the rate means anything: compilation, and under step_graph the capture."""
        return self.warmup + 1 if self.step_graph else 3

    def __call__(self, tensors: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, gradient norm before clipping), both still on the device."""
        if self.step_graph:
            return self._graph_step(tensors, lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.dev):
            loss = self.loss(self.fwd, tensors)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The autocast cache off: under a capture, cached casts would come from the graph's pool.
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = self.loss(self.fwd, self.static_in)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return loss.detach(), grad_norm

    def _graph_step(self, tensors: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        stage = graph_stage(self.calls, self.warmup)
        self.calls += 1
        if not self.static_in:
            self.static_in = tuple(torch.empty_like(t, device=self.dev) for t in tensors)
        for buf, t in zip(self.static_in, tensors, strict=True):
            buf.copy_(t, non_blocking=True)
        self.lr.fill_(lr)  # a kernel with the value as its argument: no copy, no sync
        if stage == "warmup":
            self.side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(self.side), warnings.catch_warnings():
                # "capturable=True ... running without CUDA graph capture": on purpose, once.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                out = self._body()
                self.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream(self.dev).wait_stream(self.side)
            return out
        if stage == "capture":
            t0 = time.perf_counter()
            # Gradients None, so the captured backward allocates them from the graph's pool and
            # each replay writes them afresh (no zero_grad after a replay).
            self.opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self._body()
            self.capture_s = time.perf_counter() - t0
        assert self.graph is not None and self.static_out is not None
        self.graph.replay()
        return self.static_out


def compile_mode_for(phase: Phase, tc: TrainConfig, dev: torch.device) -> tuple[str | None, bool]:
    """(torch.compile mode, whole-step graph): eager without --compile; on CUDA with static shapes
    the whole step as one CUDA graph around a compiled model; on the CPU the default mode.

    Phases without static shapes (fine-tuning: batches padded to their longest sentence) stay
    eager under --compile: each new length would be a recompile until dynamo turns dynamic, and
    those compiles (12-36 s each on the H200, benchmarks/README.md) cost about as much as the
    whole default fine-tune (500 steps of 64: 25 s eager in each of 14 processes sharing the H200,
    docs/results.md round 2)."""
    if not tc.compile or not phase.static_shapes:
        return None, False
    if dev.type == "cuda":
        return STEP_GRAPH_COMPILE, True
    return "default", False


@dataclass
class PhaseOutcome:
    done: bool  # False: stopped early (the checkpoint holds the state)
    step: int
    samples_per_s: float | None
    stopped_by: str | None = None  # "stop_after", or the signal's name ("SIGINT", "SIGTERM")


@dataclass
class _RunContext:
    out: Path
    dev: torch.device
    tc: TrainConfig
    log: _RunLog
    progress: TrainProgress
    base: dict  # the checkpoint fields every checkpoint of the run carries
    wall: Callable[[], float]
    stop: StopRequest = field(default_factory=StopRequest)
    ddp: Ddp = field(default_factory=lambda: Ddp(0, 1))


_OPT_HYPER = ("weight_decay", "betas", "eps", "amsgrad", "maximize")  # AdamW's, as make_optimizer sets them
_OPT_STATE = ("step", "exp_avg", "exp_avg_sq")  # what AdamW (amsgrad off) keeps per parameter


class _DamagedOptimizer(ValueError):
    """An optimizer state that no run writes, as opposed to one of another model."""


def _check_optimizer(
    opt: torch.optim.Optimizer, fresh: list[dict], step: int, names: dict[int, str] | None = None
) -> None:
    """A loaded optimizer state is this run's: load_state_dict restores the saved groups'
    hyperparameters and takes any moment tensors, whose shapes torch checks only mid-step.

    Moments: AdamW creates a parameter's state (step, exp_avg, exp_avg_sq) whole at the first step
    that parameter has a gradient, so the state is empty exactly until then. Every trainable
    parameter of the lab's models has a gradient at every step (each one feeds the loss; DDP,
    which runs without find_unused_parameters, would fail otherwise), so after `step` >= 1 steps
    each holds the whole state, and at step 0 fresh moments are right. An empty state after a step
    resumed silently with fresh moments for that parameter; a partial one failed mid-step.
    `names`: id(parameter) -> its name, for the message."""
    for i, (group, want) in enumerate(zip(opt.param_groups, fresh, strict=True)):
        got = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in group.items() if k in _OPT_HYPER}
        want = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in want.items()}
        if got != want:
            raise ValueError(f"optimizer group {i} has {got}, this run {want}")
        for j, p in enumerate(group["params"]):
            st = opt.state.get(p, {})
            missing = [k for k in _OPT_STATE if k not in st]
            if missing and (st or (step > 0 and p.requires_grad)):
                name = (names or {}).get(id(p), f"parameter {j} of optimizer group {i}")
                raise _DamagedOptimizer(
                    f"its optimizer state for {name} {tuple(p.shape)} has no {', '.join(missing)}"
                    + (f" after {step} steps" if not st else "")
                )
            for key in ("exp_avg", "exp_avg_sq"):
                t = st.get(key)
                if t is not None and (not isinstance(t, torch.Tensor) or t.shape != p.shape):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"optimizer {key} of shape {shape} for a parameter of {tuple(p.shape)}")
            if "step" in st:
                # Each step of the loop steps every parameter's AdamW once (no step is skipped: no
                # GradScaler), so its counter is the checkpoint's step exactly; one of 0 at step 2
                # resumed with the wrong bias correction for that parameter, silently.
                counter = torch.as_tensor(st["step"]).reshape(-1)
                s = float(counter[0]) if counter.numel() == 1 else -1.0
                if s != step:
                    name = (names or {}).get(id(p), f"parameter {j} of optimizer group {i}")
                    raise _DamagedOptimizer(f"its optimizer state for {name} has stepped {s:g} times, not {step}")


def run_phase(phase: Phase, ctx: _RunContext, resume: dict | None) -> PhaseOutcome:
    """Train `phase.model` for `phase.steps` optimizer steps (from `resume`'s step, if given).

    Checkpoints every `checkpoint_every` steps, every `checkpoint_minutes`, where --stop-after
    stops it, and when a signal asks it to stop (after the step in progress)."""
    tc, dev, model = ctx.tc, ctx.dev, phase.model
    # No gradients from before: a whole-step CUDA graph leaves its last replay's in every p.grad
    # (it never sets them to None), and fine-tuning shares the encoder's parameters, so its first
    # backward would add to pretraining's last gradients.
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model, phase.peak_lr, tc.weight_decay, dev)
    step, samples, seconds = 0, 0, 0.0
    if resume is not None:
        step, samples, seconds = resume["step"], resume["timed_samples"], resume["timed_seconds"]
        where = ctx.out / CHECKPOINT
        if step > phase.steps:
            raise TrainingInputError(
                f"the checkpoint {where} is at {phase.name} step {step} of {phase.steps}", hint=START_OVER
            )
        try:
            model.load_state_dict(resume["model"])
            fresh = [{k: v for k, v in g.items() if k in _OPT_HYPER} for g in opt.param_groups]
            opt.load_state_dict(resume["optimizer"])
            _check_optimizer(opt, fresh, step, {id(p): n for n, p in model.named_parameters()})
            set_rng_state(resume["rng"], dev)
        except _DamagedOptimizer as e:
            raise TrainingInputError(f"the checkpoint {where} is damaged: {e}", hint=START_OVER) from None
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # torch's words for a state that does not fit
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingInputError(
                f"the checkpoint {where} does not fit this run's {phase.name} model: {first}", hint=START_OVER
            ) from None
    compile_mode, step_graph = compile_mode_for(phase, tc, dev)
    wrapped: torch.nn.Module = model
    if ctx.ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if step_graph:
            # CUDA graphs around DDP's gradient hooks are untested here: the default mode instead.
            compile_mode, step_graph = "default", False
    train_step = TrainStep(model, opt, phase.loss, dev, compile_mode, module=wrapped, step_graph=step_graph)
    if compile_mode is not None:
        graph = f", the whole step one CUDA graph (captured after {train_step.warmup} steps)" if step_graph else ""
        ctx.log(f"{phase.label}: torch.compile mode {compile_mode}{graph}")
    elif tc.compile:
        ctx.log(f"{phase.label}: eager (--compile compiles fixed-shape phases only; its batches vary in length)")
    timer = _Timer(dev, skip=min(train_step.untimed_steps, max(1, phase.steps - step - 1)))
    stop_at = phase.steps if tc.stop_after is None else min(phase.steps, step + tc.stop_after)
    finite = _NonFinite(phase.label, phase.lr_flag, dev)
    loss_sum, n_logged = torch.zeros((), device=dev), 0
    ctx.progress.phase_started(phase.name, phase.steps, step)
    saved_at, saved_step = time.monotonic(), step if resume is not None else None

    def checkpoint() -> None:
        nonlocal saved_at, saved_step
        if not ctx.ddp.main:  # rank 0 writes; every rank holds the same weights
            return
        finite.check(step, model)
        timer.pause()
        save_checkpoint(
            {
                **ctx.base,
                **phase.extra,
                "phase": phase.name,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer_state(opt),
                "rng": rng_state(dev),
                "timed_samples": samples + timer.samples,
                "timed_seconds": seconds + timer.seconds,
                "wall_time_s": ctx.wall(),
            },
            ctx.out,
        )
        saved_at, saved_step = time.monotonic(), step
        timer.resume()

    model.train()
    every_s = 60 * tc.checkpoint_minutes
    while step < stop_at:
        # Under DDP the ranks agree on stopping, where they sync anyway (every log_every steps).
        if ctx.ddp.world == 1 or step % tc.log_every == 0:
            if ctx.ddp.any(ctx.stop.signal is not None, dev):
                ctx.stop.signal = ctx.stop.signal or "SIGTERM"
                break
        lr = lr_at(step, phase.steps, tc.warmup_frac, phase.peak_lr)
        tensors, n_samples = phase.batch(step)
        # ctx.ddp.take: this rank's rows of the global batch (all of them in one process).
        tensors = tuple(t.to(dev, non_blocking=True) for t in ctx.ddp.take(tensors))  # no-op where built there
        loss, grad_norm = train_step(tensors, lr)
        finite.watch(loss, grad_norm)
        step += 1
        timer.step_done(n_samples)
        loss_sum += loss
        n_logged += 1
        if step % tc.log_every == 0 or step == stop_at:
            mean_loss = ctx.ddp.mean(loss_sum).item() / n_logged  # the one host sync per log interval
            finite.check(step, lr=lr)
            loss_sum.zero_()
            n_logged = 0
            sps = timer.running_rate()
            ctx.progress.phase_step(phase.name, step, mean_loss, sps)
            ctx.log(f"{phase.name} step {step}/{phase.steps} loss {mean_loss:.4f} lr {lr:.2e} samples/s {sps:,.0f}")
        if (
            step % tc.checkpoint_every == 0
            or step == stop_at
            or (every_s > 0 and time.monotonic() - saved_at >= every_s)
        ):
            checkpoint()
    if step < stop_at:  # a signal asked to stop
        if saved_step != step:
            checkpoint()
        timer.pause()
        ctx.log(
            f"interrupted ({ctx.stop.signal}) at {phase.label} step {step}; checkpoint saved in {ctx.out}; "
            "run the same command to resume"
        )
        return PhaseOutcome(False, step, None, ctx.stop.signal)
    timer.pause()
    if step < phase.steps:
        ctx.log(f"stopped {phase.label} after step {step} (--stop-after); rerun the same command to resume")
        return PhaseOutcome(False, step, None, "stop_after")
    finite.check(step, model)
    total_samples, total_seconds = samples + timer.samples, seconds + timer.seconds
    rate = round(total_samples / total_seconds, 1) if total_seconds > 0 and total_samples else None
    return PhaseOutcome(True, step, rate)


# ---- the two phases ------------------------------------------------------------------------------


def pretraining_phase(
    model: torch.nn.Module, cfg: ModelConfig, tc: TrainConfig, tok: D.Tok, rows: torch.Tensor, log: _RunLog
) -> Phase:
    """MLM or CLM on packed rows: the batch order of step s from (seed, epoch); MLM masks from (seed, s).

    The rows live on the model's device (WikiText-103 at seq_len 128: 0.84 GB of int64 ids), and
    batches are cut and masked there (data.mask_tokens), so the host does no per-step work."""
    batch = min(tc.batch_size, len(rows))
    if batch < tc.batch_size:
        log(f"batch size {tc.batch_size} > {len(rows)} rows: using {batch}")
    dev = next(model.parameters()).device
    rows = rows.to(dev)
    cache: dict = {}

    def make_batch(step: int) -> tuple[Batch, int]:
        idx = epoch_batch(len(rows), batch, step, tc.seed, cache, dev)
        picked = rows[idx]
        if cfg.objective == "clm":
            return (picked[:, :-1], picked[:, 1:]), batch
        return D.mask_tokens(picked, tok, step_generator(tc.seed, step, 1, dev)), batch

    def loss(fwd, t: Batch) -> torch.Tensor:
        return fwd(*t, accuracy=False)[0]

    return Phase(
        "pretrain", "pretraining", model, tc.pretrain_steps, tc.lr, "--lr", make_batch, loss, static_shapes=True
    )


def pack_rows(cfg: ModelConfig, tok: D.Tok, lines: list[str], seq_len: int) -> torch.Tensor:
    """mlm: [CLS] body [SEP] rows of seq_len; clm: rows of seq_len + 1 (inputs and shifted targets)."""
    return D.pack_causal(tok, lines, seq_len) if cfg.objective == "clm" else D.pack_sequences(tok, lines, seq_len)


def finetune_phase(
    model: Classifier, tc: TrainConfig, tok: D.Tok, train_ids: list[list[int]], labels: torch.Tensor, pre: dict
) -> Phase:
    """SST-2 classification; the batch order from (seed + 1, epoch)."""
    batch = min(tc.finetune_batch_size, len(train_ids))
    cache: dict = {}

    def make_batch(step: int) -> tuple[Batch, int]:
        idx = epoch_batch(len(train_ids), batch, step, tc.seed + 1, cache)
        ids, pad = D.pad_batch([train_ids[i] for i in idx.tolist()], tok.pad_id)
        return (ids, pad, labels[idx]), len(idx)

    def loss(fwd, t: Batch) -> torch.Tensor:
        ids, pad, y = t
        return F.cross_entropy(fwd(ids, pad).float(), y)

    steps = finetune_steps(tc, len(train_ids))
    return Phase(
        "finetune",
        "fine-tuning",
        model,
        steps,
        tc.finetune_lr,
        "--finetune-lr",
        make_batch,
        loss,
        {"pretrain_metrics": pre},
    )


def finetune_steps(tc: TrainConfig, n_sentences: int) -> int:
    if tc.finetune_steps is not None:
        return tc.finetune_steps
    per_epoch = n_sentences // min(tc.finetune_batch_size, n_sentences)
    return max(1, math.ceil((tc.finetune_epochs or 1.0) * per_epoch))


@torch.no_grad()
def evaluate_mlm(model: MaskedLM, rows: torch.Tensor, tok: D.Tok, dev: torch.device, batch: int) -> tuple[float, float]:
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


@torch.no_grad()
def evaluate_clm(model: CausalLM, rows: torch.Tensor, dev: torch.device, batch: int) -> dict[str, float]:
    """Mean next-token loss, its perplexity exp(loss), and accuracy over every token of `rows`."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        with autocast(dev):
            loss, c = model(chunk[:, :-1].to(dev), chunk[:, 1:].to(dev))
        n = chunk[:, 1:].numel()
        loss_sum += loss.item() * n
        correct += int(c)
        count += n
    model.train(was_training)
    mean = loss_sum / count
    return {
        "loss": round(mean, 5),
        "perplexity": round(math.exp(min(mean, 700.0)), 3),
        "accuracy": round(correct / count, 5),
    }


# Above this share of [UNK] among the training text's tokens, the tokenizer is not the text's:
# a vocabulary of the special tokens alone made every token [UNK] and MLM "accuracy" 1.0.
# WikiText-2 under bert-base-uncased's vocabulary: 2.6% (its first 5,000 lines, 437,664 tokens).
MAX_UNK_SHARE = 0.5


def check_known_tokens(rows: torch.Tensor, tok: D.Tok) -> None:
    """TrainingInputError when more than MAX_UNK_SHARE of the text tokens in `rows` are [UNK]."""
    special = torch.tensor([tok.pad_id, tok.cls_id, tok.sep_id])
    text = ~torch.isin(rows, special)
    n = int(text.sum())
    unk = int(((rows == tok.unk_id) & text).sum())
    if n and unk > MAX_UNK_SHARE * n:
        raise TrainingInputError(
            f"the tokenizer {tok.name} maps {unk / n:.0%} of the training text's tokens to [UNK]",
            hint="pass the vocabulary the text was tokenized for (bert-base-uncased's vocab.txt for WikiText)",
        )


def evaluation_rows(cfg: ModelConfig, tok: D.Tok, data: TrainingData, tc: TrainConfig):
    """The valid rows, and the test rows of clm (None without a test split or under mlm), packed
    before pretraining starts: a split too short for one row is refused then, not after every
    pretraining step has run (the rerun with a fixed file could not resume: its data differ)."""
    valid = pack_rows(cfg, tok, data.valid_lines, tc.seq_len)
    test = pack_rows(cfg, tok, data.test_lines, tc.seq_len) if data.test_lines and cfg.objective == "clm" else None
    return valid, test


def evaluate_pretraining(
    model: torch.nn.Module,
    cfg: ModelConfig,
    valid: torch.Tensor,
    test: torch.Tensor | None,
    tok: D.Tok,
    tc: TrainConfig,
    dev: torch.device,
) -> dict[str, Any]:
    """The pretraining metrics of metrics.json, from `evaluation_rows`. mlm: mlm_loss,
    mlm_accuracy (valid, fixed masks). clm: clm_loss, clm_perplexity, clm_accuracy (valid),
    clm_test_loss, clm_test_perplexity (None without a test split)."""
    if cfg.objective == "mlm":
        assert isinstance(model, MaskedLM)
        loss, acc = evaluate_mlm(model, valid, tok, dev, tc.batch_size)
        return {"mlm_loss": loss, "mlm_accuracy": acc}
    assert isinstance(model, CausalLM)
    v = evaluate_clm(model, valid, dev, tc.batch_size)
    out: dict[str, Any] = {"clm_loss": v["loss"], "clm_perplexity": v["perplexity"], "clm_accuracy": v["accuracy"]}
    out["clm_test_loss"] = out["clm_test_perplexity"] = None
    if test is not None:
        t = evaluate_clm(model, test, dev, tc.batch_size)
        out["clm_test_loss"], out["clm_test_perplexity"] = t["loss"], t["perplexity"]
    return out


@torch.no_grad()
def evaluate_classifier(
    model: Classifier, seqs: list[list[int]], labels: list[int], tok: D.Tok, dev: torch.device, batch: int
) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(seqs), batch):
        ids, pad = D.pad_batch(seqs[i : i + batch], tok.pad_id)
        with autocast(dev):
            pred = model(ids.to(dev), pad.to(dev)).argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[i : i + batch])).sum())
    model.train(was_training)
    return round(correct / len(seqs), 5)


# ---- a run ---------------------------------------------------------------------------------------


def run(
    cfg: ModelConfig,
    tc: TrainConfig,
    src: DataSources,
    out: Path,
    progress: TrainProgress | None = None,
    overwrite: bool = False,
) -> dict:
    """Pretrain, export the encoder, fine-tune on SST-2 if given, write metrics.json; resumable.

    Args:
        cfg: the model (`build_config`); its vocab_size follows the tokenizer.
        tc: the recipe (`build_train_config`).
        src: tokenizer and data.
        out: the run folder (see run_dir.py for what it may already hold).
        progress: told about phases, steps and log lines; None: train.log only.
        overwrite: start over in a folder that holds another run or other files.

    Returns:
        metrics.json's content; or, when a phase stopped early, {"stopped": True, "reason":
        "stop_after" or "interrupted", "signal": "SIGINT" or "SIGTERM" (interrupted only),
        "phase", "step", "out"}. SIGINT and SIGTERM stop after the step in progress, with a
        checkpoint (see stop_on_signals).

    Example:
        >>> run(preset("mla-o", "tiny"), TrainConfig(pretrain_steps=20, device="cpu"),
        ...     DataSources("vocab.txt", data_dir=Path("wikitext-2")), Path("runs/mla-o"))
    """
    tc.validate()
    out = Path(out)
    check_out_dir(out, overwrite)
    pick_device(tc.device)  # a bad --device is refused before the data is read
    return train(cfg, tc, load_data(src), out, progress, overwrite)


def dry_run(cfg: ModelConfig, tokenizer: str) -> dict:
    """`--dry-run`: the parameter counts and shapes of the model `run` would build with
    `tokenizer`. Its vocabulary sizes the embedding, as in `run`, where it is a local file or
    folder (loaded, so bounded and checked as a run's is); a Hub name is not fetched, and the
    config's vocab_size stands (bert-base-uncased's 30,522 by default)."""
    from svd_probe.train.model import dry_run_summary

    if Path(tokenizer).expanduser().exists():
        cfg = replace(cfg, vocab_size=D.load_tokenizer(tokenizer).vocab_size)
    return dry_run_summary(cfg)


def run_seeds(
    cfg: ModelConfig,
    tc: TrainConfig,
    src: DataSources,
    out: Path,
    seeds: list[int],
    progress: TrainProgress | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """One run per seed, in OUT/seed-N, one after another on the same device, the data read once.

    Each run resumes, stops and overwrites on its own terms, exactly as `run` (a rerun of the
    command resumes cut runs and re-evaluates finished ones). A signal stops the run in progress
    and the runs after it; --stop-after stops each run's phase and goes on to the next seed.

    Returns:
        one `run` result per seed started, in order.

    Example:
        >>> run_seeds(preset("mla-o", "tiny"), TrainConfig(device="cpu"), sources, Path("runs/mla-o"), [0, 1, 2])
    """
    tc.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainingInputError(
            f"--out {out} is a file, not a folder", hint="pass a folder (it is created if missing)"
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise TrainingInputError(f"--seeds must list distinct seeds, got {seeds}", hint="e.g. --seeds 0,1,2,3,4")
    for seed in seeds:
        replace(tc, seed=seed).validate()
        check_out_dir(seed_dir(out, seed), overwrite)
    pick_device(tc.device)
    data = load_data(src)
    results = []
    for seed in seeds:
        result = train(cfg, replace(tc, seed=seed), data, seed_dir(out, seed), progress, overwrite)
        results.append(result)
        if result.get("reason") == "interrupted":
            break
    return results


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def train(
    cfg: ModelConfig,
    tc: TrainConfig,
    data: TrainingData,
    out: Path,
    progress: TrainProgress | None = None,
    overwrite: bool = False,
) -> dict:
    """`run` on data already loaded (`load_data`); under torchrun, this process's rank of it."""
    with stop_on_signals() as stop, distributed(tc.device) as (ddp, dev):
        return _train(cfg, tc, data, out, progress, overwrite, stop, ddp, dev)


def _train(
    cfg: ModelConfig,
    tc: TrainConfig,
    data: TrainingData,
    out: Path,
    progress: TrainProgress | None,
    overwrite: bool,
    stop: StopRequest,
    ddp: Ddp,
    dev: torch.device,
) -> dict:
    t_start = time.perf_counter()
    tc.validate()
    check_batch(tc, ddp.world)
    out = Path(out)
    check_out_dir(out, overwrite)
    progress = progress or _Silent()
    tok = data.tok
    cfg = replace(cfg, vocab_size=tok.vocab_size, max_seq_len=max(cfg.max_seq_len, tc.seq_len))

    source = load_source(Path(tc.init_from)) if tc.init_from is not None else None
    init_record = source.record() if source is not None else None
    if source is not None:
        if cfg.variant != "mla-o":
            raise TrainingInputError(
                f"--init-from builds an mla-o model, not {cfg.variant}", hint="pass --variant mla-o (or leave it out)"
            )
        initial_state(cfg, source)  # checks the shapes against the source before anything is written

    if ddp.main:  # under DDP rank 0 writes the folder; every rank reads the same checkpoint
        if overwrite and out.is_dir():
            remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
    ddp.barrier()
    log = _RunLog(out / "train.log", progress, enabled=ddp.main)
    # Bounded by what this run's model and optimizer can fill (cfg is final here: its vocabulary is
    # the tokenizer's), not by a fixed constant: run_dir.checkpoint_limit says why.
    state = load_checkpoint(out, checkpoint_limit(cfg))
    fingerprint = dict(data.fingerprint)
    if state is not None:
        check_resumable(state, cfg, tc, out)
        check_same_data(state.get("data"), fingerprint, out)
        check_same_init(state.get("init_from"), init_record, out)
        if state.get("data") is None:
            log("the checkpoint records no data fingerprint (older svd-probe); recording this command's")
        elif fingerprint["sst2"] is None:
            fingerprint["sst2"] = state["data"].get("sst2")  # a rerun without --sst2-dir keeps the record
        log(f"resuming {state['phase']} at step {state['step']} from {out}")
    base = {
        "format": CHECKPOINT_FORMAT,
        "model_config": cfg.to_dict(),
        "recipe": tc.recipe(),
        "data": fingerprint,
        "init_from": init_record,
    }
    prior_wall = state.get("wall_time_s", 0.0) if state else 0.0

    def wall() -> float:
        return prior_wall + time.perf_counter() - t_start

    ctx = _RunContext(out, dev, tc, log, progress, base, wall, stop, ddp)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    parameters = pretraining_parameters(cfg)
    log(
        f"run {cfg.variant} {cfg.objective}"
        + (f" o_norm={cfg.o_norm}" if cfg.variant == "mla-o" else "")
        + (f" init_from={source.path} ({source.cfg.variant})" if source is not None else "")
        + f" seed={tc.seed} device={device_name(dev)} params={parameters:,} out={out}"
        + (f" ddp_ranks={ddp.world} (batch {tc.batch_size // ddp.world} per rank)" if ddp.world > 1 else "")
    )

    def stopped(phase: str, outcome: PhaseOutcome) -> dict:
        reason = "stop_after" if outcome.stopped_by == "stop_after" else "interrupted"
        info = {"stopped": True, "reason": reason, "phase": phase, "step": outcome.step, "out": str(out)}
        if reason == "interrupted":
            info["signal"] = outcome.stopped_by
        return info

    # -- pretraining
    pre = state.get("pretrain_metrics") if state else None
    if pre is None:
        train_rows = pack_rows(cfg, tok, data.train_lines, tc.seq_len)
        check_known_tokens(train_rows, tok)
        valid_rows, test_rows = evaluation_rows(cfg, tok, data, tc)
        log(f"pretraining data ({cfg.objective}): {len(train_rows):,} train rows of {tc.seq_len} tokens")
        # Each phase seeds its own initialization, so where a run was interrupted cannot change it.
        torch.manual_seed(tc.seed)
        with kernels.enabled(tc.kernels):
            lm = pretraining_model(cfg)
        resume = state if state and state["phase"] == "pretrain" else None
        if source is not None and resume is None:
            lm.encoder.load_state_dict(initial_state(cfg, source))
        lm = lm.to(dev)
        phase = pretraining_phase(lm, cfg, tc, tok, train_rows, log)
        done = run_phase(phase, ctx, resume)
        if not done.done:
            return stopped("pretrain", done)
        pre = {
            **evaluate_pretraining(lm, cfg, valid_rows, test_rows, tok, tc, dev),
            "pretrain_samples_per_s": done.samples_per_s,
        }
        log("pretrain valid: " + " ".join(f"{k} {v}" for k, v in pre.items() if k != "pretrain_samples_per_s"))
        if ddp.main:
            save_encoder(lm, cfg, out)
            save_checkpoint(
                {**base, "phase": "finetune", "step": 0, "pretrain_metrics": pre, "wall_time_s": wall()}, out
            )
        ddp.barrier()  # fine-tuning loads model.safetensors on every rank
        state = None
        del lm
    if not (out / "model.safetensors").exists():
        raise TrainingInputError(
            f"{out} has a finished pretraining checkpoint but no model.safetensors",
            hint=START_OVER,
        )

    # -- fine-tuning
    ft: dict[str, Any] = {"sst2_dev_accuracy": None, "finetune_samples_per_s": None, "finetune_steps": 0}
    if data.sst2 is not None:
        (train_s, train_y), (dev_s, dev_y) = data.sst2
        causal = cfg.objective == "clm"
        train_ids = D.encode_sentences(tok, train_s, tc.seq_len, causal)
        dev_ids = D.encode_sentences(tok, dev_s, tc.seq_len, causal)
        torch.manual_seed(tc.seed + 1)  # the head's initialization (the encoder is loaded below)
        with kernels.enabled(tc.kernels):
            clf = Classifier(cfg, n_labels=2).to(dev)
        phase = finetune_phase(clf, tc, tok, train_ids, torch.tensor(train_y), pre)
        log(
            f"fine-tuning data: {len(train_ids):,} train, {len(dev_ids):,} dev sentences; "
            f"{phase.steps} steps of {min(tc.finetune_batch_size, len(train_ids))}"
        )
        resume = state if state and state["phase"] == "finetune" and "model" in state else None
        if resume is None:
            load_encoder_weights(clf, out / "model.safetensors")
        done = run_phase(phase, ctx, resume)
        if not done.done:
            return stopped("finetune", done)
        acc = evaluate_classifier(clf, dev_ids, dev_y, tok, dev, 128)
        log(f"sst2 dev accuracy {acc:.4f} ({len(dev_ids)} sentences)")
        ft = {"sst2_dev_accuracy": acc, "finetune_samples_per_s": done.samples_per_s, "finetune_steps": phase.steps}

    pre_metrics = {k: v for k, v in pre.items() if k != "pretrain_samples_per_s"}
    metrics = {
        "parameters": parameters,
        "objective": cfg.objective,
        **pre_metrics,
        "sst2_dev_accuracy": ft["sst2_dev_accuracy"],
        "pretrain_samples_per_s": pre["pretrain_samples_per_s"],
        "finetune_samples_per_s": ft["finetune_samples_per_s"],
        "wall_time_s": round(wall(), 2),
        "device": device_name(dev),
        "seed": tc.seed,
        "git_commit": git_commit(),
        "variant": cfg.variant,
        "o_norm": cfg.o_norm,
        "init_from": init_record,
        "data": fingerprint,  # compare refuses to set runs on different data beside each other
        "config": cfg.to_dict(),
        "train_config": {**asdict(tc), "finetune_steps": ft["finetune_steps"]},
        "torch_version": torch.__version__,
        "ddp_world_size": ddp.world,
    }
    if ddp.main:
        write_json(metrics, out / "metrics.json")
    summary = (*pre_metrics, "sst2_dev_accuracy", "pretrain_samples_per_s", "finetune_samples_per_s", "wall_time_s")
    log("done: " + json.dumps({k: metrics[k] for k in summary}))
    return metrics
