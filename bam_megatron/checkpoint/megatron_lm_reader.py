"""Reading Megatron-LM checkpoints as they are: no conversion step.

Megatron-LM's ``pretrain_gpt.py`` with ``--ckpt-format torch_dist`` (its default) writes what
bam-megatron writes, a megatron-core ``dist_checkpointing`` directory, under the same names::

    SAVE/iter_0000100/ or SAVE/release/    common.pt, metadata.json, .metadata, __*_*.distcp
    SAVE/latest_checkpointed_iteration.txt an iteration number, or "release"

Its ``common.pt`` holds no bam-megatron ``meta`` record but Megatron-LM's whole ``args`` namespace
(with ``checkpoint_version`` 3.0, ``iteration``, ``num_floating_point_operations_so_far``, the LR
scheduler's state); the tensors are its GPTModel's ``sharded_state_dict`` (read at Megatron-LM
``core_v0.16.1``: megatron/training/checkpointing.py, arguments.py, gpt_builders.py and
megatron/core/models/gpt/gpt_layer_specs.py). This module turns ``args`` into a `CheckpointMeta`
(`meta_from_common`) and says where its tensors differ from ours (``CheckpointMeta.stored_keys``):

- A dense layer stores its norms under the names of the fused Transformer Engine linears with
  either spec (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``),
  as ours does: the same keys.
- An MoE layer of the Transformer Engine spec keeps ``pre_mlp_layernorm.weight``, as ours does; the
  local spec applies its dense renaming there too and stores it as ``mlp.linear_fc1.layer_norm_weight``.
  Which spec wrote a checkpoint is read from its tensor names. The experts
  (``mlp.experts.experts.linear_fc1.weight``, ...) are stored alike by SequentialMLP, TEGroupedMLP
  and the legacy GroupedMLP (megatron-core makes them interchangeable).

What bam-megatron's models cannot compute exactly (another position embedding, biases, LayerNorm
with its bias, GELU, routing it does not build, ...) is refused in one line naming the ``args``
field, its value and the checkpoint. Only the weights are read: Megatron-LM's optimizer and RNG
states are not (`store.load_checkpoint` refuses an optimizer).

The other way (the ``args`` bam-megatron writes for Megatron-LM) is `megatron_lm_args`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Optional

from bam_megatron.checkpoint.layout import RELEASE, is_checkpoint
from bam_megatron.checkpoint.meta import MEGATRON_LM, CheckpointError, CheckpointMeta, SavedLayout
from bam_megatron.errors import UserError
from bam_megatron.model.architecture import ARCHITECTURE_FIELDS, Architecture

CHECKPOINT_VERSION = 3.0
"""The ``checkpoint_version`` Megatron-LM writes into every checkpoint (torch_dist included)."""


# Megatron-LM's --use-rope-scaling: its gpt_builder passes rope_scaling=True to GPTModel but never
# --rope-scaling-factor, so the model always computes megatron-core's default factor.
ROPE_SCALING_FACTOR = 8.0

# Tensor names that tell the spec that wrote an MoE layer: the norm in front of the experts.
_TE_MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"
_LOCAL_MOE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
_LOCAL_SPEC_MOE_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

# Settings bam-megatron's models compute one way only: (args field, its flag, Megatron-LM's default
# (assumed where the Megatron-LM that wrote a checkpoint predates the field), the values accepted, why).
Rule = tuple[str, str, Any, tuple, str]
_SWIGLU_ONLY = "bam-megatron's FFNs are SwiGLU"
_REQUIRED: tuple[Rule, ...] = (
    ("ckpt_format", "--ckpt-format", "torch_dist", ("torch_dist",), "bam-megatron reads torch_dist checkpoints"),
    ("use_legacy_models", "--use-legacy-models", False, (False,), "legacy models store other tensors"),
    ("spec", "--spec", None, (None,), "a custom layer spec"),
    ("transformer_impl", "--transformer-impl", "transformer_engine", ("transformer_engine", "local"), "other layers"),
    ("position_embedding_type", "--position-embedding-type", "learned_absolute", ("rope",), "its models use RoPE"),
    ("rotary_percent", "--rotary-percent", 1.0, (1.0,), "it rotates the whole head"),
    ("rotary_interleaved", "--rotary-interleaved", False, (False,), "it rotates halves, not interleaved pairs"),
    ("no_rope_freq", "--no-rope-freq", None, (None,), "it applies RoPE in every layer"),
    ("rope_type", "--rope-type", None, (None, "rope"), "its RoPE is plain or Llama-3 scaled"),
    ("swiglu", "--swiglu", False, (True,), _SWIGLU_ONLY),
    ("squared_relu", "--squared-relu", False, (False,), _SWIGLU_ONLY),
    ("quick_geglu", "--quick-geglu", False, (False,), _SWIGLU_ONLY),
    ("glu_linear_offset", "--glu-linear-offset", 0.0, (0.0,), "its SwiGLU has no offset"),
    ("activation_func_clamp_value", "--activation-func-clamp-value", None, (None,), "it does not clamp"),
    ("add_bias_linear", "--disable-bias-linear not given", True, (False,), "its linear layers have no biases"),
    ("normalization", "--normalization", "LayerNorm", ("RMSNorm",), "Megatron-LM's LayerNorm has a bias, ours none"),
    ("qk_l2_norm", "--qk-l2-norm", False, (False,), "its Q/K norms are the model's norm"),
    ("multi_latent_attention", "--multi-latent-attention", False, (False,), "it has no multi-latent attention"),
    ("experimental_attention_variant", "--experimental-attention-variant", None, (None,), "another attention"),
    ("attention_output_gate", "--attention-output-gate", False, (False,), "its attention has no output gate"),
    ("softmax_type", "--softmax-type", "vanilla", ("vanilla",), "its attention softmax is vanilla"),
    ("softmax_scale", "TransformerConfig.softmax_scale", None, (None,), "it scales by 1/sqrt(head size)"),
    ("window_size", "--window-size", None, (None,), "its attention is full causal"),
    (
        "apply_residual_connection_post_layernorm",
        "--apply-residual-connection-post-layernorm",
        False,
        (False,),
        "its residual connections bypass the norms",
    ),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", None, (None,), "its layers are alike"),
    ("is_hybrid_model", "--is-hybrid-model", False, (False,), "a hybrid (Mamba) model"),
    ("hybrid_override_pattern", "--hybrid-override-pattern", None, (None,), "a hybrid (Mamba) model"),
    ("mtp_num_layers", "--mtp-num-layers", None, (None, 0), "it has no multi-token prediction layers"),
)
_REQUIRED_MOE: tuple[Rule, ...] = (
    ("moe_layer_freq", "--moe-layer-freq", 1, (1,), "its mixtures have experts in every layer"),
    (
        "moe_shared_expert_intermediate_size",
        "--moe-shared-expert-intermediate-size",
        None,
        (None,),
        "no shared experts",
    ),
    ("moe_router_score_function", "--moe-router-score-function", "softmax", ("softmax",), "its routers softmax"),
    ("moe_router_enable_expert_bias", "--moe-router-enable-expert-bias", False, (False,), "no expert bias"),
    ("moe_router_num_groups", "--moe-router-num-groups", None, (None,), "no group-limited routing"),
    ("moe_router_group_topk", "--moe-router-group-topk", None, (None,), "no group-limited routing"),
    ("moe_expert_capacity_factor", "--moe-expert-capacity-factor", None, (None,), "it drops no tokens"),
    ("moe_apply_probs_on_input", "--moe-apply-probs-on-input", False, (False,), "weights scale expert outputs"),
    ("moe_router_force_load_balancing", "--moe-router-force-load-balancing", False, (False,), "routing is learned"),
    ("moe_latent_size", "--moe-latent-size", None, (None,), "no latent expert projections"),
)

# Megatron-LM's --tokenizer-type names -> the kind bam_megatron.data.tokenizer loads from the same files.
_TOKENIZER_KINDS = {
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer",
    "SentencePieceTokenizer": "SentencePieceTokenizer",
    "Llama2Tokenizer": "SentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
}


def is_megatron_lm(common: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's common state dict is Megatron-LM's (its ``args``, no bam-megatron ``meta``)."""
    return "meta" not in common and "args" in common


