"""Block specs and a GPTModel builder on megatron-core's local (pure PyTorch) modules."""

from __future__ import annotations

import dataclasses

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


def local_gpt_layer_spec(num_experts: int | None = None) -> ModuleSpec:
    """megatron-core's local GPT layer with norms that accept sequence parallelism."""
    spec = get_gpt_layer_local_spec(num_experts=num_experts)
    spec.submodules = dataclasses.replace(
        spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm
    )
    return spec


def block_spec(config: TransformerConfig, layer_spec: ModuleSpec) -> ModuleSpec:
    """The layers of this pipeline stage plus a final norm that accepts sequence parallelism."""
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(config), layer_norm=TorchNorm
        ),
    )


def build_gpt(
    config: TransformerConfig,
    layer_spec: ModuleSpec,
    vocab_size: int,
    max_sequence_length: int,
    untie_embeddings: bool = True,
    position_embedding_type: str = "rope",
) -> GPTModel:
    """A GPTModel holding this rank's pipeline stage."""
    from megatron.core import parallel_state

    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, layer_spec),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not untie_embeddings,
        position_embedding_type=position_embedding_type,
    )
