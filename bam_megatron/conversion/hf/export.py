"""bam-convert-hf export: a checkpoint -> a complete Hugging Face model directory, streamed.

1. The format: ``--format auto`` takes the first transformers class that computes the model exactly
   (`formats.preferences`: the family the seed was imported from, then by what the model computes),
   else the remote code, and says why; a forced class that cannot compute it is refused naming the
   setting.
2. The plan: the target's mapping run on a meta-device model gives every tensor's name and shape,
   hence the shards (``--max-shard-size``), before a weight is read.
3. The weights: one unit at a time (embedding + final norm + output layer, then each layer) is read
   from the checkpoint (`layerwise.read_unit`: any TP/PP/EP layout, resharded on the fly), mapped
   and written tensor by tensor (`hf_files.ShardedSafetensorsWriter`): memory is about one layer.
4. config.json, generation_config.json, the tokenizer (`hf_tokenizer`), remote code if any, and
   ``bam_export.json`` (what was exported from where).
5. The check: transformers loads a native export back (``from_pretrained(output_loading_info=True)``,
   memory-mapped, nothing computed) and any missing, unexpected or mismatched (re-initialised)
   weight refuses the export. All of it happens in a temporary sibling renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bam_megatron.conversion.hf import formats, hf_files, hf_tokenizer
from bam_megatron.conversion.hf.bam_format import fold_router_offsets
from bam_megatron.conversion.hf.bridge import meta_units
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.megatron_io import TrackedParams
from bam_megatron.conversion.hf.target import TOP, Target
from bam_megatron.model.architecture import Architecture
from bam_megatron.platform import faults

FORMATS = ("auto", *formats.TARGETS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_MANIFEST = "bam_export.json"
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Report:
    """What a conversion wrote and the notes a user should read (what was not carried)."""

    output: str
    format: str
    notes: list[str] = field(default_factory=list)


def _no_native_class(a: Architecture) -> str:
    """Why no transformers class is even a candidate for this (variant, block)."""
    if a.has_soft_moa:
        return (
            f"variant={a.variant}: no transformers class computes a soft mixture of attention experts "
            "(JetMoe's mixture of attention heads is not this function: docs/hf.md)"
        )
    return (
        f"block_type=parallel with variant={a.variant}: no transformers class computes it exactly "
        "(Cohere2MoeForCausalLM applies RoPE on sliding-window layers only and softmaxes the top-k logits: docs/hf.md)"
    )


def choose_target(
    requested: str,
    a: Architecture,
    config,
    imported: Optional[str] = None,
    tokenizer_reason: Callable[[Target], Optional[str]] = lambda target: None,
) -> tuple[Target, list[str]]:
    """The target of ``--format requested`` (refused, naming the setting, if it cannot compute the
    model, or if AutoTokenizer would not encode as its tokenizer: ``tokenizer_reason``); for
    ``auto`` the first such native class, else the remote code with the reason."""
    if requested != "auto":
        target = formats.TARGETS[requested]
        reason = target.why_not(a, config) or (None if target.remote_code else tokenizer_reason(target))
        if reason:
            raise ConversionError(f"--format {requested}: {reason}")
        return target, []
    reasons: list[tuple[Target, str]] = []
    for target in formats.preferences(a, imported):
        reason = target.why_not(a, config) or tokenizer_reason(target)
        if reason is None:
            if not reasons:
                return target, []
            first, why = reasons[0]
            return target, [f"exported as {target.architecture_class}, not {first.architecture_class}, because {why}"]
        reasons.append((target, reason))
    remote = formats.TARGETS["bam"]
    refused = remote.why_not(a, config)
    if refused:
        raise ConversionError(refused)
    reason = reasons[0][1] if reasons else _no_native_class(a)
    return remote, [f"exported with --format bam (trust_remote_code) because {reason}"]


def _mapped(target: Target, unit: int, params: dict, a: Architecture, config) -> dict[str, torch.Tensor]:
    """The target's tensors of one unit; every parameter of the unit must have gone into them."""
    tracked = TrackedParams(params)
    tensors = target.unit(unit, tracked, a, config)
    left = sorted(set(params) - tracked.touched)
    if left:
        raise ConversionError(
            f"{target.architecture_class} has no counterpart for {', '.join(left[:3])}"
            + (f" (and {len(left) - 3} more)" if len(left) > 3 else "")
        )
    return tensors


