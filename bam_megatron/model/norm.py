"""Norms: a PyTorch LayerNorm/RMSNorm that megatron-core's sequence parallelism accepts (`TorchNorm`);
norms after attention and the FFN (`PostNorm`); Q/K RMSNorm over a whole projection (`ProjectionRMSNorm`).

megatron-core's `WrappedTorchNorm` refuses ``sequence_parallel`` outright. The only thing sequence
parallelism needs from a norm is that its parameters are marked ``sequence_parallel``: each TP rank
then sees a different slice of the sequence, and ``finalize_model_grads`` all-reduces the marked
gradients across the TP group (as it does for Transformer Engine and apex norms). This is the
local-spec norm on machines without Transformer Engine, CPU mode included.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
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
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs Transformer Engine or apex norms")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization={config.normalization!r}: TorchNorm supports {sorted(kinds)}")
        # LayerNorm without bias (as Cohere's): the two norms then have the same parameters.
        extra = {"bias": False} if config.normalization == "LayerNorm" else {}
        norm = kinds[config.normalization](hidden_size, eps=eps, **extra)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class PostNorm:
    """Mixin: a module returning (output, bias) whose output is normalised, ``post_layernorm``.

    megatron-core 0.16.1's TransformerLayer has norms only before attention and the MLP
    (``input_layernorm``, ``pre_mlp_layernorm``); OLMo 2's norms come after them, inside the
    residual: h = x + Norm(Attn(x)). The layer's pre-norms are then IdentityOp and the attention (or
    MLP, or MoE layer) class is this mixin over it (`post_normed`), so the norm sees the whole
    output: after the TP reduction of the output GEMM, after the weighted sum of the MoE experts,
    after the soft-MoA mixture. ``post_norm`` (a ModuleSpec param) is the norm's spec.
    """

    def __init__(self, *args: Any, post_norm: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self.post_layernorm = build_module(
            post_norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Norm(output + bias), no bias."""
        output, bias = super().forward(*args, **kwargs)
        if bias is not None:
            output = output + bias
        return self.post_layernorm(output), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> dict:
        """The wrapped module's, and the norm's (replicated). megatron-core's MLP asks each child for its
        own sharded_state_dict, which a torch norm has not: the norm is left out of that walk."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        norm = self._modules.pop("post_layernorm")
        try:
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._modules["post_layernorm"] = norm
        out.update(sharded_state_dict_default(norm, f"{prefix}post_layernorm.", sharded_offsets, metadata))
        return out


@functools.cache
def post_normed(cls: type) -> type:
    """``cls`` with its output normalised (`PostNorm`); one class per ``cls``."""
    return type(f"PostNorm{cls.__name__}", (PostNorm, cls), {"__doc__": f"{cls.__name__}, output normalised."})


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
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization={config.normalization!r}: ProjectionRMSNorm is an RMSNorm")
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
