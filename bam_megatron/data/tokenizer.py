"""Tokenizers with the interface megatron-core's datasets use: SentencePiece and Hugging Face.

Two kinds, under Megatron-LM's ``--tokenizer-type`` names (``TOKENIZER_TYPES``):

- ``SentencePieceTokenizer``: a SentencePiece ``.model`` file (``bam-train-tokenizer`` writes them).
- ``HuggingFaceTokenizer``: a Hugging Face tokenizer directory (``tokenizer.json``,
  ``tokenizer_config.json``, ...), as the Llama, Mistral and Qwen families ship, loaded with
  transformers' ``AutoTokenizer`` from local files only.

``load_tokenizer(path, tokenizer_type=None)`` picks one (None: a directory holding tokenizer.json is
Hugging Face, a file is SentencePiece). Both have the same attributes: megatron-core's ``GPTDataset``
reads ``tokenizer.eod`` (document separator, used for masks) and ``tokenizer.pad`` (masked out of
the loss); ``vocab_size`` picks the token dtype; ``fingerprint`` (sha256 of the files that define the
tokenization) is what checkpoints record; ``tokenize`` never adds bos/eos (preprocessing's
``--append-eod`` decides). Models trained by ``bam-train-tokenizer`` have fixed special ids
(``SPECIAL_IDS``): pad=0, unk=1, bos=2, eos=eod=3. A model trained elsewhere keeps its own ids; an
absent special token reads as -1 (SentencePiece's convention, and megatron-core's own "no pad token"
value).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Union

import sentencepiece

from bam_megatron.data.errors import DataError, MissingFileError
from bam_megatron.data.files import require_file

# Megatron-LM's --tokenizer-type names of the kinds this module loads.
SENTENCEPIECE = "SentencePieceTokenizer"
HUGGINGFACE = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)

# The files of a Hugging Face tokenizer directory that define its tokenization, in fingerprint order.
# tokenizer.json is required; the others are hashed where present (transformers reads all four).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# The ids bam-train-tokenizer gives the special tokens (documented contract, checked by tests).
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


class SentencePieceTokenizer:
    """A SentencePiece model with Megatron's tokenizer attributes (``eod``, ``pad``, ``vocab_size``, ...).

    Args:
        model_path: path to a ``.model`` file written by SentencePiece.

    Raises:
        DataError: (``MissingFileError`` when absent) if the file is missing or not a SentencePiece model.
    """

    tokenizer_type = SENTENCEPIECE
    """Megatron-LM's ``--tokenizer-type`` name of this kind (recorded in checkpoints)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.path = os.fspath(model_path)
        require_file(self.path, "tokenizer model")
        with open(self.path, "rb") as f:
            proto = f.read()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as error:
            raise DataError(f"not a SentencePiece model: {self.path} ({_first_line(error)})") from None
        if self._sp.get_piece_size() == 0:
            raise DataError(f"not a SentencePiece model: {self.path} (no pieces)")
        # Fingerprint of the exact model bytes: lets a checkpoint record which tokenizer it was trained with.
        self.fingerprint = hashlib.sha256(proto).hexdigest()

    @property
    def unique_identifiers(self) -> dict[str, str]:
        """What megatron-core's datasets hash into their index-cache key: the model's content, not its path."""
        return {"class": type(self).__name__, "sha256": self.fingerprint}

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model (before Megatron's padding; see ``padded_vocab_size``)."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id, appended after each document by ``--append-eod``: the eos id."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """End-of-sequence id (-1 if the model has none)."""
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (-1 if the model has none)."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Padding id, masked out of the loss by megatron-core (-1 if the model has none)."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        """Unknown-piece id (never produced for models trained with byte fallback)."""
        return self._sp.unk_id()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos (those are the dataset builder's business)."""
        return self._sp.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids``; the inverse of ``tokenize`` for models trained by ``bam-train-tokenizer``."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer directory with the interface of ``SentencePieceTokenizer``.

    Loaded with ``transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)``:
    never the network, never remote code. transformers is imported here, on first use, so
    SentencePiece users do not pay for its import.

    - ``eod`` is the tokenizer's eos token. There is no fallback to bos: bos marks where a document
      starts, and a model trained with it as the separator would learn to end documents with their
      start token; a tokenizer without an eos token is refused (set ``eos_token`` in its
      tokenizer_config.json).
    - ``pad`` is its pad token, else ``eod`` (Llama and Mistral define none). megatron-core's
      ``GPTDataset`` takes a pad equal to eod as "no pad token" (-1, with a warning), so eod stays in
      the loss; instruction data pads with it and masks by position (``bam_megatron.data.instruct``).
    - ``vocab_size`` is ``len(tokenizer)``: the whole vocabulary, added tokens included.
    - ``fingerprint`` is a sha256 over the files of ``HF_TOKENIZER_FILES`` that exist, in that order
      (each as its name, its length and its bytes): the same directory copied anywhere gives the same
      fingerprint; another vocabulary, merge list or special token gives another.
    - ``tokenize`` adds no special tokens (``add_special_tokens=False``): no bos, no eos.

    Args:
        directory: a directory holding ``tokenizer.json`` (what ``save_pretrained`` writes).

    Raises:
        DataError: (``MissingFileError`` when absent) one line naming the directory or file at fault:
            missing, not a directory, without tokenizer.json, a file that is not valid JSON, a
            tokenizer transformers cannot load, no eos token, or transformers not installed.
    """

    tokenizer_type = HUGGINGFACE
    """Megatron-LM's ``--tokenizer-type`` name of this kind (recorded in checkpoints)."""

    def __init__(self, directory: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(directory)
        _require_hf_directory(self.path)
        digest = hashlib.sha256()
        for name in HF_TOKENIZER_FILES:
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                continue
            with open(file, "rb") as f:
                data = f.read()
            try:
                json.loads(data)
            except (UnicodeDecodeError, ValueError) as error:
                raise DataError(f"not a Hugging Face tokenizer file: {file} (invalid JSON: {error})") from None
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        self.fingerprint = digest.hexdigest()
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise DataError(
                f'{self.path} is a Hugging Face tokenizer, which needs transformers ({error}): pip install -e ".[hf]"'
            ) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        except Exception as error:  # transformers and tokenizers raise many types (some from Rust)
            # The input is a local directory whose files parse as JSON: what fails here is its content.
            reason = f"{type(error).__name__}: {_first_line(error)}"
            raise DataError(f"not a Hugging Face tokenizer: {self.path} ({reason})") from None
        if self._tok.eos_token_id is None:
            raise DataError(
                f"Hugging Face tokenizer {self.path} has no eos token, which bam-megatron uses as the "
                "end-of-document id: set eos_token in its tokenizer_config.json"
            )

    @property
    def unique_identifiers(self) -> dict[str, str]:
        """What megatron-core's datasets hash into their index-cache key: the files' content, not their path."""
        return {"class": type(self).__name__, "sha256": self.fingerprint}

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: the whole vocabulary with added tokens (before Megatron's padding)."""
        return len(self._tok)

    @property
    def eod(self) -> int:
        """End-of-document id, appended after each document by ``--append-eod``: the eos id."""
        return self._tok.eos_token_id

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return self._tok.eos_token_id

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (-1 if the tokenizer has none)."""
        return _id_or_absent(self._tok.bos_token_id)

    @property
    def pad(self) -> int:
        """The pad token's id; ``eod`` when the tokenizer has none (see the class docstring)."""
        pad = self._tok.pad_token_id
        return self.eod if pad is None else pad

    @property
    def unk(self) -> int:
        """Unknown-token id (-1 if the tokenizer has none, e.g. byte-level BPE)."""
        return _id_or_absent(self._tok.unk_token_id)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos or any other special token the tokenizer would add."""
        # verbose=False: no "longer than the model's maximum length" warning; documents are cut into
        # --seq-length samples later.
        return self._tok.encode(text, add_special_tokens=False, verbose=False)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens kept, no clean-up of spaces)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


Tokenizer = Union[SentencePieceTokenizer, HuggingFaceTokenizer]


def load_tokenizer(path: Union[str, os.PathLike], tokenizer_type: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer: ``tokenizer_type`` is Megatron-LM's name (``TOKENIZER_TYPES``) or None for auto.

    Auto: a directory holding tokenizer.json is a Hugging Face tokenizer, a file a SentencePiece
    model. An unknown type, a missing path, a directory without tokenizer.json or a file that is not
    a tokenizer is a one-line ``DataError`` naming the path.
    """
    path = os.fspath(path)
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(
            f"unknown tokenizer type {tokenizer_type!r} for {path} (expected one of {', '.join(TOKENIZER_TYPES)})"
        )
    if tokenizer_type is None:
        if not os.path.exists(path):
            raise MissingFileError(f"tokenizer model not found: {path}")
        tokenizer_type = HUGGINGFACE if os.path.isdir(path) else SENTENCEPIECE
    if tokenizer_type == HUGGINGFACE:
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


def _require_hf_directory(path: str) -> None:
    """A one-line ``DataError`` unless ``path`` is a directory holding a readable tokenizer.json."""
    if not os.path.exists(path):
        raise MissingFileError(f"Hugging Face tokenizer directory not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"a Hugging Face tokenizer is a directory holding tokenizer.json, not a file: {path}")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        hint = ""
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            hint = f" (for its SentencePiece model give {os.path.join(path, 'tokenizer.model')})"
        raise DataError(f"no tokenizer.json in {path}: not a Hugging Face tokenizer directory{hint}")


def _id_or_absent(token_id: Optional[int]) -> int:
    """A special token's id, or -1 (SentencePiece's and megatron-core's "absent") when it has none."""
    return -1 if token_id is None else int(token_id)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (SentencePiece's errors carry a C++ source location)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
