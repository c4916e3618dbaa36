"""A dense parallel-block model <-> transformers' ``CohereForCausalLM``, tensor for tensor.

Cohere's decoder layer is our block: ``y = x + Attn(LN(x)) + SwiGLU(LN(x))`` with one bias-free
LayerNorm, no linear biases, a final norm and (optionally tied) embeddings. What differs is notation:

- megatron-core fuses Q, K, V into ``linear_qkv`` (grouped per KV head: the group's query heads,
  then its key, then its value; `qkv_layout.split_qkv`) and gate/up into ``linear_fc1`` = [gate; up];
- RoPE pairs channel i with i + d/2 in megatron-core (rotate-half), but channels 2i and 2i+1 in
  Cohere (interleaved). Permuting each Q and K head's rows (``2i <- i``, ``2i+1 <- i + d/2``) makes
  Cohere's rotation of the permuted vector the permutation of ours; attention scores are dot
  products over all channels, so they are unchanged (up to summation order);
- Cohere multiplies logits by ``logit_scale``: exported as 1.0; on import it is folded into the
  final norm's weight (exact for powers of two, such as Cohere's 0.0625 and 0.125).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.model.architecture import Architecture
from bam_megatron.model.qkv_layout import merge_qkv, split_qkv

LAYERNORM_EPS = 1e-5  # megatron-core's layernorm_epsilon, which bam-megatron does not change


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row ``p`` of a Cohere (interleaved-RoPE) head is row ``perm[p]`` of a megatron-core head."""
    p = torch.arange(head_dim)
    return p // 2 + (p % 2) * (head_dim // 2)


def _permute_heads(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[heads, d, in] -> rows permuted within each head, flattened to [heads·d, in]."""
    return weight[:, perm].reshape(-1, weight.shape[-1])


def check_exportable(config, variant: str) -> None:
    """Refuse, naming the setting, anything CohereForCausalLM cannot compute exactly."""
    if variant != "dense":
        raise ConversionError(
            f"variant={variant}: CohereForCausalLM has no experts; export with --format bam "
            "(self-contained remote code)"
        )
    checks = [
        (
            "normalization",
            config.normalization,
            "LayerNorm",
            "Cohere's norm is a bias-free LayerNorm: train with --normalization LayerNorm, or export with --format bam",
        ),
        ("block_type", config.block_type, "parallel", "Cohere's block is the parallel one"),
        ("add_bias_linear", config.add_bias_linear, False, "Cohere's MLP has no biases"),
        ("gated_linear_unit", config.gated_linear_unit, True, "Cohere's MLP is SwiGLU"),
        ("activation_func", config.activation_func, F.silu, "Cohere's MLP is SwiGLU"),
        ("qk_layernorm", config.qk_layernorm, False, "export with --format bam"),
        ("rotary_interleaved", config.rotary_interleaved, False, "not supported"),
        (
            "kv_channels",
            config.kv_channels,
            config.hidden_size // config.num_attention_heads,
            "Cohere's head size is hidden_size / num_attention_heads",
        ),
        ("layernorm_epsilon", config.layernorm_epsilon, LAYERNORM_EPS, "not supported"),
        ("add_qkv_bias", config.add_qkv_bias, False, "Cohere's attention has no biases"),
        ("rope_scaling_factor", config.rope_scaling_factor, None, "not supported"),
    ]
    for name, value, wanted, hint in checks:
        if value != wanted:
            shown = getattr(value, "__name__", value)
            raise ConversionError(
                f"{name}={shown}: CohereForCausalLM needs {getattr(wanted, '__name__', wanted)} ({hint})"
            )


def to_cohere(
    weights: dict[str, torch.Tensor], config, meta: CheckpointMeta, token_ids: dict[str, Optional[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our parameters (megatron-core names) -> (Cohere tensors, Cohere config.json)."""
    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    perm = rope_permutation(d)
    tied = not meta.architecture.untie_embeddings_and_output_weights
    out = {
        "model.embed_tokens.weight": weights["embedding.word_embeddings.weight"],
        "model.norm.weight": weights["decoder.final_layernorm.weight"],
    }
    if not tied:
        out["lm_head.weight"] = weights["output_layer.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(weights[ours + "self_attention.linear_qkv.weight"], heads, groups)
        gate, up = weights[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update(
            {
                theirs + "input_layernorm.weight": weights[ours + "input_layernorm.weight"],
                theirs + "self_attn.q_proj.weight": _permute_heads(q, perm),
                theirs + "self_attn.k_proj.weight": _permute_heads(k, perm),
                theirs + "self_attn.v_proj.weight": v.reshape(-1, v.shape[-1]),
                theirs + "self_attn.o_proj.weight": weights[ours + "self_attention.linear_proj.weight"],
                theirs + "mlp.gate_proj.weight": gate,
                theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": weights[ours + "mlp.linear_fc2.weight"],
            }
        )
    hf_config = {
        "architectures": ["CohereForCausalLM"],
        "model_type": "cohere",
        "vocab_size": out["model.embed_tokens.weight"].shape[0],
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "hidden_act": "silu",
        "max_position_embeddings": meta.seq_length,
        "layer_norm_eps": config.layernorm_epsilon,
        "logit_scale": 1.0,
        "tie_word_embeddings": tied,
        "use_qk_norm": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_method_std,
        "use_cache": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rotary_base)},
        "rope_theta": float(config.rotary_base),  # transformers 4.x's key (5.x reads rope_parameters)
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"),
    }
    return out, hf_config


def _rope_theta(cfg: dict[str, Any]) -> float:
    """rope_theta from a transformers v5 (``rope_parameters``) or v4 (top-level) config."""
    params = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling"):
        raise ConversionError(f"rope_scaling={cfg['rope_scaling']}: only plain RoPE is supported")
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"rope_parameters.rope_type={rope_type}: only plain RoPE ('default') is supported")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConversionError("config.json gives no rope_theta (rope_parameters.rope_theta)")
    return float(theta)


