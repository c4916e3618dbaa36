"""Every `Architecture` field reaches the model: the megatron-core TransformerConfig that
`Architecture.model_config` builds, or (vocabulary, embedding tying) the GPTModel built from it.

The table below names, for each field, a value other than the base's and what it must set. A field
added to `Architecture` without a row here fails `test_every_field_has_a_row`."""

from __future__ import annotations

import dataclasses

import pytest

from bam_megatron.model.architecture import ARCHITECTURE_FIELDS, ARCHITECTURE_FLAGS, Architecture
from bam_megatron.model.configs import gelu_tanh

BASE = Architecture(
    variant="bam",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    padded_vocab_size=512,
    num_experts=4,
)

GEMMA3_LOCAL = BASE.replace(local_rotary_base=10000.0, global_attention_every=6)
# field -> (the architecture with it changed, {TransformerConfig attribute: the value it must hold})
CONFIG_ROWS = {
    "variant": (BASE.replace(variant="bam-shared-kv"), {"attention_kv_mode": "shared", "num_attention_experts": 4}),
    "num_layers": (BASE.replace(num_layers=4), {"num_layers": 4}),
    "hidden_size": (BASE.replace(hidden_size=128), {"hidden_size": 128}),
    "ffn_hidden_size": (BASE.replace(ffn_hidden_size=96), {"ffn_hidden_size": 96, "moe_ffn_hidden_size": 96}),
    "num_attention_heads": (BASE.replace(num_attention_heads=8), {"num_attention_heads": 8}),
    "num_query_groups": (BASE.replace(num_query_groups=4), {"num_query_groups": 4}),
    "num_experts": (BASE.replace(num_experts=2), {"num_moe_experts": 2, "num_attention_experts": 2}),
    "moe_router_topk": (BASE.replace(moe_router_topk=2), {"moe_router_topk": 2}),
    "attention_router_topk": (BASE.replace(attention_router_topk=2), {"attention_router_topk": 2}),
    "block_type": (BASE.replace(block_type="sequential"), {"block_type": "sequential"}),
    "normalization": (BASE.replace(normalization="LayerNorm"), {"normalization": "LayerNorm"}),
    "rotary_base": (BASE.replace(rotary_base=500000.0), {"rotary_base": 500000.0}),
    "kv_channels": (BASE.replace(kv_channels=32), {"kv_channels": 32}),
    "norm_epsilon": (BASE.replace(norm_epsilon=1e-6), {"layernorm_epsilon": 1e-6}),
    "add_qkv_bias": (BASE.replace(add_qkv_bias=True), {"add_qkv_bias": True}),
    "qk_layernorm": (BASE.replace(qk_layernorm=True), {"qk_layernorm": True}),
    "qk_layernorm_scope": (
        BASE.replace(qk_layernorm=True, qk_layernorm_scope="projection"),
        {"qk_layernorm_scope": "projection"},
    ),
    "norm_placement": (BASE.replace(block_type="sequential", norm_placement="post"), {"norm_placement": "post"}),
    "apply_layernorm_1p": (BASE.replace(apply_layernorm_1p=True), {"layernorm_zero_centered_gamma": True}),
    "activation": (BASE.replace(activation="geglu"), {"activation_func": gelu_tanh}),
    "scale_embeddings": (BASE.replace(scale_embeddings=True), {"scale_embeddings": True}),
    "query_pre_attn_scalar": (BASE.replace(query_pre_attn_scalar=256.0), {"softmax_scale": 0.0625}),
    "attn_logit_softcapping": (BASE.replace(attn_logit_softcapping=50.0), {"attn_logit_softcapping": 50.0}),
    "final_logit_softcapping": (BASE.replace(final_logit_softcapping=30.0), {"final_logit_softcapping": 30.0}),
    "local_rotary_base": (GEMMA3_LOCAL, {"local_rotary_base": 10000.0}),
    "global_attention_every": (GEMMA3_LOCAL, {"global_attention_every": 6}),
    "rope_scaling_factor": (BASE.replace(rope_scaling_factor=8.0), {"rope_scaling_factor": 8.0}),
    "moe_router_pre_softmax": (
        BASE.replace(moe_router_topk=2, moe_router_pre_softmax=False),
        {"moe_router_pre_softmax": False},
    ),
    "moe_router_topk_scaling_factor": (
        BASE.replace(moe_router_topk_scaling_factor=4.0),
        {"moe_router_topk_scaling_factor": 4.0},
    ),
    "router_bias": (BASE.replace(router_bias=True), {"router_bias": True}),
}
# Fields that are not TransformerConfig settings: megatron-core's GPTModel takes them as arguments.
MODEL_ROWS = ("padded_vocab_size", "untie_embeddings_and_output_weights")


