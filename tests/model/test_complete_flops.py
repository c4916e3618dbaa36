"""The complete training FLOPs per token (`bam-stats --json`'s ``training_flops_per_token_with_output_layer``):
the transformer layers (Table 7's convention) plus the output layer and the embedding as Megatron-LM's
``num_floating_point_operations`` counts them. Checked by hand, and against a port of Megatron-LM's formula.

Nothing here builds a model except the CLI test (one subprocess, the tiny preset on the meta device).
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bam_megatron.model.configs import variant_config
from bam_megatron.model.statistics import (
    EMBEDDING_TRAINING_FLOPS_PER_TOKEN,
    output_layer_training_flops,
    training_flops_breakdown,
)
from bam_megatron.model.variants import PRESETS
from tests.support import paths

VOCAB = 256_000  # the paper presets' (padded) vocabulary: 2,000 x 128


def test_complete_count_by_hand():
    # paper-590m (d 1024, 6 layers, 8 heads of 128, no GQA, SwiGLU FFN 2048), n_ctx 2048, V 256,000.
    # Output layer, every variant: 3 (forward, weight and input gradient) x 2·d·V = 3 x 2 x 1024 x 256,000
    # = 1,572,864,000. Embedding: 0 (a gather and a scatter-add, as Megatron-LM counts it).
    output = 1_572_864_000
    assert output_layer_training_flops(1024, VOCAB) == output
    assert EMBEDDING_TRAINING_FLOPS_PER_TOKEN == 0

    # dense, per layer forward: attention 2(2·1024·1024 [Q, O] + 2·1024·1024 [K, V]) + 2·2048·1024 [context]
    # = 8,388,608 + 4,194,304 = 12,582,912; FFN 2(2·2048·1024 + 2048·1024) = 12,582,912; no router.
    # Layers: 3 x 6 x 25,165,824 = 452,984,832. Complete: 452,984,832 + 1,572,864,000 = 2,025,848,832.
    dense = training_flops_breakdown(variant_config("dense", "paper-590m"), 2048, VOCAB)
    assert dense == {"layers": 452_984_832, "output_layer": output, "embedding": 0, "total": 2_025_848_832}

    # btx (E 4, top-1): dense's attention and one expert's FFN, plus the FFN router 2·4·1024 = 8,192:
    # 25,174,016 per layer; layers 3 x 6 x 25,174,016 = 453,132,288; complete 2,025,996,288.
    btx = training_flops_breakdown(variant_config("btx", "paper-590m"), 2048, VOCAB)
    assert (btx["layers"], btx["total"]) == (453_132_288, 2_025_996_288)

    # bam (N 4, expert KV, top-1): attention 4 x 12,582,912 = 50,331,648, FFN 12,582,912, routers
    # 2(4 + 4)·1024 = 16,384: 62,930,944 per layer; layers 3 x 6 x 62,930,944 = 1,132,756,992;
    # complete 1,132,756,992 + 1,572,864,000 = 2,705,620,992.
    bam = training_flops_breakdown(variant_config("bam", "paper-590m"), 2048, VOCAB)
    assert (bam["layers"], bam["total"]) == (1_132_756_992, 2_705_620_992)
    # BAM over BTX: 2.50 x in the layers alone, 1.34 x in the complete count (docs/design.md §6)
    assert round(bam["layers"] / btx["layers"], 2) == 2.5
    assert round(bam["total"] / btx["total"], 2) == 1.34

    # paper-2b dense ties the output layer to the embedding: it is counted all the same,
    # 3 x 2 x 2304 x 256,000 = 3,538,944,000.
    tied = training_flops_breakdown(variant_config("dense", "paper-2b"), 2048, VOCAB)
    assert tied["output_layer"] == 3_538_944_000 and tied["total"] == tied["layers"] + 3_538_944_000


def megatron_num_floating_point_operations(args, batch_size: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py, core_v0.16.1),
    ``transformer_flops``' path for an MHA/GQA transformer without MLA, MTP, linear attention, shared
    experts, an attention output gate or a hybrid layout: its terms and factors verbatim."""
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.num_experts is None:
        num_dense_layers, num_moe_layers, num_experts_routed_to = args.num_layers, 0, 0
    else:
        moe_layer_pattern = [1 if (i % args.moe_layer_freq == 0) else 0 for i in range(args.num_layers)]
        num_moe_layers = sum(moe_layer_pattern)
        num_dense_layers = args.num_layers - num_moe_layers
        num_experts_routed_to = args.moe_router_topk
    num_layers = args.num_layers
    moe_ffn_hidden_size = args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None else args.ffn_hidden_size
    shared_expert_ffn_hidden_size = 0
    forward_backward_expansion_factor = 3
    fma_expansion_factor = 2
    ffn_expansion_factor = 3 if args.swiglu else 2
    query_projection_size = args.kv_channels * args.num_attention_heads
    key_projection_size = args.kv_channels * args.num_query_groups
    value_projection_size = args.kv_channels * args.num_query_groups
    standard_self_attn_term = (
        forward_backward_expansion_factor
        * fma_expansion_factor
        * (
            args.hidden_size * (query_projection_size + key_projection_size + value_projection_size)
            + query_projection_size * args.seq_length / 2 * 2  # causal half; QK^T and (QK^T)V
            + query_projection_size * args.hidden_size
        )
    )
    self_attn_term = standard_self_attn_term * num_layers
    return (
        batch_size
        * args.seq_length
        * (
            forward_backward_expansion_factor
            * fma_expansion_factor
            * args.hidden_size
            * (
                (args.ffn_hidden_size * ffn_expansion_factor) * num_dense_layers
                + (moe_ffn_hidden_size * num_experts_routed_to * ffn_expansion_factor) * num_moe_layers
                + (shared_expert_ffn_hidden_size * ffn_expansion_factor) * num_moe_layers
            )
            + self_attn_term
            # Logit. (no embedding term: see EMBEDDING_TRAINING_FLOPS_PER_TOKEN)
            + forward_backward_expansion_factor * fma_expansion_factor * args.hidden_size * args.padded_vocab_size
        )
    )


