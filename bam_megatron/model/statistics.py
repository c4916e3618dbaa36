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
    "layer excluded. Training FLOPs per token = 3 x forward x num_layers. The complete count "
    "(training_flops_per_token_with_output_layer) adds the output layer, 3 x 2*d*V (V = padded "
    "vocabulary, tied or not), and nothing for the embedding lookup or its gradient, as Megatron-LM's "
    "num_floating_point_operations counts them."
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
    """Training FLOPs per token of the transformer layers: 3 x forward x num_layers (docs/design.md §6).

    Embeddings and the output layer are excluded, like everything outside the transformer layers
    (the paper's Table 7 convention); `training_flops_breakdown` adds them.
    """
    return 3 * config.num_layers * flops_per_token(config, seq_length)["total"]


def output_layer_training_flops(hidden_size: int, padded_vocab_size: int) -> int:
    """Training FLOPs per token of the output layer: 3 x the logits GEMM's 2·d·V (docs/design.md §6).

    Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py, core_v0.16.1,
    the "Logit." term): forward, weight gradient and input gradient of the d x V product, V the
    padded vocabulary (the output layer's rows), whether or not it is tied to the embedding.
    """
    return 3 * 2 * hidden_size * padded_vocab_size


EMBEDDING_TRAINING_FLOPS_PER_TOKEN = 0
"""Training FLOPs per token of the input embedding, as Megatron-LM counts them: none.

Megatron-LM's ``num_floating_point_operations`` has no embedding term. The lookup is a gather (no
arithmetic) and its gradient a scatter-add of the token's d-wide output gradient into one row (d
additions, not a GEMM; the token ids have no gradient). With tied embeddings the shared matrix's
other gradient, the output layer's weight gradient, is one of the three GEMMs of the logits term,
so it is counted there. We do the same: 0 here, the tied weight gradient in
`output_layer_training_flops`."""


def training_flops_breakdown(config: BAMConfig, seq_length: int, padded_vocab_size: int) -> dict[str, int]:
    """Training FLOPs per token of the whole model by part, and their sum (docs/design.md §6).

    ``layers`` is `training_flops_per_token` (Table 7's convention); ``output_layer`` and
    ``embedding`` are counted as Megatron-LM's ``num_floating_point_operations`` counts them
    (`output_layer_training_flops`, `EMBEDDING_TRAINING_FLOPS_PER_TOKEN`). ``total`` is the complete
    count, the numerator of an MFU.
    """
    parts = {
        "layers": training_flops_per_token(config, seq_length),
        "output_layer": output_layer_training_flops(config.hidden_size, padded_vocab_size),
        "embedding": EMBEDDING_TRAINING_FLOPS_PER_TOKEN,
    }
    return {**parts, "total": sum(parts.values())}


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
