"""Llama and its close relatives (Mistral, Qwen2, Qwen3) <-> a dense sequential-block model.

These four are one decoder: ``h = x + Attn(RMSNorm(x)); y = h + SwiGLU(RMSNorm(h))`` with GQA,
rotate-half RoPE (as megatron-core's default: no Q/K row permutation, unlike Cohere's), a final
RMSNorm and tied or untied embeddings. They differ in a few settings, each an `Architecture` field:

| family | what differs | Architecture |
|---|---|---|
| Llama 2/3.x | ``rope_scaling`` ``llama3``; ``attention_bias`` (o_proj 0) | ``rope_scaling_factor``, ``add_qkv_bias`` |
| Mistral | ``sliding_window`` (refused where it would bite) | — |
| Qwen2 | biases on q/k/v | ``add_qkv_bias`` |
| Qwen3 | per-head RMSNorm on q and k; ``head_dim`` ≠ hidden/heads | ``qk_layernorm``, ``kv_channels`` |

The table (`LlamaTarget.mappings`, read both ways by `bridge`), per layer
(``model.layers.N.`` <-> ``decoder.layers.N.``):

| transformers | ours (megatron-core parameter names) | mapping |
|---|---|---|
| ``input_layernorm`` | ``input_layernorm`` | `Rename` |
| ``self_attn.{q,k,v}_proj.{weight,bias}`` | ``self_attention.linear_qkv.{weight,bias}`` | `QKV` (by KV group) |
| ``self_attn.o_proj`` | ``self_attention.linear_proj`` | `Rename` |
| ``self_attn.o_proj.bias`` (Llama's ``attention_bias``) | — | `Zeros` (must be zero on import) |
| ``self_attn.{q,k,v}_proj.bias`` (Qwen2, a model without) | — | `Zeros` |
| ``self_attn.{q,k}_norm`` | ``self_attention.{q,k}_layernorm`` | `Rename` |
| ``post_attention_layernorm`` | ``pre_mlp_layernorm`` | `Rename` |
| ``mlp.gate_proj``, ``mlp.up_proj`` | ``mlp.linear_fc1`` = [gate; up] | `GateUp` |
| ``mlp.down_proj`` | ``mlp.linear_fc2`` | `Rename` |

plus ``model.embed_tokens``, ``model.norm``, ``lm_head`` <-> ``embedding.word_embeddings``,
``decoder.final_layernorm``, ``output_layer`` (`bridge.embeddings`). Next to the table: what each
class refuses on export (`LlamaTarget.why_not`), its config.json (`hf_config`), and the import's
checks of config.json (`LlamaImporter.check`: each refusal one line naming the field). The
defaults are transformers 5.23's for a field config.json leaves out
(tests/conversion/hf/test_hf_import.py compares them with transformers' config classes).
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.bridge import (
    LAYER,
    OURS,
    QKV,
    Mapping,
    Rename,
    TableImporter,
    TableTarget,
    Zeros,
    embeddings,
    head_dim,
    swiglu,
)
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.importer import REQUIRED, fill_swiglu  # noqa: F401  (remote_import reads it here)
from bam_megatron.conversion.hf.target import common_checks, gemma_setting
from bam_megatron.model.architecture import Architecture

# ===== export: the classes, what they refuse, their config.json, and the table


class LlamaTarget(TableTarget):
    """``LlamaForCausalLM``: h = x + Attn(RMSNorm x); y = h + SwiGLU(RMSNorm h); no q/k norms."""

    name = "llama"
    architecture_class = "LlamaForCausalLM"
    model_type = "llama"
    moe = False
    # "never"; "always" (Qwen2: biases of zeros where the model has none); "either" (a config flag);
    # "with_output" (Llama's attention_bias: q/k/v biases and an o_proj bias, written as zeros)
    qkv_bias = "with_output"
    qk_norm = False
    norm_placement = "pre"  # Llama's norms come before attention and MLP (OLMo 2's after: `olmo2`)
    qk_norm_scope = "head"  # with qk_norm: Qwen3's per head (OLMo 2's over the whole projection)
    gemma = False  # Gemma's layer: (1 + w) norms, GeGLU, scaled embeddings (`gemma3`)

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
        gemma = gemma_setting(a)
        if self.gemma and not (a.apply_layernorm_1p and a.activation == "geglu" and a.scale_embeddings):
            return (
                f"apply_layernorm_1p={a.apply_layernorm_1p}, activation={a.activation}, scale_embeddings="
                f"{a.scale_embeddings}: {cls} has (1 + weight) norms, GeGLU and scaled embeddings (export with "
                "--format llama)"
            )
        if not self.gemma and gemma is not None and gemma != f"norm_placement={self.norm_placement}":
            return f"{gemma}: {cls} has no such setting (Gemma's: export with --format gemma3_text)"
        if a.norm_placement != self.norm_placement:
            where = {"pre": "before", "post": "after"}[self.norm_placement]
            native = {"post": "--format olmo2", "both": "--format gemma3_text", "pre": "--format llama"}
            hint = "--format bam: remote code" if a.is_moe else native[a.norm_placement]
            return (
                f"norm_placement={a.norm_placement}: {cls}'s norms come {where} attention and MLP (export with {hint})"
            )
        if a.qk_layernorm and a.qk_layernorm_scope != self.qk_norm_scope:
            return (
                f"qk_layernorm_scope={a.qk_layernorm_scope}: {cls}'s q/k norms are over each {self.qk_norm_scope} "
                "(export with --format bam: remote code)"
            )
        if a.add_qkv_bias and self.qkv_bias == "never":
            return f"add_qkv_bias=True: {cls} has no q/k/v biases (export with --format llama or qwen2_moe)"
        if a.qk_layernorm != self.qk_norm:
            if a.qk_layernorm:
                return f"qk_layernorm=True: {cls} has no q/k norms (export with --format qwen3 or qwen3_moe)"
            hint = "--format llama or qwen2" if self.norm_placement == "pre" else "--format bam: remote code"
            return f"qk_layernorm=False: {cls} always normalises q and k (export with {hint})"
        return common_checks(config)

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """config.json fields of this family beyond the shared ones: ``attention_bias`` for q/k/v biases
        (Llama's adds one to o_proj too, written as zeros: the same function)."""
        return {"attention_bias": a.add_qkv_bias, "mlp_bias": False, "pretraining_tp": 1}

    def hf_config(self, a: Architecture, config, meta, token_ids: dict[str, Any]) -> dict[str, Any]:
        """The shared decoder fields, the head size, RMSNorm epsilon and the family's own (`family_config`)."""
        return {
            **self.decoder_config(a, config, meta, token_ids),
            "head_dim": config.kv_channels,
            "rms_norm_eps": a.norm_epsilon,
            **self.family_config(a),
        }

    # ----- the table
    def mappings(self, a: Architecture, **options: Any) -> list[Mapping]:
        """Embeddings; per layer the norms, the attention (`attention`) and the FFN (`ffn`)."""
        return [
            *embeddings(a),
            Rename(LAYER + "input_layernorm.weight", OURS + "input_layernorm.weight"),
            *self.attention(a),
            Rename(LAYER + "post_attention_layernorm.weight", OURS + "pre_mlp_layernorm.weight"),
            *self.ffn(a),
        ]

    def qkv_names(self, kind: str) -> tuple[str, ...]:
        """The Hugging Face Q, K, V tensors of a layer (``kind``: weight or bias)."""
        return tuple(f"{LAYER}self_attn.{x}_proj.{kind}" for x in "qkv")

    def attention(self, a: Architecture) -> list[Mapping]:
        """Q/K/V (fused by KV group), o_proj; the family's biases; per-head q/k norms."""
        theirs, ours = LAYER + "self_attn.", OURS + "self_attention."
        heads, groups, d = a.num_attention_heads, a.num_query_groups, head_dim(a)
        table: list[Mapping] = [
            QKV(self.qkv_names("weight"), ours + "linear_qkv.weight", heads=heads, groups=groups),
            Rename(theirs + "o_proj.weight", ours + "linear_proj.weight"),
        ]
        if a.add_qkv_bias:
            table.append(QKV(self.qkv_names("bias"), ours + "linear_qkv.bias", heads=heads, groups=groups))
            if self.qkv_bias == "with_output":
                table.append(
                    Zeros(
                        theirs + "o_proj.bias",
                        shape=((a.hidden_size,),),
                        refusal="attention_bias=True: tensor {name} is not zero (megatron-core's attention output "
                        "projection has no bias; its q/k/v biases are add_qkv_bias)",
                    )
                )
        elif self.qkv_bias == "always":  # biases of zeros: the same function as none
            table.append(Zeros(self.qkv_names("bias"), shape=((heads * d,), (groups * d,), (groups * d,))))
        if a.qk_layernorm:
            table += [
                Rename(theirs + "q_norm.weight", ours + "q_layernorm.weight"),
                Rename(theirs + "k_norm.weight", ours + "k_layernorm.weight"),
            ]
        return table

    def ffn(self, a: Architecture) -> list[Mapping]:
        """The dense SwiGLU FFN: ``mlp.{gate,up,down}_proj``."""
        return swiglu(LAYER + "mlp.", OURS + "mlp.")


class MistralTarget(LlamaTarget):
    """``MistralForCausalLM``: Llama's decoder; exported with ``sliding_window: null`` (full causal, as ours)."""

    name = "mistral"
    architecture_class = "MistralForCausalLM"
    model_type = "mistral"
    qkv_bias = "never"

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window: bam-megatron's attention is full causal."""
        return {"sliding_window": None}


def qwen_window(a: Architecture) -> dict[str, Any]:
    """Qwen's config.json fields for no sliding window on any layer."""
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
        return qwen_window(a)


class Qwen3Target(LlamaTarget):
    """``Qwen3ForCausalLM``: Llama's decoder with per-head q/k RMSNorms and a free head size."""

    name = "qwen3"
    architecture_class = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qkv_bias = "never"
    qk_norm = True

    def family_config(self, a: Architecture) -> dict[str, Any]:
        """No sliding window, no attention biases (Qwen3's would include o_proj)."""
        return {**qwen_window(a), "attention_bias": False}


# ===== import: config.json's checks (the table is the target's)

_SIZES = {key: REQUIRED for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
_COMMON = {
    **_SIZES,
    "num_attention_heads": REQUIRED,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
}


class LlamaImporter(TableImporter):
    """``LlamaForCausalLM`` (Llama 2, 3, 3.1-3.3: GQA, ``llama3`` RoPE scaling, tied or untied)."""

    model_type = "llama"
    architecture_class = "LlamaForCausalLM"
    target = LlamaTarget()
    defaults = {
        **_COMMON,
        "num_key_value_heads": None,
        "head_dim": None,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    }
    qkv_bias = False
    qk_norm = False
    allow_llama3 = True  # the rope_type 'llama3' (Phi-3's class computes no such scaling)

    def check_family(self) -> None:
        """The settings of this family beyond the shared ones: ``attention_bias`` (q/k/v biases, and o_proj
        biases that must be zeros, as bam-convert-hf exports q/k/v biases to Llama)."""
        self.qkv_bias = bool(self.get("attention_bias"))
        self.require("mlp_bias", False, "bam-megatron's MLP has no biases")

    def check(self) -> Architecture:
        """Check config.json; the seed's architecture (sequential block, RMSNorm, SwiGLU, RoPE)."""
        self.check_family()
        self.check_activation()
        eps = self.get("rms_norm_eps")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConversionError(f"rms_norm_eps={eps}: must be a positive number")
        hidden, heads = self.get("hidden_size"), self.get("num_attention_heads")
        groups = self.groups()
        head_dim = self.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConversionError(
                    f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} and head_dim is not given"
                )
            head_dim = hidden // heads
        if not isinstance(head_dim, int) or head_dim < 1 or head_dim % 2:
            raise ConversionError(f"head_dim={head_dim}: must be a positive even integer (RoPE rotates pairs)")
        theta, scaling = self.rope(self.allow_llama3)
        self.head_dim, self.heads, self.kv_heads = head_dim, heads, groups
        return Architecture(
            num_layers=self.get("num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups,
            padded_vocab_size=self.get("vocab_size"),
            block_type="sequential",
            normalization="RMSNorm",
            rotary_base=theta,
            untie_embeddings_and_output_weights=not self.get("tie_word_embeddings"),
            kv_channels=None if head_dim * heads == hidden else head_dim,
            norm_epsilon=float(eps),
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
            rope_scaling_factor=scaling,
            **self.ffn_fields(),
        )

    def check_activation(self) -> None:
        """The MLP is SwiGLU."""
        self.require("hidden_act", "silu", "the MLP is SwiGLU")

    def ffn_fields(self) -> dict:
        """The Architecture fields of the FFN: a dense SwiGLU of ``intermediate_size``."""
        return {"variant": "dense", "ffn_hidden_size": self.get("intermediate_size")}

    def check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """As every family; with Llama's ``attention_bias``, a missing bias names the setting."""
        if self.qkv_bias and self.target.qkv_bias == "with_output":
            for name in self.tensor_shapes():
                if name.endswith("_proj.bias") and name not in shapes:
                    raise ConversionError(f"attention_bias=True but tensor {name} is missing from the checkpoint")
        super().check_tensors(shapes)


def sliding_window_refusal(window: Optional[int], seq_length: int) -> None:
    """Refuse a ``sliding_window`` shorter than the recorded sequence (exact only up to the window)."""
    if window is not None and window < seq_length:
        raise ConversionError(
            f"sliding_window={window}: each token attends to the last {window} only, bam-megatron's "
            f"attention is full causal; exact for sequences up to {window} tokens: import with "
            f"--seq-length {window} (the recorded length is {seq_length})"
        )


class MistralImporter(LlamaImporter):
    """``MistralForCausalLM``: Llama's decoder; a ``sliding_window`` shorter than the sequence is refused."""

    model_type = "mistral"
    architecture_class = "MistralForCausalLM"
    target = MistralTarget()
    defaults = {
        **_COMMON,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096,
    }

    def check_family(self) -> None:
        """Sliding-window attention: exact (the window never bites) only up to the window's length."""
        sliding_window_refusal(self.get("sliding_window"), self.seq_length)


class Qwen2Importer(LlamaImporter):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5): biases on q/k/v; a sliding window that bites is refused."""

    model_type = "qwen2"
    architecture_class = "Qwen2ForCausalLM"
    target = Qwen2Target()
    defaults = {
        **_COMMON,
        "num_key_value_heads": 32,
        "head_dim": None,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
    }
    qkv_bias = True

    def check_family(self) -> None:
        """Qwen's per-layer sliding window (``use_sliding_window``, ``max_window_layers``, ``layer_types``)."""
        layers = self.get("num_hidden_layers")
        window = self.get("sliding_window") if self.get("use_sliding_window") else None
        types = self.get("layer_types")
        if types is None:
            types = self.derived_layer_types(window, layers)
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown or len(types) != layers:
            raise ConversionError(f"layer_types={types}: expected {layers} of full_attention or sliding_attention")
        sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        if window is not None and sliding and window < self.seq_length:
            raise ConversionError(
                f"use_sliding_window=true: layers {sliding[0]}-{sliding[-1]} attend to the last "
                f"sliding_window={window} tokens only, bam-megatron's attention is full causal; exact for "
                f"sequences up to {window} tokens: import with --seq-length {window} (the recorded length is "
                f"{self.seq_length})"
            )

    def derived_layer_types(self, window, layers: int) -> list[str]:
        """transformers' layer_types when config.json gives none: sliding from ``max_window_layers`` on."""
        start = self.get("max_window_layers")
        return ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(layers)]


class Qwen3Importer(Qwen2Importer):
    """``Qwen3ForCausalLM``: per-head RMSNorm on q and k, ``head_dim`` (default 128) free of hidden/heads."""

    model_type = "qwen3"
    architecture_class = "Qwen3ForCausalLM"
    target = Qwen3Target()
    defaults = {**Qwen2Importer.defaults, "head_dim": 128, "attention_bias": False}
    qkv_bias = False
    qk_norm = True

    def check_family(self) -> None:
        """No biases (Qwen3's attention_bias would add an o_proj bias too); Qwen's sliding window."""
        self.require("attention_bias", False, "biases on q/k/v and o_proj; megatron-core's QKV bias has no o_proj bias")
        super().check_family()
