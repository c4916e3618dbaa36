"""A bam-megatron model (dense, BTX, BAM, BAM shared-KV) for Hugging Face transformers (remote code).

Written by ``bam-convert-hf export --format bam``; self-contained (torch + transformers only) and
numerically the forward pass bam-megatron trains (megatron-core GPTModel with the BAM spec):

    y = x + Attn(Norm(x)) + FFN(Norm(x))           parallel block: one shared pre-norm
    x' = x + Attn(Norm1(x)); y = x' + FFN(Norm2(x'))   sequential block (megatron-core's TransformerLayer)
    x' = x + Norm1(Attn(x)); y = x' + Norm2(FFN(x'))   sequential, norm_placement post (OLMo 2's)

    Attn(x̂) = Σ_j g_j(x̂) · O_j · MHA_j(x̂)          soft mixture of attention, g = softmax(W_r x̂ [+ b_r])
            = O · concat_heads(g_expert(head) · head(x̂))   one attention with N·H heads

    FFN(x̂) = Σ_{e ∈ top-k} p_e(x̂) · SwiGLU_e(x̂)    p = softmax(router logits) then top-k (pre-softmax,
                                                   as megatron-core's default), or softmax over the
                                                   top-k logits; times moe_router_topk_scaling_factor

With ``router_bias`` both routers add a per-expert bias to their logits (fp32 for the attention
router, the logits' dtype for the FFN router, as bam-megatron); ``router_expert_groups`` (a grown
mixture's) computes the router GEMM per group of experts, as bam-megatron does, so the old experts'
logits keep their bits. Norms are RMSNorm or bias-free LayerNorm. RoPE is megatron-core's (non-interleaved halves, base
``rope_theta``, optionally Llama-3's frequency scaling); attention is causal with scale
1/sqrt(head_dim); optional q/k/v biases and q/k norms (before RoPE; per head, or over each expert's
whole projection: ``qk_norm_scope``), no other biases. A
dense model is N = 1 attention expert and no FFN experts.

Serving: the wide attention is one call through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``: ``eager``, ``sdpa``, ``flex_attention``, ``flash_attention_2``... as
``attn_implementation`` picks) with N·H query heads and N·H_kv (expert K/V) or H_kv (shared K/V)
K/V heads, grouped-query style; masks come from ``transformers.masking_utils.create_causal_mask``
(left padding, static caches), the cache is any transformers ``Cache`` (``DynamicCache``,
``StaticCache`` via ``generate(cache_implementation="static")``: one layer cache of the wide
attention's K/V heads), and the forward pass compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_bam import BamConfig


class BamOnePlusNorm(nn.Module):
    """(1 + weight) x Norm(x) in fp32, weight from 0 (``apply_layernorm_1p``: Gemma's RMSNorm; megatron-core's
    layernorm_zero_centered_gamma)."""

    def __init__(self, size: int, eps: float, rms: bool) -> None:
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, y = x.shape[-1:], x.float()
        y = F.rms_norm(y, shape, eps=self.eps) if self.rms else F.layer_norm(y, shape, eps=self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def _norm(config: BamConfig, size: Optional[int] = None) -> nn.Module:
    size = config.hidden_size if size is None else size
    if getattr(config, "apply_layernorm_1p", False):
        return BamOnePlusNorm(size, config.norm_eps, config.normalization != "LayerNorm")
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(size, eps=config.norm_eps, bias=False)
    return nn.RMSNorm(size, eps=config.norm_eps)


class BamExpertHeadNorm(nn.Module):
    """Each attention expert's own per-head norm (RMSNorm or bias-free LayerNorm over head_dim), as
    bam-megatron's soft MoA: ``weight`` [N, head_dim], row e scaling expert e's heads. The heads of
    x [b, heads, t, d] form an [A, N, C] grid, row-major (see ``BamAttention.head_grid``)."""

    def __init__(self, config: BamConfig, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid, self.eps = grid, config.norm_eps
        self.rms = config.normalization != "LayerNorm"
        self.one_plus = bool(getattr(config, "apply_layernorm_1p", False))  # (1 + weight), in fp32
        self.weight = nn.Parameter(torch.ones(config.num_attention_experts, config.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, d = x.shape
        y = x.float() if self.one_plus else x
        y = F.rms_norm(y, (d,), eps=self.eps) if self.rms else F.layer_norm(y, (d,), eps=self.eps)
        (a, c), n = self.grid, self.weight.shape[0]
        weight = (1.0 + self.weight.float()) if self.one_plus else self.weight
        return (y.view(b, a, n, c, t, d) * weight.view(1, 1, n, 1, 1, d)).view(b, -1, t, d).to(x.dtype)


class BamProjectionNorm(nn.Module):
    """RMSNorm over each attention expert's whole Q (or K) projection, all its heads together (OLMo 2's
    q_norm / k_norm; bam-megatron's ``qk_layernorm_scope: projection``): ``weight`` [heads · head_dim]
    in the wide attention's head order; the heads of x [b, t, heads · d] form an [A, N, C] grid,
    row-major (see ``BamAttention.head_grid``), N the experts normalised apart."""

    def __init__(self, config: BamConfig, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.grid, self.eps = grid, config.norm_eps
        self.weight = nn.Parameter(torch.ones(math.prod(grid) * config.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a, n, c = self.grid
        y = x.float().view(b, t, a, n, c, -1)
        y = y * torch.rsqrt(y.pow(2).mean(dim=(2, 4, 5), keepdim=True) + self.eps)
        return y.view(b, t, -1).to(x.dtype) * self.weight


def _geglu(config: BamConfig) -> bool:
    return getattr(config, "activation", "swiglu") == "geglu"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _llama3_scaling(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """megatron-core's RotaryEmbedding._apply_scaling (Llama 3.1: low/high factors 1 and 4, context 8192)."""
    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class BamRotaryEmbedding(nn.Module):
    """megatron-core's RotaryEmbedding: frequencies base^(-2i/d), halves [freqs, freqs] (not interleaved).

    The frequencies are computed on each call rather than kept in a buffer: transformers builds
    models on the meta device, which would leave a non-persistent buffer uninitialised.
    """

    def __init__(self, config: BamConfig, base: Optional[float] = None) -> None:
        super().__init__()
        self.dim, self.base = config.head_dim, config.rope_theta if base is None else base
        self.scaling = getattr(config, "rope_scaling_factor", None) if base is None else None

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, t] -> cos, sin [b, 1, t, head_dim] in fp32."""
        steps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (steps / self.dim))
        if self.scaling is not None:
            inv_freq = _llama3_scaling(inv_freq, self.scaling)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # As megatron-core: cos/sin cast to the activations' dtype, then x·cos + rotate_half(x)·sin.
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class BamSwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)): megatron-core's gated MLP (fc1 = [gate; up], fc2 = down); act SiLU, or
    with ``geglu`` the tanh GELU (Gemma's)."""

    def __init__(self, hidden_size: int, intermediate_size: int, geglu: bool = False) -> None:
        super().__init__()
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if geglu else F.silu
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _router_logits(router: nn.Linear, x: torch.Tensor, groups, dtype=None) -> torch.Tensor:
    """W x, one GEMM per group of experts (``router_expert_groups``), in ``dtype`` (None: x's), plus
    the router's bias if it has one (``router_bias``), added in that dtype."""
    if groups and len(groups) > 1:
        logits = torch.cat([F.linear(x, rows) for rows in torch.split(router.weight, list(groups))], dim=-1)
    else:
        logits = F.linear(x, router.weight)
    logits = logits.to(dtype) if dtype is not None else logits
    return logits if router.bias is None else logits + router.bias.to(logits.dtype)


