"""Each domain's held-out validation documents, as evaluation micro-batches.

The validation split of a domain is built exactly as training builds it (megatron-core's GPTDataset
over the same ``--split`` bounds, ``--seq-length`` and ``--seed``), but alone and for one whole epoch:
with one epoch the sample order does not depend on how many samples are requested, so the first N
samples here are the first N samples of the validation data training reported on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy
import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def eval_batches(
    dataset: Any, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
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
