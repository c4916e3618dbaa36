"""Checkpoints with megatron-core's dist_checkpointing, published atomically.

The directory layout under ``--save DIR`` (``iter_N``, ``iter_N.tmp``, the ``latest`` file) is
`bam_megatron.checkpoint.layout`'s. A save writes every rank's shards into ``iter_N.tmp``, and only
when all ranks are done does rank 0 rename it to ``iter_N`` and then replace the ``latest`` file
(temp file + fsync + rename).
A job killed at any moment leaves the previous checkpoint loadable and ``latest`` pointing at it.

A checkpoint holds the model, the optimizer (distributed or not), the LR scheduler, every rank's
RNG states, and its `CheckpointMeta` (architecture, layout, iteration, progress, fingerprints of
the data mixture and the tokenizer, lineage). Loading reshards model and optimizer to the current TP/PP/EP
layout; RNG states are restored only under the same layout.

Checkpoints Megatron-LM wrote (``--ckpt-format torch_dist``, ``iter_*`` or ``release``) are found,
described and loaded (weights only) by the same functions; `megatron_lm_reader` reads their ``args``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException, maybe_load_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from bam_megatron.checkpoint import integrity, megatron_lm_args, megatron_lm_reader
from bam_megatron.checkpoint.layout import (
    LATEST,
    RELEASE,
    REPLACED,
    checkpoint_path,
    in_progress_path,
    is_checkpoint,
    iteration_name,
    latest_iteration,
    latest_text,
    remove_unfinished_saves,
    write_latest,
)
from bam_megatron.checkpoint.meta import MEGATRON_LM, CheckpointError, CheckpointMeta
from bam_megatron.platform import disk, faults, internals


def resolve_checkpoint(path: str) -> str:
    """A --save directory (its latest iteration, or Megatron-LM's ``release``) or a checkpoint
    directory (``iter_*``, ``release``) -> the checkpoint directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if latest_text(path) == RELEASE:
        found = os.path.join(path, RELEASE)
        if not os.path.isdir(found):
            raise CheckpointError(f"{os.path.join(path, LATEST)} says 'release', but {found} is missing")
    elif latest_text(path) is not None:
        found = checkpoint_path(path, latest_iteration(path))
    elif is_checkpoint(path):
        return path
    else:
        megatron_lm_reader.refuse_other_formats(path)
        raise CheckpointError(
            f"no checkpoint at {path} (neither a --save directory nor an iter_* or release directory)"
        )
    megatron_lm_reader.refuse_other_formats(found)
    return found


def checkpoint_hash(path: str) -> str:
    """Short sha256 of a checkpoint's metadata files (every tensor's name, shape and byte layout)."""
    digest = hashlib.sha256()
    for name in ("metadata.json", ".metadata"):
        with open(os.path.join(path, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict[str, int]:
    """This process group's layout, as `SavedLayout` records it."""
    return {
        "world_size": dist.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
    }


def _rng_object() -> ShardedObject:
    # Every rank's own states (TP ranks differ; dropout must resume exactly).
    return ShardedObject("rng_state", _rng_state(), (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# The sequential block's norms: megatron-core's specs store them under the names of the fused
# Transformer Engine linears they belong to (its sharded_state_dict_keys_map), and so does
# bam-megatron from format version 2 on; version 1 stored them under its own module names.
_VERSION_1_SEQUENTIAL_KEYS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def stored_key_names(meta: CheckpointMeta) -> Callable[[str], str]:
    """Today's sharded-tensor key -> the key the checkpoint of ``meta`` stored it under.

    Different for version-1 sequential blocks and for MoE layers Megatron-LM's local spec wrote
    (``meta.stored_keys``); the same otherwise.
    """
    renames = dict(meta.stored_keys)
    if meta.version < 2 and meta.architecture.block_type == "sequential":
        renames.update(_VERSION_1_SEQUENTIAL_KEYS)
    if not renames:
        return lambda key: key

    def stored(key: str) -> str:
        for today, then in renames.items():
            key = key.replace(today, then)
        return key

    return stored


def _state(
    model, optimizer, with_rng: bool, is_loading: bool, stored_key: Optional[Callable[[str], str]] = None
) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.sharded_state_dict()}
    if stored_key is not None:  # before the optimizer's keys are derived from the model's
        for item in nested_values(state["model"]):
            item.key = stored_key(item.key)
    if optimizer is not None:
        # 'fully_reshardable': the distributed optimizer's state in canonical per-parameter form,
        # loadable under another TP/PP/EP/DP layout or without the distributed optimizer.
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"],
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True},
        )
    if with_rng:
        state["rng"] = _rng_object()
    return state


def save_checkpoint(
    root: str, iteration: int, model, optimizer, scheduler, meta: CheckpointMeta, sharded_strategy=None
) -> str:
    """Save and publish ``root/iter_N``; every rank calls it.

    ``meta`` is completed here with the iteration, the layout and the scheduler's state. A model
    Megatron-LM builds also gets, beside ``meta``, the ``args`` its loader reads (`megatron_lm_args.common_state`).
    ``sharded_strategy``: a dist_checkpointing save strategy other than the default (the
    converters' layer-by-layer writer).
    """
    final, tmp = checkpoint_path(root, iteration), in_progress_path(root, iteration)
    try:
        if dist.get_rank() == 0:
            os.makedirs(root, exist_ok=True)
            remove_unfinished_saves(root)
            os.makedirs(tmp)
        dist.barrier()
        state = _state(model, optimizer, with_rng=True, is_loading=False)
        internals.collect_checkpoint_write_results_in_process()  # no Manager process per save
        meta.iteration = iteration
        meta.layout = dataclasses.replace(meta.layout, **_layout())
        meta.scheduler = scheduler.state_dict() if scheduler is not None else None
        state["meta"] = meta.to_dict()
        # What Megatron-LM's loader reads (args, checkpoint_version, iteration), where it builds the model;
        # read_meta reads "meta" first, so this stays a bam-megatron checkpoint (docs/checkpoints.md).
        state.update(megatron_lm_args.common_state(meta))
        content = dict(megatron_lm_args.CONTENT_METADATA)  # how _state made the sharded state dicts
        if optimizer is not None and meta.layout.distributed_optimizer:
            content["distrib_optim_sharding_type"] = "fully_reshardable"
        faults.reached("checkpoint-writing")
        with _writer_errors_not_logged():  # raised as well: our error (or the traceback) says it once
            dist_checkpointing.save(state, tmp, sharded_strategy=sharded_strategy, content_metadata=content)
        dist.barrier()
        _record_integrity(tmp)
        faults.reached("checkpoint-written")
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)) or not disk.out_of_space(error, root):
            raise
        raise _save_error(root, iteration, error, "writing") from None
    faults.pause_before_publishing_checkpoint()
    if dist.get_rank() == 0:
        try:
            _publish(root, iteration, tmp, final)
        except OSError as error:
            if not disk.out_of_space(error, root):
                raise
            raise _save_error(root, iteration, error, "publishing") from None
    dist.barrier()
    return final


