"""Each domain's held-out validation documents, as evaluation micro-batches.

The validation split of a domain is built exactly as training builds it (megatron-core's GPTDataset
over the same ``--split`` bounds, ``--seq-length`` and ``--seed``), but alone and for one whole epoch:
with one epoch the sample order does not depend on how many samples are requested, so the first N
samples here are the first N samples of the validation data training reported on.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset

from bam_megatron.data.atomic_cache import atomic_index_caches
from bam_megatron.data.datasets import Domain, _check_splits_have_documents, _config
from bam_megatron.data.errors import DataError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def validation_sets(domains: Sequence[Domain], split: str, seq_length: int, seed: int, tokens: Any,
                    cache: Optional[str]) -> dict[str, GPTDataset]:  # fmt: skip
    """{domain name: one epoch of its validation split}; every rank builds (reads) them."""
    datasets = {}
    for domain in domains:
        config = _config(seq_length, seed, split, tokens, cache, ([domain.prefix], None))
        config.split_matrix = [None, config.split_matrix[1], None]  # neither train nor test is needed
        _check_splits_have_documents([domain], config.split_matrix, split)
        with atomic_index_caches():
            _, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
        if valid is None or len(valid) == 0:
            raise DataError(f"domain {domain.name}: --split {split} leaves no validation samples of "
                            f"--seq-length {seq_length}")  # fmt: skip
        datasets[domain.name] = valid
    return datasets


def eval_batches(dataset: Any, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """This data-parallel rank's micro-batches over samples ``[0, num_samples)``.

    Micro-batch ``m`` holds samples ``m·B·D + r·B + i`` (B micro-batch size, D data-parallel size,
    r this rank), as training's sampler lays them out. The last micro-batches are filled up with
    repeats whose loss mask is zero, so every sample counts exactly once and every rank runs the
    same number of micro-batches.
    """
    step = micro_batch_size * dp_size
    batches = []
    for m in range(math.ceil(num_samples / step)):
        indices = [m * step + dp_rank * micro_batch_size + i for i in range(micro_batch_size)]
        samples = [dataset[i % num_samples] for i in indices]
        batch = {key: torch.from_numpy(numpy.stack([numpy.asarray(s[key]) for s in samples])) for key in BATCH_KEYS}
        real = torch.tensor([i < num_samples for i in indices], dtype=batch["loss_mask"].dtype)
        batch["loss_mask"] = batch["loss_mask"] * real.unsqueeze(1)
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches
