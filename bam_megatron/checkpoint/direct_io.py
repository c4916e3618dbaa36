"""The files of a ``torch_dist`` checkpoint, read and written at disk speed.

A ``torch_dist`` checkpoint is PyTorch's distributed checkpoint (DCP) layout: ``.distcp`` files
that hold one ``torch.save`` record per tensor chunk, back to back, and a ``.metadata`` file
(pickled ``Metadata``) that says where each chunk is. PyTorch's ``FileSystemWriter`` and
``FileSystemReader`` handle one chunk at a time through ``torch.save`` / ``torch.load``, with a
CRC32 over every byte and a copy or two on the way. The two classes here are drop-in
replacements for them (same plan, same ``.metadata``, same records) that move the tensor bytes
with one large system call each:

- `DirectWriter`: every record is ``torch.save``'s own (PyTorch writes it, without the optional
  CRC32, which its reader does not check), its tensor data handed to the file as one buffer,
  straight from the tensor's memory; no tensor is kept once written.
- `DirectReader`: each record's layout (dtype, shape, strides, where its bytes start) is read
  from its small header with ``torch.load(map_location="meta")``; a chunk read whole into a
  contiguous destination is read straight into it (``os.preadv``), anything else (a part of a
  stored chunk, another layout) through one buffer and a copy.

Both are what megatron-core's ``dist_checkpointing.load`` and PyTorch's own reader read (a test
loads such a checkpoint with plain megatron-core).
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.utils.serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from bam_megatron.platform import internals

_WRITE_BUFFER = 1 << 20  # coalesces a record's small header writes; tensor data goes past it


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, as a writable buffer over its own memory (no copy)."""
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (contiguous) over a storage of exactly its own bytes, sharing its memory.

    ``torch.save`` writes a tensor's whole storage; a chunk that is a view into a larger tensor
    (SwiGLU's fc1 halves, one layer of a stacked tensor) would otherwise have to be cloned.
    """
    if tensor.untyped_storage().nbytes() == tensor.nbytes and tensor.storage_offset() == 0:
        return tensor
    if not tensor.numel():
        return tensor.clone()
    own = torch.from_numpy(tensor.reshape(-1).view(torch.uint8).numpy())
    return own.view(tensor.dtype).view(tensor.shape)


class DirectWriter(FileSystemWriter):
    """``FileSystemWriter`` for one process writing one file (``__0_0.distcp``), records in plan order.

    The ``.metadata`` (written by the base class's ``finish``) is the one PyTorch's writer makes.
    """

    def __init__(self, path: str):
        super().__init__(path, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write every item of ``plan`` as its ``torch.save`` record, in plan order; fsync."""
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(os.path.join(self.path, file_name), "wb", buffering=_WRITE_BUFFER) as stream:
            with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        if data.device.type != "cpu":
                            raise ValueError(f"{item.index.fqn}: the checkpoint writer takes CPU tensors")
                        torch.save(_standalone(data.detach().contiguous()), stream)
                    del data  # (nothing written stays referenced)
                    length = stream.tell() - offset
                    info = internals.StorageInfo(file_name, offset, length)
                    results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))
            stream.flush()
            if self.sync_files:
                os.fsync(stream.fileno())
        future: Future = Future()
        future.set_result(results)
        return future


class _Record:
    """Where a stored chunk's tensor bytes are, and how they are laid out."""

    def __init__(self, file: io.BufferedReader, info: Any):
        view = internals.create_file_view(file, info.offset, info.length)
        skeleton = torch.load(view, map_location="meta", weights_only=True)
        view.seek(0)
        records, record_offset = internals.torch_save_records(view)
        storages = [r for r in records if r.startswith("data/")]
        if not isinstance(skeleton, torch.Tensor) or len(storages) != 1:
            raise ValueError(f"{info.relative_path} at byte {info.offset}: not one tensor's torch.save record")
        self.data_offset = info.offset + record_offset(storages[0])
        self.skeleton = skeleton
        self.nbytes = skeleton.untyped_storage().nbytes()

    @property
    def plain(self) -> bool:
        """The stored bytes are the tensor itself, in row-major order."""
        return (
            self.skeleton.is_contiguous()
            and self.skeleton.storage_offset() == 0
            and (self.nbytes == self.skeleton.nbytes)
        )


def _read_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done}")
        done += got


class DirectReader(FileSystemReader):
    """``FileSystemReader`` that reads tensor chunks with ``os.preadv``, into the destination when it can."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each item of ``plan`` into what ``planner`` resolves it to (files opened once)."""
        files: dict[str, io.BufferedReader] = {}
        records: dict[tuple[str, int], _Record] = {}
        try:
            for request in sorted(plan.items, key=self._position):
                info: Any = self.storage_data[request.storage_index]
                if info.relative_path not in files:
                    files[info.relative_path] = open(os.path.join(self.path, info.relative_path), "rb")
                file = files[info.relative_path]
                if request.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(
                        request, io.BytesIO(internals.create_file_view(file, info.offset, info.length).read())
                    )
                    continue
                key = (info.relative_path, info.offset)
                if key not in records:
                    records[key] = _Record(file, info)
                self._read_tensor(file, records[key], request, planner)
        finally:
            for file in files.values():
                file.close()
        future: Future = Future()
        future.set_result(None)
        return future

    def _position(self, request: ReadItem) -> tuple[str, int]:
        info = self.storage_data[request.storage_index]
        return info.relative_path, info.offset

    def _read_tensor(self, file, record: _Record, request: ReadItem, planner: LoadPlanner) -> None:
        target = planner.resolve_tensor(request).detach()
        stored = record.skeleton
        whole = list(request.lengths) == list(stored.shape) and not any(request.storage_offsets)
        path = os.path.join(self.path, self.storage_data[request.storage_index].relative_path)
        if whole and record.plain and target.is_contiguous() and target.dtype == stored.dtype:
            if tuple(target.shape) != tuple(stored.shape):
                raise ValueError(
                    f"{path}: chunk {request.storage_index.fqn} is {tuple(stored.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            _read_into(file.fileno(), _bytes_of(target), record.data_offset, path)
        else:
            buffer = torch.empty(record.nbytes, dtype=torch.uint8)
            _read_into(file.fileno(), _bytes_of(buffer), record.data_offset, path)
            tensor = buffer.view(stored.dtype).as_strided(stored.shape, stored.stride(), stored.storage_offset())
            tensor = internals.narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
            if target.size() != tensor.size():
                raise ValueError(
                    f"{path}: chunk {request.storage_index.fqn} is {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
        planner.commit_tensor(request, target)
