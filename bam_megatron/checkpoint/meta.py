"""`CheckpointMeta`: what a bam-megatron checkpoint says about itself, typed and versioned.

Every checkpoint directory holds, in dist_checkpointing's common state dict (``common.pt``), one
``meta`` record: the model's `Architecture`, the parallel layout it was saved under, the iteration
and training progress, fingerprints of its tokenizer and data, where it came from (lineage) and
the other settings of the run that wrote it. This module is the only place that knows that
record's fields; docs/checkpoints.md describes them for users.

Versions:

- 1 (no ``version`` key; bam-megatron before this module): a flat ``args`` dict of every
  ``pretrain_bam.py`` flag, the architecture among them. `CheckpointMeta.from_dict` migrates it.
- 2: this layout.

A checkpoint Megatron-LM's ``pretrain_gpt.py`` wrote (``--ckpt-format torch_dist``) has no such record:
`bam_megatron.checkpoint.megatron_lm_reader` derives one from its ``args``, with ``source`` set to
``megatron-lm`` and the tensor names it stores differently in ``stored_keys``. Neither is saved: a
checkpoint bam-megatron writes is a bam-megatron checkpoint, whatever its weights came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from bam_megatron.errors import UserError
from bam_megatron.model.architecture import ARCHITECTURE_FIELDS, Architecture
from bam_megatron.model.variants import SOFT_MOA_VARIANTS

VERSION = 2

BAM_MEGATRON = "bam-megatron"
MEGATRON_LM = "megatron-lm"

# Architecture fields a version-1 checkpoint may lack: what it was built with before the flag existed.
_V1_DEFAULTS = {"normalization": "RMSNorm", "rotary_base": 10000.0, "attention_router_topk": None}


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit the run; the message names it."""


@dataclass
class SavedLayout:
    """The parallel layout a checkpoint was saved under (it reshards on load; RNG states do not)."""

    world_size: int = 1
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    distributed_optimizer: bool = False


@dataclass
class CheckpointMeta:
    """The plain-data part of a checkpoint (everything but the tensors)."""

    architecture: Architecture
    seq_length: int
    """The sequence length the model was trained at (a run from it uses it unless told otherwise)."""
    iteration: int = 0
    layout: SavedLayout = field(default_factory=SavedLayout)
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    tokenizer_fingerprint: Optional[str] = None
    """sha256 of the tokenizer model the model was trained with; None for mock data."""
    tokenizer_model: Optional[str] = None
    """Where that tokenizer was when the checkpoint was written (a hint; the fingerprint decides)."""
    tokenizer_type: Optional[str] = None
    """Megatron-LM's name of its kind ('SentencePieceTokenizer', 'HuggingFaceTokenizer'); None: SentencePiece."""
    data_fingerprint: Optional[str] = None
    scheduler: Optional[dict[str, Any]] = None
    lineage: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from: 'upcycled' (bam-upcycle's manifest), 'imported' (bam-convert-hf)."""
    peft: Optional[dict[str, Any]] = None
    """For adapter-only checkpoints: the method, sizes and base checkpoint (bam_megatron.peft)."""
    training: dict[str, Any] = field(default_factory=dict)
    """The other settings of the run that wrote it (pretrain_bam.py's flags), for reference and as
    defaults of tools that evaluate it; never architecture."""
    version: int = VERSION
    """The format version it was read from (older ones are migrated; some tensor keys differ)."""
    source: str = BAM_MEGATRON
    """What wrote the checkpoint: bam-megatron, or Megatron-LM (read directly; weights only). Never saved."""
    stored_keys: dict[str, str] = field(default_factory=dict)
    """For a checkpoint another program wrote: part of today's sharded-tensor key -> what it stored
    instead (`store.stored_key_names`). Never saved."""

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data for ``common.pt``, in this version's format."""
        record = dataclasses.asdict(self)
        record["architecture"] = self.architecture.to_dict()
        record["version"] = VERSION
        for read_only in ("source", "stored_keys"):  # describe the files read, not the checkpoint written
            del record[read_only]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], path: str) -> CheckpointMeta:
        """Read a stored record of any version (older ones are migrated); ``path`` names it in errors."""
        version = record.get("version", 1)
        if version == 1:
            record = _migrate_v1(record, path)
        elif version != VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format version {version}, but this bam-megatron reads versions 1 to {VERSION} "
                "(written by a newer release?)"
            )
        values = dict(record)
        values["architecture"] = Architecture.from_dict(record["architecture"], where=path)
        values["layout"] = SavedLayout(**record["layout"])
        known = {f.name for f in dataclasses.fields(cls)} - {"source", "stored_keys"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown checkpoint meta fields {', '.join(unknown)}")
        return cls(**values)


def _migrate_v1(record: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A version-1 record (flat ``args``) -> the version-2 fields."""
    args = dict(record["args"])
    # Fields version 1 did not know take the defaults it was built with (the dataclass's).
    architecture = {name: args[name] for name in ARCHITECTURE_FIELDS if name in args}
    architecture.update({name: value for name, value in _V1_DEFAULTS.items() if name not in args})
    if architecture["variant"] == "dense":
        architecture["num_experts"] = None
    elif architecture["variant"] not in SOFT_MOA_VARIANTS:
        architecture["attention_router_topk"] = None
    layout = dict(record["layout"], distributed_optimizer=bool(args.get("use_distributed_optimizer")))
    lineage = {key: record[key] for key in ("upcycled", "imported") if record.get(key) is not None}
    return {
        "architecture": architecture,
        "seq_length": args["seq_length"],
        "iteration": record["iteration"],
        "layout": layout,
        "consumed_samples": record.get("consumed_samples", 0),
        "skipped_iterations": record.get("skipped_iterations", 0),
        "nan_iterations": record.get("nan_iterations", 0),
        "tokenizer_fingerprint": record.get("tokenizer_fingerprint"),
        "tokenizer_model": args.get("tokenizer_model"),
        "data_fingerprint": record.get("data_fingerprint"),
        "scheduler": record.get("scheduler"),
        "lineage": lineage,
        "peft": record.get("peft"),
        "training": {k: v for k, v in args.items() if k not in ARCHITECTURE_FIELDS},
        "version": 1,
    }


def check_same_architecture(
    ours: Architecture, ours_from: str, theirs: Architecture, theirs_from: str, ignore: tuple[str, ...] = ()
) -> None:
    """Raise a `CheckpointError` naming the first differing field, both values and both origins."""
    differences = ours.differences(theirs, ignore)
    if differences:
        name, mine, other = differences[0]
        more = f" (and {len(differences) - 1} more fields)" if len(differences) > 1 else ""
        raise CheckpointError(f"{name} differs: {mine} in {ours_from}, {other} in {theirs_from}{more}")
