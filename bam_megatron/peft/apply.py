"""Add MoV or MoLoRA adapters to a built model and freeze everything else.

    model = build_model(config, vocab, seq)          # dense, bam, bam-shared-kv, btx, megatron GPT
    apply_peft(model, PeftConfig("molora", num_experts=10, rank=4, alpha=16))
    # then DDP, optimizer: only adapter and router parameters require gradients

The walk visits every transformer layer of this pipeline stage: self-attention (megatron-core's
SelfAttention or BAM's soft MoA, whose one wide ``linear_qkv`` holds every attention expert) and
every MLP: the dense FFN, each expert of megatron-core's SequentialMLP (each expert gets its own
adapters), and shared experts. Grouped-GEMM experts (GroupedMLP / TEGroupedMLP) have no
per-expert linear layers to hook and are refused with a clear error.
"""

from __future__ import annotations

import re

import torch
from megatron.core.transformer.attention import Attention, SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

from bam_megatron.peft.adapter import Adapter
from bam_megatron.peft.config import METHODS, PeftConfig
from bam_megatron.peft.molora import MoLoRA
from bam_megatron.peft.mov import MoVInput, MoVQKV
from bam_megatron.peft.parallel import describe_linear

# Parameter names (and checkpoint keys) of adapters: '...self_attention.linear_qkv_molora.lora_a'.
ADAPTER_NAME = re.compile(r"(^|\.)linear_(qkv|proj|fc1|fc2)_(" + "|".join(METHODS) + r")\.")


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name / state-dict key belongs to a PEFT adapter or its router."""
    return ADAPTER_NAME.search(name) is not None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "decoder") and hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    if not hasattr(model, "decoder"):
        raise TypeError(f"apply_peft expects a megatron-core GPTModel, got {type(model).__name__}")
    return model


def _attach(parent: torch.nn.Module, linear_name: str, adapter: Adapter) -> None:
    setattr(parent, f"{linear_name}_{adapter.peft.method}", adapter)
    adapter.attach(getattr(parent, linear_name))


def _adapt_attention(attn: SelfAttention, key: str, config: PeftConfig) -> None:
    for name in config.targets:
        if name not in ("linear_qkv", "linear_proj"):
            continue
        linear = getattr(attn, name)
        info = describe_linear(linear, f"{key}.{name}")
        args = (info, config, f"{key}.{name}", linear.weight.device, linear.weight.dtype)
        if config.method == "mov":
            adapter = MoVQKV(
                *args,
                groups=attn.num_query_groups_per_partition,
                heads=attn.num_attention_heads_per_partition,
                head_dim=attn.hidden_size_per_attention_head,
            )
        else:
            adapter = MoLoRA(*args)
        _attach(attn, name, adapter)


def _adapt_mlp(mlp: MLP, key: str, config: PeftConfig) -> None:
    for name in config.targets:
        if name not in ("linear_fc1", "linear_fc2"):
            continue
        linear = getattr(mlp, name)
        info = describe_linear(linear, f"{key}.{name}")
        args = (info, config, f"{key}.{name}", linear.weight.device, linear.weight.dtype)
        if config.method == "mov":
            adapter = MoVInput(*args)  # only linear_fc2 is a MoV target
        else:
            gated = name == "linear_fc1" and mlp.config.gated_linear_unit
            adapter = MoLoRA(*args, out_chunks=2 if gated else 1)
        _attach(mlp, name, adapter)


def _global_expert_names(layer: torch.nn.Module) -> dict[str, str]:
    """'mlp.experts.local_experts.1' -> 'mlp.experts.5' on expert-parallel rank 2 of 2 local experts."""
    names = {}
    for path, module in layer.named_modules():
        if isinstance(module, SequentialMLP):
            offset = module.ep_group.rank() * module.num_local_experts
            for i in range(module.num_local_experts):
                names[f"{path}.local_experts.{i}"] = f"{path}.{offset + i}"
    return names


def _embedding_output_requires_grad(gpt: torch.nn.Module) -> None:
    """megatron-core's activation recompute (a reentrant autograd Function) runs its backward only
    if an input requires grad; with the embedding frozen, the hidden states would not, and the
    adapters inside recomputed layers would get no gradient. Mark the embedding's output as
    requiring grad (what Hugging Face's ``enable_input_require_grads`` does). Later pipeline
    stages receive activations that already require grad."""
    embedding = getattr(gpt, "embedding", None)
    if embedding is None:
        return

    def hook(module, args, output):
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True)
        return output

    embedding.register_forward_hook(hook)


def apply_peft(model: torch.nn.Module, config: PeftConfig) -> torch.nn.Module:
    """Attach ``config``'s adapters to every transformer layer of ``model`` (in place) and freeze
    every other parameter; returns ``model``. Call before DDP wraps the model.

    Raises:
        NotImplementedError: a layer this method cannot adapt (grouped-GEMM experts, multi-latent
            attention, fused layer-norm linears), named.
    """
    gpt = _unwrap(model)
    for layer in gpt.decoder.layers:
        layer_key = f"layers.{layer.layer_number - 1}"  # global layer number: the same under any PP
        experts = _global_expert_names(layer)
        for path, module in list(layer.named_modules()):
            key = f"{layer_key}.{experts.get(path, path)}"
            if isinstance(module, (GroupedMLP, TEGroupedMLP)):
                raise NotImplementedError(
                    f"PEFT cannot adapt {key}: grouped-GEMM experts ({type(module).__name__}) have no "
                    "per-expert linear layers; build the model with moe_grouped_gemm=False (SequentialMLP)"
                )
            if isinstance(module, SelfAttention):
                _adapt_attention(module, key, config)
            elif isinstance(module, Attention):
                raise NotImplementedError(f"PEFT cannot adapt {key}: {type(module).__name__} is not self-attention")
            elif isinstance(module, MLP):
                _adapt_mlp(module, key, config)
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_name(name)
    _embedding_output_requires_grad(gpt)
    return model


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter and router parameters of a model, by name."""
    return {name: p for name, p in model.named_parameters() if is_adapter_name(name)}
