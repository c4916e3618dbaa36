"""Norms: a PyTorch LayerNorm/RMSNorm that megatron-core's sequence parallelism accepts (`TorchNorm`);
norms after attention and the FFN (`PostNormBiasDropoutAdd`); Q/K RMSNorm over a whole projection (`ProjectionRMSNorm`).

megatron-core's `WrappedTorchNorm` refuses ``sequence_parallel`` outright. The only thing sequence
parallelism needs from a norm is that its parameters are marked ``sequence_parallel``: each TP rank
then sees a different slice of the sequence, and ``finalize_model_grads`` all-reduces the marked
gradients across the TP group (as it does for Transformer Engine and apex norms). This is the
local-spec norm on machines without Transformer Engine, CPU mode included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Build ``torch.nn.LayerNorm`` (no bias) or ``torch.nn.RMSNorm`` from a TransformerConfig (spec-compatible)."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization={config.normalization!r}: TorchNorm supports {sorted(kinds)}")
        if config.layernorm_zero_centered_gamma:
            norm = OnePlusNorm(hidden_size, eps, rms=config.normalization == "RMSNorm")
        else:  # LayerNorm without bias (as Cohere's): the two norms then have the same parameters.
            extra = {"bias": False} if config.normalization == "LayerNorm" else {}
            norm = kinds[config.normalization](hidden_size, eps=eps, **extra)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class OnePlusNorm(torch.nn.Module):
    """(1 + weight) x Norm(x), in fp32, ``weight`` starting at 0: megatron-core's
    ``layernorm_zero_centered_gamma`` (Gemma's RMSNorm) for the local backend; RMSNorm or bias-free LayerNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, rms: bool = True) -> None:
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Norm over the last dimension, times (1 + weight)."""
        shape, y = x.shape[-1:], x.float()
        y = F.rms_norm(y, shape, eps=self.eps) if self.rms else F.layer_norm(y, shape, eps=self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class PostNormBiasDropoutAdd(torch.nn.Module):
    """megatron-core's bias-dropout-add with a norm first: x + dropout(Norm(output + bias)).

    megatron-core 0.16.1's TransformerLayer has norms only before attention and the MLP
    (``input_layernorm``, ``pre_mlp_layernorm``); OLMo 2's come after them, inside the residual:
    h = x + Norm(Attn(x)), y = h + Norm(FFN(h)). The layer's ``self_attn_bda`` / ``mlp_bda`` seam
    is where the output meets the residual, after the TP reduction of the output GEMM, the weighted
    sum of the MoE experts or the soft-MoA mixture; with the pre-norms IdentityOp, this module there
    makes the post-norm layer for every attention and FFN unchanged. TransformerLayer builds the
    bda spec without arguments: ``config`` and ``norm`` (the norm's spec) are ModuleSpec params.
    It is called as megatron-core's ``get_bias_dropout_add``: ``(training, fused)`` -> the function.
    """

    def __init__(self, config: TransformerConfig, norm: Any) -> None:
        super().__init__()
        self.post_layernorm = build_module(
            norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    def forward(self, training: bool, fused: bool) -> Callable:
        """The bias-dropout-add function of megatron-core, applied to the normalised output."""
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

        bias_dropout_add = get_bias_dropout_add(training, fused)

        def normed(x_with_bias: tuple, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            return bias_dropout_add((self.post_layernorm(x if bias is None else x + bias), None), residual, prob)

        return normed


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over a whole Q or K projection (OLMo 2's q_norm / k_norm), in SelfAttention's
    ``q_layernorm`` / ``k_layernorm`` seam, which hands it this TP rank's heads [s, b, heads, d].

    Heads are normalised together by group, ``head_group`` (a ModuleSpec param, one entry per head
    of the whole attention, in its order): all in one group for a dense model; soft MoA, each
    expert's heads (`soft_moa.head_to_expert`). The mean square of a group runs over every head of
    it on every TP rank (an autograd all-reduce of the per-group sums of squares). ``weight`` is
    [heads * d] for all heads, replicated across TP (each rank uses its heads' entries): as for
    per-head q/k norms, megatron-core's finalize_model_grads sums its gradient over TP, which gives
    every rank the whole gradient.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *, head_group: tuple[int, ...]):
        super().__init__()
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("ProjectionRMSNorm is an RMSNorm with its weight (no layernorm_zero_centered_gamma)")
        from bam_megatron.model.soft_moa import on_this_rank

        # Plain Python for the layout: the model may be built on the meta device.
        sizes = [head_group.count(g) * hidden_size for g in range(max(head_group) + 1)]
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(len(head_group) * hidden_size))
        self.register_buffer("heads", on_this_rank(torch.arange(len(head_group))), persistent=False)
        self.register_buffer("group", on_this_rank(torch.tensor(head_group)), persistent=False)
        self.register_buffer("size", torch.tensor(sizes, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, heads, d] -> each group of heads divided by its root mean square, times the weight."""
        from megatron.core import parallel_state

        squares = x.float().pow(2).sum(-1)  # [s, b, heads]
        sums = squares.new_zeros(*squares.shape[:-1], len(self.size)).index_add(-1, self.group, squares)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            sums = all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
        scale = torch.rsqrt(sums / self.size + self.eps)[..., self.group]
        weight = self.weight.view(-1, x.shape[-1])[self.heads]
        return (x.float() * scale.unsqueeze(-1)).to(x.dtype) * weight
