"""The error policy every tool applies (bam_megatron.errors.run_tool): bad input is one line and
exit 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bam_megatron.checkpoint import CheckpointError
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.upcycle import UpcycleError
from bam_megatron.data.errors import DataError
from bam_megatron.errors import BamError, ConfigError, UserError, run_tool


@pytest.mark.parametrize("error", [CheckpointError, ConversionError, UpcycleError, DataError, ConfigError])
def test_every_project_input_error_is_a_user_error_and_not_a_value_error(error):
    assert issubclass(error, UserError) and issubclass(error, BamError) and not issubclass(error, ValueError)


def test_bad_input_is_one_line_and_exit_2(capsys):
    def body():
        raise ConfigError("--num-layers must be >= 1,\n   got 0")

    assert run_tool("tool", body) == 2
    assert capsys.readouterr().err == "tool: error: --num-layers must be >= 1, got 0\n"
    assert run_tool("tool", lambda: 3) == 3 and run_tool("tool", lambda: None) == 0


def test_a_library_error_is_not_disguised_as_bad_input():
    def body():
        raise ValueError("something inside megatron-core")

    with pytest.raises(ValueError, match="inside megatron-core"):
        run_tool("tool", body)


def test_a_bug_in_a_tool_exits_1_with_its_traceback(tmp_path):
    # bam-stats with a model_stats that fails like a bug would (not bad input)
    code = (
        "import sys; import bam_megatron.stats as s\n"
        "def broken(*a): raise RuntimeError('a bug')\n"
        "s.model_stats = broken\n"
        "sys.exit(s.main(['--preset', 'tiny', '--variant', 'dense']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
