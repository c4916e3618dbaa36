"""One function from a model's config to a megatron-core GPTModel (RoPE), and the same for an
`Architecture` (its vocabulary and embedding tying); configs come from `bam_megatron.model.configs`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megatron.core.models.gpt import GPTModel

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.gpt import gpt_model
from bam_megatron.model.specs import get_bam_block_spec

if TYPE_CHECKING:
    from bam_megatron.model.architecture import Architecture


def build_model(
    config: BAMConfig,
    vocab_size: int,
    max_sequence_length: int,
    untie_embeddings: bool = True,
    backend: str = "auto",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """A GPTModel (RoPE) holding this rank's pipeline stage of the model ``config`` describes."""
    return gpt_model(
        config,
        get_bam_block_spec(config, backend),
        vocab_size,
        max_sequence_length,
        untie_embeddings,
        pre_process,
        post_process,
    )


def build_from_architecture(
    architecture: Architecture,
    config: BAMConfig,
    max_sequence_length: int,
    backend: str = "auto",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """`build_model` for ``architecture`` (its vocabulary and embedding tying) with ``config``,
    which `Architecture.model_config` made with the builder's parallel layout and settings."""
    return build_model(
        config,
        architecture.padded_vocab_size,
        max_sequence_length,
        untie_embeddings=architecture.untie_embeddings_and_output_weights,
        backend=backend,
        pre_process=pre_process,
        post_process=post_process,
    )
