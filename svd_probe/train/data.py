"""Data for the training lab: tokenizer, WikiText for MLM pretraining, SST-2 for fine-tuning.

`datasets` (WikiText-103) is imported only when asked for, so offline machines without it run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from svd_probe.atomic import read_head
from svd_probe.errors import TrainingInputError, shown
from svd_probe.train.config import MAX_VOCAB  # tokens and token ids: rows of the embedding

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_VOCAB_HINT = (
    f"use a vocabulary of at most {MAX_VOCAB:,} tokens (bert-base-uncased has 30,522, Gemma 256,000): "
    "its size is the embedding's"
)
# WikiText's own tokenization: rare words are `<unk>`, and number/hyphen joins are escaped.
_WIKITEXT_REPLACE = (("<unk>", "[UNK]"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


@dataclass
class Tok:
    """A `tokenizers.Tokenizer` and the ids of the special tokens the lab needs."""

    tokenizer: Any  # tokenizers.Tokenizer or one of its implementations (BertWordPieceTokenizer)
    name: str
    vocab_size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids without [CLS]/[SEP]: callers place those themselves."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full serialization (vocabulary, normalizer, model)."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()


def load_tokenizer(spec: str) -> Tok:
    """`spec`: a WordPiece vocab.txt, a tokenizer.json, a folder with either, or a Hub name."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    path = Path(spec).expanduser()
    hint = "pass --tokenizer PATH/vocab.txt (bert-base-uncased's vocab.txt: README, Training lab), a tokenizer.json, or a Hub name when online"
    if path.is_dir():
        for candidate in ("tokenizer.json", "vocab.txt"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise TrainingInputError(f"tokenizer folder {path} holds neither tokenizer.json nor vocab.txt", hint=hint)
    try:
        if path.exists() and not path.is_dir():
            check_regular_file(path, MAX_TOKENIZER_BYTES, "tokenizer file")
            refuse_bom(path)
            if path.suffix == ".json":
                tok = Tokenizer.from_file(str(path))
            else:
                if path.stat().st_size == 0:
                    raise ValueError("empty vocabulary file")
                lines = count_vocab_lines(path)  # before `tokenizers` holds them all
                if lines > MAX_VOCAB:
                    raise TrainingInputError(
                        f"tokenizer file {path} has {lines:,} tokens (one a line); the lab takes at most {MAX_VOCAB:,}",
                        hint=_VOCAB_HINT,
                    )
                tok = BertWordPieceTokenizer(str(path), lowercase=True)
        elif looks_like_path(spec):
            raise TrainingInputError(f"tokenizer file not found: {spec}", hint=hint)
        else:
            tok = Tokenizer.from_pretrained(spec)  # Hub name; needs the network
    except TrainingInputError:
        raise
    except Exception as e:  # tokenizers raises plain Exception for unreadable files and Hub errors
        raise TrainingInputError(f"cannot load tokenizer {spec!r}: {e}", hint=hint) from None
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TrainingInputError(
            f"tokenizer {spec!r} lacks the special tokens {', '.join(missing)}",
            hint="use a BERT-style WordPiece vocabulary",
        )
    found = {t: i for t, i in ids.items() if i is not None}
    # The embedding needs a row for the largest id, which is more than the count of tokens where
    # ids have gaps: a vocab.txt with repeated lines gives each line's number to its last copy.
    # Tokens never outnumber ids (a loaded tokenizer keeps one token an id), so this bounds the
    # tokens too; a tokenizer.json is bounded only here, once read (MAX_TOKENIZER_BYTES bounds that).
    size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    if size > MAX_VOCAB:
        raise TrainingInputError(
            f"tokenizer {spec!r} has token ids up to {size - 1:,}; the lab takes at most {MAX_VOCAB:,}",
            hint=_VOCAB_HINT,
        )
    return Tok(
        tok,
        str(spec),
        size,
        found["[PAD]"],
        found["[UNK]"],
        found["[CLS]"],
        found["[SEP]"],
        found["[MASK]"],
    )


def refuse_bom(path: Path) -> None:
    """TrainingInputError when a tokenizer file starts with a UTF-8 byte-order mark: `tokenizers`
    glued it to a vocab.txt's first token (bert-base-uncased's [PAD] went missing; a first line
    `the` became an unknown word, silently [UNK]) and refused a tokenizer.json as "expected value"."""
    try:
        head = read_head(path, 3)
    except OSError as e:
        raise TrainingInputError(f"cannot read {path}: {e.strerror or e}") from None
    if head == b"\xef\xbb\xbf":
        raise TrainingInputError(
            f"tokenizer file {path} starts with a UTF-8 byte-order mark (BOM)",
            hint="save it as UTF-8 without a BOM, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE",
        )


def count_vocab_lines(path: Path) -> int:
    """Lines of a WordPiece vocab.txt, which `tokenizers` numbers 0, 1, ... (its ids, so the
    embedding's rows), counted in 1 MiB chunks: a 207 MB file of 25 million lines took 9.4 GB and
    two minutes in `tokenizers` before its ids were found too many, here 0.13 s and 1 MiB. Reads
    at most MAX_TOKENIZER_BYTES + 1 bytes (the file may have grown since its size was checked).
    A NUL byte is refused: `tokenizers` took `t\\x00he` as a token, so `the` became [UNK]."""
    lines, last, read = 0, b"\n", 0
    try:
        with open(path, "rb") as f:
            while read <= MAX_TOKENIZER_BYTES and (chunk := f.read(1 << 20)):
                if (nul := chunk.find(b"\x00")) >= 0:
                    line = lines + chunk.count(b"\n", 0, nul) + 1
                    raise TrainingInputError(
                        f"{path} is not a vocabulary: a NUL byte on line {line:,}",
                        hint="pass the original vocab.txt (one token a line, UTF-8 text), not a binary copy",
                    )
                lines += chunk.count(b"\n")
                last, read = chunk[-1:], read + len(chunk)
    except OSError as e:
        raise TrainingInputError(f"cannot read {path}: {e.strerror or e}") from None
    if read > MAX_TOKENIZER_BYTES:
        raise TrainingInputError(f"{path} grew past {MAX_TOKENIZER_BYTES >> 20} MiB while it was read")
    return lines + (last != b"\n")  # a last line without its newline is a token too


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".json")) or spec.count("/") > 1