def refuse_other_formats(path: str) -> None:
    """Raise a one-line `CheckpointError` if ``path`` is a Megatron-LM checkpoint in a format other
    than torch_dist (legacy ``--ckpt-format torch``, ``torch_dcp`` / ``fsdp_dtensor``)."""
    if not os.path.isdir(path) or is_checkpoint(path):
        return
    names = os.listdir(path)
    legacy = sorted(n for n in names if n.startswith("mp_rank_") and os.path.isdir(os.path.join(path, n)))
    if "model_optim_rng.pt" in names:  # one rank's directory of a legacy checkpoint
        legacy, path = [os.path.basename(os.path.normpath(path))], os.path.dirname(os.path.abspath(path))
    if legacy:
        save = os.path.dirname(os.path.abspath(path))
        raise CheckpointError(
            f"{path} is a Megatron-LM checkpoint in the legacy --ckpt-format torch ({legacy[0]}/model_optim_rng.pt, "
            "no metadata.json); bam-megatron reads --ckpt-format torch_dist: convert it with Megatron-LM, "
            f"pretrain_gpt.py <its model flags, at the TP/PP it was saved with> --load {save} --ckpt-format torch "
            "--ckpt-convert-format torch_dist --ckpt-convert-save OUT (it writes OUT/torch_dist, "
            "which bam-megatron reads)"
        )
    if ".metadata" in names:
        raise CheckpointError(
            f"{path} is a PyTorch DCP checkpoint (Megatron-LM --ckpt-format torch_dcp or fsdp_dtensor: .metadata, "
            "no metadata.json); bam-megatron reads --ckpt-format torch_dist: save it again with Megatron-LM's "
            "--ckpt-format torch_dist"
        )


