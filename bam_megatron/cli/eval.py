"""``bam-eval``: the evaluation command and its sub-commands.

- ``bam-eval --model NAME=CKPT ...``: per-domain perplexity and routing (`bam_megatron.evaluation.cli`);
- ``bam-eval plot RUN ...``: loss curves from training metrics files (`bam_megatron.evaluation.plot`);
- ``bam-eval harness ...``: lm-evaluation-harness tasks on each checkpoint's Hugging Face export
  (`bam_megatron.cli.harness`, which joins evaluation and conversion: hence this layer).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``bam-eval``: dispatch on the sub-command; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        from bam_megatron.evaluation.plot import main as plot_main

        return plot_main(argv[1:])
    if argv[:1] == ["harness"]:
        from bam_megatron.cli.harness import main as harness_main

        return harness_main(argv[1:])
    from bam_megatron.evaluation.cli import main as perplexity_main

    return perplexity_main(argv)


if __name__ == "__main__":
    sys.exit(main())