class BamMoE(nn.Module):
    """Top-k FFN experts with megatron-core's router (softmax score, no capacity limit: dropless).

    Eager: each expert runs on the tokens routed to it (data-dependent shapes). Under
    ``torch.compile`` (static shapes, one graph) every expert runs on every token and the routing
    weights, zero for the experts a token was not routed to, combine them: the same sum.
    """

    def __init__(self, config: BamConfig) -> None:
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.pre_softmax = config.moe_router_pre_softmax
        self.scale = getattr(config, "moe_router_topk_scaling_factor", None)
        self.router = nn.Linear(
            config.hidden_size, config.num_experts, bias=bool(getattr(config, "router_bias", False))
        )
        self.groups = getattr(config, "router_expert_groups", None)
        self.experts = nn.ModuleList(
            BamSwiGLU(config.hidden_size, config.moe_intermediate_size, _geglu(config))
            for _ in range(config.num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, h] -> (probabilities [T, k], expert indices [T, k])."""
        logits = _router_logits(self.router, x, self.groups)
        if self.pre_softmax:  # softmax over all experts, keep the top k as they are
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            probs, index = torch.topk(scores, self.topk, dim=-1)
        else:  # softmax over the top k only
            top, index = torch.topk(logits, self.topk, dim=-1)
            probs = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        if self.scale is not None:
            probs = probs * self.scale
        return probs, index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs, index = self.route(x)
        out = torch.zeros_like(x)
        if torch.compiler.is_compiling():  # static shapes: weights [T, E], zero where not routed
            weights = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
            weights = weights.scatter(1, index, probs)
            for e, expert in enumerate(self.experts):
                out = out + expert(x) * weights[:, e, None]
            return out.view(shape)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * probs[token, slot, None])
        return out.view(shape)


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv heads, s, d] -> [b, kv heads · n_rep, s, d], each K/V head repeated for its query group."""
    b, heads, s, d = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    return hidden_states[:, :, None].expand(b, heads, n_rep, s, d).reshape(b, heads * n_rep, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (as Llama's): softmax(q kᵀ · scaling + mask) v -> [b, t, heads, d]."""
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def softcapped_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 2's attention: softmax(c·tanh(q kᵀ · scaling / c) + mask) v, c = ``attn_logit_softcapping``
    (no fused kernel computes it). The mask as whichever attention implementation asked for it: an
    additive float mask, a boolean one (True: attended), or None for plain causal attention (the
    queries the last positions of the keys)."""
    cap = module.config.attn_logit_softcapping
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = torch.tanh(weights / cap) * cap
    t, s = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        weights = weights.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask[:, :, :, :s], float("-inf"))
    else:
        weights = weights + attention_mask[:, :, :, :s]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class BamAttention(nn.Module):
    """Soft mixture of N attention experts as one causal attention with N·H query heads.

    One call of transformers' attention interface over all N·H heads (K/V heads: N·H_kv with
    expert K/V, H_kv shared), then each head's output scaled by its expert's gate, then one output
    projection. N = 1 is plain (grouped-query) attention without a router. Optional q/k/v biases
    and per-head q/k norms (megatron-core's ``add_qkv_bias``, ``qk_layernorm``); with N > 1 the
    norms are each expert's own (`BamExpertHeadNorm`: weight [N, head_dim]; shared K/V: one K norm).
    """

    def __init__(self, config: BamConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.head_dim = config.head_dim
        self.num_experts = config.num_attention_experts
        self.num_heads = config.num_attention_heads  # N·H: the wide attention's
        self.num_kv_heads = config.num_key_value_heads  # N·H_kv (expert K/V) or H_kv (shared)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # query heads per K/V head
        scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma's, else head_dim
        self.scaling = (scalar or self.head_dim) ** -0.5
        self.attention_dropout = 0.0
        self.topk = config.attention_router_topk
        # Head i of the wide attention = (a, expert, c) in a [A, N, C] grid (row-major): expert K/V is
        # expert-major (A = 1, C = H); shared K/V is K/V-group-major, each expert's H / H_kv heads of a
        # group in turn (A = H_kv, C = H / H_kv); BamConfig.head_experts lists the same order.
        shared = config.attention_kv_mode == "shared"
        heads, groups = config.attention_heads_per_expert, config.key_value_heads_per_expert
        self.head_grid = (groups, heads // groups) if shared else (1, heads)
        h, d, bias = config.hidden_size, self.head_dim, bool(getattr(config, "qkv_bias", False))
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        self.projection_norm = self.qk_norm and getattr(config, "qk_norm_scope", "head") == "projection"
        if self.projection_norm:  # each expert's whole projection; shared K/V: the one K projection
            self.q_norm = BamProjectionNorm(config, (self.head_grid[0], self.num_experts, self.head_grid[1]))
            self.k_norm = BamProjectionNorm(config, (1, 1, groups) if shared else (1, self.num_experts, groups))
        elif self.qk_norm and self.num_experts > 1:  # each expert's own rows; shared K/V: one K norm
            self.q_norm = BamExpertHeadNorm(config, self.head_grid)
            self.k_norm = _norm(config, d) if shared else BamExpertHeadNorm(config, (1, groups))
        elif self.qk_norm:
            self.q_norm, self.k_norm = _norm(config, d), _norm(config, d)
        if self.num_experts > 1:
            self.router = nn.Linear(h, self.num_experts, bias=bool(getattr(config, "router_bias", False)))
            self.groups = getattr(config, "router_expert_groups", None)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g(x̂) = softmax(W_r x̂ [+ b_r]) in fp32 [b, t, N]; top-k MoA keeps the k largest, renormalised."""
        gates = torch.softmax(_router_logits(self.router, x, self.groups, torch.float32), dim=-1)
        if self.topk is not None and self.topk < self.num_experts:
            top, index = gates.topk(self.topk, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return gates

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, t, _ = hidden_states.shape
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.projection_norm:  # over the whole projection, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm and not self.projection_norm:  # per head, before RoPE (megatron-core's q/k_layernorm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, *position_embeddings), _apply_rope(k, *position_embeddings)
        if past_key_values is not None:  # keys cached after RoPE
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if getattr(self.config, "attn_logit_softcapping", None) is not None:
            attention = softcapped_attention_forward
        heads, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # [b, t, N·H, d]; query head i uses K/V head i // (N·H / K/V heads), megatron-core's grouping
        if self.num_experts > 1:  # each expert's heads times its gate, before the one output projection
            a, c = self.head_grid
            gates = self.gates(hidden_states).to(heads.dtype).view(b, t, 1, self.num_experts, 1, 1)
            heads = (heads.reshape(b, t, a, self.num_experts, c, self.head_dim) * gates).reshape(b, t, -1)
        return self.o_proj(heads.reshape(b, t, -1)), weights


class BamDecoderLayer(nn.Module):
    """Parallel: y = x + Attn(Norm(x)) + FFN(Norm(x)). Sequential: x' = x + Attn(Norm1(x)); y = x' + FFN(Norm2(x')).
    Sequential with ``norm_placement`` post (OLMo 2's names): x' = x + Norm1(Attn(x)); y = x' + Norm2(FFN(x'))."""

    def __init__(self, config: BamConfig, layer_idx: int) -> None:
        super().__init__()
        self.sequential = getattr(config, "block_type", "parallel") == "sequential"
        placement = getattr(config, "norm_placement", "pre")
        self.post_norm, self.pre_norm = placement != "pre", placement != "post"
        if self.pre_norm:
            self.input_layernorm = _norm(config)
        self.self_attn = BamAttention(config, layer_idx)
        if self.post_norm:  # OLMo 2's and Gemma's names
            self.post_attention_layernorm, self.post_feedforward_layernorm = _norm(config), _norm(config)
            if self.pre_norm:
                self.pre_feedforward_layernorm = _norm(config)
        elif self.sequential:
            self.post_attention_layernorm = _norm(config)
        if config.num_experts:
            self.mlp = BamMoE(config)
        else:
            self.mlp = BamSwiGLU(config.hidden_size, config.intermediate_size, _geglu(config))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.post_norm:  # x' = x + Norm(Attn([Norm] x)); y = x' + Norm(FFN([Norm] x'))
            normed = self.input_layernorm(hidden_states) if self.pre_norm else hidden_states
            attn, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
            hidden_states = hidden_states + self.post_attention_layernorm(attn)
            normed = self.pre_feedforward_layernorm(hidden_states) if self.pre_norm else hidden_states
            return hidden_states + self.post_feedforward_layernorm(self.mlp(normed))
        normed = self.input_layernorm(hidden_states)
        attn, _ = self.self_attn(normed, position_embeddings, attention_mask, past_key_values, **kwargs)
        if self.sequential:
            hidden_states = hidden_states + attn
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + attn + self.mlp(normed)


class BamPreTrainedModel(PreTrainedModel):
    """Weights initialisation, loading glue and what transformers (and serving stacks) may use."""

    config_class = BamConfig
    config: BamConfig
    base_model_prefix = "model"
    _no_split_modules = ["BamDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": BamDecoderLayer, "attentions": BamAttention}

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BamOnePlusNorm) or getattr(module, "one_plus", False):
            nn.init.zeros_(module.weight)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, BamExpertHeadNorm, BamProjectionNorm)):
            nn.init.ones_(module.weight)


class BamModel(BamPreTrainedModel):
    """Embedding, the decoder layers and the final norm."""

    def __init__(self, config: BamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.rotary_emb = BamRotaryEmbedding(config)
        # Gemma 3's local layers: their own RoPE base; layers N, 2N, ... (1-based) keep rope_theta
        local, every = getattr(config, "local_rotary_base", None), getattr(config, "global_attention_every", None)
        self.local_rotary_emb = None if local is None else BamRotaryEmbedding(config, local)
        self.local_layers = [local is not None and (i + 1) % every != 0 for i in range(config.num_hidden_layers)]
        self.embed_scale = config.hidden_size**0.5 if getattr(config, "scale_embeddings", False) else None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Llama's contract: causal mask from ``attention_mask`` (left padding) and the cache, positions
        from ``position_ids`` (``generate`` derives them from the mask) or the cache's length."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if inputs_embeds is None and self.embed_scale is not None:  # Gemma: times sqrt(hidden), in their dtype
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        rope = self.rotary_emb(position_ids)
        local_rope = None if self.local_rotary_emb is None else self.local_rotary_emb(position_ids)
        for layer, local in zip(self.layers, self.local_layers):
            hidden = layer(
                hidden, local_rope if local else rope, mask, past_key_values if use_cache else None, **kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    """BamModel + the output layer (tied to the embedding when ``tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BamConfig) -> None:
        super().__init__(config)
        self.model = BamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _get_static_cache_init_shape(self):
        """(K/V heads, head size) of the wide attention, for a StaticCache allocated before its first update:
        N·H_kv with expert K/V, H_kv shared (also read from per-expert configs of older exports)."""
        if hasattr(self, "hf_device_map") and len(set(self.hf_device_map.values())) > 1:
            return None
        if (getattr(self, "_tp_size", None) or 1) > 1:
            return None
        return self.config.attention_kv_groups, self.config.head_dim

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (of the last ``logits_to_keep`` positions; 0: all) and, with ``labels``, the next-token loss."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2: c·tanh(z/c)
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:  # next-token loss; -100 ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
