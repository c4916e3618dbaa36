"""bam-convert-hf's own remote-code exports (``model_type: bam_megatron``) -> checkpoints again.

Every variant and block goes out as remote code where no transformers class computes it, so the
way back reads that format too: config.json holds what the remote code computes (`remote/`), and
the tensors are bam-megatron's own, renamed (the wide attention as one ``q_proj`` of N·H heads in
megatron-core's order, ``k_proj``/``v_proj`` with its K/V heads, ``router`` the attention router;
FFN experts ``mlp.experts.E.*`` with ``mlp.router``). The checkpoint's architecture is read from
config.json and checked as any architecture (`Architecture`), then every tensor against it.
"""

from __future__ import annotations

from typing import Any

import torch

from bam_megatron.conversion.hf.bam_format import layer_norms
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.hf_files import SafetensorsWeights
from bam_megatron.conversion.hf.importer import (
    TOP,
    Importer,
    attention_shapes,
    embedding_shapes,
    fill_qkv,
    swiglu_shapes,
)
from bam_megatron.conversion.hf.llama import fill_swiglu
from bam_megatron.errors import ConfigError
from bam_megatron.model.architecture import Architecture

_KV_MODE = {"bam": "expert", "bam-shared-kv": "shared"}


class BamImporter(Importer):
    """``BamForCausalLM`` directories (``bam-convert-hf export --format bam``): dense, BTX, BAM, BAM shared-KV."""

    model_type = "bam_megatron"
    architecture_class = "BamForCausalLM"
    defaults = {  # remote/configuration_bam.py's
        "variant": "dense",
        "block_type": "parallel",
        "moe_intermediate_size": None,
        "num_key_value_heads": None,
        "attention_heads_per_expert": None,
        "key_value_heads_per_expert": None,
        "head_dim": None,
        "num_attention_experts": 1,
        "attention_kv_mode": "expert",
        "attention_router_topk": None,
        "qkv_bias": False,
        "qk_norm": False,
        "qk_norm_scope": "head",
        "norm_placement": "pre",
        "apply_layernorm_1p": False,
        "activation": "swiglu",
        "scale_embeddings": False,
        "query_pre_attn_scalar": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "local_rotary_base": None,
        "global_attention_every": None,
        "num_experts": 0,
        "num_experts_per_tok": 1,
        "moe_router_pre_softmax": True,
        "moe_router_topk_scaling_factor": None,
        "router_bias": False,
        "normalization": "RMSNorm",
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling_factor": None,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }

    def check(self) -> Architecture:
        """The architecture config.json describes, checked as any bam-megatron architecture."""
        variant = self.get("variant")
        n, experts = self.get("num_attention_experts"), self.get("num_experts") or 0
        soft_moa = variant in _KV_MODE
        if soft_moa and (n != experts or self.get("attention_kv_mode") != _KV_MODE[variant]):
            raise ConversionError(
                f"variant={variant} with num_attention_experts={n}, num_experts={experts}, attention_kv_mode="
                f"{self.get('attention_kv_mode')}: expected {experts} attention experts with {_KV_MODE[variant]} K/V"
            )
        if not soft_moa and n != 1:
            raise ConversionError(f"variant={variant} with num_attention_experts={n}: only bam variants have several")
        if (variant == "dense") != (experts == 0):
            raise ConversionError(f"variant={variant} with num_experts={experts}")
        # each expert's heads: their own fields, or (exports written before them) the standard ones
        per_expert = self.get("attention_heads_per_expert") is not None
        hidden = self.get("hidden_size")
        heads = self.get("attention_heads_per_expert" if per_expert else "num_attention_heads")
        groups = self.get("key_value_heads_per_expert" if per_expert else "num_key_value_heads") or heads
        head_dim = self.get("head_dim") or hidden // heads
        ffn = self.get("moe_intermediate_size") if experts else None
        try:
            architecture = Architecture(
                variant=variant,
                num_layers=self.get("num_hidden_layers"),
                hidden_size=hidden,
                ffn_hidden_size=ffn or self.get("intermediate_size"),
                num_attention_heads=heads,
                num_query_groups=groups,
                padded_vocab_size=self.get("vocab_size"),
                num_experts=experts or None,
                moe_router_topk=self.get("num_experts_per_tok") if experts else 1,
                attention_router_topk=self.get("attention_router_topk"),
                block_type=self.get("block_type"),
                normalization=self.get("normalization"),
                rotary_base=float(self.get("rope_theta")),
                untie_embeddings_and_output_weights=not self.get("tie_word_embeddings"),
                kv_channels=None if head_dim * heads == hidden else head_dim,
                norm_epsilon=float(self.get("norm_eps")),
                add_qkv_bias=bool(self.get("qkv_bias")),
                qk_layernorm=bool(self.get("qk_norm")),
                qk_layernorm_scope=self.get("qk_norm_scope"),
                norm_placement=self.get("norm_placement"),
                apply_layernorm_1p=bool(self.get("apply_layernorm_1p")),
                activation=self.get("activation"),
                scale_embeddings=bool(self.get("scale_embeddings")),
                query_pre_attn_scalar=self.get("query_pre_attn_scalar"),
                attn_logit_softcapping=self.get("attn_logit_softcapping"),
                final_logit_softcapping=self.get("final_logit_softcapping"),
                local_rotary_base=self.get("local_rotary_base"),
                global_attention_every=self.get("global_attention_every"),
                rope_scaling_factor=self.get("rope_scaling_factor"),
                moe_router_pre_softmax=bool(self.get("moe_router_pre_softmax")),
                moe_router_topk_scaling_factor=self.get("moe_router_topk_scaling_factor"),
                router_bias=bool(self.get("router_bias")),
            )
        except ConfigError as error:
            raise ConversionError(f"config.json does not describe a bam-megatron model: {error}") from None
        self.head_dim, self.experts = head_dim, n
        self.wide_heads = n * heads
        self.kv_heads = architecture.num_query_groups * (n if _KV_MODE.get(variant) == "expert" else 1)
        wide = (self.get("num_attention_heads"), self.get("num_key_value_heads"))
        if per_expert and wide != (self.wide_heads, self.kv_heads):
            raise ConversionError(
                f"num_attention_heads={wide[0]}, num_key_value_heads={wide[1]}: the wide attention of {n} experts "
                f"of {heads} heads ({groups} K/V) has {self.wide_heads} query and {self.kv_heads} K/V heads"
            )
        return architecture

    def record(self) -> dict[str, Any]:
        """The variant and block (the remote code computes every one)."""
        return {"variant": self.architecture.variant, "block_type": self.architecture.block_type}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the remote code's model holds, by name, with its shape."""
        a = self.architecture
        vocab, hidden, ffn = a.padded_vocab_size, a.hidden_size, a.ffn_hidden_size
        q, kv = self.wide_heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = embedding_shapes(vocab, hidden, a.untie_embeddings_and_output_weights)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            shapes.update(attention_shapes(p, hidden, q, kv))
            if a.add_qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)})
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
            if a.qk_layernorm and a.qk_layernorm_scope == "projection":  # every channel of the wide Q / K
                shapes[p + "self_attn.q_norm.weight"], shapes[p + "self_attn.k_norm.weight"] = (q,), (kv,)
            elif a.qk_layernorm:  # soft MoA: a row per expert (shared K/V: one K norm)
                rows = (self.experts,) if self.experts > 1 else ()
                shapes[p + "self_attn.q_norm.weight"] = (*rows, self.head_dim)
                shared = _KV_MODE.get(a.variant) == "shared"
                shapes[p + "self_attn.k_norm.weight"] = (*(() if shared else rows), self.head_dim)
            if self.experts > 1:
                shapes[p + "self_attn.router.weight"] = (self.experts, hidden)
                if a.router_bias:
                    shapes[p + "self_attn.router.bias"] = (self.experts,)
            shapes.update({p + name: (hidden,) for name, _ in layer_norms(a)})
            mlps = [f"{p}mlp.experts.{e}." for e in range(a.num_experts or 0)] or [p + "mlp."]
            if a.num_experts:
                shapes[p + "mlp.router.weight"] = (a.num_experts, hidden)
                if a.router_bias:
                    shapes[p + "mlp.router.bias"] = (a.num_experts,)
            for m in mlps:
                shapes.update(swiglu_shapes(m, hidden, ffn))
        return shapes

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """A tied model's lm_head.weight, if stored (it must equal the embedding)."""
        a = self.architecture
        return {} if a.untie_embeddings_and_output_weights else {"lm_head.weight": (a.padded_vocab_size, a.hidden_size)}

    def fill(self, unit: int, params: dict[str, torch.Tensor], source: SafetensorsWeights) -> None:
        """Write one unit of our model from the remote-code tensors (the wide attention as it is)."""
        read, a = source.read, self.architecture
        if unit == TOP:
            embedding = params["embedding.word_embeddings.weight"]
            embedding.copy_(read("model.embed_tokens.weight"))
            params["decoder.final_layernorm.weight"].copy_(read("model.norm.weight"))
            if a.untie_embeddings_and_output_weights:
                params["output_layer.weight"].copy_(read("lm_head.weight"))
            elif "lm_head.weight" in source and not torch.equal(read("lm_head.weight").float(), embedding):
                raise ConversionError(
                    "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
                )
            return
        theirs, ours = f"model.layers.{unit}.", f"decoder.layers.{unit}."
        attention = ours + "self_attention."
        for kind in ("weight", "bias") if a.add_qkv_bias else ("weight",):
            fill_qkv(
                params[f"{attention}linear_qkv.{kind}"],
                *(read(f"{theirs}self_attn.{x}_proj.{kind}") for x in "qkv"),
                self.wide_heads,
                self.kv_heads,
            )
        params[attention + "linear_proj.weight"].copy_(read(theirs + "self_attn.o_proj.weight"))
        if a.qk_layernorm:
            params[attention + "q_layernorm.weight"].copy_(read(theirs + "self_attn.q_norm.weight"))
            params[attention + "k_layernorm.weight"].copy_(read(theirs + "self_attn.k_norm.weight"))
        if self.experts > 1:
            params[attention + "router.weight"].copy_(read(theirs + "self_attn.router.weight"))
            if a.router_bias:
                params[attention + "router.bias"].copy_(read(theirs + "self_attn.router.bias"))
        for name, mine in layer_norms(a):
            params[ours + mine].copy_(read(theirs + name))
        if a.num_experts:
            params[ours + "mlp.router.weight"].copy_(read(theirs + "mlp.router.weight"))
            if a.router_bias:
                params[ours + "mlp.router.bias"].copy_(read(theirs + "mlp.router.bias"))
            for e in range(a.num_experts):
                fill_swiglu(
                    params,
                    f"{ours}mlp.experts.local_experts.{e}.",
                    read,
                    f"{theirs}mlp.experts.{e}.",
                    a.ffn_hidden_size,
                )
        else:
            fill_swiglu(params, ours + "mlp.", read, theirs + "mlp.", a.ffn_hidden_size)
