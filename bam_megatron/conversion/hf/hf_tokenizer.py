"""The tokenizer an export ships, so that ``AutoTokenizer.from_pretrained(DIR)`` gives the ids we trained on.

- A Hugging Face tokenizer (the checkpoint's meta records ``HuggingFaceTokenizer`` and its directory):
  its files are copied as they are, after checking the fingerprint.
- A SentencePiece model: ``tokenizer.model`` is copied, and a ``tokenizer.json`` built from it
  (`sentencepiece_tokenizer_json`) with a ``tokenizer_config.json`` naming transformers' generic
  fast tokenizer. transformers' own loaders for a bare ``tokenizer.model`` do not give
  SentencePiece's ids: ``LlamaTokenizer`` assumes Llama's normaliser (no NFKC, no whitespace
  handling), the SentencePiece-backed classes decode byte pieces as ``<0x..>``. The built
  ``tokenizer.json`` carries the model's own normaliser (its precompiled charsmap), whitespace
  rules (dummy prefix, extra-whitespace removal, whitespace-only pieces) and pieces (BPE merges
  ordered by piece score, or the unigram scores), with byte fallback; tests/conversion/hf/test_hf_export.py
  checks it against SentencePiece on random text. The literal text of a control token (``</s>``)
  is that token for transformers and plain text for SentencePiece: the one difference.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from bam_megatron.conversion.hf import hf_files
from bam_megatron.conversion.hf.errors import ConversionError

# Files of a Hugging Face tokenizer directory copied where present: those that define the
# tokenization (data.tokenizer.HF_TOKENIZER_FILES, fingerprinted) and what transformers' slow
# tokenizers and chat templates read besides.
HF_TOKENIZER_EXTRA_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


@dataclass
class ExportTokenizer:
    """The tokenizer an export ships: its kind (data.tokenizer's names) and where it is."""

    kind: str
    source: str  # a SentencePiece .model file, or a Hugging Face tokenizer directory

    def token_ids(self) -> dict[str, Optional[int]]:
        """bos/eos/pad ids as config.json keys (None where the tokenizer has none)."""
        from bam_megatron.data.tokenizer import SENTENCEPIECE

        if self.kind == SENTENCEPIECE:
            return hf_files.sentencepiece_ids(self.source)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
        return {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }

    def write(self, directory: str) -> list[str]:
        """Write the tokenizer's files into ``directory``; their names."""
        from bam_megatron.data.tokenizer import HF_TOKENIZER_FILES, SENTENCEPIECE

        if self.kind != SENTENCEPIECE:
            names = [n for n in (*HF_TOKENIZER_FILES, *HF_TOKENIZER_EXTRA_FILES) if os.path.isfile(self._in(n))]
            for name in names:
                shutil.copyfile(self._in(name), os.path.join(directory, name))
            return names
        shutil.copyfile(self.source, os.path.join(directory, hf_files.TOKENIZER))
        tokenizer, specials = sentencepiece_tokenizer_json(self.source)
        tokenizer.save(os.path.join(directory, TOKENIZER_JSON), pretty=True)
        hf_files.write_json(os.path.join(directory, TOKENIZER_CONFIG), tokenizer_config(specials))
        hf_files.write_json(os.path.join(directory, SPECIAL_TOKENS_MAP), specials)
        return [hf_files.TOKENIZER, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]

    def _in(self, name: str) -> str:
        return os.path.join(self.source, name)


def tokenizer_config(specials: dict[str, str]) -> dict[str, Any]:
    """tokenizer_config.json for the built tokenizer.json: no bos/eos added (bam-megatron encodes
    documents without them), no clean-up of spaces on decoding (SentencePiece has none)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }


def find(meta, override: Optional[str], notes: list[str]) -> Optional[ExportTokenizer]:
    """The tokenizer to ship: ``--tokenizer-model`` (a file: SentencePiece; a directory: Hugging Face),
    else the one the checkpoint records; checked against the checkpoint's fingerprint. None (with a
    note) where the checkpoint records none or it moved or changed."""
    from bam_megatron.data.errors import DataError
    from bam_megatron.data.tokenizer import HUGGINGFACE, SENTENCEPIECE, load_tokenizer

    fingerprint = meta.tokenizer_fingerprint

    def matches(candidate: ExportTokenizer) -> bool:
        try:
            return load_tokenizer(candidate.source, candidate.kind).fingerprint == fingerprint
        except DataError:
            return False

    if override is not None:
        if not os.path.exists(override):
            raise ConversionError(f"--tokenizer-model {override} not found")
        given = ExportTokenizer(HUGGINGFACE if os.path.isdir(override) else SENTENCEPIECE, override)
        if fingerprint is not None and not matches(given):
            raise ConversionError(f"--tokenizer-model {override} is not the tokenizer the checkpoint was trained with")
        if given.kind == SENTENCEPIECE:
            hf_files.sentencepiece_ids(override)  # a readable SentencePiece model
        return given
    if fingerprint is None:
        notes.append(
            "the checkpoint records no tokenizer (trained on mock data, or imported without one): no tokenizer written"
        )
        return None
    recorded = meta.tokenizer_model
    kind = meta.tokenizer_type or SENTENCEPIECE
    if recorded and os.path.exists(recorded):
        candidate = ExportTokenizer(kind if kind in (SENTENCEPIECE, HUGGINGFACE) else SENTENCEPIECE, recorded)
        if matches(candidate):
            return candidate
    notes.append(
        f"the checkpoint's tokenizer ({recorded}) is missing or has changed: no tokenizer written "
        "(pass --tokenizer-model)"
    )
    return None


# SentencePiece's ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's whitespace symbol


def sentencepiece_tokenizer_json(path: str):
    """A ``tokenizers.Tokenizer`` that encodes and decodes text as the SentencePiece model at ``path``
    does; and its special tokens (bos/eos/unk/pad, as tokenizer_config.json keys).

    The model's normaliser is its precompiled charsmap (identity: none), then SentencePiece's
    whitespace rules: strip and collapse runs of spaces (``remove_extra_whitespaces``), a leading
    ``▁`` (``add_dummy_prefix``), spaces as ``▁``. SentencePiece splits the text into words before
    each ``▁`` (with ``allow_whitespace_only_pieces``, before each run of them), and a piece never
    crosses a word. BPE merges are every split of a piece into two pieces, ranked by the merged
    piece's score (SentencePiece merges the best-scoring pair first); unigram keeps the scores.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    special = [p.piece for p in pieces if p.type in (_UNKNOWN, _CONTROL)]
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        scores = {p.piece: p.score for p in pieces if p.type in (_NORMAL, _USER_DEFINED)}
        skip = [p.piece for p in pieces if p.type not in (_NORMAL, _USER_DEFINED)]
        merges = generate_merges(vocab, scores, skip_tokens=skip)
        model = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 1:  # unigram
        model = Unigram(
            [(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback
        )
    else:
        raise ConversionError(f"{path}: SentencePiece model type {trainer.model_type} (only BPE and unigram convert)")
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(normalizer.precompiled_charsmap)] if normalizer.precompiled_charsmap else []
    if normalizer.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    steps.append(normalizers.Replace(" ", _SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    word = f"{_SPACE}+[^{_SPACE}]*" if trainer.allow_whitespace_only_pieces else f"{_SPACE}[^{_SPACE}]*"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{word}|[^{_SPACE}]+"), behavior="isolated")
    steps = [decoders.Replace(_SPACE, " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if normalizer.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    ids = {
        "bos_token": trainer.bos_id,
        "eos_token": trainer.eos_id,
        "unk_token": trainer.unk_id,
        "pad_token": trainer.pad_id,
    }
    specials = {key: pieces[i].piece for key, i in ids.items() if 0 <= i < len(pieces)}
    return tokenizer, specials


def exported_sentencepiece(directory: str) -> Optional[str]:
    """The SentencePiece model of a directory bam-convert-hf exported with one (its manifest says so), else None."""
    from bam_megatron.data.tokenizer import SENTENCEPIECE

    manifest = os.path.join(directory, "bam_export.json")
    model = os.path.join(directory, hf_files.TOKENIZER)
    if not (os.path.isfile(manifest) and os.path.isfile(model)):
        return None
    try:
        with open(manifest) as f:
            recorded = json.load(f).get("tokenizer_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return model if recorded == SENTENCEPIECE else None
