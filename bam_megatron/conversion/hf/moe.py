"""Mixtures of experts <-> BTX models: Qwen2-MoE, Qwen3-MoE, Mixtral.

Each is Llama's sequential decoder whose MLP is a top-k mixture of SwiGLU experts in every layer:
megatron-core's MoE layer (``--variant btx``) with its router's softmax score. What differs is
the routing and the attention:

- Qwen2-MoE: softmax over all experts, then the top k, divided by their sum with
  ``norm_topk_prob`` (``moe_router_pre_softmax = not norm_topk_prob``); q/k/v biases with
  ``qkv_bias`` (default true; ``add_qkv_bias``).
- Qwen3-MoE: Qwen2-MoE's routing; Qwen3's per-head q/k RMSNorms (``qk_layernorm``), no biases.
- Mixtral: softmax over all experts, top k, renormalised (``moe_router_pre_softmax = False``);
  Mistral's attention.

Renormalised routing equals megatron-core's softmax over the top-k logits. Refused on import,
naming the field: a shared expert (Qwen2-MoE's ``shared_expert_intermediate_size`` > 0:
bam-megatron's mixture has none; exports write it at size 0, where it adds nothing), dense layers
among the sparse ones (``decoder_sparse_step`` other than 1, ``mlp_only_layers``), renormalised
top-1 routing (its only weight is 1), and what the dense families refuse (sliding windows that
bite, other RoPE types, biases bam-megatron has not). Refused on export: a routing scale
(``moe_router_topk_scaling_factor``), router biases, and for Mixtral softmax-then-top-k routing.

The table is Llama's (`llama.LlamaTarget.mappings`) with the FFN of layer ``N`` replaced (Hub
names, which transformers 5 fuses into ``gate_up_proj`` on load):

- ``mlp.gate`` (Mixtral: ``block_sparse_moe.gate``) <-> ``mlp.router`` (`Rename`);
- ``mlp.experts.E.{gate,up}_proj`` (Mixtral: ``block_sparse_moe.experts.E.{w1,w3}``) <->
  ``mlp.experts.local_experts.E.linear_fc1`` = [gate; up] (`GateUp`);
- ``mlp.experts.E.down_proj`` (Mixtral: ``block_sparse_moe.experts.E.w2``) <->
  ``mlp.experts.local_experts.E.linear_fc2`` (`Rename`);
- Qwen2-MoE's ``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate``: `Zeros` of
  size 0 (and a zero gate), optional on import.
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.bridge import LAYER, OURS, Mapping, Rename, Zeros, swiglu
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.llama import (
    _COMMON,
    LlamaTarget,
    MistralImporter,
    Qwen2Importer,
    Qwen3Importer,
    qwen_window,
)
from bam_megatron.model.architecture import Architecture

# ===== export: the classes, what they refuse, their config.json, and the FFN of the table


class _MoETarget(LlamaTarget):
    """A sequential-block mixture (BTX) with one of transformers' MoE layers."""

    moe = True
    mlp = "mlp."  # Mixtral: block_sparse_moe.
    expert_names = ("gate_proj", "up_proj", "down_proj")

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

    def ffn(self, a: Architecture) -> list[Mapping]:
        """The router (``mlp.gate``) and every expert's SwiGLU (the Hub's names)."""
        theirs, ours = LAYER + self.mlp, OURS + "mlp."
        return [
            Rename(theirs + "gate.weight", ours + "router.weight"),
            *swiglu(theirs + "experts.{e}.", ours + "experts.local_experts.{e}.", self.expert_names),
        ]


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
            **qwen_window(a),
            **self.moe_config(a),
            "qkv_bias": a.add_qkv_bias,
            "shared_expert_intermediate_size": 0,
            "router_aux_loss_coef": 0.001,
        }

    def ffn(self, a: Architecture) -> list[Mapping]:
        """The experts, plus the empty shared expert and its (zero) gate."""
        hidden, shared = a.hidden_size, LAYER + "mlp.shared_expert"
        names = [f"{shared}.{x}_proj.weight" for x in ("gate", "up", "down")] + [shared + "_gate.weight"]
        empty = Zeros(tuple(names), shape=((0, hidden), (0, hidden), (hidden, 0), (1, hidden)), optional=True)
        return [*super().ffn(a), empty]


class Qwen3MoeTarget(_MoETarget):
    """``Qwen3MoeForCausalLM``: Qwen2-MoE's routing (``norm_topk_prob``) with Qwen3's q/k norms; no shared expert."""

    name = "qwen3_moe"
    architecture_class = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    qkv_bias = "never"
    qk_norm = True

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """Every layer an MoE, no sliding window, no attention biases."""
        window = {k: v for k, v in qwen_window(a).items() if k != "layer_types"}
        return {**window, **self.moe_config(a), "attention_bias": False, "router_aux_loss_coef": 0.001}


class MixtralTarget(_MoETarget):
    """``MixtralForCausalLM``: softmax over all experts, top k, renormalised (megatron-core without pre-softmax)."""

    name = "mixtral"
    architecture_class = "MixtralForCausalLM"
    model_type = "mixtral"
    qkv_bias = "never"
    mlp = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")

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


# ===== import: config.json's checks (the table is the target's)

_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": None}


