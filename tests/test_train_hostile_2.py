"""A second adversarial pass over the training lab's inputs: run folders handed to `compare`,
config files and `--init-from` sources. Each case runs the command line as a user would and
ends with exit 2, a message naming the problem, no traceback, or with the right numbers; each
failed on the code before it (a traceback, a silently ignored value, a wrong statistic)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import cli_main, inputs_fixture, small_recipe, sources  # noqa: F401

from svd_probe.train.config import preset
from svd_probe.train.loop import run

# ---- compare: metrics.json as input --------------------------------------------------------------


def _metrics(variant: str = "mha", seed: int = 0, mlm: float = 0.3, sst2: float | None = 0.8) -> dict:
    cfg = preset(variant, "tiny").to_dict()
    return {
        "variant": variant,
        "objective": "mlm",
        "o_norm": "none",
        "seed": seed,
        "config": cfg,
        "train_config": {"pretrain_steps": 100, "seed": seed},
        "parameters": 123_456,
        "mlm_accuracy": mlm,
        "mlm_loss": 3.0,
        "sst2_dev_accuracy": sst2,
        "init_from": None,
    }


def _write_runs(root: Path, runs: list[dict]) -> Path:
    for i, m in enumerate(runs):
        (root / f"run{i}").mkdir(parents=True)
        (root / f"run{i}" / "metrics.json").write_text(json.dumps(m))
    return root


def _edit(**top):
    def apply(m: dict) -> None:
        m.update(top)

    return apply


def _edit_config(**fields):
    def apply(m: dict) -> None:
        m["config"].update(fields)

    return apply


@pytest.mark.parametrize(
    "edit, n, words",
    [
        (_edit(config="abc"), 1, "config is a str, not an object"),  # was: ValueError traceback
        (_edit(train_config=[1]), 1, "train_config is a list, not an object"),  # AttributeError
        (_edit(init_from="x"), 1, "init_from is 'x', not the record of a source run"),  # AttributeError
        # rich markup in a label: MarkupError traceback while the table was printed
        (_edit_config(q_latent="[/]"), 1, "config q_latent is '[/]', not a size"),
        (_edit(o_norm="[/]"), 1, "o_norm is '[/]', not one of none, rms, rms-per-head"),
        (_edit(objective="xyz"), 1, "objective is 'xyz', not one of mlm, clm"),  # KeyError
        (_edit(objective=["mlm"]), 1, "objective is ['mlm'], not one of mlm, clm"),  # unhashable list
        (_edit(mlm_accuracy=10**400), 1, "mlm_accuracy is 1000"),  # OverflowError in math.isfinite
        (_edit(parameters=10**400), 1, "parameters is 1000"),  # OverflowError in the table
        (_edit(mlm_loss=1e308), 2, "mlm_loss is 1e+308, not a finite number"),  # fsum overflow
        # silently wrong numbers, exit 0: a copied run counted as a second seed (n 2, std 0)
        # when its seed was 0.0 or missing, and a NaN dropped from the mean while n counted it
        (_edit(seed=0.0), 2, "seed is 0.0, not an integer >= 0"),
        (lambda m: m.pop("seed"), 2, "seed is None, not an integer >= 0"),
        (_edit(mlm_accuracy=float("nan")), 1, "mlm_accuracy is nan, not a fraction in [0, 1]"),
        (_edit(sst2_dev_accuracy=True), 1, "sst2_dev_accuracy is True, not a fraction in [0, 1]"),
        # the label said mha, the grouping used the config's mla
        (_edit_config(variant="mla"), 1, "variant is 'mha', its config's 'mla'"),
    ],
    ids=[
        "config-str",
        "train_config-list",
        "init_from-str",
        "latent-markup",
        "o_norm-markup",
        "objective-unknown",
        "objective-list",
        "accuracy-huge-int",
        "parameters-huge-int",
        "loss-1e308",
        "seed-float-copies",
        "seed-missing-copies",
        "accuracy-nan",
        "accuracy-bool",
        "variant-mismatch",
    ],
)
def test_compare_refuses_a_damaged_metrics_json(tmp_path, monkeypatch, capsys, edit, n, words):
    runs = []
    for _ in range(n):  # n copies of one run: a copy is no second seed
        m = _metrics()
        edit(m)
        runs.append(copy.deepcopy(m))
    root = _write_runs(tmp_path / "runs", runs)
    for extra in ([], ["--json"]):
        code, out, err = cli_main(["compare", str(root), *extra], monkeypatch, capsys)
        flat = " ".join(err.split())
        assert code == 2, (out, err)
        assert words in flat and "is not a metrics.json of svd-probe train" in flat, err
        assert "Traceback" not in err and "hint:" in err


def _data(pretrain: str = "a" * 64, sst2: str | None = "c" * 64) -> dict:
    record = {"tokenizer": {"source": "vocab.txt", "sha256": "t" * 64}}
    record["pretrain"] = {"source": f"wikitext-{pretrain[0]}", "sha256": pretrain}
    record["sst2"] = {"source": f"sst2-{sst2[0]}", "sha256": sst2} if sst2 else None
    return record


@pytest.mark.parametrize(
    "other, part",
    [(_data(pretrain="b" * 64), "pretrain"), (_data(sst2="d" * 64), "sst2")],
    ids=["pretrain", "sst2"],
)
def test_compare_refuses_runs_trained_on_different_data(tmp_path, monkeypatch, capsys, other, part):
    """metrics.json recorded no data: runs on WikiText-2 and on WikiText-103 (or two SST-2
    files) of one recipe were pooled into one mean ± std and paired, exit 0. Now each run
    records the fingerprint its checkpoint keeps, and compare refuses to set such runs together."""
    runs = [_metrics("mha", s) | {"data": _data()} for s in range(2)]
    runs += [_metrics("mha", 2) | {"data": other}]
    root = _write_runs(tmp_path / "runs", runs)
    code, out, err = cli_main(["compare", str(root)], monkeypatch, capsys)
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, (out, err)
    assert f"were trained on different {part} data" in flat and str(root / "run2") in flat, err
    assert "compare the runs of each dataset separately" in flat


def test_compare_pools_runs_that_record_no_data_or_no_sst2(tmp_path, monkeypatch, capsys):
    """An earlier svd-probe's run (no data record) and a run not fine-tuned (no SST-2) pool with
    runs on the same data; a data record that is not one train writes is refused."""
    runs = [_metrics("mha", 0) | {"data": _data()}, _metrics("mha", 1, sst2=None) | {"data": _data(sst2=None)}]
    runs += [_metrics("mha", 2)]
    root = _write_runs(tmp_path / "runs", runs)
    code, out, err = cli_main(["compare", str(root), "--json"], monkeypatch, capsys)
    assert code == 0, err
    (row,) = json.loads(out)["configs"]
    assert row["seeds"] == [0, 1, 2] and row["sst2_dev_accuracy_n"] == 2
    bad = _write_runs(tmp_path / "bad", [_metrics("mha", 0) | {"data": {"pretrain": "wikitext"}}])
    code, out, err = cli_main(["compare", str(bad)], monkeypatch, capsys)
    assert code == 2 and "data is {'pretrain': 'wikitext'}, not the" in " ".join(err.split()), err


def test_compare_reports_no_std_for_one_seed_and_counts_each_metric(tmp_path, monkeypatch, capsys):
    """One seed printed "22.73 ± 0.00" (std 0.0 in --json: seeds that agreed), and a metric that
    only some of a configuration's runs measured (SST-2 on one of three) was shown under the
    row's n as if all had, again "± 0.00". Now: no std below 2 values, "(1 seed)" in the table,
    and each metric's own count (`_n`), shown where it is fewer than n."""
    runs = [_metrics("mha", s, 0.20 + s / 100, 0.6 if s == 0 else None) for s in range(3)]
    runs += [_metrics("mla", 0, 0.25, 0.7)]
    runs += [_metrics("mla-o", s, 0.3 + s / 100, 0.5 + s / 10 if s < 2 else None) for s in range(3)]
    root = _write_runs(tmp_path / "runs", runs)
    code, out, err = cli_main(["compare", str(root), "--json"], monkeypatch, capsys)
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads(out)["configs"]}
    mha, mla, mlao = rows["mha"], rows["mla"], rows["mla-o"]
    assert (mha["n"], mha["mlm_accuracy_n"], mha["sst2_dev_accuracy_n"]) == (3, 3, 1)
    assert mha["mlm_accuracy_std"] == pytest.approx(0.01)
    assert mha["sst2_dev_accuracy"] == pytest.approx(0.6) and mha["sst2_dev_accuracy_std"] is None
    assert mla["n"] == 1 and mla["mlm_accuracy_std"] is None and mla["sst2_dev_accuracy_std"] is None
    assert mlao["sst2_dev_accuracy_n"] == 2 and mlao["sst2_dev_accuracy_std"] == pytest.approx(0.1 / 2**0.5)
    code, out, err = cli_main(["compare", str(root)], monkeypatch, capsys)
    assert code == 0, err
    configs = out.split("differences")[0]  # the first table; its label column folds (n left blank)
    rows_text = [line.split("│") for line in configs.splitlines() if line.count("│") == 6]
    cells = {r[1].split()[0]: [c.strip() for c in r[4:6]] for r in rows_text if r[2].strip()}
    assert cells == {
        "mha": ["21.00 ± 1.00", "60.00 (1 seed)"],
        "mla": ["25.00 (1 seed)", "70.00 (1 seed)"],
        "mla-o": ["31.00 ± 1.00", "55.00 ± 7.07 (2 seeds)"],
    }
    assert "± 0.00" not in out