def test_every_field_has_a_row():
    assert set(CONFIG_ROWS) | set(MODEL_ROWS) == set(ARCHITECTURE_FIELDS)
    assert not set(CONFIG_ROWS) & set(MODEL_ROWS)


def test_every_field_but_the_vocabulary_is_a_flag():
    assert set(ARCHITECTURE_FIELDS) - set(ARCHITECTURE_FLAGS) == {"padded_vocab_size"}


@pytest.mark.parametrize("field", sorted(CONFIG_ROWS))
def test_the_field_reaches_the_transformer_config(field):
    changed, expected = CONFIG_ROWS[field]
    changes = {name for name, _, _ in BASE.differences(changed)}
    # what a value needs: renormalising top-k > 1, post-norms the sequential block, a Q/K norm scope Q/K norms
    prerequisites = {"moe_router_topk", "block_type", "qk_layernorm", "local_rotary_base", "global_attention_every"}
    assert field in changes and changes <= {field} | prerequisites
    before, after = BASE.model_config(), changed.model_config()
    for attribute, value in expected.items():
        assert getattr(after, attribute) == value, attribute
    # the config changed with the field: it was not set some other way
    assert any(getattr(before, attribute) != value for attribute, value in expected.items())


def test_a_dropped_field_is_caught(monkeypatch):
    """The check above fails for a field model_config forgets (here: norm_epsilon)."""
    import bam_megatron.model.configs as configs

    real = configs.variant_config

    def forgetful(*args, **fields):
        fields.pop("layernorm_epsilon", None)
        return real(*args, **fields)

    monkeypatch.setattr(configs, "variant_config", forgetful)
    with pytest.raises(AssertionError):
        test_the_field_reaches_the_transformer_config("norm_epsilon")


def test_vocabulary_and_embedding_tying_reach_the_model():
    import torch

    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.stats import one_rank_parallel_state

    def built(architecture: Architecture):
        with torch.device("meta"):
            return build_from_architecture(architecture, architecture.one_rank_config(), 32, backend="local")

    with one_rank_parallel_state():
        untied = built(BASE)
        tied = built(dataclasses.replace(BASE, padded_vocab_size=640, untie_embeddings_and_output_weights=False))
    assert untied.embedding.word_embeddings.weight.shape[0] == 512
    assert tied.embedding.word_embeddings.weight.shape[0] == 640
    assert not untied.share_embeddings_and_output_weights and tied.share_embeddings_and_output_weights
    assert untied.output_layer.weight is not None and tied.output_layer.weight is None


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"norm_placement": "post"}, "--norm-placement post needs --block-type sequential"),
        ({"qk_layernorm_scope": "projection"}, "--qk-layernorm-scope projection needs --qk-layernorm"),
        ({"norm_placement": "after"}, "--norm-placement must be one of"),
        ({"local_rotary_base": 1e4}, "--local-rotary-base and --global-attention-every go together"),
    ],
)
def test_norm_settings_that_do_not_fit_are_refused(changes, flag):
    from bam_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match=flag):
        BASE.replace(**changes)
