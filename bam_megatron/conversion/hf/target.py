"""What every export target shares: the `Target` interface and the tensor mappings they build on.

A `Target` is one ``bam-convert-hf export --format``: a transformers class, whether it computes a
model exactly (`Target.why_not`), its config.json and the mapping of one unit of our model
(``TOP``: embedding, final norm, output layer; or a layer) to its tensors. The mappings work on
tensors of any device, so run on a meta-device model they give the export's plan (every tensor's
name and shape) before a weight is read. The native classes are `bridge.TableTarget`s, each
family's table next to its import (`llama`, `cohere`, `moe`, `phi3`; registered in `formats`);
the remote code is `bam_format`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from bam_megatron.conversion.hf.importer import MEGATRON_LLAMA3_ROPE as LLAMA3
from bam_megatron.conversion.hf.importer import TOP  # noqa: F401  (bam_format reads it here)
from bam_megatron.model.architecture import Architecture
from bam_megatron.model.configs import gelu_tanh
from bam_megatron.model.qkv_layout import split_qkv  # noqa: F401  (bam_format reads it here)


def _shown(value: Any) -> Any:
    return getattr(value, "__name__", value)


def common_checks(config) -> Optional[str]:
    """Settings no exported class (remote code included) computes: none of them is an Architecture
    field, so a bam-megatron model never has them; checked all the same."""
    checks = [
        ("add_bias_linear", config.add_bias_linear, False),
        ("gated_linear_unit", config.gated_linear_unit, True),
        ("rotary_interleaved", config.rotary_interleaved, False),
    ]
    if config.num_moe_experts:
        checks += [
            ("moe_router_score_function", config.moe_router_score_function, "softmax"),
            ("moe_router_enable_expert_bias", config.moe_router_enable_expert_bias, False),
            ("moe_router_num_groups", config.moe_router_num_groups, None),
            ("moe_shared_expert_intermediate_size", config.moe_shared_expert_intermediate_size, None),
            ("moe_expert_capacity_factor", config.moe_expert_capacity_factor, None),
        ]
    for name, value, wanted in checks:
        if value != wanted:
            return f"{name}={_shown(value)}: the exported classes compute {name}={_shown(wanted)} only"
    if config.activation_func not in (F.silu, gelu_tanh):  # the Architecture's `activation`
        return f"activation_func={_shown(config.activation_func)}: the exported classes compute SiLU or tanh-GELU only"
    return None


GEMMA_FIELDS = (
    "apply_layernorm_1p",
    "activation",
    "scale_embeddings",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "local_rotary_base",
)
"""Architecture fields only Gemma's layer sets (with ``norm_placement: both``)."""


def gemma_setting(a: Architecture) -> Optional[str]:
    """ "field=value" of the first Gemma setting ``a`` has, None if none: the classes other than Gemma's
    (and the remote code, so far) do not compute them."""
    from bam_megatron.model.architecture import field_default

    if a.norm_placement == "both":
        return "norm_placement=both"
    for name in GEMMA_FIELDS:
        if getattr(a, name) != field_default(name):
            return f"{name}={getattr(a, name)}"
    return None


def rope_parameters(a: Architecture) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` for megatron-core's RoPE (plain, or Llama-3 scaling)."""
    if a.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": float(a.rotary_base)}
    return {"rope_type": "llama3", "rope_theta": float(a.rotary_base), "factor": float(a.rope_scaling_factor), **LLAMA3}


def split_qkv_bias(bias: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV bias -> (Q [H·d], K [G·d], V [G·d]) (the layout of `qkv_layout.split_qkv`)."""
    per_group = heads // groups
    b = bias.view(groups, per_group + 2, -1)
    return b[:, :per_group].reshape(-1), b[:, per_group].reshape(-1), b[:, per_group + 1].reshape(-1)


class Target:
    """One export format: a transformers class, when it computes our model, its config and tensors."""

    name = ""
    architecture_class = ""
    model_type = ""
    remote_code = False

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """None if the class computes the model exactly, else the reason (one line naming the setting)."""
        raise NotImplementedError(f"{type(self).__name__} does not define why_not(): each subclass does")

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """config.json."""
        raise NotImplementedError(f"{type(self).__name__} does not define hf_config(): each subclass does")

    def decoder_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """The config.json fields the native decoder classes spell alike: class, sizes, SiLU, the recorded
        sequence length, tied embeddings, RoPE, no dropout, initialisation, the cache and the token ids
        (each family's `hf_config` adds its own)."""
        return {
            "architectures": [self.architecture_class],
            "model_type": self.model_type,
            "vocab_size": a.padded_vocab_size,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.ffn_hidden_size,
            "num_hidden_layers": a.num_layers,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_query_groups,
            "hidden_act": "silu",
            "max_position_embeddings": meta.seq_length,
            "tie_word_embeddings": not a.untie_embeddings_and_output_weights,
            "rope_parameters": rope_parameters(a),
            "rope_theta": float(a.rotary_base),  # transformers 4.x's key (5.x reads rope_parameters)
            "attention_dropout": 0.0,
            "initializer_range": initializer_range(meta, config),
            "use_cache": True,
            **token_fields(token_ids),
        }

    def unit(self, unit: int, p: dict[str, torch.Tensor], a: Architecture, config) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors of unit ``unit`` (TOP or a layer) from its parameters ``p`` (our names)."""
        raise NotImplementedError(f"{type(self).__name__} does not define unit(): each subclass does")

    def copy_files(self, directory: str) -> None:
        """Files besides weights, config and tokenizer (remote code)."""

    # ----- shared mappings
    @staticmethod
    def top(p: dict[str, torch.Tensor], a: Architecture) -> dict[str, torch.Tensor]:
        """Embedding, final norm, untied output layer."""
        out = {
            "model.embed_tokens.weight": p["embedding.word_embeddings.weight"],
            "model.norm.weight": p["decoder.final_layernorm.weight"],
        }
        if a.untie_embeddings_and_output_weights:
            out["lm_head.weight"] = p["output_layer.weight"]
        return out

    @staticmethod
    def swiglu(fc1: torch.Tensor, fc2: torch.Tensor, prefix: str, names=("gate_proj", "up_proj", "down_proj")):
        """megatron-core's gated ``linear_fc1`` = [gate; up] and ``linear_fc2`` -> three projections."""
        gate, up = fc1.chunk(2, dim=0)
        return {f"{prefix}{names[0]}.weight": gate, f"{prefix}{names[1]}.weight": up, f"{prefix}{names[2]}.weight": fc2}

    @staticmethod
    def experts(p: dict[str, torch.Tensor], i: int, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(linear_fc1, linear_fc2) of every FFN expert of layer ``i``."""
        ours = f"decoder.layers.{i}.mlp.experts.local_experts."
        return [
            (p[f"{ours}{e}.linear_fc1.weight"], p[f"{ours}{e}.linear_fc2.weight"])
            for e in range(config.num_moe_experts)
        ]


def token_fields(token_ids: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids as config.json keys (None where unknown)."""
    return {key: token_ids.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def initializer_range(meta, config) -> float:
    """The init std the model was trained with (transformers' initializer_range; not used to load)."""
    return float(meta.training.get("init_method_std") or config.init_method_std)
