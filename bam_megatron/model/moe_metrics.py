"""Per-layer FFN-router losses, read from megatron-core's MoE logging tracker."""

from __future__ import annotations

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)


def moe_aux_losses(reduce_across_ranks: bool = True) -> dict[str, list[float]]:
    """Load-balancing and z-loss of every layer, accumulated since the last call, then reset.

    megatron-core's routers record each loss per layer, before its coefficient is applied,
    while training (a balanced Switch loss is about 1). With ``reduce_across_ranks`` the values are
    first summed over pipeline stages and
    averaged over data-parallel ranks (a collective: call it on every rank).
    """
    tracker = get_moe_layer_wise_logging_tracker()
    if reduce_across_ranks and tracker:
        reduce_aux_losses_tracker_across_ranks()
    losses = {name: [float(v) for v in entry["values"].tolist()] for name, entry in tracker.items()}
    clear_aux_losses_tracker()
    return losses
