"""Upcycling speed and memory: bam-upcycle of 4 dense sources vs a plain copy of the same bytes.

Four dense checkpoints of a few hundred MB each are created (random weights), then upcycled to BAM;
the reference is copying the same source files on the same disk, then syncing (the I/O limit).
Copies and upcycles alternate (``--repeats`` each) and medians are compared. Throughput is source
GB per second, for the upcycle's work (from reading the sources to the published checkpoint, as
its manifest records) and for the whole command (plus interpreter start and imports, ~5-8 s
here); the ratio is ours / copy (goal >= 0.5).

Memory: the same is repeated with sources twice as deep (``--layers`` and 2 x ``--layers``); the
upcycler streams layer by layer, so its peak RSS should not grow with depth.

    python bench/upcycle_throughput.py [--hidden 768 --layers 6 --vocab 32000 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bam_megatron  # noqa: E402,F401
from bam_megatron.testing.distributed import run_distributed  # noqa: E402
from bench.common import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_source(directory: str, flags: list[str], seed: int) -> None:
    """Rank body: a randomly initialised dense checkpoint with pretrain_bam.py's metadata."""
    import torch

    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.model.architecture import padded_vocab_size, resolve_architecture
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from bam_megatron.training.arguments import DEFAULT_SEQ_LENGTH, given_architecture, parse_args

    initialize(ParallelSizes(), seed=seed)
    args = parse_args(flags + ["--seed", str(seed)])
    padded = padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, 1)
    architecture = resolve_architecture(given_architecture(args), args.preset, padded_vocab=padded)
    seq_length = args.seq_length or DEFAULT_SEQ_LENGTH
    torch.manual_seed(seed)
    config = architecture.model_config(use_cpu_initialization=True)
    model = build_from_architecture(architecture, config, seq_length)
    meta = CheckpointMeta(architecture, seq_length=seq_length, training={"seed": seed})
    store.save_checkpoint(directory, 1, model, None, None, meta)


def size_of(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def upcycle_sources(workdir: str, layers: int, settings: argparse.Namespace) -> dict:
    """Create 4 sources of ``layers`` layers; alternate copies and upcycles; medians and peak RSS."""
    import json

    flags = [
        "--variant",
        "dense",
        "--mock-data",
        "--train-iters",
        "1",
        "--vocab-size",
        str(settings.vocab),
        "--num-layers",
        str(layers),
        "--hidden-size",
        str(settings.hidden),
        "--num-attention-heads",
        str(settings.hidden // 64),
        "--ffn-hidden-size",
        str(4 * settings.hidden),
    ]
    names = ["seed", "code", "law", "math"]
    sources = [os.path.join(workdir, "sources", n) for n in names]
    for i, path in enumerate(sources):
        run_distributed(make_source, 1, args=(path, flags, i), timeout=1800)
    source_bytes = sum(size_of(p) for p in sources)

    def copy() -> float:
        target = os.path.join(workdir, "copy")
        shutil.rmtree(target, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        for name, path in zip(names, sources):
            shutil.copytree(path, os.path.join(target, name))
        os.sync()
        return time.perf_counter() - start

    def upcycle() -> tuple[float, dict]:
        out = os.path.join(workdir, "bam")
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        argv = [sys.executable, os.path.join(ROOT, "tools", "upcycle.py"), "--method", "bam", "--save", out]
        for name, path in zip(names, sources):
            argv += ["--expert", f"{name}={path}"]
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, text=True)
        os.sync()
        wall = time.perf_counter() - start
        return wall, json.load(open(os.path.join(out, "upcycle_manifest.json")))

    copies, walls, works, peaks = [], [], [], []
    for _ in range(settings.repeats):
        copies.append(copy())
        wall, manifest = upcycle()
        walls.append(wall)
        works.append(manifest["seconds"])
        peaks.append(manifest["peak_rss_mb"])
    copies.append(copy())
    gb = source_bytes / 1e9
    copy_s, work_s, wall_s = (statistics.median(x) for x in (copies, works, walls))
    return {
        "layers": layers,
        "source_gb_total": round(gb, 3),
        "one_source_mb": round(size_of(sources[0]) / 1e6, 1),
        "output_mb": round(size_of(os.path.join(workdir, "bam")) / 1e6, 1),
        "copy_gb_per_s": round(gb / copy_s, 3),
        "upcycle_work_gb_per_s": round(gb / work_s, 3),
        "upcycle_command_gb_per_s": round(gb / wall_s, 3),
        "ratio_work_over_copy": round(copy_s / work_s, 3),
        "ratio_command_over_copy": round(copy_s / wall_s, 3),
        "peak_rss_mb": max(peaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/bam-upcycle-bench")
    settings = parser.parse_args()
    runs = []
    for layers in (settings.layers, 2 * settings.layers):
        shutil.rmtree(settings.workdir, ignore_errors=True)
        runs.append(upcycle_sources(settings.workdir, layers, settings))
        shutil.rmtree(settings.workdir, ignore_errors=True)
    base, deep = runs
    report(
        {"bench": "upcycle_throughput", "config": vars(settings), "runs": runs},
        f"upcycle_throughput: {base['upcycle_work_gb_per_s']:.3f} GB/s upcycling 4 x {base['one_source_mb']:.0f} MB "
        f"vs {base['copy_gb_per_s']:.3f} GB/s copying: ratio {base['ratio_work_over_copy']:.2f} "
        f"({base['ratio_command_over_copy']:.2f} with interpreter start) (goal >= 0.5); peak memory "
        f"{base['peak_rss_mb']:.0f} MB at {base['layers']} layers, {deep['peak_rss_mb']:.0f} MB at {deep['layers']} "
        f"layers (sources {base['one_source_mb']:.0f} -> {deep['one_source_mb']:.0f} MB)",
    )


if __name__ == "__main__":
    main()
