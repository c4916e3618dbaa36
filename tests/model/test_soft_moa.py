"""Soft MoA against its definition: identical experts give the dense attention, and a naive
loop over N separate dense attentions (the oracle) gives the same output and gradients for
random experts, in every variant (expert KV, shared KV, top-k)."""

from typing import Optional

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import build_module

from bam_megatron.model.configs import variant_config
from bam_megatron.model.qkv_layout import (
    merge_qkv,
    soft_moa_attention_weights,
    soft_moa_qk_norms,
    soft_moa_qkv,
    split_qkv,
)
from bam_megatron.model.soft_moa import head_to_expert, wide_head_sources
from bam_megatron.model.specs import get_bam_layer_spec
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.distributed import run_distributed

N, SEQ, BATCH = 3, 12, 2


def _attention(config):
    spec = get_bam_layer_spec(config, backend="local").submodules.self_attention
    return build_module(spec, config=config, layer_number=1)


def _share_kv(experts, heads: int, groups: int) -> None:
    """Give every dense expert the average of their K and V (weights and biases) and K norm."""
    tensors = ["linear_qkv.weight"] + (["linear_qkv.bias"] if experts[0].linear_qkv.bias is not None else [])
    for name in tensors:
        column = name.endswith("bias")  # a bias is a QKV weight of one column
        params = [e.get_parameter(name) for e in experts]
        splits = [split_qkv(p.unsqueeze(-1) if column else p, heads, groups) for p in params]
        k = torch.stack([s[1] for s in splits]).mean(0)
        v = torch.stack([s[2] for s in splits]).mean(0)
        for p, (q, _, _) in zip(params, splits):
            p.copy_(merge_qkv(q, k, v).view_as(p))
    if not isinstance(experts[0].k_layernorm, IdentityOp):
        k_norm = torch.stack([e.k_layernorm.weight for e in experts]).mean(0)
        for e in experts:
            e.k_layernorm.weight.copy_(k_norm)


def soft_moa_against_oracle(kv_mode: str, topk, identical: bool, qwen: Optional[dict] = None):
    """Rank body: max |soft MoA - oracle| for the output and for each gradient. ``qwen``: the
    attention settings of Qwen2 (``add_qkv_bias``) / Qwen3 (``qk_layernorm``), each expert with
    its own random biases and norms."""
    initialize(ParallelSizes(), seed=3)
    variant = "bam-shared-kv" if kv_mode == "shared" else "bam"
    common = dict(preset="tiny", use_cpu_initialization=True, **(qwen or {}))
    dense_cfg = variant_config("dense", fuse_tp_reduction=False, **common)
    moa_cfg = variant_config(variant, num_experts=N, attention_router_topk=topk, **common)
    experts = [_attention(dense_cfg) for _ in range(N)]
    heads, groups = dense_cfg.num_attention_heads, dense_cfg.num_query_groups
    with torch.no_grad():
        for e in experts:  # biases and norms far from their initial 0 and 1, different per expert
            for name, param in e.named_parameters():
                if name.endswith("bias") or "layernorm" in name:
                    param.copy_(torch.randn_like(param) * 0.5 + (1.0 if "layernorm" in name else 0.0))
        if identical:
            for e in experts[1:]:
                e.load_state_dict(experts[0].state_dict())
        if kv_mode == "shared":  # the oracle's experts really share K and V
            _share_kv(experts, heads, groups)

    moa = _attention(moa_cfg)
    with torch.no_grad():
        qkv, proj = soft_moa_attention_weights(
            [e.linear_qkv.weight for e in experts], [e.linear_proj.weight for e in experts], moa_cfg
        )
        moa.linear_qkv.weight.copy_(qkv)
        moa.linear_proj.weight.copy_(proj)
        if moa_cfg.add_qkv_bias:
            biases = [e.linear_qkv.bias.unsqueeze(-1) for e in experts]
            moa.linear_qkv.bias.copy_(soft_moa_qkv(biases, moa_cfg).squeeze(-1))
        if moa_cfg.qk_layernorm:
            q_norm, k_norm = soft_moa_qk_norms(
                [e.q_layernorm.weight for e in experts], [e.k_layernorm.weight for e in experts], moa_cfg
            )
            moa.q_layernorm.weight.copy_(q_norm)
            moa.k_layernorm.weight.copy_(k_norm)
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
    if moa_cfg.qk_layernorm:  # each expert's norm rows get its own experts' gradient
        q_grad = torch.stack([e.q_layernorm.weight.grad for e in experts])
        result["q_norm_grad"] = diff(moa.q_layernorm.weight.grad, q_grad)
        k_grad = torch.stack([e.k_layernorm.weight.grad for e in experts])
        result["k_norm_grad"] = diff(moa.k_layernorm.weight.grad, k_grad if kv_mode == "expert" else k_grad.sum(0))
        result["norm_grad_scale"] = q_grad.abs().max().item()
    if moa_cfg.add_qkv_bias:  # the oracle's experts' bias gradients, laid out as the wide bias
        grads = [e.linear_qkv.bias.grad.unsqueeze(-1) for e in experts]
        if kv_mode == "shared":  # the shared K/V bias gets every expert's gradient: their sum
            splits = [split_qkv(g, heads, groups) for g in grads]
            summed = (sum(s[1] for s in splits), sum(s[2] for s in splits))
            wide = soft_moa_qkv(grads, moa_cfg, summed)
        else:
            wide = soft_moa_qkv(grads, moa_cfg)
        result["bias_grad"] = diff(moa.linear_qkv.bias.grad, wide.squeeze(-1))
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


