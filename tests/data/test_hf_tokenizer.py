"""HuggingFaceTokenizer (``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``): loading,
ids, fingerprint, auto-detection and errors; bam-preprocess-data and pretrain_bam.py with it.

Nothing is downloaded: the tokenizer is a tiny byte-level BPE trained here with the ``tokenizers``
library and saved as transformers saves any tokenizer (``save_pretrained``), with ``<s>``, ``</s>``
and ``<pad>`` special tokens and a Llama-style post-processor that would add ``<s> ... </s>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

import bam_megatron  # noqa: F401  (before megatron's users: silences its import warnings)
from bam_megatron.checkpoint import store
from bam_megatron.data.errors import DataError
from bam_megatron.data.preprocess import main as preprocess_main
from bam_megatron.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer
from bam_megatron.testing.launch import launch
from tests.support import paths
from tests.support.corpus_text import TRICKY_TEXTS, write_jsonl
from tests.support.hf_models import HF_TOKENIZER_TEXTS as TEXTS
from tests.support.hf_models import build_hf_tokenizer

ROOT = paths.REPO
SCRIPT = os.path.join(ROOT, "pretrain_bam.py")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, str]:
    """{'tok': the tokenizer directory, 'other': one with another vocabulary, 'jsonl': TEXTS}."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "tok": build_hf_tokenizer(root / "tok"),
        "other": build_hf_tokenizer(root / "other", vocab_size=320),
        "jsonl": write_jsonl(root / "corpus.jsonl", [{"text": text} for text in TEXTS]),
        "root": os.fspath(root),
    }