# ---- --config files ------------------------------------------------------------------------------


TINY = ["--size", "tiny", "--dry-run", "--json"]


def _dry(monkeypatch, capsys, *args: str) -> tuple[int, dict | None, str]:
    code, out, err = cli_main(["train", *TINY, *args], monkeypatch, capsys)
    return code, (json.loads(out)["config"] if code == 0 else None), " ".join(err.split())


@pytest.mark.parametrize(
    "values, words",
    [
        ({"hidden_size": 128, "num_hidden_layers": 4}, "has hidden_size 128 but no d_model"),
        ({"d_model": 64, "hidden_size": 128}, "has hidden_size 128 but its d_model 64"),
        ({"n_heads": 4, "num_attention_heads": 8}, "has num_attention_heads 8 but its n_heads 4"),
    ],
)
def test_a_config_files_generic_names_must_say_what_its_fields_say(tmp_path, monkeypatch, capsys, values, words):
    """The generic names of a run's config.json (hidden_size, ...) were dropped in silence: a
    config of {"hidden_size": 128, "num_hidden_layers": 4} trained a 64-wide 2-layer model."""
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(values))
    code, cfg, err = _dry(monkeypatch, capsys, "--config", str(f))
    assert code == 2 and words in err and "Traceback" not in err, err
    # a config.json a run wrote (both spellings, equal) is still a config
    f.write_text(json.dumps({**preset("mla", "tiny").to_dict(), "hidden_size": 64, "num_hidden_layers": 2}))
    code, cfg, err = _dry(monkeypatch, capsys, "--config", str(f))
    assert code == 0 and cfg is not None and (cfg["variant"], cfg["d_model"]) == ("mla", 64), err