# The largest data file read whole: WikiText-103's wiki.train.tokens is 0.54 GB, SST-2's
# train.tsv 4 MB. A file past it is refused before it is read (its bytes and its text would
# both be in memory: a sparse 2 GB file took 4.7 GB before the bound).
MAX_TEXT_BYTES = 1 << 30
# A tokenizer file handed to `tokenizers`: bert-base-uncased's vocab.txt is 0.23 MB, large
# models' tokenizer.json tens of MB.
MAX_TOKENIZER_BYTES = 256 << 20


def check_regular_file(path: Path, limit: int, what: str = "data file") -> None:
    """TrainingInputError unless `path` is a regular file (not a pipe or device, which a read would
    block on or never finish) of at most `limit` bytes. A missing file is the caller's to name."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TrainingInputError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TrainingInputError(
            f"{path} is not a regular file (a pipe, device or folder)", hint=f"pass the {what} itself"
        )
    if st.st_size > limit:
        raise TrainingInputError(
            f"{path} is {st.st_size / 2**30:.1f} GiB, more than the {limit / 2**30:g} GiB a {what} of svd-probe train may hold",
            hint=f"pass the {what} itself (WikiText-103's largest split is 0.54 GB)",
        )


def read_text(path: Path) -> str:
    """A data file's text: strict UTF-8, so a binary or mis-encoded file is an error, not noise;
    at most MAX_TEXT_BYTES, from a regular file."""
    check_regular_file(path, MAX_TEXT_BYTES)
    try:
        raw = read_head(path, MAX_TEXT_BYTES + 1)  # the file may have grown (or become a pipe) since
        if len(raw) > MAX_TEXT_BYTES:
            raise TrainingInputError(f"{path} grew past {MAX_TEXT_BYTES >> 30} GiB while it was read")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingInputError(
            f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})",
            hint="pass the original text file (WikiText .tokens, GLUE .tsv), not a binary or re-encoded copy",
        ) from None
    except OSError as e:
        raise TrainingInputError(f"cannot read {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise TrainingInputError(
            f"{path} is not UTF-8 text (a NUL byte at {raw.index(0)})",
            hint="pass the original text file (WikiText .tokens, GLUE .tsv), not a binary copy",
        )
    # A byte-order mark (Windows editors write one) is no text: left in, it was glued to the
    # first line, so an SST-2 header `\ufeffsentence` was "no header" and a WikiText file
    # gained a line of its own.
    return text.removeprefix("\ufeff")


def fingerprint_lines(*splits: list[str]) -> str:
    """sha256 over the lines of each split, in order: what a resumed run must see again."""
    h = hashlib.sha256()
    for lines in splits:
        for line in lines:
            h.update(line.encode())
            h.update(b"\n")
        h.update(b"\x00")  # split boundary
    return h.hexdigest()


# ---- WikiText --------------------------------------------------------------------------------


def clean_wikitext_line(line: str) -> str:
    for old, new in _WIKITEXT_REPLACE:
        line = line.replace(old, new)
    return line.strip()


def read_wikitext_dir(data_dir: Path) -> tuple[list[str], list[str]]:
    """Lines of wiki.train.tokens and wiki.valid.tokens, cleaned, blank lines dropped."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingInputError(
            f"data folder not found: {data_dir}",
            hint="pass --data-dir with wiki.train.tokens and wiki.valid.tokens (README, Training lab, says where to get WikiText-2)",
        )
    splits = []
    for name in ("wiki.train.tokens", "wiki.valid.tokens"):
        f = data_dir / name
        if not os.path.lexists(f):  # present but not a file: read_text says what it is
            raise TrainingInputError(
                f"{f} is missing", hint="--data-dir must hold wiki.train.tokens and wiki.valid.tokens"
            )
        lines = [clean_wikitext_line(ly) for ly in read_text(f).splitlines()]
        lines = [ly for ly in lines if ly]
        if not lines:
            raise TrainingInputError(f"{f} holds no text", hint=_EMPTY_WIKI_HINT)
        splits.append(lines)
    return splits[0], splits[1]


