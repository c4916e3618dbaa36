"""Any bam-megatron model -> a self-contained Hugging Face directory with its own model code.

The directory holds ``configuration_bam.py`` and ``modeling_bam.py`` (from `remote/`: torch and
transformers only) and a config.json whose ``auto_map`` points at them, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` builds the model on any machine.

Tensor names follow transformers' conventions. The soft mixture of attention is stored as the one
wide attention bam-megatron computes (``q_proj`` holds all N·H query heads in megatron-core's order,
``k_proj``/``v_proj`` its K/V heads, ``router`` the attention router); FFN experts are
``mlp.experts.{e}.{gate,up,down}_proj`` with ``mlp.router``.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch
import torch.nn.functional as F

from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.model.qkv_layout import split_qkv

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_bam.py", "modeling_bam.py")
AUTO_MAP = {"AutoConfig": "configuration_bam.BamConfig", "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}


def check_exportable(config) -> None:
    """Refuse, naming the setting, anything the remote code does not compute exactly as megatron-core."""
    checks = [
        ("block_type", config.block_type, "parallel"),
        ("add_bias_linear", config.add_bias_linear, False),
        ("gated_linear_unit", config.gated_linear_unit, True),
        ("activation_func", config.activation_func, F.silu),
        ("qk_layernorm", config.qk_layernorm, False),
        ("rotary_interleaved", config.rotary_interleaved, False),
        ("kv_channels", config.kv_channels, config.hidden_size // config.num_attention_heads),
        ("add_qkv_bias", config.add_qkv_bias, False),
        ("rope_scaling_factor", config.rope_scaling_factor, None),
    ]
    if config.num_moe_experts:
        checks += [
            ("moe_router_score_function", config.moe_router_score_function, "softmax"),
            ("moe_router_pre_softmax", config.moe_router_pre_softmax, True),
            ("moe_router_topk_scaling_factor", config.moe_router_topk_scaling_factor, None),
            ("moe_router_enable_expert_bias", config.moe_router_enable_expert_bias, False),
            ("moe_router_num_groups", config.moe_router_num_groups, None),
            ("moe_shared_expert_intermediate_size", config.moe_shared_expert_intermediate_size, None),
            ("moe_expert_capacity_factor", config.moe_expert_capacity_factor, None),
        ]
    for name, value, wanted in checks:
        if value != wanted:
            shown, need = getattr(value, "__name__", value), getattr(wanted, "__name__", wanted)
            raise ConversionError(f"{name}={shown}: the exported model code implements {name}={need} only")


def _swiglu(fc1: torch.Tensor, fc2: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)  # megatron-core's gated linear_fc1 is [gate; up]
    return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, prefix + "down_proj.weight": fc2}


def to_bam(
    weights: dict[str, torch.Tensor], config, meta: CheckpointMeta, token_ids: dict[str, Optional[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our parameters (megatron-core names) -> (tensors, config.json) of the remote-code model."""
    n = config.num_attention_experts
    wide_heads, kv_heads = n * config.num_attention_heads, config.attention_kv_groups
    tied = not meta.architecture.untie_embeddings_and_output_weights
    experts = config.num_moe_experts or 0
    out = {
        "model.embed_tokens.weight": weights["embedding.word_embeddings.weight"],
        "model.norm.weight": weights["decoder.final_layernorm.weight"],
    }
    if not tied:
        out["lm_head.weight"] = weights["output_layer.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(weights[ours + "self_attention.linear_qkv.weight"], wide_heads, kv_heads)
        out.update(
            {
                theirs + "input_layernorm.weight": weights[ours + "input_layernorm.weight"],
                theirs + "self_attn.q_proj.weight": q.reshape(-1, q.shape[-1]),
                theirs + "self_attn.k_proj.weight": k.reshape(-1, k.shape[-1]),
                theirs + "self_attn.v_proj.weight": v.reshape(-1, v.shape[-1]),
                theirs + "self_attn.o_proj.weight": weights[ours + "self_attention.linear_proj.weight"],
            }
        )
        if n > 1:
            out[theirs + "self_attn.router.weight"] = weights[ours + "self_attention.router.weight"]
        if experts:
            out[theirs + "mlp.router.weight"] = weights[ours + "mlp.router.weight"]
            for e in range(experts):
                src = f"{ours}mlp.experts.local_experts.{e}."
                out.update(
                    _swiglu(
                        weights[src + "linear_fc1.weight"],
                        weights[src + "linear_fc2.weight"],
                        f"{theirs}mlp.experts.{e}.",
                    )
                )
        else:
            out.update(
                _swiglu(
                    weights[ours + "mlp.linear_fc1.weight"], weights[ours + "mlp.linear_fc2.weight"], theirs + "mlp."
                )
            )
    hf_config = {
        "architectures": ["BamForCausalLM"],
        "model_type": "bam_megatron",
        "auto_map": AUTO_MAP,
        "variant": meta.architecture.variant,
        "vocab_size": out["model.embed_tokens.weight"].shape[0],
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "moe_intermediate_size": config.moe_ffn_hidden_size if experts else None,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "num_attention_experts": n,
        "attention_kv_mode": config.attention_kv_mode,
        "attention_router_topk": config.attention_router_topk,
        "num_experts": experts,
        "num_experts_per_tok": config.moe_router_topk if experts else 1,
        "moe_router_pre_softmax": bool(config.moe_router_pre_softmax),
        "normalization": config.normalization,
        "norm_eps": config.layernorm_epsilon,
        "rope_theta": float(config.rotary_base),
        "max_position_embeddings": meta.seq_length,
        "tie_word_embeddings": tied,
        "initializer_range": config.init_method_std,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"),
    }
    return out, hf_config


def copy_model_code(directory: str) -> None:
    """Put the remote-code files next to the weights."""
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(directory, name))
