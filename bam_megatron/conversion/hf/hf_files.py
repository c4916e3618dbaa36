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


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    st = _safetensors()
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConversionError(f"{index} lists {os.path.basename(missing[0])}, which is missing")
    else:
        raise ConversionError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {directory} (only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(st.load_file(path))
        except Exception as error:  # safetensors raises its own error types
            raise ConversionError(f"cannot read {path}: {error}") from None
    return tensors


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

    ``final`` must not exist. On any error the temporary directory is removed: no partial output.
    """
    final = os.path.abspath(final)
    if os.path.exists(final):
        raise ConversionError(f"output {final} already exists")
    parent = os.path.dirname(final)
    if not os.path.isdir(parent):
        raise ConversionError(f"the parent directory of {final} does not exist")
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
