"""Checkpoints laid out exactly as Megatron-LM's ``pretrain_gpt.py --ckpt-format torch_dist`` writes them
(read at Megatron-LM ``core_v0.16.1``, megatron/training/checkpointing.py), made from megatron-core's stock
GPTModel: the Megatron-LM side of every test that reads or seeds from such a checkpoint."""

from __future__ import annotations

import argparse
import os
import random

import numpy
import torch
import torch.nn.functional as F

LOCAL_MOE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
TE_MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"


def megatron_lm_args(**changes) -> argparse.Namespace:
    """The ``args`` Megatron-LM 0.16.1 saves for a Llama-style run (RMSNorm, SwiGLU, GQA, RoPE, no
    biases), as its validate_args leaves them (kv_channels, padded_vocab_size, world_size set).

    save_checkpoint stores get_args() whole; these are the fields that describe the model, its
    layout, tokenizer and checkpoint format, plus some of the training settings around them.
    """
    values = dict(
        # model (TransformerConfig fields are args of the same name since 0.16; --norm-epsilon is
        # layernorm_epsilon, --apply-layernorm-1p layernorm_zero_centered_gamma)
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        kv_channels=16,
        max_position_embeddings=64,
        seq_length=32,
        position_embedding_type="rope",
        use_rotary_position_embeddings=False,
        add_position_embedding=True,
        rotary_base=500000,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=True,
        rope_scaling_factor=32.0,  # ignored by gpt_builder: GPTModel computes its default 8
        no_rope_freq=None,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        layernorm_zero_centered_gamma=False,
        swiglu=True,
        squared_relu=False,
        quick_geglu=False,
        openai_gelu=False,
        bias_swiglu_fusion=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        qk_l2_norm=False,
        untie_embeddings_and_output_weights=True,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=False,
        apply_residual_connection_post_layernorm=False,
        fp32_residual_connection=False,
        multi_latent_attention=False,
        experimental_attention_variant=None,
        heterogeneous_layers_config_path=None,
        is_hybrid_model=False,
        hybrid_override_pattern=None,
        mtp_num_layers=None,
        window_size=None,
        softmax_type="vanilla",
        attention_output_gate=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=0.02,
        transformer_impl="local",
        use_legacy_models=False,
        spec=None,
        # MoE (dense: num_experts None)
        num_experts=None,
        moe_layer_freq=1,
        moe_ffn_hidden_size=None,
        moe_router_topk=2,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_use_legacy_grouped_gemm=False,
        moe_shared_expert_intermediate_size=None,
        moe_expert_capacity_factor=None,
        moe_apply_probs_on_input=False,
        moe_latent_size=None,
        # parallelism
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        world_size=1,
        data_parallel_size=1,
        rank=0,
        use_distributed_optimizer=True,
        # tokenizer (build_tokenizer sets padded_vocab_size: vocab 100 padded to 64 x TP)
        tokenizer_type="GPTSentencePieceTokenizer",
        tokenizer_model="/data/tokenizers/llama.model",
        vocab_size=None,
        make_vocab_size_divisible_by=64,
        padded_vocab_size=128,
        # checkpointing
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        auto_detect_ckpt_format=False,
        ckpt_fully_parallel_save=True,
        async_save=False,
        save="/ckpt/llama",
        load=None,
        save_interval=10,
        no_save_optim=False,
        no_save_rng=False,
        # training
        micro_batch_size=2,
        global_batch_size=8,
        train_iters=100,
        lr=3e-4,
        min_lr=3e-5,
        lr_decay_style="cosine",
        weight_decay=0.1,
        clip_grad=1.0,
        seed=1234,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        data_path=["1.0", "/data/corpus_text_document"],
        split="969,30,1",
        iteration=10,
        consumed_train_samples=80,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def _stock_config(args: argparse.Namespace):
    """megatron-core's TransformerConfig as Megatron-LM's core_transformer_config_from_args builds it
    (fused kernels off: this is CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = args.num_experts is not None
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        use_cpu_initialization=True,
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size if moe else None,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_token_dispatcher_type="alltoall",  # (allgather's CUDA-only spots are not covered on CPU)
        moe_aux_loss_coeff=0.0,
    )


def stock_gpt_model(args: argparse.Namespace):
    """megatron-core's GPTModel exactly as Megatron-LM's gpt_builder makes it (local spec)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    config = _stock_config(args)
    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
    else:
        spec = get_gpt_layer_local_spec(None, False, args.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
    )


def model_state(model, te_names: bool):
    """The model's sharded state dict, its keys as the local spec (or, renamed, the TE spec) stores them."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    state = model.sharded_state_dict(metadata={"singleton_local_shards": False, "chained_optim_avoid_prefix": True})
    if te_names:
        for item in nested_values(state):
            if getattr(item, "key", None) == LOCAL_MOE_NORM:
                item.key = TE_MOE_NORM
    return state


def save_as_megatron_lm(save: str, args: argparse.Namespace, seed: int, release: bool = False, te_names=False):
    """Rank body: a stock model's checkpoint, written as Megatron-LM's save_checkpoint writes it."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(tensor=args.tensor_model_parallel_size))
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = stock_gpt_model(args)
    with torch.no_grad():  # RMSNorm weights start at 1: move them, so a norm loaded from the wrong tensor shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    directory = os.path.join(save, "release" if release else f"iter_{args.iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": numpy.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": args.iteration,
        "model": model_state(model, te_names),
        "opt_param_scheduler": {"max_lr": args.lr, "min_lr": args.min_lr, "num_steps": 80, "decay_style": "cosine"},
        "rng_state": ShardedObject("rng_state", [rng], (1, tp), (0, tp_rank), replica_id=0),
        "num_floating_point_operations_so_far": 1.5e12,
    }
    content = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    dist_checkpointing.save(state, directory, content_metadata=content)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("release" if release else str(args.iteration))
    return directory