def preprocess(hf, prefix, *extra: str) -> int:
    argv = ["--input", hf["jsonl"], "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf["tok"]]
    return preprocess_main([*argv, "--output-prefix", os.fspath(prefix), "--workers", "2", *extra])


def read_documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(os.fspath(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def one_line_naming(error: BaseException, path) -> str:
    message = str(error)
    assert os.fspath(path) in message and "\n" not in message, message
    return message


def test_ids_round_trip_and_equal_autotokenizer_without_special_tokens(hf):
    tok = load_tokenizer(hf["tok"], "HuggingFaceTokenizer")
    reference = AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True)
    for text in [*TEXTS[:20], *TRICKY_TEXTS, "", "never seen: ǅ ʬ ₿ 🦜"]:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # The tokenizer itself would add <s> ... </s>; tokenize leaves that to --append-eod.
    assert reference.encode("the")[0] == 0 and reference.encode("the")[-1] == 1
    assert tok.tokenize("the") == reference.encode("the")[1:-1]


def test_special_ids_and_vocab_size(hf, tmp_path):
    tok = load_tokenizer(hf["tok"])
    reference = AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True)
    assert isinstance(tok, HuggingFaceTokenizer) and tok.tokenizer_type == "HuggingFaceTokenizer"
    assert (tok.bos, tok.eos, tok.eod, tok.pad, tok.unk) == (0, 1, 1, 2, -1)
    assert tok.vocab_size == len(reference) == 300
    # Added tokens count: they are ids the model must embed.
    reference.add_tokens(["<extra_0>", "<extra_1>"])
    reference.save_pretrained(os.fspath(tmp_path / "added"))
    assert load_tokenizer(tmp_path / "added").vocab_size == 302
    # Without a pad token, pad is eod.
    no_pad = load_tokenizer(build_hf_tokenizer(tmp_path / "no_pad", pad=False))
    assert no_pad.pad == no_pad.eod == 1
    assert tok.unique_identifiers == {"class": "HuggingFaceTokenizer", "sha256": tok.fingerprint}


def test_fingerprint_is_the_files_content(hf, tmp_path):
    tok = load_tokenizer(hf["tok"])
    copy = shutil.copytree(hf["tok"], tmp_path / "elsewhere" / "copy")
    assert load_tokenizer(copy).fingerprint == tok.fingerprint  # the same files anywhere
    assert load_tokenizer(hf["other"]).fingerprint != tok.fingerprint  # another vocabulary
    with open(os.path.join(copy, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    assert load_tokenizer(copy).fingerprint != tok.fingerprint  # special_tokens_map.json is hashed too
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0


def test_type_is_detected_from_the_path(hf, text_corpus):
    assert isinstance(load_tokenizer(hf["tok"]), HuggingFaceTokenizer)
    assert isinstance(load_tokenizer(text_corpus.model), SentencePieceTokenizer)
    assert load_tokenizer(text_corpus.model, "SentencePieceTokenizer").tokenizer_type == "SentencePieceTokenizer"


def _bad_tokenizer(case: str, hf, tmp_path, text_corpus):
    """(path, tokenizer_type, the path the message must name, a piece of the message)."""
    directory = tmp_path / case
    if case == "unknown-type":
        return hf["tok"], "GPT2BPETokenizer", hf["tok"], "unknown tokenizer type 'GPT2BPETokenizer'"
    if case == "missing":
        return directory, None, directory, "not found"
    if case == "missing-hf":
        return directory, "HuggingFaceTokenizer", directory, "not found"
    if case == "no-tokenizer-json":
        directory.mkdir()
        (directory / "tokenizer_config.json").write_text("{}")
        return directory, None, directory, "no tokenizer.json in"
    if case == "hf-type-on-a-file":
        return text_corpus.model, "HuggingFaceTokenizer", text_corpus.model, "is a directory holding tokenizer.json"
    if case == "sentencepiece-type-on-a-directory":
        return hf["tok"], "SentencePieceTokenizer", hf["tok"], "not a file"
    shutil.copytree(hf["tok"], directory)
    if case == "corrupt-tokenizer-json":
        (directory / "tokenizer.json").write_bytes(b"\x00\xff not json")
        return directory, None, directory / "tokenizer.json", "invalid JSON"
    if case == "corrupt-tokenizer-config":
        (directory / "tokenizer_config.json").write_text('{"eos_token": ')
        return directory, None, directory / "tokenizer_config.json", "invalid JSON"
    if case == "not-a-tokenizer":
        (directory / "tokenizer.json").write_text("{}")
        return directory, None, directory, "not a Hugging Face tokenizer"
    if case == "no-eos":
        shutil.rmtree(directory)
        return build_hf_tokenizer(directory, eos=False), None, directory, "has no eos token"
    raise AssertionError(case)


BAD_CASES = [
    "unknown-type",
    "missing",
    "missing-hf",
    "no-tokenizer-json",
    "hf-type-on-a-file",
    "sentencepiece-type-on-a-directory",
    "corrupt-tokenizer-json",
    "corrupt-tokenizer-config",
    "not-a-tokenizer",
    "no-eos",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_naming_the_path(case, hf, tmp_path, text_corpus):
    path, tokenizer_type, named, expected = _bad_tokenizer(case, hf, tmp_path, text_corpus)
    with pytest.raises(DataError) as info:
        load_tokenizer(path, tokenizer_type)
    assert expected in one_line_naming(info.value, named)
    if case.startswith("missing"):
        assert isinstance(info.value, FileNotFoundError)


def test_preprocess_reports_a_bad_tokenizer_directory(hf, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--input", hf["jsonl"], "--tokenizer-model", os.fspath(empty), "--output-prefix", str(tmp_path / "o")]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bam-preprocess-data: error: no tokenizer.json in {empty}: not a Hugging Face tokenizer directory"
    assert sorted(os.listdir(tmp_path)) == ["empty"]


@pytest.mark.parametrize("append_eod", [False, True])
def test_preprocess_with_workers_writes_autotokenizer_ids(hf, tmp_path, monkeypatch, append_eod):
    # The tokenizer was trained in this process (with threads): the forked workers would warn.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert preprocess(hf, tmp_path / "c", *(["--append-eod"] if append_eod else [])) == 0
    reference = AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True)
    eod = [reference.eos_token_id] if append_eod else []
    expected = [reference.encode(text, add_special_tokens=False) + eod for text in TEXTS]
    dataset = IndexedDataset(os.fspath(tmp_path / "c_text_document"))
    assert dataset.index.dtype == numpy.uint16
    assert read_documents(tmp_path / "c_text_document") == expected


def test_pretrain_records_the_hf_tokenizer_and_refuses_another(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert preprocess(hf, tmp_path / "data" / "web", "--append-eod") == 0
    data, ckpt = os.fspath(tmp_path / "data" / "web_text_document"), tmp_path / "ckpt"
    model = ["--variant", "dense", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64"]
    model += ["--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "3e-3"]
    model += ["--eval-iters", "1", "--eval-interval", "1000", "--log-interval", "1", "--data-path", data]
    hf_tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf["tok"]]
    ranks = launch(SCRIPT, [*model, *hf_tokenizer, "--train-iters", "2", "--save", str(ckpt)], 1, str(tmp_path / "a"))
    assert ranks.wait(240) == [0], ranks.output(0)
    meta = store.read_meta(store.resolve_checkpoint(os.fspath(ckpt)))
    assert meta.iteration == 2
    assert meta.tokenizer_type == "HuggingFaceTokenizer"
    assert meta.tokenizer_fingerprint == load_tokenizer(hf["tok"]).fingerprint
    assert meta.tokenizer_model == os.path.abspath(hf["tok"])
    assert meta.architecture.padded_vocab_size == 384  # 300 padded to a multiple of 128

    # bam-eval takes the type (and the directory) the checkpoint recorded.
    from bam_megatron.evaluation.cli import build_parser, prepare

    plan = prepare(build_parser().parse_args(["--model", f"m={ckpt}", "--data-path", data]))
    assert (plan.tokens.eod, plan.tokens.pad, plan.tokens.vocab_size) == (1, 2, 300)

    # Resuming with another tokenizer (type detected from the directory) is refused.
    other = ["--tokenizer-model", hf["other"], "--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt)]
    ranks = launch(SCRIPT, [*model, *other], 1, str(tmp_path / "b"))
    assert ranks.wait(240) == [2], ranks.output(0)
    errors = [line for line in ranks.output(0).splitlines() if "error:" in line]
    assert len(errors) == 1 and "another tokenizer" in errors[0], ranks.output(0)
    assert store.latest_iteration(os.fspath(ckpt)) == 2


def test_sentencepiece_users_do_not_import_transformers(text_corpus):
    code = (
        "import sys\n"
        "import bam_megatron.data.preprocess, bam_megatron.training.arguments\n"
        "from bam_megatron.data.tokenizer import load_tokenizer\n"
        f"load_tokenizer({text_corpus.model!r}).tokenize('some text')\n"
        "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
