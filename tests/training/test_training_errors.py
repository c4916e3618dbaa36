"""Bad input to pretrain_bam.py: a one-line error naming the problem, exit code 2, no output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.training import SCRIPT, base_args, run


def single_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, output
    return lines[0]


def test_flag_errors_are_reported_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--variant", "bam", "--preset", "tiny", "--mock-data", "--vocab-size", "256"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "give exactly one of --train-iters and --train-samples" in single_error_line(result.stderr)


def test_help_lists_the_flag_groups():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for group in (
        "model architecture:",
        "model training settings:",
        "parallelism:",
        "data:",
        "training:",
        "optimizer and schedule:",
        "checkpointing:",
        "logging:",
    ):
        assert group in result.stdout
    assert "--tensor-model-parallel-size" in result.stdout and "--data-path" in result.stdout


def _copy_domain(corpus, tmp_path, name: str) -> str:
    prefix = str(tmp_path / f"{name}_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(corpus[name] + ext, prefix + ext)
    return prefix


@pytest.mark.parametrize(
    "case",
    [
        "missing-bin",
        "truncated-bin",
        "tp-does-not-divide-world",
        "heads-not-divisible-by-tp",
        "experts-not-divisible-by-ep",
        "layers-not-divisible-by-pp",
        "missing-tokenizer",
    ],
)
def test_bad_input_fails_with_one_line_and_no_output(tmp_path, corpus, case):
    code = _copy_domain(corpus, tmp_path, "code")
    save = tmp_path / "save"
    args = base_args(corpus, "--train-iters", "2", "--save", str(save))
    args[args.index("--data-path") + 1 : args.index("--data-path") + 7] = [code]
    world, expected = 1, None
    if case == "missing-bin":
        os.remove(code + ".bin")
        expected = f"dataset file not found: {code}.bin"
    elif case == "truncated-bin":
        with open(code + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(code + ".bin") // 2)
        expected = f"dataset file {code}.bin is truncated"
    elif case == "tp-does-not-divide-world":
        args += ["--tensor-model-parallel-size", "2"]
        expected = "world size 1 is not divisible by --tensor-model-parallel-size (2)"
    elif case == "heads-not-divisible-by-tp":
        args += [
            "--tensor-model-parallel-size",
            "2",
            "--num-attention-heads",
            "3",
            "--num-query-groups",
            "3",
            "--num-experts",
            "1",
        ]
        world, expected = 2, "1 attention experts x 3 heads are not divisible by --tensor-model-parallel-size 2"
    elif case == "experts-not-divisible-by-ep":
        args += ["--expert-model-parallel-size", "2", "--num-experts", "3"]
        world, expected = 2, "--num-experts 3 is not divisible by --expert-model-parallel-size 2"
    elif case == "layers-not-divisible-by-pp":
        args += ["--pipeline-model-parallel-size", "2", "--num-layers", "3"]
        world, expected = 2, "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"
    elif case == "missing-tokenizer":
        args[args.index("--tokenizer-model") + 1] = str(tmp_path / "nope.model")
        expected = "nope.model"
    codes, out = run(tmp_path, case, args, world=world)
    assert set(codes) == {2}, out
    assert expected in single_error_line(out)
    assert not save.exists()


def test_checkpoint_mismatches_are_refused(tmp_path, corpus):
    ckpt = tmp_path / "ckpt"
    codes, out = run(tmp_path, "save", base_args(corpus, "--train-iters", "1", "--save", str(ckpt)), world=1)
    assert codes == [0], out
    resume = base_args(corpus, "--train-iters", "2", "--load", str(ckpt))
    codes, out = run(tmp_path, "hidden", resume + ["--hidden-size", "128"], world=1)
    line = single_error_line(out)
    assert codes == [2] and "--hidden-size gives hidden_size=128, but checkpoint" in line
    assert "was saved with hidden_size=64" in line
    other_tokenizer = list(resume)
    other_tokenizer[other_tokenizer.index("--tokenizer-model") + 1] = corpus["other_tokenizer"]
    codes, out = run(tmp_path, "tokenizer", other_tokenizer, world=1)
    assert codes == [2] and "another tokenizer" in single_error_line(out)
