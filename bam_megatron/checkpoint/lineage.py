"""Where a checkpoint's weights came from, as its meta's ``lineage`` records it.

- ``root``: the first checkpoint of the chain this one's weights were initialised from (the seed,
  for a dense expert branched from it); absent on a checkpoint trained from scratch, which is its
  own root.
- ``upcycled``: bam-upcycle's manifest (method, sources with their identity and root, expert
  names); ``grown``: the experts bam-upcycle --extend / --drop-expert added or removed since.
- ``imported``, ``megatron_lm``: what a converted or directly read checkpoint was.

A checkpoint's identity is its path, iteration and `store.checkpoint_hash` (of its metadata files,
so hard-linked copies, as bam-branch makes, share it).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from bam_megatron.checkpoint.meta import CheckpointMeta
from bam_megatron.checkpoint.store import checkpoint_hash


def identity(path: str, meta: CheckpointMeta) -> dict[str, Any]:
    """{path, iteration, hash} of the checkpoint at ``path``."""
    return {"path": os.path.abspath(path), "iteration": meta.iteration, "hash": checkpoint_hash(path)}


def root_of(path: str, meta: CheckpointMeta) -> dict[str, Any]:
    """The identity of the checkpoint's root: the recorded one, else its own."""
    return meta.lineage.get("root") or identity(path, meta)


def started_from(path: str, meta: CheckpointMeta, weights_only: bool) -> dict[str, Any]:
    """The lineage of a run that starts from the checkpoint at ``path``: its lineage, plus its root
    when the run initialises its weights from it (phase 2 from the seed, phase 3 from an upcycle)."""
    lineage = dict(meta.lineage)
    if weights_only:
        lineage["root"] = root_of(path, meta)
    return lineage


def expert_names(meta: CheckpointMeta) -> list[str]:
    """The mixture's expert names, in expert order (bam-upcycle's manifest, then every growth)."""
    grown = meta.lineage.get("grown")
    if grown:
        return list(grown[-1]["expert_names"])
    upcycled = meta.lineage.get("upcycled")
    if upcycled:
        return list(upcycled["expert_names"])
    return [f"expert{i}" for i in range(meta.architecture.num_experts)]


def experts_before_last_growth(meta: CheckpointMeta) -> Optional[list[int]]:
    """Indices of the experts the mixture had before its newest ``bam-upcycle --extend`` (those that
    did not join then); None when it never grew."""
    grown = meta.lineage.get("grown")
    if not grown:
        return None
    joined = {entry["name"] for entry in grown[-1]["joined"]}
    return [i for i, name in enumerate(grown[-1]["expert_names"]) if name not in joined]
