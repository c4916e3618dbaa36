"""The parallel attention + FFN block: its equation, its single fused TP reduction, and the
per-layer router losses of the MoE FFN."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import build_module

from bam_megatron.model.builder import build_model
from bam_megatron.model.configs import variant_config
from bam_megatron.model.moe_metrics import moe_aux_losses
from bam_megatron.model.parallel_block import ParallelTransformerLayer
from bam_megatron.model.specs import get_bam_layer_spec
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.distributed import run_distributed
from tests.support.tiny_gpt import SEQ, VOCAB, bam_config, micro_batches


def block_against_reference():
    """Rank body: the layer's output against y = x + Attn(RMSNorm(x)) + SwiGLU(RMSNorm(x))."""
    initialize(ParallelSizes(), seed=11)
    config = variant_config("dense", preset="tiny", use_cpu_initialization=True)
    layer = build_module(get_bam_layer_spec(config, backend="local"), config=config, layer_number=1)
    assert isinstance(layer, ParallelTransformerLayer) and isinstance(layer.pre_mlp_layernorm, IdentityOp)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)  # not all ones, so the norm's weight matters

    x = torch.randn(SEQ, 2, config.hidden_size)
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0)(SEQ)
    out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)

    norm = layer.input_layernorm
    normed = F.rms_norm(x, (config.hidden_size,), norm.weight, norm.eps)  # one shared pre-norm
    attention, _ = layer.self_attention(normed, None, rotary_pos_emb=rope)
    gate, up = (normed @ layer.mlp.linear_fc1.weight.t()).chunk(2, dim=-1)
    ffn = (F.silu(gate) * up) @ layer.mlp.linear_fc2.weight.t()
    return (out - (x + attention + ffn)).abs().max().item()


def test_parallel_block_follows_its_equation():
    (diff,) = run_distributed(block_against_reference, 1)
    assert diff < 1e-5


def count_tp_reductions(fuse: bool) -> int:
    """Rank body (TP=2): all-reduces issued by one forward pass of the dense model."""
    sizes = ParallelSizes(tensor=2)
    initialize(sizes, seed=1)
    model = build_model(bam_config(sizes, "dense", fuse_tp_reduction=fuse), VOCAB, SEQ)
    tokens, labels = micro_batches(1)[0]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    calls = 0
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        model(tokens, positions, None, labels=labels)
    finally:
        dist.all_reduce = original
    return calls


def test_fused_block_reduces_once_per_layer():
    fused, _ = run_distributed(count_tp_reductions, 2, args=(True,))
    unfused, _ = run_distributed(count_tp_reductions, 2, args=(False,))
    num_layers = variant_config("dense", preset="tiny").num_layers
    assert unfused - fused == num_layers


def router_losses_after_forward():
    sizes = ParallelSizes()
    initialize(sizes, seed=2)
    config = variant_config(
        "bam", preset="tiny", use_cpu_initialization=True, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3
    )
    model = build_model(config, VOCAB, SEQ)
    tokens, labels = micro_batches(1)[0]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    model(tokens, positions, None, labels=labels).mean().backward()
    first = moe_aux_losses()
    second = moe_aux_losses()  # reset after reading
    return config.num_layers, first, second


def test_moe_router_losses_are_reported_per_layer():
    ((num_layers, losses, after_reset),) = run_distributed(router_losses_after_forward, 1)
    assert set(losses) == {"load_balancing_loss", "z_loss"}
    for name, per_layer in losses.items():
        assert len(per_layer) == num_layers
        assert all(value > 0 for value in per_layer), (name, per_layer)
    assert all(value == 0 for per_layer in after_reset.values() for value in per_layer)