def meta_from_common(common: Mapping[str, Any], path: str, tensors: Mapping[str, tuple[int, ...]]) -> CheckpointMeta:
    """The `CheckpointMeta` of the Megatron-LM checkpoint at ``path``.

    ``common`` is its common state dict (``args``, ``checkpoint_version``, ``iteration``); ``tensors``
    maps every stored tensor's key to its global shape (``dist_checkpointing.load_tensors_metadata``).
    Raises a one-line `CheckpointError` naming ``path`` and the ``args`` field it cannot honour.
    """
    args = common["args"]
    version = common.get("checkpoint_version", 0)
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: Megatron-LM checkpoint_version {version}, but bam-megatron reads version {CHECKPOINT_VERSION} "
            "(what Megatron-LM's torch_dist checkpoints hold)"
        )
    architecture = architecture_from_args(args, path, tensors)
    stored_keys = _stored_keys(architecture, tensors, path)
    _check_tensors(architecture, tensors, stored_keys, path)
    release = os.path.basename(os.path.normpath(path)) == RELEASE
    iteration = int(common.get("iteration", 0) or 0)
    tokenizer_type, tokenizer_model, fingerprint = _tokenizer(args)
    layout = SavedLayout(
        world_size=int(_get(args, "world_size", 1) or 1),
        tensor=int(_get(args, "tensor_model_parallel_size", 1) or 1),
        pipeline=int(_get(args, "pipeline_model_parallel_size", 1) or 1),
        expert=int(_get(args, "expert_model_parallel_size", 1) or 1),
        distributed_optimizer=bool(_get(args, "use_distributed_optimizer", False)),
    )
    seq_length = _get(args, "seq_length", None) or _get(args, "max_position_embeddings", None)
    if not seq_length:
        raise CheckpointError(
            f"{path}: Megatron-LM checkpoint whose args give neither seq_length nor max_position_embeddings"
        )
    return CheckpointMeta(
        architecture=architecture,
        seq_length=int(seq_length),
        iteration=0 if release else iteration,  # Megatron-LM starts a run from a release at iteration 0
        layout=layout,
        consumed_samples=int(_get(args, "consumed_train_samples", 0) or 0),
        tokenizer_fingerprint=fingerprint,
        tokenizer_model=tokenizer_model,
        tokenizer_type=tokenizer_type,
        lineage={
            "megatron_lm": {
                "path": os.path.abspath(path),
                "checkpoint_version": version,
                "iteration": iteration,
                "release": release,
                "tokenizer_type": _get(args, "tokenizer_type", None),
                "spec": _spec_name(architecture, stored_keys, args),
            }
        },
        training={"make_vocab_size_divisible_by": int(_get(args, "make_vocab_size_divisible_by", 128) or 128)},
        source=MEGATRON_LM,
        stored_keys=stored_keys,
    )


