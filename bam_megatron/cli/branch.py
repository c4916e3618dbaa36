"""``bam-branch`` / ``tools/branch.py``: the seed -> dense-expert runs (`bam_megatron.conversion.branch`),
with phase2.args written in pretrain_bam.py's own flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

from bam_megatron.conversion import branch as branching
from bam_megatron.errors import run_tool
from bam_megatron.training.arguments import as_flags


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags of tools/branch.py."""
    p = argparse.ArgumentParser(
        prog="branch.py", description=branching.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed-checkpoint", required=True, help="the seed: a --save directory or an iter_* directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--experts", nargs="+", required=True, metavar="NAME")
    p.add_argument(
        "--domain-data",
        nargs="+",
        required=True,
        metavar="NAME=PREFIX",
        help="each expert's domain corpus (indexed-dataset prefix)",
    )
    p.add_argument("--general-data", required=True, metavar="PREFIX", help="general data mixed into every domain")
    p.add_argument("--general-fraction", type=float, default=0.1, help="share of general data in phase 2")
    p.add_argument("--lr-scale", type=float, default=0.5, help="phase-2 peak LR = the seed's x this")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; exit code 2 for bad input."""
    args = parse_args(argv)
    return run_tool("branch.py", lambda: branching.branch(args, as_flags) and None)
