"""The two conversions end to end: checkpoint -> Hugging Face directory, Cohere directory -> seed checkpoint.

Both write into a temporary sibling of the output and rename it when complete, so a failure
leaves no output at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.conversion.hf import bam_format, cohere, hf_files, megatron_io
from bam_megatron.conversion.hf.errors import ConversionError

FORMATS = ("auto", "cohere", "bam")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_MANIFEST = "bam_export.json"
IMPORT_MANIFEST = "import_manifest.json"


@dataclass
class Report:
    """What a conversion wrote and the notes a user should read (what was not carried)."""

    output: str
    format: str
    notes: list[str] = field(default_factory=list)


def choose_format(requested: str, config, variant: str) -> tuple[str, Optional[str]]:
    """'auto' -> 'cohere' where CohereForCausalLM computes the model exactly, else 'bam' (with the reason)."""
    if requested != "auto":
        return requested, None
    try:
        cohere.check_exportable(config, variant)
    except ConversionError as reason:
        return "bam", str(reason)
    return "cohere", None


def _export_tokenizer(meta: CheckpointMeta, override: Optional[str], notes: list[str]) -> Optional[str]:
    """The SentencePiece model to ship with the export, checked against the checkpoint's fingerprint."""
    fingerprint = meta.tokenizer_fingerprint
    if override is not None:
        if not os.path.isfile(override):
            raise ConversionError(f"--tokenizer-model {override} not found")
        if fingerprint is not None and hf_files.sha256_file(override) != fingerprint:
            raise ConversionError(f"--tokenizer-model {override} is not the tokenizer the checkpoint was trained with")
        return override
    if fingerprint is None:
        notes.append(
            "the checkpoint records no tokenizer (trained on mock data, or imported without one): "
            "no tokenizer.model written"
        )
        return None
    recorded = meta.tokenizer_model
    if recorded and os.path.isfile(recorded) and hf_files.sha256_file(recorded) == fingerprint:
        return recorded
    notes.append(
        f"the checkpoint's tokenizer ({recorded}) is missing or has changed: no tokenizer.model written "
        "(pass --tokenizer-model)"
    )
    return None


def _check_all_converted(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter of our model went into the export (nothing silently dropped)."""
    exported = sum(t.numel() for t in tensors.values())
    ours = sum(t.numel() for t in weights.values())
    if exported != ours:
        raise ConversionError(
            f"the export holds {exported:,} weights but the model has {ours:,}: "
            "parameters without a Hugging Face counterpart"
        )


def export_checkpoint(
    load: str, save: str, fmt: str = "auto", dtype: str = "float32", tokenizer_model: Optional[str] = None
) -> Report:
    """Write the checkpoint ``load`` (any TP/PP/EP) as a Hugging Face model directory ``save``."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.exists(save):
        raise ConversionError(f"output {save} already exists")
    path, meta = megatron_io.read_checkpoint(load)
    notes: list[str] = []
    variant = meta.architecture.variant
    if meta.peft is not None:
        raise ConversionError(
            f"peft={meta.peft['method']}: {path} holds adapters on a base model, which the exported "
            "formats cannot express; export the base checkpoint"
        )
    config = meta.architecture.one_rank_config()
    fmt, reason = choose_format(fmt, config, variant)
    if reason:
        notes.append(f"exported with --format bam (trust_remote_code) because {reason}")
    if fmt == "cohere":
        cohere.check_exportable(config, variant)
    else:
        bam_format.check_exportable(config)
    tokenizer = _export_tokenizer(meta, tokenizer_model, notes)
    token_ids = hf_files.sentencepiece_ids(tokenizer) if tokenizer else {}
    weights, config = megatron_io.load_weights(path, meta)  # every check passed: now the expensive part
    convert_weights = cohere.to_cohere if fmt == "cohere" else bam_format.to_bam
    tensors, hf_config = convert_weights(weights, config, meta, token_ids)
    _check_all_converted(weights, tensors)
    hf_config["dtype"] = dtype
    tensors = {name: t.to(DTYPES[dtype]) for name, t in tensors.items()}
    with hf_files.atomic_directory(save) as tmp:
        hf_files.write_weights(tmp, tensors)
        hf_files.write_json(os.path.join(tmp, "config.json"), hf_config)
        if fmt == "bam":
            bam_format.copy_model_code(tmp)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, hf_files.TOKENIZER))
        hf_files.write_json(
            os.path.join(tmp, EXPORT_MANIFEST),
            {
                "source": os.path.abspath(path),
                "iteration": meta.iteration,
                "checkpoint_hash": checkpoint.checkpoint_hash(path),
                "variant": variant,
                "format": fmt,
                "dtype": dtype,
                "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
                "notes": notes,
            },
        )
    return Report(os.path.abspath(save), fmt, notes)


def _import_tokenizer(hf_dir: str, override: Optional[str], vocab_size: int, notes: list[str]) -> Optional[str]:
    """The SentencePiece model the seed records: --tokenizer-model, else the directory's tokenizer.model."""
    if override is not None and not os.path.isfile(override):
        raise ConversionError(f"--tokenizer-model {override} not found")
    found = os.path.join(hf_dir, hf_files.TOKENIZER)
    path = override or (found if os.path.isfile(found) else None)
    if path is None:
        notes.append(
            f"no SentencePiece tokenizer.model in {hf_dir}: the seed records no tokenizer (pretrain_bam.py "
            "then accepts it only without --tokenizer-model; pass --tokenizer-model to record one)"
        )
        return None
    hf_files.sentencepiece_ids(path)  # a readable SentencePiece model
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
    if pieces > vocab_size:
        raise ConversionError(f"tokenizer {path} has {pieces} pieces, more than the model's vocab_size {vocab_size}")
    return path


def import_cohere(
    load: str, save: str, seq_length: Optional[int] = None, tokenizer_model: Optional[str] = None
) -> Report:
    """Write the Cohere directory ``load`` as a dense seed checkpoint ``save`` (a --save directory)."""
    cfg = hf_files.read_config(load)
    cohere.check_importable(cfg)
    if os.path.exists(save):
        raise ConversionError(f"output {save} already exists")
    if seq_length is not None and seq_length < 1:
        raise ConversionError(f"--seq-length must be >= 1, got {seq_length}")
    notes: list[str] = []
    tokenizer = _import_tokenizer(load, tokenizer_model, cfg["vocab_size"], notes)
    weights, architecture = cohere.from_cohere(hf_files.read_weights(load), cfg)
    final = os.path.abspath(save)
    scale = cfg.get("logit_scale")
    if scale not in (None, 1, 1.0):
        notes.append(f"logit_scale={scale} folded into the final norm's weight")
    imported = {
        "path": os.path.abspath(load),
        "model_type": "cohere",
        "logit_scale": scale,
        "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
    }
    with hf_files.atomic_directory(save) as tmp:
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, hf_files.TOKENIZER))
        meta = CheckpointMeta(
            architecture=architecture,
            seq_length=seq_length or int(cfg.get("max_position_embeddings") or 4096),
            tokenizer_fingerprint=hf_files.sha256_file(tokenizer) if tokenizer else None,
            tokenizer_model=os.path.join(final, hf_files.TOKENIZER) if tokenizer else None,
            lineage={"imported": imported},
            training={"init_method_std": float(cfg.get("initializer_range", 0.02))},
        )
        megatron_io.save_weights(tmp, weights, meta)
        with open(os.path.join(tmp, IMPORT_MANIFEST), "w") as f:
            json.dump(dict(imported, notes=notes), f, indent=2)
    return Report(final, "checkpoint", notes)
