"""Layer-by-layer checkpoint I/O: read one layer of a dense source, write a model one layer at a time.

Converting checkpoints (upcycling, format conversion) should need memory for one layer, not for
the model. Both directions keep the model on PyTorch's ``meta`` device (shapes, no storage) and
give real storage to one *unit* at a time: ``TOP`` (embedding, final norm, output layer) or one
transformer layer (two while writing: the next unit is filled as the current one is written).

- Reading: ``read_unit`` materialises a unit of a meta model and reads into it just that unit's
  chunks, as megatron-core's ``sharded_state_dict`` of the model lays them out, so a source saved
  under any TP/PP is resharded to the reading layout.
- Writing: ``StreamingSaveStrategy`` is a dist_checkpointing save strategy for the ``torch_dist``
  format. Megatron-core plans the save from the meta model exactly as it would for a real one
  (same keys, shapes and chunks, so ``dist_checkpointing.load`` reads it like any checkpoint);
  the tensor data is produced unit by unit while `direct_io.DirectWriter` streams it to disk.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from bam_megatron.checkpoint.direct_io import DirectReader, DirectWriter
from bam_megatron.platform import internals

# read_unit reads without collectives, on purpose; torch warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

TOP = -1  # the unit holding everything outside decoder.layers
LAYERS = "decoder.layers."

Unit = int  # TOP or a layer number


def meta_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on the meta device; the config must have use_cpu_initialization=True.

    (Without it megatron-core passes ``device=current_device()`` explicitly, which overrides the
    meta device context and would allocate the whole model.)
    """
    with torch.device("meta"):
        model = build()
    on_meta = {p.device.type for p in model.parameters()}
    if on_meta != {"meta"}:
        raise RuntimeError(f"expected a model on the meta device, got parameters on {sorted(on_meta)}")
    return model


def architecture_meta_model(architecture, seq_length: int, backend: str = "auto"):
    """(model, config): the one-rank (TP = PP = EP = 1) model of ``architecture`` on the meta device,
    and the config it was built with (fp32, no initialisation: a converter reads or writes every
    weight). ``backend="local"``: PyTorch's layers on any machine (the names the HF mappings use)."""
    from bam_megatron.model.builder import build_from_architecture

    config = architecture.one_rank_config()
    return meta_model(lambda: build_from_architecture(architecture, config, seq_length, backend=backend)), config


def num_layers(model) -> int:
    """Transformer layers in a one-stage (PP=1) GPTModel."""
    return len(model.decoder.layers)


def unit_of_parameter(name: str) -> Unit:
    """decoder.layers.3.mlp... -> 3; embedding / final norm / output layer -> TOP."""
    if name.startswith(LAYERS):
        return int(name[len(LAYERS) :].split(".", 1)[0])
    return TOP


def _unit_modules(model, unit: Unit) -> list[torch.nn.Module]:
    if unit != TOP:
        return [model.decoder.layers[unit]]
    modules = [model.embedding, model.decoder.final_layernorm, getattr(model, "output_layer", None)]
    return [m for m in modules if m is not None]


@contextlib.contextmanager
def materialised(model, unit: Unit) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Give one unit of a meta model real (uninitialised) CPU storage; back to meta on exit.

    Yields the unit's parameters by their full names.
    """
    modules = _unit_modules(model, unit)
    for module in modules:
        module.to_empty(device="cpu")
    try:
        yield {n: p for n, p in model.named_parameters() if unit_of_parameter(n) == unit}
    finally:
        for module in modules:
            module.to_empty(device="meta")


def _has_storage(value) -> bool:
    return isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.data.device.type != "meta"


class _Chunks:
    """The chunks of one checkpoint tensor that this process reads (DCP's chunk protocol)."""

    def __init__(self, global_shape: tuple):
        self.global_shape = torch.Size(global_shape)
        self.chunks: dict[tuple, torch.Tensor] = {}

    def size(self) -> torch.Size:
        return self.global_shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape) for o, t in self.chunks.items()]


