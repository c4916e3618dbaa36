"""bam-megatron's checkpoints loaded the way Megatron-LM loads them (bam_megatron.checkpoint.megatron_lm_args).

Every checkpoint bam-megatron writes of a model Megatron-LM builds (dense or btx on the sequential
block) carries, beside our ``meta`` record, what Megatron-LM's loader reads: ``args``,
``checkpoint_version`` and ``iteration``. Read at Megatron-LM ``core_v0.16.1``
(megatron/training/checkpointing.py, arguments.py, gpt_builders.py); the line numbers below are
that file's.

Megatron-LM is not installed here (megatron-core is), so its loader's steps are taken by hand, as
its code takes them: megatron-core's stock ``GPTModel`` built from the ``args`` the checkpoint
carries (a TransformerConfig from every field of the same name, as core_transformer_config_from_args
does; the layer spec gpt_builder picks), its ``sharded_state_dict`` (with the checkpoint's content
metadata) loaded by ``dist_checkpointing.load`` with Megatron-LM's default strictness. Transformer
Engine is not installed either: the TE spec's names are the local spec's, but for an MoE layer's norm
(``pre_mlp_layernorm.weight``), as in tests/checkpoint/test_megatron_lm_checkpoints.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F

from bam_megatron.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    SavedLayout,
    integrity,
    megatron_lm_args,
    megatron_lm_flags,
    megatron_lm_reader,
    store,
)
from bam_megatron.model.architecture import Architecture
from bam_megatron.testing.distributed import run_distributed

SEQ = 16
TOKENS = torch.randint(0, 120, (2, SEQ), generator=torch.Generator().manual_seed(0))
LOCAL_MOE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
TE_MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"
TOKENIZER = "/data/tokenizers/ours.model"

SIZES = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2)
ARCHITECTURES = {
    # a Llama-3/Qwen-like seed: GQA, RoPE scaled by 8 at base 500000, QKV biases, Q/K norms, untied
    "dense": Architecture(
        "dense",
        **SIZES,
        padded_vocab_size=128,
        block_type="sequential",
        rotary_base=500000.0,
        rope_scaling_factor=8.0,
        add_qkv_bias=True,
        qk_layernorm=True,
        norm_epsilon=1e-6,
    ),
    # BTX: top-2 of 4 experts, softmax over all experts first (our default), a free head size, tied
    "btx": Architecture(
        "btx",
        **SIZES,
        padded_vocab_size=128,
        num_experts=4,
        moe_router_topk=2,
        block_type="sequential",
        kv_channels=32,
        untie_embeddings_and_output_weights=False,
    ),
    # sparse upcycling's routing (renormalised top-2, scaled)
    "sparse": Architecture(
        "btx",
        **SIZES,
        padded_vocab_size=128,
        num_experts=4,
        moe_router_topk=2,
        block_type="sequential",
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=2.0,
    ),
}
PARALLEL = Architecture("dense", **SIZES, padded_vocab_size=128)  # no Megatron-LM equivalent
TRAINING = {"make_vocab_size_divisible_by": 64, "moe_aux_loss_coeff": 0.02, "moe_z_loss_coeff": None, "bf16": False}


def _meta(architecture: Architecture) -> CheckpointMeta:
    return CheckpointMeta(
        architecture,
        seq_length=SEQ,
        consumed_samples=56,
        tokenizer_model=TOKENIZER,
        tokenizer_type="SentencePieceTokenizer",
        training=dict(TRAINING),
    )


# ----- what Megatron-LM reads (checkpointing.py at core_v0.16.1)

# common.pt: the keys its loader reads
COMMON_KEYS = [
    "args",  # 1534-1535 load_checkpoint: ckpt_args = state_dict.get("args"); 1368 load_args_from_checkpoint
    "checkpoint_version",  # 1723 set_checkpoint_version(state_dict.get('checkpoint_version', 0)); 1369
    "iteration",  # 1370 args.iteration = state_dict['iteration'] (--use-checkpoint-args); 1735 without --finetune
    "content_metadata",  # 1575 dist_checkpointing.load_content_metadata(preloaded_state_dict=state_dict)
]
# Read only where Megatron-LM resumes its own optimizer or RNG states, which args.no_save_optim and
# args.no_save_rng (1561, 1580) tell it ours does not hold: 1794 'optimizer', 1816-1818
# 'opt_param_scheduler', 1850-1856 'rng_state'. 'num_floating_point_operations_so_far' (1743) is
# read with a default of 0: we do not count FLOPs.
NOT_WRITTEN = ["optimizer", "opt_param_scheduler", "num_floating_point_operations_so_far", "rerun_state_machine"]

# load_checkpoint (torch_dist), every path
LOAD_CHECKPOINT_FIELDS = [
    "tensor_model_parallel_size",  # 1543 ckpt_tp_pp (1, with a warning, when absent: 1538-1541)
    "pipeline_model_parallel_size",  # 1544
    "world_size",  # 1551 (rerun state)
    "data_parallel_size",  # 1553 (rerun state)
    "no_save_rng",  # 1561 True: no RNG state is asked for
    "no_save_optim",  # 1580 True: no optimizer or scheduler state is asked for
]
# check_checkpoint_args, called without --finetune (1746-1748), and the progress read after it
CHECK_CHECKPOINT_ARGS_FIELDS = [
    "num_layers",  # 122
    "hidden_size",  # 123
    "num_attention_heads",  # 124
    "add_position_embedding",  # 125 (default True when absent)
    "max_position_embeddings",  # 127 (only with --vocab-file)
    "make_vocab_size_divisible_by",  # 128 (only with --vocab-file)
    "padded_vocab_size",  # 130 (only with --vocab-file and a legacy checkpoint)
    "tokenizer_type",  # 131 (only with --vocab-file)
    "consumed_train_samples",  # 1749
    "skipped_train_samples",  # 1751
    "consumed_valid_samples",  # 1754
]
# load_args_from_checkpoint (--use-checkpoint-args): the fields it sets from the checkpoint
LOAD_ARGS_FIELDS = [
    "num_layers",  # 1394
    "hidden_size",  # 1395
    "ffn_hidden_size",  # 1396
    "seq_length",  # 1397
    "num_attention_heads",  # 1398
    "num_query_groups",  # 1399
    "group_query_attention",  # 1400
    "kv_channels",  # 1401
    "max_position_embeddings",  # 1402
    "position_embedding_type",  # 1403
    "add_position_embedding",  # 1404
    "use_rotary_position_embeddings",  # 1405
    "rotary_base",  # 1406
    "rotary_percent",  # 1407
    "rotary_interleaved",  # 1408
    "add_bias_linear",  # 1409
    "add_qkv_bias",  # 1410
    "squared_relu",  # 1411
    "swiglu",  # 1412
    "untie_embeddings_and_output_weights",  # 1413
    "normalization",  # 1415
    "apply_query_key_layer_scaling",  # 1416
    "attention_dropout",  # 1417
    "hidden_dropout",  # 1418
    "hybrid_override_pattern",  # 1420
    "spec",  # 1421
    "num_experts",  # 1425
    "moe_layer_freq",  # 1426
    "moe_ffn_hidden_size",  # 1428 (with num_experts)
    "moe_router_topk",  # 1431
    "moe_token_dispatcher_type",  # 1432
    "moe_router_pre_softmax",  # 1433
    "moe_grouped_gemm",  # 1434
    "moe_shared_expert_intermediate_size",  # 1435
    "moe_router_score_function",  # 1436
    "moe_router_enable_expert_bias",  # 1437
    "moe_router_topk_scaling_factor",  # 1438
    "is_hybrid_model",  # 1445
    "heterogeneous_layers_config_path",  # 1448
    "moe_latent_size",  # 1452
    "tokenizer_model",  # 1457 (--use-tokenizer-model-from-checkpoint-args, on by default)
    "tokenizer_type",  # 1458
    "padded_vocab_size",  # 1460
    "ckpt_format",  # 1463
    "tensor_model_parallel_size",  # 1470 (--use-mp-args-from-checkpoint-args)
    "pipeline_model_parallel_size",  # 1471
    "virtual_pipeline_model_parallel_size",  # 1472
    "num_layers_per_virtual_pipeline_stage",  # 1473
    "expert_model_parallel_size",  # 1474
]
# Left out, as Megatron-LM 0.16.1's own GPT runs leave them out or None (it then keeps the run's
# value): 1414 apply_layernorm_1p (0.16 calls it layernorm_zero_centered_gamma, which we write),
# 1422-1423 hybrid_*_ratio, 1441-1444 mamba_*, 1449 heterogeneous_layers_config_encoded_json,
# 1459 tiktoken_pattern; 1374 disable_bias_linear would override add_bias_linear.
LEFT_OUT = ["apply_layernorm_1p", "hybrid_attention_ratio", "mamba_state_dim", "disable_bias_linear"]


def _stock_config(args: argparse.Namespace):
    """megatron-core's TransformerConfig as Megatron-LM's core_transformer_config_from_args builds it
    from ``args`` (arguments.py:1306-1386: every dataclass field args has, by name; then num_moe_experts,
    num_query_groups only with group_query_attention, SwiGLU), on this machine (CPU, fp32, one rank,
    no fused kernels)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig) if hasattr(args, f.name)}
    fields.update(num_moe_experts=args.num_experts, rotary_interleaved=args.rotary_interleaved)
    fields["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    if args.swiglu:
        fields.update(activation_func=F.silu, gated_linear_unit=True)
    if args.rope_type is None:
        fields.pop("rope_type", None)
    fields.update(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        transformer_impl="local",
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bf16=False,
    )
    return TransformerConfig(**fields)


def _stock_model(args: argparse.Namespace):
    """megatron-core's GPTModel as Megatron-LM's gpt_builder builds it from ``args`` (local spec modules)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    config = _stock_config(args)
    if args.num_experts:
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=args.normalization, qk_l2_norm=args.qk_l2_norm
        )
    else:
        spec = get_gpt_layer_local_spec(
            args.num_experts,
            args.moe_grouped_gemm,
            args.qk_layernorm,
            args.multi_latent_attention,
            args.experimental_attention_variant,
            moe_use_legacy_grouped_gemm=args.moe_use_legacy_grouped_gemm,
            normalization=args.normalization,
        )
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


def _stock_state(model, content_metadata, te_names: bool):
    """The stock model's sharded state dict as load_checkpoint asks for it (1575-1624: the checkpoint's
    content metadata and the DP group), under the TE spec's names or the local spec's."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    metadata = dict(
        content_metadata or {}, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    state = model.sharded_state_dict(metadata=metadata)
    if te_names:
        for item in nested_values(state):
            if getattr(item, "key", None) == LOCAL_MOE_NORM:
                item.key = TE_MOE_NORM
    return state