_EMPTY_WIKI_HINT = "pass WikiText's own files (README, Training lab, says where to get WikiText-2)"


def read_wikitext_test(data_dir: Path) -> list[str] | None:
    """Lines of wiki.test.tokens when the folder has it (the clm objective reports its perplexity).
    A file there that holds no text is refused as train and valid are: it was skipped as if absent,
    and the run reported no test perplexity without a word."""
    f = Path(data_dir) / "wiki.test.tokens"
    if not os.path.lexists(f):  # present but not a file (a pipe, a dangling link): read_text refuses it
        return None
    lines = [ly for ly in (clean_wikitext_line(x) for x in read_text(f).splitlines()) if ly]
    if not lines:
        raise TrainingInputError(f"{f} holds no text", hint=_EMPTY_WIKI_HINT + ", or remove it")
    return lines


def read_wikitext_hub(name: str, splits: tuple[str, ...] = ("train", "validation")) -> tuple[list[str], ...]:
    """WikiText-103 (or -2) through `datasets`, imported here so that it stays optional."""
    configs = {"wikitext-103": "wikitext-103-v1", "wikitext-2": "wikitext-2-v1"}
    if name not in configs:
        raise TrainingInputError(f"unknown dataset {name!r}", hint="use wikitext-103 or wikitext-2, or pass --data-dir")
    try:
        import datasets
    except ImportError:
        raise TrainingInputError(
            "--dataset needs the `datasets` package", hint="pip install datasets, or pass --data-dir"
        ) from None
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", configs[name])
    except Exception as e:
        raise TrainingInputError(
            f"cannot load {name} through datasets: {e}", hint="check the network, or pass --data-dir with local files"
        ) from None
    out = []
    for split in splits:
        lines = (clean_wikitext_line(t) for t in ds[split]["text"])
        out.append([ly for ly in lines if ly])
    return tuple(out)


def pack_sequences(tok: Tok, lines: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate all token ids and cut them into [CLS] + (seq_len-2) tokens + [SEP] rows.

    The remainder shorter than one row is dropped, so every row is full: no padding in
    pretraining, and every row has the same number of maskable tokens.
    """
    body = seq_len - 2
    ids = np.fromiter((i for seq in tok.encode_batch(lines) for i in seq), dtype=np.int64)
    n = len(ids) // body
    if n == 0:
        raise TrainingInputError(f"too little text: {len(ids)} tokens, fewer than one sequence of {seq_len}")
    rows = np.empty((n, seq_len), dtype=np.int64)
    rows[:, 0] = tok.cls_id
    rows[:, 1:-1] = ids[: n * body].reshape(n, body)
    rows[:, -1] = tok.sep_id
    return torch.from_numpy(rows)


def pack_causal(tok: Tok, lines: list[str], seq_len: int) -> torch.Tensor:
    """Rows for next-token prediction: all lines' ids, each line followed by [SEP] (the end-of-text
    marker that fine-tuning also puts after a sentence), cut into rows of seq_len + 1 tokens that
    overlap by one, so inputs row[:-1] and targets row[1:] are full: no padding, and every token
    after the first is predicted exactly once."""
    ids = np.fromiter((i for seq in tok.encode_batch(lines) for i in (*seq, tok.sep_id)), dtype=np.int64)
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise TrainingInputError(f"too little text: {len(ids)} tokens, fewer than one sequence of {seq_len + 1}")
    starts = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[starts])


def masked_count(seq_len: int, mlm_prob: float = 0.15) -> int:
    """Masked positions per packed row ([CLS] and [SEP] are never masked)."""
    return max(1, round(mlm_prob * (seq_len - 2)))


def mask_tokens(ids: torch.Tensor, tok: Tok, gen: torch.Generator, mlm_prob: float = 0.15):
    """BERT masking: pick 15% of the non-special tokens; 80% -> [MASK], 10% random, 10% kept.

    Exactly `masked_count` positions per row, so the MLM head gathers a fixed shape.
    Runs where `ids` lives, with `gen` on the same device: in pretraining the rows, the
    permutation slice and the masking all stay on the GPU, so a step builds its batch with a
    dozen small kernels and no host work, copy or sync (the host only seeds `gen`). The same seed
    gives other masks on CUDA than on the CPU (another generator), each deterministic.
    Returns (inputs [B, T], positions [B, k], targets [B, k]).
    """
    B, T = ids.shape
    k = masked_count(T, mlm_prob)
    dev = ids.device
    scores = torch.rand(B, T, generator=gen, device=dev)
    special = (ids == tok.cls_id) | (ids == tok.sep_id) | (ids == tok.pad_id)
    scores.masked_fill_(special, -1.0)  # not scores[special] = ...: a boolean index syncs on CUDA
    positions = scores.topk(k, dim=1).indices
    targets = torch.gather(ids, 1, positions)
    action = torch.rand(B, k, generator=gen, device=dev)
    random_ids = torch.randint(0, tok.vocab_size, (B, k), generator=gen, device=dev)
    replaced = torch.where(
        action < 0.8, torch.full_like(targets, tok.mask_id), torch.where(action < 0.9, random_ids, targets)
    )
    inputs = ids.clone()
    inputs.scatter_(1, positions, replaced)
    return inputs, positions, targets


# ---- SST-2 -----------------------------------------------------------------------------------


def read_sst2_tsv(path: Path) -> tuple[list[str], list[int]]:
    """GLUE SST-2 `sentence<TAB>label` with a header row; labels are 0 or 1 (the task is binary,
    and a label sizes the classifier head, so a stray 100000000 would allocate gigabytes)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise TrainingInputError(
            f"{path} is missing",
            hint="--sst2-dir must hold GLUE's train.tsv and dev.tsv (GLUE SST-2: README, Training lab)",
        )
    row_hint = "each row must be `sentence<TAB>0|1` (GLUE's SST-2 TSV files)"
    sentences, labels = [], []
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader, None)
        if not header or "sentence" not in header or "label" not in header:
            raise TrainingInputError(f"{path} has no `sentence\\tlabel` header", hint="use GLUE's SST-2 TSV files")
        if header.count("sentence") > 1 or header.count("label") > 1:  # the first was read, the other ignored
            raise TrainingInputError(
                f"{path}: the header names a column twice: {shown(header)}", hint="use GLUE's SST-2 TSV files"
            )
        si, li = header.index("sentence"), header.index("label")
        for row in reader:
            n = reader.line_num
            if not row:
                continue
            if len(row) != len(header):  # a tab inside a sentence would shift its label
                raise TrainingInputError(
                    f"{path}:{n}: {len(row)} fields where the header has {len(header)}: {shown(row)}", hint=row_hint
                )
            label = row[li].strip()
            if label not in ("0", "1"):
                raise TrainingInputError(f"{path}:{n}: label must be 0 or 1, got {shown(label)}", hint=row_hint)
            sentence = row[si].strip()
            if not sentence:  # a row of its label alone was trained on as [CLS] [SEP]
                raise TrainingInputError(f"{path}:{n}: the sentence is empty: {shown(row)}", hint=row_hint)
            sentences.append(sentence)
            labels.append(int(label))
    except csv.Error as e:  # NUL bytes, an over-long field
        raise TrainingInputError(f"cannot read {path}:{reader.line_num}: {e}", hint=row_hint) from None
    if not sentences:
        raise TrainingInputError(f"{path} holds no rows", hint=row_hint)
    return sentences, labels


def read_sst2_dir(sst2_dir: Path):
    sst2_dir = Path(sst2_dir)
    if not sst2_dir.is_dir():
        raise TrainingInputError(
            f"SST-2 folder not found: {sst2_dir}",
            hint="pass --sst2-dir with train.tsv and dev.tsv (GLUE SST-2: README, Training lab)",
        )
    return read_sst2_tsv(sst2_dir / "train.tsv"), read_sst2_tsv(sst2_dir / "dev.tsv")


def encode_sentences(tok: Tok, sentences: list[str], max_len: int, causal: bool = False) -> list[list[int]]:
    """[CLS] sentence [SEP] for an encoder (classified at [CLS]); sentence [SEP] for a causal model
    (classified at its last token, the [SEP])."""
    if causal:
        return [ids[: max_len - 1] + [tok.sep_id] for ids in tok.encode_batch(sentences)]
    return [[tok.cls_id] + ids[: max_len - 2] + [tok.sep_id] for ids in tok.encode_batch(sentences)]


def pad_batch(seqs: list[list[int]], pad_id: int, multiple: int = 16):
    """ids [B, T] and pad mask [B, T] (True = token); T rounded up so compiled graphs are reused."""
    T = max(len(s) for s in seqs)
    T = -(-T // multiple) * multiple
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask
