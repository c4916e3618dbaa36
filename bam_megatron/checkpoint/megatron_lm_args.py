"""Writing what Megatron-LM's loader reads into the checkpoints bam-megatron writes.

Every checkpoint bam-megatron writes of a model Megatron-LM builds (dense or btx on
the sequential block, RMSNorm, plain or factor-8 RoPE) also carries what Megatron-LM's loader reads
(`common_state`): an ``args`` namespace as its ``pretrain_gpt.py`` would have saved for that model
(`megatron_lm_args`, the inverse of `megatron_lm_reader.architecture_from_args`), ``checkpoint_version`` 3.0 and
``iteration``. Megatron-LM then loads it with ``--finetune`` or ``--pretrained-checkpoint`` and the
flags `pretrain_gpt_flags` prints (``python -m bam_megatron.checkpoint.megatron_lm_flags RUN``).
Our own ``meta`` record stays the source of truth: `store.read_meta` reads it before ``args``.

Reading Megatron-LM's checkpoints is `megatron_lm_reader`'s job.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Optional

from bam_megatron.checkpoint.megatron_lm_reader import CHECKPOINT_VERSION, ROPE_SCALING_FACTOR
from bam_megatron.checkpoint.meta import CheckpointError, CheckpointMeta
from bam_megatron.model.moe_defaults import MOE_TRAINING_DEFAULTS

REVISION = "core_v0.16.1"
"""The Megatron-LM whose loader (megatron/training/checkpointing.py), arguments.py and gpt_builders.py
the ``args`` we write were read from."""

TRANSFORMER_IMPL = "transformer_engine"
"""The layer spec Megatron-LM must build to load our checkpoints. Its Transformer Engine spec stores an
MoE layer's norm as ``pre_mlp_layernorm.weight``, as ours; its local spec expects it as
``mlp.linear_fc1.layer_norm_weight`` (dense layers have the same names with both specs, so
``--transformer-impl local`` loads a dense model too)."""

# What our sharded state dicts were made with, as dist_checkpointing's content metadata records it
# (Megatron-LM passes it back to sharded_state_dict when it loads): the model's with no metadata,
# so megatron-core's defaults (store.save_checkpoint adds the distributed optimizer's sharding type).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

# Megatron-LM's --tokenizer-type for each kind bam_megatron.data.tokenizer loads: its
# GPTSentencePieceTokenizer is ours (SentencePiece ids as they are, eod = eos; its SentencePieceTokenizer
# appends special tokens).
_MEGATRON_TOKENIZER_TYPES = {
    None: "GPTSentencePieceTokenizer",  # CheckpointMeta.tokenizer_type None: SentencePiece
    "SentencePieceTokenizer": "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
}

# The router and loss settings: (what bam-megatron's mixtures are built with where a checkpoint's
# training settings do not say (bam_megatron.model.moe_defaults), what Megatron-LM's dense runs save).
_MEGATRON_LM_DENSE = {
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.0,
    "moe_z_loss_coeff": None,
    "moe_token_dispatcher_type": "allgather",
}
_MOE_TRAINING = {name: (MOE_TRAINING_DEFAULTS[name], dense) for name, dense in _MEGATRON_LM_DENSE.items()}


def no_megatron_lm_model(meta: CheckpointMeta) -> Optional[str]:
    """Why Megatron-LM's ``pretrain_gpt.py`` builds no model that computes what ``meta``'s computes;
    None when it does (a dense or btx model on the sequential block, RMSNorm, plain or factor-8 RoPE)."""
    a = meta.architecture
    if meta.peft is not None:
        return "an adapter-only (PEFT) checkpoint: it holds the adapters, not the model"
    if a.has_soft_moa:
        return f"variant {a.variant}: Megatron-LM has no soft mixture of attention experts"
    if a.block_type != "sequential":
        return f"block_type {a.block_type}: Megatron-LM's GPT layers are sequential (attention, then the FFN)"
    if a.normalization != "RMSNorm":
        return f"normalization {a.normalization}: Megatron-LM's LayerNorm has a bias, ours none"
    if a.norm_placement != "pre":
        return f"norm_placement {a.norm_placement}: Megatron-LM's GPT layers have norms before attention and MLP only"
    if a.apply_layernorm_1p or a.activation != "swiglu" or a.scale_embeddings or a.local_rotary_base is not None:
        return "Gemma's layer (apply_layernorm_1p, activation, scale_embeddings, local_rotary_base): not exported"
    if a.attn_logit_softcapping is not None or a.final_logit_softcapping is not None:
        return "attn_logit_softcapping / final_logit_softcapping: Megatron-LM does not soft-cap"
    if a.query_pre_attn_scalar is not None:
        return f"query_pre_attn_scalar {a.query_pre_attn_scalar}: Megatron-LM has no softmax scale flag"
    if a.qk_layernorm_scope != "head":
        return f"qk_layernorm_scope {a.qk_layernorm_scope}: Megatron-LM's --qk-layernorm normalises each head"
    if a.router_bias:
        return (
            "router_bias: Megatron-LM's TopKRouter has a bias only with --add-bias-linear, which also puts one "
            "on every attention and MLP linear layer (ours have none)"
        )
    if a.rope_scaling_factor not in (None, ROPE_SCALING_FACTOR):
        return (
            f"rope_scaling_factor {a.rope_scaling_factor}: Megatron-LM's gpt_builder passes --use-rope-scaling "
            f"to GPTModel but never --rope-scaling-factor, so it scales by {ROPE_SCALING_FACTOR}"
        )
    return None


def _setting(training: Mapping[str, Any], name: str, default: Any) -> Any:
    """A training setting of the run that wrote a checkpoint; ``default`` where it does not say."""
    value = training.get(name)
    return default if value is None else value


def megatron_lm_args(meta: CheckpointMeta) -> argparse.Namespace:
    """The ``args`` Megatron-LM's ``pretrain_gpt.py`` would have saved for the model of ``meta``.

    Field names and meanings are Megatron-LM ``core_v0.16.1``'s (after its validate_args: kv_channels,
    padded_vocab_size, world_size set), those its loader reads (``load_args_from_checkpoint``,
    ``check_checkpoint_args``, ``load_checkpoint``) and those `architecture_from_args` reads back.
    ``no_save_optim`` and ``no_save_rng`` are True: our optimizer and RNG states are in our layout,
    so Megatron-LM's loader must not try to resume them. Raises a `CheckpointError` for a model
    Megatron-LM does not build (`no_megatron_lm_model`).
    """
    why = no_megatron_lm_model(meta)
    if why is not None:
        raise CheckpointError(f"no Megatron-LM model computes this checkpoint's: {why}")
    a, layout, training = meta.architecture, meta.layout, meta.training
    heads = a.num_attention_heads
    tp, pp = layout.tensor, layout.pipeline
    base = float(a.rotary_base)
    values: dict[str, Any] = dict(
        # the model (gpt_builder, core_transformer_config_from_args; --use-checkpoint-args)
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=heads,
        group_query_attention=a.num_query_groups != heads,
        num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels or a.hidden_size // heads,
        seq_length=meta.seq_length,
        max_position_embeddings=meta.seq_length,
        position_embedding_type="rope",
        add_position_embedding=True,  # Megatron-LM's default, saved by its RoPE runs too (RoPE ignores it)
        use_rotary_position_embeddings=False,
        rotary_base=int(base) if base.is_integer() else base,  # --rotary-base is an int flag
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=a.rope_scaling_factor is not None,
        rope_scaling_factor=ROPE_SCALING_FACTOR,
        rope_type=None,
        no_rope_freq=None,
        normalization="RMSNorm",
        layernorm_epsilon=a.norm_epsilon,  # --norm-epsilon (0.16's TransformerConfig name)
        layernorm_zero_centered_gamma=False,  # --apply-layernorm-1p
        swiglu=True,
        squared_relu=False,
        quick_geglu=False,
        openai_gelu=False,
        add_bias_linear=False,  # --disable-bias-linear
        add_qkv_bias=a.add_qkv_bias,
        qk_layernorm=a.qk_layernorm,
        qk_l2_norm=False,
        untie_embeddings_and_output_weights=a.untie_embeddings_and_output_weights,
        apply_query_key_layer_scaling=False,
        apply_residual_connection_post_layernorm=False,
        multi_latent_attention=False,
        experimental_attention_variant=None,
        attention_output_gate=False,
        softmax_type="vanilla",
        window_size=None,
        heterogeneous_layers_config_path=None,
        is_hybrid_model=False,
        hybrid_override_pattern=None,
        mtp_num_layers=None,
        use_legacy_models=False,
        spec=None,
        transformer_impl=TRANSFORMER_IMPL,
        hidden_dropout=float(_setting(training, "hidden_dropout", 0.0)),
        attention_dropout=float(_setting(training, "attention_dropout", 0.0)),
        init_method_std=float(_setting(training, "init_method_std", 0.02)),
        bf16=bool(_setting(training, "bf16", False)),
        fp16=False,
        # the mixture (a dense model: Megatron-LM's defaults, as its dense runs save them)
        num_experts=a.num_experts if a.is_moe else None,
        moe_layer_freq=1,
        moe_ffn_hidden_size=a.ffn_hidden_size if a.is_moe else None,
        moe_router_topk=a.moe_router_topk if a.is_moe else 2,
        moe_router_pre_softmax=a.moe_router_pre_softmax if a.is_moe else False,
        moe_router_topk_scaling_factor=a.moe_router_topk_scaling_factor if a.is_moe else None,
        moe_router_score_function="softmax",
        moe_router_enable_expert_bias=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_force_load_balancing=False,
        moe_expert_capacity_factor=None,
        moe_apply_probs_on_input=False,
        moe_shared_expert_intermediate_size=None,
        moe_latent_size=None,
        moe_grouped_gemm=False,  # SequentialMLP (Megatron-LM's TEGroupedMLP stores the experts alike)
        moe_use_legacy_grouped_gemm=False,
        **{
            name: _setting(training, name, default) if a.is_moe else dense
            for name, (default, dense) in _MOE_TRAINING.items()
        },
        # the layout it was saved under (it reshards on load)
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=layout.expert,
        context_parallel_size=1,
        world_size=layout.world_size,
        data_parallel_size=max(1, layout.world_size // (tp * pp)),
        use_distributed_optimizer=layout.distributed_optimizer,
        # the tokenizer and vocabulary
        tokenizer_type=_MEGATRON_TOKENIZER_TYPES.get(meta.tokenizer_type) if meta.tokenizer_model else None,
        tokenizer_model=meta.tokenizer_model,
        vocab_size=None if meta.tokenizer_model else _setting(training, "vocab_size", None),
        padded_vocab_size=a.padded_vocab_size,
        make_vocab_size_divisible_by=_divisible_by(a.padded_vocab_size, training, tp),
        # the checkpoint
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        no_save_optim=True,
        no_save_rng=True,
        # progress (read when Megatron-LM resumes without --finetune)
        iteration=meta.iteration,
        consumed_train_samples=meta.consumed_samples,
        skipped_train_samples=0,
        consumed_valid_samples=0,
    )
    return argparse.Namespace(**values)


def _divisible_by(padded: int, training: Mapping[str, Any], tensor: int) -> int:
    """--make-vocab-size-divisible-by as the run used it, where it explains the padded size; else the
    padded size per TP rank (which pads any tokenizer of at most that many ids to exactly it)."""
    used = training.get("make_vocab_size_divisible_by")
    if isinstance(used, int) and used > 0 and padded % (used * tensor) == 0:
        return used
    return max(1, padded // tensor)


def common_state(meta: CheckpointMeta) -> dict[str, Any]:
    """What Megatron-LM's loader reads from ``common.pt``, for a checkpoint of ``meta``: ``args``,
    ``checkpoint_version`` and ``iteration``; empty for a model Megatron-LM does not build."""
    if no_megatron_lm_model(meta) is not None:
        return {}
    return {"args": megatron_lm_args(meta), "checkpoint_version": CHECKPOINT_VERSION, "iteration": meta.iteration}


def pretrain_gpt_flags(
    args: Any, tensor: Optional[int] = None, pipeline: Optional[int] = None, expert: Optional[int] = None
) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py``'s flags (at ``REVISION``) that build the model ``args`` describe.

    ``tensor`` / ``pipeline`` / ``expert``: the parallel sizes to run at (default: those it was saved
    with; the checkpoint reshards). The vocabulary padding is given as ``--make-vocab-size-divisible-by``
    padded_vocab_size / TP, which pads any tokenizer of at most that many ids to exactly the embedding's
    rows. Training flags (data, batch sizes, learning rate, iterations) are the caller's.
    """
    tp = tensor or int(_get(args, "tensor_model_parallel_size", 1) or 1)
    pp = pipeline or int(_get(args, "pipeline_model_parallel_size", 1) or 1)
    padded = int(args.padded_vocab_size)
    if padded % tp:
        raise CheckpointError(f"the vocabulary ({padded} rows) does not split over --tensor-model-parallel-size {tp}")
    flags = [f"--transformer-impl {_get(args, 'transformer_impl', TRANSFORMER_IMPL)}"]
    flags += [
        f"--num-layers {args.num_layers}",
        f"--hidden-size {args.hidden_size}",
        f"--ffn-hidden-size {args.ffn_hidden_size}",
        f"--num-attention-heads {args.num_attention_heads}",
    ]
    if _get(args, "group_query_attention", False):
        flags += ["--group-query-attention", f"--num-query-groups {args.num_query_groups}"]
    flags += [
        f"--kv-channels {args.kv_channels}",
        f"--seq-length {args.seq_length}",
        f"--max-position-embeddings {args.max_position_embeddings}",
        "--position-embedding-type rope",
    ]
    base = args.rotary_base
    if float(base).is_integer():
        flags.append(f"--rotary-base {int(base)}")
    else:  # not an int flag's value: only --use-checkpoint-args (it sets rotary_base) carries it
        flags.append("--use-checkpoint-args")
    if _get(args, "use_rope_scaling", False):
        flags.append("--use-rope-scaling")
    flags += [f"--normalization {args.normalization}", f"--norm-epsilon {_flag_value(args.layernorm_epsilon)}"]
    flags += ["--swiglu", "--disable-bias-linear"]
    for field in ("add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights"):
        if _get(args, field, False):
            flags.append("--" + field.replace("_", "-"))
    flags += [
        f"--hidden-dropout {_flag_value(args.hidden_dropout)}",
        f"--attention-dropout {_flag_value(args.attention_dropout)}",
    ]
    if _get(args, "num_experts", None):
        flags += [
            f"--num-experts {args.num_experts}",
            f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size}",
            f"--moe-router-topk {args.moe_router_topk}",
        ]
        if args.moe_router_pre_softmax:
            flags.append("--moe-router-pre-softmax")
        if args.moe_router_topk_scaling_factor is not None:
            flags.append(f"--moe-router-topk-scaling-factor {_flag_value(args.moe_router_topk_scaling_factor)}")
        flags += [
            f"--moe-router-load-balancing-type {_flag_value(args.moe_router_load_balancing_type)}",
            f"--moe-aux-loss-coeff {_flag_value(args.moe_aux_loss_coeff)}",
        ]
        if _get(args, "moe_z_loss_coeff", None) is not None:
            flags.append(f"--moe-z-loss-coeff {_flag_value(args.moe_z_loss_coeff)}")
        flags.append(f"--moe-token-dispatcher-type {_get(args, 'moe_token_dispatcher_type', 'alltoall')}")
    if _get(args, "tokenizer_model", None):
        flags += [f"--tokenizer-type {args.tokenizer_type}", f"--tokenizer-model {args.tokenizer_model}"]
    else:  # mock data: token ids without a tokenizer (NullTokenizer's vocabulary is --vocab-size + 1)
        flags += ["--tokenizer-type NullTokenizer", f"--vocab-size {(_get(args, 'vocab_size', None) or padded - 1)}"]
    flags.append(f"--make-vocab-size-divisible-by {padded // tp}")
    flags += [f"--tensor-model-parallel-size {tp}", f"--pipeline-model-parallel-size {pp}"]
    if expert or _get(args, "expert_model_parallel_size", 1) > 1:
        flags.append(f"--expert-model-parallel-size {expert or args.expert_model_parallel_size}")
    if _get(args, "bf16", False):
        flags.append("--bf16")
    flags += ["--ckpt-format torch_dist", "--no-load-optim", "--no-load-rng"]
    return flags


def _flag_value(value: Any) -> str:
    """A value as a flag's argument: floats exactly (repr), lists (``nargs='+'`` flags) space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(_flag_value(v) for v in value)
    return repr(float(value)) if isinstance(value, float) else str(value)


def _get(args: Any, name: str, default: Any) -> Any:
    """``args.name``; ``default`` (Megatron-LM's) where the Megatron-LM that wrote it predates the field."""
    return getattr(args, name, default)
