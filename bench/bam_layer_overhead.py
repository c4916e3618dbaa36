"""BAM layer vs a dense megatron-core layer with N·H heads and the same FFN compute.

Both layers are parallel blocks with the same MoE FFN (N experts, top-1) and attention with the
same N·H heads and KV groups; the BAM layer's attention is soft MoA (attention router + per-head
gating), the reference's is megatron-core's ordinary SelfAttention. Forward + backward of one
layer; ratio = BAM / reference (goal <= 1.05: soft MoA costs no more than the wide attention it is).

    python bench/bam_layer_overhead.py [--experts 4 --hidden 512 --heads 8 --seq 256 --batch 2]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402

import bam_megatron  # noqa: E402,F401
from bam_megatron.model.configs import variant_config  # noqa: E402
from bam_megatron.model.specs import get_bam_layer_spec  # noqa: E402
from bench.common import forward_backward, init_single_rank, interleaved_medians, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    init_single_rank()

    n = args.experts
    common = dict(
        hidden_size=args.hidden,
        num_layers=1,
        ffn_hidden_size=4 * args.hidden,
        num_experts=n,
        use_cpu_initialization=True,
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
    )
    bam_cfg = variant_config("bam", num_attention_heads=args.heads, num_query_groups=args.heads, **common)
    ref_cfg = variant_config(
        "btx",
        num_attention_heads=n * args.heads,
        num_query_groups=n * args.heads,
        kv_channels=args.hidden // args.heads,
        **common,
    )
    bam = build_module(get_bam_layer_spec(bam_cfg, "local"), config=bam_cfg, layer_number=1)
    ref = build_module(get_bam_layer_spec(ref_cfg, "local"), config=ref_cfg, layer_number=1)
    with torch.no_grad():  # same expert weights, so both FFNs route the same way and do the same work
        ref.load_state_dict({k: v for k, v in bam.state_dict().items() if "self_attention" not in k}, strict=False)

    rope = RotaryEmbedding(kv_channels=args.hidden // args.heads, rotary_percent=1.0)(args.seq)
    x = torch.randn(args.seq, args.batch, args.hidden, requires_grad=True)
    ours, reference = interleaved_medians(
        lambda: forward_backward(bam, x, attention_mask=None, rotary_pos_emb=rope),
        lambda: forward_backward(ref, x, attention_mask=None, rotary_pos_emb=rope),
        args.rounds,
    )
    ratio = ours / reference
    report(
        {
            "bench": "bam_layer_overhead",
            "config": vars(args),
            "device": "cpu",
            "bam_layer_ms": round(ours * 1e3, 2),
            "wide_attention_layer_ms": round(reference * 1e3, 2),
            "ratio_bam_over_reference": round(ratio, 3),
            "goal": "<= 1.05",
        },
        f"bam_layer_overhead: BAM layer {ours * 1e3:.1f} ms vs dense {n * args.heads}-head layer with the "
        f"same MoE FFN {reference * 1e3:.1f} ms (fwd+bwd): ratio {ratio:.3f} (goal <= 1.05)",
    )


if __name__ == "__main__":
    main()
