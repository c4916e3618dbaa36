"""The transformers classes that compute bam-megatron models exactly, and which one ``--format auto`` picks.

Each `Target` (`target`) is one ``bam-convert-hf export --format``. Tensors are written under the
names each class's checkpoints use on the Hub (what vLLM, SGLang and TGI read; transformers 5 fuses
the experts into ``gate_up_proj`` itself when it loads them).

- ``llama``: ``LlamaForCausalLM``: dense, sequential, RMSNorm, no q/k norms; q/k/v biases as
  ``attention_bias`` (which adds an o_proj bias too: written as zeros);
- ``mistral``: ``MistralForCausalLM``: as Llama without biases (``sliding_window: null``);
- ``qwen2``: ``Qwen2ForCausalLM``: as Llama with q/k/v biases (zeros where the model has none);
  ``--format auto`` takes it for seeds imported from Qwen2 only (transformers' AutoTokenizer
  builds Qwen's byte-level tokenizer for every ``qwen2`` directory);
- ``qwen3``: ``Qwen3ForCausalLM``: as Llama with per-head q/k RMSNorms (no biases);
- ``cohere``: ``CohereForCausalLM``: dense, parallel, bias-free LayerNorm (`cohere`);
- ``qwen2_moe``: ``Qwen2MoeForCausalLM``: BTX, sequential; softmax then top-k (``norm_topk_prob``
  false) or renormalised (true); no shared expert;
- ``qwen3_moe``: ``Qwen3MoeForCausalLM``: as ``qwen2_moe`` with per-head q/k RMSNorms, no biases;
- ``mixtral``: ``MixtralForCausalLM``: BTX, sequential, renormalised top-k routing;
- ``bam``: remote code (`bam_format`): every variant and block.

All of them: RoPE (rotate-half, plain or Llama-3 scaling), GQA, any head size, tied or untied
embeddings, no sliding window.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from bam_megatron.conversion.hf.bam_format import BamTarget
from bam_megatron.conversion.hf.cohere import rope_permutation
from bam_megatron.conversion.hf.target import (
    TOP,
    Target,
    common_checks,
    initializer_range,
    rope_parameters,
    token_fields,
)
from bam_megatron.model.architecture import Architecture


class LlamaTarget(Target):
    """``LlamaForCausalLM``: h = x + Attn(RMSNorm x); y = h + SwiGLU(RMSNorm h); no biases, no q/k norms."""

    name = "llama"
    architecture_class = "LlamaForCausalLM"
    model_type = "llama"
    moe = False
    # "never"; "always" (Qwen2: biases of zeros where the model has none); "either" (a config flag);
    # "with_output" (Llama's attention_bias: q/k/v biases and an o_proj bias, written as zeros)
    qkv_bias = "with_output"
    qk_norm = False

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """The sequential block with RMSNorm, and this family's bias and q/k-norm settings."""
        cls = self.architecture_class
        if a.has_soft_moa:
            return (
                f"variant={a.variant}: {cls} has one attention per layer, not a soft mixture of attention experts "
                "(export with --format bam: remote code)"
            )
        if a.is_moe != self.moe:
            hint = "--format qwen2_moe, qwen3_moe or mixtral" if a.is_moe else "--format llama, qwen2 or qwen3"
            what = "has no experts" if a.is_moe else "is a mixture of experts"
            return f"variant={a.variant}: {cls} {what} (export with {hint})"
        if a.block_type != "sequential":
            return (
                f"block_type={a.block_type}: {cls}'s layer is the sequential block, h = x + Attn(Norm(x)), "
                "y = h + FFN(Norm(h)) (export with --format bam: remote code)"
            )
        if a.normalization != "RMSNorm":
            return f"normalization={a.normalization}: {cls}'s norms are RMSNorm (export with --format bam: remote code)"
        if a.add_qkv_bias and self.qkv_bias == "never":
            return f"add_qkv_bias=True: {cls} has no q/k/v biases (export with --format llama or qwen2_moe)"
        if a.qk_layernorm != self.qk_norm:
            if a.qk_layernorm:
                return f"qk_layernorm=True: {cls} has no q/k norms (export with --format qwen3 or qwen3_moe)"
            return f"qk_layernorm=False: {cls} always normalises q and k per head (export with --format llama or qwen2)"
        return common_checks(config)

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """config.json fields of this family beyond the shared ones: ``attention_bias`` for q/k/v biases
        (Llama's adds one to o_proj too, written as zeros: the same function)."""
        return {"attention_bias": a.add_qkv_bias, "mlp_bias": False, "pretraining_tp": 1}

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """Sizes, RMSNorm epsilon, RoPE (plain or Llama-3 scaling), tied embeddings, token ids."""
        return {
            "architectures": [self.architecture_class],
            "model_type": self.model_type,
            "vocab_size": a.padded_vocab_size,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.ffn_hidden_size,
            "num_hidden_layers": a.num_layers,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_query_groups,
            "head_dim": config.kv_channels,
            "hidden_act": "silu",
            "max_position_embeddings": meta.seq_length,
            "rms_norm_eps": a.norm_epsilon,
            "tie_word_embeddings": not a.untie_embeddings_and_output_weights,
            "rope_parameters": rope_parameters(a),
            "rope_theta": float(a.rotary_base),  # transformers 4.x's key (5.x reads rope_parameters)
            "attention_dropout": 0.0,
            "initializer_range": initializer_range(meta, config),
            "use_cache": True,
            **token_fields(token_ids),
            **self.family_config(a),
        }

    def unit(self, unit: int, p: dict[str, torch.Tensor], a: Architecture, config) -> dict[str, torch.Tensor]:
        """Llama's names: self_attn.*, input_layernorm, post_attention_layernorm, mlp.*."""
        if unit == TOP:
            return self.top(p, a)
        ours, theirs = f"decoder.layers.{unit}.", f"model.layers.{unit}."
        out = {
            theirs + "input_layernorm.weight": p[ours + "input_layernorm.weight"],
            **self.attention(p, unit, config, a, zero_bias=self.qkv_bias == "always"),
        }
        if a.add_qkv_bias and self.qkv_bias == "with_output":
            proj = p[ours + "self_attention.linear_proj.weight"]
            out[theirs + "self_attn.o_proj.bias"] = torch.zeros(proj.shape[0], device=proj.device)
        out[theirs + "post_attention_layernorm.weight"] = p[ours + "pre_mlp_layernorm.weight"]
        out.update(self.ffn(p, unit, config))
        return out

    def ffn(self, p: dict[str, torch.Tensor], i: int, config) -> dict[str, torch.Tensor]:
        """The dense SwiGLU FFN as ``mlp.{gate,up,down}_proj``."""
        ours = f"decoder.layers.{i}.mlp."
        return self.swiglu(p[ours + "linear_fc1.weight"], p[ours + "linear_fc2.weight"], f"model.layers.{i}.mlp.")


