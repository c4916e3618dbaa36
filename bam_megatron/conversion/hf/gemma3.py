"""Gemma 3 text (``Gemma3ForCausalLM``, ``model_type: gemma3_text``) <-> a dense sequential-block model.

Gemma 3's decoder layer has a norm before *and* after attention and the MLP (``norm_placement:
both``): ``h = x + Norm(Attn(Norm(x))); y = h + Norm(GeGLU(Norm(h)))``. Every norm, the per-head
q/k norms included, is an RMSNorm scaling by (1 + weight) (``apply_layernorm_1p``: megatron-core's
``layernorm_zero_centered_gamma``); the MLP is GeGLU with tanh-GELU (``activation: geglu``); the
embeddings are multiplied by sqrt(hidden_size) (``scale_embeddings``); attention scores by
``query_pre_attn_scalar``^-1/2 (megatron-core's ``softmax_scale``). Layers are local (sliding
window, RoPE base ``rope_parameters.sliding_attention.rope_theta``: ``local_rotary_base``) or
global (every ``global_attention_every``-th: full attention, ``rope_theta``). bam-megatron's
attention is full causal, so a sliding window is exact only for sequences that fit it: one shorter
than the recorded sequence is refused (import with ``--seq-length`` of the window). Embeddings are
tied or not.

The table (`Gemma3Target.mappings`), per layer:

| transformers (``model.layers.N.``) | ours (``decoder.layers.N.``) | mapping |
|---|---|---|
| ``input_layernorm`` | ``input_layernorm`` | `Rename` |
| ``self_attn.{q,k,v}_proj``, ``o_proj`` | ``self_attention.linear_qkv`` (by KV group), ``linear_proj`` | `QKV` |
| ``self_attn.{q,k}_norm`` (per head) | ``self_attention.{q,k}_layernorm`` | `Rename` |
| ``post_attention_layernorm`` | ``self_attn_bda.post_layernorm`` | `Rename` |
| ``pre_feedforward_layernorm`` | ``pre_mlp_layernorm`` | `Rename` |
| ``mlp.{gate,up}_proj``, ``down_proj`` | ``mlp.linear_fc1`` = [gate; up], ``linear_fc2`` | `GateUp`, `Rename` |
| ``post_feedforward_layernorm`` | ``mlp_bda.post_layernorm`` | `Rename` |

Refused on import, naming the field: logit soft-capping (``attn_logit_softcapping``,
``final_logit_softcapping``), bidirectional attention, ``attention_bias``, RoPE other than plain on
either kind of layer (the larger Gemma 3 models' ``linear`` scaling of the global layers), local and
global layers in another pattern than every N-th global, a window that bites. Gemma 2 (``gemma2``:
soft-capping) and Gemma 1 are not read.
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.bridge import LAYER, OURS, Mapping, Rename, embeddings
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.llama import _COMMON, LlamaImporter, LlamaTarget, sliding_window_refusal
from bam_megatron.model.architecture import Architecture

KINDS = ("sliding_attention", "full_attention")

# ===== export: what Gemma3ForCausalLM refuses, its config.json, and the table


def layer_types(a: Architecture) -> list[str]:
    """transformers' ``layer_types``: local layers slide, every ``global_attention_every``-th is full."""
    every = a.global_attention_every
    return [KINDS[every is None or (i + 1) % every == 0] for i in range(a.num_layers)]


class Gemma3Target(LlamaTarget):
    """``Gemma3ForCausalLM``: (1 + w) RMSNorms before and after attention and MLP, GeGLU, scaled embeddings."""

    name = "gemma3_text"
    architecture_class = "Gemma3ForCausalLM"
    model_type = "gemma3_text"
    qkv_bias = "never"
    qk_norm = True
    norm_placement = "both"
    gemma = True

    def why_not(self, a: Architecture, config) -> Optional[str]:
        """As Llama's with Gemma's layer; no soft-capping (Gemma 2's: transformers' Gemma 3 attends with sdpa)."""
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(a, name) is not None:
                cls = self.architecture_class
                return f"{name}={getattr(a, name)}: {cls} does not soft-cap (export with --format gemma2)"
        return super().why_not(a, config)

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """Llama's fields without ``hidden_act`` (``hidden_activation``), Gemma's attention scale, RoPE per
        kind of layer and a window as long as the recorded sequence (it never bites: ours is full causal)."""
        out = {**self.decoder_config(a, config, meta, token_ids), "head_dim": config.kv_channels}
        del out["hidden_act"], out["rope_theta"]
        local = a.rotary_base if a.local_rotary_base is None else a.local_rotary_base
        scalar = a.query_pre_attn_scalar or config.kv_channels
        scalar = int(scalar) if float(scalar).is_integer() else scalar  # Gemma3TextConfig declares an int
        return {
            **out,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": a.norm_epsilon,
            "query_pre_attn_scalar": scalar,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": float(a.rotary_base)},
                "sliding_attention": {"rope_type": "default", "rope_theta": float(local)},
            },
            "layer_types": layer_types(a),
            "sliding_window": meta.seq_length,
            "attention_bias": False,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "use_bidirectional_attention": False,
        }

    def mappings(self, a: Architecture, **options: Any) -> list[Mapping]:
        """Embeddings; per layer the four norms, the attention (per-head q/k norms) and the GeGLU."""
        return [
            *embeddings(a),
            Rename(LAYER + "input_layernorm.weight", OURS + "input_layernorm.weight"),
            *self.attention(a),
            Rename(LAYER + "post_attention_layernorm.weight", OURS + "self_attn_bda.post_layernorm.weight"),
            Rename(LAYER + "pre_feedforward_layernorm.weight", OURS + "pre_mlp_layernorm.weight"),
            *self.ffn(a),
            Rename(LAYER + "post_feedforward_layernorm.weight", OURS + "mlp_bda.post_layernorm.weight"),
        ]