QWEN2, QWEN3 = {"add_qkv_bias": True}, {"qk_layernorm": True, "kv_channels": 24}


@pytest.mark.parametrize("qwen", [QWEN2, QWEN3], ids=["qkv-bias", "qk-norm"])
@pytest.mark.parametrize("kv_mode", ["expert", "shared"])
def test_each_expert_s_qkv_biases_and_qk_norms_match_a_loop_over_experts(kv_mode, qwen):
    """Soft MoA of Qwen2/Qwen3-style experts (each with its own QKV biases / Q and K norms; shared KV:
    the averaged K/V biases and K norm) is the gated sum of the experts, with their gradients."""
    (result,) = run_distributed(soft_moa_against_oracle, 1, args=(kv_mode, None, False, qwen))
    assert result["output"] < 1e-5 and result["input_grad"] < 1e-5 and result["router_grad"] < 1e-5, result
    for key in ("q_norm_grad", "k_norm_grad", "bias_grad"):
        assert result.get(key, 0.0) < 1e-5, result
    if qwen is QWEN3:
        assert result["norm_grad_scale"] > 1e-3, result


def test_shared_kv_head_order_groups_each_kv_heads_contiguously():
    cfg = variant_config("bam-shared-kv", preset="tiny", num_experts=2)  # H=4, G=2
    sources = wide_head_sources(cfg).tolist()
    # group 0: expert 0 heads 0-1, expert 1 heads 0-1; group 1: expert 0 heads 2-3, expert 1 heads 2-3
    assert sources == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert head_to_expert(variant_config("bam", preset="tiny", num_experts=2)).tolist() == [0] * 4 + [1] * 4


def test_qkv_split_and_merge_are_inverse():
    weight = torch.randn((8 + 2 * 2) * 16, 64)
    assert torch.equal(merge_qkv(*split_qkv(weight, heads=8, groups=2)), weight)


QWEN = {"block_type": "sequential", "qk_layernorm": True, "add_qkv_bias": True, "kv_channels": 24}


def _qwen_weights(variant: str) -> dict[str, torch.Tensor]:
    """Rank body: the full weights of a one-rank tiny Qwen-style BAM with random per-expert QKV biases
    and Q/K norms (initialised they would be 0 and 1: every row alike, a wrong row would not show)."""
    from bam_megatron.testing.shards import assemble, local_shards
    from tests.support.tiny_gpt import build

    _, ddp = build(ParallelSizes(), variant, overrides=QWEN)
    with torch.no_grad():
        for name, param in ddp.module.named_parameters():
            if name.endswith("linear_qkv.bias") or "layernorm" in name:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if "layernorm" in name else 0.0))
    return assemble([local_shards(ddp.module)])