def architecture_from_args(args: Any, path: str, tensors: Mapping[str, tuple[int, ...]]) -> Architecture:
    """The `Architecture` Megatron-LM's ``args`` describe (a sequential block; dense, or btx with experts).

    ``tensors`` (stored key -> global shape) supplies the vocabulary size where ``args`` lacks it.
    """
    _refuse_what_we_do_not_compute(args, path, _REQUIRED)
    if _get(args, "layernorm_zero_centered_gamma", _get(args, "apply_layernorm_1p", False)):
        field = (
            "layernorm_zero_centered_gamma" if hasattr(args, "layernorm_zero_centered_gamma") else "apply_layernorm_1p"
        )
        raise _refusal(
            path, field, True, "--apply-layernorm-1p", "bam-megatron's norms scale by their weight, not 1 + it"
        )
    num_experts = _get(args, "num_experts", None) or None
    moe: dict[str, Any] = {}
    if num_experts:
        _refuse_what_we_do_not_compute(args, path, _REQUIRED_MOE)
        moe = _routing(args, path)
    heads = int(args.num_attention_heads)
    hidden = int(args.hidden_size)
    kv_channels = _get(args, "kv_channels", None)
    if kv_channels is not None and hidden % heads == 0 and int(kv_channels) == hidden // heads:
        kv_channels = None  # the default head size, as our Architecture spells it
    ffn = _get(args, "moe_ffn_hidden_size", None) if num_experts else None
    ffn = ffn or _get(args, "ffn_hidden_size", None)
    if ffn is None:
        raise CheckpointError(f"{path}: Megatron-LM checkpoint whose args have no ffn_hidden_size")
    vocab = _get(args, "padded_vocab_size", None)
    if vocab is None:  # Megatron-LM sets it from its tokenizer; the embedding says it too
        shape = tensors.get("embedding.word_embeddings.weight")
        if shape is None:
            raise CheckpointError(
                f"{path}: Megatron-LM checkpoint with neither args.padded_vocab_size nor an embedding"
            )
        vocab = shape[0]
    fields: dict[str, Any] = dict(
        variant="btx" if num_experts else "dense",
        num_layers=int(args.num_layers),
        hidden_size=hidden,
        ffn_hidden_size=int(ffn),
        num_attention_heads=heads,
        num_query_groups=int(args.num_query_groups) if _get(args, "group_query_attention", False) else heads,
        padded_vocab_size=int(vocab),
        num_experts=int(num_experts) if num_experts else None,
        moe_router_topk=int(_get(args, "moe_router_topk", 2)) if num_experts else 1,
        block_type="sequential",
        normalization="RMSNorm",
        rotary_base=float(_get(args, "rotary_base", 10000)),
        untie_embeddings_and_output_weights=bool(_get(args, "untie_embeddings_and_output_weights", False)),
        kv_channels=None if kv_channels is None else int(kv_channels),
        norm_epsilon=float(_get(args, "layernorm_epsilon", _get(args, "norm_epsilon", 1e-5))),
        add_qkv_bias=bool(_get(args, "add_qkv_bias", False)),
        qk_layernorm=bool(_get(args, "qk_layernorm", False)),
        rope_scaling_factor=ROPE_SCALING_FACTOR if _get(args, "use_rope_scaling", False) else None,
        **moe,
    )
    try:
        return Architecture(**fields)
    except UserError as error:
        raise CheckpointError(
            f"{path}: Megatron-LM checkpoint whose args do not describe a model here: {error}"
        ) from None