def check_importable(cfg: dict[str, Any]) -> None:
    """Refuse, naming the field, a config.json that is not a Cohere model bam-megatron can hold."""
    if cfg.get("model_type") != "cohere":
        raise ConversionError(
            f"model_type={cfg.get('model_type')}: only Cohere (CohereForCausalLM) checkpoints can be imported"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConversionError(f"config.json: {key} must be a positive integer, got {cfg.get(key)!r}")
    wrong = [
        (key, cfg.get(key), wanted)
        for key, wanted in (("use_qk_norm", False), ("attention_bias", False), ("hidden_act", "silu"))
        if cfg.get(key, wanted) != wanted
    ]
    if wrong:
        key, value, wanted = wrong[0]
        raise ConversionError(f"{key}={value}: bam-megatron's dense model needs {key}={wanted}")
    if cfg.get("layer_norm_eps", LAYERNORM_EPS) != LAYERNORM_EPS:
        raise ConversionError(f"layer_norm_eps={cfg['layer_norm_eps']}: bam-megatron's LayerNorm uses {LAYERNORM_EPS}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    groups = cfg.get("num_key_value_heads") or heads
    if hidden % heads or heads % groups:
        raise ConversionError(
            f"num_attention_heads={heads}, num_key_value_heads={groups}, hidden_size={hidden}: "
            "heads must divide hidden_size and KV heads must divide heads"
        )
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(
            f"head_dim={cfg['head_dim']}: bam-megatron's head size is hidden_size / num_attention_heads"
        )
    _rope_theta(cfg)


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        raise ConversionError(f"tensor {name} is missing from the checkpoint")
    tensor = tensors[name]
    if tuple(tensor.shape) != shape:
        raise ConversionError(f"tensor {name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
    return tensor.float()


def from_cohere(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Architecture]:
    """(Cohere tensors, config.json) -> (our parameters, their architecture). Call check_importable first."""
    vocab, hidden, ffn = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    d = hidden // heads
    inverse = torch.argsort(rope_permutation(d))  # Cohere rows -> megatron-core rows
    tied = cfg.get("tie_word_embeddings", True)
    seen = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        seen.add(name)
        return _take(tensors, name, shape)

    embedding = take("model.embed_tokens.weight", (vocab, hidden))
    scale = cfg.get("logit_scale")
    final_norm = take("model.norm.weight", (hidden,)) * (1.0 if scale is None else float(scale))
    out = {"embedding.word_embeddings.weight": embedding, "decoder.final_layernorm.weight": final_norm}
    if not tied:
        out["output_layer.weight"] = take("lm_head.weight", (vocab, hidden))
    elif "lm_head.weight" in tensors:  # some checkpoints store the tied copy too
        if not torch.equal(take("lm_head.weight", (vocab, hidden)), embedding):
            raise ConversionError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
            )
    for i in range(layers):
        theirs, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = take(theirs + "self_attn.q_proj.weight", (heads * d, hidden)).view(heads, d, hidden)[:, inverse]
        k = take(theirs + "self_attn.k_proj.weight", (groups * d, hidden)).view(groups, d, hidden)[:, inverse]
        v = take(theirs + "self_attn.v_proj.weight", (groups * d, hidden)).view(groups, d, hidden)
        out.update(
            {
                ours + "input_layernorm.weight": take(theirs + "input_layernorm.weight", (hidden,)),
                ours + "self_attention.linear_qkv.weight": merge_qkv(q, k, v),
                ours + "self_attention.linear_proj.weight": take(
                    theirs + "self_attn.o_proj.weight", (hidden, heads * d)
                ),
                ours + "mlp.linear_fc1.weight": torch.cat(
                    [
                        take(theirs + "mlp.gate_proj.weight", (ffn, hidden)),
                        take(theirs + "mlp.up_proj.weight", (ffn, hidden)),
                    ]
                ),
                ours + "mlp.linear_fc2.weight": take(theirs + "mlp.down_proj.weight", (hidden, ffn)),
            }
        )
    extra = sorted(name for name in tensors if name not in seen and not name.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConversionError(
            f"tensor {extra[0]} is not part of a {layers}-layer Cohere model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    architecture = Architecture(
        variant="dense",
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        untie_embeddings_and_output_weights=not tied,
        normalization="LayerNorm",
        rotary_base=_rope_theta(cfg),
        padded_vocab_size=vocab,
    )
    return out, architecture
