"""Soft MoA as one wide attention (N·H heads: one QKV GEMM, one attention call, one output GEMM)
vs the naive loop over N separate attentions weighted by the same gates; forward + backward on
the same inputs. Ratio = loop / wide (> 1: the wide form is faster).

    python bench/soft_moa_vs_loop.py [--experts 4 --hidden 512 --heads 8 --seq 256 --batch 2]
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

    sizes = dict(
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.heads,
        num_layers=1,
        ffn_hidden_size=4 * args.hidden,
        use_cpu_initialization=True,
    )
    dense_cfg = variant_config("dense", fuse_tp_reduction=False, **sizes)
    moa_cfg = variant_config("bam", num_experts=args.experts, **sizes)
    build = lambda cfg: build_module(
        get_bam_layer_spec(cfg, "local").submodules.self_attention,  # noqa: E731
        config=cfg,
        layer_number=1,
    )
    wide = build(moa_cfg)
    experts = [build(dense_cfg) for _ in range(args.experts)]
    router = wide.router

    rope = RotaryEmbedding(kv_channels=dense_cfg.kv_channels, rotary_percent=1.0)(args.seq)
    x = torch.randn(args.seq, args.batch, args.hidden, requires_grad=True)

    def soft_moa():
        forward_backward(wide, x, None, rotary_pos_emb=rope)

    def loop():
        gates = router(x)
        out = sum(gates[..., j : j + 1] * e(x, None, rotary_pos_emb=rope)[0] for j, e in enumerate(experts))
        out.sum().backward()

    ours, reference = interleaved_medians(soft_moa, loop, args.rounds)
    ratio = reference / ours
    report(
        {
            "bench": "soft_moa_vs_loop",
            "config": vars(args),
            "device": "cpu",
            "wide_ms": round(ours * 1e3, 2),
            "loop_ms": round(reference * 1e3, 2),
            "ratio_loop_over_wide": round(ratio, 3),
            "torch_threads": torch.get_num_threads(),
        },
        f"soft_moa_vs_loop: one wide attention {ours * 1e3:.1f} ms vs per-expert loop "
        f"{reference * 1e3:.1f} ms (fwd+bwd, N={args.experts}): ratio {ratio:.2f}",
    )


if __name__ == "__main__":
    main()
