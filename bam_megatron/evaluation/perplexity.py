"""Token losses of one model on one domain: forward-only passes through megatron-core's schedule.

The schedule runs every pipeline stage; the last stage computes each token's cross-entropy (the
model's own vocab-parallel loss, over the padded vocabulary as in training). Loss sums and token
counts are summed over data-parallel ranks, so perplexity = exp(total loss / total tokens) is the
token-weighted mean over exactly the samples asked for, whatever the parallel layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass(frozen=True)
class DomainLoss:
    """Summed token loss and token count of one (model, domain)."""

    loss_sum: float
    tokens: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(mean token loss)."""
        return math.exp(self.mean_loss)


def token_losses(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    seq_length: int,
    micro_batch_size: int,
    before_forward: Optional[Callable[[dict], None]] = None,
) -> DomainLoss:
    """Run ``batches`` (this rank's micro-batches) forward; every rank calls it and gets the totals.

    ``before_forward(batch)`` is called on every stage just before the model sees the micro-batch
    (the routing hooks read its loss mask).
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if before_forward is not None:
            before_forward(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss: torch.Tensor):
            mask = batch["loss_mask"].float()
            total = (per_token_loss.float() * mask).sum()
            return total * 0.0, {"loss_sum": total.detach().double(), "tokens": mask.sum().double()}

        return output, loss_func

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    device = batches[0]["tokens"].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    # Every tensor-parallel rank holds the same full per-token losses: count them once.
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for out in outputs:
            totals[0] += out["loss_sum"].to(device)
            totals[1] += out["tokens"].to(device)
    dist.all_reduce(totals)
    return DomainLoss(float(totals[0]), int(round(float(totals[1]))))
