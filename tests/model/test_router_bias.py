"""The routers' per-expert bias (``router_bias``): forward and backward of both routers against their
formula, the offset that zeroes a gate, the per-growth expert groups, gradients under TP+SP and EP
equal to one rank's, and checkpoints saved under one layout loaded under another."""

from __future__ import annotations

import pytest
import torch

from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble
from tests.support.tiny_gpt import gradient_step

N, SEQ, BATCH = 4, 8, 2


def _routers(variant: str = "bam"):
    """Rank body helper: (attention router, FFN router) of a tiny biased BAM layer, random bias."""
    from megatron.core.transformer.spec_utils import build_module

    from bam_megatron.model.configs import variant_config
    from bam_megatron.model.specs import get_bam_layer_spec
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(), seed=5)
    config = variant_config(
        variant, preset="tiny", num_experts=N, router_bias=True, use_cpu_initialization=True, moe_aux_loss_coeff=0.0
    )
    layer = build_module(get_bam_layer_spec(config, backend="local"), config=config, layer_number=1)
    attention = layer.self_attention.router if variant != "btx" else None
    ffn = layer.mlp.router
    with torch.no_grad():
        for router in (attention, ffn):
            if router is not None:
                router.weight.normal_(0, 0.5)
                router.bias.normal_(0, 1.0)
    return attention, ffn, config


def _router_formula() -> dict:
    """Rank body: both routers' logits / gates and bias gradients against softmax(W x + b)."""
    from bam_megatron.model.router_ramp import set_offsets

    attention, ffn, config = _routers()
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    upstream = torch.randn(SEQ, BATCH, N)
    out = {}
    for name, router in (("attention", attention), ("ffn", ffn)):
        w, b = router.weight.detach().clone().requires_grad_(), router.bias.detach().clone().requires_grad_()
        expected = torch.softmax(x @ w.t() + b, dim=-1)
        got = attention(x) if name == "attention" else torch.softmax(ffn.gating(x), dim=-1)
        (expected * upstream).sum().backward()
        (got * upstream).sum().backward()
        out[name] = {
            "gates": (got.detach(), expected.detach()),
            "bias_grad": (router.bias.grad.clone(), b.grad),
            "weight_grad": (router.weight.grad.clone(), w.grad),
            "persistent": sorted(router.state_dict()),
        }
        # an offset of -1024 on expert 0: its gate is exactly 0, and so is its bias's gradient
        router.bias.grad, router.weight.grad = None, None
        set_offsets(router, [-1024.0, 0.0, 0.0, 0.0])
        gated = attention(x) if name == "attention" else torch.softmax(ffn.gating(x), dim=-1)
        (gated * upstream).sum().backward()
        out[name]["zeroed"] = (gated.detach()[..., 0], router.bias.grad.clone())
        set_offsets(router, [0.0] * N)
    return out


def test_both_routers_compute_softmax_of_wx_plus_b_and_its_gradient():
    (out,) = run_distributed(_router_formula, 1)
    for name in ("attention", "ffn"):
        r = out[name]
        for what in ("gates", "bias_grad", "weight_grad"):
            got, expected = r[what]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{name} {what}")
        assert r["bias_grad"][0].abs().min() > 0, name  # every expert's bias learns
        # the bias is saved with the weight; the offset buffer is not
        assert [k for k in r["persistent"] if not k.startswith("_")] == ["bias", "weight"], r["persistent"]
        zeroed_gate, zeroed_grad = r["zeroed"]
        assert torch.equal(zeroed_gate, torch.zeros_like(zeroed_gate)), name
        assert zeroed_grad[0] == 0 and zeroed_grad[1:].abs().min() > 0, name


def _groups_and_zero_bias() -> dict:
    """Rank body: logits of an unbiased router vs a biased one with zero bias, both over the same
    rows, with and without expert groups (the old experts' rows as one GEMM)."""
    from bam_megatron.model.router import grouped_logits

    torch.manual_seed(0)
    x, w = torch.randn(64, 32), torch.randn(N, 32)
    old = x @ w[:3].t()  # a 3-expert mixture's GEMM
    grown_grouped = grouped_logits(torch.nn.functional.linear, x, w, (3, 1))
    return {"grouped": torch.equal(grown_grouped[:, :3], old), "shapes": tuple(grown_grouped.shape)}


def test_expert_groups_keep_the_old_experts_gemm():
    (out,) = run_distributed(_groups_and_zero_bias, 1)
    assert out["grouped"] and out["shapes"] == (64, N)


