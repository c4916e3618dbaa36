"""``bam-train-tokenizer``: train a SentencePiece model for ``bam-preprocess-data`` and training.

    bam-train-tokenizer --input corpus.jsonl extra.txt --vocab-size 32000 --output-prefix tokenizers/spm

writes ``tokenizers/spm.model`` and ``tokenizers/spm.vocab``. Inputs ending in .jsonl/.json/.ndjson are
read as JSONL (text under ``--json-keys``), anything else as plain text, line by line; every non-blank
line of text is one SentencePiece training sentence.

Fixed special ids (relied on by ``SentencePieceTokenizer`` and megatron-core's datasets):
pad=0 ``<pad>``, unk=1 ``<unk>``, bos=2 ``<s>``, eos=eod=3 ``</s>``.
Byte fallback is on (any text is encodable, unk is never produced), digits are split, and by
default text is not normalised and whitespace is kept, so ``detokenize(tokenize(text)) == text``.

The model is written into a temporary directory next to the output and renamed into place only when
training succeeded: a failed run leaves no ``.model`` behind.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

import sentencepiece

from bam_megatron.data.errors import DataError
from bam_megatron.data.files import fsync_path, output_directory, require_file
from bam_megatron.data.jsonl import InvalidLine, is_blank, parse_line
from bam_megatron.data.tokenizer import SPECIAL_IDS
from bam_megatron.errors import run_tool
from bam_megatron.platform import disk

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def build_parser() -> argparse.ArgumentParser:
    """The command line, grouped as input / tokenizer / output / runtime."""
    parser = argparse.ArgumentParser(
        prog="bam-train-tokenizer",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text (.txt, one sentence per line) and/or JSONL (.jsonl/.json/.ndjson) files",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="keys holding the text in JSONL inputs (default: text)",
    )
    group.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        metavar="N",
        help="train on a random sample of N > 100 sentences (default: 0, all of them)",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--vocab-size", type=int, required=True, help="number of pieces, special and byte pieces included"
    )
    group.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="(default: bpe)")
    group.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters given pieces, the rest as bytes (default: 0.9995)",
    )
    group.add_argument(
        "--normalization-rule-name",
        default="identity",
        choices=["identity", "nfkc", "nmt_nfkc"],
        help="SentencePiece normalisation (default: identity: exact round trips)",
    )
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=1234, help="seed of SentencePiece's sampling (default: 1234)")
    group.add_argument("--workers", type=int, default=1, help="SentencePiece trainer threads (default: 1)")
    group.add_argument(
        "--log-interval",
        type=int,
        default=100_000,
        help="print progress every this many sentences read (default: 100000)",
    )
    return parser


class SentenceReader:
    """Iterates the training sentences of all inputs, counting them and printing progress.

    An error raised while SentencePiece pulls sentences reaches Python as a bare ``RuntimeError``, so
    the reader keeps the original exception in ``error`` for the caller to re-raise.
    """

    def __init__(self, paths: Sequence[str], keys: Sequence[str], log_interval: int, log: TextIO) -> None:
        self.paths, self.keys, self.log_interval, self.log = list(paths), tuple(keys), log_interval, log
        self.sentences = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.start = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        try:
            for path in self.paths:
                print(f"reading {path}", file=self.log)
                for sentence in self._read(path):
                    self.sentences += 1
                    self.bytes += len(sentence)
                    if self.sentences % self.log_interval == 0:
                        print(f"read {self.sentences} sentences ({self._elapsed():.1f} s)", file=self.log)
                    yield sentence
            print(
                f"read {self.sentences} sentences ({self.bytes / 1e6:.1f} M characters) from "
                f"{len(self.paths)} file(s) in {self._elapsed():.1f} s",
                file=self.log,
            )
        except GeneratorExit:
            raise
        except BaseException as error:
            self.error = error
            raise

    def _read(self, path: str) -> Iterator[str]:
        """The non-blank lines of text in one input file."""
        jsonl = path.lower().endswith(JSONL_SUFFIXES)
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if is_blank(raw):
                    continue
                try:
                    texts = parse_line(raw, self.keys) if jsonl else [_decode(raw)]
                except InvalidLine as error:
                    raise DataError(f"{path}:{number}: {error}") from None
                for text in texts:
                    yield from (line for line in text.splitlines() if line.strip())

    def _elapsed(self) -> float:
        return time.perf_counter() - self.start


def train(args: argparse.Namespace, log: TextIO | None = None) -> str:
    """Train the model described by ``args``; returns the ``.model`` path. ``DataError`` on bad input."""
    log = log or sys.stderr  # looked up per call: tests and callers may swap sys.stderr
    for path in args.input:
        require_file(path, "input file")
    for flag, value, low in (
        ("--vocab-size", args.vocab_size, len(SPECIAL_IDS) + 1),
        ("--workers", args.workers, 1),
        ("--log-interval", args.log_interval, 1),
    ):
        if value < low:
            raise DataError(f"{flag} must be at least {low}, got {value}")
    if 0 < args.input_sentence_size <= 100 or args.input_sentence_size < 0:  # SentencePiece's own limit
        raise DataError(f"--input-sentence-size must be 0 (all sentences) or above 100, got {args.input_sentence_size}")
    if not 0 < args.character_coverage <= 1:
        raise DataError(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    reader = SentenceReader(args.input, args.json_keys, args.log_interval, log)
    sentences = iter(reader)
    try:
        first = next(sentences)
    except StopIteration:
        raise DataError(f"empty corpus: no text in --input {' '.join(args.input)}") from None

    out_dir, name = os.path.split(os.path.abspath(args.output_prefix))
    with output_directory(out_dir):
        tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir)
        try:
            print(f"training a {args.model_type} model, vocab {args.vocab_size}, seed {args.seed}", file=log)
            start = time.perf_counter()
            proto = _train_sentencepiece(args, _chain(first, sentences), reader)
            print(f"trained in {time.perf_counter() - start:.1f} s", file=log)
            _write_model_files(proto, os.path.join(tmp_dir, name))
            for suffix in (".vocab", ".model"):  # the .model last: it is what consumers look for
                fsync_path(os.path.join(tmp_dir, name + suffix))
                os.replace(os.path.join(tmp_dir, name + suffix), args.output_prefix + suffix)
            fsync_path(out_dir)
            model = args.output_prefix + ".model"
        except DataError:  # MissingFileError is an OSError too
            raise
        except OSError as error:
            if disk.out_of_space(error, out_dir):
                raise DataError(
                    f"no space left on {disk.filesystem_of(out_dir)} while writing {args.output_prefix}.model"
                ) from None
            raise DataError(f"{error.filename or args.output_prefix}: {error.strerror or error}") from None
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return model


def _train_sentencepiece(args: argparse.Namespace, sentences: Iterator[str], reader: SentenceReader) -> bytes:
    """Run SentencePiece's trainer and return the serialized model; its errors become one-line ``DataError``s.

    The model goes to memory, not to ``model_prefix``: SentencePiece records the prefix in the model,
    which would make the bytes (and the fingerprint) depend on the output path.
    """
    sentencepiece.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=args.workers,
            pad_id=SPECIAL_IDS["pad"],
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            byte_fallback=True,
            normalization_rule_name=args.normalization_rule_name,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            minloglevel=1,  # SentencePiece's per-step INFO log is thousands of lines; warnings still show
        )
    except RuntimeError as error:
        if reader.error is not None:  # raised by our reader, wrapped by SentencePiece
            raise reader.error from None
        detail = _sentencepiece_message(error)
        if "ocabulary size" in detail:
            raise DataError(f"--vocab-size {args.vocab_size} does not fit this corpus: {detail}") from None
        raise DataError(f"SentencePiece training failed: {detail}") from None
    return model.getvalue()


def _write_model_files(proto: bytes, prefix: str) -> None:
    """Write ``prefix.model`` and SentencePiece's ``prefix.vocab`` (``piece<TAB>score`` per line, ``%g`` scores)."""
    with open(prefix + ".model", "wb") as f:
        f.write(proto)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


def _sentencepiece_message(error: RuntimeError) -> str:
    """SentencePiece's error without its C++ location: ``INTERNAL: file.cc(12) [check] text`` -> text or check."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = re.match(r"^(?:[A-Z_]+: )?\S+\(\d+\) \[(.*?)\] ?(.*)$", first)
    if not match:
        return first
    check, text = match.groups()
    return text.strip() or f"check failed: {check}"


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    """``first`` followed by ``rest`` (the corpus after the emptiness check consumed its first sentence)."""
    yield first
    yield from rest


def _decode(raw: bytes) -> str:
    """A text line as str; invalid UTF-8 is an ``InvalidLine``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidLine(f"invalid UTF-8 ({error.reason} at byte {error.start})") from None


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2, one line ``bam-train-tokenizer: error: ...``: bad input)."""
    args = build_parser().parse_args(argv)

    def body() -> None:
        try:
            model = train(args)
        except DataError:  # MissingFileError is an OSError too
            raise
        except OSError as error:  # reading an input
            raise DataError(f"{error.filename or ' '.join(args.input)}: {error.strerror or error}") from None
        print(f"wrote {model} and {args.output_prefix}.vocab")

    return run_tool("bam-train-tokenizer", body)