def _get(args: Any, name: str, default: Any) -> Any:
    """``args.name``; ``default`` (Megatron-LM's) where the Megatron-LM that wrote it predates the field."""
    return getattr(args, name, default)


def _refusal(path: str, field: str, value: Any, flag: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: Megatron-LM checkpoint with args.{field}={value!r} ({flag}), which bam-megatron's models "
        f"cannot compute ({why})"
    )


def _refuse_what_we_do_not_compute(args: Any, path: str, rules: tuple[Rule, ...]) -> None:
    """Raise the refusal of the first rule whose field holds a value not accepted."""
    for field, flag, default, accepted, why in rules:
        value = _get(args, field, default)
        if field == "moe_layer_freq" and isinstance(value, (list, tuple)) and all(v == 1 for v in value):
            continue  # a pattern with experts in every layer
        if value not in accepted:
            raise _refusal(path, field, value, flag, why)


def _routing(args: Any, path: str) -> dict[str, Any]:
    """The FFN router's settings as Architecture fields; what it cannot carry is refused.

    Megatron-LM (``moe_router_score_function=softmax``): with ``--moe-router-pre-softmax`` a softmax
    over all experts, then the top-k weights as they are; without it (its default, top-k > 1 only)
    the top-k logits, then a softmax over those k (the weights sum to 1). Either way
    ``--moe-router-topk-scaling-factor`` multiplies the weights.
    """
    pre_softmax = bool(_get(args, "moe_router_pre_softmax", False))
    scaling = _get(args, "moe_router_topk_scaling_factor", None)
    fields: dict[str, Any] = {}
    for field, value, ours, how in (
        ("moe_router_pre_softmax", pre_softmax, True, "a softmax over all experts before the top-k"),
        ("moe_router_topk_scaling_factor", scaling, None, "unscaled routing weights"),
    ):
        if field in ARCHITECTURE_FIELDS:
            fields[field] = value
        elif value != ours:
            flag = "--" + field.replace("_", "-")
            raise _refusal(path, field, value, flag, f"this bam-megatron's routers compute {how} only")
    return fields


def _spec_name(architecture: Architecture, stored_keys: Mapping[str, str], args: Any) -> str:
    """Which of megatron-core's GPT layer specs wrote the checkpoint: told by an MoE's tensor names;
    a dense model's are the same with both, so its ``args.transformer_impl`` says."""
    if architecture.is_moe:
        return "local" if stored_keys else "transformer_engine"
    return str(_get(args, "transformer_impl", "transformer_engine"))


def _stored_keys(architecture: Architecture, tensors: Mapping[str, tuple[int, ...]], path: str) -> dict[str, str]:
    """Today's key -> the key this checkpoint stored it under, where they differ (by the spec that wrote it)."""
    if not architecture.is_moe or _TE_MOE_NORM in tensors:
        return {}  # dense: the same names with either spec; MoE of the TE spec: ours
    if _LOCAL_MOE_NORM in tensors:
        return dict(_LOCAL_SPEC_MOE_KEYS)
    raise CheckpointError(
        f"{path}: Megatron-LM MoE checkpoint with no norm in front of its experts "
        f"(neither {_TE_MOE_NORM} nor {_LOCAL_MOE_NORM})"
    )


