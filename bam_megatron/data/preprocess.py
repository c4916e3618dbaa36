"""``bam-preprocess-data``: JSONL -> megatron-core indexed datasets, with Megatron-LM's flags and file names.

    bam-preprocess-data --input corpus.jsonl --tokenizer-model tok.model --output-prefix data/corpus \\
        --append-eod --workers 8

writes ``data/corpus_text_document.bin/.idx`` (one dataset per ``--json-keys`` key, named
``{output_prefix}_{key}_document`` as Megatron-LM's ``tools/preprocess_data.py`` does), ready for
``--data-path data/corpus_text_document``. Unlike Megatron-LM's tool it refuses bad input with the
file and line number, skips empty documents, refuses an empty corpus, and publishes a dataset only
when it is complete (see ``indexed_writer``).

``--tokenizer-model`` is a SentencePiece ``.model`` file or a Hugging Face tokenizer directory
(``tokenizer.json``, ...; ``--tokenizer-type HuggingFaceTokenizer``); without ``--tokenizer-type``
a directory is read as Hugging Face, a file as SentencePiece.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from bam_megatron.data.encoder import Chunk, ChunkEncoder, ChunkResult, EncodeSettings, encode_in_worker, init_worker
from bam_megatron.data.errors import DataError
from bam_megatron.data.files import output_directory, remove_stale_temporaries, require_file
from bam_megatron.data.jsonl import STDIN, display_name, iter_chunks, open_input
from bam_megatron.data.tokenizer import TOKENIZER_TYPES, load_tokenizer
from bam_megatron.errors import run_tool
from bam_megatron.platform import disk, faults

if TYPE_CHECKING:
    from bam_megatron.data.indexed_writer import AtomicDatasetWriter

# Lines are sent to workers in chunks of about this many bytes: big enough to amortise the IPC,
# small enough to keep every worker busy until the end of the file.
CHUNK_BYTES = 256 * 1024
# How many skipped invalid lines are named on stderr before the rest are only counted.
SHOWN_INVALID_LINES = 10


def build_parser() -> argparse.ArgumentParser:
    """The command line, Megatron-LM's flag names, grouped as input / tokenizer / output / runtime."""
    parser = argparse.ArgumentParser(
        prog="bam-preprocess-data",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, help="JSONL file, one JSON object per line ('-': stdin)")
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="keys holding the text; one dataset per key (default: text)",
    )
    group.add_argument(
        "--skip-invalid-lines",
        action="store_true",
        help="skip (and count) lines that are not valid JSON objects with every key as a string, "
        "instead of stopping with an error",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file, or Hugging Face tokenizer directory (holding tokenizer.json)",
    )
    group.add_argument(
        "--tokenizer-type",
        default=None,
        choices=TOKENIZER_TYPES,
        help="Megatron-LM's name of the tokenizer kind (default: from --tokenizer-model, a directory "
        "is HuggingFaceTokenizer, a file SentencePieceTokenizer)",
    )
    group.add_argument("--append-eod", action="store_true", help="append the tokenizer's eod id after each document")
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-prefix", required=True, help="path prefix; writes PREFIX_KEY_document.bin/.idx per key"
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="print progress to stderr about every this many documents (default: 1000)",
    )
    return parser


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's dataset name for one JSON key: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


@dataclass
class PreprocessStats:
    """What a run read, wrote and skipped (per-key lists follow ``keys``)."""

    keys: tuple[str, ...]
    prefixes: list[str]
    documents: int = 0  # valid JSON lines
    bytes: int = 0
    written: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    invalid: int = 0
    blank_lines: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        zeros = [0] * len(self.keys)
        self.written, self.tokens, self.empty = list(zeros), list(zeros), list(zeros)

    @property
    def total_tokens(self) -> int:
        """Tokens written over all datasets."""
        return sum(self.tokens)

    def rates(self, seconds: float) -> str:
        """``docs/s, tokens/s, MB/s`` over ``seconds`` (MB = 10^6 bytes of input)."""
        seconds = max(seconds, 1e-9)
        return (
            f"{self.documents / seconds:,.0f} docs/s, {self.total_tokens / seconds:,.0f} tokens/s, "
            f"{self.bytes / 1e6 / seconds:.2f} MB/s"
        )

    def summary(self) -> str:
        """The final one-line summary."""
        return (
            f"done: {self.documents} documents, {self.total_tokens} tokens, skipped {sum(self.empty)} empty "
            f"documents + {self.invalid} invalid lines + {self.blank_lines} blank lines, "
            f"{self.seconds:.2f} s ({self.rates(self.seconds)})"
        )


