"""Training throughput of a small BAM model against the dense model it is upcycled from.

Both run pretrain_bam.py's own training step (megatron-core schedule, DDP, Adam, mock data) in one
process, interleaved; the ratio is BAM tokens/s over dense tokens/s. BAM does ~N x the attention
work and routes the FFN, so the ratio says what the mixture costs per token on this machine.

    python bench/train_throughput.py [--hidden 256 --layers 4 --seq 256 --micro-batch 4 --experts 4]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bam_megatron  # noqa: E402,F401
from bam_megatron.testing.distributed import run_distributed  # noqa: E402
from bench.common import report  # noqa: E402


def measure(settings: dict) -> dict:
    """Rank body: median seconds per training step of each variant."""
    from bam_megatron.training.arguments import parse_args
    from bam_megatron.training.loop import Trainer
    from bench.common import interleaved_medians

    def argv(variant: str) -> list[str]:
        return [
            "--variant",
            variant,
            "--mock-data",
            "--vocab-size",
            "1024",
            "--train-iters",
            "1000",
            "--num-layers",
            str(settings["layers"]),
            "--hidden-size",
            str(settings["hidden"]),
            "--num-attention-heads",
            str(settings["hidden"] // 64),
            "--ffn-hidden-size",
            str(4 * settings["hidden"]),
            "--num-experts",
            str(settings["experts"]),
            "--seq-length",
            str(settings["seq"]),
            "--micro-batch-size",
            str(settings["micro_batch"]),
            "--eval-iters",
            "0",
        ]

    dense, bam = Trainer(parse_args(argv("dense"))), Trainer(parse_args(argv("bam")))
    dense_s, bam_s = interleaved_medians(dense._train_step, bam._train_step, settings["rounds"])
    return {"dense_s": dense_s, "bam_s": bam_s, "bam_params": bam.total, "dense_params": dense.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    settings = vars(parser.parse_args())
    (result,) = run_distributed(measure, 1, args=(settings,), timeout=1800)
    tokens = settings["seq"] * settings["micro_batch"]
    dense_tps, bam_tps = tokens / result["dense_s"], tokens / result["bam_s"]
    report(
        {
            "bench": "train_throughput",
            "config": settings,
            "device": "cpu (1 rank, 1 thread)",
            "dense_tokens_per_s": round(dense_tps, 1),
            "bam_tokens_per_s": round(bam_tps, 1),
            "ratio_bam_over_dense": round(bam_tps / dense_tps, 3),
            "dense_params": result["dense_params"],
            "bam_params": result["bam_params"],
        },
        f"train_throughput: BAM {bam_tps:.0f} tokens/s vs dense {dense_tps:.0f} tokens/s "
        f"(N={settings['experts']}, CPU): ratio {bam_tps / dense_tps:.3f}",
    )


if __name__ == "__main__":
    main()
