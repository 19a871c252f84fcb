"""The training lab: configs, parameter counts, data, learning, checkpoints, resume, errors, compare."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (  # noqa: F401  (inputs_fixture, tok_fixture: the `inputs` and `tok` fixtures)
    VARIANTS,
    cli_main,
    expected_parameters,
    inputs_fixture,
    small_recipe,
    sources,
    tok_fixture,
)

from svd_probe.errors import TrainingInputError
from svd_probe.train import data as D
from svd_probe.train.compare import load_runs, summarize
from svd_probe.train.config import build_config, build_train_config, preset, read_config_file
from svd_probe.train.loop import DataSources, lr_at, make_optimizer, run
from svd_probe.train.model import Encoder, MaskedLM, num_parameters, pretraining_parameters
from svd_probe.train.run_dir import save_encoder

# ---- parameter counts ----------------------------------------------------------------------------


@pytest.mark.slow
def test_parameter_counts_of_the_issue_presets():
    assert num_parameters(MaskedLM(preset("mha"))) == expected_parameters("mha", 30522, 256, 6, 8, 32, 1024)
    assert num_parameters(MaskedLM(preset("mla"))) == expected_parameters("mla", 30522, 256, 6, 8, 32, 1024, 64, 32)
    assert num_parameters(MaskedLM(preset("mla-o"))) == expected_parameters(
        "mla-o", 30522, 256, 6, 8, 32, 1024, 64, 32, 64
    )
    # The issue's shapes, literally.
    shapes = {n: tuple(p.shape) for n, p in MaskedLM(preset("mla")).named_parameters()}
    assert shapes["encoder.layers.0.attn.down.weight"] == (96, 256)
    assert shapes["encoder.layers.0.attn.q_up.weight"] == (256, 64)
    assert shapes["encoder.layers.0.attn.kv_up.weight"] == (512, 32)
    assert shapes["encoder.layers.0.ffn.gate_up.weight"] == (2048, 256)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_with_overrides(variant):
    cfg = build_config(
        variant,
        "tiny",
        {"n_layers": 3},
        {
            "d_model": 48,
            "n_heads": 3,
            "head_dim": 10,
            "rope_dims": 4,
            "q_latent": 12,
            "kv_latent": 6,
            "o_latent": 9,
            "ffn_dim": 70,
        },
    )
    want = expected_parameters(variant, cfg.vocab_size, 48, 3, 3, 10, 70, 12, 6, 9)
    assert num_parameters(MaskedLM(cfg)) == want


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_size_guard_counts_what_the_model_holds(variant):
    """pretraining_parameters (one meta block times n_layers) is the full model's count."""
    cfg = replace(preset(variant, "tiny"), n_layers=3)
    assert pretraining_parameters(cfg) == num_parameters(MaskedLM(cfg))


def test_lr_schedule_is_a_pure_function_of_the_step():
    # 100 steps, 6% warmup: 6 warmup steps to the peak, then linear decay to 0 at step 100.
    got = [lr_at(s, 100, 0.06, 1e-3) for s in (0, 2, 5, 6, 53, 99, 100)]
    want = [1e-3 / 6, 3e-3 / 6, 1e-3, 1e-3 * 94 / 94, 1e-3 * 47 / 94, 1e-3 * 1 / 94, 0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert lr_at(0, 10, 0.0, 0.5) == 0.5  # no warmup: at least one step, at the peak


@pytest.mark.parametrize("variant", VARIANTS)
def test_dry_run_json(variant, monkeypatch, capsys):
    code, out, err = cli_main(["train", "--variant", variant, "--dry-run", "--json"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(out)
    cfg = preset(variant)
    assert summary["parameters"] == expected_parameters(
        variant, 30522, 256, 6, 8, 32, 1024, cfg.q_latent, cfg.kv_latent, cfg.o_latent
    )
    assert summary["config"]["rope_dims"] == {"mha": 32, "mla": 16, "mla-o": 32}[variant]
    assert summary["shapes"]["encoder.embed.weight"] == [30522, 256]


# ---- data ----------------------------------------------------------------------------------------


def test_wikitext_unk_and_packing(inputs, tok):
    train, valid = D.read_wikitext_dir(inputs["wiki"])
    assert all("<unk>" not in ly and "@-@" not in ly for ly in train)
    rows = D.pack_sequences(tok, train, 32)
    assert rows.shape[1] == 32 and (rows[:, 0] == tok.cls_id).all() and (rows[:, -1] == tok.sep_id).all()
    assert (rows == tok.unk_id).any()  # <unk> became the tokenizer's [UNK], not "<", "un", ...


def test_masking_is_bert_style(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, tok.vocab_size, (400, 128), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    inputs, positions, targets = D.mask_tokens(ids, tok, g)
    assert positions.shape == (400, D.masked_count(128)) == (400, 19)
    assert ((positions > 0) & (positions < 127)).all()  # never [CLS] or [SEP]
    assert torch.equal(targets, torch.gather(ids, 1, positions))
    got = torch.gather(inputs, 1, positions)
    frac_mask = (got == tok.mask_id).float().mean().item()
    frac_kept = (got == targets).float().mean().item()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_kept < 0.13
    untouched = torch.ones_like(ids, dtype=torch.bool).scatter_(1, positions, False)
    assert torch.equal(inputs[untouched], ids[untouched])


def test_sst2_reading(inputs, tmp_path):
    (s, y), (ds, dy) = D.read_sst2_dir(inputs["sst2"])
    assert len(s) == 200 and len(ds) == 40 and set(y) == {0, 1}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\nok film\tpositive\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(TrainingInputError, match="label must be 0 or 1"):
        D.read_sst2_dir(bad)


# ---- learning ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_falls_within_a_few_dozen_steps(variant, inputs, tok):
    torch.manual_seed(0)
    cfg = replace(preset(variant, "tiny"), vocab_size=tok.vocab_size)
    rows = D.pack_sequences(tok, D.read_wikitext_dir(inputs["wiki"])[0], 32)
    model = MaskedLM(cfg)
    opt = make_optimizer(model, 3e-3, 0.01, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _step in range(40):
        idx = torch.randint(0, len(rows), (16,), generator=g)
        loss, _ = model(*D.mask_tokens(rows[idx], tok, g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("rope_dims", [32, 16, 0])
def test_rope_rotates_the_first_rope_dims_by_relative_position(rope_dims):
    from svd_probe.train.model import Rope

    rope = Rope(32, rope_dims, 10000.0, 64)
    g = torch.Generator().manual_seed(0)
    q1, k1 = (
        torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64),
    )
    q, k = (t.expand(1, 64, 1, 32).float() for t in (q1, k1))
    rq, rk = rope(q, k)
    torch.testing.assert_close(rq[..., rope_dims:], q[..., rope_dims:])  # dims past rope_dims untouched
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    scores = torch.einsum("btd,bsd->ts", rq[:, :, 0], rk[:, :, 0])
    # Same offset, same score: (R_i q)·(R_j k) depends on i - j only.
    torch.testing.assert_close(scores[3, 1], scores[40, 38], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[10, 10], (q1 * k1).sum().float(), rtol=1e-4, atol=1e-4)
    if rope_dims:
        assert not torch.allclose(scores[3, 1], scores[3, 2])


@pytest.mark.slow
def test_padding_does_not_change_the_first_token(tok):
    cfg = replace(preset("mla", "tiny"), vocab_size=tok.vocab_size)
    enc = Encoder(cfg).eval()
    ids, pad = D.pad_batch([[tok.cls_id, 7, 8, tok.sep_id]], tok.pad_id, multiple=16)
    with torch.no_grad():
        padded = enc(ids, pad)[0, 0]
        exact = enc(ids[:, :4])[0, 0]
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)


# ---- a whole run: outputs, round trip, resume ----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mla-o"
    metrics = run(preset("mla-o", "tiny"), small_recipe(), sources(inputs), out)
    return out, metrics


@pytest.mark.slow
def test_run_writes_every_output(finished_run):
    out, metrics = finished_run
    for name in ("model.safetensors", "config.json", "metrics.json", "train.log", "checkpoint.pt"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in (
        "parameters",
        "mlm_loss",
        "mlm_accuracy",
        "sst2_dev_accuracy",
        "pretrain_samples_per_s",
        "finetune_samples_per_s",
        "wall_time_s",
        "device",
        "seed",
        "git_commit",
        "variant",
        "config",
    ):
        assert key in on_disk, key
    assert (
        on_disk["variant"] == "mla-o"
        and 0 <= on_disk["sst2_dev_accuracy"] <= 1
        and on_disk["pretrain_samples_per_s"] > 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "svd_probe_encoder" and config["variant"] == "mla-o"
    assert "pretrain step 8/8" in (out / "train.log").read_text()
    # The data it saw, as the checkpoint records it for a resume: compare checks runs agree on it.
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert on_disk["data"] == state["data"] and len(on_disk["data"]["pretrain"]["sha256"]) == 64


def test_checkpoint_round_trips(finished_run, tok, tmp_path):
    # The run's files: config.json reads back as the config that ran (the preset, with the
    # tokenizer's vocabulary), and model.safetensors loads strictly into an Encoder of it.
    out, _ = finished_run
    cfg = build_config(None, "tiny", read_config_file(out / "config.json"))
    assert cfg == replace(preset("mla-o", "tiny"), vocab_size=tok.vocab_size)
    Encoder(cfg).load_state_dict(load_file(str(out / "model.safetensors")))  # strict: every name and shape
    # The values: a model with known random weights (norm weights off 1), saved as a run saves it,
    # comes back tensor for tensor, and the encoder read back computes what the original did.
    torch.manual_seed(3)
    model = MaskedLM(replace(preset("mla-o", "tiny"), vocab_size=50))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_encoder(model, model.encoder.cfg, tmp_path)
    back_cfg = build_config(None, "tiny", read_config_file(tmp_path / "config.json"))
    assert back_cfg == model.encoder.cfg
    back = Encoder(back_cfg)
    back.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    want = model.encoder.state_dict()
    assert back.state_dict().keys() == want.keys()
    for name, t in back.state_dict().items():
        assert torch.equal(t, want[name]), name
    ids = torch.randint(5, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model.encoder(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_resume_reaches_the_same_state(inputs, finished_run, tmp_path):
    straight_out, straight = finished_run
    out = tmp_path / "resumed"
    # Interrupt pretraining at step 3, then fine-tuning at step 5; each rerun resumes.
    stop = run(preset("mla-o", "tiny"), small_recipe(stop_after=3), sources(inputs), out)
    assert (stop["stopped"], stop["phase"], stop["step"]) == (True, "pretrain", 3)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    stop = run(preset("mla-o", "tiny"), small_recipe(stop_after=5), sources(inputs), out)
    assert (stop["stopped"], stop["phase"], stop["step"]) == (True, "finetune", 5)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "finetune" and state["step"] == 5
    resumed = run(preset("mla-o", "tiny"), small_recipe(), sources(inputs), out)

    a, b = load_file(str(straight_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = torch.load(straight_out / "checkpoint.pt", weights_only=True)
    fb = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])
    assert fa["optimizer"]["state"].keys() == fb["optimizer"]["state"].keys()
    for k in fa["optimizer"]["state"]:
        assert torch.equal(fa["optimizer"]["state"][k]["exp_avg"], fb["optimizer"]["state"][k]["exp_avg"])
    for key in ("mlm_loss", "mlm_accuracy", "sst2_dev_accuracy"):
        assert resumed[key] == straight[key], key


@pytest.mark.slow
def test_a_first_format_checkpoint_resumes(inputs, finished_run, tmp_path):
    """Checkpoints of the first lab held a LambdaLR state and no data fingerprint; they resume to
    the same weights (the learning rate is now a function of the step)."""
    straight_out, _ = finished_run
    out = tmp_path / "old"
    run(preset("mla-o", "tiny"), small_recipe(stop_after=3), sources(inputs, sst2_dir=None), out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("format", "data"):
        del state[key]
    state["scheduler"] = {"base_lrs": [3e-3, 3e-3], "last_epoch": 3, "_step_count": 4}
    torch.save(state, out / "checkpoint.pt")
    run(preset("mla-o", "tiny"), small_recipe(), sources(inputs, sst2_dir=None), out)
    a, b = load_file(str(straight_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "no data fingerprint" in (out / "train.log").read_text()


@pytest.mark.slow
def test_resume_at_the_phase_boundary(inputs, finished_run, tmp_path):
    """Pretraining alone first (no --sst2-dir), then the same run with SST-2: fine-tuning starts from
    the saved encoder and ends where the uninterrupted run ended."""
    _, straight = finished_run
    out = tmp_path / "two-steps"
    only_pretrain = run(preset("mla-o", "tiny"), small_recipe(), DataSources(str(inputs["vocab"]), inputs["wiki"]), out)
    assert only_pretrain["sst2_dev_accuracy"] is None and only_pretrain["mlm_accuracy"] == straight["mlm_accuracy"]
    both = run(preset("mla-o", "tiny"), small_recipe(), sources(inputs), out)
    assert both["sst2_dev_accuracy"] == straight["sst2_dev_accuracy"]


@pytest.mark.slow
def test_finetune_epochs_set_the_step_count(inputs, tmp_path):
    # 200 sentences in batches of 8: 25 steps an epoch, so 0.15 epochs -> ceil(3.75) = 4 steps.
    m = run(
        preset("mha", "tiny"),
        small_recipe(pretrain_steps=2, finetune_steps=None, finetune_epochs=0.15),
        sources(inputs),
        tmp_path / "ep",
    )
    assert m["train_config"]["finetune_steps"] == 4


def test_resume_refuses_a_different_recipe(inputs, finished_run):
    out, _ = finished_run
    with pytest.raises(TrainingInputError, match="different recipe"):
        run(preset("mla-o", "tiny"), small_recipe(lr=1e-2), sources(inputs), out)
    with pytest.raises(TrainingInputError, match="different model config"):
        run(preset("mla", "tiny"), small_recipe(), sources(inputs), out)


# ---- bad inputs: clear errors, non-zero exits, no traceback --------------------------------------


def test_bad_inputs_raise_training_input_errors(inputs, tmp_path):
    with pytest.raises(TrainingInputError, match="data folder not found"):
        run(
            preset("mha", "tiny"), small_recipe(), DataSources(str(inputs["vocab"]), tmp_path / "nope"), tmp_path / "o1"
        )
    with pytest.raises(TrainingInputError, match="tokenizer file not found"):
        D.load_tokenizer(str(tmp_path / "missing-vocab.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TrainingInputError, match="cannot load tokenizer"):
        D.load_tokenizer(str(empty))
    no_mask = tmp_path / "nomask.txt"
    no_mask.write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(TrainingInputError, match=r"sep_token not found|lacks the special tokens"):
        D.load_tokenizer(str(no_mask))
    with pytest.raises(TrainingInputError, match="unknown variant"):
        preset("gqa")
    with pytest.raises(TrainingInputError, match="rope_dims"):
        build_config("mla", "tiny", overrides={"rope_dims": 3})
    with pytest.raises(TrainingInputError, match="must be a number"):
        build_train_config({"lr": "fast"})
    for text, match in [
        ("{bad json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"hidden": 3}', "unknown keys: hidden"),
    ]:
        f = tmp_path / "cfg.json"
        f.write_text(text)
        with pytest.raises(TrainingInputError, match=match):
            read_config_file(f)
    with pytest.raises(TrainingInputError, match="SST-2 folder not found"):
        run(
            preset("mha", "tiny"),
            small_recipe(),
            DataSources(str(inputs["vocab"]), inputs["wiki"], sst2_dir=tmp_path / "no-sst"),
            tmp_path / "o2",
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # checked before writing anything
    with pytest.raises(TrainingInputError, match="no pretraining text"):
        run(preset("mha", "tiny"), small_recipe(), DataSources(str(inputs["vocab"])), tmp_path / "o3")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingInputError, match="cannot read the checkpoint"):
        run(preset("mha", "tiny"), small_recipe(), sources(inputs), broken)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "gqa", "--dry-run"], "unknown variant 'gqa'"),
        (["--config", "{BAD}", "--dry-run"], "not valid JSON"),
        (["--tokenizer", "/no/such/vocab.txt", "--data-dir", "{WIKI}", "--out", "{OUT}"], "tokenizer file not found"),
        (["--tokenizer", "{VOCAB}", "--data-dir", "/no/such/dir", "--out", "{OUT}"], "data folder not found"),
        (["--tokenizer", "{VOCAB}", "--data-dir", "{WIKI}"], "--out is required"),
    ],
)
def test_cli_errors_exit_nonzero_without_traceback(args, message, inputs, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    subst = {
        "{BAD}": str(bad),
        "{WIKI}": str(inputs["wiki"]),
        "{VOCAB}": str(inputs["vocab"]),
        "{OUT}": str(tmp_path / "out"),
    }
    code, out, err = cli_main(
        ["train", "--size", "tiny", "--device", "cpu", *[subst.get(a, a) for a in args]], monkeypatch, capsys
    )
    assert code == 2
    assert message in " ".join(err.split()) and "hint:" in err
    assert "Traceback" not in err + out


@pytest.mark.slow
def test_cli_train_and_compare(inputs, tmp_path, monkeypatch, capsys):
    base = [
        "train",
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--tokenizer",
        str(inputs["vocab"]),
        "--data-dir",
        str(inputs["wiki"]),
        "--sst2-dir",
        str(inputs["sst2"]),
        "--pretrain-steps",
        "3",
        "--finetune-steps",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps({"seq_len": 32, "finetune_batch_size": 4, "kv_latent": 4}))
    for variant, seed in [("mla", 0), ("mla", 1), ("mha", 0)]:
        code, out, err = cli_main(
            base
            + [
                "--config",
                str(cfg),
                "--variant",
                variant,
                "--seed",
                str(seed),
                "--out",
                str(tmp_path / "runs" / f"{variant}-{seed}"),
                "--json",
            ],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        metrics = json.loads(out)
        assert metrics["variant"] == variant and metrics["seed"] == seed and metrics["train_config"]["seq_len"] == 32
        if variant == "mla":
            assert metrics["config"]["kv_latent"] == 4
    rows = summarize(load_runs([tmp_path / "runs"]))
    assert [(r["variant"], r["n"], r["seeds"]) for r in rows] == [("mha", 1, [0]), ("mla", 2, [0, 1])]
    mla = [json.loads((tmp_path / "runs" / f"mla-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert rows[1]["mlm_accuracy"] == pytest.approx(sum(m["mlm_accuracy"] for m in mla) / 2)
    code, out, err = cli_main(
        [
            "compare",
            str(tmp_path / "runs" / "mla-0"),
            str(tmp_path / "runs" / "mla-1"),
            str(tmp_path / "runs" / "mha-0"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "mla" in out and "±" in out
    code, out, err = cli_main(["compare", str(tmp_path / "runs"), "--json"], monkeypatch, capsys)
    assert code == 0, err
    comp = json.loads(out)
    assert [r["latents"] for r in comp["configs"]] == ["rope16", "q16 kv4 rope8"]
    assert {(p["a"], p["b"], p["n"]) for p in comp["differences"]} == {("mla q16 kv4 rope8", "mha rope16", 1)}
    code, _, err = cli_main(["compare", str(tmp_path / "nothing-here")], monkeypatch, capsys)
    assert code == 2 and "run folder not found" in err


# ---- optional smoke test on the real data (CI has ../shared/data) --------------------------------

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "wikitext-2" / "wiki.valid.tokens").is_file(), reason="../shared/data is absent")
def test_smoke_on_shared_data(tmp_path):
    # The valid split stands in for the train split: a few seconds instead of a minute of tokenizing.
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    valid = (SHARED / "wikitext-2" / "wiki.valid.tokens").read_text()
    (wiki / "wiki.train.tokens").write_text(valid)
    (wiki / "wiki.valid.tokens").write_text("\n".join(valid.splitlines()[:300]))
    tok = D.load_tokenizer(str(SHARED / "vocab" / "bert-base-uncased-vocab.txt"))
    assert tok.vocab_size == 30522
    train, _ = D.read_wikitext_dir(wiki)
    assert (D.pack_sequences(tok, train[:200], 128) == tok.unk_id).any()
    (s, y), (ds, dy) = D.read_sst2_dir(SHARED / "SST-2")
    assert len(s) == 67349 and len(ds) == 872
    metrics = run(
        preset("mla-o", "tiny"),
        small_recipe(pretrain_steps=3, finetune_steps=2, seq_len=128),
        DataSources(str(SHARED / "vocab" / "bert-base-uncased-vocab.txt"), wiki, sst2_dir=SHARED / "SST-2"),
        tmp_path / "out",
    )
    assert metrics["config"]["vocab_size"] == 30522 and metrics["sst2_dev_accuracy"] is not None


@pytest.mark.slow
def test_fused_and_factored_shared_output_are_the_same_function():
    """mla-o applies o_up(o_down(x)) as x·(W_up·W_down)ᵀ for speed; values and the gradients of
    both factors must equal those of the two-step form (float64, so rounding cannot hide a bug)."""
    cfg = preset("mla-o", "tiny")
    torch.manual_seed(0)
    model = MaskedLM(cfg).double()
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    positions = torch.tensor([[1, 4, 7], [2, 3, 9]])
    targets = torch.gather(ids, 1, positions)
    results = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "fuse_shared_output"):
                m.fuse_shared_output = fused
        model.zero_grad()
        loss, _ = model(ids, positions, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "o_up" in n or "o_down" in n}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    assert g1.keys() == g2.keys() and len(g1) == 2 * cfg.n_layers
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-14), n