def token_ids_for(meta, tokenizer: Optional[hf_tokenizer.ExportTokenizer]) -> dict[str, Any]:
    """bos/eos/pad ids: those of the Hugging Face config the seed was imported from, else the tokenizer's."""
    imported = (meta.lineage.get("imported") or {}).get("config") or {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    if any(imported.get(key) is not None for key in keys):
        return {key: imported.get(key) for key in keys}
    return tokenizer.token_ids() if tokenizer else {}


def check_loads(directory: str, target: Target, dtype: torch.dtype) -> None:
    """transformers loads ``directory`` as ``target``'s class with every weight from the files: no
    missing (re-initialised), unexpected or mis-shaped tensor. Memory-mapped: nothing is computed."""
    import gc
    import warnings

    import transformers
    from transformers import AutoModelForCausalLM

    cls = target.architecture_class
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # Qwen2-MoE's empty shared expert: torch notes its init is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, output_loading_info=True, local_files_only=True
            )
    except Exception as error:  # transformers raises several kinds for weights that do not fit
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConversionError(f"transformers cannot load the export as {cls}: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    loaded = type(model).__name__
    del model
    gc.collect()
    if loaded != cls:
        raise ConversionError(f"transformers loads the export as {loaded}, not {cls}")
    for kind, what in (
        ("missing_keys", "missing from the export (transformers would initialise it at random)"),
        ("mismatched_keys", "mis-shaped in the export"),
        ("unexpected_keys", "in the export but not in the model"),
    ):
        names = sorted(str(n) for n in info.get(kind) or ())
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ConversionError(f"{cls}: tensor {names[0]}{more} is {what}")
    if info.get("error_msgs"):
        raise ConversionError(f"{cls} cannot load the export: {str(info['error_msgs'][0]).splitlines()[0]}")


PROBE_TEXT = "Hello, world! 12 + 3.5 = 15.5;  two  spaces\tand\nnewlines. Café, naïve, 漢字 ☃ </tag>"


def tokenizer_mismatch(
    tokenizer: Optional[hf_tokenizer.ExportTokenizer], hf_config: dict[str, Any], target: Target
) -> Optional[str]:
    """Why ``AutoTokenizer.from_pretrained`` on the export would not encode as the checkpoint's
    tokenizer did in training (None: it does, or there is no tokenizer).

    transformers picks the tokenizer class from config.json's model_type as well as from
    tokenizer_config.json (for ``qwen2`` it always builds Qwen's byte-level tokenizer), so the
    tokenizer's files and the target's config.json are written to a scratch directory and loaded.
    """
    if tokenizer is None:
        return None
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    from bam_megatron.data.tokenizer import load_tokenizer

    expected = load_tokenizer(tokenizer.source, tokenizer.kind).tokenize(PROBE_TEXT)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="bam-tokenizer-") as scratch:
            hf_files.write_json(os.path.join(scratch, "config.json"), hf_config)
            tokenizer.write(scratch)
            loaded = AutoTokenizer.from_pretrained(scratch, local_files_only=True)
            got = loaded(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception as error:  # transformers raises several kinds for tokenizers it cannot build
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"AutoTokenizer cannot load the tokenizer next to {target.architecture_class}'s config: {first}"
    finally:
        transformers.logging.set_verbosity(verbosity)
    if got == expected:
        return None
    hint = (
        " (for model_type qwen2 transformers always builds Qwen's byte-level tokenizer: export with --format llama)"
        if target.model_type == "qwen2"
        else ""
    )
    return (
        f"AutoTokenizer.from_pretrained would load the tokenizer as {type(loaded).__name__} next to "
        f"{target.architecture_class}'s config.json, which does not encode as the checkpoint's tokenizer{hint}"
    )


def export_checkpoint(
    load: str,
    save: str,
    fmt: str = "auto",
    dtype: str = "float32",
    tokenizer_model: Optional[str] = None,
    max_shard_size: str = hf_files.DEFAULT_MAX_SHARD_SIZE,
) -> Report:
    """Write the checkpoint ``load`` (any TP/PP/EP) as a Hugging Face model directory ``save``."""
    from bam_megatron import checkpoint
    from bam_megatron.checkpoint.layerwise import read_unit
    from bam_megatron.checkpoint.store import stored_key_names
    from bam_megatron.conversion.hf import megatron_io

    if fmt not in FORMATS:
        raise ConversionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shard_limit = hf_files.parse_size(max_shard_size)
    if os.path.exists(save):
        raise ConversionError(f"output {save} already exists")
    path, meta = megatron_io.read_checkpoint(load)
    if meta.peft is not None:
        raise ConversionError(
            f"peft={meta.peft['method']}: {path} holds adapters on a base model, which the exported "
            "formats cannot express; export the base checkpoint"
        )
    a = meta.architecture
    imported = (meta.lineage.get("imported") or {}).get("model_type")
    model, config, units = meta_units(a, meta.seq_length)
    notes: list[str] = []
    tokenizer = hf_tokenizer.find(meta, tokenizer_model, notes)
    token_ids = token_ids_for(meta, tokenizer)

    def tokenizer_reason(candidate: Target) -> Optional[str]:
        return tokenizer_mismatch(tokenizer, candidate.hf_config(a, config, meta, token_ids), candidate)

    target, chosen = choose_target(fmt, a, config, imported, tokenizer_reason)
    notes = chosen + notes
    hf_config = target.hf_config(a, config, meta, token_ids)
    hf_config["dtype"] = dtype
    order = [TOP, *range(a.num_layers)]
    plan = [  # on the meta device: names and shapes, no data
        (name, tuple(t.shape), DTYPES[dtype])
        for unit in order
        for name, t in _mapped(target, unit, units[unit], a, config).items()
    ]
    stored_key = stored_key_names(meta)
    with hf_files.atomic_directory(save) as tmp:
        writer = hf_files.ShardedSafetensorsWriter(tmp, plan, shard_limit)
        try:
            for unit in order:  # every check passed: now the expensive part, one unit in memory
                weights = fold_router_offsets(read_unit(model, unit, path, stored_key), meta)
                with torch.no_grad():
                    for name, tensor in _mapped(target, unit, weights, a, config).items():
                        writer.write(name, tensor.to(DTYPES[dtype]))
                del weights
                faults.reached("export-writing")
            files = writer.finish()
        finally:
            writer.abort()
        hf_files.write_json(os.path.join(tmp, "config.json"), hf_config)
        ids = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        hf_files.write_json(os.path.join(tmp, GENERATION_CONFIG), {k: v for k, v in ids.items() if v is not None})
        target.copy_files(tmp)
        tokenizer_files = tokenizer.write(tmp) if tokenizer else []
        hf_files.write_json(
            os.path.join(tmp, EXPORT_MANIFEST),
            {
                "source": os.path.abspath(path),
                "iteration": meta.iteration,
                "checkpoint_hash": checkpoint.checkpoint_hash(path),
                "variant": a.variant,
                "block_type": a.block_type,
                "format": target.name,
                "class": target.architecture_class,
                "dtype": dtype,
                "weights": files,
                "tokenizer": os.path.abspath(tokenizer.source) if tokenizer else None,
                "tokenizer_type": tokenizer.kind if tokenizer else None,
                "tokenizer_files": tokenizer_files,
                "notes": notes,
            },
        )
        if not target.remote_code:
            check_loads(tmp, target, DTYPES[dtype])
    return Report(os.path.abspath(save), target.name, notes)
