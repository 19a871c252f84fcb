"""The lab's second round: output-latent norms, the causal objective, --init-from, seeds and
compare's intervals; each against an independent expectation (a formula, float64 by hand, a
t-table value)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from train_fixtures import (  # noqa: F401  (inputs_fixture, tok_fixture: the `inputs` and `tok` fixtures)
    cli_main,
    cli_train_args,
    expected_parameters,
    inputs_fixture,
    small_recipe,
    sources,
    tok_fixture,
)

from svd_probe.errors import TrainingInputError
from svd_probe.train import data as D
from svd_probe.train.compare import comparison, load_runs, paired_differences, render_tables, summarize, t_interval
from svd_probe.train.config import build_config, preset
from svd_probe.train.init_from import derive_config, initial_state, load_source
from svd_probe.train.loop import make_optimizer, run
from svd_probe.train.model import CausalLM, Classifier, Encoder, MaskedLM, num_parameters, pretraining_model
from svd_probe.train.run_dir import save_encoder

# (variant, o_norm): every attention the lab has.
ATTENTIONS = [("mha", "none"), ("mla", "none"), ("mla-o", "none"), ("mla-o", "rms"), ("mla-o", "rms-per-head")]


def tiny(variant, o_norm="none", objective="mlm", **kw):
    return replace(preset(variant, "tiny"), o_norm=o_norm, objective=objective, **{"vocab_size": 40, **kw})


# ---- output-latent norms -------------------------------------------------------------------------


@pytest.mark.parametrize("o_norm", ["none", "rms", "rms-per-head"])
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_o_norm_parameter_counts(o_norm, objective, monkeypatch, capsys):
    args = ["train", "--variant", "mla-o", "--o-norm", o_norm, "--objective", objective, "--dry-run", "--json"]
    code, out, err = cli_main(args, monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["parameters"] == expected_parameters("mla-o", 30522, 256, 6, 8, 32, 1024, 64, 32, 64, o_norm)
    assert (summary["o_norm"], summary["objective"]) == (o_norm, objective)
    norm_shape = {"none": None, "rms": [64], "rms-per-head": [8, 64]}[o_norm]
    assert summary["shapes"].get("encoder.layers.0.attn.o_norm.weight") == norm_shape
    cfg = replace(tiny("mla-o", o_norm, objective), n_heads=3, o_latent=9)
    assert num_parameters(Classifier(cfg)) == expected_parameters("mla-o", 40, 64, 2, 3, 16, 256, 16, 8, 9, o_norm, 2)


def _rms(x, g, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * g


@pytest.mark.parametrize("o_norm", ["rms", "rms-per-head"])
def test_o_norm_matches_a_float64_reference(o_norm):
    """The attention output through the norm, against the definition written with numpy."""
    torch.manual_seed(0)
    cfg = tiny("mla-o", o_norm)
    attn = Encoder(cfg).layers[0].attn.double()
    with torch.no_grad():
        attn.o_norm.weight.uniform_(0.5, 1.5)  # ones would hide a misplaced weight
        heads = torch.randn(2, 5, cfg.attn_dim, dtype=torch.float64)
        # The output side alone: feed `heads` through the same code path as forward().
        B, T, H, D = 2, 5, cfg.n_heads, cfg.head_dim
        if o_norm == "rms":
            got = attn.o_up(attn.o_norm(attn.o_down(heads)))
        else:
            w = attn.o_down.weight.view(-1, H, D)
            per_head = torch.einsum("bthe,lhe->bthl", heads.view(B, T, H, D), w)
            got = attn.o_up(attn.o_norm(per_head).sum(2) * H**-0.5)
    x = heads.numpy()
    down, up, g = (t.detach().numpy() for t in (attn.o_down.weight, attn.o_up.weight, attn.o_norm.weight))
    if o_norm == "rms":
        want = _rms(x @ down.T, g) @ up.T
    else:
        want = sum(_rms(x[..., h * D : (h + 1) * D] @ down[:, h * D : (h + 1) * D].T, g[h]) for h in range(H))
        want = (want / math.sqrt(H)) @ up.T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # And forward() takes that path: the block's output depends on the norm weight.
    x_in = torch.randn(1, 4, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        before = attn(x_in)
        attn.o_norm.weight.mul_(2.0)
        after = attn(x_in)
    torch.testing.assert_close(after, 2.0 * before, rtol=1e-10, atol=1e-12)  # the norm weight scales the output


def test_o_norm_needs_mla_o():
    with pytest.raises(TrainingInputError, match="needs the shared output latent of mla-o"):
        build_config("mla", "tiny", overrides={"o_norm": "rms"})
    with pytest.raises(TrainingInputError, match="o_norm must be one of"):
        build_config("mla-o", "tiny", overrides={"o_norm": "layer"})
    with pytest.raises(TrainingInputError, match="objective must be one of"):
        build_config("mha", "tiny", overrides={"objective": "seq2seq"})


# ---- the causal objective ------------------------------------------------------------------------


@pytest.mark.parametrize("variant,o_norm", ATTENTIONS)
def test_clm_is_causal_and_mlm_is_not(variant, o_norm):
    torch.manual_seed(0)
    ids = torch.randint(5, 40, (2, 12))
    later = ids.clone()
    later[:, 7:] = torch.randint(5, 40, (2, 5))
    for objective in ("clm", "mlm"):
        enc = Encoder(tiny(variant, o_norm, objective)).eval()
        with torch.no_grad():
            a, b = enc(ids), enc(later)
        if objective == "clm":
            torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)  # earlier positions: bit for bit
            assert not torch.allclose(a[:, 7:], b[:, 7:])
        else:
            assert not torch.allclose(a[:, :7], b[:, :7])  # an encoder sees the whole row


def test_the_chunked_lm_head_loss_equals_one_big_matmul_in_float64():
    from svd_probe.train.model import lm_head_loss

    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g)
    t = torch.randint(0, 50, (37,), generator=g)
    grads = []
    for chunk in (5, 37):  # 8 chunks (the last of 2 tokens), and one whole-batch matmul
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, correct = lm_head_loss(hh, ww, t, chunk=chunk)
        loss.backward()
        grads.append((loss.detach(), int(correct), hh.grad, ww.grad))
    logits = h @ w.T  # the independent reference: torch's own log-softmax on the whole batch
    ref = -torch.log_softmax(logits, -1).gather(1, t[:, None]).mean()
    assert torch.allclose(grads[0][0], ref, rtol=1e-12) and torch.allclose(grads[1][0], ref, rtol=1e-12)
    assert grads[0][1] == grads[1][1] == int((logits.argmax(-1) == t).sum())
    assert torch.allclose(grads[0][2], grads[1][2], rtol=1e-10) and torch.allclose(grads[0][3], grads[1][3], rtol=1e-10)


def test_causal_packing_predicts_every_token_once(tok):
    lines = ["the red cat sees a dog .", "a big bird finds the tree ."] * 20
    rows = D.pack_causal(tok, lines, 8)
    stream = [i for ids in tok.encode_batch(lines) for i in (*ids, tok.sep_id)]
    assert rows.shape == ((len(stream) - 1) // 8, 9)
    targets = rows[:, 1:].flatten().tolist()
    assert targets == stream[1 : 1 + len(targets)]  # contiguous, no gaps, no repeats, no padding
    assert (rows[1:, 0] == rows[:-1, -1]).all()  # rows overlap by one token
    assert tok.pad_id not in rows


def test_clm_classifier_reads_the_last_real_token(tok):
    torch.manual_seed(0)
    clf = Classifier(tiny("mla-o", "rms", "clm", vocab_size=tok.vocab_size)).eval()
    seqs = D.encode_sentences(tok, ["the cat was very good", "a dog"], 32, causal=True)
    assert all(s[-1] == tok.sep_id and tok.cls_id not in s for s in seqs)
    ids, pad = D.pad_batch(seqs, tok.pad_id)
    with torch.no_grad():
        batched = clf(ids, pad)
        alone = torch.cat([clf(torch.tensor([s])) for s in seqs])  # no padding at all
        h = clf.encoder(torch.tensor([seqs[1]]))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[1], clf.head(h[0, -1]), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "clm"])
@pytest.mark.parametrize("variant,o_norm", ATTENTIONS)
def test_every_attention_learns_under_both_objectives(variant, o_norm, objective, inputs, tok):
    torch.manual_seed(0)
    cfg = tiny(variant, o_norm, objective, vocab_size=tok.vocab_size)
    lines = D.read_wikitext_dir(inputs["wiki"])[0]
    model = pretraining_model(cfg)
    rows = D.pack_causal(tok, lines, 24) if objective == "clm" else D.pack_sequences(tok, lines, 24)
    opt = make_optimizer(model, 3e-3, 0.01, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        batch = rows[torch.randint(0, len(rows), (16,), generator=g)]
        args = (batch[:, :-1], batch[:, 1:]) if objective == "clm" else D.mask_tokens(batch, tok, g)
        loss, _ = model(*args)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


@pytest.mark.slow
def test_a_clm_run_reports_perplexity_and_fine_tunes(inputs, tmp_path):
    out = tmp_path / "clm"
    cfg = replace(preset("mla-o", "tiny"), objective="clm", o_norm="rms-per-head")
    m = run(cfg, small_recipe(pretrain_steps=30, log_every=5), sources(inputs), out)
    losses = [
        float(x)
        for x in __import__("re").findall(r"pretrain step \d+/30 loss ([\d.]+)", (out / "train.log").read_text())
    ]
    assert losses[-1] < losses[0] - 0.5, losses
    assert m["objective"] == "clm" and "mlm_accuracy" not in m
    assert m["clm_perplexity"] == pytest.approx(math.exp(m["clm_loss"]), rel=1e-3)
    assert m["clm_test_perplexity"] is not None and m["clm_perplexity"] < tok_count(inputs)  # below uniform
    assert 0 <= m["sst2_dev_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert (config["objective"], config["o_norm"]) == ("clm", "rms-per-head")


def tok_count(inputs) -> int:
    return D.load_tokenizer(str(inputs["vocab"])).vocab_size


# ---- --init-from ---------------------------------------------------------------------------------


def _source_run(folder, variant, **kw):
    torch.manual_seed(1)
    cfg = tiny(variant, **kw)
    model = MaskedLM(cfg) if cfg.objective == "mlm" else CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    save_encoder(model, cfg, folder)
    return cfg, model


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_init_from_mla_at_full_rank_is_the_source_model(tmp_path, objective):
    src_cfg, src = _source_run(tmp_path / "mla", "mla", objective=objective)
    source = load_source(tmp_path / "mla")
    full = min(src_cfg.d_model, src_cfg.attn_dim)
    target = derive_config(source.cfg, o_latent=full)
    assert (target.variant, target.o_latent, target.q_latent, target.rope_dims) == ("mla-o", 64, 16, 8)
    new = pretraining_model(target).double()
    new.encoder.load_state_dict({k: v.double() for k, v in initial_state(target, source).items()})
    src = src.double()
    for layer in range(target.n_layers):  # the output map, in float64
        a = new.encoder.layers[layer].attn
        w_o = src.encoder.layers[layer].attn.o_proj.weight
        torch.testing.assert_close(a.o_up.weight @ a.o_down.weight, w_o, rtol=0, atol=1e-6)  # float32 storage
    ids = torch.randint(5, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(new.encoder(ids), src.encoder(ids), rtol=1e-5, atol=1e-6)  # the whole model


@pytest.mark.parametrize("damage", ["deep", "dev-zero", "fifo", "steps"])
def test_a_source_with_a_damaged_metrics_json_loads_without_its_steps(tmp_path, damage):
    """The source's metrics.json only adds its pretraining steps: damaged, it reads as None.
    A JSON nest 100,000 deep ended in a RecursionError traceback, and a link to /dev/zero was
    read forever; now the read is bounded (config.read_metrics) and a pipe is not opened."""
    from train_fixtures import damage_json_file

    _source_run(tmp_path / "mha", "mha")
    metrics = tmp_path / "mha" / "metrics.json"
    if not damage_json_file(metrics, damage):
        metrics.write_text('{"train_config": {"pretrain_steps": 320}}')
    source = load_source(tmp_path / "mha")
    assert source.cfg.variant == "mha" and source.pretrain_steps == (320 if damage == "steps" else None)


@pytest.mark.slow
def test_init_from_mha_factors_every_attention_map(tmp_path):
    src_cfg, src = _source_run(tmp_path / "mha", "mha")
    source = load_source(tmp_path / "mha")
    d, HD = src_cfg.d_model, src_cfg.attn_dim
    target = derive_config(source.cfg, o_latent=min(d, HD), q_latent=min(d, HD), kv_latent=min(d, 2 * HD))
    state = {k: v.double() for k, v in initial_state(target, source).items()}
    H, D = src_cfg.n_heads, src_cfg.head_dim
    for layer in range(target.n_layers):
        p = f"layers.{layer}.attn."
        qkv = src.encoder.layers[layer].attn.qkv.weight.detach().double()
        w_q, w_k, w_v = qkv[:HD], qkv[HD : 2 * HD], qkv[2 * HD :]
        down_q, down_kv = state[p + "down.weight"].split([target.q_latent, target.kv_latent])
        torch.testing.assert_close(state[p + "q_up.weight"] @ down_q, w_q, rtol=0, atol=1e-6)
        kv = (state[p + "kv_up.weight"] @ down_kv).view(H, 2, D, d)
        torch.testing.assert_close(kv[:, 0].reshape(HD, d), w_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(kv[:, 1].reshape(HD, d), w_v, rtol=0, atol=1e-6)
        w_o = src.encoder.layers[layer].attn.o_proj.weight.detach().double()
        torch.testing.assert_close(state[p + "o_up.weight"] @ state[p + "o_down.weight"], w_o, rtol=0, atol=1e-6)
        assert torch.equal(state[p + "q_norm.weight"], torch.ones(target.q_latent))
    for name in ("embed.weight", "layers.1.ffn.down.bias", "layers.0.attn_norm.weight"):
        assert torch.equal(state[name], source.tensors[name].double())
    Encoder(target).load_state_dict(initial_state(target, source))  # strict: every tensor, right shapes


def test_init_from_below_full_rank_is_the_truncated_svd(tmp_path):
    _, src = _source_run(tmp_path / "mla", "mla")
    source = load_source(tmp_path / "mla")
    state = initial_state(derive_config(source.cfg, o_latent=5), source)
    w = src.encoder.layers[1].attn.o_proj.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w)
    best = (u[:, :5] * s[:5]) @ vt[:5]
    got = (state["layers.1.attn.o_up.weight"].double() @ state["layers.1.attn.o_down.weight"].double()).numpy()
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-5)
    # Balanced: both factors carry Σ^½.
    np.testing.assert_allclose(
        np.linalg.norm(state["layers.1.attn.o_up.weight"].numpy(), axis=0), np.sqrt(s[:5]), rtol=1e-5
    )


@pytest.mark.slow
def test_init_from_end_to_end_and_its_refusals(inputs, tmp_path, monkeypatch, capsys):
    mha = tmp_path / "mha"
    code, _, err = cli_main(cli_train_args(inputs, mha, "--variant", "mha"), monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "mla-o-init"
    code, stdout, err = cli_main(
        cli_train_args(inputs, out, "--init-from", str(mha), "--o-latent", "32", "--o-norm", "rms", "--json"),
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    m = json.loads(stdout)
    assert m["variant"] == "mla-o" and m["init_from"]["variant"] == "mha" and m["config"]["o_latent"] == 32
    assert m["config"]["rope_dims"] == 16 and m["o_norm"] == "rms"
    # A rerun from other weights is refused; so are an mla-o source and a shape that differs.
    other = tmp_path / "mha-seed1"  # the same shapes, other weights
    assert cli_main(cli_train_args(inputs, other, "--variant", "mha", "--seed", "1"), monkeypatch, capsys)[0] == 0
    code, _, err = cli_main(
        cli_train_args(inputs, out, "--init-from", str(other), "--o-latent", "32", "--o-norm", "rms"),
        monkeypatch,
        capsys,
    )
    assert code == 2 and "started from --init-from" in " ".join(err.split())
    for extra, message in [
        (["--init-from", str(out)], "mla-o starts from mha or mla"),
        (["--init-from", str(mha), "--d-model", "32"], "takes d_model from the source run"),
        (["--init-from", str(mha), "--variant", "mla"], "--init-from builds mla-o"),
        (["--init-from", str(mha), "--o-latent", "65"], "exceeds the rank"),
        (["--init-from", str(tmp_path / "nothing")], "holds no config.json"),
        (["--init-from", str(_retyped(mha, tmp_path / "bert"))], "is a 'bert' checkpoint, not"),
    ]:
        code, _, err = cli_main(cli_train_args(inputs, tmp_path / "x", *extra), monkeypatch, capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (extra, err)


def _retyped(run: Path, to: Path) -> Path:
    """A copy of `run` whose config.json says it is another library's model."""
    shutil.copytree(run, to)
    cfg = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    return to


