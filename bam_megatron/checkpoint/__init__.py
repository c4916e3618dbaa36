"""The on-disk checkpoint contract: the one place that knows what a bam-megatron checkpoint is.

- `meta`: `CheckpointMeta`, the typed, versioned record every checkpoint holds (architecture,
  layout, progress, fingerprints, lineage), its migration from older versions, and the
  compatibility check between two architectures.
- `layout`: the directory layout (``iter_N``, saves in progress, the ``latest`` file, Megatron-LM's
  ``release``): names, discovery of the latest iteration, its atomic publishing.
- `store`: saving (published atomically), finding (``--save`` directory or ``iter_*``) and
  loading checkpoints with megatron-core's dist_checkpointing, resharding to any TP/PP/EP.
- `models`: a checkpoint's model built for a parallel layout and loaded (evaluation, conversion).
- `layerwise`: reading one layer of a checkpoint and writing a model one layer at a time (the
  converters' streaming I/O).
- `megatron_lm_reader`: checkpoints Megatron-LM wrote (torch_dist), read as they are: their ``args``
  as a `CheckpointMeta`, the tensor names its specs store differently, the formats it cannot read.
- `megatron_lm_args`: the other way, the ``args`` Megatron-LM's loader reads, written into our
  checkpoints of models it builds, and the ``pretrain_gpt.py`` flags that load them
  (`megatron_lm_flags` prints them for a checkpoint).

Nothing here imports the training loop; training, conversion, evaluation and PEFT all build on it.
docs/checkpoints.md describes the layout for users.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported names and their modules. Imported on first use (PEP 562): the meta and its errors are
# light, while `store` brings in megatron-core, which tools answering --help should not wait for.
_EXPORTS = {
    "VERSION": "meta",
    "CheckpointError": "meta",
    "CheckpointMeta": "meta",
    "SavedLayout": "meta",
    "check_same_architecture": "meta",
    "LATEST": "layout",
    "checkpoint_hash": "store",
    "checkpoint_path": "layout",
    "latest_iteration": "layout",
    "load_checkpoint": "store",
    "read_meta": "store",
    "resolve_checkpoint": "store",
    "save_checkpoint": "store",
    "verify_checkpoint": "store",
    "load_model": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