def _expected_shapes(architecture: Architecture, stored_keys: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """The global shapes of the tensors that pin down an architecture, under the keys this checkpoint stores."""
    a = architecture
    layers, hidden = a.num_layers, a.hidden_size
    head = a.kv_channels or hidden // a.num_attention_heads
    qkv_rows = (a.num_attention_heads + 2 * a.num_query_groups) * head
    shapes = {
        "embedding.word_embeddings.weight": (a.padded_vocab_size, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv_rows, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, a.num_attention_heads * head),
        "decoder.final_layernorm.weight": (hidden,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (layers, hidden),
    }
    if a.is_moe:
        experts = "decoder.layers.mlp.experts.experts"
        shapes[f"{experts}.linear_fc1.weight"] = (layers, a.num_experts, 2 * a.ffn_hidden_size, hidden)
        shapes[f"{experts}.linear_fc2.weight"] = (layers, a.num_experts, hidden, a.ffn_hidden_size)
        shapes["decoder.layers.mlp.router.weight"] = (layers, a.num_experts, hidden)
        norm = "decoder.layers.pre_mlp_layernorm.weight"
        for today, stored in stored_keys.items():
            norm = norm.replace(today, stored)
        shapes[norm] = (layers, hidden)
    else:
        shapes["decoder.layers.mlp.linear_fc1.weight"] = (layers, 2 * a.ffn_hidden_size, hidden)
        shapes["decoder.layers.mlp.linear_fc2.weight"] = (layers, hidden, a.ffn_hidden_size)
        shapes["decoder.layers.mlp.linear_fc1.layer_norm_weight"] = (layers, hidden)
    if a.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (a.padded_vocab_size, hidden)
    if a.qk_layernorm:
        shapes["decoder.layers.self_attention.q_layernorm.weight"] = (layers, head)
        shapes["decoder.layers.self_attention.k_layernorm.weight"] = (layers, head)
    if a.add_qkv_bias:
        shapes["decoder.layers.self_attention.linear_qkv.bias"] = (layers, qkv_rows)
    return shapes


def _check_tensors(
    architecture: Architecture, tensors: Mapping[str, tuple[int, ...]], stored_keys: Mapping[str, str], path: str
) -> None:
    """Refuse, in one line, a checkpoint whose tensors do not have the shapes its ``args`` describe."""
    for key, expected in _expected_shapes(architecture, stored_keys).items():
        stored = tensors.get(key)
        if stored is None:
            raise CheckpointError(
                f"{path}: Megatron-LM checkpoint without the tensor {key} that its args "
                f"(a {architecture.variant} model) call for"
            )
        if tuple(stored) != expected:
            raise CheckpointError(
                f"{path}: Megatron-LM tensor {key} has shape {tuple(stored)}, but its args give {expected}"
            )


def check_model_keys(
    sharded_tensors: Mapping[str, Optional[tuple[int, ...]]], tensors: Mapping[str, Any], path: str
) -> None:
    """Refuse, in one line, a load that asks for a tensor the checkpoint does not hold (or in another shape).

    ``sharded_tensors``: the stored key of every tensor the model reads -> its global shape (None:
    not known before its factory is applied).
    """
    for key, shape in sharded_tensors.items():
        stored = tensors.get(key)
        if stored is None:
            raise CheckpointError(f"{path}: Megatron-LM checkpoint has no tensor {key}, which this model reads")
        if shape is not None and tuple(stored) != tuple(shape):
            raise CheckpointError(
                f"{path}: Megatron-LM tensor {key} has shape {tuple(stored)}, but this model's is {tuple(shape)}"
            )


def _tokenizer(args: Any) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(the bam-megatron tokenizer kind, its path, its fingerprint) from Megatron-LM's tokenizer args.

    The fingerprint is computed as bam-megatron computes it, where the tokenizer is found on this
    machine at the path Megatron-LM recorded; otherwise it is None (unknown).
    """
    megatron_type = _get(args, "tokenizer_type", None)
    model = _get(args, "tokenizer_model", None) or None
    kind = _TOKENIZER_KINDS.get(megatron_type)
    if kind is None or model is None or not os.path.exists(model):
        return kind, model, None
    stat = os.stat(model)
    return kind, model, _fingerprint(kind, os.path.abspath(model), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _fingerprint(kind: str, path: str, mtime_ns: int, size: int) -> Optional[str]:
    """bam_megatron.data.tokenizer's fingerprint of a tokenizer (None if it cannot load it); cached per file state."""
    from bam_megatron.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path, kind).fingerprint
    except UserError:
        return None
