"""Mixtures of experts from Hugging Face -> BTX seeds: Qwen2-MoE, Qwen3-MoE, Mixtral.

Each is Llama's sequential decoder whose MLP is a top-k mixture of SwiGLU experts in every layer:
megatron-core's MoE layer (``--variant btx``) with its router's softmax score. What differs is
the routing and the attention:

- Qwen2-MoE: softmax over all experts, then the top k, divided by their sum with
  ``norm_topk_prob`` (``moe_router_pre_softmax = not norm_topk_prob``); q/k/v biases with
  ``qkv_bias`` (default true; ``add_qkv_bias``).
- Qwen3-MoE: Qwen2-MoE's routing; Qwen3's per-head q/k RMSNorms (``qk_layernorm``), no biases.
- Mixtral: softmax over all experts, top k, renormalised (``moe_router_pre_softmax = False``);
  Mistral's attention.

Renormalised routing equals megatron-core's softmax over the top-k logits. Refused, naming the
field: a shared expert (Qwen2-MoE's ``shared_expert_intermediate_size`` > 0: bam-megatron's
mixture has none; exports write it at size 0, where it adds nothing), dense layers among the
sparse ones (``decoder_sparse_step`` other than 1, ``mlp_only_layers``), renormalised top-1
routing (its only weight is 1), and what the dense families refuse (sliding windows that bite,
other RoPE types, biases bam-megatron has not).

Tensors (layer ``N``; Hub names, which transformers 5 fuses into ``gate_up_proj`` on load):

- ``mlp.gate`` (Mixtral: ``block_sparse_moe.gate``) -> ``router``;
- ``mlp.experts.E.{gate,up}_proj`` (Mixtral: ``block_sparse_moe.experts.E.{w1,w3}``) ->
  ``experts.local_experts.E.linear_fc1`` = [gate; up];
- ``mlp.experts.E.down_proj`` (Mixtral: ``block_sparse_moe.experts.E.w2``) -> ``experts.local_experts.E.linear_fc2``.
"""

from __future__ import annotations

from typing import Any

import torch

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.llama import _COMMON, MistralImporter, Qwen2Importer, Qwen3Importer, fill_swiglu

_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": None}


class _MoEImporter:
    """What the three families share: the experts, read into megatron-core's MoE layer."""

    architecture_class: str
    expert_prefix = "mlp.experts."  # Mixtral: block_sparse_moe.experts.
    router_name = "mlp.gate.weight"
    expert_names = ("gate_proj", "up_proj", "down_proj")

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

    def ffn_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """The router and every expert's three projections."""
        a = self.architecture
        hidden, ffn, p = a.hidden_size, a.ffn_hidden_size, f"model.layers.{i}."
        shapes = {p + self.router_name: (a.num_experts, hidden)}
        gate, up, down = self.expert_names
        for e in range(a.num_experts):
            q = f"{p}{self.expert_prefix}{e}."
            shapes.update(
                {
                    f"{q}{gate}.weight": (ffn, hidden),
                    f"{q}{up}.weight": (ffn, hidden),
                    f"{q}{down}.weight": (hidden, ffn),
                }
            )
        return shapes

    def fill_ffn(self, i: int, params: dict[str, torch.Tensor], read) -> None:
        """Router and experts of layer ``i``."""
        a, theirs, ours = self.architecture, f"model.layers.{i}.", f"decoder.layers.{i}.mlp."
        params[ours + "router.weight"].copy_(read(theirs + self.router_name))
        for e in range(a.num_experts):
            fill_swiglu(
                params,
                f"{ours}experts.local_experts.{e}.",
                read,
                f"{theirs}{self.expert_prefix}{e}.",
                a.ffn_hidden_size,
                self.expert_names,
            )


class Qwen2MoeImporter(_MoEImporter, Qwen2Importer):
    """``Qwen2MoeForCausalLM`` without a shared expert (as bam-convert-hf exports BTX models)."""

    model_type = "qwen2_moe"
    architecture_class = "Qwen2MoeForCausalLM"
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

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """The shared expert of size 0 and its gate (multiplying zero): read if present, never needed."""
        hidden, shapes = self.architecture.hidden_size, dict(super().optional_tensors())
        for i in range(self.architecture.num_layers):
            p = f"model.layers.{i}.mlp.shared_expert"
            shapes.update(
                {
                    p + ".gate_proj.weight": (0, hidden),
                    p + ".up_proj.weight": (0, hidden),
                    p + ".down_proj.weight": (hidden, 0),
                    p + "_gate.weight": (1, hidden),
                }
            )
        return shapes


class Qwen3MoeImporter(_MoEImporter, Qwen3Importer):
    """``Qwen3MoeForCausalLM``: Qwen3's attention (q/k norms) with Qwen2-MoE's routing, no shared expert."""

    model_type = "qwen3_moe"
    architecture_class = "Qwen3MoeForCausalLM"
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
    expert_prefix = "block_sparse_moe.experts."
    router_name = "block_sparse_moe.gate.weight"
    expert_names = ("w1", "w3", "w2")
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
