"""Bad input to pretrain_bam.py that needs several ranks to show: a one-line error naming the problem,
exit code 2, no output. The one-rank cases are rows of the battery (tests/cli/test_battery.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.tools import error_lines
from tests.support.training import SCRIPT, base_args, run


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


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--num-query-groups", "3"],
            "1 attention experts x 3 heads are not divisible by --tensor-model-parallel-size 2",
        ),
        (
            ["--expert-model-parallel-size", "2", "--num-experts", "3"],
            "--num-experts 3 is not divisible by --expert-model-parallel-size 2",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
            "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2",
        ),
    ],
    ids=["heads-not-divisible-by-tp", "experts-not-divisible-by-ep", "layers-not-divisible-by-pp"],
)
def test_layouts_that_do_not_tile_two_ranks_fail_with_one_line_and_no_output(tmp_path, corpus, flags, expected):
    save = tmp_path / "save"
    args = base_args(corpus, "--train-iters", "2", "--save", str(save), *flags)
    if "--num-attention-heads" in flags:
        args += ["--num-experts", "1"]
    codes, out = run(tmp_path, "bad", args, world=2)
    assert codes == [2, 2], out
    lines = error_lines(out)
    assert len(lines) == 1 and expected in lines[0], out
    assert not save.exists()
