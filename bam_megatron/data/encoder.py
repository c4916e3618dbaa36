"""The tokenizing half of preprocessing: one chunk of JSONL lines in, token arrays per key out.

Runs in the worker processes (or in-process with one worker); imports no megatron/torch so a worker
stays small. Each line is handled on its own, so results do not depend on how lines were chunked.
Each worker loads its own tokenizer from ``EncodeSettings`` (the path and the type the parent
resolved): tokenizers are never sent between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from bam_megatron.data.jsonl import InvalidLine, is_blank, parse_line
from bam_megatron.data.tokenizer import SENTENCEPIECE, load_tokenizer

# (number of the first line, the lines as read): the unit of work sent to a worker.
Chunk = tuple[int, list[bytes]]


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to encode lines (picklable: sent once to each worker)."""

    model_path: str
    keys: tuple[str, ...]
    append_eod: bool
    dtype: str  # numpy dtype name of the output .bin, e.g. "uint16"
    tokenizer_type: str = SENTENCEPIECE  # the loaded tokenizer's type (never None: workers do not re-detect)


@dataclass
class ChunkResult:
    """One chunk's documents, per key: all token ids concatenated plus each document's length."""

    tokens: list[numpy.ndarray]
    lengths: list[numpy.ndarray]
    documents: int = 0  # valid JSON lines
    empty: list[int] = field(default_factory=list)  # per key: empty / whitespace-only texts skipped
    blank_lines: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    bytes: int = 0


class ChunkEncoder:
    """Parses and tokenizes chunks of JSONL lines with one tokenizer (``__call__`` is the worker task)."""

    def __init__(self, settings: EncodeSettings) -> None:
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.model_path, settings.tokenizer_type)

    def __call__(self, chunk: Chunk) -> ChunkResult:
        """Encode ``(first_line_number, lines)``; bad lines are listed in ``invalid``, never raised."""
        first, lines = chunk
        keys, eod, tokenize = self.settings.keys, self.tokenizer.eod, self.tokenizer.tokenize
        flat: list[list[int]] = [[] for _ in keys]
        lengths: list[list[int]] = [[] for _ in keys]
        result = ChunkResult(tokens=[], lengths=[], empty=[0] * len(keys), bytes=sum(map(len, lines)))
        for number, raw in enumerate(lines, start=first):
            if is_blank(raw):
                result.blank_lines += 1
                continue
            try:
                texts = parse_line(raw, keys)
            except InvalidLine as error:
                result.invalid.append((number, str(error)))
                continue
            result.documents += 1
            for k, text in enumerate(texts):
                if not text.strip():  # would be a zero-length (or eod-only) document
                    result.empty[k] += 1
                    continue
                ids = tokenize(text)
                if self.settings.append_eod:
                    ids.append(eod)
                flat[k].extend(ids)
                lengths[k].append(len(ids))
        result.tokens = [numpy.array(ids, dtype=self.settings.dtype) for ids in flat]
        result.lengths = [numpy.array(ns, dtype=numpy.int64) for ns in lengths]
        return result


# Worker-process state: the encoder built once per worker by ``init_worker``.
_WORKER_ENCODER: ChunkEncoder | None = None


def init_worker(settings: EncodeSettings) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = ChunkEncoder(settings)


def encode_in_worker(chunk: Chunk) -> ChunkResult:
    """Pool task: encode one chunk with this worker's encoder."""
    assert _WORKER_ENCODER is not None, "init_worker did not run in this process"
    return _WORKER_ENCODER(chunk)