def test_router_bias_is_refused_on_dense():
    from bam_megatron.errors import ConfigError
    from bam_megatron.model.architecture import Architecture

    with pytest.raises(ConfigError, match="--router-bias: a dense model has no router"):
        Architecture("dense", 2, 32, 64, 4, 2, 128, router_bias=True)


def _gradients(sizes: ParallelSizes, variant: str, full_weights=None):
    return gradient_step(sizes, variant, full_weights, 2, None, {"router_bias": True})


@pytest.mark.parametrize("variant", ["bam", "btx"])
@pytest.mark.parametrize(
    "sizes", [ParallelSizes(tensor=2, sequence_parallel=True), ParallelSizes(expert=2)], ids=["tp2-sp", "ep2"]
)
def test_bias_gradients_under_tp_sp_and_ep_equal_one_ranks(variant, sizes):
    """The biases' gradients are summed over the TP group under SP (``sequence_parallel``) and
    reduced over data-parallel ranks like the router weights': a partial sum would differ."""
    (serial,) = run_distributed(_gradients, 1, args=(ParallelSizes(), variant))
    results = run_distributed(_gradients, 2, args=(sizes, variant, assemble([serial["weights"]])))
    ref, grads = assemble([serial["grads"]]), assemble([r["grads"] for r in results])
    biases = [k for k in ref if k.endswith("router.bias")]
    assert len(biases) == (2 if variant == "bam" else 1), biases  # both routers (layers stacked)
    for key in biases:
        assert ref[key].abs().max() > 0, key
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-7, msg=key)


def _save_biased(directory: str) -> dict[str, torch.Tensor]:
    """Rank body: a tiny biased BAM (random biases) saved at TP = EP = 1; its biases."""
    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(), seed=3)
    architecture = Architecture("bam", 2, 32, 64, 4, 2, 128, num_experts=N, router_bias=True)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), SEQ)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.bias"):
                param.normal_(0, 1.0)
    store.save_checkpoint(directory, 0, model, None, None, CheckpointMeta(architecture, SEQ))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("router.bias")}


def _load_biases(directory: str, sizes: ParallelSizes) -> dict[str, torch.Tensor]:
    from bam_megatron.checkpoint import store
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(sizes)
    path = store.resolve_checkpoint(directory)
    model = load_model(path, None, sizes.tensor, 1, sizes.expert, sizes.sequence_parallel)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("router.bias")}


@pytest.mark.parametrize(
    "sizes", [ParallelSizes(tensor=2, sequence_parallel=True), ParallelSizes(expert=2)], ids=["tp2-sp", "ep2"]
)
def test_biases_saved_at_one_layout_load_at_another(tmp_path, sizes):
    (saved,) = run_distributed(_save_biased, 1, args=(str(tmp_path / "ckpt"),))
    assert len(saved) == 4 and all(t.abs().max() > 0 for t in saved.values())
    for rank in run_distributed(_load_biases, 2, args=(str(tmp_path / "ckpt"), sizes)):
        assert rank.keys() == saved.keys()
        for name, bias in rank.items():  # replicated: every rank holds all of it
            assert torch.equal(bias, saved[name]), name


def test_the_ramp_is_a_function_of_the_iteration_and_goes_on_after_a_weights_only_start():
    from bam_megatron.model.router_ramp import RouterRamp, folded_bias, ramp_of, restarted_lineage

    ramp = RouterRamp((2,), (2, 1), start_offset=16.0, iters=4)
    assert [ramp.offset(t) for t in range(6)] == [-1024.0, -12.0, -8.0, -4.0, 0.0, 0.0]
    assert ramp.offsets(1, 3) == [0.0, 0.0, -12.0] and not ramp.done(3) and ramp.done(4)
    assert [RouterRamp((0,), iters=0).offset(t) for t in range(3)] == [-1024.0, 0.0, 0.0]  # exact step 0 only
    lineage = {"grown": [{"expert_names": ["a", "b", "c"], "router_ramp": ramp.to_dict()}]}
    assert ramp_of(lineage) == ramp
    # a run from the weights of iteration 2 counts from 0 again: its iteration 0 is the ramp's t = 2
    moved = ramp_of(restarted_lineage(lineage, 2))
    assert moved.offset(0) == ramp.offset(2) and moved.offset(2) == 0.0
    assert ramp_of(lineage).origin == 0  # the checkpoint's own record is untouched
    bias = torch.tensor([0.5, -0.25, 0.0])
    assert torch.equal(folded_bias(bias, lineage, 1), torch.tensor([0.5, -0.25, -12.0]))
