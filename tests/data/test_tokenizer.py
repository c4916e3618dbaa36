"""SentencePieceTokenizer, Megatron's vocab padding, and bam-train-tokenizer (tools/train_tokenizer.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from bam_megatron.data.errors import DataError
from bam_megatron.data.tokenizer import SPECIAL_IDS, load_tokenizer
from bam_megatron.data.train_tokenizer import main as train_main
from bam_megatron.errors import ConfigError
from bam_megatron.model.architecture import padded_vocab_size
from tests.support import paths
from tests.support.corpus_text import TRICKY_TEXTS, VOCAB_SIZE, write_jsonl

ROOT = paths.REPO


def test_special_ids_are_the_documented_ones(text_corpus):
    tok = load_tokenizer(text_corpus.model)
    assert SPECIAL_IDS == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert (tok.pad, tok.unk, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 3, 3)
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.path == text_corpus.model


@pytest.mark.parametrize("text", TRICKY_TEXTS + ["", "plain words of the corpus", "never seen: ǅ ʬ ₿ 🦜"])
def test_round_trip_is_exact_and_never_unk(text_corpus, text):
    tok = load_tokenizer(text_corpus.model)
    ids = tok.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.unk not in ids  # byte fallback covers every character
    assert tok.detokenize(ids) == text


def test_corpus_documents_round_trip_and_compress(text_corpus):
    tok = load_tokenizer(text_corpus.model)
    for text in text_corpus.texts:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
    # Learned merges, not bytes: clearly fewer tokens than UTF-8 bytes on the text it was trained on.
    total_ids = sum(len(tok.tokenize(t)) for t in text_corpus.texts)
    assert total_ids < 0.75 * sum(len(t.encode()) for t in text_corpus.texts)


def test_fingerprint_is_sha256_of_the_model_file(text_corpus, tmp_path):
    tok = load_tokenizer(text_corpus.model)
    with open(text_corpus.model, "rb") as f:
        assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
    other = tmp_path / "other"
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in text_corpus.texts[:30]])
    assert train_main(["--input", str(tmp_path / "c.jsonl"), "--vocab-size", "350", "--output-prefix", str(other)]) == 0
    assert load_tokenizer(f"{other}.model").fingerprint != tok.fingerprint


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [
        (50257, 128, 1, 50304),  # GPT-2's vocabulary, as Megatron pads it
        (50257, 128, 2, 50432),  # multiple of 256
        (50257, 128, 8, 51200),  # multiple of 1024
        (32000, 128, 1, 32000),  # already a multiple
        (32000, 128, 3, 32256),  # multiple of 384
        (256000, 64, 4, 256000),
        (400, 128, 1, 512),
        (1, 1, 1, 1),
    ],
)
def test_padded_vocab_size_matches_megatron(vocab, divisible_by, tp, expected):
    assert padded_vocab_size(vocab, divisible_by, tp) == expected


@pytest.mark.parametrize("bad", [(0, 128, 1), (50257, 0, 1), (50257, 128, 0), (1.5, 128, 1)])
def test_padded_vocab_size_rejects_non_positive(bad):
    with pytest.raises(ConfigError):
        padded_vocab_size(*bad)


def test_missing_tokenizer_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "spm.model"
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(path)
    assert isinstance(info.value, DataError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_non_sentencepiece_file_names_the_path(tmp_path):
    path = tmp_path / "fake.model"
    path.write_bytes(b"this is not a protobuf \x00\xff")
    with pytest.raises(DataError, match="not a SentencePiece model") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_training_is_deterministic_and_reads_txt_and_jsonl(tmp_path, text_corpus):
    txt = tmp_path / "extra.txt"
    txt.write_text("\n".join(text_corpus.texts[:20]) + "\n", encoding="utf-8")
    models = []
    for run in ("a", "b"):
        prefix = tmp_path / run / "spm"
        argv = [
            "--input",
            text_corpus.jsonl,
            str(txt),
            "--vocab-size",
            "380",
            "--output-prefix",
            str(prefix),
            "--model-type",
            "unigram",
            "--input-sentence-size",
            "150",
            "--seed",
            "3",
        ]
        assert train_main(argv) == 0
        assert sorted(os.listdir(prefix.parent)) == ["spm.model", "spm.vocab"]  # no temp dir left
        models.append((prefix.parent / "spm.model").read_bytes())
    assert models[0] == models[1]
    assert load_tokenizer(tmp_path / "a" / "spm.model").vocab_size == 380


def test_empty_corpus_fails_without_output(tmp_path):
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, [{"text": ""}, {"text": "   "}])
    prefix = tmp_path / "out" / "spm"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "train_tokenizer.py"),
            "--input",
            str(empty),
            "--vocab-size",
            "300",
            "--output-prefix",
            str(prefix),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bam-train-tokenizer: error: empty corpus") and str(empty) in last
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_failed_training_leaves_previous_model_untouched(tmp_path, text_corpus, capsys):
    prefix = tmp_path / "spm"
    (tmp_path / "spm.model").write_bytes(b"previous model")
    # The text_corpus cannot support 100000 pieces: SentencePiece fails after the temporary dir was made.
    code = train_main(["--input", text_corpus.jsonl, "--vocab-size", "100000", "--output-prefix", str(prefix)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bam-train-tokenizer: error: --vocab-size 100000") and "Please set it to a value <=" in err
    assert sorted(os.listdir(tmp_path)) == ["spm.model"]
    assert (tmp_path / "spm.model").read_bytes() == b"previous model"


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": broken}', "invalid JSON"),
        ('{"title": "no text key"}', "missing key 'text'"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_invalid_jsonl_line_names_file_and_line(tmp_path, capsys, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine line"}\n\n' + line + "\n", encoding="utf-8")
    assert train_main(["--input", str(path), "--vocab-size", "300", "--output-prefix", str(tmp_path / "spm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bam-train-tokenizer: error: {path}:3: {reason}")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_missing_input_names_it(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert train_main(["--input", str(missing), "--vocab-size", "300", "--output-prefix", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == f"bam-train-tokenizer: error: input file not found: {missing}"
