"""``pretrain_bam.py`` / ``bam-pretrain``: parse the flags, build the trainer, train."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch.distributed as dist

from bam_megatron.errors import run_tool
from bam_megatron.training.loop import Trainer


def make_trainer(args) -> Trainer:
    """The Trainer for the flags: with --peft, the one that adds adapters to a frozen base."""
    if args.peft:
        from bam_megatron.training.peft_trainer import PeftTrainer

        return PeftTrainer(args)
    return Trainer(args)


def _is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, train, return the exit code: 0 done, 2 bad input, 3 preempted, 4 too many NaN/Inf."""
    import bam_megatron  # noqa: F401  (quiet megatron-core's import-time warnings)
    from bam_megatron.training.arguments import parse_args

    args = parse_args(argv)
    return run_tool("pretrain_bam.py", lambda: make_trainer(args).run(), print_errors=_is_first_rank)