def _save_ours_and_load_stock(root: str) -> dict:
    """Rank body: save our models; load each checkpoint into megatron-core's stock GPTModel built from
    the args it carries, as Megatron-LM does; both models' logits, and what the local spec would miss."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    torch.manual_seed(0)
    position_ids = torch.arange(SEQ).view(1, -1)
    out: dict = {}
    for name, architecture in {**ARCHITECTURES, "parallel": PARALLEL}.items():
        model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), SEQ)
        with torch.no_grad():  # norms start at 1 and routers at 0 elsewhere: move them, so a wrong mapping shows
            for param_name, param in model.named_parameters():
                if "norm" in param_name or "router" in param_name or param_name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.1)
            ours = model.eval()(TOKENS, position_ids, None)
        path = store.save_checkpoint(os.path.join(root, name), 7, model, None, None, _meta(architecture))
        common = dist_checkpointing.load_common_state_dict(path)
        out[name] = {"path": path, "keys": sorted(k for k in common if k != "meta")}
        if "args" not in common:
            continue
        args = common["args"]
        stored = {key.split("/shard_")[0] for key in load_sharded_metadata(path)}  # tensors, objects
        content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
        ours_keys = {v.key for v in nested_values(model.sharded_state_dict())}
        te_spec = args.transformer_impl == "transformer_engine"
        for spec in ("te", "local"):
            stock = _stock_model(args)
            state = _stock_state(stock, content, te_names=spec == "te" and bool(args.num_experts))
            requested = {v.key for v in nested_values(state)}
            out[name][f"{spec}-missing"] = sorted(requested - stored)
            out[name][f"{spec}-same-keys"] = requested == ours_keys
            if out[name][f"{spec}-missing"]:
                continue  # what Megatron-LM would refuse: "Missing key in checkpoint state_dict"
            # load_checkpoint's request with --finetune (1647-1656: generate_state_dict of the model only)
            request = {"args": args, "checkpoint_version": 3.0, "model": state}
            loaded = dist_checkpointing.load(request, path, strict="assume_ok_unexpected")
            stock.load_state_dict(loaded["model"])
            with torch.no_grad():
                out[name][f"{spec}-logits"] = (ours, stock.eval()(TOKENS, position_ids, None))
            out[name]["loaded"] = (loaded["checkpoint_version"], loaded["iteration"], te_spec)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Our checkpoints (dense, btx, sparse, a parallel-block dense) and what Megatron-LM's loader makes of them."""
    root = str(tmp_path_factory.mktemp("ours"))
    (out,) = run_distributed(_save_ours_and_load_stock, 1, args=(root,))
    return out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_megatron_core_s_stock_model_computes_ours_from_our_files(saved, name):
    result = saved[name]
    assert result["loaded"] == (3.0, 7, True)  # checkpoint_version, iteration; the TE spec asked for
    # The TE spec (what our args ask for) reads exactly our tensors, under our names
    assert result["te-missing"] == [] and result["te-same-keys"]
    ours, stock = result["te-logits"]
    assert ours.shape == (2, SEQ, 128)
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()), msg=name)
    if name == "dense":  # a dense layer has the same names with both specs: --transformer-impl local loads it too
        assert result["local-missing"] == [] and result["local-same-keys"]
        torch.testing.assert_close(*result["local-logits"], rtol=1e-5, atol=1e-5 * float(ours.abs().max()))
    else:  # the local spec's MoE layer expects its norm under the dense name, which we do not store
        assert result["local-missing"] == [LOCAL_MOE_NORM]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_common_state_holds_what_megatron_lm_s_loader_reads(saved, name):
    from megatron.core import dist_checkpointing

    path = saved[name]["path"]
    common = dist_checkpointing.load_common_state_dict(path)
    for key in COMMON_KEYS:
        assert key in common, key
    assert not set(NOT_WRITTEN) & set(common)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 7
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    for field in LOAD_CHECKPOINT_FIELDS + CHECK_CHECKPOINT_ARGS_FIELDS + LOAD_ARGS_FIELDS:
        assert hasattr(args, field), field
    for field in LEFT_OUT:
        assert not hasattr(args, field), field
    a = ARCHITECTURES[name]
    assert (args.no_save_optim, args.no_save_rng, args.ckpt_format) == (True, True, "torch_dist")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size) == (
        1,
        1,
        1,
    )
    assert (args.world_size, args.data_parallel_size) == (1, 1)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 64, 4)
    assert (args.group_query_attention, args.num_query_groups) == (True, 2)
    assert args.kv_channels == (a.kv_channels or 16) and args.padded_vocab_size == 128
    assert (args.seq_length, args.max_position_embeddings, args.add_position_embedding) == (SEQ, SEQ, True)
    assert (args.normalization, args.layernorm_epsilon, args.swiglu, args.add_bias_linear) == (
        "RMSNorm",
        a.norm_epsilon,
        True,
        False,
    )
    assert (args.tokenizer_type, args.tokenizer_model) == ("GPTSentencePieceTokenizer", TOKENIZER)
    assert (args.consumed_train_samples, args.skipped_train_samples, args.consumed_valid_samples) == (56, 0, 0)
    if a.is_moe:
        assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (4, 96, 2)
        assert (args.moe_router_pre_softmax, args.moe_router_topk_scaling_factor) == (
            a.moe_router_pre_softmax,
            a.moe_router_topk_scaling_factor,
        )
        assert (args.moe_router_load_balancing_type, args.moe_aux_loss_coeff, args.moe_z_loss_coeff) == (
            "aux_loss",
            0.02,
            1e-3,  # the run did not say: what our mixtures are built with
        )
    else:
        assert args.num_experts is None and args.moe_ffn_hidden_size is None
        assert (args.rotary_base, args.use_rope_scaling, args.add_qkv_bias, args.qk_layernorm) == (
            500000,
            True,
            True,
            True,
        )


