"""The parallel attention + FFN block (GPT-J / PaLM style) with one shared pre-norm::

    x̂ = Norm(x)
    y = x + Attn(x̂) + FFN(x̂)

With a dense FFN both branches end in a row-parallel GEMM whose outputs are partial sums over
the tensor-parallel ranks. The fused block adds the two partial sums first and reduces once
(one all-reduce, or one reduce-scatter under sequence parallelism, per layer instead of two).
With megatron-core's MoELayer as the FFN, the MoE layer communicates on its own (token dispatch)
and only the attention output is reduced, as usual.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class PartialSumRowParallelLinear(RowParallelLinear):
    """A RowParallelLinear that returns this rank's partial sum: the caller does the reduction.

    Uses megatron-core's own switch for "communication happens outside" (``explicit_expert_comm``,
    which its experts use), so weights, sharding and checkpoints are those of RowParallelLinear.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.skip_bias_add:
            raise ValueError("PartialSumRowParallelLinear needs skip_bias_add=True")
        self.explicit_expert_comm = True


def _sum_bias(*biases: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    present = [b for b in biases if b is not None]
    return sum(present) if present else None


class ParallelTransformerLayer(TransformerLayer):
    """y = x + Attn(Norm(x)) + FFN(Norm(x)), built from megatron-core's TransformerLayer spec slots.

    ``input_layernorm`` is the shared pre-norm; ``pre_mlp_layernorm`` must be IdentityOp.
    Output projections of type `PartialSumRowParallelLinear` in both branches select the fused
    single reduction.
    """

    def __init__(self, config, submodules, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        partial = [
            isinstance(getattr(branch, name, None), PartialSumRowParallelLinear)
            for branch, name in ((self.self_attention, "linear_proj"), (self.mlp, "linear_fc2"))
        ]
        if any(partial) and not all(partial):
            raise ValueError(
                "fused TP reduction needs PartialSumRowParallelLinear as both the attention "
                "output projection and the FFN's linear_fc2"
            )
        self.fuse_tp_reduction = all(partial)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
        padding_mask: Optional[torch.Tensor] = None,
        inference_context: Any = None,
        context: Optional[torch.Tensor] = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Same call and return convention as megatron-core's TransformerLayer."""
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)  # x̂ = Norm(x)

        attn_out, attn_bias = self.self_attention(
            normed,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            inference_context=inference_context,
        )
        mlp = functools.partial(self.mlp, padding_mask=padding_mask)
        if self.recompute_mlp:
            ffn_out, ffn_bias = tensor_parallel.checkpoint(mlp, False, normed)
        else:
            ffn_out, ffn_bias = mlp(normed)

        out = attn_out + ffn_out  # Attn(x̂) + FFN(x̂)
        if self.fuse_tp_reduction:  # both are partial sums over the TP group: reduce once
            if self.config.sequence_parallel:
                out = reduce_scatter_to_sequence_parallel_region(out, group=self.pg_collection.tp)
            else:
                out = reduce_from_tensor_model_parallel_region(out, group=self.pg_collection.tp)

        # y = x + out (+ bias, dropout), megatron-core's bias-dropout-add
        with self.bias_dropout_add_exec_handler():
            output = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                (out, _sum_bias(attn_bias, ffn_bias)), residual, self.hidden_dropout
            )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
        return output, context
