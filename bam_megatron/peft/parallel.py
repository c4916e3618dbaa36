"""How an adapted linear layer is split over tensor parallelism, and the communication that
gives its adapter the same split.

megatron-core's linears come in three communication modes, and an adapter must follow the one of
the linear it adapts:

- **column-parallel** (``linear_qkv``, ``linear_fc1``): input replicated (under sequence
  parallelism: sharded along the sequence and all-gathered inside the linear), output sharded
  along features. The input gradient is reduced by the linear (all-reduce, or reduce-scatter
  under sequence parallelism).
- **row-parallel** (``linear_proj``, ``linear_fc2``): input sharded along features, output reduced
  inside the linear (all-reduce, or reduce-scatter along the sequence under sequence parallelism).
- **partial** (``explicit_expert_comm``): MoE experts split over expert tensor parallelism, and this
  project's `PartialSumRowParallelLinear` (the parallel block's fused reduction): the linear does
  no communication. Column-parallel experts get the same tokens on every rank and leave partial
  input gradients to the token dispatcher; row-parallel ones return partial sums that someone
  else reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from bam_megatron.platform import internals


@dataclass(frozen=True)
class LinearInfo:
    """What an adapter needs to know about the linear it adapts.

    Attributes:
        kind: 'column' or 'row'.
        in_features, out_features: this rank's weight shape (``weight`` is [out, in]).
        tp_group: the linear's tensor-parallel group (the expert TP group for experts).
        partial: the linear communicates nothing itself (``explicit_expert_comm``).
        sequence_parallel: the linear gathers (column) / reduce-scatters (row) along the sequence.
        is_expert: an MoE expert's linear.
        allreduce: megatron-core DDP's flag: False for expert-parallel parameters.
    """

    kind: str
    in_features: int
    out_features: int
    tp_group: Any
    partial: bool
    sequence_parallel: bool
    is_expert: bool
    allreduce: bool

    @property
    def tp_size(self) -> int:
        """Ranks in the linear's tensor-parallel group."""
        return self.tp_group.size()

    @property
    def tp_rank(self) -> int:
        """This rank's index in the linear's tensor-parallel group."""
        return self.tp_group.rank()


def _te_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Transformer Engine's column/row linears, where TE is installed (else empty)."""
    try:
        from megatron.core.extensions import transformer_engine as te
    except Exception:  # noqa: BLE001 - TE missing or unusable: nothing to recognise
        return (), ()
    column, row = getattr(te, "TEColumnParallelLinear", None), getattr(te, "TERowParallelLinear", None)
    if not getattr(te, "HAVE_TE", False) or not isinstance(column, type) or not isinstance(row, type):
        return (), ()  # megatron-core defines placeholders when TE is not installed
    return (column,), (row,)


def describe_linear(linear: torch.nn.Module, name: str) -> LinearInfo:
    """The `LinearInfo` of a megatron-core (local or Transformer Engine) parallel linear.

    Raises:
        NotImplementedError: for linears without a separate weight (fused layer-norm linears,
            grouped GEMMs) or of an unknown type, naming ``name``.
    """
    te_column, te_row = _te_classes()
    weight = getattr(linear, "weight", None)
    if isinstance(linear, (ColumnParallelLinear, RowParallelLinear)):
        kind = "column" if isinstance(linear, ColumnParallelLinear) else "row"
        tp_group, partial = linear.tp_group, bool(linear.explicit_expert_comm)
        sequence_parallel = bool(linear.sequence_parallel) and not partial
        is_expert = bool(linear.is_expert)
    elif te_column and isinstance(linear, te_column + te_row):
        kind = "column" if isinstance(linear, te_column) else "row"
        # TE builds expert linears that communicate explicitly with parallel_mode=None
        tp_group, partial = internals.tensor_parallel_group(linear), linear.parallel_mode is None
        sequence_parallel = bool(linear.sequence_parallel) and not partial
        is_expert = bool(getattr(linear, "is_expert", partial))
    else:
        raise NotImplementedError(
            f"PEFT cannot adapt {name}: {type(linear).__name__} is not a megatron-core "
            "ColumnParallelLinear/RowParallelLinear or Transformer Engine TEColumnParallelLinear/"
            "TERowParallelLinear (fused layer-norm linears and grouped GEMMs are not supported)"
        )
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
        raise NotImplementedError(f"PEFT cannot adapt {name}: it has no single 2-D weight")
    out_features, in_features = weight.shape
    return LinearInfo(
        kind,
        in_features,
        out_features,
        tp_group,
        partial,
        sequence_parallel,
        is_expert,
        allreduce=getattr(weight, "allreduce", True),
    )


# ---------------------------------------------------------------------------------------------
# communication of adapter activations (every function is the identity on one rank)


def column_spread(info: LinearInfo) -> Callable[[torch.Tensor], torch.Tensor]:
    """For a per-token tensor computed from a column-parallel linear's input with *replicated*
    weights, and then consumed by rank-local (output-sharded) computations: the mapping that gives
    it the full sequence and turns its partial gradient into the full one.

    - no sequence parallelism: identity forward, all-reduce backward;
    - sequence parallelism: all-gather along the sequence forward, reduce-scatter backward (the
      replicated weights then see only this rank's tokens: mark them ``sequence_parallel``);
    - partial (experts): identity; the replicated weights must reduce their gradients themselves
      (`replicated_weight`), and the input gradient stays partial, as the dispatcher expects.
    """
    if info.partial or info.tp_size == 1:
        return lambda z: z
    if info.sequence_parallel:
        return lambda z: gather_from_sequence_parallel_region(z, tensor_parallel_output_grad=True, group=info.tp_group)
    return lambda z: copy_to_tensor_model_parallel_region(z, group=info.tp_group)


def replicated_weight(weight: torch.Tensor, info: LinearInfo) -> torch.Tensor:
    """A replicated weight whose gradient is a partial sum on each rank (experts' column adapters,
    row adapters' B before a partial-sum output): identity forward, all-reduce of the gradient."""
    if info.tp_size == 1:
        return weight
    return copy_to_tensor_model_parallel_region(weight, group=info.tp_group)


def reduce_partial(z: torch.Tensor, info: LinearInfo, scatter: bool = False) -> torch.Tensor:
    """Sum a partial per-token tensor over the TP group: all-reduce, or reduce-scatter along the
    sequence (``scatter``, sequence parallelism). Backward: identity / all-gather."""
    if info.tp_size == 1:
        return z
    if scatter:
        return reduce_scatter_to_sequence_parallel_region(z, group=info.tp_group)
    return reduce_from_tensor_model_parallel_region(z, group=info.tp_group)


def partial_grad(z: torch.Tensor, info: LinearInfo) -> torch.Tensor:
    """A full, replicated tensor consumed by rank-partial computations: identity forward,
    all-reduce of its gradient."""
    if info.tp_size == 1:
        return z
    return copy_to_tensor_model_parallel_region(z, group=info.tp_group)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear in the activation's dtype (adapters may be kept in another precision)."""
    return F.linear(x, weight.to(x.dtype))
