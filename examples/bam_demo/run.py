"""The whole Branch-Attend-Mix method on a CPU, end to end, with the project's real tools.

    python examples/bam_demo/run.py [--workdir runs/demo] [--fresh] [--quick]

Stages (each a subprocess of the project's own entry points; everything goes under --workdir):

 1. data        four domains of text found on the machine (examples/bam_demo/corpora.py): general
                prose (Python's documentation), code (the standard library), law (license texts),
                math (synthetic worked solutions: a stock machine has no math text)
 2. tokenizer   tools/train_tokenizer.py: one SentencePiece model for all domains
 3. preprocess  tools/preprocess_data.py: JSONL -> indexed datasets, one per domain
 4. seed        pretrain_bam.py --variant dense on an equal mixture of the four domains (2 ranks)
 5. branch      tools/branch.py: three copies of the seed (code, law, math) with phase-2 flags
 6. experts     pretrain_bam.py @phase2.args: each copy continues on 90% its domain, 10% general,
                at half the seed's LR
 7. upcycle     tools/upcycle.py --method bam and --method btx: seed + 3 experts -> 4-expert MoEs,
                with random routers and with domain routers (--router-init domain)
 8. mixtures    pretrain_bam.py on the equal mixture, each of them (same data, steps and LR)
 9. evaluate    tools/eval.py: per-domain perplexity of the dense models and the mixtures, trained
                and as upcycled (step 0); routing heatmaps, step 0 beside trained; own-expert shares

With --grow, six more stages (examples/bam_demo/grow.py) grow the trained BAM mixture by a fifth
domain, bio: its data, a branch of the seed, its expert, bam-upcycle --extend, a short re-training
with the old experts frozen, and a five-domain evaluation of the mixture before and after.

A stage is skipped when its outputs exist and were made with the same settings from the same
inputs (stamps under WORKDIR/.stages), so a demo that was interrupted continues where it stopped:
each stage writes under a temporary name and renames it once it succeeded (tools/branch.py and
tools/upcycle.py publish atomically themselves). Full logs go to WORKDIR/logs/; a failing stage
stops the demo with a message naming the stage and its log.

At the end the demo prints the perplexity table, checks what the method promises even at this
scale (each domain expert beats the seed on its own domain; BTX and BAM beat the seed on average)
and each domain's own-expert share (for domain routers, against the targets of issue 22), and says
where the routing heatmaps are. --quick runs a few iterations per phase and trains BTX and BAM with
random routers only (a smoke test of the pipeline in a few minutes; its numbers mean little).
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

# examples/ on the path: the demo imports as the bam_demo package, without installing it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_demo.grow import GROW_STAGES, GrowPipeline, grow_report
from bam_demo.pipeline import QUICK, STAGES, Pipeline, Settings, report
from bam_demo.runner import Console, StageFailed, fmt, lock_workdir, stop_on_signals


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The demo's flags: --workdir, --fresh, --quick, --grow, --nproc, --jobs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--quick", action="store_true", help="a few iterations per phase: a smoke test of the pipeline")
    p.add_argument(
        "--grow",
        action="store_true",
        help="then grow the trained BAM mixture by a fifth domain (bio) and compare it before and after",
    )
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks per training run (default: 2)")
    p.add_argument(
        "--jobs", type=int, default=3, help="training runs at once in phases 2 and 3 (default: 3; they share the cores)"
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo (continuing a previous run in the same work directory); 0 once the table is printed."""
    args = parse_args(argv)
    settings = Settings(**QUICK) if args.quick else Settings()
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = lock_workdir(workdir)  # held until the process exits
    if lock is None:
        print(f"bam_demo: error: another demo is running in {workdir}", file=sys.stderr)
        return 1
    console = Console(STAGES + (GROW_STAGES if args.grow else 0))
    print(
        f"BAM demo{' --quick' if args.quick else ''}: work directory {workdir}; {args.nproc} ranks per training "
        f"run, up to {args.jobs} runs at once"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    pipeline = (GrowPipeline if args.grow else Pipeline)(workdir, settings, args.nproc, args.jobs, console)
    stop_on_signals()
    try:
        pipeline.run()
    except StageFailed as error:
        print(f"\nbam_demo: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nbam_demo: interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return 130
    report(workdir)
    if args.grow:
        grow_report(workdir)
    total = time.perf_counter() - console.start
    print(
        "Stage times: "
        + ", ".join(f"{name} {fmt(t)}" + (" (skipped)" if skipped else "") for name, t, skipped in pipeline.times)
    )
    print(f"Total time: {fmt(total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
