"""SentencePiece tokenizer with the interface megatron-core's datasets use, and Megatron's vocab padding.

megatron-core's ``GPTDataset`` reads ``tokenizer.eod`` (document separator, used for masks) and
``tokenizer.pad`` (masked out of the loss); ``vocab_size`` picks the token dtype. Models trained by
``bam-train-tokenizer`` have fixed special ids (``SPECIAL_IDS``): pad=0, unk=1, bos=2, eos=eod=3.
A model trained elsewhere keeps its own ids; an absent special token reads as -1 (SentencePiece's
convention, and megatron-core's own "no pad token" value).
"""

from __future__ import annotations

import hashlib
import os

import sentencepiece

from bam_megatron.data.errors import DataError
from bam_megatron.data.files import require_file

# The ids bam-train-tokenizer gives the special tokens (documented contract, checked by tests).
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


class SentencePieceTokenizer:
    """A SentencePiece model with Megatron's tokenizer attributes (``eod``, ``pad``, ``vocab_size``, ...).

    Args:
        model_path: path to a ``.model`` file written by SentencePiece.

    Raises:
        DataError: (``MissingFileError`` when absent) if the file is missing or not a SentencePiece model.
    """

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


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    """Load a SentencePiece model; a missing or invalid file is a one-line ``DataError`` naming it."""
    return SentencePieceTokenizer(path)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (SentencePiece's errors carry a C++ source location)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
