"""The routers of a mixture, and their optional per-expert bias (``router_bias``, docs/model.md).

- `AttentionRouter`, soft MoA's attention router: g(x̂) = softmax(W_r · x̂ + b), W_r ∈ R^{N×d}, in fp32;
- `BiasedTopKRouter`, megatron-core's FFN `TopKRouter` plus the same bias, without megatron-core's
  ``add_bias_linear`` (which would put a bias on every linear layer).

The bias b ∈ R^N is a trained parameter (zeros at initialisation), replicated like the router weight.
Both routers also hold a non-persistent ``bias_offset`` buffer, zero unless the training loop ramps
in the experts a grown mixture gained (`bam_megatron.model.router_ramp`): the logits are
``W x + (b + offset)``, the bias and offset summed first so that folding the offset into the bias
(exports, a later growth) computes exactly the same logits.

A grown mixture's biased routers compute W x as one GEMM per *group* of experts
(``expert_groups``: the experts the mixture had, then each growth's newcomers), each of the shape the
mixture before that growth computed: a GEMM's result for a row depends on the number of rows (BLAS
picks another kernel for 3 rows than for 4), so one GEMM over all experts would change the old
experts' logits in their last bits. With the groups, the grown mixture's step 0 is bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter

from bam_megatron.model.config import BAMConfig

BIAS_OFFSET = "bias_offset"
"""The non-persistent buffer of a biased router that the new-expert ramp sets (never saved)."""


def add_router_bias(router: torch.nn.Module, num_experts: int, config: BAMConfig) -> None:
    """Give ``router`` (whose ``weight`` is already built) a zero bias of ``num_experts`` entries in the
    weight's dtype and device, marked ``sequence_parallel`` like the weight (finalize_model_grads then
    sums its gradient over the TP group under SP), and a zero, non-persistent fp32 offset buffer."""
    weight = router.weight
    router.bias = torch.nn.Parameter(torch.zeros(num_experts, dtype=weight.dtype, device=weight.device))
    router.bias.sequence_parallel = config.sequence_parallel
    router.register_buffer(
        BIAS_OFFSET, torch.zeros(num_experts, dtype=torch.float32, device=weight.device), persistent=False
    )
    router.expert_groups = None  # one GEMM over all experts unless a growth says otherwise


def grouped_logits(linear, input: torch.Tensor, weight: torch.Tensor, groups) -> torch.Tensor:
    """``linear(input, rows)`` for each group of router rows (sizes ``groups``; None or one group: all
    rows at once), concatenated over the experts."""
    if not groups or len(groups) == 1:
        return linear(input, weight)
    return torch.cat([linear(input, rows) for rows in torch.split(weight, list(groups))], dim=-1)


def effective_bias(router: torch.nn.Module, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The bias a router adds to its logits, in ``dtype``: b + offset (fp32 sum), None without bias."""
    if getattr(router, "bias", None) is None:
        return None
    return (router.bias.float() + getattr(router, BIAS_OFFSET).float()).to(dtype)


class AttentionRouter(MegatronModule):
    """Per-token gates over the N attention experts, in fp32.

    The router is replicated on every tensor-parallel rank, but each rank scales only its own
    attention heads by the gates, so the gradient reaching the gates is a partial sum over ranks.
    The output is therefore passed through megatron-core's mappings: an identity whose backward
    all-reduces (no sequence parallelism), or an all-gather over the sequence whose backward
    reduce-scatters (sequence parallelism: each rank routes its own tokens; the weight, and the
    bias, are then marked ``sequence_parallel`` so finalize_model_grads sums their gradients over
    the TP group, as for norms and megatron-core's MoE router).
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
        self.bias, self.expert_groups = None, None
        if config.router_bias:
            add_router_bias(self, self.num_experts, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (sequence-sharded under SP) -> gates [s, b, N] in fp32 for the full sequence."""
        logits = grouped_logits(F.linear, hidden_states, self.weight, self.expert_groups).float()
        bias = effective_bias(self, torch.float32)
        if bias is not None:
            logits = logits + bias
        gates = torch.softmax(logits, dim=-1)
        if self.topk is not None and self.topk < self.num_experts:
            top, index = gates.topk(self.topk, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(gates, tensor_parallel_output_grad=True)
        return copy_to_tensor_model_parallel_region(gates)


class BiasedTopKRouter(TopKRouter):
    """megatron-core's FFN router with a per-expert bias on its logits (``router_bias``).

    megatron-core's own router bias exists only with ``add_bias_linear``, a bias on every linear
    layer of the model; this one is the router's alone. The logits are megatron-core's gating
    (``router_gating_linear`` without bias, in the router dtype) plus b + offset, so a zero bias
    leaves them bit for bit as an unbiased router's. The bias is a replicated parameter like the
    weight: saved under ``router.bias`` by megatron-core's default sharded state dict.
    """

    def __init__(self, config: BAMConfig, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        add_router_bias(self, self.config.num_moe_experts, config)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits W x + (b + offset), in the router dtype as megatron-core's ``Router.gating``."""
        if self.weight.device.type == "cpu":  # megatron-core builds router weights on the CPU and moves them here
            device = torch.cuda.current_device()
            self.weight.data, self.bias.data = self.weight.data.to(device), self.bias.data.to(device)
            setattr(self, BIAS_OFFSET, getattr(self, BIAS_OFFSET).to(device))
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        gemm = lambda x, rows: router_gating_linear(x, rows, None, router_dtype)  # noqa: E731
        logits = grouped_logits(gemm, input, self.weight, self.expert_groups)
        return logits + effective_bias(self, logits.dtype)
