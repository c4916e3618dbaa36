"""What the checkpoint integrity record costs: its CRC pass at save time and at load time, against the
save and the load themselves, measured side by side on the same checkpoint.

A save records the size and CRC-32 of every file it wrote (`bam_megatron.checkpoint.integrity`);
a load checks the shards' CRCs before megatron-core reads them. Both are one extra read of bytes
the page cache holds. Reported: seconds of the save without the record (the reference), of the
record, of the load without the check, of the check, and the two ratios (record / save, check /
load).

    python bench/checkpoint_integrity.py [--layers 2 --hidden 512 --vocab 32000 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bam_megatron  # noqa: E402,F401
from bench.common import init_single_rank, report  # noqa: E402


def main() -> None:
    """Save and load one dense model ``--rounds`` times, timing the integrity parts apart."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    init_single_rank()
    from bam_megatron.checkpoint import CheckpointMeta, integrity, store
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_from_architecture

    architecture = Architecture("dense", args.layers, args.hidden, 4 * args.hidden, 8, 8, args.vocab)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), 128)
    root = tempfile.mkdtemp(prefix="bam-bench-integrity-")
    saves, records, loads, checks = [], [], [], []
    try:
        for r in range(args.rounds):
            start = time.perf_counter()
            path = store.save_checkpoint(
                os.path.join(root, str(r)), 1, model, None, None, CheckpointMeta(architecture, 128)
            )
            save = time.perf_counter() - start
            start = time.perf_counter()
            integrity.describe(path, sorted(integrity.read_record(path)))  # what the save spent on the record
            records.append(time.perf_counter() - start)
            saves.append(save - records[-1])
            start = time.perf_counter()
            store.load_checkpoint(path, model, load_rng=False)
            load = time.perf_counter() - start
            start = time.perf_counter()
            integrity.check_checksums(path, integrity.shards(path))  # what the load spent on the check
            checks.append(time.perf_counter() - start)
            loads.append(load - checks[-1])
        size = sum(e["size"] for e in integrity.read_record(path).values())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = {
        name: statistics.median(v)
        for name, v in (("save", saves), ("record", records), ("load", loads), ("check", checks))
    }
    result = {
        "checkpoint_mb": round(size / 1e6, 1),
        "save_without_record_s": m["save"],
        "record_s": m["record"],
        "load_without_check_s": m["load"],
        "check_s": m["check"],
        "record_over_save": m["record"] / m["save"],
        "check_over_load": m["check"] / m["load"],
        "rounds": args.rounds,
    }
    report(
        result,
        f"integrity record on a {size / 1e6:.0f} MB checkpoint: +{m['record']:.2f} s on a {m['save']:.2f} s save "
        f"(x{1 + result['record_over_save']:.2f}), +{m['check']:.2f} s on a {m['load']:.2f} s load "
        f"(x{1 + result['check_over_load']:.2f})",
    )


if __name__ == "__main__":
    main()
