"""Any bam-megatron model -> a self-contained Hugging Face directory with its own model code.

The directory holds ``configuration_bam.py`` and ``modeling_bam.py`` (from `remote/`: torch and
transformers only) and a config.json whose ``auto_map`` points at them, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` builds the model on any machine.
Every variant (dense, BTX, BAM, BAM shared-KV) and both blocks; it is what ``--format auto`` picks
where no transformers class computes the model exactly.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch

from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.target import (
    TOP,
    Target,
    common_checks,
    initializer_range,
    split_qkv,
    split_qkv_bias,
    token_fields,
)
from bam_megatron.model.architecture import Architecture

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_bam.py", "modeling_bam.py")
AUTO_MAP = {"AutoConfig": "configuration_bam.BamConfig", "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}


def check_exportable(config) -> None:
    """Refuse, naming the setting, anything the remote code does not compute exactly as megatron-core."""
    reason = common_checks(config)
    if reason:
        raise ConversionError(reason)


class BamTarget(Target):
    """Self-contained remote code (`remote/`): every variant and block; ``trust_remote_code=True``.

    Tensor names follow transformers' conventions. The soft mixture of attention is stored as the
    one wide attention bam-megatron computes (``q_proj`` holds all N·H query heads in megatron-core's
    order, ``k_proj``/``v_proj`` its K/V heads and their biases, ``q_norm``/``k_norm`` each expert's
    per-head norm as a row of [N, head_dim] (shared K/V: one ``k_norm``; over the projection: as our
    ``q_layernorm``/``k_layernorm``, one entry per channel of the wide Q / K), ``router`` the attention
    router); FFN experts are ``mlp.experts.{e}.{gate,up,down}_proj`` with ``mlp.router``.
    """

    name = "bam"
    architecture_class = "BamForCausalLM"
    model_type = "bam_megatron"
    remote_code = True

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """Only settings no bam-megatron architecture has (`common_checks`)."""
        return common_checks(config)

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """The remote code's BamConfig: every architecture setting."""
        n = config.num_attention_experts
        experts = config.num_moe_experts or 0
        return {
            "architectures": [self.architecture_class],
            "model_type": self.model_type,
            "auto_map": AUTO_MAP,
            "variant": a.variant,
            "block_type": a.block_type,
            "vocab_size": a.padded_vocab_size,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.ffn_hidden_size,
            "moe_intermediate_size": config.moe_ffn_hidden_size if experts else None,
            "num_hidden_layers": a.num_layers,
            "num_attention_heads": n * a.num_attention_heads,  # the wide attention's, as serving stacks read them
            "num_key_value_heads": config.attention_kv_groups,
            "attention_heads_per_expert": a.num_attention_heads,
            "key_value_heads_per_expert": a.num_query_groups,
            "head_dim": config.kv_channels,
            "num_attention_experts": n,
            "attention_kv_mode": config.attention_kv_mode,
            "attention_router_topk": config.attention_router_topk,
            "qkv_bias": a.add_qkv_bias,
            "qk_norm": a.qk_layernorm,
            "qk_norm_scope": a.qk_layernorm_scope,
            "norm_placement": a.norm_placement,
            "apply_layernorm_1p": a.apply_layernorm_1p,
            "activation": a.activation,
            "scale_embeddings": a.scale_embeddings,
            "query_pre_attn_scalar": a.query_pre_attn_scalar,
            "attn_logit_softcapping": a.attn_logit_softcapping,
            "final_logit_softcapping": a.final_logit_softcapping,
            "local_rotary_base": a.local_rotary_base,
            "global_attention_every": a.global_attention_every,
            "num_experts": experts,
            "num_experts_per_tok": a.moe_router_topk if experts else 1,
            "moe_router_pre_softmax": bool(a.moe_router_pre_softmax),
            "moe_router_topk_scaling_factor": a.moe_router_topk_scaling_factor,
            "router_bias": a.router_bias,
            "router_expert_groups": _expert_groups(a, meta),
            "normalization": a.normalization,
            "norm_eps": a.norm_epsilon,
            "rope_theta": float(a.rotary_base),
            "rope_scaling_factor": a.rope_scaling_factor,
            "max_position_embeddings": meta.seq_length,
            "tie_word_embeddings": not a.untie_embeddings_and_output_weights,
            "initializer_range": initializer_range(meta, config),
            "use_cache": True,
            **token_fields(token_ids),
        }

    def unit(self, unit: int, p: dict[str, torch.Tensor], a: Architecture, config) -> dict[str, torch.Tensor]:
        """The wide attention as it is, the router(s), experts or the dense FFN, one or two norms."""
        if unit == TOP:
            return self.top(p, a)
        ours, theirs = f"decoder.layers.{unit}.", f"model.layers.{unit}."
        n = config.num_attention_experts
        wide_heads, kv_heads = n * config.num_attention_heads, config.attention_kv_groups
        q, k, v = split_qkv(p[ours + "self_attention.linear_qkv.weight"], wide_heads, kv_heads)
        out = {theirs + name: p[ours + mine] for name, mine in layer_norms(a)}
        out |= {
            theirs + "self_attn.q_proj.weight": q.reshape(-1, q.shape[-1]),
            theirs + "self_attn.k_proj.weight": k.reshape(-1, k.shape[-1]),
            theirs + "self_attn.v_proj.weight": v.reshape(-1, v.shape[-1]),
            theirs + "self_attn.o_proj.weight": p[ours + "self_attention.linear_proj.weight"],
        }
        if a.add_qkv_bias:
            qb, kb, vb = split_qkv_bias(p[ours + "self_attention.linear_qkv.bias"], wide_heads, kv_heads)
            out.update({f"{theirs}self_attn.{x}_proj.bias": b for x, b in zip("qkv", (qb, kb, vb))})
        if a.qk_layernorm:
            out[theirs + "self_attn.q_norm.weight"] = p[ours + "self_attention.q_layernorm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = p[ours + "self_attention.k_layernorm.weight"]
        if n > 1:
            out[theirs + "self_attn.router.weight"] = p[ours + "self_attention.router.weight"]
            if a.router_bias:
                out[theirs + "self_attn.router.bias"] = p[ours + "self_attention.router.bias"]
        if config.num_moe_experts:
            out[theirs + "mlp.router.weight"] = p[ours + "mlp.router.weight"]
            if a.router_bias:
                out[theirs + "mlp.router.bias"] = p[ours + "mlp.router.bias"]
            for e, (fc1, fc2) in enumerate(self.experts(p, unit, config)):
                out.update(self.swiglu(fc1, fc2, f"{theirs}mlp.experts.{e}."))
        else:
            out.update(
                self.swiglu(p[ours + "mlp.linear_fc1.weight"], p[ours + "mlp.linear_fc2.weight"], theirs + "mlp.")
            )
        return out

    def copy_files(self, directory: str) -> None:
        """configuration_bam.py and modeling_bam.py next to the weights."""
        copy_model_code(directory)


def layer_norms(a: Architecture) -> list[tuple[str, str]]:
    """A layer's norms, (the remote code's name, ours), after ``model.layers.N.`` / ``decoder.layers.N.``:
    the pre-norm(s); with ``norm_placement`` post the norms after attention and FFN (OLMo 2's names);
    both, the four (Gemma's names)."""
    post = [
        ("post_attention_layernorm.weight", "self_attn_bda.post_layernorm.weight"),
        ("post_feedforward_layernorm.weight", "mlp_bda.post_layernorm.weight"),
    ]
    if a.norm_placement == "post":
        return post
    if a.norm_placement == "both":
        pre = [("input_layernorm.weight", "input_layernorm.weight")]
        return pre + post + [("pre_feedforward_layernorm.weight", "pre_mlp_layernorm.weight")]
    norms = [("input_layernorm.weight", "input_layernorm.weight")]
    if a.block_type == "sequential":
        norms.append(("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"))
    return norms


def to_bam(
    weights: dict[str, torch.Tensor], config, meta: CheckpointMeta, token_ids: dict[str, Optional[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A whole model's parameters (megatron-core names) -> (tensors, config.json) of the remote-code model.

    (The export streams unit by unit through `BamTarget.unit`; this is the in-memory form.)
    """
    target, a = BamTarget(), meta.architecture
    weights = fold_router_offsets(weights, meta)
    tensors = target.unit(TOP, weights, a, config)
    for i in range(config.num_layers):
        tensors.update(target.unit(i, weights, a, config))
    return tensors, target.hf_config(a, config, meta, token_ids)


def _expert_groups(a: Architecture, meta: CheckpointMeta) -> Optional[list[int]]:
    """The router's groups of experts a grown mixture computes one GEMM each (`router_ramp`), or None."""
    from bam_megatron.model.router_ramp import ramp_of

    ramp = ramp_of(meta.lineage) if a.router_bias else None
    return list(ramp.groups) if ramp is not None and len(ramp.groups) > 1 else None


def fold_router_offsets(weights: dict[str, torch.Tensor], meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """A unit's (or model's) parameters with the new-expert ramp's offset at the checkpoint's iteration
    folded into every router bias (`router_ramp.folded_bias`): the exported routers then compute the
    logits the checkpoint does, -1024 for a freshly grown mixture's new experts. Every export does this."""
    from bam_megatron.model.router_ramp import folded_bias

    return {
        name: folded_bias(t, meta.lineage, meta.iteration) if name.endswith("router.bias") else t
        for name, t in weights.items()
    }


def copy_model_code(directory: str) -> None:
    """Put the remote-code files next to the weights."""
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(directory, name))