def _megatron_args(config, seq_length: int, padded_vocab_size: int) -> SimpleNamespace:
    """The Megatron-LM arguments of ``config`` that the formula reads."""
    return SimpleNamespace(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        kv_channels=config.kv_channels,
        ffn_hidden_size=config.ffn_hidden_size,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        num_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_layer_freq=1,
        swiglu=config.gated_linear_unit,
        seq_length=seq_length,
        padded_vocab_size=padded_vocab_size,
    )


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("seq_length", [128, 2048])
def test_dense_complete_count_is_megatron_lms(preset, seq_length):
    """Dense: our complete count is Megatron-LM's, exactly (paper-2b checks GQA, paper-590m MHA)."""
    config = variant_config("dense", preset)
    vocab = PRESETS[preset].vocab_size
    batch = 4
    megatron = megatron_num_floating_point_operations(_megatron_args(config, seq_length, vocab), batch)
    assert training_flops_breakdown(config, seq_length, vocab)["total"] == megatron / (batch * seq_length)


def test_btx_complete_count_is_megatron_lms_plus_the_router():
    """BTX: Megatron-LM leaves the FFN router out; ours counts its 3 x 2·E·d per layer, nothing else differs."""
    config = variant_config("btx", "paper-590m", num_experts=4, moe_router_topk=2)
    megatron = megatron_num_floating_point_operations(_megatron_args(config, 2048, VOCAB), 1) / 2048
    router = 6 * 3 * 2 * 4 * 1024  # layers x 3 x 2·E·d = 147,456
    assert training_flops_breakdown(config, 2048, VOCAB)["total"] == megatron + router


def test_bench_uses_the_statistics_formula():
    from bench.gpu import measure

    assert measure.output_layer_training_flops is output_layer_training_flops


def test_bam_stats_json_has_the_complete_count():
    result = subprocess.run(
        [sys.executable, "-m", "bam_megatron.stats", "--preset", "tiny", "--variant", "bam", "--json"],
        capture_output=True,
        text=True,
        cwd=paths.REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    # tiny: d 64, V 512: 3 x 2 x 64 x 512 = 196,608
    assert stats["padded_vocab_size"] == 512
    assert stats["training_flops_per_token_output_layer"] == 196_608
    assert stats["training_flops_per_token_embedding"] == 0
    assert stats["training_flops_per_token"] == 3 * 2 * stats["flops_per_token"]["total"]  # layers: kept as it was
    assert stats["training_flops_per_token_with_output_layer"] == stats["training_flops_per_token"] + 196_608
    assert "num_floating_point_operations" in stats["flops_convention"]
