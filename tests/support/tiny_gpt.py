"""Tiny models, their data and training steps, shared by the multi-rank tests.

Models: ``gpt`` / ``gpt-moe`` are megatron-core's own local GPT layer (dense / MoE FFN); the BAM
variants (``dense``, ``bam``, ``bam-shared-kv``, ``btx``) come from `bam_megatron.model.builder`.
Every function here runs inside a rank started by `bam_megatron.testing.distributed.run_distributed`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from bam_megatron.model.builder import build_model
from bam_megatron.model.configs import variant_config
from bam_megatron.model.gpt import build_gpt, local_gpt_layer_spec
from bam_megatron.model.variants import VARIANTS
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.shards import load_full_weights, local_shards

SEQ = 16
VOCAB = 128
NUM_EXPERTS = 4
GLOBAL_MICRO_BATCH = 4  # rows per micro-batch summed over data-parallel ranks


def tiny_config(sizes: ParallelSizes, moe: bool = False, dropout: float = 0.0) -> TransformerConfig:
    """SwiGLU, RMSNorm, RoPE, no biases: the building blocks the BAM models use."""
    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert,
        sequence_parallel=sizes.sequence_parallel,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        num_moe_experts=NUM_EXPERTS if moe else None,
        moe_router_topk=1,
        moe_router_pre_softmax=True,
        moe_token_dispatcher_type="alltoall",
        # The load-balancing loss is not additive over data-parallel shards of a batch, so
        # exact one-rank equivalence is checked without it (z-loss is a per-token mean: kept).
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=1e-3 if moe else None,
    )


def micro_batches(num_microbatches: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's slice of a fixed global batch: (tokens, labels) per micro-batch."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    rows = GLOBAL_MICRO_BATCH // dp_size
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        data = torch.randint(0, VOCAB, (GLOBAL_MICRO_BATCH, SEQ + 1), generator=gen)
        mine = data[dp_rank * rows : (dp_rank + 1) * rows]
        batches.append((mine[:, :-1].contiguous(), mine[:, 1:].contiguous()))
    return batches


def forward_step(data_iterator, model):
    """megatron-core forward step: mean token loss of one micro-batch."""
    tokens, labels = next(data_iterator)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.float().mean()
        # clone: megatron-core's schedule divides the returned loss in place by the micro-batch count
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def bam_config(sizes: ParallelSizes, variant: str, dropout: float = 0.0, **overrides):
    """The tiny preset of a BAM variant, with the same equivalence-friendly MoE settings."""
    return variant_config(
        variant,
        preset="tiny",
        num_experts=NUM_EXPERTS,
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert,
        sequence_parallel=sizes.sequence_parallel,
        use_cpu_initialization=True,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        moe_aux_loss_coeff=0.0,  # see tiny_config
        **overrides,
    )


def build(
    sizes: ParallelSizes,
    model: str,
    full_weights=None,
    use_distributed_optimizer=False,
    dropout=0.0,
    overrides: dict | None = None,
):
    """Initialise parallel state and return (config, DDP-wrapped model) for this rank."""
    initialize(sizes, seed=1234)
    if model in VARIANTS:
        config = bam_config(sizes, model, dropout, **(overrides or {}))
        model = build_model(config, VOCAB, SEQ)
    else:
        moe = {"gpt": False, "gpt-moe": True}[model]
        config = tiny_config(sizes, moe, dropout)
        model = build_gpt(config, local_gpt_layer_spec(NUM_EXPERTS if moe else None), VOCAB, SEQ)
    if full_weights is not None:
        load_full_weights(model, full_weights)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    return config, ddp


def forward_backward(ddp, num_microbatches: int, seed: int = 7) -> float | None:
    """One forward/backward over a global batch with megatron-core's schedule; the mean loss
    on the last pipeline stage (averaged over data-parallel ranks), None elsewhere."""
    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches(num_microbatches, seed)),
        model=[ddp],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=GLOBAL_MICRO_BATCH // parallel_state.get_data_parallel_world_size(),
        forward_only=False,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    loss = torch.stack([d["lm loss"] for d in losses]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def gradient_step(
    sizes: ParallelSizes,
    model: str,
    full_weights,
    num_microbatches: int,
    corrupt_rank: int | None = None,
    overrides: dict | None = None,
) -> dict[str, Any]:
    """Rank body: loss, gradient shards and weight shards after one forward/backward.

    ``corrupt_rank`` perturbs that rank's shard of the first QKV weight: the negative control
    that shows the equivalence checks notice a wrong shard.
    """
    _, ddp = build(sizes, model, full_weights, overrides=overrides)
    model = ddp.module
    if corrupt_rank is not None and torch.distributed.get_rank() == corrupt_rank:
        with torch.no_grad():
            model.decoder.layers[0].self_attention.linear_qkv.weight[0].add_(0.5)
    loss = forward_backward(ddp, num_microbatches)
    return {
        "loss": loss,
        "grads": local_shards(model, gradients=True),
        "weights": local_shards(model),
    }


def adam_steps(
    sizes: ParallelSizes, model: str, full_weights, steps: int, num_microbatches: int, use_distributed_optimizer: bool
) -> dict[str, Any]:
    """Rank body: ``steps`` AdamW updates with megatron-core's DDP and (distributed) optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    _, ddp = build(sizes, model, full_weights, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.1,
            clip_grad=1.0,
            adam_eps=1e-4,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        [ddp],
    )
    initial = local_shards(ddp.module)
    losses, grad_norms = [], []
    for step in range(steps):
        optimizer.zero_grad()
        losses.append(forward_backward(ddp, num_microbatches, seed=100 + step))
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        grad_norms.append(grad_norm)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "initial": initial,
        "weights": local_shards(ddp.module),
    }