def test_what_megatron_lm_has_no_model_for_gets_no_args(saved):
    assert saved["parallel"]["keys"] == ["content_metadata"]  # no args, checkpoint_version, iteration
    cases = {
        "block_type parallel": PARALLEL,
        "variant bam": PARALLEL.replace(variant="bam", num_experts=2, block_type="sequential"),
        "normalization LayerNorm": ARCHITECTURES["dense"].replace(normalization="LayerNorm"),
        "rope_scaling_factor 32.0": ARCHITECTURES["dense"].replace(rope_scaling_factor=32.0),
        "router_bias: Megatron-LM's TopKRouter has a bias only with --add-bias-linear": ARCHITECTURES["btx"].replace(
            router_bias=True
        ),
    }
    for why, architecture in cases.items():
        meta = _meta(architecture)
        assert megatron_lm_args.common_state(meta) == {}
        assert megatron_lm_args.no_megatron_lm_model(meta).startswith(why)
        with pytest.raises(CheckpointError, match=why):
            megatron_lm_args.megatron_lm_args(meta)
    adapters = dataclasses.replace(_meta(ARCHITECTURES["dense"]), peft={"method": "mov"})
    assert megatron_lm_args.common_state(adapters) == {} and "adapter-only" in megatron_lm_args.no_megatron_lm_model(
        adapters
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_our_meta_and_megatron_lm_s_view_of_the_args_round_trip(saved, name, tmp_path):
    from megatron.core import dist_checkpointing

    path = saved[name]["path"]
    meta = store.read_meta(path)  # ours: "meta" is read before "args"
    assert meta.source == "bam-megatron" and meta.architecture == ARCHITECTURES[name]
    assert (meta.iteration, meta.seq_length, meta.consumed_samples, meta.training) == (7, SEQ, 56, TRAINING)
    common = dist_checkpointing.load_common_state_dict(path)
    assert megatron_lm_reader.architecture_from_args(common["args"], path, {}) == ARCHITECTURES[name]

    # the same files as Megatron-LM sees them (its args, no meta): the same model
    copy = str(tmp_path / os.path.basename(path))
    shutil.copytree(path, copy)
    del common["meta"]
    torch.save(common, os.path.join(copy, "common.pt"))
    os.remove(os.path.join(copy, integrity.RECORD))  # ours too: Megatron-LM writes no integrity record
    theirs = store.read_meta(copy)
    assert theirs.source == "megatron-lm" and theirs.stored_keys == {}
    assert theirs.architecture == ARCHITECTURES[name]
    assert (theirs.iteration, theirs.seq_length, theirs.consumed_samples) == (7, SEQ, 56)
    assert (theirs.tokenizer_type, theirs.tokenizer_model) == ("SentencePieceTokenizer", TOKENIZER)
    assert theirs.layout == SavedLayout(world_size=1, tensor=1, pipeline=1, expert=1, distributed_optimizer=False)
    assert theirs.lineage["megatron_lm"]["spec"] == "transformer_engine"


# pretrain_gpt.py's flags -> (the args field each sets, how) at core_v0.16.1: arguments.py and the
# TransformerConfig fields it turns into flags (argument_utils.py; --norm-epsilon, --disable-bias-linear
# from their argparse_meta).
FLAG_FIELDS = {
    "--num-layers": ("num_layers", int),
    "--hidden-size": ("hidden_size", int),
    "--ffn-hidden-size": ("ffn_hidden_size", int),
    "--num-attention-heads": ("num_attention_heads", int),
    "--group-query-attention": ("group_query_attention", True),
    "--num-query-groups": ("num_query_groups", int),
    "--kv-channels": ("kv_channels", int),
    "--seq-length": ("seq_length", int),
    "--max-position-embeddings": ("max_position_embeddings", int),
    "--position-embedding-type": ("position_embedding_type", str),
    "--rotary-base": ("rotary_base", int),
    "--use-rope-scaling": ("use_rope_scaling", True),
    "--normalization": ("normalization", str),
    "--norm-epsilon": ("layernorm_epsilon", float),
    "--swiglu": ("swiglu", True),
    "--disable-bias-linear": ("add_bias_linear", False),
    "--add-qkv-bias": ("add_qkv_bias", True),
    "--qk-layernorm": ("qk_layernorm", True),
    "--untie-embeddings-and-output-weights": ("untie_embeddings_and_output_weights", True),
    "--hidden-dropout": ("hidden_dropout", float),
    "--attention-dropout": ("attention_dropout", float),
    "--transformer-impl": ("transformer_impl", str),
    "--num-experts": ("num_experts", int),
    "--moe-ffn-hidden-size": ("moe_ffn_hidden_size", int),
    "--moe-router-topk": ("moe_router_topk", int),
    "--moe-router-pre-softmax": ("moe_router_pre_softmax", True),
    "--moe-router-topk-scaling-factor": ("moe_router_topk_scaling_factor", float),
    "--moe-router-load-balancing-type": ("moe_router_load_balancing_type", str),
    "--moe-aux-loss-coeff": ("moe_aux_loss_coeff", float),
    "--moe-z-loss-coeff": ("moe_z_loss_coeff", float),
    "--moe-token-dispatcher-type": ("moe_token_dispatcher_type", str),
    "--tokenizer-type": ("tokenizer_type", str),
    "--tokenizer-model": ("tokenizer_model", str),
    "--tensor-model-parallel-size": ("tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("pipeline_model_parallel_size", int),
    "--ckpt-format": ("ckpt_format", str),
}
# Megatron-LM's defaults of the store_true / store_false flags above, when a flag is not given
FLAG_DEFAULTS = {
    "group_query_attention": False,
    "use_rope_scaling": False,
    "swiglu": False,
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "qk_layernorm": False,
    "untie_embeddings_and_output_weights": False,
    "moe_router_pre_softmax": False,
}


def _parse_flags(flags: list[str]) -> dict:
    """The args fields ``flags`` set, read with FLAG_FIELDS (the flags pretrain_gpt.py's model needs)."""
    words, parsed, i = shlex.split(" ".join(flags)), dict(FLAG_DEFAULTS), 0
    while i < len(words):
        field, kind = FLAG_FIELDS.get(words[i], (None, None))
        if isinstance(kind, bool):
            parsed[field], i = kind, i + 1
        elif field is not None:
            parsed[field], i = kind(words[i + 1]), i + 2
        else:  # a flag that does not describe the model (vocabulary padding, --no-load-optim, ...)
            i += 2 if i + 1 < len(words) and not words[i + 1].startswith("--") else 1
    return parsed


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_printed_flags_give_megatron_lm_the_args_the_checkpoint_carries(saved, name):
    from megatron.core import dist_checkpointing

    args = dist_checkpointing.load_common_state_dict(saved[name]["path"])["args"]
    flags = megatron_lm_args.pretrain_gpt_flags(args)
    for field, value in _parse_flags(flags).items():
        if field in ("num_experts", "moe_ffn_hidden_size") or getattr(args, field) is not None:
            assert value == getattr(args, field), field
    if not args.num_experts:
        assert not any(flag.startswith("--moe") or flag.startswith("--num-experts") for flag in flags)
    # the padding: Megatron-LM pads the tokenizer's vocabulary (at most 128 ids) to a multiple of this x TP
    assert "--make-vocab-size-divisible-by 128" in flags
    assert "--make-vocab-size-divisible-by 64" in megatron_lm_args.pretrain_gpt_flags(args, tensor=2)
    assert "--tensor-model-parallel-size 2" in megatron_lm_args.pretrain_gpt_flags(args, tensor=2)
    with pytest.raises(CheckpointError, match="does not split over --tensor-model-parallel-size 3"):
        megatron_lm_args.pretrain_gpt_flags(args, tensor=3)


def test_the_args_record_the_layout_and_training_settings():
    meta = _meta(ARCHITECTURES["btx"])
    meta.layout = SavedLayout(world_size=16, tensor=2, pipeline=2, expert=2, distributed_optimizer=True)
    meta.training = {"hidden_dropout": 0.1, "bf16": True}
    args = megatron_lm_args.megatron_lm_args(meta)
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    assert tuple(getattr(args, f) for f in sizes) == (2, 2, 2)
    assert (args.world_size, args.data_parallel_size, args.use_distributed_optimizer) == (16, 4, True)
    assert (args.hidden_dropout, args.bf16, args.moe_aux_loss_coeff) == (0.1, True, 1e-2)
    assert args.make_vocab_size_divisible_by == 64  # no setting recorded: 128 rows over TP 2
    flags = megatron_lm_args.pretrain_gpt_flags(args)
    assert "--expert-model-parallel-size 2" in flags and "--bf16" in flags
    mock = dataclasses.replace(_meta(ARCHITECTURES["dense"]), tokenizer_model=None, training={"vocab_size": 100})
    mock_flags = megatron_lm_args.pretrain_gpt_flags(megatron_lm_args.megatron_lm_args(mock))
    assert "--tokenizer-type NullTokenizer" in mock_flags and "--vocab-size 100" in mock_flags
    hf = dataclasses.replace(_meta(ARCHITECTURES["dense"]), tokenizer_type="HuggingFaceTokenizer")
    assert megatron_lm_args.megatron_lm_args(hf).tokenizer_type == "HuggingFaceTokenizer"


def test_the_command_line_prints_the_command(saved, capsys):
    run = os.path.dirname(saved["btx"]["path"])
    assert megatron_lm_flags.main([run, "--tensor-model-parallel-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "torchrun --nproc-per-node N pretrain_gpt.py" in printed and f"--pretrained-checkpoint {run}" in printed
    assert "--transformer-impl transformer_engine" in printed and "--tensor-model-parallel-size 2" in printed
    assert megatron_lm_flags.main([os.path.dirname(saved["parallel"]["path"])]) == 2
    error = capsys.readouterr().err
    assert "\n" not in error.strip() and "no Megatron-LM model computes this checkpoint's (block_type parallel" in error
