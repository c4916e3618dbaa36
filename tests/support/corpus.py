"""Files the training tests share: a SentencePiece tokenizer and three small domain datasets."""

from __future__ import annotations

import os
import random

import numpy
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

DOMAINS = {
    "code": "def return import class self for while if else lambda yield print range len".split(),
    "law": "court statute plaintiff defendant hereby pursuant clause contract appeal tort".split(),
    "math": "theorem lemma proof integral matrix vector prime group ring field limit".split(),
}


def _documents(words: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(count)]


def train_tokenizer(directory: str, seed: int = 0, vocab_size: int = 320) -> str:
    """A tiny SentencePiece model with the project's special ids (pad 0, unk 1, bos 2, eos 3)."""
    corpus = os.path.join(directory, f"corpus{seed}.txt")
    with open(corpus, "w") as f:
        for i, words in enumerate(DOMAINS.values()):
            f.write("\n".join(_documents(words, 100, seed * 10 + i)) + "\n")
    prefix = os.path.join(directory, f"tok{seed}")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        minloglevel=2,
        seed_sentencepiece_size=1000,
    )
    return prefix + ".model"


def write_domain(directory: str, name: str, tokenizer_model: str, documents: int = 300) -> str:
    """PREFIX of an indexed dataset of one domain, documents ended by eod."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    prefix = os.path.join(directory, f"{name}_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for text in _documents(DOMAINS[name], documents, hash(name) % 1000):
        ids = sp.encode(text) + [sp.eos_id()]
        builder.add_document(numpy.array(ids, dtype=numpy.int64), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """{'tokenizer': path, 'other_tokenizer': path, 'code'|'law'|'math': prefix}."""
    directory = str(tmp_path_factory.mktemp("corpus"))
    tokenizer = train_tokenizer(directory, seed=0)
    files = {"tokenizer": tokenizer, "other_tokenizer": train_tokenizer(directory, seed=1, vocab_size=330)}
    for name in DOMAINS:
        files[name] = write_domain(directory, name, tokenizer)
    return files