@pytest.mark.parametrize("variant", [False, "", 0])
def test_a_config_files_variant_of_the_wrong_kind_is_refused_not_read_as_mha(tmp_path, monkeypatch, capsys, variant):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"variant": variant}))
    code, cfg, err = _dry(monkeypatch, capsys, "--config", str(f))
    assert code == 2 and "variant" in err and "Traceback" not in err, (cfg, err)


# ---- --init-from ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mla_source(inputs, tmp_path_factory) -> Path:
    """A finished tiny mla run (2 pretraining steps, no fine-tuning): an --init-from source."""
    out = tmp_path_factory.mktemp("source") / "mla"
    run(preset("mla", "tiny"), small_recipe(pretrain_steps=2), sources(inputs, sst2_dir=None), out)
    assert (out / "model.safetensors").is_file()
    return out


def _init(monkeypatch, capsys, inputs, source: Path, *args: str) -> tuple[int, dict | None, str]:
    return _dry(monkeypatch, capsys, "--tokenizer", str(inputs["vocab"]), "--init-from", str(source), *args)


def test_init_from_takes_the_config_files_model_fields(inputs, mla_source, tmp_path, monkeypatch, capsys):
    """With --init-from, a --config file's model fields were ignored in silence: its o_norm rms
    and o_latent 8 trained o_norm none and o_latent 16, and its d_model 32 (not the source's 64)
    or variant mha went unremarked. They now rank under the flags, as without --init-from."""
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"o_norm": "rms", "o_latent": 8, "lr": 1e-3}))
    code, cfg, err = _init(monkeypatch, capsys, inputs, mla_source, "--config", str(f))
    assert code == 0 and cfg is not None, err
    assert (cfg["variant"], cfg["o_norm"], cfg["o_latent"]) == ("mla-o", "rms", 8)
    code, cfg, err = _init(monkeypatch, capsys, inputs, mla_source, "--config", str(f), "--o-norm", "none")
    assert code == 0 and cfg is not None and (cfg["o_norm"], cfg["o_latent"]) == ("none", 8), err  # the flag wins
    for values, words in [
        ({"d_model": 32}, "--init-from takes d_model from the source run (64), not 32 (the --config file's)"),
        ({"rope_theta": 500.0}, "takes rope_theta from the source run (10000.0), not 500.0"),
        ({"variant": "mha"}, "--init-from builds mla-o, not 'mha'"),
    ]:
        f.write_text(json.dumps(values))
        code, _, err = _init(monkeypatch, capsys, inputs, mla_source, "--config", str(f))
        assert code == 2 and words in err and "Traceback" not in err, (values, err)
        assert f"from{f}" in "".join(err.split())  # the hint names the file (rich wraps long paths)
    f.write_text(json.dumps({"o_latent": "8"}))  # was a TypeError traceback in the rank check
    code, _, err = _init(monkeypatch, capsys, inputs, mla_source, "--config", str(f))
    assert code == 2 and "o_latent must be a positive integer, got '8'" in err and "Traceback" not in err, err


