"""bam-preprocess-data (tools/preprocess_data.py): JSONL -> megatron-core indexed datasets."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

import bam_megatron  # noqa: F401  (before megatron: silences its import warnings)
from bam_megatron.data import preprocess as preprocess_module
from bam_megatron.data.preprocess import main
from bam_megatron.data.tokenizer import load_tokenizer
from tests.support import paths
from tests.support.corpus_text import write_jsonl

ROOT = paths.REPO


def run(text_corpus, input_path, prefix, *extra: str) -> int:
    """``main`` on ``input_path`` with the corpus tokenizer."""
    return main(
        [
            "--input",
            str(input_path),
            "--tokenizer-model",
            text_corpus.model,
            "--output-prefix",
            str(prefix),
            "--log-interval",
            "10",
            *extra,
        ]
    )


def read_documents(prefix) -> list[list[int]]:
    """The documents of a written dataset, via megatron-core's reader."""
    dataset = IndexedDataset(str(prefix))
    numpy.testing.assert_array_equal(dataset.document_indices, numpy.arange(len(dataset) + 1))  # one sequence/doc
    return [dataset[i].tolist() for i in range(len(dataset))]


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.mark.parametrize("append_eod", [False, True])
def test_dataset_equals_tokenizer_encoding(text_corpus, tmp_path, append_eod):
    tok = load_tokenizer(text_corpus.model)
    assert run(text_corpus, text_corpus.jsonl, tmp_path / "out" / "c", *(["--append-eod"] if append_eod else [])) == 0
    prefix = tmp_path / "out" / "c_text_document"
    assert files_in(tmp_path / "out") == ["c_text_document.bin", "c_text_document.idx"]
    assert IndexedDataset(str(prefix)).index.dtype == numpy.uint16  # vocab 400 fits
    expected = [tok.tokenize(text) + ([tok.eod] if append_eod else []) for text in text_corpus.texts]
    assert read_documents(prefix) == expected


def test_workers_do_not_change_a_byte(text_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_module, "CHUNK_BYTES", 1024)  # many chunks, so two workers interleave
    outputs = {}
    for workers in ("1", "2"):
        assert run(text_corpus, text_corpus.jsonl, tmp_path / workers / "c", "--workers", workers, "--append-eod") == 0
        outputs[workers] = [(tmp_path / workers / f"c_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]
    assert outputs["1"] == outputs["2"]
    assert len(read_documents(tmp_path / "2" / "c_text_document")) == len(text_corpus.texts)


def test_several_json_keys_make_several_datasets(text_corpus, tmp_path, capsys):
    tok = load_tokenizer(text_corpus.model)
    records = [{"title": f"Title {i}", "text": text, "other": i} for i, text in enumerate(text_corpus.texts[:12])]
    path = write_jsonl(tmp_path / "multi.jsonl", records)
    assert run(text_corpus, path, tmp_path / "out" / "m", "--json-keys", "text", "title") == 0
    assert files_in(tmp_path / "out") == [
        "m_text_document.bin",
        "m_text_document.idx",
        "m_title_document.bin",
        "m_title_document.idx",
    ]
    assert read_documents(tmp_path / "out" / "m_text_document") == [tok.tokenize(r["text"]) for r in records]
    assert read_documents(tmp_path / "out" / "m_title_document") == [tok.tokenize(r["title"]) for r in records]
    assert "12 documents" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('{"body": "no text key"}', "missing key 'text'"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"text": 42}', "key 'text' holds int, expected a string"),
    ],
)
def test_invalid_line_stops_with_file_and_line(text_corpus, tmp_path, capsys, bad_line, reason):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": t} for t in text_corpus.texts[:5]])
    with open(path, "a", encoding="utf-8") as f:
        f.write(bad_line + "\n" + '{"text": "after the bad line"}\n')
    assert run(text_corpus, path, tmp_path / "out" / "c", "--workers", "2") != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bam-preprocess-data: error: {path}:6: {reason}")
    assert files_in(tmp_path / "out") == []


def test_invalid_utf8_is_an_invalid_line(text_corpus, tmp_path, capsys):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert run(text_corpus, path, tmp_path / "c") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"bam-preprocess-data: error: {path}:2: invalid UTF-8")
    assert files_in(tmp_path) == ["bytes.jsonl"]


def test_skip_invalid_lines_counts_and_writes_the_rest(text_corpus, tmp_path, capsys):
    tok = load_tokenizer(text_corpus.model)
    path = tmp_path / "mixed.jsonl"
    lines = ['{"text": "first good document."}', "{oops", '{"title": "x"}', "", '{"text": "second good one."}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run(text_corpus, path, tmp_path / "out" / "c", "--skip-invalid-lines") == 0
    captured = capsys.readouterr()
    assert f"skipping {path}:2: invalid JSON" in captured.err and f"skipping {path}:3: missing key" in captured.err
    summary = captured.out.strip().splitlines()[-1]
    assert "2 documents" in summary and "2 invalid lines" in summary and "1 blank lines" in summary
    expected = [tok.tokenize("first good document."), tok.tokenize("second good one.")]
    assert read_documents(tmp_path / "out" / "c_text_document") == expected


def test_empty_documents_are_skipped_and_counted(text_corpus, tmp_path, capsys):
    tok = load_tokenizer(text_corpus.model)
    texts = ["one.", "", "  \n\t ", "two.", " "]
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in texts])
    assert run(text_corpus, path, tmp_path / "out" / "c", "--append-eod") == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "5 documents" in summary and "skipped 3 empty documents" in summary
    expected = [tok.tokenize("one.") + [tok.eod], tok.tokenize("two.") + [tok.eod]]
    assert read_documents(tmp_path / "out" / "c_text_document") == expected


