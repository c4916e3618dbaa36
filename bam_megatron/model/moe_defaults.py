"""How a mixture routes and trains unless told otherwise: the one place these defaults live.

A leaf module (no torch, no megatron-core), so that the flags of pretrain_bam.py, the model
configs (`bam_megatron.model.configs`) and the ``args`` written for Megatron-LM
(`bam_megatron.checkpoint.megatron_lm_args`) all read the same values.
"""

from __future__ import annotations

MOE_ROUTER_PRE_SOFTMAX = True
"""FFN routing: softmax over all experts, then the top-k weights as they are (the paper's)."""

MOE_TRAINING_DEFAULTS = {
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 1e-2,
    "moe_z_loss_coeff": 1e-3,
    "moe_token_dispatcher_type": "alltoall",
}
"""megatron-core TransformerConfig settings every mixture trains with unless a flag says otherwise:
Switch load balancing (coefficient 1e-2), router z-loss (1e-3), all-to-all token dispatch."""
