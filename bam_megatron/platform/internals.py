"""Every private megatron-core and torch internal bam-megatron uses, behind one version guard.

Outside `bam_megatron.platform` no module imports an underscore name of torch, megatron-core or
Transformer Engine, reads one of their private attributes, or overrides a private method of their
classes (tests/test_layering.py checks it); what the project cannot do without goes through the
seams here. They were written against the versions in `WRITTEN_AGAINST`. With other versions
installed the first seam used warns once (`InternalsVersionWarning`, naming each difference: the GPU
machine of docs/benchmarks.md runs another torch); a seam whose internal is gone raises
`InternalsError` naming it and the versions.

Each seam says where it is used and what it stands for:

- `collect_checkpoint_write_results_in_process` (checkpoint/store.py): megatron-core's
  ``filesystem_async._results_queue``;
- `replace_state_dict_keys_with_sharded_keys` (checkpoint/layerwise.py): megatron-core's
  torch strategy's ``_replace_state_dict_keys_with_sharded_keys``;
- `narrow_tensor_by_index`, `create_file_view`, `StorageInfo`, `torch_save_records`
  (checkpoint/direct_io.py): ``torch.distributed._shard._utils.narrow_tensor_by_index``,
  ``torch.distributed.checkpoint.filesystem._create_file_view`` / ``_StorageInfo``, and
  ``torch._C.PyTorchFileReader``;
- `indexed_dataset_header` (data/index_check.py): megatron-core's ``indexed_dataset._INDEX_HEADER``;
- `tensor_parallel_group` (peft/parallel.py): a Transformer Engine linear's ``_tp_group``;
- `AttentionSeams` (model/rope_cache.py, model/soft_moa.py): megatron-core ``Attention``'s
  ``_adjust_key_value_for_inference`` and ``_checkpointed_attention_forward``;
- `gpt_embed`, `gpt_logits` (conversion/unit_forward.py): megatron-core ``GPTModel``'s
  ``_preprocess`` and ``_postprocess``.

`bam_megatron.platform.cpu_mode` patches megatron-core's CUDA-only spots; it lives in this layer
too and refuses megatron-core versions it was not tested with.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import warnings
from typing import Any

from bam_megatron.errors import BamError

WRITTEN_AGAINST = {"megatron-core": "0.16.1", "torch": "2.13.0"}
"""The versions whose internals these seams were read from (setup.py's pins)."""


class InternalsError(BamError):
    """A private internal a seam stands for is missing from the installed torch or megatron-core."""


class InternalsVersionWarning(UserWarning):
    """torch or megatron-core is not the version the seams were written against."""


def installed_versions() -> dict[str, str]:
    """The installed version of each package in `WRITTEN_AGAINST` (a local tag like ``+cpu`` dropped)."""
    found = {}
    for package in WRITTEN_AGAINST:
        try:
            found[package] = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def version_differences() -> list[str]:
    """'torch 2.11.0 (written against 2.13.0)' for every package not at the version the seams know."""
    installed = installed_versions()
    return [
        f"{package} {installed[package]} (written against {wanted})"
        for package, wanted in WRITTEN_AGAINST.items()
        if installed[package] != wanted
    ]


@functools.cache
def check_versions() -> None:
    """Warn once per process if torch or megatron-core differs from `WRITTEN_AGAINST`."""
    differences = version_differences()
    if differences:
        warnings.warn(
            "bam_megatron.platform.internals uses private internals of "
            + ", ".join(differences)
            + ": if a seam fails, read its internal again in that version",
            InternalsVersionWarning,
            stacklevel=3,
        )


def _internal(module: str, name: str) -> Any:
    """``module.name``, a private internal; `InternalsError` naming it if this version lacks it."""
    check_versions()
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        versions = ", ".join(f"{p} {v}" for p, v in installed_versions().items())
        wanted = ", ".join(f"{p} {v}" for p, v in WRITTEN_AGAINST.items())
        raise InternalsError(
            f"{module}.{name} is missing ({error}); installed: {versions}; bam-megatron's seams "
            f"(bam_megatron/platform/internals.py) were written against {wanted}"
        ) from None


# ----- checkpoints (megatron-core's dist_checkpointing, torch.distributed.checkpoint)


def collect_checkpoint_write_results_in_process() -> None:
    """Let megatron-core's checkpoint writer report to a plain queue instead of a Manager's.

    Its writer collects write results through a ``multiprocessing`` Manager queue, started (once
    per process) in a *spawned* process, which re-imports ``__main__`` (torch, megatron-core):
    seconds at the first save and again at exit, on every rank. Synchronous saves put and take the
    results in this very process, so a ``queue.Queue`` does the job (an asynchronous save would
    need the Manager).
    """
    import queue

    module = "megatron.core.dist_checkpointing.strategies.filesystem_async"
    if _internal(module, "_results_queue") is None:
        importlib.import_module(module)._results_queue = queue.Queue()


def replace_state_dict_keys_with_sharded_keys(sharded_state_dict: Any, keep_only_main_replica: bool = False) -> Any:
    """megatron-core's torch strategy: a sharded state dict keyed by its sharded keys (and the maps back)."""
    function = _internal(
        "megatron.core.dist_checkpointing.strategies.torch", "_replace_state_dict_keys_with_sharded_keys"
    )
    return function(sharded_state_dict, keep_only_main_replica=keep_only_main_replica)


def narrow_tensor_by_index(tensor: Any, offsets: Any, sizes: Any) -> Any:
    """torch's narrowing of a stored chunk to the requested slice (torch.distributed.checkpoint's reader)."""
    return _internal("torch.distributed._shard._utils", "narrow_tensor_by_index")(tensor, offsets, sizes)


def create_file_view(file: Any, offset: int, length: int) -> Any:
    """torch.distributed.checkpoint's read-only view of ``length`` bytes of ``file`` at ``offset``."""
    return _internal("torch.distributed.checkpoint.filesystem", "_create_file_view")(file, offset, length)


def StorageInfo(relative_path: str, offset: int, length: int) -> Any:  # noqa: N802 - stands for torch's class
    """torch.distributed.checkpoint's record of where a stored item is (``_StorageInfo``)."""
    return _internal("torch.distributed.checkpoint.filesystem", "_StorageInfo")(relative_path, offset, length)


def torch_save_records(view: Any) -> tuple[list[str], Any]:
    """The record names of a ``torch.save`` archive in ``view``, and a function giving a record's byte
    offset (torch's ``torch._C.PyTorchFileReader``)."""
    reader = _internal("torch._C", "PyTorchFileReader")(view)
    return list(reader.get_all_records()), reader.get_record_offset


# ----- data


def indexed_dataset_header() -> bytes:
    """The magic bytes megatron-core's indexed dataset ``.idx`` files start with."""
    return _internal("megatron.core.datasets.indexed_dataset", "_INDEX_HEADER")


# ----- model and PEFT


def gpt_embed(model: Any, input_ids: Any, position_ids: Any) -> tuple[Any, Any]:
    """(decoder input [s, b, h], RoPE) of a megatron-core ``GPTModel``: its ``_preprocess``, the first
    part of ``forward``, for callers that run the layers themselves (conversion/unit_forward.py)."""
    check_versions()
    method = getattr(model, "_preprocess", None)
    if method is None:
        raise InternalsError(f"GPTModel has no _preprocess; the seams were written against {WRITTEN_AGAINST}")
    return tuple(method(input_ids=input_ids, position_ids=position_ids)[:2])


def gpt_logits(model: Any, hidden_states: Any, input_ids: Any, position_ids: Any) -> Any:
    """Logits [b, s, vocab] of a megatron-core ``GPTModel`` from the final norm's output: its
    ``_postprocess`` without labels, the last part of ``forward`` (conversion/unit_forward.py)."""
    check_versions()
    method = getattr(model, "_postprocess", None)
    if method is None:
        raise InternalsError(f"GPTModel has no _postprocess; the seams were written against {WRITTEN_AGAINST}")
    return method(
        hidden_states=hidden_states,
        input_ids=input_ids,
        position_ids=position_ids,
        labels=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
    )


def tensor_parallel_group(linear: Any) -> Any:
    """The tensor-parallel process group of a Transformer Engine linear (megatron-core's wrapper keeps
    it private, ``_tp_group``)."""
    check_versions()
    try:
        return linear._tp_group
    except AttributeError:
        raise InternalsError(
            f"{type(linear).__name__} has no _tp_group; bam-megatron's seams (bam_megatron/platform/"
            f"internals.py) were written against {WRITTEN_AGAINST}"
        ) from None


class AttentionSeams:
    """Public names for the private methods of megatron-core's ``Attention`` that subclasses extend.

    Put it first among the bases (``class A(AttentionSeams, SelfAttention)``). megatron-core's
    ``Attention.forward`` calls ``_adjust_key_value_for_inference``; here that call goes to
    `adjust_key_value_for_inference`, which subclasses override (calling ``super()`` for
    megatron-core's own).
    """

    def _adjust_key_value_for_inference(self, *args: Any, **kwargs: Any) -> Any:
        return self.adjust_key_value_for_inference(*args, **kwargs)

    def adjust_key_value_for_inference(self, *args: Any, **kwargs: Any) -> Any:
        """megatron-core's KV-cache step: store this step's keys and values, return those of every position."""
        check_versions()
        return super()._adjust_key_value_for_inference(*args, **kwargs)

    def checkpointed_attention_forward(self, *args: Any, **kwargs: Any) -> Any:
        """megatron-core's core attention under activation recompute."""
        check_versions()
        return self._checkpointed_attention_forward(*args, **kwargs)