class _MoEImporter:
    """What the three families' imports share: the mixture's fields of the architecture."""

    def routing(self) -> tuple[int, int, bool]:
        """(experts, top-k, pre-softmax) from config.json."""
        raise NotImplementedError(f"{type(self).__name__} does not define routing(): each subclass does")

    def num_experts(self) -> Any:
        """``num_experts``, which transformers 5 saves as ``num_local_experts`` for Qwen3-MoE and Mixtral."""
        for key in ("num_local_experts", "num_experts"):
            if key in self.cfg:
                return self.cfg[key]
        return self.get("num_local_experts" if "num_local_experts" in self.defaults else "num_experts")

    def ffn_fields(self) -> dict[str, Any]:
        """A BTX of ``num_experts`` experts of ``moe_intermediate_size``, every layer."""
        experts, topk, pre_softmax = self.routing()
        for key, value in (("num_experts", experts), ("num_experts_per_tok", topk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConversionError(f"config.json: {key} must be a positive integer, got {value!r}")
        if topk > experts:
            raise ConversionError(f"num_experts_per_tok={topk}: more than the {experts} experts")
        if not pre_softmax and topk == 1:
            raise ConversionError(
                "renormalised top-1 routing (norm_topk_prob=true, or Mixtral, with num_experts_per_tok=1): its one "
                "weight is always 1, which megatron-core's router computes only without renormalisation"
            )
        return {
            "variant": "btx",
            "ffn_hidden_size": self.expert_size(),
            "num_experts": experts,
            "moe_router_topk": topk,
            "moe_router_pre_softmax": pre_softmax,
        }

    def expert_size(self) -> int:
        """The experts' intermediate size."""
        return self.get("moe_intermediate_size")

    def check_sparse_layers(self) -> None:
        """Every layer an MoE layer (bam-megatron's BTX has no dense layers among them)."""
        step, dense = self.get("decoder_sparse_step"), self.get("mlp_only_layers") or []
        if step != 1:
            raise ConversionError(
                f"decoder_sparse_step={step}: only every layer an MoE layer can be imported (decoder_sparse_step=1)"
            )
        if dense:
            raise ConversionError(f"mlp_only_layers={dense}: bam-megatron's BTX has experts in every layer")


class Qwen2MoeImporter(_MoEImporter, Qwen2Importer):
    """``Qwen2MoeForCausalLM`` without a shared expert (as bam-convert-hf exports BTX models)."""

    model_type = "qwen2_moe"
    architecture_class = "Qwen2MoeForCausalLM"
    target = Qwen2MoeTarget()
    defaults = {
        **Qwen2Importer.defaults,
        **_MOE_DEFAULTS,
        "num_key_value_heads": 16,
        "qkv_bias": True,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "intermediate_size": 5632,
    }

    def check_family(self) -> None:
        """No shared expert, every layer sparse; q/k/v biases as ``qkv_bias`` says; Qwen's sliding window."""
        shared = self.get("shared_expert_intermediate_size")
        if shared:
            raise ConversionError(
                f"shared_expert_intermediate_size={shared}: bam-megatron's mixture has no shared expert (its "
                "exports write one of size 0, which adds nothing)"
            )
        self.check_sparse_layers()
        self.qkv_bias = bool(self.get("qkv_bias"))
        super().check_family()

    def routing(self) -> tuple[int, int, bool]:
        """softmax -> top-k, renormalised with norm_topk_prob."""
        return self.num_experts(), self.get("num_experts_per_tok"), not self.get("norm_topk_prob")

    def derived_layer_types(self, window, layers: int) -> list[str]:
        """Qwen2MoeConfig's derivation: every other layer below ``max_window_layers`` slides."""
        start = self.get("max_window_layers")
        return [
            "sliding_attention" if window is not None and (i + 1) % 2 and i < start else "full_attention"
            for i in range(layers)
        ]


class Qwen3MoeImporter(_MoEImporter, Qwen3Importer):
    """``Qwen3MoeForCausalLM``: Qwen3's attention (q/k norms) with Qwen2-MoE's routing, no shared expert."""

    model_type = "qwen3_moe"
    architecture_class = "Qwen3MoeForCausalLM"
    target = Qwen3MoeTarget()
    defaults = {
        **Qwen3Importer.defaults,
        **_MOE_DEFAULTS,
        "num_key_value_heads": 4,
        "head_dim": None,  # Qwen3MoeConfig has none: hidden / heads unless config.json gives it
        "layer_types": None,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "intermediate_size": 6144,
    }

    def check_family(self) -> None:
        """Every layer sparse; no attention biases; Qwen's sliding window."""
        self.check_sparse_layers()
        super().check_family()

    def get(self, key: str) -> Any:
        """As config.json says, except ``layer_types``, which Qwen3MoeConfig does not read."""
        return None if key == "layer_types" else super().get(key)

    def derived_layer_types(self, window, layers: int) -> list[str]:
        """Qwen3-MoE slides on every layer when ``use_sliding_window``."""
        return ["sliding_attention" if window is not None else "full_attention"] * layers

    def routing(self) -> tuple[int, int, bool]:
        """softmax -> top-k, renormalised with norm_topk_prob."""
        return self.num_experts(), self.get("num_experts_per_tok"), not self.get("norm_topk_prob")


class MixtralImporter(_MoEImporter, MistralImporter):
    """``MixtralForCausalLM``: Mistral's attention with renormalised top-k experts (``block_sparse_moe``)."""

    model_type = "mixtral"
    architecture_class = "MixtralForCausalLM"
    target = MixtralTarget()
    defaults = {
        **_COMMON,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": None,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }

    def routing(self) -> tuple[int, int, bool]:
        """Always renormalised (softmax over the top-k logits in megatron-core's terms)."""
        return self.num_experts(), self.get("num_experts_per_tok"), False

    def expert_size(self) -> int:
        """Mixtral's experts are ``intermediate_size`` wide."""
        return self.get("intermediate_size")