@pytest.mark.parametrize("variant", ["bam", "bam-shared-kv"])
@pytest.mark.parametrize(
    "sizes", [ParallelSizes(tensor=2, sequence_parallel=True), ParallelSizes(expert=2)], ids=["tp2-sp", "ep2"]
)
def test_per_expert_qkv_biases_and_qk_norms_under_tp_and_ep_equal_one_rank(variant, sizes):
    """Loss and every gradient, the per-expert norm rows and wide bias included, as on one rank: each TP
    rank applies its own heads' rows, and finalize_model_grads sums the norms' gradients over TP."""
    from bam_megatron.testing.shards import assemble
    from tests.support.tiny_gpt import gradient_step

    (weights,) = run_distributed(_qwen_weights, 1, args=(variant,))
    assert weights["decoder.layers.self_attention.q_layernorm.weight"].shape[1:] == (4, 24)  # [layers, N, d]
    (serial,) = run_distributed(gradient_step, 1, args=(ParallelSizes(), variant, weights, 2, None, QWEN))
    results = run_distributed(gradient_step, 2, args=(sizes, variant, weights, 2, None, QWEN))
    ref, grads = assemble([serial["grads"]]), assemble([r["grads"] for r in results])
    assert results[0]["loss"] == pytest.approx(serial["loss"], rel=1e-6)
    assert grads.keys() == ref.keys()
    for key in ("q_layernorm.weight", "k_layernorm.weight", "linear_qkv.bias"):
        assert ref[f"decoder.layers.self_attention.{key}"].abs().min() > 0, key  # every row gets a gradient
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref[key], rtol=1e-4, atol=1e-6, msg=key)


def _save_qwen(directory: str, variant: str) -> dict[str, torch.Tensor]:
    """Rank body: a tiny Qwen-style BAM with random per-expert norms and biases saved at TP = EP = 1;
    its attention's norms and biases."""
    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_from_architecture

    initialize(ParallelSizes(), seed=3)
    architecture = Architecture(variant, 2, 64, 96, 4, 2, 128, num_experts=N, **QWEN)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), SEQ)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("linear_qkv.bias") or "layernorm" in name:
                param.normal_(0, 1.0)
    store.save_checkpoint(directory, 0, model, None, None, CheckpointMeta(architecture, SEQ))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n or n.endswith(".bias")}


def _load_qwen(directory: str, sizes: ParallelSizes) -> dict[str, torch.Tensor]:
    from bam_megatron.checkpoint import store
    from bam_megatron.checkpoint.models import load_model

    initialize(sizes)
    model = load_model(
        store.resolve_checkpoint(directory), None, sizes.tensor, 1, sizes.expert, sizes.sequence_parallel
    )
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n or n.endswith(".bias")}


@pytest.mark.parametrize("variant", ["bam", "bam-shared-kv"])
def test_per_expert_norms_and_biases_saved_at_one_rank_load_at_tp2(tmp_path, variant):
    """dist_checkpointing: the norms are replicated over TP (every rank holds all N rows), the wide
    bias split by heads as the QKV weight."""
    (saved,) = run_distributed(_save_qwen, 1, args=(str(tmp_path / "ckpt"), variant))
    assert saved["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (N, 24)
    for rank, loaded in enumerate(run_distributed(_load_qwen, 2, args=(str(tmp_path / "ckpt"), ParallelSizes(2)))):
        assert loaded.keys() == saved.keys()
        for name, tensor in loaded.items():
            if name.endswith("linear_qkv.bias"):  # this rank's half of the groups
                assert torch.equal(tensor, saved[name].chunk(2)[rank]), name
            else:
                assert torch.equal(tensor, saved[name]), name