def preprocess(args: argparse.Namespace, log: TextIO | None = None) -> PreprocessStats:
    """Tokenize ``args.input`` into one indexed dataset per JSON key; ``DataError`` on bad input.

    On any error no dataset file is left behind (outputs are published by rename only at the end).
    """
    log = log or sys.stderr  # looked up per call: tests and callers may swap sys.stderr
    keys = _check_args(args)
    tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
    if args.append_eod and tokenizer.eod < 0:
        raise DataError(f"--append-eod: tokenizer {tokenizer.path} has no eos/eod token")
    if args.input != STDIN:
        require_file(args.input, "input file")  # before the slow import and any output
    name = display_name(args.input)
    # Imported here: megatron-core's import costs seconds, which --help and input errors need not pay.
    from bam_megatron.data.indexed_writer import AtomicDatasetWriter, publish, token_dtype

    dtype = token_dtype(tokenizer.vocab_size)
    settings = EncodeSettings(tokenizer.path, keys, args.append_eod, dtype.name, tokenizer.tokenizer_type)
    stats = PreprocessStats(keys=keys, prefixes=[dataset_prefix(args.output_prefix, k) for k in keys])
    print(
        f"preprocessing {name} -> {', '.join(stats.prefixes)} ({dtype.name} tokens); tokenizer "
        f"{tokenizer.path} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.fingerprint[:12]}), "
        f"{args.workers} worker(s)",
        file=log,
    )
    start = time.perf_counter()
    writers: list[AtomicDatasetWriter] = []
    published = False
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    with output_directory(out_dir):
        try:
            with open_input(args.input) as stream:
                for prefix in stats.prefixes:  # one by one: a failure on the second still discards the first
                    remove_stale_temporaries(out_dir, os.path.basename(prefix) + ".")
                    writers.append(AtomicDatasetWriter(prefix, dtype))
                next_log = args.log_interval
                with _encoded(iter_chunks(stream, CHUNK_BYTES), settings, args.workers) as results:
                    for result in results:
                        _consume(result, writers, stats, args.skip_invalid_lines, name, log)
                        faults.reached("dataset-writing")
                        if stats.documents >= next_log:
                            next_log = (stats.documents // args.log_interval + 1) * args.log_interval
                            elapsed = time.perf_counter() - start
                            print(f"processed {stats.documents} documents ({stats.rates(elapsed)})", file=log)
            for k, writer in enumerate(writers):
                if writer.tokens == 0:
                    raise DataError(
                        f"no tokens for key {keys[k]!r} in {name} ({stats.documents} documents, {stats.empty[k]} "
                        f"empty, {stats.invalid} invalid lines skipped): refusing to write an empty dataset, "
                        "which megatron-core cannot sample from"
                    )
            for writer in writers:
                writer.finalize()
            publish(writers)
            published = True
        except DataError:  # MissingFileError is an OSError too
            raise
        except OSError as error:  # a full disk, a directory that cannot be written, ...
            if disk.out_of_space(error, out_dir):
                raise DataError(
                    f"no space left on {disk.filesystem_of(out_dir)} while writing {args.output_prefix}; "
                    "nothing was published"
                ) from None
            raise DataError(f"{error.filename or args.output_prefix}: {error.strerror or error}") from None
        finally:
            if not published:
                for writer in writers:
                    writer.discard()
    stats.seconds = time.perf_counter() - start
    return stats


def _check_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Validate flags that argparse cannot; returns the JSON keys as a tuple."""
    keys = tuple(args.json_keys)
    if len(set(keys)) != len(keys):
        raise DataError(f"--json-keys: duplicate key in {' '.join(keys)}")
    for key in keys:
        if not key or "/" in key or key != key.strip():
            raise DataError(f"--json-keys: {key!r} cannot be part of a file name")
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    if args.log_interval < 1:
        raise DataError(f"--log-interval must be at least 1, got {args.log_interval}")
    return keys


@contextlib.contextmanager
def _encoded(chunks: Iterable[Chunk], settings: EncodeSettings, workers: int) -> Iterator[Iterator[ChunkResult]]:
    """Encoded chunks in input order: in this process for one worker, else a process pool (``imap``)."""
    if workers == 1:
        yield map(ChunkEncoder(settings), chunks)
        return
    # imap keeps order; its feeder blocks on the pool's pipe, so input is read only as fast as it is used.
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=(settings,)) as pool:
        yield pool.imap(encode_in_worker, chunks)


def _consume(
    result: ChunkResult,
    writers: list[AtomicDatasetWriter],
    stats: PreprocessStats,
    skip_invalid: bool,
    name: str,
    log: TextIO,
) -> None:
    """Write one chunk's documents and count what it skipped; an invalid line raises unless skipping."""
    if result.invalid and not skip_invalid:
        number, reason = result.invalid[0]
        raise DataError(f"{name}:{number}: {reason} (--skip-invalid-lines skips such lines)")
    for number, reason in result.invalid:
        if stats.invalid < SHOWN_INVALID_LINES:
            print(f"skipping {name}:{number}: {reason}", file=log)
        stats.invalid += 1
    stats.documents += result.documents
    stats.blank_lines += result.blank_lines
    stats.bytes += result.bytes
    for k, writer in enumerate(writers):
        writer.add_documents(result.tokens[k], result.lengths[k])
        stats.written[k] = writer.documents
        stats.tokens[k] = writer.tokens
        stats.empty[k] += result.empty[k]


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2, one line ``bam-preprocess-data: error: ...``: bad input)."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        try:
            stats = preprocess(args)
        except DataError:  # MissingFileError is an OSError too
            raise
        except OSError as error:  # reading the input or the tokenizer
            raise DataError(f"{error.filename or args.input}: {error.strerror or error}") from None
        for key, prefix, docs, tokens in zip(stats.keys, stats.prefixes, stats.written, stats.tokens):
            print(f"wrote {prefix}.bin/.idx: {docs} documents, {tokens} tokens (key {key!r})")
        print(stats.summary())

    return run_tool("bam-preprocess-data", body)
