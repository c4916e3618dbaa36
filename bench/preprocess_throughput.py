"""Preprocessing throughput vs the limit: raw SentencePiece encoding of the same texts.

Ours: ``bam_megatron.data.preprocess`` end to end (read JSONL, parse, tokenize in W worker processes,
write the megatron-core indexed dataset, publish). Raw: the same documents, already parsed, encoded
by the same SentencePiece model in W processes (a ``multiprocessing.Pool``, same chunking; in-process
for W=1, as ours), counting tokens and writing nothing. Both runs include starting their pool and are
interleaved; ratio = ours / raw tokens/s (goal >= 0.8).

    python bench/preprocess_throughput.py [--size-mb 10 --workers 2 --vocab-size 4000 --rounds 3]
    python bench/preprocess_throughput.py --input corpus.jsonl --tokenizer-model tok.model
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece  # noqa: E402

import bam_megatron  # noqa: E402,F401
from bam_megatron.data import (
    preprocess,  # noqa: E402
    train_tokenizer,  # noqa: E402
)
from bam_megatron.data.synthetic import write_synthetic_jsonl  # noqa: E402
from bench.common import interleaved_medians, report  # noqa: E402

_RAW_SP: sentencepiece.SentencePieceProcessor | None = None


def _raw_init(model_path: str) -> None:
    global _RAW_SP
    _RAW_SP = sentencepiece.SentencePieceProcessor(model_file=model_path)


def _raw_encode(texts: list[str]) -> int:
    """Encode a chunk of texts with the worker's processor; only the token count comes back."""
    return sum(len(_RAW_SP.encode(text)) for text in texts)


def _text_chunks(texts: list[str], chunk_bytes: int) -> list[list[str]]:
    """The texts grouped as ``preprocess`` groups lines: about ``chunk_bytes`` of UTF-8 per chunk."""
    chunks, chunk, size = [], [], 0
    for text in texts:
        chunk.append(text)
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            chunks.append(chunk)
            chunk, size = [], 0
    return chunks + ([chunk] if chunk else [])


def raw_encode(model_path: str, chunks: list[list[str]], workers: int) -> int:
    """Tokens in ``chunks``, encoded by ``workers`` processes (in this process for one)."""
    if workers == 1:
        _raw_init(model_path)
        return sum(map(_raw_encode, chunks))
    with multiprocessing.Pool(workers, initializer=_raw_init, initargs=(model_path,)) as pool:
        return sum(pool.imap(_raw_encode, chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="JSONL corpus (default: generate --size-mb of synthetic text)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer-model", help="SentencePiece model (default: train one on the corpus)")
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bam-bench-preprocess-")
    try:
        corpus = args.input
        if corpus is None:
            corpus = os.path.join(work, "corpus.jsonl")
            write_synthetic_jsonl(corpus, int(args.size_mb * 1e6), seed=0, key=args.json_key)
        model = args.tokenizer_model
        if model is None:
            start = time.perf_counter()
            argv = [
                "--input",
                corpus,
                "--json-keys",
                args.json_key,
                "--vocab-size",
                str(args.vocab_size),
                "--output-prefix",
                os.path.join(work, "spm"),
                "--input-sentence-size",
                "200000",
                "--workers",
                str(args.workers),
            ]
            assert train_tokenizer.main(argv) == 0
            train_s = time.perf_counter() - start
            model = os.path.join(work, "spm.model")
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)[args.json_key] for line in f if line.strip()]
        chunks = _text_chunks(texts, preprocess.CHUNK_BYTES)
        corpus_mb = os.path.getsize(corpus) / 1e6

        pp_args = preprocess.build_parser().parse_args(
            [
                "--input",
                corpus,
                "--json-keys",
                args.json_key,
                "--tokenizer-model",
                model,
                "--output-prefix",
                os.path.join(work, "out", "bench"),
                "--workers",
                str(args.workers),
                "--log-interval",
                str(10**9),
            ]
        )
        counts = {}

        def ours() -> None:
            with open(os.devnull, "w") as quiet:
                counts["ours"] = preprocess.preprocess(pp_args, log=quiet).total_tokens

        def raw() -> None:
            counts["raw"] = raw_encode(model, chunks, args.workers)

        ours_s, raw_s = interleaved_medians(ours, raw, args.rounds, warmup=1)
        assert counts["ours"] == counts["raw"], counts  # same documents, same model: same tokens
        tokens = counts["ours"]
        ratio = raw_s / ours_s
        report(
            {
                "bench": "preprocess_throughput",
                "config": vars(args),
                "device": "cpu",
                "cpu_count": os.cpu_count(),
                "corpus_mb": round(corpus_mb, 2),
                "documents": len(texts),
                "tokens": tokens,
                "tokenizer_train_s": round(train_s, 2) if args.tokenizer_model is None else None,
                "ours_s": round(ours_s, 3),
                "raw_s": round(raw_s, 3),
                "ours_tokens_per_s": round(tokens / ours_s),
                "raw_tokens_per_s": round(tokens / raw_s),
                "ours_mb_per_s": round(corpus_mb / ours_s, 2),
                "ratio_ours_over_raw": round(ratio, 3),
            },
            f"preprocess_throughput: ours {tokens / ours_s:,.0f} tokens/s vs raw SentencePiece "
            f"{tokens / raw_s:,.0f} tokens/s ({args.workers} workers, {corpus_mb:.1f} MB, {tokens:,} tokens): "
            f"ratio {ratio:.2f} (goal >= 0.8)",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
