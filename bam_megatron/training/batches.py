"""Deterministic, resumable micro-batches: the position is the number of samples consumed.

Global batch ``k`` is dataset samples ``[k·G, (k+1)·G)`` (G = global batch size), laid out
micro-batch by micro-batch, each split across data-parallel ranks in rank order (Megatron's
pretraining sampler). Restoring ``consumed_samples`` from a checkpoint therefore resumes on
exactly the next sample.
"""

from __future__ import annotations

from typing import Any

import numpy
import torch


class MicroBatches:
    """This data-parallel rank's micro-batches of a map-style GPTDataset."""

    def __init__(
        self, dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0
    ) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def _batch(self, start: int) -> dict[str, torch.Tensor]:
        first = start + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.micro_batch_size)]
        return {
            key: torch.from_numpy(numpy.stack([numpy.asarray(s[key]) for s in samples]))
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }

    def next_global_batch(self, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next global batch; advances ``consumed_samples``."""
        step = self.micro_batch_size * self.dp_size
        batches = [self._batch(self.consumed_samples + m * step) for m in range(num_microbatches)]
        self.consumed_samples += num_microbatches * step
        return batches


def fixed_batches(
    dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int, count: int
) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` micro-batches of a dataset (validation: the same samples every time)."""
    return MicroBatches(dataset, micro_batch_size, dp_rank, dp_size).next_global_batch(count)
