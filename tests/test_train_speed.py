"""The fast paths of the training step compute what the slow ones do: the MLM loss at the gathered
masked positions equals the loss read off full logits (float64), and batches cut and masked on the
model's device are a function of the seed and follow BERT's rule in their counts. And
benchmarks/train_speed.py --sdpa on the CPU: a row per backend, the ones without a CPU kernel
recorded as skipped, and a restricted compiled model traced with its own backend."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import VARIANTS

from svd_probe.train import data as D
from svd_probe.train.config import TrainConfig, preset
from svd_probe.train.loop import pretraining_phase
from svd_probe.train.model import MaskedLM

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
TOK = D.Tok(None, "test", VOCAB, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gathered_mlm_loss_equals_the_full_logits_loss(variant):
    cfg = replace(preset(variant, "tiny"), vocab_size=VOCAB)
    torch.manual_seed(0)
    model = MaskedLM(cfg).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (3, 24), generator=g)
    positions = torch.stack([torch.randperm(22, generator=g)[:5] + 1 for _ in range(3)])
    targets = torch.randint(5, VOCAB, (3, 5), generator=g)
    loss, correct = model(ids, positions, targets)
    loss_only, none = model(ids, positions, targets, accuracy=False)

    # Reference: logits at every position, then the masked ones read off by index, by hand.
    with torch.no_grad():
        full = model.encoder(ids) @ model.encoder.embed.weight.T  # [B, T, V], float64
        logp = full - torch.logsumexp(full, dim=-1, keepdim=True)
        nll = [-logp[b, positions[b, j], targets[b, j]] for b in range(3) for j in range(5)]
        want = sum(nll) / len(nll)
        hits = sum(int(full[b, positions[b, j]].argmax() == targets[b, j]) for b in range(3) for j in range(5))
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)
    assert int(correct) == hits
    assert none is None and loss_only.item() == loss.item()
    # The gradients agree too (the head and the body share the embedding).
    loss.backward()
    got = model.encoder.embed.weight.grad.clone()
    model.zero_grad()
    h = model.encoder(ids)
    logits_all = h @ model.encoder.embed.weight.T
    picked = logits_all[torch.arange(3)[:, None], positions]  # advanced indexing, not gather
    F.cross_entropy(picked.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    torch.testing.assert_close(got, model.encoder.embed.weight.grad, rtol=1e-10, atol=1e-14)


def _phase(seed: int, rows: torch.Tensor, batch: int):
    cfg = replace(preset("mha", "tiny"), vocab_size=VOCAB)
    model = MaskedLM(cfg)  # on the CPU: the batches are built on its device
    tc = TrainConfig(pretrain_steps=100, batch_size=batch, seq_len=rows.shape[1], seed=seed, device="cpu")
    return pretraining_phase(model, cfg, tc, TOK, rows, log=lambda msg: None)


def _rows(n: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(5, VOCAB, (n, seq_len), generator=g)
    rows[:, 0], rows[:, -1] = TOK.cls_id, TOK.sep_id
    return rows


def test_device_batches_are_a_function_of_the_seed_and_step():
    rows = _rows(64, 32)
    a, b, other = _phase(0, rows, 16), _phase(0, rows, 16), _phase(1, rows, 16)
    for step in (0, 1, 5, 4):  # any order: step s's batch depends on (seed, s) only
        (xa, n), (xb, _), (xo, _) = a.batch(step), b.batch(step), other.batch(step)
        assert n == 16 and all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
        assert not torch.equal(xa[1], xo[1])  # another seed masks other positions
    # Steps of one epoch take disjoint rows; an input row is a data row outside its masked positions.
    seen = []
    for step in range(4):
        inputs, positions, _ = a.batch(step)[0]
        keep = torch.ones_like(inputs, dtype=torch.bool).scatter_(1, positions, False)
        for r in range(len(inputs)):
            match = [i for i in range(len(rows)) if torch.equal(rows[i][keep[r]], inputs[r][keep[r]])]
            assert len(match) == 1
            seen.append(match[0])
    assert sorted(seen) == list(range(64))  # one epoch: every row once


def test_device_batches_follow_the_bert_rule_in_their_counts():
    """15% of the 126 body tokens of a 128-row (19 per row, never [CLS]/[SEP]); of those, 80%
    become [MASK], 10% a uniformly random token, 10% stay: counts within 4.5 sigma of the rule."""
    rows = _rows(2048, 128)
    phase = _phase(3, rows, 2048)
    inputs, positions, targets = phase.batch(0)[0]
    k = round(0.15 * 126)
    assert positions.shape == (2048, k) == (2048, 19)
    assert ((positions >= 1) & (positions <= 126)).all()
    assert all(len(set(p.tolist())) == k for p in positions)  # distinct positions in a row
    picked_rows = inputs.clone().scatter_(1, positions, targets)  # undo the masking
    assert torch.equal(torch.gather(picked_rows, 1, positions), targets)
    got = torch.gather(inputs, 1, positions)
    n = got.numel()
    masked = int((got == TOK.mask_id).sum())
    kept = int((got == targets).sum())
    replaced = n - masked - kept
    # A random replacement may draw [MASK] or the target itself (1/V each).
    p_mask, p_kept = 0.8 + 0.1 / VOCAB, 0.1 + 0.1 / VOCAB
    p_rand = 1 - p_mask - p_kept
    for count, p in ((masked, p_mask), (kept, p_kept), (replaced, p_rand)):
        assert abs(count - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (count, n * p)
    # Random replacements are spread over the vocabulary, special ids included.
    drawn = got[(got != TOK.mask_id) & (got != targets)]
    assert drawn.min() < 10 and drawn.max() > VOCAB - 10
    untouched = torch.ones_like(inputs, dtype=torch.bool).scatter_(1, positions, False)
    assert torch.equal(inputs[untouched], picked_rows[untouched])


def test_train_speed_times_a_row_per_sdpa_backend_and_skips_those_without_a_kernel(tmp_path):
    """On CPU torch (2.13) math and flash (its CPU flash kernel) run the MLM step, cudnn does not
    ("No viable backend"): its rows are recorded as skipped and the run goes on."""
    out = tmp_path / "ts.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", "cpu", "--size", "tiny"]
    cmd += ["--steps", "2", "--rounds", "1", "--modes", "eager", "--sdpa", "default,math,flash,cudnn"]
    r = subprocess.run(
        [*cmd, "--json", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["stage"] == "done" and doc["env"]["sdpa_backends"] == ["default", "math", "flash", "cudnn"]
    by = {(x["variant"], x["source"], x["sdpa"]): x for x in doc["results"]}
    assert len(by) == len(doc["results"]) == 3 * 2 * 4  # variants x sources (eager) x backends
    for v in ("mha", "mla", "mla-o"):
        for source in ("device", "host"):
            for sdpa in ("default", "math", "flash"):
                row = by[(v, source, sdpa)]
                assert row["mode"] == "eager" and row["samples_per_s"] > 0, row
            skipped = by[(v, source, "cudnn")]
            assert "samples_per_s" not in skipped and "error" not in skipped
            assert skipped["skipped"].startswith("RuntimeError: No viable backend"), skipped
    # The targets' checks read the default rows only; the fastest backend per row group.
    assert doc["checks"] and all("sdpa" not in c["check"] for c in doc["checks"])
    fastest = {(f["variant"], f["source"]): f for f in doc["sdpa_fastest"]}
    assert len(fastest) == 6
    assert all(f["fastest"] in ("default", "math", "flash") for f in fastest.values())
    assert all(set(f["samples_per_s"]) == {"default", "math", "flash"} for f in fastest.values())
    assert "fastest sdpa  mha eager/device:" in r.stdout
    header = next(line for line in r.stdout.splitlines() if line.startswith("variant"))
    assert header.split()[:5] == ["variant", "mode", "source", "sdpa", "samples/s"]


def test_sdpa_only_has_each_compiled_model_traced_with_its_own_backend():
    """train_speed's SdpaOnly: a second model of the same class, compiled under another backend,
    runs that backend's kernel (dynamo does not guard on sdpa_kernel's flags set outside the traced
    forward, so without the wrapper it could reuse the first model's graph); a third under the
    first backend reuses the first graph."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
    assert spec and spec.loader
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    cfg = replace(preset("mha", "tiny"), vocab_size=VOCAB, n_layers=1)
    ids = torch.randint(5, VOCAB, (2, 16))
    positions, targets = torch.tensor([[1, 2], [3, 4]]), torch.randint(5, VOCAB, (2, 2))
    torch._dynamo.reset()
    try:
        for sdpa, has_flash, new_graphs in (("flash", True, 1), ("math", False, 1), ("flash", True, 0)):
            model = torch.compile(ts.SdpaOnly(MaskedLM(cfg), ts.SDPA[sdpa]), backend="aot_eager")
            before = counters["stats"]["unique_graphs"]
            with ts.sdpa_context(sdpa):
                model(ids, positions, targets, accuracy=False)[0].backward()  # traced here
                with profile() as prof:
                    model(ids, positions, targets, accuracy=False)[0].backward()
            ran = {e.name for e in prof.events()}
            assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in ran) is has_flash, (sdpa, ran)
            assert counters["stats"]["unique_graphs"] - before == new_graphs, sdpa
    finally:
        torch._dynamo.reset()
