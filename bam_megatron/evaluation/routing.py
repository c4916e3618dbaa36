"""Where an MoE model routes each domain's tokens, read by forward hooks on its routers.

- Soft MoA attention router (``layer.self_attention.router``, an ``AttentionRouter``): returns the
  gates ``[s, b, N]`` of every token for every attention expert (full sequence, also under sequence
  parallelism). Reported: the mean gate per expert per layer (sums to 1 over experts).
- FFN router (``layer.mlp.router``, megatron-core's ``TopKRouter``): returns ``(probs, routing_map)``
  with ``routing_map`` a ``[tokens, E]`` boolean map of each token's top-k experts, over this rank's
  tokens (its sequence shard under sequence parallelism). Reported: the fraction of tokens whose
  top-k includes each expert (sums to k over experts).

Only tokens with a non-zero loss mask count (the same tokens as the perplexity). Sums are kept per
global layer on every rank and added up over all ranks, counting replicated outputs once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer

from bam_megatron.model.router import AttentionRouter


class RoutingCollector:
    """Forward hooks on one model's routers; ``set_batch`` before each micro-batch, ``result`` per domain."""

    def __init__(self, model: torch.nn.Module, num_layers: int, num_experts: int, device: torch.device) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sums = {"attention_gates": zeros(num_layers, num_experts), "ffn_selection": zeros(num_layers, num_experts)}
        self.tokens = {"attention_gates": zeros(num_layers), "ffn_selection": zeros(num_layers)}
        self.mask: Optional[torch.Tensor] = None  # [b, s] loss mask of the micro-batch being run
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = model.config.sequence_parallel
        self._handles = []
        for layer in model.decoder.layers:
            index = layer.layer_number - 1  # megatron-core numbers layers globally from 1
            router = getattr(layer.self_attention, "router", None)
            if isinstance(router, AttentionRouter):
                self._handles.append(router.register_forward_hook(self._attention_hook(index)))
            if isinstance(layer.mlp, MoELayer):
                self._handles.append(layer.mlp.router.register_forward_hook(self._ffn_hook(index)))

    def set_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Remember the loss mask of the micro-batch about to run."""
        self.mask = batch["loss_mask"]

    def _add(self, kind: str, layer: int, per_token: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.to(per_token.device, torch.float64)
        self.sums[kind][layer] += (per_token.double() * mask.unsqueeze(-1)).sum(dim=tuple(range(mask.dim())))
        self.tokens[kind][layer] += mask.sum()

    def _attention_hook(self, layer: int):
        def hook(module, inputs, gates: torch.Tensor) -> None:
            if self.tp_rank == 0:  # the gates are the same on every tensor-parallel rank
                self._add("attention_gates", layer, gates, self.mask.t())  # gates: [s, b, N]

        return hook

    def _ffn_hook(self, layer: int):
        def hook(module, inputs, output) -> None:
            _, routing_map = output  # [s_local·b, E], sequence-major like hidden.view(-1, h)
            mask = self.mask.t()  # [s, b]
            local = routing_map.shape[0] // mask.shape[1]
            if self.sequence_parallel:  # each tensor-parallel rank routes its own sequence shard
                mask = mask[self.tp_rank * local : (self.tp_rank + 1) * local]
            elif self.tp_rank != 0:  # every tensor-parallel rank routes the same tokens
                return
            self._add("ffn_selection", layer, routing_map, mask.reshape(-1))

        return hook

    def reset(self) -> None:
        """Start a new domain."""
        for tensor in (*self.sums.values(), *self.tokens.values()):
            tensor.zero_()

    def result(self) -> dict[str, list[list[float]]]:
        """{kind: per layer, per expert mean} over all ranks; kinds this model has no router for are left out.

        A collective: every rank calls it.
        """
        out = {}
        for kind in self.sums:
            dist.all_reduce(self.sums[kind])
            dist.all_reduce(self.tokens[kind])
            if bool((self.tokens[kind] > 0).any()):
                means = self.sums[kind] / self.tokens[kind].clamp(min=1).unsqueeze(1)
                out[kind] = [[float(v) for v in row] for row in means.cpu()]
        return out

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
