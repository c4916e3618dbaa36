"""megatron-core GPTModel assembly shared by every model this project builds."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from bam_megatron.model.norm import TorchNorm


def local_gpt_layer_spec(num_experts: Optional[int] = None) -> ModuleSpec:
    """megatron-core's own local GPT layer, with norms that accept sequence parallelism."""
    spec = get_gpt_layer_local_spec(num_experts=num_experts)
    spec.submodules = dataclasses.replace(spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm)
    return spec


def block_spec(config: TransformerConfig, layer_spec: ModuleSpec, final_norm: type = TorchNorm) -> ModuleSpec:
    """The layers of this pipeline stage plus the final norm."""
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(config), layer_norm=final_norm
        ),
    )


def gpt_model(
    config: TransformerConfig,
    transformer_spec: ModuleSpec,
    vocab_size: int,
    max_sequence_length: int,
    untie_embeddings: bool = True,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """A RoPE GPTModel holding this rank's pipeline stage (first/last stage from parallel state)."""
    from megatron.core import parallel_state

    model = GPTModel(
        config=config,
        transformer_layer_spec=transformer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=not untie_embeddings,
        position_embedding_type="rope",
        rotary_base=getattr(config, "rotary_base", 10000.0),
        rope_scaling=getattr(config, "rope_scaling_factor", None) is not None,
        rope_scaling_factor=getattr(config, "rope_scaling_factor", None) or 8.0,
    )
    if getattr(config, "scale_embeddings", False) and model.pre_process:
        # Gemma: embeddings times sqrt(hidden), in their dtype (GPTModel's embedding has no such scale;
        # it is linear, so after the embedding's dropout is the same).
        scale = config.hidden_size**0.5
        model.embedding.register_forward_hook(lambda module, args, out: out * torch.tensor(scale, dtype=out.dtype))
    if getattr(config, "final_logit_softcapping", None) and model.post_process:
        cap = config.final_logit_softcapping  # Gemma 2: logits c·tanh(z/c) (GPTModel has no such cap)
        model.output_layer.register_forward_hook(lambda module, args, out: (torch.tanh(out[0] / cap) * cap, out[1]))
    return model


def build_gpt(config: TransformerConfig, layer_spec: ModuleSpec, vocab_size: int, max_sequence_length: int) -> GPTModel:
    """A GPTModel of ``layer_spec`` layers (megatron-core's own layers: tests, demo, benchmarks)."""
    return gpt_model(config, block_spec(config, layer_spec), vocab_size, max_sequence_length)