@contextlib.contextmanager
def _writer_errors_not_logged() -> Iterator[None]:
    """Keep megatron-core's writer from logging a worker's error ("Local process 0 encountered an
    error: ...") that it also raises."""
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _publish(root: str, iteration: int, tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` (moving a published copy of the same iteration aside first), then
    point ``latest`` at it."""
    if os.path.exists(final):  # the same iteration saved again: the old copy goes only once the new is in
        replaced = final + REPLACED
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced)
    else:
        os.replace(tmp, final)
    faults.reached("checkpoint-renamed")
    write_latest(root, iteration_name(iteration))


def _record_integrity(tmp: str) -> None:
    """Every rank's sizes and CRCs of the files it wrote, gathered into ``tmp``'s integrity record."""
    entries = integrity.describe(tmp, integrity.files_of_rank(tmp, dist.get_rank()))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    if dist.get_rank() == 0:
        integrity.write_record(tmp, {name: entry for part in gathered for name, entry in part.items()})


def _save_error(root: str, iteration: int, error: BaseException, doing: str) -> CheckpointError:
    """The one line for a save that ran out of space: where, which iteration, and what survives."""
    try:
        previous = latest_iteration(root)
    except CheckpointError:
        previous = None
    survivor = (
        f"iteration {previous} is intact ({checkpoint_path(root, previous)})"
        if previous is not None
        else f"no earlier checkpoint was published in {root}"
    )
    return CheckpointError(
        f"no space left on {disk.filesystem_of(root)} while {doing} iteration {iteration}; {survivor}"
    )


def verify_checkpoint(path: str) -> None:
    """Check every file of checkpoint ``path`` against its integrity record (sizes, CRC-32, the byte
    ranges its .metadata points at): what tools that read tensors themselves call first."""
    integrity.check_files(path)
    integrity.check_checksums(path)


def read_meta(path: str) -> CheckpointMeta:
    """The `CheckpointMeta` of the checkpoint directory ``path`` (older versions migrated; a
    Megatron-LM checkpoint's derived from its ``args``)."""
    megatron_lm_reader.refuse_other_formats(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a checkpoint (no metadata.json)")
    try:
        backend = maybe_load_config(path)
    except (ValueError, KeyError, TypeError, AttributeError, CheckpointingException) as error:
        raise CheckpointError(f"{os.path.join(path, 'metadata.json')} is damaged ({error})") from None
    if backend is not None and backend.sharded_backend != "torch_dist":
        raise CheckpointError(
            f"{path}: a dist_checkpointing checkpoint in the {backend.sharded_backend!r} format; "
            "bam-megatron reads torch_dist"
        )
    integrity.check_files(path)
    common_pt = os.path.join(path, "common.pt")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        if "Unsupported global" in str(error):  # torch.load(weights_only=True) met a class not allowed
            raise CheckpointError(f"{common_pt} cannot be read safely ({lines[0]})") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0])  # torch's reason
        raise CheckpointError(f"{common_pt} is damaged ({detail})") from None
    except (FileNotFoundError, CheckpointingException) as error:
        raise CheckpointError(f"{path} is not a bam-megatron checkpoint ({error})") from None
    except Exception as error:  # noqa: BLE001 - torch's zip reader and unpickler raise assorted errors
        raise (integrity.diagnose(path, error, reading=common_pt) or error) from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{common_pt} is damaged (it holds a {type(common).__name__}, not a dict)")
    if "meta" in common:
        return CheckpointMeta.from_dict(common["meta"], path)
    if megatron_lm_reader.is_megatron_lm(common):
        tensors = {key: tuple(t.global_shape) for key, t in _tensors_metadata(path).items()}
        return megatron_lm_reader.meta_from_common(common, path, tensors)
    raise CheckpointError(f"{path} is neither a bam-megatron checkpoint ('meta') nor a Megatron-LM one ('args')")


def load_checkpoint(path: str, model, optimizer=None, scheduler=None, load_rng: bool = True) -> bool:
    """Load ``path`` into this rank's model (and optimizer, scheduler, RNG states).

    With ``optimizer=None`` only the weights are loaded (``--finetune``). RNG states are restored
    only under the layout they were saved with; returns whether they were. A Megatron-LM
    checkpoint gives its weights only: an optimizer is refused, RNG states are not restored.
    """
    meta = read_meta(path)
    if meta.source == MEGATRON_LM:
        if optimizer is not None:
            raise CheckpointError(
                f"{path} is a Megatron-LM checkpoint: bam-megatron reads its weights only (start from it with "
                "--pretrained-checkpoint, or --finetune); resuming Megatron-LM's optimizer state is not supported"
            )
        _load_megatron_lm_weights(path, model, meta)
        return False
    saved = dataclasses.asdict(meta.layout)
    same_layout = all(saved[key] == value for key, value in _layout().items())
    state = _state(model, optimizer, load_rng and same_layout, is_loading=True, stored_key=stored_key_names(meta))
    loaded = _load(state, path)
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and meta.scheduler is not None:
            scheduler.load_state_dict(meta.scheduler)
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return "rng" in loaded


def _load_megatron_lm_weights(path: str, model, meta: CheckpointMeta) -> None:
    """The weights of a Megatron-LM checkpoint into this rank's model.

    Module extra states (Transformer Engine's FP8 scaling history) are not read: Megatron-LM's
    modules lay them out their own way, and ours start theirs afresh.
    """
    state = _state(model, None, with_rng=False, is_loading=True, stored_key=stored_key_names(meta))
    kept = {}
    for name, value in list(state["model"].items()):
        if isinstance(value, ShardedObject) and value.key.endswith("_extra_state"):
            kept[name] = state["model"].pop(name).data
    wanted = {}
    for value in nested_values(state["model"]):
        if isinstance(value, ShardedTensor):
            wanted[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            wanted.setdefault(value.key, None)
    stored = {key: tuple(t.global_shape) for key, t in _tensors_metadata(path).items()}
    megatron_lm_reader.check_model_keys(wanted, stored, path)
    loaded = _load(state, path)
    loaded["model"].update(kept)
    model.load_state_dict(loaded["model"])


def _tensors_metadata(path: str) -> dict:
    """megatron-core's tensor metadata of ``path``; a damaged file is named."""
    try:
        return dist_checkpointing.load_tensors_metadata(path)
    except Exception as error:  # noqa: BLE001
        found = integrity.diagnose(path, error)
        if found is None:
            raise
        raise found from None


def _load(state: dict, path: str) -> dict:
    """dist_checkpointing.load of ``state`` from ``path``, the shards' CRCs checked first (split over
    the ranks); a damaged file is named on every rank instead of a traceback from the reader."""
    names = integrity.shards(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        integrity.check_checksums(path, names[rank::world])
        problem = None
    except CheckpointError as error:
        problem = str(error)
    problems: list[Any] = [None] * world
    dist.all_gather_object(problems, problem)
    found = next((p for p in problems if p), None)
    if found:
        raise CheckpointError(found)
    try:
        return dist_checkpointing.load(state, path)
    except Exception as error:  # noqa: BLE001
        diagnosed = integrity.diagnose(path, error)
        if diagnosed is None:
            raise
        raise diagnosed from None
