"""Parameters and training FLOPs per token of every model the reproduction trains, from the seed's shapes.

    python examples/reproduce/model_stats.py --seed-checkpoint W/seed --output W/stats.json

Counted the way ``bam-stats`` counts (``bam_megatron.model.statistics``): parameters on the model
megatron-core builds (meta device), training FLOPs per token by the docs/design.md section 6 formula
in both of its counts: ``training_flops_per_token``, the transformer layers only (the paper's Table 7
convention), and ``training_flops_per_token_with_output_layer``, the complete count (the output layer
added, as Megatron-LM's num_floating_point_operations counts it). The compute-matched arms (by either
count, arms.FLOPS_COUNTS) and the parameter-matched BTX arms are sized from these numbers (arms.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional

MAX_BTX_EXPERTS = 8
"""The largest BTX considered when matching BAM's total parameters."""


def shapes() -> dict[str, dict]:
    """Name -> (variant, FFN experts, FFN top-k) of every configuration to count."""
    out = {"dense": dict(variant="dense", num_experts=None, moe_router_topk=1)}
    for variant in ("btx", "bam", "bam-shared-kv"):
        out[variant] = dict(variant=variant, num_experts=4, moe_router_topk=1)
    for experts in range(5, MAX_BTX_EXPERTS + 1):
        out[f"btx-e{experts}"] = dict(variant="btx", num_experts=experts, moe_router_topk=1)
    out["btx-e6-top3"] = dict(variant="btx", num_experts=6, moe_router_topk=3)
    return out


def count(seed_checkpoint: str) -> dict[str, dict]:
    """{name: parameters and training FLOPs per token (layers; with the output layer)} for every configuration
    of ``shapes``."""
    from bam_megatron import checkpoint
    from bam_megatron.model.statistics import count_parameters, training_flops_breakdown
    from bam_megatron.stats import build_meta_model, one_rank_parallel_state

    meta = checkpoint.read_meta(checkpoint.resolve_checkpoint(seed_checkpoint))
    result = {}
    with one_rank_parallel_state():
        for name, fields in shapes().items():
            arch = meta.architecture.replace(**fields)
            config = arch.one_rank_config()
            model = build_meta_model(
                config, arch.padded_vocab_size, meta.seq_length, arch.untie_embeddings_and_output_weights
            )
            params = count_parameters(model, config)
            flops = training_flops_breakdown(config, meta.seq_length, arch.padded_vocab_size)
            result[name] = {
                **fields,
                "total_params": params.total,
                "active_params": params.active,
                "training_flops_per_token": flops["layers"],  # Table 7's convention
                "training_flops_per_token_with_output_layer": flops["total"],  # complete (Megatron-LM's)
            }
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the counts as JSON to --output (atomically)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-checkpoint", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    result = count(args.seed_checkpoint)
    with open(args.output + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.output + ".tmp", args.output)
    for name, row in result.items():
        print(
            f"{name}: {row['total_params']:,} parameters, {row['active_params']:,} active, "
            f"{row['training_flops_per_token']:,} training FLOPs per token in the layers, "
            f"{row['training_flops_per_token_with_output_layer']:,} with the output layer"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