# ---- seeds and compare ---------------------------------------------------------------------------


def _metrics(variant, seed, mlm_acc, sst2, o_norm="none", objective="mlm"):
    cfg = replace(preset(variant, "tiny"), o_norm=o_norm, objective=objective)
    m = {
        "variant": variant,
        "seed": seed,
        "objective": objective,
        "o_norm": o_norm,
        "config": cfg.to_dict(),
        "train_config": {"pretrain_steps": 100},
        "parameters": 123_456,
        "sst2_dev_accuracy": sst2,
        "pretrain_samples_per_s": 1000.0,
    }
    if objective == "mlm":
        m.update(mlm_accuracy=mlm_acc, mlm_loss=3.0)
    else:
        m.update(clm_perplexity=mlm_acc, clm_test_perplexity=mlm_acc + 1)
    return m


@pytest.mark.slow
def test_the_interval_is_the_paired_t_interval_by_hand():
    a = [0.81, 0.84, 0.80]  # mla-o SST-2, seeds 0, 1, 2
    b = [0.80, 0.81, 0.79]  # mha
    runs = [_metrics("mha", s, 0.3, x) for s, x in enumerate(b)] + [
        _metrics("mla-o", s, 0.3, x) for s, x in enumerate(a)
    ]
    runs.append(_metrics("mha", 7, 0.3, 0.5))  # seed 7 has no mla-o partner: not paired
    rows = summarize(runs)
    pair = next(p for p in paired_differences(rows) if p["metric"] == "sst2_dev_accuracy")
    # By hand: d = (0.01, 0.03, 0.01); mean 0.05/3; sd = sqrt(((−1/150)² + (2/150)² + (−1/150)²) / 2)
    # = sqrt(6/2)/150 = sqrt(3)/150. Student's t with 2 degrees of freedom has a closed-form
    # quantile, t_p = (2p − 1) / sqrt(2p(1 − p)): t(0.975) = 4.30265... (the t table's 4.303).
    mean, sd = 0.05 / 3, math.sqrt(3) / 150
    p = 0.975
    t = (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert round(t, 3) == 4.303
    half = t * sd / math.sqrt(3)
    assert (pair["a"], pair["b"], pair["n"], pair["seeds"]) == ("mla-o q16 kv8 o16 rope16", "mha rope16", 3, [0, 1, 2])
    assert pair["mean"] == pytest.approx(mean, abs=1e-12)
    assert (pair["low"], pair["high"]) == (pytest.approx(mean - half, abs=1e-12), pytest.approx(mean + half, abs=1e-12))
    mha = next(r for r in rows if r["variant"] == "mha")
    assert mha["n"] == 4 and mha["sst2_dev_accuracy"] == pytest.approx(np.mean(b + [0.5]))
    assert mha["sst2_dev_accuracy_std"] == pytest.approx(np.std(b + [0.5], ddof=1))
    assert t_interval([0.02]) == (0.02, None, None)  # one seed: no interval


def test_init_from_runs_of_several_seeds_pool_into_one_configuration():
    # Each seed starts from its own source file (another sha256); the seeds must still pool, and
    # sources of another recipe (pretrain_steps) must not pool with them.
    runs = []
    for s, acc in enumerate([0.80, 0.82, 0.81]):
        m = _metrics("mla-o", s, 0.3, acc)
        m["init_from"] = {"source": f"src{s}", "variant": "mla", "sha256": f"{s:064x}", "source_pretrain_steps": 50}
        runs.append(m)
    other = _metrics("mla-o", 0, 0.3, 0.5)
    other["init_from"] = {"source": "x", "variant": "mla", "sha256": "f" * 64, "source_pretrain_steps": 99}
    rows = summarize(runs + [other, _metrics("mla-o", 0, 0.3, 0.7)])
    pooled = [r for r in rows if r["init_from"] == "mla" and r["n"] == 3]
    assert len(pooled) == 1 and pooled[0]["seeds"] == [0, 1, 2]
    assert pooled[0]["sst2_dev_accuracy"] == pytest.approx(0.81)
    assert sorted(r["n"] for r in rows) == [1, 1, 3]


def test_compare_tables_both_objectives_at_80_columns():
    runs = []
    for s in range(3):
        runs += [_metrics("mha", s, 0.35 + s / 100, 0.80), _metrics("mla-o", s, 0.33, 0.79 + s / 100, "rms-per-head")]
        runs += [_metrics("mha", s, 60.0 + s, 0.78, objective="clm"), _metrics("mla", s, 62.5, 0.77, objective="clm")]
    comp = comparison(runs)
    assert {r["objective"] for r in comp["configs"]} == {"mlm", "clm"}
    assert len(comp["differences"]) == 4  # one pair per objective, two metrics each
    console = Console(width=80, record=True, color_system=None)
    for table in render_tables(comp):
        console.print(table)
    text = console.export_text()
    assert "#2" not in text  # labels are unique per objective, not across
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for want in (
        "MLM (masked LM)",
        "CLM (causal LM)",
        "ppl valid",
        "paired by seed",
        "rms-per-head",
        "36.00 ± 1.00",
        "61.0 ± 1.0",
    ):
        assert want in text, want


@pytest.mark.slow
def test_seeds_write_one_run_each_and_compare_pools_them(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mla-o"
    code, stdout, err = cli_main(
        cli_train_args(inputs, out, "--variant", "mla-o", "--seeds", "0,1"), monkeypatch, capsys
    )
    assert code == 0, err
    assert "mla-o seed 0" in stdout and "mla-o seed 1" in stdout
    seeds = [json.loads((out / f"seed-{s}" / "metrics.json").read_text())["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    rows = summarize(load_runs([out]))
    assert [(r["variant"], r["n"], r["seeds"]) for r in rows] == [("mla-o", 2, [0, 1])]
    code, stdout, err = cli_main(["compare", str(out), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(stdout)["configs"][0]["n"] == 2
    for bad, message in [("0,0", "bad --seeds"), ("a-b", "bad --seeds"), ("-1", "bad --seeds")]:
        code, _, err = cli_main(cli_train_args(inputs, tmp_path / "s", "--seeds", bad), monkeypatch, capsys)
        assert code == 2 and message in err
    code, _, err = cli_main(
        cli_train_args(inputs, tmp_path / "s", "--seeds", "0,1", "--seed", "3"), monkeypatch, capsys
    )
    assert code == 2 and "--seed and --seeds" in err


def test_compare_reads_the_first_labs_metrics(tmp_path):
    """metrics.json of runs before objectives and norms (no objective, o_norm, init_from keys)."""
    for seed in (0, 1):
        m = _metrics("mla", seed, 0.34, 0.8)
        for key in ("objective", "o_norm"):
            del m[key]
        m["config"] = {k: v for k, v in m["config"].items() if k not in ("objective", "o_norm")}
        d = tmp_path / f"mla-{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(m))
    rows = comparison(load_runs([tmp_path]))["configs"]
    assert [(r["objective"], r["o_norm"], r["n"]) for r in rows] == [("mlm", "none", 2)]


def test_compare_refuses_one_run_counted_twice(tmp_path):
    """A copied run folder is not a second seed: it would give n = 2 and a std of 0."""
    runs = [_metrics("mha", 0, 0.3, 0.8), _metrics("mha", 1, 0.3, 0.7)]
    for i, m in enumerate(runs + [runs[0]]):  # the third is a copy of the first
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(TrainingInputError, match=r"two runs of one configuration with seed 0: .*run0 and .*run2"):
        summarize(load_runs([tmp_path]))
    assert [r["n"] for r in summarize(load_runs([tmp_path / "run0", tmp_path / "run1"]))] == [2]
