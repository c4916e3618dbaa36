"""The BAM paper's comparisons, reproduced at laptop scale with seeds, error bars and t-tests.

    python examples/reproduce/run.py [--workdir runs/reproduce] [--report-dir DIR] [--seeds 3] [--quick]
                                     [--arms KEY,...]

The demo's dense phases (examples/bam_demo/: data, tokenizer, preprocess, seed, branch, experts),
then eleven arms (arms.py) upcycled, trained and evaluated once per mixture seed (pipeline.py), then
REPORT.md with Tables 1, 4, 5 and 6 in the paper's layout, random vs domain routers, the paper's
orderings against ours, the FFN routing at step 0 and after training, bar plots and loss curves
(report.py).

Every stage is skipped when its outputs exist and are current (the demo's stamps), so an
interrupted run continues where it stopped and the report can be re-rendered at once; --seeds N
with a larger N trains only the new seeds, and --arms runs only some arms (a later run without it adds
the others). --quick: a few iterations per phase and 2 seeds, a smoke test of the whole pipeline (its
numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/

from bam_demo.pipeline import QUICK, Settings
from bam_demo.runner import Console, StageFailed, fmt, lock_workdir, stop_on_signals

from reproduce.arms import ARM_KEYS
from reproduce.pipeline import ReproducePipeline, stages
from reproduce.report import write_report

TOKENS_PER_ITERATION_BATCH = 16
"""Sequences per iteration (the demo's 8 x 2 ranks), whatever --nproc is."""
FULL = dict(seed_iters=600, expert_iters=250, mix_iters=80, log_lines=8)
"""Sized for about an hour on 2 CPU cores (the demo's model and data; fewer iterations per run)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The reproduction's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/reproduce", help="where every run goes (default: runs/reproduce)")
    p.add_argument("--report-dir", default=None, help="where REPORT.md and figures/ go (default: WORKDIR/report)")
    p.add_argument("--seeds", type=int, default=None, help="mixture seeds per arm (default: 3; --quick: 2)")
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--quick", action="store_true", help="a few iterations per phase: a smoke test")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel ranks per run (default: 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default: 2, one per core)")
    p.add_argument(
        "--mix-iters",
        type=int,
        default=None,
        help=f"data-matched mixture iterations (default: {FULL['mix_iters']}; the demo's 500 on an idle machine)",
    )
    p.add_argument(
        "--arms",
        type=lambda text: [key.strip() for key in text.split(",") if key.strip()],
        default=None,
        metavar="KEY,...",
        help="train and evaluate only these arms (default: all: " + ", ".join(ARM_KEYS) + "); the report "
        "shows the others as missing, and a later run without --arms adds them",
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.arms or []) - set(ARM_KEYS))
    if unknown:
        p.error(f"--arms: unknown arm {', '.join(unknown)} (known: {', '.join(ARM_KEYS)})")
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 2:
        p.error("--seeds must be >= 2 (a standard deviation needs two)")
    if TOKENS_PER_ITERATION_BATCH % args.nproc:
        p.error(f"--nproc must divide {TOKENS_PER_ITERATION_BATCH}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run (or continue) the reproduction and write its report; 0 once REPORT.md is written."""
    args = parse_args(argv)
    settings = Settings(**(QUICK if args.quick else FULL), micro_batch_size=TOKENS_PER_ITERATION_BATCH // args.nproc)
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = lock_workdir(workdir)  # noqa: F841 (held until the process exits)
    if lock is None:
        print(f"reproduce: error: another run is using {workdir}", file=sys.stderr)
        return 1
    console = Console(stages(args.seeds))
    seeds = list(range(1, args.seeds + 1))
    print(
        f"BAM reproduction{' --quick' if args.quick else ''}: work directory {workdir}; seeds {seeds}; "
        f"{args.nproc} rank(s) per run, {args.jobs} runs at once"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    pipeline = ReproducePipeline(workdir, settings, args.nproc, args.jobs, console, seeds, only=args.arms)
    stop_on_signals()
    try:
        pipeline.run()
    except StageFailed as error:
        print(f"\nreproduce: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nreproduce: interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return 130
    report_dir = os.path.abspath(args.report_dir or os.path.join(workdir, "report"))
    command = "python examples/reproduce/run.py" + (" --quick" if args.quick else "") + f" --seeds {args.seeds}"
    command += f" --mix-iters {args.mix_iters}" if args.mix_iters is not None else ""
    command += f" --arms {','.join(args.arms)}" if args.arms else ""
    headline = write_report(pipeline, report_dir, command, pipeline.times)
    print("\n" + headline)
    print(f"\nReport: {os.path.join(report_dir, 'REPORT.md')}")
    print("Stage times: " + ", ".join(f"{n} {fmt(t)}" + (" (skipped)" if s else "") for n, t, s in pipeline.times))
    print(f"Total time: {fmt(time.perf_counter() - console.start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
