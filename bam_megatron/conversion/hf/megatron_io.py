"""bam-megatron checkpoints in and out of the converter, on one process.

A checkpoint saved under any TP/PP/EP layout is read through dist_checkpointing into a TP=PP=EP=1
model (dist_checkpointing reshards on load), so the converter sees every tensor whole, by
megatron-core's parameter names. Imported weights are written the same way pretrain_bam.py saves:
an ``iter_*`` directory, the ``latest`` file and the `CheckpointMeta`.
"""

from __future__ import annotations

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointError, CheckpointMeta
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.model.architecture import Architecture


def read_checkpoint(path: str) -> tuple[str, CheckpointMeta]:
    """A --save directory or an iter_* directory -> (iteration directory, its meta)."""
    try:
        resolved = checkpoint.resolve_checkpoint(path)
        return resolved, checkpoint.read_meta(resolved)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None


def build_one_rank_model(architecture: Architecture, seq_length: int):
    """(GPTModel, BAMConfig) for ``architecture`` on this process alone (a world of one unless one is running)."""
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    config = architecture.one_rank_config()
    config.use_cpu_initialization = not torch.cuda.is_available()
    # The local (PyTorch) spec on any machine: its parameter names are the ones the converter maps.
    return build_from_architecture(architecture, config, seq_length, backend="local"), config


def load_weights(path: str, meta: CheckpointMeta):
    """Every parameter of the checkpoint at ``path``, whole, in fp32, and the model's BAMConfig."""
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    # The local (PyTorch) spec on any machine: its parameter names are the ones the converter maps.
    model = checkpoint.load_model(path, meta, backend="local")
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}, model.config


def save_weights(root: str, weights: dict[str, torch.Tensor], meta: CheckpointMeta) -> str:
    """Save ``weights`` (every parameter of the model ``meta`` describes) as iteration 0 under ``root``."""
    model, _ = build_one_rank_model(meta.architecture, meta.seq_length)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:  # a mapping bug, not bad input
        raise RuntimeError(
            f"converted weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(weights[name].shape) != tuple(param.shape):
                raise RuntimeError(
                    f"{name}: converted shape {tuple(weights[name].shape)}, model has {tuple(param.shape)}"
                )
            param.copy_(weights[name])
    return checkpoint.save_checkpoint(root, 0, model, None, None, meta)
