"""The attention router of soft MoA: g(x̂) = softmax(W_r · x̂), W_r ∈ R^{N×d}, no bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from bam_megatron.model.config import BAMConfig


class AttentionRouter(MegatronModule):
    """Per-token gates over the N attention experts, in fp32.

    The router is replicated on every tensor-parallel rank, but each rank scales only its own
    attention heads by the gates, so the gradient reaching the gates is a partial sum over ranks.
    The output is therefore passed through megatron-core's mappings: an identity whose backward
    all-reduces (no sequence parallelism), or an all-gather over the sequence whose backward
    reduce-scatters (sequence parallelism: each rank routes its own tokens; the weight is then
    marked ``sequence_parallel`` so finalize_model_grads sums its gradient over the TP group,
    as for norms and megatron-core's MoE router).
    """

    def __init__(self, config: BAMConfig) -> None:
        super().__init__(config=config)
        self.num_experts = config.num_attention_experts
        self.topk = config.attention_router_topk
        # No device under CPU initialisation: follow the ambient default (e.g. meta for bam-stats).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (sequence-sharded under SP) -> gates [s, b, N] in fp32 for the full sequence."""
        gates = torch.softmax(F.linear(hidden_states, self.weight).float(), dim=-1)
        if self.topk is not None and self.topk < self.num_experts:
            top, index = gates.topk(self.topk, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(gates, tensor_parallel_output_grad=True)
        return copy_to_tensor_model_parallel_region(gates)
