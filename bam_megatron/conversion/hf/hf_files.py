"""Hugging Face model directories: config.json, safetensors weights, tokenizer files, atomic output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any, Optional

import torch

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.data.files import remove_stale_temporaries
from bam_megatron.platform import faults

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"  # a SentencePiece model, by transformers' naming convention


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - the hf extra installs it
        raise ConversionError("the safetensors package is needed: pip install 'bam-megatron[hf]'") from None
    return safetensors.torch


def read_config(directory: str) -> dict[str, Any]:
    """config.json of a Hugging Face model directory."""
    if not os.path.isdir(directory):
        raise ConversionError(f"not a directory: {directory}")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {directory}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return config


# safetensors dtype names -> the dtypes bam-megatron reads (and converts to fp32, exactly).
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class SafetensorsWeights:
    """The tensors of a Hugging Face directory's safetensors weights, read one at a time.

    ``model.safetensors`` or the shards a ``model.safetensors.index.json`` lists. Opening reads only
    the files' headers (``shapes``, ``dtypes``); `read` opens a file for one tensor and closes it
    again, so a converter holds the tensors it is working on and never a whole file (a file kept
    open while its tensors are read stays resident: RSS grows by every tensor read from it).
    """

    def __init__(self, directory: str) -> None:
        st = _safetensors()
        single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
        if os.path.isfile(single):
            files, listed = [single], {}
        elif os.path.isfile(index):
            try:
                with open(index) as f:
                    listed = json.load(f).get("weight_map") or {}
            except (json.JSONDecodeError, AttributeError) as error:
                raise ConversionError(f"{index} is not a safetensors index ({error})") from None
            files = [os.path.join(directory, name) for name in sorted(set(listed.values()))]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise ConversionError(f"{index} lists {os.path.basename(missing[0])}, which is missing")
        else:
            raise ConversionError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {directory} (only safetensors weights are read)")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in files:
            try:
                with st.safe_open(path, framework="pt") as f:  # the header only: no tensor data is touched
                    for name in f.keys():
                        piece = f.get_slice(name)
                        if name in self.file_of:
                            raise ConversionError(
                                f"tensor {name} is in both {os.path.basename(self.file_of[name])} "
                                f"and {os.path.basename(path)}"
                            )
                        self.file_of[name], self.shapes[name] = path, tuple(piece.get_shape())
                        self.dtypes[name] = piece.get_dtype()
            except ConversionError:
                raise
            except Exception as error:  # safetensors raises its own error types
                raise ConversionError(f"cannot read {path}: {error}") from None
        for name, shard in listed.items():
            if self.file_of.get(name) != os.path.join(directory, shard):
                raise ConversionError(f"{index} lists tensor {name} in {shard}, which does not hold it")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def check_dtypes(self) -> None:
        """Refuse, naming the tensor, weights that are not float32, bfloat16 or float16 (e.g. quantized)."""
        for name, dtype in self.dtypes.items():
            if dtype not in _FLOAT_DTYPES:
                raise ConversionError(
                    f"tensor {name} is {dtype}: only float32, bfloat16 and float16 weights can be imported"
                )

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype; it outlives the (closed) file and is freed with it."""
        st = _safetensors()
        path = self.file_of[name]
        try:
            with st.safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as error:  # safetensors raises its own error types
            raise ConversionError(f"cannot read tensor {name} from {path}: {error}") from None


DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5·10^9 bytes, '500MiB' -> 500·2^20, '1000' -> 1000 (transformers' units for --max-shard-size)."""
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper()
        number, unit = text, "B"
        for name in sorted(_SIZE_UNITS, key=len, reverse=True):
            if text.endswith(name):
                number, unit = text[: -len(name)].strip(), name
                break
        try:
            value = int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            raise ConversionError(f"--max-shard-size {size!r}: expected a size such as 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise ConversionError(f"--max-shard-size {size!r}: must be positive")
    return value


class ShardedSafetensorsWriter:
    """Safetensors weights written tensor by tensor, in shards of at most ``max_shard_size`` bytes.

    The plan (every tensor's name, shape and dtype, in write order) is known before any data: the
    shards are cut as transformers' ``save_pretrained`` cuts them (a tensor goes to the next shard
    when it would overflow the current one; one larger than the limit is a shard of its own), each
    shard's header is written when its first tensor arrives, and each tensor's bytes go straight to
    the file, so only the tensor being written is held. One shard is ``model.safetensors``; more are
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. The bytes depend only
    on the plan and the values.
    """

    def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int):
        self.directory = directory
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            raise ValueError("a tensor is planned twice")
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self.files = (
            [WEIGHTS]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self._shards = shards
        self._order = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._file = None
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the plan (by name, shape and dtype)."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name} is not in the plan (all planned tensors are written)")
        shard, (planned, shape, dtype) = self._order[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (planned, shape, dtype):
            raise ValueError(
                f"expected tensor {planned} {shape} {dtype} next, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._next == 0 or self._order[self._next - 1][0] != shard:
            self._open(shard)
        data = tensor.detach().contiguous().view(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._close()

    def _open(self, shard: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._shards[shard]:
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        path = os.path.join(self.directory, self.files[shard])
        self._file = open(path, "wb")
        self._file.write(len(encoded).to_bytes(8, "little") + encoded)

    def _close(self) -> None:
        self._file.close()
        self._file = None

    def finish(self) -> list[str]:
        """Check every planned tensor was written; write the index if sharded. The files written."""
        if self._next != len(self._order):
            raise ValueError(f"tensor {self._order[self._next][1][0]} was planned but not written")
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {name: self.files[i] for i, shard in enumerate(self._shards) for name, _, _ in shard}
        write_json(
            os.path.join(self.directory, WEIGHTS_INDEX),
            {"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
        )
        return [*self.files, WEIGHTS_INDEX]

    def abort(self) -> None:
        """Close a shard left open by an error (the directory is removed by its owner)."""
        if self._file is not None:
            self._close()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def write_json(path: str, data: dict[str, Any]) -> None:
    """Pretty, key-sorted JSON (stable bytes for equal content)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def sentencepiece_ids(path: str) -> dict[str, Optional[int]]:
    """bos/eos/pad ids of a SentencePiece model, as config.json keys (None where it has none)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise ConversionError(f"not a SentencePiece model: {path} ({str(error).splitlines()[0]})") from None
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {key: (value if value >= 0 else None) for key, value in ids.items()}


@contextlib.contextmanager
def atomic_directory(final: str) -> Iterator[str]:
    """Yield a temporary sibling of ``final`` to fill; rename it to ``final`` only if the block succeeds.

    ``final`` must not exist (its parent is created if need be). On any error the temporary
    directory is removed: no partial output.
    """
    final = os.path.abspath(final)
    if os.path.exists(final):
        raise ConversionError(f"output {final} already exists")
    parent = os.path.dirname(final)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConversionError(f"the parent of {final} is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    remove_stale_temporaries(parent, os.path.basename(final))  # left by a run that was killed
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        faults.reached("directory-publishing")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