def test_all_empty_corpus_is_refused(text_corpus, tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}, {"text": "\n"}])
    assert run(text_corpus, path, tmp_path / "out" / "c", "--append-eod") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bam-preprocess-data: error: no tokens for key 'text'") and "3 empty" in err
    assert files_in(tmp_path / "out") == []


def test_failed_run_keeps_the_previous_dataset(text_corpus, tmp_path):
    prefix = tmp_path / "c"
    assert run(text_corpus, text_corpus.jsonl, prefix) == 0
    before = [(tmp_path / f"c_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    assert run(text_corpus, bad, prefix) == 2
    assert files_in(tmp_path) == ["bad.jsonl", "c_text_document.bin", "c_text_document.idx"]
    assert [(tmp_path / f"c_text_document.{ext}").read_bytes() for ext in ("bin", "idx")] == before


@pytest.mark.parametrize("missing", ["input", "tokenizer"])
def test_missing_file_is_named(text_corpus, tmp_path, capsys, missing):
    absent = str(tmp_path / f"absent-{missing}")
    argv = [
        "--input",
        absent if missing == "input" else text_corpus.jsonl,
        "--tokenizer-model",
        absent if missing == "tokenizer" else text_corpus.model,
        "--output-prefix",
        str(tmp_path / "out" / "c"),
    ]
    assert main(argv) == 2
    what = "input file" if missing == "input" else "tokenizer model"
    assert capsys.readouterr().err.strip() == f"bam-preprocess-data: error: {what} not found: {absent}"
    assert files_in(tmp_path / "out") == []


def test_stdin_input(text_corpus, tmp_path, monkeypatch, capsys):
    tok = load_tokenizer(text_corpus.model)
    data = b'{"text": "from standard input."}\n{"text": "second."}\n{broken\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert run(text_corpus, "-", tmp_path / "c", "--skip-invalid-lines") == 0
    assert "skipping <stdin>:3: invalid JSON" in capsys.readouterr().err
    expected = [tok.tokenize("from standard input."), tok.tokenize("second.")]
    assert read_documents(tmp_path / "c_text_document") == expected


def test_gpt_dataset_reads_the_output(text_corpus, tmp_path):
    """megatron-core's GPTDataset samples our dataset with our tokenizer (eod masked out of the loss)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    tok = load_tokenizer(text_corpus.model)
    assert run(text_corpus, text_corpus.jsonl, tmp_path / "c", "--append-eod") == 0
    dataset = IndexedDataset(str(tmp_path / "c_text_document"))
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        blend=None,
        blend_per_split=None,
        split="1,0,0",
        path_to_cache=None,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
        mmap_bin_files=True,
    )
    gpt = GPTDataset(dataset, str(tmp_path / "c_text_document"), numpy.arange(len(dataset)), 20, Split.train, config)
    seen_eod = False
    for i in range(20):
        sample = gpt[i]
        tokens, labels, loss_mask = sample["tokens"], sample["labels"], sample["loss_mask"]
        assert tokens.shape == (64,) and int(tokens.max()) < tok.vocab_size
        assert tokens[1:].tolist() == labels[:-1].tolist()
        eod = tokens == tok.eod
        seen_eod |= bool(eod.any())
        assert (loss_mask[eod] == 0).all()
    assert seen_eod


def test_cli_subprocess_with_two_workers(text_corpus, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "preprocess_data.py"),
            "--input",
            text_corpus.jsonl,
            "--tokenizer-model",
            text_corpus.model,
            "--output-prefix",
            str(tmp_path / "c"),
            "--append-eod",
            "--workers",
            "2",
            "--log-interval",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "processed" in result.stderr and "docs/s" in result.stderr and "MB/s" in result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"done: {len(text_corpus.texts)} documents")
    assert len(read_documents(tmp_path / "c_text_document")) == len(text_corpus.texts)


def test_help_lists_the_groups_and_megatron_flags():
    help_text = preprocess_module.build_parser().format_help()
    for heading in ("input:", "tokenizer:", "output:", "runtime:"):
        assert heading in help_text
    for flag in (
        "--input",
        "--json-keys",
        "--tokenizer-model",
        "--append-eod",
        "--output-prefix",
        "--workers",
        "--log-interval",
        "--skip-invalid-lines",
    ):
        assert flag in help_text
