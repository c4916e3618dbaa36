"""Domain mixtures on megatron-core's BlendedMegatronDatasetBuilder + GPTDataset.

``--data-path 0.5 code 0.3 law 0.2 math`` is megatron's blend syntax. Every domain is split into
train/valid/test (``--split``); training samples from the weighted blend, and validation is kept
per domain, so each domain's perplexity is reported separately (as in the BAM paper's tables).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path
from megatron.core.datasets.utils import get_blend_from_list

from bam_megatron.data.atomic_cache import atomic_index_caches
from bam_megatron.data.errors import DataError
from bam_megatron.data.index_check import IndexArrays, read_checked_index


@dataclass(frozen=True)
class Domain:
    """One corpus of the mixture: its name (for reports), weight and indexed-dataset prefix."""

    name: str
    weight: float
    prefix: str


def parse_data_path(data_path: Sequence[str]) -> list[Domain]:
    """Megatron's ``[W1] PREFIX1 [W2 PREFIX2 ...]`` -> checked domains named after their files."""
    try:
        prefixes, weights = get_blend_from_list(list(data_path))
    except (AssertionError, ValueError):
        raise DataError(
            f"--data-path: expected PREFIX... or W1 PREFIX1 W2 PREFIX2 ..., got {' '.join(data_path)}"
        ) from None
    weights = weights or [1.0] * len(prefixes)
    names = [domain_name(prefix) for prefix in prefixes]
    if len(set(names)) != len(names):
        names = [f"{i}:{name}" for i, name in enumerate(names)]
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    return [Domain(n, float(w), p) for n, w, p in zip(names, weights, prefixes)]


def domain_name(prefix: str) -> str:
    """'data/code_text_document' -> 'code'."""
    name = os.path.basename(prefix.rstrip("/"))
    return name[: -len("_text_document")] if name.endswith("_text_document") else name


def check_indexed_dataset(prefix: str) -> IndexArrays:
    """PREFIX.idx/.bin present, and the index consistent over all its entries and with the .bin size
    (`index_check`); a one-line `DataError` otherwise. Returns the checked index."""
    return read_checked_index(prefix)


def check_token_ids(prefix: str, vocab_size: int) -> None:
    """Fail with a one-line error if any token of the dataset is outside the vocabulary.

    Data tokenized with a larger vocabulary would crash in the embedding; with a smaller one, it
    would train on wrong tokens without a word. One vectorised pass over the whole .bin file
    (memory-mapped, a few GB/s), before the first step.
    """
    index = check_indexed_dataset(prefix)
    end = index.tokens
    tokens = numpy.memmap(get_bin_path(prefix), dtype=index.dtype, mode="r", shape=(end,))
    largest = int(tokens.max()) if end else -1
    if largest >= vocab_size:
        raise DataError(
            f"dataset {prefix} holds token id {largest}, but the tokenizer has {vocab_size} tokens: "
            "it was tokenized with another tokenizer (rerun bam-preprocess-data with this one)"
        )


def data_fingerprint(domains: Sequence[Domain], split: str, seq_length: int, seed: int) -> str:
    """Hash of everything that decides which samples training sees, in which order."""
    h = hashlib.sha256(json.dumps([split, seq_length, seed]).encode())
    for d in domains:
        h.update(json.dumps([d.name, d.weight]).encode())
        with open(get_idx_path(d.prefix), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TokenIds:
    """What GPTDataset needs from a tokenizer (a SentencePieceTokenizer has these too)."""

    eod: int
    pad: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer) -> TokenIds:
        """A tokenizer's ids. Where its pad is its eod (Llama, Mistral and Qwen tokenizers), there is
        no pad to mask: megatron-core's "no pad" id, -1, instead of a warning on every dataset."""
        pad = -1 if tokenizer.pad == tokenizer.eod else tokenizer.pad
        return cls(tokenizer.eod, pad, tokenizer.vocab_size)

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core writes into its dataset descriptions (and cache keys)."""
        return {"class": "TokenIds", "eod": self.eod, "pad": self.pad, "vocab_size": self.vocab_size}


def _config(seq_length: int, seed: int, split: str, tokens, cache: Optional[str], blend=None):
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache,
        tokenizer=tokens,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masks come from the attention kernels
    )


def _check_splits_have_documents(domains: Sequence[Domain], split_matrix, split: str) -> None:
    """megatron-core's sample-index builder loops forever on a split without documents."""
    for d in domains:
        documents = len(check_indexed_dataset(d.prefix).document_indices) - 1
        for name, bounds in zip(("train", "validation"), split_matrix[:2]):
            if bounds is not None and int(bounds[1] * documents) - int(bounds[0] * documents) == 0:
                raise DataError(
                    f"domain {d.name} ({documents} documents) has no {name} documents with "
                    f"--split {split}; add documents or change --split"
                )


def build_datasets(
    domains: Sequence[Domain],
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples_per_domain: int,
    tokens,
    cache: Optional[str] = None,
):
    """(train dataset over the blend, {domain name: its validation dataset}; {} where ``split``
    has no validation part).

    One builder call: the validation datasets are the per-domain parts of the blended
    validation split, sized so that the smallest-weight domain still has enough samples.
    The test split keeps its documents out of training but is not built.
    """
    for d in domains:
        check_token_ids(d.prefix, tokens.vocab_size)
    config = _config(seq_length, seed, split, tokens, cache, ([d.prefix for d in domains], [d.weight for d in domains]))
    config.split_matrix = [*config.split_matrix[:2], None]
    _check_splits_have_documents(domains, config.split_matrix, split)
    total = sum(d.weight for d in domains)
    valid_samples = math.ceil(valid_samples_per_domain * total / min(d.weight for d in domains)) + len(domains)
    with atomic_index_caches():
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset,
            [train_samples, valid_samples, 0],
            lambda: True,
            config,  # every rank reads the files
        ).build()
    if train is None:
        raise DataError(f"--split {split} leaves no training data")
    if valid is None:  # e.g. --split 1,0,0: no validation part (training skips validation)
        return train, {}
    parts = valid.datasets if isinstance(valid, BlendedDataset) else [valid]
    return train, {d.name: part for d, part in zip(domains, parts)}


def validation_sets(
    domains: Sequence[Domain], split: str, seq_length: int, seed: int, tokens: Any, cache: Optional[str]
) -> dict[str, GPTDataset]:
    """{domain name: one epoch of its validation split}; every rank builds (reads) them."""
    datasets = {}
    for domain in domains:
        config = _config(seq_length, seed, split, tokens, cache, ([domain.prefix], None))
        config.split_matrix = [None, config.split_matrix[1], None]  # neither train nor test is needed
        _check_splits_have_documents([domain], config.split_matrix, split)
        with atomic_index_caches():
            _, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
        if valid is None or len(valid) == 0:
            raise DataError(
                f"domain {domain.name}: --split {split} leaves no validation samples of --seq-length {seq_length}"
            )
        datasets[domain.name] = valid
    return datasets


def build_mock_datasets(seq_length: int, seed: int, train_samples: int, valid_samples: int, tokens):
    """Random-token datasets (megatron-core's MockGPTDataset) for smoke tests without files."""
    config = _config(seq_length, seed, "99,1,0", tokens, None)
    config.mock = True  # the builder picks mock datasets from this field
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, {"mock": valid}
