"""Upcycling speed and memory: bam-upcycle of 4 dense sources vs a plain copy of the same bytes.

Four dense checkpoints of a few hundred MB each are created (random weights), then upcycled to BAM;
the reference is copying the same source files on the same disk (the I/O limit). Throughput is
source GB per second; the ratio is ours / copy (goal >= 0.5). Peak memory (RSS of the upcycling
process) is reported next to the size of one source and of the output.

    python bench/upcycle_throughput.py [--hidden 768 --layers 6 --vocab 32000 --workdir /tmp/bam-upcycle-bench]
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

    from bam_megatron.model.builder import build_model
    from bam_megatron.training import checkpointing
    from bam_megatron.training.arguments import parse_args
    from bam_megatron.training.loop import _resolve_architecture, model_config
    from bam_megatron.data.tokenizer import padded_vocab_size
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(), seed=seed)
    args = parse_args(flags + ["--seed", str(seed)])
    _resolve_architecture(args)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, 1)
    args.min_lr = 0.1 * args.lr
    torch.manual_seed(seed)
    model = build_model(model_config(args), args.padded_vocab_size, args.seq_length,
                        untie_embeddings=args.untie_embeddings_and_output_weights)  # fmt: skip
    meta = {"consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0, "args": vars(args).copy(),
            "data_fingerprint": None, "tokenizer_fingerprint": None}  # fmt: skip
    checkpointing.save_checkpoint(directory, 1, model, None, None, meta)


def size_of(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default="/tmp/bam-upcycle-bench")
    parser.add_argument("--keep", action="store_true", help="keep the sources and output (for profiling)")
    settings = parser.parse_args()
    shutil.rmtree(settings.workdir, ignore_errors=True)
    flags = ["--variant", "dense", "--mock-data", "--train-iters", "1", "--vocab-size", str(settings.vocab),
             "--num-layers", str(settings.layers), "--hidden-size", str(settings.hidden),
             "--num-attention-heads", str(settings.hidden // 64), "--ffn-hidden-size", str(4 * settings.hidden)]  # fmt: skip
    names = ["seed", "code", "law", "math"]
    sources = [os.path.join(settings.workdir, "sources", n) for n in names]
    for i, path in enumerate(sources):
        run_distributed(make_source, 1, args=(path, flags, i), timeout=1800)
    source_bytes = sum(size_of(p) for p in sources)

    def copy() -> float:
        target = os.path.join(settings.workdir, "copy")
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        for name, path in zip(names, sources):
            shutil.copytree(path, os.path.join(target, name))
        os.sync()
        return time.perf_counter() - start

    def upcycle() -> tuple[float, str]:
        out = os.path.join(settings.workdir, "bam")
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, os.path.join(ROOT, "tools", "upcycle.py"), "--method", "bam", "--save", out]
        for name, path in zip(names, sources):
            argv += ["--expert", f"{name}={path}"]
        start = time.perf_counter()
        log = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        os.sync()
        return time.perf_counter() - start, log

    copies = [copy()]
    upcycle_s, log = upcycle()
    copies.append(copy())
    copy_s = statistics.median(copies)
    import json

    manifest = json.load(open(os.path.join(settings.workdir, "bam", "upcycle_manifest.json")))
    gb = source_bytes / 1e9
    ratio = copy_s / upcycle_s
    report(
        {"bench": "upcycle_throughput", "config": vars(settings), "source_gb_total": round(gb, 3),
         "one_source_mb": round(size_of(sources[0]) / 1e6, 1),
         "output_mb": round(size_of(os.path.join(settings.workdir, "bam")) / 1e6, 1),
         "copy_gb_per_s": round(gb / copy_s, 3), "upcycle_gb_per_s": round(gb / upcycle_s, 3),
         "ratio_upcycle_over_copy": round(ratio, 3), "upcycle_peak_rss_mb": manifest["peak_rss_mb"]},
        f"upcycle_throughput: {gb / upcycle_s:.3f} GB/s upcycling 4 x {size_of(sources[0]) / 1e6:.0f} MB "
        f"vs {gb / copy_s:.3f} GB/s copying: ratio {ratio:.2f} (goal >= 0.5); peak memory {manifest['peak_rss_mb']} MB",
    )  # fmt: skip
    if not settings.keep:
        shutil.rmtree(settings.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
