"""Shared fixtures for the data tests: a small generated corpus and a tiny tokenizer trained on it.

A plain module (not conftest.py): tests import the fixtures they use, e.g.
the ``text_corpus`` fixture (registered in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

from bam_megatron.data.synthetic import synthetic_documents
from bam_megatron.data.train_tokenizer import main as train_tokenizer_main

VOCAB_SIZE = 400
# What the synthetic generator never writes: runs of spaces, newlines, tabs, CRLF, leading/trailing
# whitespace, rare characters (left to byte fallback by the character coverage), an emoji.
TRICKY_TEXTS = [
    "  two leading spaces, and  double  spaces inside.  ",
    "Lines\nwith\n\nnewlines\tand\ttabs\r\nand CRLF.",
    "Ωμέγα, Ελλάδα, 東京タワー, emoji 😀 and ∑ x² ≤ 10³.",
    "digits 1234567890 and 3.14159, ids like a1b2c3.",
]


@dataclass(frozen=True)
class Corpus:
    """A JSONL corpus on disk, its documents, and a tokenizer trained on it."""

    jsonl: str
    texts: list[str]
    model: str


def write_jsonl(path: str | os.PathLike, records: list) -> str:
    """Write ``records`` one JSON value per line (non-ASCII kept as UTF-8); returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return os.fspath(path)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """60 generated documents (~12 KB) plus ``TRICKY_TEXTS``, and a bpe tokenizer of 400 pieces on them."""
    root = tmp_path_factory.mktemp("corpus")
    texts = list(synthetic_documents(60, seed=7)) + TRICKY_TEXTS
    jsonl = write_jsonl(root / "corpus.jsonl", [{"text": text} for text in texts])
    prefix = os.fspath(root / "tok")
    assert train_tokenizer_main(["--input", jsonl, "--vocab-size", str(VOCAB_SIZE), "--output-prefix", prefix]) == 0
    return Corpus(jsonl=jsonl, texts=texts, model=prefix + ".model")
