"""Small generated inputs for the training lab's tests and smoke runs: a WordPiece vocab,
WikiText-like text and SST-2 TSVs, so that tests never need the real datasets.
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ADJ = ["red", "blue", "green", "big", "small", "old", "new"]
NOUN = ["cat", "dog", "bird", "fish", "tree", "house", "car", "park"]
VERB = ["sees", "likes", "finds", "moves", "takes"]
GOOD = ["good", "great", "fine", "lovely", "superb"]
BAD = ["bad", "awful", "dull", "poor", "boring"]
OTHER = ["the", "a", "to", "and", "film", "was", "very", "=", ".", ",", "-", "2013", "14", "##s"]


def write_vocab(path: Path) -> Path:
    words = SPECIALS + sorted(set(ADJ + NOUN + VERB + GOOD + BAD + OTHER))
    path.write_text("\n".join(words) + "\n")
    return path


def _sentence(rng: random.Random) -> str:
    # A rigid grammar, so a tiny model can learn it within a few dozen steps.
    return f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} a {rng.choice(NOUN)} ."


def write_wikitext(folder: Path, n_train: int = 160, n_valid: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("wiki.train.tokens", n_train), ("wiki.valid.tokens", n_valid)):
        lines = [" ", " = 2013 @-@ 14 film = ", " "]
        for _ in range(n):
            lines.append(" " + " ".join(_sentence(rng) for _ in range(3)) + " <unk> ")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_sst2(folder: Path, n_train: int = 200, n_dev: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(GOOD if label else BAD)
            rows.append(f"the {rng.choice(NOUN)} was very {word} \t{label}")
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder
