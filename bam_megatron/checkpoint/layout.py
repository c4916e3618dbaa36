"""The checkpoint directory layout: the one module that spells it (docs/checkpoints.md).

Under ``--save DIR`` (the layout Megatron-LM uses too)::

    DIR/iter_0000100/                  a complete checkpoint (dist_checkpointing: metadata.json, ...)
    DIR/iter_0000200.tmp/              a save in progress, or one killed midway (ignored;
                                       the next save removes it)
    DIR/iter_0000100.replaced/         a published iteration while a new save of the same
                                       iteration takes its place
    DIR/release/                       Megatron-LM's release checkpoint (weights only)
    DIR/latest_checkpointed_iteration.txt   an iteration number, or "release"

The ``latest`` file is only ever replaced atomically (`write_latest`). Pure ``os``: no torch, no
megatron-core, so tools that only look for checkpoints answer at once.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from bam_megatron.checkpoint.meta import CheckpointError
from bam_megatron.platform.atomic import write_atomically

LATEST = "latest_checkpointed_iteration.txt"
"""The file naming a --save directory's latest published iteration."""
RELEASE = "release"
"""The directory (and the word in the latest file) of a Megatron-LM release checkpoint."""
PREFIX = "iter_"
IN_PROGRESS = ".tmp"
"""iter_N.tmp: a save being written (or killed midway)."""
REPLACED = ".replaced"
"""iter_N.replaced: a published iteration while a new save of the same iteration takes its place."""
METADATA = "metadata.json"
"""dist_checkpointing's file in every checkpoint directory: what tells one apart."""


def iteration_name(iteration: int) -> str:
    """100 -> 'iter_0000100'."""
    return f"{PREFIX}{iteration:07d}"


def checkpoint_path(root: str, iteration: int) -> str:
    """DIR/iter_0000100."""
    return os.path.join(root, iteration_name(iteration))


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory itself (an ``iter_*`` or ``release``)."""
    return os.path.isfile(os.path.join(path, METADATA))


def latest_text(root: str) -> Optional[str]:
    """What ``root``'s latest file says (None if it has none)."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def named_by_latest(root: str) -> Optional[str]:
    """The directory name ``root``'s latest file points at ('iter_0000100', 'release'), or None."""
    text = latest_text(root)
    if text == RELEASE:
        return RELEASE
    return iteration_name(int(text)) if text and text.isdigit() else None


def latest_iteration(root: str) -> Optional[int]:
    """The last published iteration under ``root``, or None if there is none."""
    text = latest_text(root)
    if text is None:
        return None
    path = os.path.join(root, LATEST)
    if text == RELEASE:
        raise CheckpointError(
            f"{path} says 'release': Megatron-LM's release checkpoint {os.path.join(root, RELEASE)} "
            "has weights only, to start from (--pretrained-checkpoint), not a run to resume"
        )
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}")
    iteration = int(text)
    final = checkpoint_path(root, iteration)
    if not os.path.isdir(final):
        if os.path.isdir(final + REPLACED):
            raise CheckpointError(
                f"{path} names iteration {iteration}, and a save that replaced it was interrupted: its previous "
                f"copy is {final + REPLACED} (rename it to {final} to use it)"
            )
        raise CheckpointError(f"{path} names iteration {iteration}, but {final} is missing")
    return iteration


def saved_iterations(root: str) -> list[str]:
    """The ``iter_*`` directories under ``root`` that are not saves in progress, sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith(PREFIX) and not n.endswith(IN_PROGRESS))


def in_progress_path(root: str, iteration: int) -> str:
    """DIR/iter_0000100.tmp: where a save writes before it is published."""
    return checkpoint_path(root, iteration) + IN_PROGRESS


def remove_unfinished_saves(root: str) -> None:
    """Delete every ``iter_*.tmp`` under ``root`` (saves that were killed midway)."""
    for name in os.listdir(root):
        if name.startswith(PREFIX) and name.endswith(IN_PROGRESS):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def write_latest(root: str, checkpoint: str) -> None:
    """Point ``root``'s latest file at its checkpoint directory named ``checkpoint`` (``iter_*`` or
    ``release``), atomically: readers see the old file or the new one, never half of it."""
    if checkpoint == RELEASE:
        text = RELEASE
    elif checkpoint.startswith(PREFIX) and checkpoint[len(PREFIX) :].isdigit():
        text = str(int(checkpoint[len(PREFIX) :]))
    else:
        raise ValueError(f"not a checkpoint directory name: {checkpoint!r}")
    write_atomically(os.path.join(root, LATEST), text)
