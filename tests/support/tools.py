"""The project's command-line tools called in-process, as their console scripts call them.

`run_main` captures what the tool prints and turns ``SystemExit`` into an exit code (what the shell
would see); `tool_main` is the plain call, for a rank body of `run_distributed`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import traceback

# Console script (or script) name -> the module whose main(argv) it runs (setup.py's entry points).
TOOLS = {
    "pretrain_bam.py": "bam_megatron.cli.pretrain",
    "bam-train-tokenizer": "bam_megatron.data.train_tokenizer",
    "bam-preprocess-data": "bam_megatron.data.preprocess",
    "bam-branch": "bam_megatron.cli.branch",
    "bam-upcycle": "bam_megatron.conversion.upcycle",
    "bam-eval": "bam_megatron.cli.eval",
    "bam-convert-hf": "bam_megatron.conversion.hf.cli",
    "bam-stats": "bam_megatron.stats",
    "bam-generate": "bam_megatron.inference.cli",
}
# The program name each tool puts in front of its error line, where it is not the tool's own name.
PROG = {"bam-branch": "branch.py"}

# Flags of the smallest training runs (tiny preset, 32 tokens, no evaluation).
TINY = ["--seq-length", "32", "--micro-batch-size", "2", "--eval-iters", "0", "--log-interval", "1"]


def tool_main(tool: str, argv: list[str]) -> int:
    """``tool``'s main(argv) in this process (a rank body: ``run_distributed(tool_main, 1, args=(tool, argv))``)."""
    return importlib.import_module(TOOLS[tool]).main(list(argv))


def run_main(tool: str, argv: list[str]) -> tuple[int, str]:
    """``tool``'s main(argv) as its console script runs it: (exit code, stderr)."""
    from megatron.core import parallel_state

    main = importlib.import_module(TOOLS[tool]).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:  # noqa: BLE001 - what Python would print before exiting 1
            traceback.print_exc()
            code = 1
        gc.collect()  # an "Exception ignored in __del__" shows now, inside the capture
    parallel_state.destroy_model_parallel()
    return code or 0, err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that say ``error:``."""
    return [line for line in stderr.splitlines() if "error:" in line]


def dense_train_flags(world: dict) -> list[str]:
    """pretrain_bam.py flags of a tiny dense run on ``world['tok']``'s tokenizer, ending in ``--data-path``."""
    return ["--variant", "dense", "--preset", "tiny", *TINY, "--tokenizer-model", world["tok"], "--data-path"]
