"""FLOPs per token and parameter counts of a model, from its config (docs/design.md §6).

What `bam-stats` reports and what the training loop logs as TFLOP/s: one convention, one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bam_megatron.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from bam_megatron.model.config import BAMConfig

PARTS = ("embedding", "attention", "ffn", "routers", "norms", "output_layer", "other")
"""The parts `count_parameters` splits a model into, in report order."""

FLOPS_CONVENTION = (
    "docs/design.md section 6: forward FLOPs per token per transformer layer = 2 per weight of every "
    "weight matrix the token passes through (QKV and output projection of every attention "
    "expert, the FFN weights of its top-k experts, both routers) + 2*n_ctx*d_attn per attention "
    "expert (d_attn = heads x head dim of one expert); norms, biases, embeddings and the output "
    "layer excluded. Training FLOPs per token = 3 x forward x num_layers."
)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a built model: total, active per token, and the total split by part."""

    total: int
    active: int
    by_part: dict[str, int]


def flops_per_token(config: BAMConfig, seq_length: int) -> dict[str, int]:
    """Forward FLOPs per token of one transformer layer in the docs/design.md §6 convention.

    Kaplan et al. (2020) style, so that dense, BAM and BTX models compare on one scale:

    - ``attention``: 2 x the Q, K, V and output projection weights of every attention expert
      (soft MoA: a token visits all N; shared KV: one K and V for all), plus 2*n_ctx*d_attn per
      expert for attending over the context, d_attn = heads x head dim of one expert. That term
      is the causal half of QK^T and AV (the average token sees n_ctx/2 keys:
      2 products x (n_ctx/2)*d_attn multiply-adds x 2 FLOPs); a kernel that computes the full
      masked square does twice that.
    - ``ffn``: 2 x the weights of the token's top-k FFN experts (the dense MLP for ``dense``).
    - ``router``: 2 x the attention router (N x d, only when N > 1) and the FFN router (E x d).

    The top-k attention ablation (``attention_router_topk``) is counted as soft MoA: the model
    still computes every expert's heads.
    """
    if seq_length < 1:
        raise ConfigError(f"--seq-length must be >= 1, got {seq_length}")
    d = config.hidden_size
    n_attention = config.num_attention_experts
    d_attn = config.num_attention_heads * config.kv_channels  # one expert's Q (and O) width
    d_kv = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    kv_sets = n_attention if config.attention_kv_mode == "expert" else 1
    projections = n_attention * 2 * d * d_attn + kv_sets * 2 * d * d_kv  # Q and O; K and V
    attention = 2 * projections + n_attention * 2 * seq_length * d_attn

    if config.num_moe_experts:
        ffn_size, topk = config.moe_ffn_hidden_size, config.moe_router_topk
    else:
        ffn_size, topk = config.ffn_hidden_size, 1
    fc1_rows = 2 * ffn_size if config.gated_linear_unit else ffn_size
    ffn = 2 * topk * (fc1_rows * d + ffn_size * d)

    router_rows = (n_attention if n_attention > 1 else 0) + (config.num_moe_experts or 0)
    router = 2 * router_rows * d
    return {"attention": attention, "ffn": ffn, "router": router, "total": attention + ffn + router}


def training_flops_per_token(config: BAMConfig, seq_length: int) -> int:
    """Training FLOPs per token of the whole model: 3 x forward x num_layers (docs/design.md §6).

    Embeddings and the output layer are excluded, like everything outside the transformer layers.
    """
    return 3 * config.num_layers * flops_per_token(config, seq_length)["total"]


def _part(name: str) -> str:
    """Which part of the model a parameter (by its GPTModel name) belongs to."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output_layer"
    if ".router." in name:
        return "routers"
    if ".self_attention." in name:
        return "attention"
    if ".mlp." in name:
        return "ffn"
    if "layernorm" in name:
        return "norms"
    return "other"


def count_parameters(model: torch.nn.Module, config: BAMConfig) -> ParameterCounts:
    """Count the parameters of a built model (meta or real), each shared tensor once.

    Active parameters per token: everything except the FFN experts a token does not visit, i.e.
    (E - k) / E of the expert parameters of every layer (all attention experts count: soft MoA
    sends every token to every one).
    """
    by_part: dict[str, int] = {}
    expert_params = 0
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        part = _part(name)
        by_part[part] = by_part.get(part, 0) + param.numel()
        if ".mlp.experts." in name:
            expert_params += param.numel()
    by_part = {part: by_part[part] for part in PARTS if part in by_part}
    total = sum(by_part.values())
    experts, topk = config.num_moe_experts, config.moe_router_topk
    if not experts:
        return ParameterCounts(total=total, active=total, by_part=by_part)
    if expert_params % experts:
        raise RuntimeError(f"{expert_params} expert parameters are not {experts} equal experts")
    return ParameterCounts(total=total, active=total - expert_params // experts * (experts - topk), by_part=by_part)