def test_init_from_refuses_a_latent_of_zero(inputs, mla_source, monkeypatch, capsys):
    """--o-latent 0 was taken for "not given" (`or`) and trained o_latent d/4 in silence; without
    --init-from the same flag is refused."""
    code, cfg, err = _init(monkeypatch, capsys, inputs, mla_source, "--o-latent", "0")
    assert code == 2 and "o_latent must be a positive integer, got 0" in err and "Traceback" not in err, cfg
    code, cfg, err = _init(monkeypatch, capsys, inputs, mla_source, "--o-latent", "4")
    assert code == 0 and cfg is not None and cfg["o_latent"] == 4, err


def _filled(name: str, value: float):
    def damage(t: dict) -> dict:
        t[name].view(-1)[3:5] = value
        return t

    return damage


@pytest.mark.parametrize(
    "damage, words",
    [
        (_filled("layers.0.attn.o_proj.weight", float("nan")), "layers.0.attn.o_proj.weight holds NaN or infinite"),
        (_filled("layers.1.attn.kv_up.weight", float("inf")), "layers.1.attn.kv_up.weight holds NaN or infinite"),
        (
            lambda t: {k: (v * 100).to(torch.int64) for k, v in t.items()},
            "embed.weight holds int64 values, not floating-point weights",
        ),
        (lambda t: {**t, "junk": torch.zeros(3)}, "not of this model: junk"),
    ],
    ids=["nan", "inf", "int64", "extra-tensor"],
)
def test_init_from_refuses_weights_no_run_writes(inputs, mla_source, tmp_path, monkeypatch, capsys, damage, words):
    """A NaN or infinity in the source's W_O ended the SVD in a LinAlgError traceback (and one
    in a copied tensor was trained on); int64 weights trained silently; an extra tensor was
    refused without being named."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    shutil.copytree(mla_source, source)
    tensors = damage(load_file(source / "model.safetensors"))
    save_file(tensors, source / "model.safetensors")
    code, _, err = _init(monkeypatch, capsys, inputs, source)
    assert code == 2 and words in err and "Traceback" not in err, err
    out = tmp_path / "run"
    args = ["--tokenizer", str(inputs["vocab"]), "--data-dir", str(inputs["wiki"]), "--device", "cpu"]
    args += ["--pretrain-steps", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--out", str(out)]
    code, _, err = cli_main(["train", "--init-from", str(source), *args], monkeypatch, capsys)
    assert code == 2 and words in " ".join(err.split()) and "Traceback" not in err, err
    assert not out.exists()


# ---- sweep --init-from ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mha_source(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source") / "mha"
    run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), sources(inputs, sst2_dir=None), out)
    return out


def _sweep_plan(monkeypatch, capsys, inputs, tmp_path, *args: str) -> tuple[int, dict | None, str]:
    argv = ["sweep", "--size", "tiny", "--variant", "mla-o", "--out", str(tmp_path / "sw"), "--dry-run", "--json"]
    code, out, err = cli_main([*argv, "--tokenizer", str(inputs["vocab"]), *args], monkeypatch, capsys)
    return code, (json.loads(out) if code == 0 else None), err


def test_sweep_names_runs_after_the_init_from_train_takes(
    inputs, mla_source, mha_source, tmp_path, monkeypatch, capsys
):
    """Given twice, --init-from is the last one for train's parser, but the sweep's own scan took
    the first: the folders said init-mha for runs started from the mla source. And with `{seed}`,
    the first seed's source named every seed's folder, whatever the others' variants."""
    args = ("--seeds", "0", "--init-from", str(mha_source), "--init-from", str(mla_source))
    code, plan, err = _sweep_plan(monkeypatch, capsys, inputs, tmp_path, *args)
    assert code == 0 and plan is not None, err
    (r,) = plan["runs"]
    assert "init-mla" in r["name"] and r["command"][r["command"].index("--init-from") + 3] == str(mla_source)
    per_seed = tmp_path / "per-seed"
    shutil.copytree(mla_source, per_seed / "seed-0")
    shutil.copytree(mha_source, per_seed / "seed-1")
    args = ("--seeds", "0,1", "--init-from", str(per_seed / "seed-{seed}"))
    code, plan, err = _sweep_plan(monkeypatch, capsys, inputs, tmp_path, *args)
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, (plan, err)
    assert "sources of different variants: seed 0: mla, seed 1: mha" in flat, err


def test_a_bad_shard_is_named_in_a_short_message():
    """`--shard` of 5,000 digits was echoed whole in its refusal (a job array's variable gone
    wrong fills the terminal); the message shows the start of it."""
    from svd_probe.errors import TrainingInputError
    from svd_probe.train.sweep import parse_shard

    with pytest.raises(TrainingInputError) as e:
        parse_shard("1" * 5000 + "/2")
    first = str(e.value).splitlines()[0]  # the message; the hint follows
    assert len(first) < 100 and first.startswith("bad --shard '111")
