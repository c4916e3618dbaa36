"""Reading JSONL corpora: one JSON object per line, text under one or more keys.

Lines are read as bytes and decoded where they are parsed (in the tokenizer workers), so a bad line
(invalid UTF-8, invalid JSON, not an object, missing key, non-string value) is reported with its file
and 1-based line number instead of failing the whole read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from bam_megatron.data.errors import DataError
from bam_megatron.data.files import require_file

STDIN = "-"


class InvalidLine(DataError):
    """A JSONL line that cannot be used; the message says why (the caller adds file and line number)."""


def parse_line(raw: bytes, keys: Sequence[str]) -> list[str]:
    """The texts under ``keys`` in one JSONL line, in ``keys`` order; ``InvalidLine`` if unusable."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as error:
        raise InvalidLine(f"invalid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise InvalidLine(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise InvalidLine(f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise InvalidLine(f"missing key {key!r} (keys present: {', '.join(map(repr, record)) or 'none'})")
        value = record[key]
        if not isinstance(value, str):
            raise InvalidLine(f"key {key!r} holds {type(value).__name__}, expected a string")
        texts.append(value)
    return texts


def is_blank(raw: bytes) -> bool:
    """True for a line with nothing but whitespace (skipped like an empty document, not an error)."""
    return not raw.strip()


@contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """Open ``path`` for binary line reading; ``-`` is standard input. Missing files raise ``DataError``."""
    if path == STDIN:
        yield sys.stdin.buffer
        return
    require_file(path, "input file")
    with open(path, "rb") as f:
        yield f


def display_name(path: str) -> str:
    """How error messages name the input (``<stdin>`` for ``-``)."""
    return "<stdin>" if path == STDIN else path


def iter_chunks(stream: BinaryIO, chunk_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """``(first_line_number, lines)`` groups of about ``chunk_bytes`` bytes, in file order.

    Chunk boundaries depend only on the input, never on the worker count, and each line is encoded on
    its own, so the output is the same whatever the parallelism.
    """
    lines: list[bytes] = []
    size, first = 0, 1
    for number, line in enumerate(stream, start=1):
        lines.append(line)
        size += len(line)
        if size >= chunk_bytes:
            yield first, lines
            lines, size, first = [], 0, number + 1
    if lines:
        yield first, lines
