"""The training lab's data readers against hostile files: byte-order marks, NUL bytes, CRLF
endings, odd headers, empty splits. Each is refused with a message naming the file (on the command
line: exit 2, no traceback) or read correctly; none is read wrong in silence."""

from __future__ import annotations

import shutil

import pytest
from train_fixtures import cli_main, inputs_fixture  # noqa: F401

from svd_probe.errors import TrainingInputError
from svd_probe.train import data as D

BOM = b"\xef\xbb\xbf"

# ---- vocab.txt / tokenizer.json ------------------------------------------------------------------


def test_a_vocab_with_a_bom_is_refused_not_glued_to_its_first_token(inputs, tmp_path):
    """`tokenizers` read the BOM as part of line 1: a vocab whose first line is `the` loaded, and
    `the` became [UNK] in silence; bert-base-uncased's order ([PAD] first) was "lacks [PAD]"."""
    lines = inputs["vocab"].read_text().splitlines()
    first_the = tmp_path / "vocab.txt"
    first_the.write_bytes(BOM + "\n".join(["the", *(x for x in lines if x != "the")]).encode() + b"\n")
    with pytest.raises(TrainingInputError, match="starts with a UTF-8 byte-order mark") as e:
        D.load_tokenizer(str(first_the))
    assert str(first_the) in e.value.message and "without a BOM" in (e.value.hint or "")
    pad_first = tmp_path / "bert" / "vocab.txt"
    pad_first.parent.mkdir()
    pad_first.write_bytes(BOM + inputs["vocab"].read_bytes())
    with pytest.raises(TrainingInputError, match="byte-order mark"):
        D.load_tokenizer(str(pad_first.parent))  # a folder holding it: the same check


def test_a_tokenizer_json_with_a_bom_says_so(inputs, tmp_path):
    from tokenizers import BertWordPieceTokenizer

    path = tmp_path / "tokenizer.json"
    BertWordPieceTokenizer(str(inputs["vocab"])).save(str(path))
    path.write_bytes(BOM + path.read_bytes())  # was "expected value at line 1 column 1"
    with pytest.raises(TrainingInputError, match="byte-order mark"):
        D.load_tokenizer(str(path))


def test_a_vocab_with_a_nul_byte_is_refused(inputs, tmp_path):
    """`t\\x00he` was taken as a token: `the` was no longer in the vocabulary and became [UNK]."""
    text = inputs["vocab"].read_text()
    line = text.splitlines().index("the") + 1
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(text.replace("\nthe\n", "\nt\x00he\n").encode())
    with pytest.raises(TrainingInputError, match=f"vocab.txt is not a vocabulary: a NUL byte on line {line}"):
        D.load_tokenizer(str(vocab))


