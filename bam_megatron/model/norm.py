"""A PyTorch LayerNorm/RMSNorm that megatron-core's sequence parallelism accepts.

megatron-core's `WrappedTorchNorm` refuses ``sequence_parallel`` outright. The only thing sequence
parallelism needs from a norm is that its parameters are marked ``sequence_parallel``: each TP rank
then sees a different slice of the sequence, and ``finalize_model_grads`` all-reduces the marked
gradients across the TP group (as it does for Transformer Engine and apex norms). This is the
local-spec norm on machines without Transformer Engine, CPU mode included.
"""

from __future__ import annotations

import torch
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