class MistralTarget(LlamaTarget):
    """``MistralForCausalLM``: Llama's decoder; exported with ``sliding_window: null`` (full causal, as ours)."""

    name = "mistral"
    architecture_class = "MistralForCausalLM"
    model_type = "mistral"
    qkv_bias = "never"

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window: bam-megatron's attention is full causal."""
        return {"sliding_window": None}


def _qwen_window(a: Architecture) -> dict[str, Any]:
    return {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": a.num_layers,
        "layer_types": ["full_attention"] * a.num_layers,
    }


class Qwen2Target(LlamaTarget):
    """``Qwen2ForCausalLM``: Llama's decoder with q/k/v biases (always present: zeros for a model without)."""

    name = "qwen2"
    architecture_class = "Qwen2ForCausalLM"
    model_type = "qwen2"
    qkv_bias = "always"

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window on any layer."""
        return _qwen_window(a)


class Qwen3Target(LlamaTarget):
    """``Qwen3ForCausalLM``: Llama's decoder with per-head q/k RMSNorms and a free head size."""

    name = "qwen3"
    architecture_class = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qkv_bias = "never"
    qk_norm = True

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window, no attention biases (Qwen3's would include o_proj)."""
        return {**_qwen_window(a), "attention_bias": False}


class _MoETarget(LlamaTarget):
    """A sequential-block mixture (BTX) with one of transformers' MoE layers."""

    moe = True

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """The Llama-family checks, then the routing."""
        reason = super().why_not(a, config)
        if reason:
            return reason
        if a.moe_router_topk_scaling_factor is not None:
            return (
                f"moe_router_topk_scaling_factor={a.moe_router_topk_scaling_factor}: {self.architecture_class} "
                "has no routing-weight scale (export with --format bam: remote code)"
            )
        if a.router_bias:
            return (
                f"router_bias=True: {self.architecture_class}'s router (mlp.gate) has no bias (export with "
                "--format bam: remote code, which carries both routers' biases)"
            )
        return None

    def moe_config(self, a: Architecture) -> dict[str, Any]:
        """Every layer an MoE of ``num_experts`` SwiGLU experts, top-k, no shared expert."""
        return {
            "num_experts": a.num_experts,
            "num_experts_per_tok": a.moe_router_topk,
            "moe_intermediate_size": a.ffn_hidden_size,
            "norm_topk_prob": not a.moe_router_pre_softmax,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
        }

    def ffn(self, p: dict[str, torch.Tensor], i: int, config) -> dict[str, torch.Tensor]:
        """``mlp.gate`` (the router) and ``mlp.experts.{e}.{gate,up,down}_proj`` (Qwen-MoE's Hub names)."""
        out = {f"model.layers.{i}.mlp.gate.weight": p[f"decoder.layers.{i}.mlp.router.weight"]}
        for e, (fc1, fc2) in enumerate(self.experts(p, i, config)):
            out.update(self.swiglu(fc1, fc2, f"model.layers.{i}.mlp.experts.{e}."))
        return out


class Qwen2MoeTarget(_MoETarget):
    """``Qwen2MoeForCausalLM`` with ``shared_expert_intermediate_size: 0``.

    Its router is softmax over all experts, then the top k, divided by their sum only with
    ``norm_topk_prob``: false is megatron-core's pre-softmax routing, true the renormalised one.
    Every layer builds a shared expert; at size 0 its projections are empty and its output is 0
    (``sigmoid(shared_expert_gate(x)) * 0``), so it adds nothing: its (empty) tensors and a zero
    gate are written, which transformers loads as they are.
    """

    name = "qwen2_moe"
    architecture_class = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"
    qkv_bias = "either"

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """q/k/v biases as the model has them, no shared expert, no sliding window."""
        return {
            **_qwen_window(a),
            **self.moe_config(a),
            "qkv_bias": a.add_qkv_bias,
            "shared_expert_intermediate_size": 0,
            "router_aux_loss_coef": 0.001,
        }

    def ffn(self, p: dict[str, torch.Tensor], i: int, config) -> dict[str, torch.Tensor]:
        """The experts, plus the empty shared expert and its (zero) gate."""
        out = super().ffn(p, i, config)
        hidden, device = config.hidden_size, p[f"decoder.layers.{i}.mlp.router.weight"].device
        prefix = f"model.layers.{i}.mlp.shared_expert"
        out[prefix + ".gate_proj.weight"] = torch.zeros(0, hidden, device=device)
        out[prefix + ".up_proj.weight"] = torch.zeros(0, hidden, device=device)
        out[prefix + ".down_proj.weight"] = torch.zeros(hidden, 0, device=device)
        out[prefix + "_gate.weight"] = torch.zeros(1, hidden, device=device)
        return out


class Qwen3MoeTarget(_MoETarget):
    """``Qwen3MoeForCausalLM``: Qwen2-MoE's routing (``norm_topk_prob``) with Qwen3's q/k norms; no shared expert."""

    name = "qwen3_moe"
    architecture_class = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    qkv_bias = "never"
    qk_norm = True

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """Every layer an MoE, no sliding window, no attention biases."""
        window = {k: v for k, v in _qwen_window(a).items() if k != "layer_types"}
        return {**window, **self.moe_config(a), "attention_bias": False, "router_aux_loss_coef": 0.001}


class MixtralTarget(_MoETarget):
    """``MixtralForCausalLM``: softmax over all experts, top k, renormalised (megatron-core without pre-softmax)."""

    name = "mixtral"
    architecture_class = "MixtralForCausalLM"
    model_type = "mixtral"
    qkv_bias = "never"

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """As the other MoE classes, and only the renormalised routing."""
        reason = super().why_not(a, config)
        if reason is None and a.moe_router_pre_softmax:
            reason = (
                "moe_router_pre_softmax=True: MixtralForCausalLM renormalises the top-k routing weights, this "
                "model keeps softmax-over-all-experts weights as they are (export with --format qwen2_moe)"
            )
        return reason

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """``num_local_experts`` top-k experts, no sliding window, no router jitter."""
        return {
            "sliding_window": None,
            "num_local_experts": a.num_experts,
            "num_experts_per_tok": a.moe_router_topk,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.02,
        }

    def ffn(self, p: dict[str, torch.Tensor], i: int, config) -> dict[str, torch.Tensor]:
        """``block_sparse_moe.gate``, ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down): Mixtral's Hub names."""
        prefix = f"model.layers.{i}.block_sparse_moe."
        out = {prefix + "gate.weight": p[f"decoder.layers.{i}.mlp.router.weight"]}
        for e, (fc1, fc2) in enumerate(self.experts(p, i, config)):
            out.update(self.swiglu(fc1, fc2, f"{prefix}experts.{e}.", names=("w1", "w3", "w2")))
        return out


class CohereTarget(Target):
    """``CohereForCausalLM``: the parallel block with one bias-free LayerNorm (`cohere` has the details)."""

    name = "cohere"
    architecture_class = "CohereForCausalLM"
    model_type = "cohere"

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """`cohere.check_exportable`'s checks."""
        from bam_megatron.conversion.hf.cohere import check_exportable
        from bam_megatron.conversion.hf.errors import ConversionError

        try:
            check_exportable(config, a.variant)
        except ConversionError as reason:
            return str(reason)
        return common_checks(config)

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """Cohere's config.json: logit_scale 1, no q/k norms, no biases."""
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
            "layer_norm_eps": a.norm_epsilon,
            "logit_scale": 1.0,
            "tie_word_embeddings": not a.untie_embeddings_and_output_weights,
            "use_qk_norm": False,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": initializer_range(meta, config),
            "use_cache": True,
            "rope_parameters": rope_parameters(a),
            "rope_theta": float(a.rotary_base),  # transformers 4.x's key (5.x reads rope_parameters)
            **token_fields(token_ids),
        }

    def unit(self, unit: int, p: dict[str, torch.Tensor], a: Architecture, config) -> dict[str, torch.Tensor]:
        """Q and K rows permuted per head (Cohere's interleaved RoPE), one norm per layer."""
        if unit == TOP:
            return self.top(p, a)
        ours, theirs = f"decoder.layers.{unit}.", f"model.layers.{unit}."
        out = {theirs + "input_layernorm.weight": p[ours + "input_layernorm.weight"]}
        out.update(self.attention(p, unit, config, a, permute=rope_permutation(config.kv_channels)))
        out.update(self.swiglu(p[ours + "mlp.linear_fc1.weight"], p[ours + "mlp.linear_fc2.weight"], theirs + "mlp."))
        return out


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        LlamaTarget(),
        MistralTarget(),
        Qwen2Target(),
        Qwen3Target(),
        Qwen2MoeTarget(),
        Qwen3MoeTarget(),
        MixtralTarget(),
        CohereTarget(),
        BamTarget(),
    )
}
"""--format -> its target."""

NATIVE_BY_MODEL_TYPE = {t.model_type: t for t in TARGETS.values() if not t.remote_code}


def preferences(a: Architecture, imported_model_type: Optional[str] = None) -> list[Target]:
    """The native classes ``--format auto`` tries for this architecture, in order: the family the
    seed was imported from, then by what the model computes."""
    order: list[str] = []
    family = NATIVE_BY_MODEL_TYPE.get(imported_model_type)
    if family is not None and getattr(family, "moe", False) == a.is_moe:
        order.append(family.name)
    if a.has_soft_moa:
        pass
    elif a.block_type == "parallel":
        order += [] if a.is_moe else ["cohere"]
    elif a.is_moe:
        order += (["mixtral"] if not a.moe_router_pre_softmax else []) + ["qwen2_moe", "qwen3_moe"]
    else:  # q/k/v biases go to Llama (attention_bias) unless the seed is a Qwen2: AutoTokenizer forces
        # Qwen's own byte-level tokenizer on model_type qwen2, whatever tokenizer the export ships
        order += ["qwen3"] if a.qk_layernorm else ["llama"]
    seen: list[Target] = []
    for name in order:
        if TARGETS[name] not in seen:
            seen.append(TARGETS[name])
    return seen
