"""Adapter-only checkpoints, loadable on top of the base checkpoint they were trained from.

An adapter checkpoint is an ordinary bam-megatron checkpoint directory (``SAVE/iter_N``, written
by `bam_megatron.checkpoint` through dist_checkpointing, published atomically) whose
model part holds only the adapter and router tensors, with their tensor-parallel sharding
declared, so it reshards across TP/PP/EP like any checkpoint. It also holds the optimizer state of
those tensors, the scheduler, RNG states and the meta, whose ``peft`` entry records the method and
sizes, and the base checkpoint (path and `checkpoint_hash`) the adapters were trained on.

Loading is two steps: the frozen base from its checkpoint (every tensor but the adapters), then the
adapters (and, to resume, their optimizer state) from theirs. Both go through `ModelView`, which
shows dist_checkpointing only one part of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from bam_megatron.checkpoint import CheckpointError, CheckpointMeta, layout, store
from bam_megatron.peft.apply import is_adapter_name


class ModelView:
    """The part of a model whose state-dict keys satisfy ``select``, as checkpointing sees it:
    ``sharded_state_dict()`` lists only those tensors, and ``load_state_dict`` loads exactly them
    (and fails if any of them is missing)."""

    def __init__(self, model: torch.nn.Module, select: Callable[[str], bool]) -> None:
        while not hasattr(model, "decoder") and hasattr(model, "module"):  # Float16Module (--bf16), DDP
            model = model.module  # (Float16Module.load_state_dict returns nothing to check)
        self.model, self.select = model, select

    def sharded_state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """The model's sharded state dict restricted to the selected keys."""
        full = self.model.sharded_state_dict(*args, **kwargs)
        return {key: value for key, value in full.items() if self.select(key)}

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Load the selected tensors; any other tensor of the model is left as it is."""
        result = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if self.select(k) and not k.endswith("_extra_state")]
        if result.unexpected_keys or missing:
            raise CheckpointError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return result


def adapters_of(model: torch.nn.Module) -> ModelView:
    """The adapters and routers of ``model``."""
    return ModelView(model, is_adapter_name)


def base_of(model: torch.nn.Module) -> ModelView:
    """Everything of ``model`` but its adapters."""
    return ModelView(model, lambda key: not is_adapter_name(key))


@dataclass
class Checkpoints:
    """Where a PEFT run's weights come from: the base (weights only) and the adapters (or None)."""

    base: Optional[str] = None
    base_meta: Optional[CheckpointMeta] = None
    adapters: Optional[str] = None
    adapters_meta: Optional[CheckpointMeta] = None


def find_checkpoints(load: Optional[str], pretrained: Optional[str]) -> Checkpoints:
    """Resolve ``--load`` / ``--pretrained-checkpoint`` for a PEFT run.

    - ``--load`` holds an adapter checkpoint: resume it, on the base it names, or on
      ``--pretrained-checkpoint``, which must then be that same base (same hash);
    - ``--load`` holds a full model checkpoint: that is the base;
    - otherwise ``--pretrained-checkpoint`` is the base, and the adapters start fresh.
    """
    found = Checkpoints()
    iteration = layout.latest_iteration(load) if load and os.path.isdir(load) else None
    if iteration is not None:
        path = layout.checkpoint_path(load, iteration)
        meta = store.read_meta(path)
        if meta.peft is None:
            if pretrained:
                raise CheckpointError(
                    f"--load {load} holds a full model checkpoint, not adapters; pass the base "
                    "either as --load or as --pretrained-checkpoint, not both"
                )
            found.base, found.base_meta = path, meta
            return found
        found.adapters, found.adapters_meta = path, meta
        recorded = meta.peft
        base = store.resolve_checkpoint(pretrained) if pretrained else recorded["base_checkpoint"]
        if base is not None:
            if not os.path.isdir(base):
                raise CheckpointError(
                    f"the adapters in {path} were trained on base checkpoint {base}, which is gone; "
                    "pass its new location with --pretrained-checkpoint"
                )
            if store.checkpoint_hash(base) != recorded["base_hash"]:
                raise CheckpointError(
                    f"the adapters in {path} were trained on base {recorded['base_checkpoint']} "
                    f"(hash {recorded['base_hash']}), but {base} has hash "
                    f"{store.checkpoint_hash(base)}"
                )
            found.base, found.base_meta = base, store.read_meta(base)
        return found
    if pretrained:
        found.base = store.resolve_checkpoint(pretrained)
        found.base_meta = store.read_meta(found.base)
        if found.base_meta.peft is not None:
            raise CheckpointError(f"--pretrained-checkpoint {pretrained} holds adapters, not a base model")
    return found


def peft_meta(config_dict: dict, base: Optional[str]) -> dict:
    """The ``peft`` entry of an adapter checkpoint's meta."""
    return {
        **config_dict,
        "base_checkpoint": os.path.abspath(base) if base else None,
        "base_hash": store.checkpoint_hash(base) if base else None,
    }


def check_same_adapters(path: str, recorded: dict, config_dict: dict) -> None:
    """Refuse to resume adapters saved with another method or other sizes."""
    for key, value in config_dict.items():
        if recorded.get(key) != value:
            flag = {
                "method": "--peft",
                "num_experts": "--peft-num-experts",
                "rank": "--lora-rank",
                "alpha": "--lora-alpha",
            }[key]
            raise CheckpointError(
                f"adapter checkpoint {path} was saved with {flag} {recorded.get(key)}, but this run has {value}"
            )
