"""megatron-core on CPU (2 gloo ranks): TP, SP, EP and PP give one rank's loss and gradients.

The one-rank run produces the reference weights; every parallel run loads exactly those weights
through megatron-core's own sharding declarations and must reproduce loss and gradients.
"""

import pytest
import torch

from bam_megatron.model.configs import gelu_tanh
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble
from tests.support.tiny_gpt import gradient_step

MICRO_BATCHES = 4  # several, so the 1F1B pipeline schedule has a steady state


def _reference(model: str, overrides: dict) -> dict:
    (serial,) = run_distributed(gradient_step, 1, args=(ParallelSizes(), model, None, MICRO_BATCHES, None, overrides))
    return {
        "loss": serial["loss"],
        "weights": assemble([serial["weights"]]),
        "grads": assemble([serial["grads"]]),
    }


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(model: str, overrides: dict | None = None) -> dict:
        """The one-rank run of the same model and settings (cached per module)."""
        key = (model, repr(sorted((overrides or {}).items())))
        if key not in cache:
            cache[key] = _reference(model, overrides or {})
        return cache[key]

    return get


def _layout_id(sizes: ParallelSizes) -> str:
    parts = [
        f"tp{sizes.tensor}" if sizes.tensor > 1 else "",
        f"pp{sizes.pipeline}" if sizes.pipeline > 1 else "",
        f"ep{sizes.expert}" if sizes.expert > 1 else "",
        "sp" if sizes.sequence_parallel else "",
    ]
    return "-".join(p for p in parts if p) or "serial"


def assert_matches_reference(ref: dict, results: list[dict]) -> None:
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(ref["loss"], rel=1e-6)
    grads = assemble([r["grads"] for r in results])
    assert grads.keys() == ref["grads"].keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][key], rtol=1e-4, atol=1e-6, msg=key)


BAM_LAYOUTS = [
    ParallelSizes(tensor=2, sequence_parallel=True),  # megatron-core's MoE needs SP with TP
    ParallelSizes(expert=2),
    ParallelSizes(pipeline=2),
]
TP2, TP2_SP = ParallelSizes(tensor=2), ParallelSizes(tensor=2, sequence_parallel=True)
SEQUENTIAL = {"block_type": "sequential"}
QWEN = {"block_type": "sequential", "qk_layernorm": True, "add_qkv_bias": True, "kv_channels": 24}
# OLMo 2: norms after attention and FFN, Q/K RMSNorm over the whole projection (all TP ranks' heads)
OLMO2 = {"block_type": "sequential", "norm_placement": "post", "qk_layernorm": True, "qk_layernorm_scope": "projection"}
# Gemma 3: (1 + w) norms before and after, GeGLU, scaled embeddings, layer 1 local (own RoPE base), per-head
# (1 + w) Q/K norms, query_pre_attn_scalar
GEMMA3 = {
    "block_type": "sequential",
    "norm_placement": "both",
    "layernorm_zero_centered_gamma": True,
    "activation_func": gelu_tanh,
    "scale_embeddings": True,
    "qk_layernorm": True,
    "softmax_scale": 0.2,
    "local_rotary_base": 1000.0,
    "global_attention_every": 2,
}
# Gemma 2: the same layer without Q/K norms or local RoPE base, with attention and final-logit soft-capping
GEMMA2 = {
    **{k: v for k, v in GEMMA3.items() if k not in ("qk_layernorm", "local_rotary_base", "global_attention_every")},
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 3.0,
}
FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}

CASES = [
    *[(variant, sizes, {}) for variant in ("bam", "bam-shared-kv", "btx") for sizes in BAM_LAYOUTS],
    # the dense parallel block: fused single TP reduction (default) and the unfused one
    ("dense", TP2, {}),
    ("dense", TP2_SP, {}),
    ("dense", ParallelSizes(pipeline=2), {}),
    ("dense", TP2, {"fuse_tp_reduction": False}),
    ("dense", TP2_SP, {"fuse_tp_reduction": False}),
    # activation recompute: whole layers, soft-MoA core attention, the parallel block's FFN branch
    ("bam", TP2_SP, FULL_RECOMPUTE),
    ("bam", TP2_SP, {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}),
    ("dense", TP2, {"recompute_granularity": "selective", "recompute_modules": ["mlp"]}),
    # the sequential (pre-norm) block of Llama/Mistral/Qwen: every variant at every layout
    *[(variant, sizes, SEQUENTIAL) for variant in ("bam", "bam-shared-kv", "btx") for sizes in BAM_LAYOUTS],
    ("dense", TP2, SEQUENTIAL),
    ("dense", TP2_SP, SEQUENTIAL),
    ("dense", ParallelSizes(pipeline=2), SEQUENTIAL),
    # Qwen-style attention: per-head Q/K norms (their gradients summed over TP), QKV biases, head size
    # other than hidden / heads
    ("dense", TP2_SP, QWEN),
    ("btx", ParallelSizes(expert=2), QWEN),
    ("btx", TP2_SP, QWEN),
    ("dense", TP2, OLMO2),
    ("btx", TP2_SP, OLMO2),
    ("bam", TP2_SP, OLMO2),
    ("dense", TP2, GEMMA3),
    ("bam", TP2_SP, GEMMA3),
    ("dense", TP2, GEMMA2),
    # megatron-core's own GPT layer (the foundation): the megatron_core tier
    *[
        pytest.param(model, sizes, {}, marks=pytest.mark.megatron_core)
        for model, sizes in (
            ("gpt", TP2),
            ("gpt", TP2_SP),
            ("gpt", ParallelSizes(pipeline=2)),
            ("gpt-moe", TP2_SP),
            ("gpt-moe", ParallelSizes(expert=2)),
            ("gpt-moe", ParallelSizes(pipeline=2)),
        )
    ],
]


def _case_id(case) -> str:
    model, sizes, overrides = case.values if hasattr(case, "values") else case
    extra = "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in overrides.items()).replace(" ", "")
    return "-".join(part for part in (model, _layout_id(sizes), extra) if part)


@pytest.mark.parametrize("model, sizes, overrides", CASES, ids=[_case_id(case) for case in CASES])
def test_parallel_matches_one_rank(reference, model, sizes, overrides):
    ref = reference(model, overrides)
    results = run_distributed(gradient_step, 2, args=(sizes, model, ref["weights"], MICRO_BATCHES, None, overrides))
    assert_matches_reference(ref, results)


@pytest.mark.parametrize(
    "model,sizes",
    [("gpt", ParallelSizes(tensor=2)), ("gpt-moe", ParallelSizes(expert=2))],
    ids=["tp2", "ep2"],
)
def test_a_wrong_shard_is_detected(reference, model, sizes):
    """Negative control: perturb rank 1's shard of one weight and the comparison must fail."""
    ref = reference(model)
    results = run_distributed(gradient_step, 2, args=(sizes, model, ref["weights"], MICRO_BATCHES, 1))
    with pytest.raises(AssertionError):
        assert_matches_reference(ref, results)
