"""The training lab against inputs it does not control: run folders, data files, configs, flags.

Every case ends in a `TrainingInputError` that names the problem (and, on the command line, exit 2
with a hint and no traceback), or works correctly; no user file is overwritten.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_fixtures import cli_main, cli_train_args, inputs_fixture, small_recipe, sources  # noqa: F401

from svd_probe.errors import TrainingInputError
from svd_probe.train import data as D
from svd_probe.train.config import build_config, build_train_config, preset, read_config_file
from svd_probe.train.loop import DataSources, run

# ---- the run folder ------------------------------------------------------------------------------


@pytest.mark.slow
def test_out_refuses_a_folder_that_holds_other_files(inputs, tmp_path):
    """A downloaded checkpoint in --out is never overwritten; --overwrite replaces only our files."""
    out = tmp_path / "downloaded"
    out.mkdir()
    theirs = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"\x08\x00weights", "README.md": b"mine"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    with pytest.raises(TrainingInputError, match="not empty") as e:
        run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), sources(inputs, sst2_dir=None), out)
    assert "--overwrite" in (e.value.hint or "")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs  # untouched, nothing added
    m = run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), sources(inputs, sst2_dir=None), out, overwrite=True)
    assert m["variant"] == "mha" and (out / "README.md").read_bytes() == b"mine"
    assert json.loads((out / "config.json").read_text())["model_type"] == "svd_probe_encoder"


def test_out_naming_a_file(inputs, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(TrainingInputError, match="is a file"):
        run(preset("mha", "tiny"), small_recipe(), sources(inputs), f)
    assert f.read_text() == "x"


@pytest.mark.slow
def test_a_run_of_another_config_is_refused_then_overwritten_on_request(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = cli_main(cli_train_args(inputs, out, "--variant", "mla"), monkeypatch, capsys)
    assert code == 0, err
    before = (out / "model.safetensors").read_bytes()
    code, _, err = cli_main(cli_train_args(inputs, out, "--variant", "mha"), monkeypatch, capsys)
    assert code == 2 and "different model config" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "model.safetensors").read_bytes() == before
    code, _, err = cli_main(cli_train_args(inputs, out, "--variant", "mha", "--overwrite"), monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["variant"] == "mha"


@pytest.mark.slow
def test_a_run_that_never_checkpointed_is_started_again(inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("2026-01-01 00:00:00 run mha seed=0\n")  # killed before step 1
    run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), sources(inputs, sst2_dir=None), out)
    assert (out / "train.log").read_text().startswith("2026-01-01")  # appended to, not replaced


def test_stop_after_zero_is_refused(inputs, tmp_path):
    with pytest.raises(TrainingInputError, match="stop_after"):
        run(preset("mha", "tiny"), small_recipe(stop_after=0), sources(inputs), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- data files ----------------------------------------------------------------------------------


def test_binary_wikitext_file(inputs, tmp_path):
    wiki = tmp_path / "wiki"
    shutil.copytree(inputs["wiki"], wiki)
    (wiki / "wiki.train.tokens").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(TrainingInputError, match="not UTF-8 text"):
        D.read_wikitext_dir(wiki)


@pytest.mark.parametrize(
    "content,match",
    [
        (bytes(range(256)) * 8, "not UTF-8 text"),
        (b"sentence\tlabel\nnice\x00film\t1\n", "not UTF-8 text"),  # a NUL byte: binary
        (b"sentence\tlabel\nbad film\t-1\n", "label must be 0 or 1"),
        (b"sentence\tlabel\nhuge film\t100000000\n", "label must be 0 or 1"),
        (b"sentence\tlabel\nfilm\t" + b"9" * 5000 + b"\n", "label must be 0 or 1"),
        # A tab inside a sentence: its second half was read as the label, here 0 for the row's 1.
        (b"sentence\tlabel\nrated\t0\t1\n", "3 fields where the header has 2"),
        (b"sentence\tlabel\nfilm\n", "1 fields where the header has 2"),
    ],
    ids=["binary", "nul", "minus-one", "1e8", "5000-digits", "tab-in-sentence", "one-field"],
)
def test_bad_sst2_files(tmp_path, content, match):
    d = tmp_path / "sst"
    d.mkdir()
    (d / "train.tsv").write_bytes(content)
    (d / "dev.tsv").write_bytes(b"sentence\tlabel\nok\t1\n")
    with pytest.raises(TrainingInputError, match=match):
        D.read_sst2_dir(d)


def test_a_huge_label_allocates_nothing(inputs, tmp_path):
    """Before: a label of 1e8 built a 1e8-way head (25.6 GB). Now the file is refused on reading."""
    d = tmp_path / "sst"
    shutil.copytree(inputs["sst2"], d)
    with (d / "dev.tsv").open("a") as f:
        f.write("the film \t100000000\n")
    with pytest.raises(TrainingInputError, match=r"dev.tsv:\d+: label must be 0 or 1"):
        run(preset("mha", "tiny"), small_recipe(), sources(inputs, sst2_dir=d), tmp_path / "o")


# ---- configs and flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"variant": {"a": 1}}', "variant must be a string"),
        ("[" * 100_000 + "]" * 100_000, "JSON object|nested too deeply"),
        ('{"d_model": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply|d_model"),
        ('{"norm_eps": NaN}', "norm_eps must be a finite positive number"),
        ('{"rope_theta": Infinity}', "rope_theta must be a finite positive number"),
        ('{"n_layers": ' + "7" * 5000 + "}", "not valid JSON|n_layers"),
        ('{"finetune_epochs": 1e400}', "finetune_epochs must be a finite number"),
        ('{"lr": {"peak": 0.1}}', "lr must be a number"),
        ('{"warmup_frac": NaN}', "warmup_frac"),
        ('{"d_model": 8192, "n_layers": 1000}', "parameters"),
        ('{"d_model": 100000}', "d_model must be at most"),
        ('{"max_seq_len": 1000000000}', "max_seq_len"),
    ],
)
def test_bad_config_files(tmp_path, text, match):
    f = tmp_path / "cfg.json"
    f.write_text(text)
    with pytest.raises(TrainingInputError, match=match):
        values = read_config_file(f)
        build_config(None, "tiny", values)
        build_train_config(values)


def test_config_file_not_utf8(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(TrainingInputError, match="not valid JSON"):
        read_config_file(f)


def _stat_says_regular(monkeypatch, path, size: int = 2) -> None:
    """os.stat calls `path` a regular file of `size` bytes: what a check saw before the file grew,
    or before a pipe was put in its place. The file itself is not touched."""
    import os
    import stat

    real = os.stat

    def stat_then(p, *args, **kw):
        st = real(p, *args, **kw)
        if isinstance(p, int) or os.fspath(p) != str(path):
            return st
        values = list(st[:10])
        values[stat.ST_MODE], values[stat.ST_SIZE] = stat.S_IFREG | 0o644, size
        return os.stat_result(values)

    monkeypatch.setattr(os, "stat", stat_then)


class _Blocked(BaseException):
    """Raised by the alarm in a read that blocks (not an OSError: no reader may catch it)."""


def _within(seconds: float):
    """A context in which a blocking call is interrupted after `seconds` (a hang fails the test)."""
    import contextlib
    import signal

    def blocked(*_):
        raise _Blocked(f"blocked for {seconds} s")

    @contextlib.contextmanager
    def alarm():
        before = signal.signal(signal.SIGALRM, blocked)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, before)

    return alarm()


def test_a_config_file_is_read_bounded_and_a_pipe_never_blocks(tmp_path, monkeypatch):
    """read_config_file stat()ed the size, then read the file whole: a config that grew after the
    stat (or was replaced) was read whole, and a FIFO put in its place after the check blocked the
    read for good. It now reads at most CONFIG_FILE_MAX_BYTES + 1 bytes through a non-blocking
    open, as read_metrics does (one reader, config._read_json_object). Here the stat is made to
    say what it saw before the change; the files are real."""
    import os
    from pathlib import Path

    from svd_probe.train.config import CONFIG_FILE_MAX_BYTES, read_metrics

    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(CONFIG_FILE_MAX_BYTES + 1)
    with pytest.raises(TrainingInputError, match=r"config file .*big.json is over 1 MiB, too large"):
        read_config_file(big)

    grown = tmp_path / "grown.json"
    with open(grown, "wb") as f:
        f.truncate(64 << 20)
    io = Path("/proc/self/io")
    rchar = (lambda: int(io.read_text().split("rchar:")[1].split()[0])) if io.exists() else (lambda: 0)
    with monkeypatch.context() as m:
        _stat_says_regular(m, grown)
        before = rchar()
        with pytest.raises(TrainingInputError, match="is over 1 MiB"):
            read_config_file(grown)
        assert rchar() - before < 4 << 20  # the old reader took all 64 MiB

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for read, name in ((read_config_file, "config file "), (read_metrics, "")):
        with _within(5):
            with pytest.raises(TrainingInputError, match=f"{name}{fifo} is not a regular file"):
                read(fifo)
            with monkeypatch.context() as m:  # a pipe swapped in after the stat: the open itself never blocks
                _stat_says_regular(m, fifo)
                with pytest.raises(TrainingInputError, match="is not a regular file"):
                    read(fifo)
    with pytest.raises(TrainingInputError, match=r"config file .* is not a regular file"):
        read_config_file(tmp_path)
    with pytest.raises(TrainingInputError, match="not found"):
        read_config_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("finetune_lr", float("inf")),
        ("weight_decay", float("nan")),
        ("weight_decay", -0.1),
        ("warmup_frac", float("nan")),
        ("finetune_epochs", float("inf")),
    ],
)
def test_non_finite_recipe_values(field, value):
    with pytest.raises(TrainingInputError, match=field):
        build_train_config(overrides={field: value})


@pytest.mark.slow
def test_cli_lr_inf(inputs, tmp_path, monkeypatch, capsys):
    code, out, err = cli_main(cli_train_args(inputs, tmp_path / "o", "--lr", "inf"), monkeypatch, capsys)
    assert code == 2 and "lr must be a finite positive number" in err and "hint:" in err
    assert "Traceback" not in out + err and not (tmp_path / "o").exists()


def test_a_diverging_run_stops_with_a_typed_error(inputs, tmp_path):
    """lr 1e30 is finite, so it passes validation; the weights blow up within a few steps. The run
    ends with an error naming the step, writes no model or metrics, and keeps no non-finite checkpoint."""
    out = tmp_path / "diverged"
    with pytest.raises(TrainingInputError, match="non-finite") as e:
        run(preset("mha", "tiny"), small_recipe(lr=1e30, warmup_frac=0.0, log_every=1), sources(inputs), out)
    assert "--lr" in (e.value.hint or "")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---- resuming against other data -----------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_other_data_and_names_both(inputs, tmp_path):
    out = tmp_path / "run"
    recipe = small_recipe(pretrain_steps=4, stop_after=2)
    assert run(preset("mha", "tiny"), recipe, sources(inputs), out)["stopped"]
    other = tmp_path / "other-wiki"
    shutil.copytree(inputs["wiki"], other)
    (other / "wiki.train.tokens").write_text((other / "wiki.train.tokens").read_text().replace("cat", "dog"))
    with pytest.raises(TrainingInputError, match="different pretraining data") as e:
        run(preset("mha", "tiny"), recipe, sources(inputs, data_dir=other), out)
    assert str(inputs["wiki"]) in e.value.message and str(other) in e.value.message
    # The same files under another path are the same data: the run resumes.
    moved = tmp_path / "moved-wiki"
    shutil.copytree(inputs["wiki"], moved)
    assert run(preset("mha", "tiny"), recipe, sources(inputs, data_dir=moved), out)["stopped"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # pretraining finished, fine-tuning began
    assert (state["phase"], state["step"]) == ("finetune", 2) and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_refuses_another_tokenizer_or_sst2(inputs, tmp_path):
    out = tmp_path / "run"
    recipe = small_recipe(pretrain_steps=2, finetune_steps=4, stop_after=2)
    run(preset("mha", "tiny"), recipe, sources(inputs), out)  # pretraining done
    run(preset("mha", "tiny"), recipe, sources(inputs), out)  # fine-tuning at step 2 of 4
    vocab = tmp_path / "vocab.txt"
    words = inputs["vocab"].read_text().split()
    vocab.write_text("\n".join(words[:5] + list(reversed(words[5:]))) + "\n")  # same size, other ids
    with pytest.raises(TrainingInputError, match="different tokenizer"):
        run(preset("mha", "tiny"), recipe, sources(inputs, tokenizer=str(vocab)), out)
    sst = tmp_path / "sst"
    shutil.copytree(inputs["sst2"], sst)
    (sst / "train.tsv").write_text((sst / "train.tsv").read_text().replace("\t1", "\t0"))
    with pytest.raises(TrainingInputError, match="different SST-2 data"):
        run(preset("mha", "tiny"), recipe, sources(inputs, sst2_dir=sst), out)


@pytest.mark.slow
def test_sst2_may_be_added_after_pretraining(inputs, tmp_path):
    out = tmp_path / "run"
    run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), DataSources(str(inputs["vocab"]), inputs["wiki"]), out)
    m = run(preset("mha", "tiny"), small_recipe(pretrain_steps=2), sources(inputs), out)
    assert m["sst2_dev_accuracy"] is not None


@pytest.mark.parametrize(
    "content,match",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"variant": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"[]", "not a metrics.json"),
    ],
)
def test_compare_reads_bad_metrics_files_as_errors(tmp_path, content, match):
    from svd_probe.train.compare import load_runs

    (tmp_path / "metrics.json").write_bytes(content)
    with pytest.raises(TrainingInputError, match=match):
        load_runs([tmp_path])


def test_compare_reads_a_bounded_metrics_file(tmp_path):
    """A huge metrics.json (sparse: no disk used) or one that is a folder is refused, unread."""
    from svd_probe.train.compare import load_runs
    from svd_probe.train.config import MAX_METRICS_BYTES

    with open(tmp_path / "metrics.json", "wb") as f:
        f.truncate(MAX_METRICS_BYTES + 1)
    with pytest.raises(TrainingInputError, match="over 16 MiB"):
        load_runs([tmp_path])
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "run" / "metrics.json").mkdir(parents=True)
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "metrics.json").write_text("{}")
    with pytest.raises(TrainingInputError, match="run2/metrics.json is not a metrics.json"):
        load_runs([tmp_path])  # the folder named metrics.json is no run: only run2 is read


def test_a_vocab_with_repeated_lines_sizes_the_embedding_by_its_largest_id(inputs, tmp_path):
    """WordPiece gives a repeated line's number to its last copy, so ids run past the count of
    distinct tokens; the model needs a row for each id up to the largest (it crashed before)."""
    lines = inputs["vocab"].read_text().splitlines()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(lines + lines[-20:]) + "\n")
    tok = D.load_tokenizer(str(vocab))
    assert tok.vocab_size == len(lines) + 20 and tok.tokenizer.get_vocab_size() == len(lines)
    assert max(max(ids) for ids in tok.encode_batch([" ".join(lines[-20:])])) == len(lines) + 19
    m = run(
        preset("mha", "tiny"),
        small_recipe(pretrain_steps=2),
        sources(inputs, tokenizer=str(vocab), sst2_dir=None),
        tmp_path / "o",
    )
    assert m["variant"] == "mha"


def test_a_tokenizer_with_a_huge_id_is_refused(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(D.SPECIAL_TOKENS)} | {"far": D.MAX_VOCAB}
    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    with pytest.raises(TrainingInputError, match="token ids up to 1,048,576; the lab takes at most 1,048,576"):
        D.load_tokenizer(str(path))
    vocab["far"] = D.MAX_VOCAB - 1  # the largest id the limit allows
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    assert D.load_tokenizer(str(path)).vocab_size == D.MAX_VOCAB


def test_a_vocabulary_past_the_bound_is_refused_before_it_is_loaded(inputs, tmp_path, monkeypatch, capsys):
    """A vocab.txt's lines are its token ids, so the embedding's rows. One past MAX_VOCAB was
    handed whole to `tokenizers` and refused only once loaded (a 207 MB file of 25 million lines:
    9.4 GB and two minutes first); its lines are now counted before, and no tokenizer or model is
    built. A config's vocab_size (all that --dry-run sizes the model by) has the same bound."""
    import tokenizers

    from svd_probe.train import loop

    vocab = tmp_path / "vocab.txt"
    with open(vocab, "w") as f:
        f.write("\n".join(D.SPECIAL_TOKENS) + "\n")
        f.writelines(f"t{i:x}\n" for i in range(D.MAX_VOCAB + 1 - len(D.SPECIAL_TOKENS)))
    built: list[str] = []
    real_tok, real_model = tokenizers.BertWordPieceTokenizer, loop.pretraining_model
    monkeypatch.setattr(tokenizers, "BertWordPieceTokenizer", lambda *a, **k: built.append("tok") or real_tok(*a, **k))
    monkeypatch.setattr(loop, "pretraining_model", lambda *a, **k: built.append("model") or real_model(*a, **k))
    out = tmp_path / "run"
    code, _, err = cli_main(cli_train_args({**inputs, "vocab": vocab}, out), monkeypatch, capsys)
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err
    assert f"{vocab} has 1,048,577 tokens (one a line); the lab takes at most 1,048,576" in flat, err
    assert "hint: use a vocabulary of at most 1,048,576 tokens" in flat
    assert built == [] and not out.exists()
    # --dry-run sizes the model by the tokenizer a run would load: refused the same way
    code, out_text, err = cli_main(["train", "--tokenizer", str(vocab), "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "has 1,048,577 tokens" in " ".join(err.split()) and "Traceback" not in err, err
    assert "parameters" not in out_text

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"vocab_size": D.MAX_VOCAB + 1}))
    code, out_text, err = cli_main(["train", "--config", str(config), "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "vocab_size must be at most 1,048,576, got 1,048,577" in " ".join(err.split()), err
    assert "Traceback" not in err and "parameters" not in out_text


def test_the_vocabulary_bound_counts_what_tokenizers_numbers(inputs, tmp_path, monkeypatch):
    """The line count is the size `tokenizers` gives a vocab.txt (repeated and blank lines, CRLF,
    no final newline), so the bound refuses nothing it would take; at the bound a vocabulary is
    taken, one token past it refused."""
    from tokenizers import BertWordPieceTokenizer

    lines = inputs["vocab"].read_text().splitlines()
    path = tmp_path / "vocab.txt"
    for text in (
        "\n".join(lines) + "\n",
        "\n".join(lines),  # the last line has no newline
        "\r\n".join(lines) + "\r\n",
        "\n".join(lines + lines[-3:] + ["", "", "x"]) + "\n\n",
    ):
        path.write_bytes(text.encode())
        ids = BertWordPieceTokenizer(str(path)).get_vocab(with_added_tokens=True).values()
        assert D.count_vocab_lines(path) == max(ids) + 1 == D.load_tokenizer(str(path)).vocab_size
    monkeypatch.setattr(D, "MAX_VOCAB", len(lines))
    assert D.load_tokenizer(str(inputs["vocab"])).vocab_size == len(lines)
    path.write_text("\n".join([*lines, "past"]))
    with pytest.raises(TrainingInputError, match=f"has {len(lines) + 1:,} tokens \\(one a line\\)"):
        D.load_tokenizer(str(path))


# ---- a damaged checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(inputs, tmp_path_factory):
    """A run stopped after 2 of 8 pretraining steps: its checkpoint.pt is the one to damage."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    m = run(preset("mha", "tiny"), small_recipe(stop_after=2), sources(inputs, sst2_dir=None), out)
    assert m["stopped"] and m["step"] == 2
    return out


def _embed_wrong(ck):
    ck["model"]["encoder.embed.weight"] = torch.zeros(10, 4)


def _one_weight_fewer(ck):
    del ck["model"][next(iter(ck["model"]))]


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda ck: ck.pop("model"), "pretrain step 2 without weights"),
        (lambda ck: ck.pop("rng"), "holds weights but no rng"),
        (lambda ck: ck.update(rng={}), "does not fit this run's pretrain model"),
        (_embed_wrong, "does not fit this run's pretrain model: Error.s. in loading state_dict"),
        (_one_weight_fewer, "does not fit this run's pretrain model"),
        (lambda ck: ck.update(optimizer={"state": {}, "param_groups": []}), "does not fit this run's pretrain model"),
        (lambda ck: ck.update(step=10**9), "at pretrain step 1000000000 of 8"),
        (lambda ck: ck.update(step=-3), "step -3, not a count of steps"),
        (lambda ck: ck.update(phase="weird"), "phase 'weird', not pretrain or finetune"),
        (lambda ck: ck.update(format=99), "format 99 is newer than this svd-probe's 2"),
        (lambda ck: ck.update(format="2"), "format '2', not 1 to 2"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_left_alone(stopped_run, inputs, tmp_path, damage, match):
    """Before, these resumed with a traceback, or silently (exit 0) skipping or redoing work."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    damage(ck)
    torch.save(ck, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingInputError, match=match) as e:
        run(preset("mha", "tiny"), small_recipe(), sources(inputs, sst2_dir=None), out)
    assert "--overwrite" in (e.value.hint or "")
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "metrics.json").exists()


def test_a_damaged_checkpoint_on_the_command_line(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = cli_train_args(inputs, out, steps=(4, 2))
    code, _, err = cli_main([*args, "--stop-after", "2"], monkeypatch, capsys)
    assert code == 0, err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["step"] = 10**9
    torch.save(ck, out / "checkpoint.pt")
    code, _, err = cli_main(args, monkeypatch, capsys)
    assert code == 2 and "at pretrain step 1000000000 of 4" in err and "Traceback" not in err, err
    assert "--overwrite" in err and not (out / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_train_log_that_is_a_pipe_or_a_link_is_refused(inputs, tmp_path, monkeypatch, capsys, kind):
    """train.log is appended to, so it is the one run file atomic_write does not guard. A FIFO
    there blocked `svd-probe train` in its open for good (SIGTERM did not stop it), and a link
    made it append the log to the file it pointed at, outside --out."""
    import os

    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "notes.txt"
    elsewhere.write_text("mine\n")
    if kind == "fifo":
        os.mkfifo(out / "train.log")
    else:
        (out / "train.log").symlink_to(elsewhere)
    code, _, err = cli_main(cli_train_args(inputs, out), monkeypatch, capsys)
    err = " ".join(err.split())
    assert code == 2 and "train.log is a link, pipe or device, not a plain file" in err and "Traceback" not in err
    assert elsewhere.read_text() == "mine\n" and sorted(p.name for p in out.iterdir()) == ["train.log"]


def test_open_append_refuses_links_and_pipes_at_the_open_itself(tmp_path):
    """The check in check_out_dir runs once; the log is opened at every line, so the open itself
    refuses too (a link or FIFO swapped in mid-run), without blocking on a FIFO with no reader."""
    import os

    from svd_probe.atomic import open_append
    from svd_probe.errors import OutputExistsError

    target = tmp_path / "target.txt"
    target.write_text("x")
    (tmp_path / "link.log").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("link.log", "fifo.log"):
        with pytest.raises(OutputExistsError, match="not a plain file"):
            open_append(tmp_path / name)
    r = os.open(tmp_path / "fifo.log", os.O_RDONLY | os.O_NONBLOCK)  # a reader: the open succeeds, fstat refuses
    try:
        with pytest.raises(OutputExistsError, match="not a plain file"):
            open_append(tmp_path / "fifo.log")
    finally:
        os.close(r)
    with open_append(tmp_path / "plain.log") as f:
        f.write("one\n")
    with open_append(tmp_path / "plain.log") as f:
        f.write("two\n")
    assert (tmp_path / "plain.log").read_text() == "one\ntwo\n" and target.read_text() == "x"


@pytest.mark.parametrize(
    "target,damage,needle",
    [
        ("wiki/wiki.train.tokens", "huge", "more than the 1 GiB a data file"),
        ("wiki/wiki.test.tokens", "fifo", "wiki.test.tokens is not a regular file"),
        ("sst2/train.tsv", "fifo", "train.tsv is not a regular file"),
        ("vocab", "huge", "more than the 0.25 GiB a tokenizer file"),
        ("vocab", "fifo", "is not a regular file"),
    ],
)
def test_data_files_are_bounded_and_never_a_pipe(inputs, tmp_path, monkeypatch, capsys, target, damage, needle):
    """Data files were read whole (a sparse 2 GB wiki.train.tokens took 4.7 GB before it was
    refused for its NUL bytes) and a FIFO was called "missing", or, as the optional test split,
    skipped in silence. Now each is refused by what it is, before it is read."""
    import os
    from pathlib import Path

    if not Path("/proc/self/io").exists():
        pytest.skip("needs Linux's /proc/self/io")
    wiki, sst2 = tmp_path / "wiki", tmp_path / "sst2"
    shutil.copytree(inputs["wiki"], wiki)
    shutil.copytree(inputs["sst2"], sst2)
    vocab = tmp_path / "vocab.txt"
    shutil.copy(inputs["vocab"], vocab)
    path = vocab if target == "vocab" else tmp_path / target
    path.unlink(missing_ok=True)
    if damage == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.write(b"the film\n")
            f.truncate((D.MAX_TEXT_BYTES if target != "vocab" else D.MAX_TOKENIZER_BYTES) + 1)
    args = cli_train_args({"wiki": wiki, "sst2": sst2, "vocab": vocab}, tmp_path / "run", "--objective", "clm")

    def bytes_read() -> int:  # what this process has read through read(2) so far (Linux)
        return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

    before = bytes_read()
    code, _, err = cli_main(args, monkeypatch, capsys)
    read = bytes_read() - before
    flat = "".join(err.split())  # rich wraps long paths anywhere
    assert code == 2 and "".join(needle.split()) in flat and "Traceback" not in err, err
    assert read < 64 << 20, read  # the file was not read: the run reads some MB of code and data


@pytest.mark.parametrize("split,objective", [("valid", "mlm"), ("test", "clm")])
def test_a_split_too_short_for_one_row_is_refused_before_pretraining(
    inputs, tmp_path, monkeypatch, capsys, split, objective
):
    """The valid (and, for clm, test) rows were packed only after pretraining: a two-word
    wiki.valid.tokens ended the run after its last step, and the rerun with the file fixed was
    refused (its data no longer matched the checkpoint's). Now no step runs."""
    wiki = tmp_path / "wiki"
    shutil.copytree(inputs["wiki"], wiki)
    (wiki / f"wiki.{split}.tokens").write_text("a b\n")
    out = tmp_path / "run"
    args = cli_train_args({**inputs, "wiki": wiki}, out, "--objective", objective, "--checkpoint-every", "1")
    code, _, err = cli_main(args, monkeypatch, capsys)
    assert code == 2 and "too little text" in " ".join(err.split()), err
    assert not (out / "checkpoint.pt").exists() and "step" not in (out / "train.log").read_text()


def test_a_config_cannot_make_one_step_allocate_without_bound():
    """seq_len was bounded at 65,536 and batch x seq_len not at all: a config of seq_len 65,536
    made a tiny model's step take 18.6 GB and minutes on the CPU. The bounds, at their edge."""
    from svd_probe.train.config import MAX_BATCH_TOKENS, MAX_SEQ_LEN

    with pytest.raises(TrainingInputError, match="seq_len must be at most 8,192"):
        build_train_config(overrides={"seq_len": 65_536})
    build_train_config(overrides={"seq_len": MAX_SEQ_LEN, "batch_size": MAX_BATCH_TOKENS // MAX_SEQ_LEN})
    with pytest.raises(TrainingInputError, match=r"batch_size x seq_len must be at most 524,288 tokens"):
        build_train_config(overrides={"seq_len": 128, "batch_size": MAX_BATCH_TOKENS // 128 + 1})
    with pytest.raises(TrainingInputError, match="finetune_batch_size x seq_len"):
        build_train_config(overrides={"seq_len": 4096, "batch_size": 8, "finetune_batch_size": 1024})


def test_a_vocabulary_that_makes_the_text_unknown_is_refused(inputs, tmp_path, monkeypatch, capsys):
    """A vocab.txt of the special tokens alone made every token [UNK], and MLM "accuracy" reached
    1.0 (predicting [UNK] everywhere): a silently wrong result. Refused before the first step."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    out = tmp_path / "run"
    code, _, err = cli_main(cli_train_args({**inputs, "vocab": vocab}, out), monkeypatch, capsys)
    assert code == 2 and "100% of the training text's tokens to [UNK]" in " ".join(err.split()), err
    assert not (out / "checkpoint.pt").exists()


def test_dry_run_counts_the_embedding_of_the_tokenizer_a_run_loads(inputs, tmp_path, monkeypatch, capsys):
    """A run sizes its embedding by its tokenizer's vocabulary; --dry-run counted the config's
    vocab_size (30,522) whatever --tokenizer named. The difference to the default count is the
    vocabulary's rows times d_model, exactly (the head is tied)."""
    vocab = tmp_path / "vocab.txt"
    words = [f"w{i}" for i in range(995)]
    vocab.write_text("\n".join([*D.SPECIAL_TOKENS, *words]) + "\n")
    counts = {}
    for spec in ("bert-base-uncased", str(vocab)):  # a Hub name is not fetched: the config's 30,522
        code, out_text, err = cli_main(
            ["train", "--size", "tiny", "--tokenizer", spec, "--dry-run", "--json"], monkeypatch, capsys
        )
        assert code == 0, err
        counts[spec] = json.loads(out_text)
    base, small = counts["bert-base-uncased"], counts[str(vocab)]
    d = base["config"]["d_model"]
    assert (base["config"]["vocab_size"], small["config"]["vocab_size"]) == (30_522, 1_000)
    assert base["parameters"] - small["parameters"] == (30_522 - 1_000) * d
    assert base["non_embedding_parameters"] == small["non_embedding_parameters"]
