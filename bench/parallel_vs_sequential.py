"""Parallel attention+FFN block (one shared norm, one fused TP reduction) vs the sequential
pre-norm block, dense, same weights (the sequential block has one more norm). Forward + backward
of one layer on --tensor-model-parallel-size gloo ranks (default 2, so the saved reduction shows);
ratio = sequential / parallel (> 1: the parallel block is faster).

    python bench/parallel_vs_sequential.py [--tensor-model-parallel-size 2 --hidden 512 --seq 256]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import bam_megatron  # noqa: E402,F401
from bam_megatron.testing.distributed import run_distributed  # noqa: E402
from bench.common import report  # noqa: E402


def time_blocks(args: dict) -> dict:
    """Rank body: median seconds of each block, measured interleaved."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from bam_megatron.model.configs import variant_config
    from bam_megatron.model.specs import get_bam_layer_spec
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from bench.common import forward_backward, interleaved_medians

    tp = args["tensor_model_parallel_size"]
    initialize(ParallelSizes(tensor=tp), seed=1)
    common = dict(
        hidden_size=args["hidden"],
        num_attention_heads=args["heads"],
        num_layers=1,
        ffn_hidden_size=4 * args["hidden"],
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
    )
    layers = {}
    for block in ("parallel", "sequential"):
        cfg = variant_config("dense", block_type=block, **common)
        layers[block] = build_module(get_bam_layer_spec(cfg, "local"), config=cfg, layer_number=1)
    layers["sequential"].load_state_dict(layers["parallel"].state_dict(), strict=False)

    rope = RotaryEmbedding(kv_channels=args["hidden"] // args["heads"], rotary_percent=1.0)(args["seq"])
    x = torch.randn(args["seq"], args["batch"], args["hidden"], requires_grad=True)
    parallel, sequential = interleaved_medians(
        lambda: forward_backward(layers["parallel"], x, attention_mask=None, rotary_pos_emb=rope),
        lambda: forward_backward(layers["sequential"], x, attention_mask=None, rotary_pos_emb=rope),
        args["rounds"],
    )
    return {"parallel_s": parallel, "sequential_s": sequential}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = vars(parser.parse_args())
    timings = run_distributed(time_blocks, args["tensor_model_parallel_size"], args=(args,))[0]
    parallel, sequential = timings["parallel_s"], timings["sequential_s"]
    ratio = sequential / parallel
    report(
        {
            "bench": "parallel_vs_sequential",
            "config": args,
            "device": "cpu (gloo)",
            "parallel_ms": round(parallel * 1e3, 2),
            "sequential_ms": round(sequential * 1e3, 2),
            "ratio_sequential_over_parallel": round(ratio, 3),
        },
        f"parallel_vs_sequential: parallel block {parallel * 1e3:.1f} ms vs sequential "
        f"{sequential * 1e3:.1f} ms (fwd+bwd, TP={args['tensor_model_parallel_size']}): ratio {ratio:.3f}",
    )


if __name__ == "__main__":
    main()
