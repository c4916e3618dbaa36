"""Hugging Face model directories: config.json, safetensors weights, tokenizer files, atomic output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any, Optional

import torch

from bam_megatron.conversion.hf.errors import ConversionError

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


def write_weights(directory: str, tensors: dict[str, torch.Tensor]) -> None:
    """One ``model.safetensors`` (contiguous tensors; the bytes depend only on names, dtypes and values)."""
    st = _safetensors()
    path = os.path.join(directory, WEIGHTS)
    st.save_file({name: tensors[name].contiguous() for name in sorted(tensors)}, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual permissions


def write_json(path: str, data: dict[str, Any]) -> None:
    """Pretty, key-sorted JSON (stable bytes for equal content)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file: the tokenizer fingerprint bam-megatron checkpoints record."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
