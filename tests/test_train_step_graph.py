"""The whole-step CUDA graph (TrainStep step_graph) in its CPU-checkable parts: the step count of
warm-up, capture and replay; the learning rate as a device tensor filled in place against the float
schedule; optimizer states moving between the eager and the capturable form both ways (so a
checkpoint of either resumes in the other); which step `--compile` picks. On CUDA: a graphed run's
losses follow an eager run's from the same weights and batches, across a resume each way."""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import replace

import pytest
import torch

from svd_probe.train import data as D
from svd_probe.train.config import TrainConfig, preset
from svd_probe.train.loop import (
    STEP_GRAPH_COMPILE,
    TrainStep,
    compile_mode_for,
    graph_stage,
    lr_at,
    make_optimizer,
    optimizer_state,
    pretraining_phase,
    to_capturable,
)
from svd_probe.train.model import MaskedLM

VOCAB = 300
TOK = D.Tok(None, "test", VOCAB, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4)
CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


def _model(seed: int = 0) -> MaskedLM:
    torch.manual_seed(seed)
    return MaskedLM(replace(preset("mha", "tiny"), vocab_size=VOCAB))


def _fake_grads(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _saved(sd: dict) -> dict:
    """`sd` through torch.save and torch.load, as a checkpoint: a state_dict holds the optimizer's
    live tensors, and two optimizers loaded from one would share (and both update) them."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    for pa, pb in zip(a.state.values(), b.state.values(), strict=True):
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]).float(), torch.as_tensor(pb[k]).float()), k


def test_every_call_is_one_optimizer_step_warmup_capture_then_replay():
    stages = [graph_stage(i, 3) for i in range(7)]
    assert stages == ["warmup"] * 3 + ["capture"] + ["replay"] * 3
    assert [graph_stage(i, 0) for i in range(2)] == ["capture", "replay"]


def test_the_lr_tensor_filled_in_place_steps_as_the_float_schedule():
    """Fused AdamW with lr a tensor (refilled before each step, as before each replay) against the
    same fused AdamW given each step's float: bit for bit. The kernel takes lr in float32 both ways
    (on CUDA it casts the float; here it is rounded to float32 first), so the float32 tensor loses
    nothing against the eager run."""
    a, b = _model(), _model()
    ref = make_optimizer(a, 1e-3, 0.01, CPU)
    for group in ref.param_groups:
        group["fused"], group["foreach"] = True, None
    opt = make_optimizer(b, 1e-3, 0.01, CPU)
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, None  # as make_optimizer's on CUDA
    lr = torch.zeros((), dtype=torch.float32)
    to_capturable(opt, lr)
    assert all(g["lr"] is lr and g["capturable"] for g in opt.param_groups)
    total = 9
    for step in range(total):
        value = lr_at(step, total, 0.3, 3e-3)
        for group in ref.param_groups:
            group["lr"] = float(torch.tensor(value, dtype=torch.float32))
        lr.fill_(value)
        _fake_grads(a, step)
        _fake_grads(b, step)
        ref.step()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # on CUDA: not captured
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert float(lr) == pytest.approx(lr_at(total - 1, total, 0.3, 3e-3), rel=1e-7)
    assert all(float(s["step"]) == total for s in opt.state.values())


def test_optimizer_states_move_between_eager_and_capturable_both_ways():
    """eager -> (load, to_capturable) -> optimizer_state -> eager again: every moment and step count
    kept, and the eager optimizer that resumes from the round trip takes the same next step, bit for
    bit, as the one that never left. Also torch's own load of a raw capturable state (lr a tensor,
    capturable True) into a non-capturable optimizer keeps the step counters."""
    model = _model()
    opt = make_optimizer(model, 1e-3, 0.01, CPU)
    for step in range(3):
        _fake_grads(model, step)
        opt.step()
    eager_sd = optimizer_state(opt)
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in eager_sd["param_groups"])

    # An eager checkpoint resumed in graph mode: TrainStep loads it, then applies to_capturable.
    twin = copy.deepcopy(model)
    graph_opt = make_optimizer(twin, 1e-3, 0.01, CPU)
    graph_opt.load_state_dict(_saved(eager_sd))
    lr = torch.tensor(5e-4)
    to_capturable(graph_opt, lr)
    _same_state(opt, graph_opt)
    for state in graph_opt.state.values():
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 3
    assert all(g["lr"] is lr and g["capturable"] for g in graph_opt.param_groups)

    # Torch's own load of the raw capturable form into a non-capturable optimizer.
    raw = graph_opt.state_dict()
    assert raw["param_groups"][0]["capturable"] is True
    plain = make_optimizer(copy.deepcopy(model), 1e-3, 0.01, CPU)
    plain.load_state_dict(_saved(raw))
    _same_state(opt, plain)
    assert all(float(s["step"]) == 3 for s in plain.state.values())

    # A graph-mode checkpoint (optimizer_state) resumed eagerly.
    back = optimizer_state(graph_opt)
    assert all(g["lr"] == pytest.approx(5e-4) and g["capturable"] is False for g in back["param_groups"])
    assert graph_opt.param_groups[0]["lr"] is lr  # the live optimizer is untouched by the save
    resumed_model = copy.deepcopy(model)
    resumed = make_optimizer(resumed_model, 1e-3, 0.01, CPU)
    resumed.load_state_dict(_saved(back))
    _same_state(opt, resumed)
    for o, m in ((opt, model), (resumed, resumed_model)):
        for group in o.param_groups:
            group["lr"] = 2e-3
        _fake_grads(m, 3)
        o.step()
    for pa, pb in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    _same_state(opt, resumed)


def test_compile_picks_the_whole_step_graph_on_cuda_with_static_shapes_only():
    rows = torch.randint(5, VOCAB, (32, 16))
    tc = TrainConfig(pretrain_steps=4, batch_size=8, seq_len=16, device="cpu")
    phase = pretraining_phase(_model(), preset("mha", "tiny"), tc, TOK, rows, log=lambda msg: None)
    on = replace(tc, compile=True)
    gpu = torch.device("cuda", 0)
    assert compile_mode_for(phase, tc, gpu) == (None, False)
    assert compile_mode_for(phase, on, CPU) == ("default", False)
    assert compile_mode_for(phase, on, gpu) == (STEP_GRAPH_COMPILE, True)
    # fine-tuning (variable-length batches) stays eager under --compile, on any device
    assert compile_mode_for(replace(phase, static_shapes=False), on, gpu) == (None, False)
    assert compile_mode_for(replace(phase, static_shapes=False), on, CPU) == (None, False)
    assert STEP_GRAPH_COMPILE in ("default", "max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match="CUDA"):
        TrainStep(phase.model, make_optimizer(phase.model, 1e-3, 0.0, CPU), phase.loss, CPU, "default", step_graph=True)


# ---- CUDA ------------------------------------------------------------------------------------


def _cuda_run(graph: bool, steps: int, resume_at: int | None = None, resume_graph: bool | None = None):
    """Losses and grad norms of `steps` steps of a tiny MLM on CUDA (bf16 autocast), graphed or
    eager; with resume_at, the run switches there to a fresh model and optimizer (graphed or not)
    loaded from a checkpoint of the first (model state, optimizer_state), as a resume does."""
    dev = torch.device("cuda")
    cfg = replace(preset("mha", "tiny"), vocab_size=VOCAB)
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(5, VOCAB, (64, 32), generator=g)
    rows[:, 0], rows[:, -1] = TOK.cls_id, TOK.sep_id
    tc = TrainConfig(pretrain_steps=steps, batch_size=16, seq_len=32, device="cuda")

    def build(is_graph: bool, state: dict | None):
        torch.manual_seed(0)
        model = MaskedLM(cfg).to(dev)
        opt = make_optimizer(model, 1e-3, 0.01, dev)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(_saved(state["optimizer"]))
        phase = pretraining_phase(model, cfg, tc, TOK, rows, log=lambda msg: None)
        ts = TrainStep(model, opt, phase.loss, dev, "default" if is_graph else None, step_graph=is_graph)
        return model, opt, phase, ts

    model, opt, phase, ts = build(graph, None)
    losses, norms = [], []
    for step in range(steps):
        if step == resume_at:
            state = {"model": copy.deepcopy(model.state_dict()), "optimizer": optimizer_state(opt)}
            model, opt, phase, ts = build(bool(resume_graph), state)
        loss, norm = ts(phase.batch(step)[0], lr_at(step, steps, 0.2, 2e-3))
        losses.append(float(loss))  # a copy before the next call: the graph's outputs are static
        norms.append(float(norm))
    steps_taken = {float(s["step"]) for s in opt.state.values()}
    return losses, norms, steps_taken


@cuda
@pytest.mark.slow
def test_graphed_losses_follow_eager_losses_on_cuda():
    n = 12
    eager, eager_norms, eager_steps = _cuda_run(False, n)
    graphed, graphed_norms, graphed_steps = _cuda_run(True, n)
    assert eager_steps == graphed_steps == {float(n)}  # warm-up steps are real steps, no extra ones
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(graphed_norms), torch.tensor(eager_norms), rtol=5e-2, atol=5e-2)
    # No "loss falls" check here: these rows are random tokens, with nothing to learn in 12 steps
    # (H200, 2026-12-02: eager 5.7012 -> 5.7026); the eager run is the expectation.
    # A resume each way: eager checkpoint -> graphed run, graphed checkpoint -> eager run.
    for first, then in ((False, True), (True, False)):
        mixed, _, mixed_steps = _cuda_run(first, n, resume_at=6, resume_graph=then)
        assert mixed_steps == {float(n)}
        torch.testing.assert_close(torch.tensor(mixed), torch.tensor(eager), rtol=2e-2, atol=2e-2)


def test_a_phase_starts_without_the_gradients_left_on_its_parameters(tmp_path):
    """A whole-step graph leaves its last replay's gradients in p.grad, and fine-tuning shares the
    encoder's parameters: run_phase must not add them into its first step. Planted gradients
    (as a graph would leave) and none give the same weights after a phase, bit for bit."""
    from svd_probe.train.loop import Ddp, Phase, StopRequest, _RunContext, _RunLog, _Silent, run_phase

    tc = TrainConfig(pretrain_steps=3, batch_size=4, seq_len=32, device="cpu", log_every=1, checkpoint_every=100)
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(5, VOCAB, (16, 32), generator=g)
    rows[:, 0], rows[:, -1] = TOK.cls_id, TOK.sep_id

    def weights_after(plant: bool, out) -> dict:
        model = _model()
        cfg = replace(preset("mha", "tiny"), vocab_size=VOCAB)
        phase = pretraining_phase(model, cfg, tc, TOK, rows, log=lambda msg: None)
        if plant:
            _fake_grads(model, 0)
        out.mkdir()
        ctx = _RunContext(out, CPU, tc, _RunLog(out / "train.log", _Silent()), _Silent(), {}, lambda: 0.0,
                          StopRequest(), Ddp(0, 1))  # fmt: skip
        assert isinstance(phase, Phase) and run_phase(phase, ctx, None).done
        return {k: v.clone() for k, v in model.state_dict().items()}

    clean, planted = weights_after(False, tmp_path / "a"), weights_after(True, tmp_path / "b")
    assert all(torch.equal(clean[k], planted[k]) for k in clean)
    assert any(not torch.equal(clean[k], _model().state_dict()[k]) for k in clean)  # it did train