def test_a_crlf_vocab_reads_as_the_lf_one(inputs, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(inputs["vocab"].read_bytes().replace(b"\n", b"\r\n"))
    crlf, lf = D.load_tokenizer(str(vocab)), D.load_tokenizer(str(inputs["vocab"]))
    assert crlf.tokenizer.get_vocab() == lf.tokenizer.get_vocab() and crlf.vocab_size == lf.vocab_size
    assert crlf.encode_batch(["the film was good"]) == lf.encode_batch(["the film was good"])


def test_dry_run_with_a_bom_vocab_exits_2_without_a_traceback(inputs, tmp_path, monkeypatch, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(BOM + inputs["vocab"].read_bytes())
    code, out, err = cli_main(["train", "--tokenizer", str(vocab), "--dry-run"], monkeypatch, capsys)
    flat = " ".join(err.split())
    assert code == 2 and "byte-order mark" in flat and "Traceback" not in out + err, err


# ---- WikiText ------------------------------------------------------------------------------------


def _wiki(inputs, tmp_path, **files: bytes):
    wiki = tmp_path / "wiki"
    shutil.copytree(inputs["wiki"], wiki)
    for split, content in files.items():
        (wiki / f"wiki.{split}.tokens").write_bytes(content)
    return wiki


def test_a_wikitext_bom_is_dropped_not_read_as_a_line(inputs, tmp_path):
    """The BOM was kept: WikiText's first line ` ` became a text line `\\ufeff` of its own."""
    train = (inputs["wiki"] / "wiki.train.tokens").read_bytes()
    with_bom = D.read_wikitext_dir(_wiki(inputs, tmp_path, train=BOM + train))
    assert with_bom == D.read_wikitext_dir(inputs["wiki"])
    assert not any("\ufeff" in x for x in with_bom[0])


def test_crlf_and_cr_wikitext_read_as_lf(inputs, tmp_path):
    train = (inputs["wiki"] / "wiki.train.tokens").read_bytes()
    want = D.read_wikitext_dir(inputs["wiki"])
    for ending in (b"\r\n", b"\r"):
        got = D.read_wikitext_dir(_wiki(inputs, tmp_path / ending.hex(), train=train.replace(b"\n", ending)))
        assert got == want and not any("\r" in x for x in got[0])


def test_an_empty_test_split_is_refused_not_skipped(inputs, tmp_path):
    """wiki.test.tokens of blank lines was taken as absent: clm reported no test perplexity, silently."""
    wiki = _wiki(inputs, tmp_path, test=b" \n\n \n")
    with pytest.raises(TrainingInputError, match="wiki.test.tokens holds no text") as e:
        D.read_wikitext_test(wiki)
    assert "remove it" in (e.value.hint or "")
    (wiki / "wiki.test.tokens").unlink()
    assert D.read_wikitext_test(wiki) is None  # absent: still optional


@pytest.mark.parametrize("split", ["train", "valid"])
def test_empty_train_or_valid_names_the_file_and_the_fix(inputs, tmp_path, split):
    with pytest.raises(TrainingInputError, match=f"wiki.{split}.tokens holds no text") as e:
        D.read_wikitext_dir(_wiki(inputs, tmp_path, **{split: b" \n\n \n"}))
    assert "WikiText" in (e.value.hint or "")


# ---- SST-2 ---------------------------------------------------------------------------------------


def _sst(tmp_path, train: bytes):
    d = tmp_path / "sst"
    d.mkdir(exist_ok=True)
    (d / "train.tsv").write_bytes(train)
    (d / "dev.tsv").write_bytes(b"sentence\tlabel\nok\t1\n")
    return d


@pytest.mark.parametrize(
    "content",
    [
        BOM + b"sentence\tlabel\ngood film\t1\nbad film\t0\n",  # was "no `sentence\tlabel` header"
        b"sentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n",  # CRLF: no '1\r' label
        b"sentence\tlabel\rgood film\t1\rbad film\t0\r",
        b"label\tsentence\n1\tgood film\n0\tbad film\n",  # columns by name, not position
        b"sentence\tlabel\ngood film\t 1\nbad film\t0 \n",
        BOM + b"label\tsentence\r\n1\tgood film\r\n\r\n0\tbad film\r\n",
    ],
    ids=["bom", "crlf", "cr", "label-first", "spaced-labels", "bom-crlf-label-first"],
)
def test_sst2_files_that_read_right(tmp_path, content):
    (train, labels), _ = D.read_sst2_dir(_sst(tmp_path, content))
    assert (train, labels) == (["good film", "bad film"], [1, 0])


@pytest.mark.parametrize(
    "content,match",
    [
        # Two `label` columns: the first was read, the second ignored in silence.
        (b"sentence\tlabel\tlabel\ngood film\t1\t0\n", "the header names a column twice"),
        (b"sentence\tsentence\tlabel\ngood\tbad\t1\n", "the header names a column twice"),
        # A row of its label alone trained on as [CLS] [SEP].
        (b"sentence\tlabel\ngood film\t1\n \t0\n", r"train.tsv:3: the sentence is empty"),
        (b"sentence\tlabel\nsentence\tlabel\ngood film\t1\n", r"train.tsv:2: label must be 0 or 1, got 'label'"),
        (b"good film\t1\nbad film\t0\n", "has no `sentence\\\\tlabel` header"),
        (b"sentence\tlabel\n\n\n", "holds no rows"),
        (b'sentence\tlabel\n"bad\tfilm"\t0\n', "3 fields where the header has 2"),
        (b"sentence\tlabel\ngood film\t1\t\n", "3 fields where the header has 2"),
    ],
    ids=[
        "two-labels",
        "two-sentences",
        "empty-sentence",
        "header-twice",
        "no-header",
        "no-rows",
        "quoted-tab",
        "trailing-tab",
    ],
)
def test_sst2_files_that_are_refused(tmp_path, content, match):
    with pytest.raises(TrainingInputError, match=match) as e:
        D.read_sst2_dir(_sst(tmp_path, content))
    assert "train.tsv" in e.value.message and e.value.hint
