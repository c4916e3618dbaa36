"""bam-megatron checkpoints in and out of the converter, on one process.

A checkpoint saved under any TP/PP/EP layout is read through dist_checkpointing into a TP=PP=EP=1
model (dist_checkpointing reshards on load), so the converter sees every tensor whole, by
megatron-core's parameter names. Imported weights are written the same way pretrain_bam.py saves
(an ``iter_*`` directory, the ``latest`` file and the `CheckpointMeta`), layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointError, CheckpointMeta
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.model.architecture import Architecture


def read_checkpoint(path: str) -> tuple[str, CheckpointMeta]:
    """A --save directory or an iter_* directory -> (iteration directory, its meta)."""
    try:
        resolved = checkpoint.resolve_checkpoint(path)
        meta = checkpoint.read_meta(resolved)
        checkpoint.verify_checkpoint(resolved)  # its tensors are read layer by layer, past store's checks
        return resolved, meta
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


class TrackedParams(dict):
    """A unit's parameters by name, remembering which ones were read (export) or filled (import)."""

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.touched: set[str] = set()

    def __getitem__(self, name: str):
        self.touched.add(name)
        return super().__getitem__(name)


def save_weights(root: str, meta: CheckpointMeta, fill: Callable[[int, dict], None]) -> str:
    """Save the model ``meta`` describes as iteration 0 under ``root``, one unit at a time.

    The model is built on the meta device (no memory) and written by the layer-by-layer writer
    (`bam_megatron.checkpoint.layerwise.StreamingSaveStrategy`): ``fill(unit, params)`` writes the
    values of one unit's freshly materialised parameters (``layerwise.TOP``, then each layer), so
    about one layer (two while writing) holds memory, whatever the depth. A parameter the fill
    leaves untouched is a mapping bug (uninitialised memory must never reach the checkpoint).
    """
    from bam_megatron.checkpoint.layerwise import StreamingSaveStrategy, architecture_meta_model
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    # The local (PyTorch) spec on any machine: its parameter names are the ones the converter maps.
    model, _ = architecture_meta_model(meta.architecture, meta.seq_length, backend="local")

    def checked(unit: int, params: dict) -> None:
        tracked = TrackedParams(params)
        fill(unit, tracked)
        untouched = sorted(set(params) - tracked.touched)
        if untouched:
            raise RuntimeError(f"the conversion left {', '.join(untouched)} unset")

    strategy = StreamingSaveStrategy(model, checked)
    return checkpoint.save_checkpoint(root, 0, model, None, None, meta, sharded_strategy=strategy)
