"""Soft MoA against its definition: identical experts give the dense attention, and a naive
loop over N separate dense attentions (the oracle) gives the same output and gradients for
random experts, in every variant (expert KV, shared KV, top-k)."""

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from bam_megatron.model.configs import variant_config
from bam_megatron.model.qkv_layout import merge_qkv, soft_moa_attention_weights, split_qkv
from bam_megatron.model.soft_moa import head_to_expert, wide_head_sources
from bam_megatron.model.specs import get_bam_layer_spec
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.distributed import run_distributed

N, SEQ, BATCH = 3, 12, 2


def _attention(config):
    spec = get_bam_layer_spec(config, backend="local").submodules.self_attention
    return build_module(spec, config=config, layer_number=1)


def soft_moa_against_oracle(kv_mode: str, topk, identical: bool):
    """Rank body: max |soft MoA - oracle| for the output and for each gradient."""
    initialize(ParallelSizes(), seed=3)
    variant = "bam-shared-kv" if kv_mode == "shared" else "bam"
    common = dict(preset="tiny", use_cpu_initialization=True)
    dense_cfg = variant_config("dense", fuse_tp_reduction=False, **common)
    moa_cfg = variant_config(variant, num_experts=N, attention_router_topk=topk, **common)
    experts = [_attention(dense_cfg) for _ in range(N)]
    heads, groups = dense_cfg.num_attention_heads, dense_cfg.num_query_groups
    with torch.no_grad():
        if identical:
            for e in experts[1:]:
                e.load_state_dict(experts[0].state_dict())
        if kv_mode == "shared":  # the oracle's experts really share K and V
            splits = [split_qkv(e.linear_qkv.weight, heads, groups) for e in experts]
            k = torch.stack([s[1] for s in splits]).mean(0)
            v = torch.stack([s[2] for s in splits]).mean(0)
            for e, (q, _, _) in zip(experts, splits):
                e.linear_qkv.weight.copy_(merge_qkv(q, k, v))

    moa = _attention(moa_cfg)
    with torch.no_grad():
        qkv, proj = soft_moa_attention_weights(
            [e.linear_qkv.weight for e in experts], [e.linear_proj.weight for e in experts], moa_cfg
        )
        moa.linear_qkv.weight.copy_(qkv)
        moa.linear_proj.weight.copy_(proj)
        moa.router.weight.normal_(0, 1.0)  # sharp gates, so a wrong expert order shows

    rope = RotaryEmbedding(kv_channels=dense_cfg.kv_channels, rotary_percent=1.0)(SEQ)
    x = torch.randn(SEQ, BATCH, dense_cfg.hidden_size, requires_grad=True)
    upstream = torch.randn(SEQ, BATCH, dense_cfg.hidden_size)

    out, _ = moa(x, None, rotary_pos_emb=rope)
    (out * upstream).sum().backward()

    # Oracle: N separate attentions, gates computed here from the same router weight.
    x_ref = x.detach().clone().requires_grad_(True)
    router = moa.router.weight.detach().clone().requires_grad_(True)
    gates = torch.softmax((x_ref @ router.t()).float(), dim=-1)
    if topk is not None:
        top, index = gates.topk(topk, dim=-1)
        gates = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
    if identical:
        reference = experts[0](x_ref, None, rotary_pos_emb=rope)[0]
    else:
        reference = sum(gates[..., j : j + 1] * experts[j](x_ref, None, rotary_pos_emb=rope)[0] for j in range(N))
    (reference * upstream).sum().backward()

    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    result = {"output": diff(out, reference), "input_grad": diff(x.grad, x_ref.grad)}
    if not identical:
        result["router_grad"] = diff(moa.router.weight.grad, router.grad)
        result["router_grad_norm"] = router.grad.norm().item()
    return result


@pytest.mark.parametrize("kv_mode", ["expert", "shared"])
def test_identical_experts_equal_the_dense_attention(kv_mode):
    (result,) = run_distributed(soft_moa_against_oracle, 1, args=(kv_mode, None, True))
    assert result["output"] < 1e-5 and result["input_grad"] < 1e-5, result


@pytest.mark.parametrize(
    "kv_mode,topk", [("expert", None), ("shared", None), ("expert", 1), ("expert", 2), ("shared", 2)]
)
def test_random_experts_match_a_loop_over_experts(kv_mode, topk):
    (result,) = run_distributed(soft_moa_against_oracle, 1, args=(kv_mode, topk, False))
    assert result["output"] < 1e-5 and result["input_grad"] < 1e-5, result
    if topk == 1:  # a renormalised top-1 gate is constant (1.0): no gradient reaches the router
        assert result["router_grad_norm"] < 1e-6
    else:  # the gates reach the router's gradient
        assert result["router_grad_norm"] > 1e-3
        assert result["router_grad"] < 1e-5, result


def test_shared_kv_head_order_groups_each_kv_heads_contiguously():
    cfg = variant_config("bam-shared-kv", preset="tiny", num_experts=2)  # H=4, G=2
    sources = wide_head_sources(cfg).tolist()
    # group 0: expert 0 heads 0-1, expert 1 heads 0-1; group 1: expert 0 heads 2-3, expert 1 heads 2-3
    assert sources == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert head_to_expert(variant_config("bam", preset="tiny", num_experts=2)).tolist() == [0] * 4 + [1] * 4


def test_qkv_split_and_merge_are_inverse():
    weight = torch.randn((8 + 2 * 2) * 16, 64)
    assert torch.equal(merge_qkv(*split_qkv(weight, heads=8, groups=2)), weight)