# ===== import: config.json's checks (the table is the target's)


def check_layer_types(importer: LlamaImporter, pattern: int) -> Optional[int]:
    """N where every N-th layer is global and the others local (None: every layer global), from
    ``layer_types`` (or, without, every ``pattern``-th global); another pattern, or a sliding window
    shorter than the recorded sequence, is refused naming the field."""
    layers, types = importer.get("num_hidden_layers"), importer.get("layer_types")
    if types is None:
        types = [KINDS[(i + 1) % pattern == 0] for i in range(layers)]
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    every = full[0] + 1 if full else layers + 1
    if len(types) != layers or types != [KINDS[(i + 1) % every == 0] for i in range(layers)]:
        raise ConversionError(
            f"layer_types={types}: bam-megatron's local layers are every layer but each N-th (global)"
        )
    if len(full) == layers:
        return None
    sliding_window_refusal(importer.get("sliding_window"), importer.seq_length)
    return every


class Gemma3Importer(LlamaImporter):
    """``Gemma3ForCausalLM`` (text): Gemma's layer; local layers' RoPE base; windows only where they never bite."""

    model_type = "gemma3_text"
    architecture_class = "Gemma3ForCausalLM"
    target = Gemma3Target()
    defaults = {
        **{k: v for k, v in _COMMON.items() if k not in ("hidden_act", "rope_theta")},
        "hidden_activation": "gelu_pytorch_tanh",
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "layer_types": None,
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    }
    qk_norm = True

    def check_activation(self) -> None:
        """The MLP is GeGLU with tanh-GELU."""
        self.require("hidden_activation", "gelu_pytorch_tanh", "the MLP is GeGLU with the tanh GELU")

    def check_family(self) -> None:
        """No biases, soft-capping or bidirectional attention; local layers every N-th global."""
        self.require("attention_bias", False, "megatron-core's QKV bias has no o_proj bias")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            self.require(key, None, "megatron-core's attention and output layer do not soft-cap")
        self.require("use_bidirectional_attention", False, "bam-megatron's attention is causal")
        self.every = check_layer_types(self, self.get("sliding_window_pattern"))

    def rope(self, allow_llama3: bool = True) -> tuple[float, Optional[float]]:
        """Plain RoPE on both kinds of layer: (global theta, None); the local theta is kept for `check`."""
        params = dict(self.cfg.get("rope_parameters") or {})
        if self.cfg.get("rope_scaling"):
            raise ConversionError(f"rope_scaling={self.cfg['rope_scaling']}: only plain RoPE can be imported")
        thetas = {}
        for kind, legacy in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
            these = dict(params.get(kind) or {})
            if these.get("rope_type", "default") != "default":
                raise ConversionError(
                    f"rope_parameters.{kind}.rope_type={these['rope_type']}: only plain RoPE ('default') can be "
                    "imported (megatron-core computes no other here)"
                )
            if these.get("partial_rotary_factor", 1.0) != 1.0:
                raise ConversionError(
                    f"rope_parameters.{kind}.partial_rotary_factor: bam-megatron rotates every channel"
                )
            thetas[kind] = float(these.get("rope_theta", self.get(legacy)))
        self.local_theta = thetas["sliding_attention"]
        return thetas["full_attention"], None

    def check(self) -> Architecture:
        """Llama's checks; Gemma's layer, attention scale and local layers."""
        a = super().check()
        local = None if self.every is None else self.local_theta
        return a.replace(
            norm_placement="both",
            apply_layernorm_1p=True,
            activation="geglu",
            scale_embeddings=True,
            query_pre_attn_scalar=float(self.get("query_pre_attn_scalar")),
            local_rotary_base=local,
            global_attention_every=None if local is None else self.every,
        )
