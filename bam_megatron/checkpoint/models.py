"""A checkpoint's model, built for a parallel layout and loaded: what tools that evaluate or
convert a checkpoint (rather than train it) start from."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from bam_megatron.checkpoint.meta import CheckpointMeta
from bam_megatron.checkpoint.store import load_checkpoint, read_meta
from bam_megatron.errors import ConfigError


def load_model(
    path: str,
    meta: Optional[CheckpointMeta] = None,
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    sequence_parallel: bool = False,
    seq_length: Optional[int] = None,
    backend: str = "auto",
) -> torch.nn.Module:
    """This rank's part of the checkpoint ``path`` under the given layout, weights loaded
    (resharded), fp32, dropout and recompute off, in eval mode; a grown mixture's routers carry the
    offsets of its new-expert ramp at the checkpoint's iteration (`bam_megatron.model.router_ramp`).

    Call after ``bam_megatron.platform.distributed.initialize`` with the same sizes. A dense model
    is built at EP = 1 whatever ``expert`` says (megatron-core's expert parallelism needs experts).
    """
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.model.router_ramp import apply_ramp

    meta = meta if meta is not None else read_meta(path)
    architecture = meta.architecture
    expert = expert if architecture.is_moe else 1
    try:
        architecture.check_layout(tensor, pipeline, expert)
    except ConfigError as error:
        raise ConfigError(f"checkpoint {path}: {error}") from None
    config = architecture.model_config(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # every weight is loaded
    )
    model = build_from_architecture(architecture, config, seq_length or meta.seq_length, backend=backend)
    with warnings.catch_warnings():  # torch's notes on megatron-core's checkpoint internals, not the user's
        warnings.filterwarnings(
            "ignore", message=r"(`load_state_dict` is deprecated|Please use DTensor)", category=FutureWarning
        )
        load_checkpoint(path, model, load_rng=False)
    model.config.finalize_model_grads_func = None  # forward only
    # A grown mixture computes with its new experts' router offsets at this iteration (docs/phases.md).
    apply_ramp(model, meta.lineage, meta.iteration, architecture.num_experts or 0)
    return model.eval()
