"""The router of a MoV / MoLoRA adapter: p(x) = softmax(W_r · x) over the E adapter experts.

fp32 softmax, no bias, normal initialisation (std 0.02 by default), soft merging (no top-k).
Each adapted module has its own router reading that module's input, as in the MoV paper; under
tensor parallelism the router follows its module's split (`bam_megatron.peft.parallel`):

- column-parallel module: W_r [E, d] replicated; the input is the replicated hidden state;
- row-parallel module: W_r [E, d/tp] split along the input like the module's weight; every rank
  holds a slice of the input features, so the logits are a partial sum, reduced over the group.
"""

from __future__ import annotations

from typing import Optional

import torch

from bam_megatron.peft.parallel import (
    LinearInfo,
    column_spread,
    linear,
    partial_grad,
    reduce_partial,
    replicated_weight,
)

# How the gates are consumed, for a row-parallel module's router:
# 'partial': by rank-local features (gradient summed over ranks); 'reduced': by computations
# replicated on every rank, whole sequence; 'scattered': replicated, this rank's sequence chunk.
CONSUMERS = ("partial", "reduced", "scattered")


class AdapterRouter(torch.nn.Module):
    """Per-token gates over ``num_experts`` adapters; ``weight`` is this rank's [E, in] piece."""

    def __init__(self, weight: torch.Tensor, info: LinearInfo) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.info = info

    def column(self, x: torch.Tensor) -> torch.Tensor:
        """Gates for a column-parallel module's input ``x`` (sequence-sharded under SP), for the
        whole sequence, to be consumed by rank-local (output-sharded) computations: [..., E] fp32."""
        info = self.info
        weight = replicated_weight(self.weight, info) if info.partial else self.weight
        logits = column_spread(info)(linear(x, weight))
        return torch.softmax(logits.float(), dim=-1)

    def row(self, x: torch.Tensor, consumer: str) -> torch.Tensor:
        """Gates for a row-parallel module's input ``x`` (features sharded): [..., E] fp32."""
        if consumer not in CONSUMERS:
            raise ValueError(f"consumer must be one of {CONSUMERS}, got {consumer!r}")
        logits = reduce_partial(linear(x, self.weight), self.info, scatter=consumer == "scattered")
        gates = torch.softmax(logits.float(), dim=-1)
        return partial_grad(gates, self.info) if consumer == "partial" else gates


def mix(t: torch.Tensor, gates: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Scale each expert's slice of ``t`` [..., E·k] by its gate [..., E] (no router: unchanged)."""
    if gates is None:
        return t
    shape = t.shape  # explicit sizes: an MoE expert may receive no tokens at all
    return (t.view(*shape[:-1], num_experts, shape[-1] // num_experts) * gates.to(t.dtype).unsqueeze(-1)).view(shape)
