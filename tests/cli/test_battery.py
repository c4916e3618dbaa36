"""The battery: bad input and faults against every tool, each answered by one line naming the culprit,
a non-zero exit code and no partial output (docs/failures.md).

Every case is a row of `CASES`: the tool, its flags, what to break first, the exit code, the words
the one ``error:`` line must hold and the outputs that must not exist afterwards. The in-process
cases run one after another in one fresh process (`run_distributed`, a world of one), each through
its tool's ``main(argv)`` with stderr captured and ``SystemExit`` caught, which is what the console
script does; each row is then its own test. Cases where the process boundary matters (the sbatch
scripts, a full disk under pretrain_bam.py) run as subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from bam_megatron.testing.distributed import run_distributed
from tests.support import paths, services
from tests.support.tools import PROG, TINY, TOOLS, dense_train_flags, error_lines, run_main

ROOT = paths.REPO


# ---- what a case breaks before it runs: (world, case directory) -> extra placeholders --------------
def _nothing(w: dict, d: str) -> dict:
    return {}


def _copy_seed(w: dict, d: str) -> str:
    shutil.copytree(w["seed"], os.path.join(d, "seed"))
    return os.path.join(d, "seed", "iter_0000001")


def _file_of(iteration: str, name: str) -> str:
    if name == "shard":
        return os.path.join(iteration, sorted(n for n in os.listdir(iteration) if n.endswith(".distcp"))[0])
    return os.path.join(iteration, name)


def truncated(name: str, unrecorded: bool = False) -> Callable[[dict, str], dict]:
    """A copy of the seed whose file ``name`` ('shard', 'common.pt', '.metadata') lost its second half;
    ``unrecorded``: its integrity record removed too (a checkpoint of an older version)."""

    def damage(w: dict, d: str) -> dict:
        iteration = _copy_seed(w, d)
        path = _file_of(iteration, name)
        os.truncate(path, os.path.getsize(path) // 2)
        if unrecorded:
            os.remove(os.path.join(iteration, "integrity.json"))
        return {"bad": path, "ckpt": os.path.join(d, "seed")}

    return damage


def flipped(name: str) -> Callable[[dict, str], dict]:
    """A copy of the seed with one byte of file ``name`` inverted (sizes unchanged)."""

    def damage(w: dict, d: str) -> dict:
        path = _file_of(_copy_seed(w, d), name)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
        return {"bad": path, "ckpt": os.path.join(d, "seed")}

    return damage


def removed(name: str) -> Callable[[dict, str], dict]:
    def damage(w: dict, d: str) -> dict:
        path = _file_of(_copy_seed(w, d), name)
        os.remove(path)
        return {"bad": path, "ckpt": os.path.join(d, "seed")}

    return damage


def _copy_data(w: dict, d: str) -> str:
    prefix = os.path.join(d, "code_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(w["code"] + ext, prefix + ext)
    return prefix


def index_damage(kind: str) -> Callable[[dict, str], dict]:
    """A copy of the code dataset whose index is broken in the middle (``kind``) or whose .bin is cut."""

    def damage(w: dict, d: str) -> dict:
        prefix = _copy_data(w, d)
        idx = prefix + ".idx"
        data = bytearray(open(idx, "rb").read())
        sequences = struct.unpack("<Q", data[18:26])[0]
        lengths, pointers = 34, 34 + 4 * sequences
        middle = sequences // 2
        if kind == "pointer":  # one pointer in the middle moved: the last entry still fits the .bin
            struct.pack_into("<q", data, pointers + 8 * middle, 12345678)
        elif kind == "length":
            struct.pack_into("<i", data, lengths + 4 * middle, -5)
        elif kind == "header":
            data[0:4] = b"JUNK"
        elif kind == "documents":  # document boundaries out of order
            docs = pointers + 8 * sequences
            struct.pack_into("<q", data, docs + 8, sequences + 7)
        elif kind == "idx-cut":
            data = data[: len(data) - 16]
        open(idx, "wb").write(bytes(data))
        if kind == "bin-cut":
            os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") // 2)
        elif kind == "bin-removed":
            os.remove(prefix + ".bin")
        return {"data": prefix}

    return damage


def other_vocabulary(w: dict, d: str) -> dict:
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(d, "big_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for start in range(0, 4000, 40):
        builder.add_document(numpy.arange(start, start + 40), [40])
    builder.finalize(prefix + ".idx")
    return {"data": prefix}


def megatron_lm_on_token_ids(w: dict, d: str) -> dict:
    """A Megatron-LM checkpoint trained on pre-tokenized data (NullTokenizer), 320 padded vocabulary rows."""
    from tests.support.megatron_lm import megatron_lm_args, save_as_megatron_lm

    save = os.path.join(d, "megatron-lm")
    args = megatron_lm_args(tokenizer_type="NullTokenizer", tokenizer_model=None, vocab_size=319, padded_vocab_size=320)
    return {"mlm": save_as_megatron_lm(save, args, 3)}


def a_file(w: dict, d: str) -> dict:
    path = os.path.join(d, "a_file")
    open(path, "w").write("not a directory\n")
    return {"file": path}


def jsonl(lines: list[str]) -> Callable[[dict, str], dict]:
    def write(w: dict, d: str) -> dict:
        path = os.path.join(d, "input.jsonl")
        open(path, "w").write("".join(line + "\n" for line in lines))
        return {"jsonl": path}

    return write


def existing_output(w: dict, d: str) -> dict:
    os.makedirs(os.path.join(d, "out"))
    open(os.path.join(d, "out", "keep"), "w").write("earlier work\n")
    return {}


@dataclass(frozen=True)
class Case:
    """One kind of bad input or fault: run ``tool`` with ``argv`` after ``prepare``; expect ``code``,
    one error line holding ``expect``, and none of ``absent``. Placeholders: {tok} {other_tok} {code} {law} {seed}
    {jsonl} {out} {d} and what ``prepare`` returns."""

    id: str
    tool: str
    argv: tuple[str, ...]
    expect: str
    prepare: Callable[[dict, str], dict] = _nothing
    code: int = 2
    absent: tuple[str, ...] = ("{out}",)
    kept: tuple[str, ...] = field(default=())  # paths that must still exist (earlier work)


OK_JSONL = ['{"text": "a first document"}', '{"text": "a second document"}']
MOE = ("--variant", "bam", "--preset", "tiny", "--mock-data", "--vocab-size", "100", *TINY)

CASES = [
    # pretrain_bam.py: flags out of range, each named
    Case("train-iters-0", "pretrain_bam.py", (*MOE, "--train-iters", "0"), "--train-iters must be >= 1, got 0"),
    Case(
        "train-iters-negative", "pretrain_bam.py", (*MOE, "--train-iters", "-3"), "--train-iters must be >= 1, got -3"
    ),
    Case("train-samples-0", "pretrain_bam.py", (*MOE, "--train-samples", "0"), "--train-samples must be >= 1"),
    Case(
        "num-experts-0",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--num-experts", "0"),
        "--num-experts must be >= 1",
    ),
    Case(
        "topk-above-experts",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--num-experts", "2", "--moe-router-topk", "3"),
        "--moe-router-topk must be in [1, --num-experts 2], got 3",
    ),
    Case(
        "router-bias-dense",
        "pretrain_bam.py",
        ("--variant", "dense", *MOE[2:], "--train-iters", "1", "--router-bias"),
        "--router-bias: a dense model has no router",
    ),
    Case("lr-negative", "pretrain_bam.py", (*MOE, "--train-iters", "1", "--lr", "-1"), "--lr must be >= 0"),
    Case(
        "dropout-above-1",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--hidden-dropout", "1.5"),
        "--hidden-dropout must be in [0, 1)",
    ),
    Case(
        "global-batch-0",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--global-batch-size", "0"),
        "--global-batch-size must be >= 1",
    ),
    Case(
        "save-interval-0",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--save", "{out}", "--save-interval", "0"),
        "--save-interval must be >= 1",
    ),
    Case(
        "save-names-a-file",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--save", "{file}"),
        "--save {file} is a file",
        a_file,
        kept=("{file}",),
    ),
    Case(
        "tp-0",
        "pretrain_bam.py",
        (*MOE, "--train-iters", "1", "--tensor-model-parallel-size", "0"),
        "--tensor-model-parallel-size must be >= 1",
    ),
    # pretrain_bam.py: bad data, named before the first step
    Case(
        "data-missing",
        "pretrain_bam.py",
        ("@train", "{d}/nope_text_document", "--train-iters", "1", "--save", "{out}"),
        "dataset file not found: {d}/nope_text_document",
    ),
    Case(
        "index-pointer-in-the-middle",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "{data}.idx is inconsistent: sequence",
        index_damage("pointer"),
    ),
    Case(
        "index-negative-length",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "has a negative length",
        index_damage("length"),
    ),
    Case(
        "index-bad-header",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "{data}.idx is not a megatron-core index",
        index_damage("header"),
    ),
    Case(
        "index-document-boundaries",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "document boundaries",
        index_damage("documents"),
    ),
    Case(
        "index-truncated",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "{data}.idx is truncated",
        index_damage("idx-cut"),
    ),
    Case(
        "bin-truncated",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "{data}.bin is truncated",
        index_damage("bin-cut"),
    ),
    Case(
        "bin-missing",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "dataset file not found: {data}.bin",
        index_damage("bin-removed"),
    ),
    Case(
        "no-train-iters-nor-samples",
        "pretrain_bam.py",
        MOE,
        "give exactly one of --train-iters and --train-samples",
    ),
    Case(
        "tp-does-not-divide-world",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "1", "--save", "{out}", "--tensor-model-parallel-size", "2"),
        "world size 1 is not divisible by --tensor-model-parallel-size (2)",
    ),
    # pretrain_bam.py: resuming with what contradicts the checkpoint
    Case(
        "resume-with-another-hidden-size",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "2", "--load", "{seed}", "--hidden-size", "128"),
        "--hidden-size gives hidden_size=128, but checkpoint {seed}/iter_0000001 was saved with hidden_size=64",
        absent=(),
    ),
    Case(
        "resume-with-another-tokenizer",
        "pretrain_bam.py",
        (
            "--variant",
            "dense",
            "--preset",
            "tiny",
            *TINY,
            "--tokenizer-model",
            "{other_tok}",
            "--data-path",
            "{code}",
            "--train-iters",
            "2",
            "--load",
            "{seed}",
        ),
        "another tokenizer",
        absent=(),
    ),
    Case(
        "data-of-another-vocabulary",
        "pretrain_bam.py",
        ("@train", "{data}", "--train-iters", "1", "--save", "{out}"),
        "holds token id 3999",
        other_vocabulary,
    ),
    Case(
        "tokenizer-missing",
        "pretrain_bam.py",
        (
            "--variant",
            "dense",
            "--preset",
            "tiny",
            *TINY,
            "--tokenizer-model",
            "{d}/nope.model",
            "--data-path",
            "{code}",
            "--train-iters",
            "1",
            "--save",
            "{out}",
        ),
        "{d}/nope.model",
    ),
    # pretrain_bam.py: damaged checkpoints to resume or start from
    Case(
        "resume-truncated-shard",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "2", "--load", "{ckpt}", "--save", "{out}"),
        "{bad} is damaged",
        truncated("shard"),
    ),
    Case(
        "start-from-corrupted-common",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "2", "--pretrained-checkpoint", "{ckpt}", "--save", "{out}"),
        "{bad} is corrupted",
        flipped("common.pt"),
    ),
    Case(
        "resume-corrupted-shard",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "2", "--load", "{ckpt}", "--save", "{out}"),
        "{bad} is corrupted",
        flipped("shard"),
    ),
    Case(
        "resume-missing-shard",
        "pretrain_bam.py",
        ("@train", "{code}", "--train-iters", "2", "--load", "{ckpt}", "--save", "{out}"),
        "{bad} is missing",
        removed("shard"),
    ),
    # bam-train-tokenizer
    Case(
        "tokenizer-empty-corpus",
        "bam-train-tokenizer",
        ("--input", "{jsonl}", "--vocab-size", "300", "--output-prefix", "{out}/tok"),
        "empty corpus",
        jsonl(['{"text": ""}']),
    ),
    Case(
        "tokenizer-vocab-too-large",
        "bam-train-tokenizer",
        ("--input", "{jsonl}", "--vocab-size", "100000", "--output-prefix", "{out}/tok"),
        "--vocab-size 100000 does not fit",
        jsonl(OK_JSONL),
    ),
    Case(
        "tokenizer-vocab-0",
        "bam-train-tokenizer",
        ("--input", "{jsonl}", "--vocab-size", "0", "--output-prefix", "{out}/tok"),
        "--vocab-size must be at least",
        jsonl(OK_JSONL),
    ),
    Case(
        "tokenizer-missing-input",
        "bam-train-tokenizer",
        ("--input", "{d}/none.jsonl", "--vocab-size", "300", "--output-prefix", "{out}/tok"),
        "input file not found: {d}/none.jsonl",
    ),
    Case(
        "tokenizer-invalid-line",
        "bam-train-tokenizer",
        ("--input", "{jsonl}", "--vocab-size", "300", "--output-prefix", "{out}/tok"),
        "{jsonl}:2: invalid JSON",
        jsonl(['{"text": "ok"}', "{broken"]),
    ),
    Case(
        "tokenizer-output-under-a-file",
        "bam-train-tokenizer",
        ("--input", "{jsonl}", "--vocab-size", "300", "--output-prefix", "{file}/sub/tok"),
        "{file} is a file",
        lambda w, d: {**a_file(w, d), **jsonl(OK_JSONL)(w, d)},
        kept=("{file}",),
    ),
    # bam-preprocess-data
    Case(
        "preprocess-missing-tokenizer",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{d}/no.model", "--output-prefix", "{out}/c"),
        "tokenizer model not found: {d}/no.model",
        jsonl(OK_JSONL),
    ),
    Case(
        "preprocess-invalid-line",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{tok}", "--output-prefix", "{out}/c"),
        "{jsonl}:2: invalid JSON",
        jsonl(['{"text": "ok"}', "{broken"]),
    ),
    Case(
        "preprocess-missing-key",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{tok}", "--output-prefix", "{out}/c"),
        "{jsonl}:1: missing key 'text'",
        jsonl(['{"title": "x"}']),
    ),
    Case(
        "preprocess-workers-0",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{tok}", "--output-prefix", "{out}/c", "--workers", "0"),
        "--workers must be at least 1",
        jsonl(OK_JSONL),
    ),
    Case(
        "preprocess-all-empty",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{tok}", "--output-prefix", "{out}/c"),
        "no tokens for key 'text'",
        jsonl(['{"text": ""}']),
    ),
    Case(
        "preprocess-input-is-a-directory",
        "bam-preprocess-data",
        ("--input", "{d}", "--tokenizer-model", "{tok}", "--output-prefix", "{out}/c"),
        "input file is not a file: {d}",
    ),
    Case(
        "preprocess-output-under-a-file",
        "bam-preprocess-data",
        ("--input", "{jsonl}", "--tokenizer-model", "{tok}", "--output-prefix", "{file}/c"),
        "{file} is a file",
        lambda w, d: {**a_file(w, d), **jsonl(OK_JSONL)(w, d)},
        kept=("{file}",),
    ),
    # bam-branch
    Case(
        "branch-seed-missing",
        "bam-branch",
        (
            "--seed-checkpoint",
            "{d}/none",
            "--output-dir",
            "{out}",
            "--experts",
            "code",
            "--domain-data",
            "code={code}",
            "--general-data",
            "{law}",
        ),
        "checkpoint not found: {d}/none",
    ),
    Case(
        "branch-seed-truncated",
        "bam-branch",
        (
            "--seed-checkpoint",
            "{ckpt}",
            "--output-dir",
            "{out}",
            "--experts",
            "code",
            "--domain-data",
            "code={code}",
            "--general-data",
            "{law}",
        ),
        "{bad} is damaged",
        truncated("shard"),
    ),
    Case(
        "branch-domain-data-missing",
        "bam-branch",
        (
            "--seed-checkpoint",
            "{seed}",
            "--output-dir",
            "{out}",
            "--experts",
            "code",
            "--domain-data",
            "code={d}/none",
            "--general-data",
            "{law}",
        ),
        "dataset file not found: {d}/none.idx",
    ),
    Case(
        "branch-general-fraction",
        "bam-branch",
        (
            "--seed-checkpoint",
            "{seed}",
            "--output-dir",
            "{out}",
            "--experts",
            "code",
            "--domain-data",
            "code={code}",
            "--general-data",
            "{law}",
            "--general-fraction",
            "1.5",
        ),
        "--general-fraction must be in (0, 1)",
    ),
    Case(
        "branch-lr-scale-negative",
        "bam-branch",
        ("--seed-checkpoint", "{seed}", "--output-dir", "{out}", "--experts", "code", "--domain-data", "code={code}")
        + ("--general-data", "{law}", "--lr-scale", "-1"),
        "--lr-scale must be > 0, got -1.0",
    ),
    # bam-upcycle
    Case(
        "upcycle-corrupted-source",
        "bam-upcycle",
        ("--method", "btx", "--expert", "a={seed}", "--expert", "b={ckpt}", "--save", "{out}"),
        "source b: {bad} is corrupted",
        flipped("shard"),
    ),
    Case(
        "upcycle-unrecorded-truncated-source",
        "bam-upcycle",
        ("--method", "btx", "--expert", "a={seed}", "--expert", "b={ckpt}", "--save", "{out}"),
        "source b: {bad} is truncated",
        lambda w, d: _unrecorded_truncated(w, d),
    ),
    Case(
        "upcycle-missing-source",
        "bam-upcycle",
        ("--method", "bam", "--expert", "a={seed}", "--expert", "b={d}/none", "--save", "{out}"),
        "source b: checkpoint not found: {d}/none",
    ),
    Case(
        "upcycle-bad-expert-spec",
        "bam-upcycle",
        ("--method", "bam", "--expert", "{seed}", "--save", "{out}"),
        "expected NAME=DIR",
    ),
    Case(
        "upcycle-topk-above-experts",
        "bam-upcycle",
        (
            "--method",
            "btx",
            "--expert",
            "a={seed}",
            "--expert",
            "b={seed}",
            "--moe-router-topk",
            "3",
            "--save",
            "{out}",
        ),
        "--moe-router-topk",
    ),
    Case(
        "upcycle-num-experts-0",
        "bam-upcycle",
        ("--method", "sparse", "--expert", "a={seed}", "--num-experts", "0", "--save", "{out}"),
        "--num-experts must be >= 1, got 0",
    ),
    Case(
        "upcycle-target-tp-0",
        "bam-upcycle",
        ("--method", "btx", "--expert", "a={seed}", "--expert", "b={seed}", "--target-tensor-parallel-size", "0")
        + ("--save", "{out}"),
        "--target-tensor-parallel-size must be >= 1, got 0",
    ),
    Case(
        "upcycle-router-data-without-domain-init",
        "bam-upcycle",
        ("--method", "bam", "--expert", "a={seed}", "--expert", "b={seed}", "--router-data", "a={code}")
        + ("--save", "{out}"),
        "--router-data needs --router-init domain",
    ),
    Case(
        "upcycle-domain-routers-for-sparse",
        "bam-upcycle",
        ("--method", "sparse", "--expert", "a={seed}", "--router-init", "domain", "--save", "{out}"),
        "--method sparse copies one source into every expert; there are no domains",
    ),
    Case(
        "upcycle-router-data-unknown-expert",
        "bam-upcycle",
        ("--method", "bam", "--expert", "a={seed}", "--expert", "b={seed}", "--router-init", "domain")
        + ("--router-data", "z={code}", "--save", "{out}"),
        "--router-data 'z={code}': no expert 'z' (the experts: a, b)",
    ),
    Case(
        "upcycle-router-data-missing",
        "bam-upcycle",
        ("--method", "btx", "--expert", "a={seed}", "--expert", "b={seed}", "--router-init", "domain")
        + ("--router-data", "b={d}/none", "--save", "{out}"),
        "expert b: calibration data (--router-data): dataset file not found: {d}/none",
    ),
    Case(
        "upcycle-domain-routers-when-growing",
        "bam-upcycle",
        ("--extend", "{seed}", "--expert", "b={seed}", "--router-init", "domain", "--save", "{out}"),
        "--extend keeps the trained routers",
    ),
    Case(
        "upcycle-router-margin-0",
        "bam-upcycle",
        ("--method", "bam", "--expert", "a={seed}", "--expert", "b={seed}", "--router-init", "domain")
        + ("--router-margin", "0", "--save", "{out}"),
        "--router-margin must be > 0, got 0.0",
    ),
    # bam-eval
    Case(
        "eval-truncated-common",
        "bam-eval",
        ("--model", "seed={ckpt}", "--data-path", "{code}", "--output-dir", "{out}"),
        "{bad} is damaged",
        truncated("common.pt"),
    ),
    Case(
        "eval-unrecorded-truncated-common",
        "bam-eval",
        ("--model", "seed={ckpt}", "--data-path", "{code}", "--output-dir", "{out}"),
        "{bad} is damaged",
        truncated("common.pt", unrecorded=True),
    ),
    Case(
        "eval-data-missing",
        "bam-eval",
        ("--model", "seed={seed}", "--data-path", "{d}/none", "--output-dir", "{out}"),
        "dataset file not found: {d}/none",
    ),
    Case(
        "eval-model-without-a-name",
        "bam-eval",
        ("--model", "{seed}", "--data-path", "{code}", "--output-dir", "{out}"),
        "argument --model: expected NAME=CHECKPOINT_DIR",
    ),
    Case(
        "eval-token-ids-without-tokenizer",
        "bam-eval",
        ("--model", "mlm={mlm}", "--data-path", "{code}", "--output-dir", "{out}"),
        "model mlm ({mlm}) records no tokenizer",
        megatron_lm_on_token_ids,
    ),
    Case(
        "eval-token-ids-tokenizer-too-big",
        "bam-eval",
        ("--model", "mlm={mlm}", "--data-path", "{code}", "--tokenizer-model", "{other_tok}", "--output-dir", "{out}"),
        "--tokenizer-model {other_tok} has 330 tokens, more than the 320 rows of model mlm's padded vocabulary",
        megatron_lm_on_token_ids,
    ),
    # bam-convert-hf
    Case(
        "export-corrupted-shard",
        "bam-convert-hf",
        ("export", "--load", "{ckpt}", "--save", "{out}"),
        "{bad} is corrupted",
        flipped("shard"),
    ),
    Case(
        "export-truncated-metadata",
        "bam-convert-hf",
        ("export", "--load", "{ckpt}", "--save", "{out}"),
        "{bad} is damaged",
        truncated(".metadata"),
    ),
    Case(
        "export-over-existing-output",
        "bam-convert-hf",
        ("export", "--load", "{seed}", "--save", "{d}/out"),
        "already exists",
        existing_output,
        absent=(),
        kept=("{d}/out/keep",),
    ),
    Case("import-not-a-model", "bam-convert-hf", ("import", "--load", "{d}", "--save", "{out}"), "{d}"),
    # bam-stats
    Case(
        "stats-num-experts-0",
        "bam-stats",
        ("--preset", "tiny", "--variant", "bam", "--num-experts", "0"),
        "--num-experts",
        absent=(),
    ),
    Case(
        "stats-topk-above-experts",
        "bam-stats",
        ("--preset", "tiny", "--variant", "btx", "--num-experts", "2", "--moe-router-topk", "3"),
        "--moe-router-topk",
        absent=(),
    ),
    # bam-generate
    Case(
        "generate-missing-metadata",
        "bam-generate",
        ("--load", "{ckpt}", "--prompt-tokens", "5,6", "--max-new-tokens", "1"),
        "{bad} is missing",
        removed(".metadata"),
        absent=(),
    ),
    Case(
        "generate-token-out-of-vocabulary",
        "bam-generate",
        ("--load", "{seed}", "--prompt-tokens", "5,99999", "--max-new-tokens", "1"),
        "99999",
        absent=(),
    ),
    Case(
        "generate-max-new-tokens-negative",
        "bam-generate",
        ("--load", "{seed}", "--prompt-tokens", "5", "--max-new-tokens", "-1"),
        "--max-new-tokens must be >= 0",
        absent=(),
    ),
]


def _unrecorded_truncated(w: dict, d: str) -> dict:
    """A seed copy without its integrity record (an older checkpoint) whose shard lost its tail."""
    iteration = _copy_seed(w, d)
    os.remove(os.path.join(iteration, "integrity.json"))
    path = _file_of(iteration, "shard")
    os.truncate(path, os.path.getsize(path) - 100)
    return {"bad": path, "ckpt": os.path.join(d, "seed")}


BY_ID = {case.id: case for case in CASES}


def _argv(case: Case, values: dict) -> list[str]:
    argv = []
    for arg in case.argv:
        if arg == "@train":
            argv += dense_train_flags(values)
        else:
            argv.append(arg.format(**values))
    return argv


def _battery(root: str, world: dict, ids: list[str]) -> dict:
    """Rank body: train the tiny seed, then run every case; {id: (code, stderr, placeholders)}."""
    seed = os.path.join(root, "seed-run")
    code, err = run_main(
        "pretrain_bam.py", [*dense_train_flags(world), world["code"], "--train-iters", "1", "--save", seed]
    )
    assert code == 0, err
    world = dict(world, seed=seed)
    results = {}
    for case_id in ids:
        case = BY_ID[case_id]
        d = os.path.join(root, case_id)
        os.makedirs(d)
        values = dict(world, d=d, out=os.path.join(d, "out"))
        values.update(case.prepare(values, d))
        results[case_id] = (*run_main(case.tool, _argv(case, values)), values)
    return results


@pytest.fixture(scope="module")
def battery(tmp_path_factory, corpus):
    root = str(tmp_path_factory.mktemp("battery"))
    world = {"tok": corpus["tokenizer"], "other_tok": corpus["other_tokenizer"], "code": corpus["code"]}
    world["law"] = corpus["law"]
    (results,) = run_distributed(_battery, 1, args=(root, world, [c.id for c in CASES]), timeout=600)
    return results


def test_the_battery_has_forty_kinds_over_every_tool():
    assert len(BY_ID) == len(CASES) >= 40
    assert {case.tool for case in CASES} == set(TOOLS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(battery, case):
    code, stderr, values = battery[case.id]
    assert code == case.code, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    prog = PROG.get(case.tool, case.tool)
    assert lines[0].startswith(f"{prog}: error: "), stderr
    assert case.expect.format(**values) in lines[0], stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    for path in case.absent:
        assert not os.path.exists(path.format(**values)), f"{path.format(**values)} left behind"
    for path in case.kept:
        assert os.path.exists(path.format(**values)), f"{path.format(**values)} was removed"


# ---- cases across a process boundary ------------------------------------------------------------
@pytest.mark.parametrize("script", ["phase1_seed", "phase2_experts", "phase3_mix"])
def test_an_sbatch_script_outside_slurm_refuses_in_one_line(tmp_path, script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "slurm", f"{script}.sbatch")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "submit this script with sbatch" in lines[0], result.stderr
    assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def small_tmpfs(path: str, size: str):
    """A tmpfs of ``size`` at ``path`` (root only); skips the test with mount's reason where refused."""
    os.makedirs(path)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True
    )
    if result.returncode != 0:
        services.unavailable("a tmpfs", f"cannot mount one here: {result.stderr.strip() or result.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def _save_on_a_full_disk(save: str, world: dict) -> tuple[int, str]:
    return run_main(
        "pretrain_bam.py",
        [*dense_train_flags(world), world["code"], "--train-iters", "2", "--save-interval", "1", "--save", save],
    )


def test_a_disk_that_fills_during_a_save(tmp_path, corpus):
    # A tiny checkpoint with its optimizer is about 1.6 MB: iteration 1 fits on 2 MB, iteration 2 does not.
    with small_tmpfs(str(tmp_path / "small"), "2m") as mount:
        save = os.path.join(mount, "run")
        world = {"tok": corpus["tokenizer"], "code": corpus["code"]}
        ((code, stderr),) = run_distributed(_save_on_a_full_disk, 1, args=(save, world))
        lines = error_lines(stderr)
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith(
            f"pretrain_bam.py: error: no space left on tmpfs (mounted at {mount}) while writing iteration 2; "
            f"iteration 1 is intact ({save}/iter_0000001)"
        ), stderr
        assert not os.path.exists(os.path.join(save, "iter_0000002.tmp"))
        assert not os.path.exists(os.path.join(save, "iter_0000002"))
        from bam_megatron.checkpoint import store

        assert store.latest_iteration(save) == 1
        store.verify_checkpoint(store.checkpoint_path(save, 1))
        assert store.read_meta(store.checkpoint_path(save, 1)).iteration == 1