class _PartialLoadPlanner(DefaultLoadPlanner):
    """Reads just the requested chunks of each tensor, straight into the model's storage."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default set-up maps every value through DCP's tensor types, which drops ours.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn].chunks[tuple(index.offset)]


def _merged_in_place(factory: ShardedTensorFactory, built) -> bool:
    """The chunks ``factory`` built are views that together cover its tensor (SwiGLU's fc1 halves):
    read into, the tensor already holds the merged value, and the merge (a concatenation) is a copy."""
    storage = factory.data.untyped_storage().data_ptr()
    chunks = list(nested_values(built))
    return all(isinstance(c, ShardedTensor) and c.data.untyped_storage().data_ptr() == storage for c in chunks) and (
        sum(c.data.numel() for c in chunks) == factory.data.numel()
    )


def read_unit(
    model,
    unit: Unit,
    checkpoint_dir: str,
    stored_key: Callable[[str], str] = lambda key: key,
    into: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """One unit's parameters of the ``torch_dist`` checkpoint at ``checkpoint_dir``, by name.

    ``model`` is a meta model of the checkpoint's architecture at any layout megatron-core can
    reshard to (typically TP=PP=1). Its own ``sharded_state_dict`` (factories included) says
    which chunk of which stored tensor each parameter is; PyTorch's checkpoint reader reads just
    those (megatron-core's own loader assumes every layer of a stacked tensor is requested).
    ``stored_key`` maps a key to the one the checkpoint stored it under (`store.stored_key_names`).
    ``into``: destinations (same shape and dtype) for some of the parameters, read straight into
    (no copy) and returned as they are.
    """
    with materialised(model, unit) as params, torch.no_grad():  # reads into parameters: no autograd
        for name, destination in (into or {}).items():
            if params[name].shape != destination.shape or params[name].dtype != destination.dtype:
                raise ValueError(f"{name}: cannot read {params[name].shape} into {destination.shape}")
            params[name].data = destination.detach()
        wanted = {k: v for k, v in model.sharded_state_dict().items() if _has_storage(v)}
        factories = {k: v for k, v in wanted.items() if isinstance(v, ShardedTensorFactory)}
        apply_factories(wanted)  # e.g. SwiGLU's fc1: stored as two halves
        in_place = {k for k, f in factories.items() if _merged_in_place(f, wanted[k])}
        requests: dict[str, _Chunks] = {}
        for value in nested_values(wanted):
            chunks = requests.setdefault(stored_key(value.key), _Chunks(value.global_shape))
            shape = (1,) * value.prepend_axis_num + tuple(value.local_shape)
            chunks.chunks[tuple(value.global_offset)] = value.data.view(shape)
        # no_dist: each process reads what it asks for (no collectives; safe on a helper thread)
        dcp_load(requests, storage_reader=DirectReader(checkpoint_dir), planner=_PartialLoadPlanner(), no_dist=True)
        for key in in_place:
            wanted[key] = factories.pop(key).data
        dict_list_map_inplace(lambda sharded: sharded.data if isinstance(sharded, ShardedTensor) else sharded, wanted)
        apply_factory_merges(wanted, factories)
        into = into or {}
        return {name: into[name] if name in into else wanted[name].detach() for name in params}


def _chunk_unit(key: str, offset: tuple) -> Unit:
    # megatron-core prepends the layer axis to decoder.layers.* tensors
    return int(offset[0]) if key.startswith(LAYERS) else TOP


def _write_item_unit(item: WriteItem) -> Unit:
    if item.type == WriteItemType.BYTE_IO:
        return TOP
    return _chunk_unit(item.index.fqn, tuple(item.index.offset))


class _StreamingPlanner(MCoreSavePlanner):
    """Megatron-core's save plan, ordered unit by unit, with tensor data produced on demand."""

    def __init__(self, produce: Callable[[str, tuple], torch.Tensor]):
        super().__init__(flatten_state_dict=False)
        self.produce = produce

    def create_local_plan(self):
        plan = super().create_local_plan()
        # The writer streams items in plan order (one thread, one file): one unit after another.
        plan.items.sort(key=_write_item_unit)
        return plan

    def resolve_data(self, write_item: WriteItem) -> Union[torch.Tensor, io.BytesIO]:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.produce(write_item.index.fqn, tuple(write_item.index.offset))


class _PreparedUnit:
    """One unit of the model with real storage, filled, as the checkpoint's chunks."""

    def __init__(self, model, unit: Unit, fill: Callable):
        self.unit, self._exit = unit, contextlib.ExitStack()
        try:
            params = self._exit.enter_context(materialised(model, unit))
            with torch.no_grad():  # (grad mode is per thread)
                fill(unit, params)
            state = model.sharded_state_dict()
            apply_factories(state)  # e.g. SwiGLU's fc1, stored as two halves
            self.chunks: dict[tuple[str, tuple], torch.Tensor] = {}
            for sharded in nested_values(state):
                if isinstance(sharded, ShardedTensor) and sharded.data.device.type != "meta":
                    offset = tuple(sharded.global_offset)
                    if _chunk_unit(sharded.key, offset) == unit:  # (the unit being written is live too)
                        shape = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
                        self.chunks[(sharded.key, offset)] = sharded.data.detach().view(shape)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._exit.close()


class StreamingSaveStrategy(SaveShardedStrategy):
    """Save a meta model's checkpoint in the ``torch_dist`` format, filling one unit at a time.

    ``fill(unit, params)`` writes the values of one unit's freshly materialised parameters
    (full names -> tensors); it is called once per unit, in order (TOP first, then the layers).
    While one unit is written, the next is filled on a helper thread (torch ops and file I/O
    release the GIL), so at most two units hold storage. Single process only (the converters run
    on one rank).
    """

    def __init__(self, model, fill: Callable[[Unit, dict[str, torch.nn.Parameter]], None]):
        super().__init__("torch_dist", 1)
        self.model, self.fill = model, fill
        self.order: list[Unit] = [TOP, *range(num_layers(model))]  # the planner's write order
        self._current: _PreparedUnit | None = None
        self._next: Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def _prepare(self, unit: Unit) -> Future:
        return self._pool.submit(_PreparedUnit, self.model, unit, self.fill)

    def _produce(self, key: str, offset: tuple) -> torch.Tensor:
        """The chunk the writer asks for next (`DirectWriter` keeps none once written)."""
        return self._chunk(key, offset)

    def _chunk(self, key: str, offset: tuple) -> torch.Tensor:
        unit = _chunk_unit(key, offset)
        if self._current is None or self._current.unit != unit:
            if self._current is not None:
                self._current.release()
                self._current = None
            if self._next is None:
                self._next = self._prepare(unit)
            prepared, self._next = self._next.result(), None
            if prepared.unit != unit:  # not the planned order: prepare what is asked
                prepared.release()
                prepared = self._prepare(unit).result()
            self._current = prepared
            position = self.order.index(unit)
            if position + 1 < len(self.order):
                self._next = self._prepare(self.order[position + 1])
        return self._current.chunks[(key, offset)]

    def save(self, sharded_state_dict, checkpoint_dir: Union[str, Path]) -> None:
        """Plan from the (meta) sharded state dict; write with data produced per unit."""
        state, _, _ = internals.replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        writer = DirectWriter(str(checkpoint_dir))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bam-fill")
        try:
            dcp_save(
                mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=_StreamingPlanner(self._produce)
            )
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for pending in [self._current] + ([self._next] if self._next is not None else []):
                if isinstance(pending, Future):
                    pending = pending.result() if not pending.cancelled() and pending.exception() is None else None
                if pending is not None:
                    pending.release()
            self._current = self._next = self._pool = None
