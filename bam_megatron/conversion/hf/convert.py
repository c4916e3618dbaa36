"""The two conversions end to end: checkpoint -> Hugging Face directory (`export`), Hugging Face
directory -> seed checkpoint (`import_hf`, here).

Both write into a temporary sibling of the output and rename it when complete, so a failure
leaves no output at all.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.conversion.hf import families, hf_files, megatron_io
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.export import DTYPES, FORMATS, Report, export_checkpoint
from bam_megatron.conversion.hf.hf_tokenizer import HF_TOKENIZER_EXTRA_FILES, exported_sentencepiece

__all__ = ["DTYPES", "FORMATS", "Report", "export_checkpoint", "import_hf"]

IMPORT_MANIFEST = "import_manifest.json"
HF_TOKENIZER_DIR = "tokenizer"  # OUT/tokenizer/: the copy the seed records


@dataclass
class _Tokenizer:
    """The tokenizer an imported seed records: its kind and where it comes from."""

    kind: str  # data.tokenizer's SENTENCEPIECE or HUGGINGFACE
    source: str  # a SentencePiece .model file, or a Hugging Face tokenizer directory


def _find_tokenizer(hf_dir: str, override: Optional[str], notes: list[str]) -> Optional[_Tokenizer]:
    """--tokenizer-model (a file: SentencePiece; a directory: Hugging Face), else the model
    directory's tokenizer.json (Hugging Face), else its tokenizer.model (SentencePiece), else none."""
    from bam_megatron.data.tokenizer import HUGGINGFACE, SENTENCEPIECE

    if override is not None:
        if not os.path.exists(override):
            raise ConversionError(f"--tokenizer-model {override} not found")
        return _Tokenizer(HUGGINGFACE if os.path.isdir(override) else SENTENCEPIECE, override)
    exported = exported_sentencepiece(hf_dir)
    if exported is not None:  # our own export of a SentencePiece model (its tokenizer.json is derived from it)
        return _Tokenizer(SENTENCEPIECE, exported)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return _Tokenizer(HUGGINGFACE, hf_dir)
    if os.path.isfile(os.path.join(hf_dir, hf_files.TOKENIZER)):
        return _Tokenizer(SENTENCEPIECE, os.path.join(hf_dir, hf_files.TOKENIZER))
    notes.append(
        f"no tokenizer (tokenizer.json or tokenizer.model) in {hf_dir}: the seed records no tokenizer "
        "(pretrain_bam.py then accepts it only without --tokenizer-model; pass --tokenizer-model to record one)"
    )
    return None


def _copy_tokenizer(tokenizer: _Tokenizer, out: str, vocab_size: int) -> tuple[str, str]:
    """Copy the tokenizer into the output directory ``out``; (its name there, its fingerprint).

    The fingerprint is the one ``pretrain_bam.py --tokenizer-model`` computes for the copy
    (bam_megatron.data.tokenizer), so the seed's meta and a run on the copy agree.
    """
    from bam_megatron.data.errors import DataError
    from bam_megatron.data.tokenizer import HF_TOKENIZER_FILES, SENTENCEPIECE, load_tokenizer

    if tokenizer.kind == SENTENCEPIECE:
        name = hf_files.TOKENIZER
        hf_files.sentencepiece_ids(tokenizer.source)  # a readable SentencePiece model
        shutil.copyfile(tokenizer.source, os.path.join(out, name))
    else:
        name = HF_TOKENIZER_DIR
        os.makedirs(os.path.join(out, name))
        for file in (*HF_TOKENIZER_FILES, *HF_TOKENIZER_EXTRA_FILES):
            if os.path.isfile(os.path.join(tokenizer.source, file)):
                shutil.copyfile(os.path.join(tokenizer.source, file), os.path.join(out, name, file))
    try:
        loaded = load_tokenizer(os.path.join(out, name), tokenizer.kind)
        size = loaded.vocab_size
    except DataError as error:
        raise ConversionError(f"tokenizer {tokenizer.source}: {error}") from None
    if size > vocab_size:
        raise ConversionError(
            f"tokenizer {tokenizer.source} has {size} tokens, more than the model's vocab_size {vocab_size}"
        )
    return name, loaded.fingerprint


def import_hf(load: str, save: str, seq_length: Optional[int] = None, tokenizer_model: Optional[str] = None) -> Report:
    """Write the Hugging Face model directory ``load`` as a dense seed checkpoint ``save`` (a --save directory).

    The family comes from config.json (`families.importer_for`: every family `families.IMPORTERS` names),
    which is checked first, then every tensor's name, shape and dtype from the safetensors headers;
    only then is anything written. Tensors are read one at a time and the checkpoint is written
    layer by layer (`megatron_io.save_weights`), into a temporary sibling renamed when complete.
    """
    from bam_megatron.errors import UserError
    from bam_megatron.platform.memory import return_freed_tensors_to_os

    return_freed_tensors_to_os()
    cfg = hf_files.read_config(load)
    importer = families.importer_for(cfg, seq_length)
    if os.path.exists(save):
        raise ConversionError(f"output {save} already exists")
    weights = hf_files.SafetensorsWeights(load)
    weights.check_dtypes()
    importer.check_tensors(weights.shapes)
    notes = list(importer.notes)
    tokenizer = _find_tokenizer(load, tokenizer_model, notes)
    architecture = importer.architecture
    final = os.path.abspath(save)
    imported = {
        "path": os.path.abspath(load),
        "model_type": importer.model_type,
        "architectures": importer.architecture_class,
        **importer.record(),
        "tokenizer": os.path.abspath(tokenizer.source) if tokenizer else None,
        "config": cfg,
    }
    with hf_files.atomic_directory(save) as tmp:
        name, fingerprint = (
            _copy_tokenizer(tokenizer, tmp, architecture.padded_vocab_size) if tokenizer else (None, None)
        )
        meta = CheckpointMeta(
            architecture=architecture,
            seq_length=importer.seq_length,
            tokenizer_fingerprint=fingerprint,
            tokenizer_model=os.path.join(final, name) if tokenizer else None,
            tokenizer_type=tokenizer.kind if tokenizer else None,
            lineage={"imported": imported},
            training={"init_method_std": float(importer.get("initializer_range") or 0.02)},
        )
        failures: list[UserError] = []

        def fill(unit: int, params: dict) -> None:
            try:
                with torch.no_grad():
                    importer.fill(unit, params, weights)
            except UserError as error:  # bad input found while writing (e.g. a tied lm_head that differs)
                failures.append(error)
                raise

        try:
            megatron_io.save_weights(tmp, meta, fill)
        except BaseException:  # (torch's CheckpointException is a BaseException)
            if failures:  # torch's checkpoint writer wraps what a fill raises: report the input error itself
                raise failures[0] from None
            raise
        hf_files.write_json(os.path.join(tmp, IMPORT_MANIFEST), dict(imported, notes=notes))
    return Report(final, "checkpoint", notes)
