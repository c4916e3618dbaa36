"""`Architecture`: the one description of a model's function and shapes, and where it comes from.

Everything that decides what a model computes and which tensors it holds is a field of
`Architecture`; nothing else is. A checkpoint records one (`bam_megatron.checkpoint`), a training
run resolves one from its flags and the checkpoint it starts from (`resolve_architecture`), and
every tool that builds a model builds it from one (`Architecture.model_config`). Settings that
change how a model is *trained* or *laid out* (dropout, parallel sizes, recompute, bf16, loss
coefficients) are not architecture: they are passed to `model_config` by whoever builds the model.

This module imports neither torch nor megatron-core at import time, so command-line tools answer
``--help`` and input errors at once.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from bam_megatron.errors import ConfigError
from bam_megatron.model.moe_defaults import MOE_ROUTER_PRE_SOFTMAX
from bam_megatron.model.variants import (
    ACTIVATIONS,
    BLOCK_TYPES,
    DEFAULT_NUM_EXPERTS,
    NORM_PLACEMENTS,
    NORMALIZATIONS,
    PRESETS,
    QK_NORM_SCOPES,
    SOFT_MOA_VARIANTS,
    VARIANTS,
)

if TYPE_CHECKING:
    from bam_megatron.model.config import BAMConfig


def _declare(
    help: str,
    *,
    default: Any = dataclasses.MISSING,
    unset: str = "",
    minimum: Optional[float] = None,
    above: Optional[float] = None,
    choices: Optional[tuple[str, ...]] = None,
    flag: bool = True,
) -> Any:
    """An `Architecture` field and its command-line flag (`FlagSpec`): ``help``; ``unset``, what a
    run takes when neither the flag nor a checkpoint gives it; the range (``>= minimum``, ``> above``)
    or ``choices``; ``flag=False`` for a field no tool takes as a flag."""
    metadata = {"help": help, "unset": unset, "minimum": minimum, "above": above, "choices": choices, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FlagSpec:
    """The command-line flag of one architecture field, as its declaration says."""

    name: str
    type: type
    help: str
    unset: str
    minimum: Optional[float]
    above: Optional[float]
    choices: Optional[tuple[str, ...]]

    @property
    def flag(self) -> str:
        """'--hidden-size'."""
        return flag_name(self.name)


@dataclass(frozen=True)
class Architecture:
    """What a model computes and which tensors it holds; Megatron-LM's flag names.

    ``num_attention_heads`` / ``num_query_groups`` are per attention expert, as in the dense models
    the experts come from. ``num_experts`` counts the FFN experts (and, for soft MoA, the attention
    experts); it is None for a dense model. ``padded_vocab_size`` is the number of embedding rows.
    ``kv_channels`` is the head size (None: hidden_size / num_attention_heads);
    ``rope_scaling_factor`` enables Llama-3's RoPE frequency scaling as megatron-core implements it
    (low/high frequency factors 1 and 4, original context 8192); None: plain RoPE.
    ``moe_router_pre_softmax``: the FFN router's softmax over all experts, then the top-k weights
    as they are (the paper's); False: softmax over the top-k only, so the weights sum to 1
    (renormalised; megatron-core allows it for top-k > 1). ``moe_router_topk_scaling_factor``
    multiplies the routing weights (None: 1); with zero-initialised routers, E/k makes top-k
    routing over E identical experts exactly the dense FFN (sparse upcycling's step 0).
    ``router_bias``: both routers compute W x + b with a trained per-expert bias b (docs/model.md).
    """

    variant: str = _declare(
        "model family (docs/model.md): dense, one attention and a dense FFN; bam, N attention experts "
        "(expert KV) + N FFN experts; bam-shared-kv, as bam with one K/V shared by the attention experts; "
        "btx, one attention + N FFN experts",
        unset="default: dense",
        choices=VARIANTS,
    )
    num_layers: int = _declare("transformer layers", minimum=1)
    hidden_size: int = _declare("d_model", minimum=1)
    ffn_hidden_size: int = _declare("SwiGLU intermediate size (of one FFN expert)", minimum=1)
    num_attention_heads: int = _declare("per attention expert", minimum=1)
    num_query_groups: int = _declare("KV heads per attention expert (GQA)", unset="default: the heads", minimum=1)
    padded_vocab_size: int = _declare("embedding rows", flag=False)
    num_experts: Optional[int] = _declare(
        "FFN experts and, for bam, attention experts",
        default=None,
        unset=f"default: {DEFAULT_NUM_EXPERTS}",
        minimum=1,
    )
    moe_router_topk: int = _declare("FFN experts per token", default=1, unset="default: 1", minimum=1)
    attention_router_topk: Optional[int] = _declare(
        "keep the k largest attention gates per token (the top-k MoA ablation; soft-MoA variants only)",
        default=None,
        unset="default: soft MoA (every attention expert)",
        minimum=1,
    )
    block_type: str = _declare(
        "parallel: attention and FFN on one shared pre-norm; sequential: attention, then the FFN",
        default="parallel",
        unset="default: parallel",
        choices=BLOCK_TYPES,
    )
    normalization: str = _declare(
        "the block's pre-norm and the final norm; LayerNorm has no bias (Cohere's: what bam-convert-hf "
        "exports to and imports from CohereForCausalLM)",
        default="RMSNorm",
        unset="default: RMSNorm",
        choices=NORMALIZATIONS,
    )
    norm_placement: str = _declare(
        "where the sequential block's norms are: pre, h = x + Attn(Norm x), y = h + FFN(Norm h) (Llama); post, "
        "h = x + Norm(Attn x), y = h + Norm(FFN h) (OLMo 2); both, h = x + Norm(Attn(Norm x)), ... (Gemma 2/3)",
        default="pre",
        unset="default: pre",
        choices=NORM_PLACEMENTS,
    )
    apply_layernorm_1p: bool = _declare(
        "every norm scales by (1 + weight), its weight starting at 0 (Megatron-LM's --apply-layernorm-1p, "
        "megatron-core's layernorm_zero_centered_gamma; Gemma's RMSNorm)",
        default=False,
        unset="default: weight",
    )
    activation: str = _declare(
        "the gated FFN's activation: swiglu, SiLU; geglu, tanh-approximated GELU (Gemma's)",
        default="swiglu",
        unset="default: swiglu",
        choices=ACTIVATIONS,
    )
    scale_embeddings: bool = _declare(
        "the embeddings times sqrt(hidden size) (Gemma's)", default=False, unset="default: not scaled"
    )
    query_pre_attn_scalar: Optional[float] = _declare(
        "attention scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (Gemma's; megatron-core's "
        "softmax_scale)",
        default=None,
        unset="default: head_dim",
        above=0,
    )
    attn_logit_softcapping: Optional[float] = _declare(
        "attention scores soft-capped, c·tanh(s/c), before the softmax (Gemma 2's; the local backend's attention)",
        default=None,
        unset="default: none",
        above=0,
    )
    final_logit_softcapping: Optional[float] = _declare(
        "output logits soft-capped, c·tanh(z/c) (Gemma 2's)", default=None, unset="default: none", above=0
    )
    local_rotary_base: Optional[float] = _declare(
        "RoPE base of the local layers (Gemma 3's rope_local_base_freq; every layer but each "
        "--global-attention-every-th, whose base is --rotary-base); the attention itself is full causal",
        default=None,
        unset="default: one base for every layer",
        above=0,
    )
    global_attention_every: Optional[int] = _declare(
        "with --local-rotary-base: layers N, 2N, ... (1-based) are global (Gemma 3: 6)",
        default=None,
        unset="default: none",
        minimum=1,
    )
    rotary_base: float = _declare("RoPE base (Hugging Face: rope_theta)", default=10000.0, unset="default: 1e4")
    untie_embeddings_and_output_weights: bool = _declare(
        "separate output layer and embedding; --no-... ties them",
        default=True,
        unset="default: as the preset says (untied if no preset)",
    )
    kv_channels: Optional[int] = _declare("head size", default=None, unset="default: hidden size / heads", minimum=1)
    norm_epsilon: float = _declare("epsilon of every norm", default=1e-5, unset="default: 1e-5", above=0)
    add_qkv_bias: bool = _declare("biases on Q, K, V (Qwen2)", default=False, unset="default: none")
    qk_layernorm: bool = _declare("norms on the queries and keys (Qwen3, OLMo 2)", default=False, unset="default: none")
    qk_layernorm_scope: str = _declare(
        "what --qk-layernorm normalises: head, each head's queries and keys over head_dim (Qwen3); projection, "
        "the whole Q and the whole K projection, all heads together (OLMo 2; soft MoA: each expert's heads)",
        default="head",
        unset="default: head",
        choices=QK_NORM_SCOPES,
    )
    rope_scaling_factor: Optional[float] = _declare(
        "Llama-3 RoPE scaling (megatron-core's --use-rope-scaling: low/high frequency factors 1 and 4, "
        "original context 8192)",
        default=None,
        unset="default: none",
        minimum=1,
    )
    moe_router_pre_softmax: bool = _declare(
        "softmax over all experts, then the top-k weights as they are; --no-...: softmax over the top-k "
        "only (renormalised; needs --moe-router-topk > 1)",
        default=MOE_ROUTER_PRE_SOFTMAX,
        unset="default: pre-softmax",
    )
    moe_router_topk_scaling_factor: Optional[float] = _declare(
        "multiplies the routing weights", default=None, unset="default: 1"
    )
    router_bias: bool = _declare(
        "a trained per-expert bias on both routers, logits = W x + b (the soft-MoA attention gates and the "
        "FFN router; mixtures only); bam-upcycle --extend turns it on so that a grown mixture is exactly "
        "the old one at step 0",
        default=False,
        unset="default: none",
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.block_type not in BLOCK_TYPES:
            raise ConfigError(f"block_type must be one of {', '.join(BLOCK_TYPES)}, got {self.block_type!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        check_bounds(self.to_dict())
        check_norms(
            self.block_type, self.norm_placement, self.normalization, self.qk_layernorm, self.qk_layernorm_scope
        )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if (self.local_rotary_base is None) != (self.global_attention_every is None):
            raise ConfigError("--local-rotary-base and --global-attention-every go together (Gemma 3's local layers)")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not a multiple of "
                f"--num-query-groups {self.num_query_groups}"
            )
        check_routing(
            self.variant,
            self.num_experts,
            self.moe_router_topk,
            self.attention_router_topk,
            self.moe_router_pre_softmax,
            self.router_bias,
        )

    @property
    def is_moe(self) -> bool:
        """True for the mixtures (bam, bam-shared-kv, btx): models with FFN experts and routers."""
        return self.variant != "dense"

    @property
    def has_soft_moa(self) -> bool:
        """True when attention is a soft mixture of ``num_experts`` attention experts."""
        return self.variant in SOFT_MOA_VARIANTS

    # ----- records
    def to_dict(self) -> dict[str, Any]:
        """Plain Python data, as checkpoints store it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], where: str = "architecture") -> Architecture:
        """The inverse of `to_dict`; unknown or missing fields are an error naming ``where``."""
        names = set(ARCHITECTURE_FIELDS)
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown architecture fields {', '.join(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(fields))
        if missing:
            raise ConfigError(f"{where}: missing architecture fields {', '.join(missing)}")
        return cls(**fields)

    def replace(self, **changes: Any) -> Architecture:
        """A copy with ``changes`` (checked like any new architecture)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: Architecture, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
        """(field, ours, theirs) for every field where ``other`` differs, in field order."""
        return [
            (name, getattr(self, name), getattr(other, name))
            for name in ARCHITECTURE_FIELDS
            if name not in ignore and getattr(self, name) != getattr(other, name)
        ]

    # ----- models
    def model_config(self, **settings: Any) -> BAMConfig:
        """The BAMConfig of this architecture; ``settings`` are the other TransformerConfig fields
        (parallel sizes, dropout, recompute, dtype, router loss coefficients, ...).

        megatron-core's and BAMConfig's own checks run here: a parallel layout that does not divide
        the heads, KV groups, experts or layers is a `ConfigError` naming the flag.
        """
        from bam_megatron.model.configs import variant_config

        fields: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            block_type=self.block_type,
            normalization=self.normalization,
            rotary_base=self.rotary_base,
            kv_channels=self.kv_channels,
            layernorm_epsilon=self.norm_epsilon,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            qk_layernorm_scope=self.qk_layernorm_scope,
            norm_placement=self.norm_placement,
            rope_scaling_factor=self.rope_scaling_factor,
            layernorm_zero_centered_gamma=self.apply_layernorm_1p,
            scale_embeddings=self.scale_embeddings,
            attn_logit_softcapping=self.attn_logit_softcapping,
            final_logit_softcapping=self.final_logit_softcapping,
            local_rotary_base=self.local_rotary_base,
            global_attention_every=self.global_attention_every,
        )
        if self.activation == "geglu":
            from bam_megatron.model.configs import gelu_tanh

            fields["activation_func"] = gelu_tanh
        if self.query_pre_attn_scalar is not None:
            fields["softmax_scale"] = self.query_pre_attn_scalar**-0.5
        if self.is_moe:
            fields["moe_router_pre_softmax"] = self.moe_router_pre_softmax
            fields["moe_router_topk_scaling_factor"] = self.moe_router_topk_scaling_factor
            fields["router_bias"] = self.router_bias
        if self.has_soft_moa:
            fields["attention_router_topk"] = self.attention_router_topk
        fields.update(settings)
        return variant_config(
            self.variant, num_experts=self.num_experts or 1, moe_router_topk=self.moe_router_topk, **fields
        )

    def one_rank_config(self) -> BAMConfig:
        """The config tools that read or write checkpoints on one process build: TP = PP = EP = 1,
        fp32, no dropout or recompute, no initialisation (every weight is loaded or written)."""
        return self.model_config(use_cpu_initialization=True, perform_initialization=False)

    def check_layout(self, tensor: int = 1, pipeline: int = 1, expert: int = 1) -> None:
        """Raise a `ConfigError` naming the flag if the model cannot be split this way."""
        if self.padded_vocab_size % tensor:
            raise ConfigError(
                f"the vocabulary ({self.padded_vocab_size} rows) does not split over "
                f"--tensor-model-parallel-size {tensor}"
            )
        if expert > 1 and not self.is_moe:
            raise ConfigError(f"--expert-model-parallel-size {expert} needs a mixture; {self.variant} has no experts")
        with warnings.catch_warnings():  # megatron-core's advice on SP with EP x TP: not this check's business
            warnings.simplefilter("ignore", UserWarning)
            self.model_config(
                tensor_model_parallel_size=tensor,
                pipeline_model_parallel_size=pipeline,
                expert_model_parallel_size=expert,
                use_cpu_initialization=True,
            )


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))
"""The one list of architecture fields (checkpoints, compatibility checks, flag resolution)."""


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _flag_type(annotation: str) -> type:
    """'Optional[int]' -> int (the annotations are strings: ``from __future__ import annotations``)."""
    inner = annotation.removeprefix("Optional[").removesuffix("]")
    return _TYPES[inner]


ARCHITECTURE_FLAGS: dict[str, FlagSpec] = {
    f.name: FlagSpec(
        f.name,
        _flag_type(f.type),
        f.metadata["help"],
        f.metadata["unset"],
        f.metadata["minimum"],
        f.metadata["above"],
        f.metadata["choices"],
    )
    for f in dataclasses.fields(Architecture)
    if f.metadata["flag"]
}
"""Every architecture field a tool takes as a flag (all but ``padded_vocab_size``), in field order."""


def field_default(name: str) -> Any:
    """The value an `Architecture` takes for field ``name`` when it is not given."""
    default = {f.name: f.default for f in dataclasses.fields(Architecture)}[name]
    if default is dataclasses.MISSING:
        raise KeyError(f"architecture field {name} has no default")
    return default


def check_bounds(values: Mapping[str, Any]) -> None:
    """Raise a `ConfigError` naming the flag for the first architecture value in ``values`` (field ->
    value; None: not given) outside the range its field declares."""
    for name, value in values.items():
        spec = ARCHITECTURE_FLAGS.get(name)
        if spec is None or value is None or isinstance(value, bool):
            continue
        if spec.minimum is not None and not value >= spec.minimum:
            raise ConfigError(f"{spec.flag} must be >= {spec.minimum}, got {value}")
        if spec.above is not None and not value > spec.above:
            raise ConfigError(f"{spec.flag} must be > {spec.above}, got {value}")


def check_norms(block_type: str, placement: str, normalization: str, qk_layernorm: bool, qk_scope: str) -> None:
    """The norm settings that fit together; a `ConfigError` naming the flag otherwise."""
    if placement not in NORM_PLACEMENTS:
        raise ConfigError(f"--norm-placement must be one of {', '.join(NORM_PLACEMENTS)}, got {placement!r}")
    if qk_scope not in QK_NORM_SCOPES:
        raise ConfigError(f"--qk-layernorm-scope must be one of {', '.join(QK_NORM_SCOPES)}, got {qk_scope!r}")
    if placement != "pre" and block_type != "sequential":
        raise ConfigError(
            f"--norm-placement {placement} needs --block-type sequential (the parallel block's attention and FFN share "
            "one pre-norm)"
        )
    if qk_scope == "projection" and not (qk_layernorm and normalization == "RMSNorm"):
        raise ConfigError("--qk-layernorm-scope projection needs --qk-layernorm and --normalization RMSNorm")


def check_routing(
    variant: str,
    num_experts: Optional[int],
    moe_router_topk: int = 1,
    attention_router_topk: Optional[int] = None,
    moe_router_pre_softmax: bool = MOE_ROUTER_PRE_SOFTMAX,
    router_bias: bool = False,
) -> None:
    """The routing settings of a ``variant`` model with ``num_experts`` (None for dense) that fit
    together; a `ConfigError` naming the flag otherwise (every tool that takes routing flags)."""
    if router_bias and variant == "dense":
        raise ConfigError("--router-bias: a dense model has no router (bam, bam-shared-kv and btx have)")
    if variant != "dense":
        if num_experts is None or num_experts < 1:
            raise ConfigError(f"--num-experts must be >= 1 for variant {variant}, got {num_experts}")
        if not moe_router_pre_softmax and moe_router_topk == 1:
            raise ConfigError(
                "--no-moe-router-pre-softmax needs --moe-router-topk > 1 (one renormalised weight is "
                "always 1: the router would learn nothing)"
            )
        if not 1 <= moe_router_topk <= num_experts:
            raise ConfigError(f"--moe-router-topk must be in [1, --num-experts {num_experts}], got {moe_router_topk}")
    elif num_experts is not None:
        raise ConfigError(f"a dense model has no experts, got num_experts={num_experts}")
    k = attention_router_topk
    if k is not None and not (variant in SOFT_MOA_VARIANTS and 1 <= k <= num_experts):
        raise ConfigError(
            f"--attention-router-topk {k}: needs a soft-MoA variant ({', '.join(SOFT_MOA_VARIANTS)}) "
            "and a value in [1, --num-experts]"
        )


def add_architecture_flags(
    parser: Any,
    names: Optional[Sequence[str]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    required: Sequence[str] = (),
    notes: Optional[Mapping[str, str]] = None,
) -> None:
    """Add the flags of the architecture fields ``names`` (default: all) to an argparse parser or
    group, as the fields declare them (name, type, choices, help).

    A flag's default is None (not given: the checkpoint's, the preset's or the field's ``unset``
    value decides) unless ``defaults`` names one; ``required`` flags must be given; ``notes`` adds a
    tool's own words to a flag's help. Ranges are checked by `check_bounds` once parsed.
    """
    import argparse

    defaults, notes = dict(defaults or {}), dict(notes or {})
    for name in names or tuple(ARCHITECTURE_FLAGS):
        spec = ARCHITECTURE_FLAGS[name]
        default = defaults.get(name)
        words = [notes[name]] if name in notes else []
        words.append(spec.help)
        if name in defaults:
            words.append(f"default: {default}")
        elif spec.unset and name not in required:
            words.append(spec.unset)
        kwargs: dict[str, Any] = {"default": default, "help": "; ".join(words)}
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = spec.type
        if spec.choices:
            kwargs["choices"] = spec.choices
        if name in required:
            kwargs["required"] = True
        parser.add_argument(spec.flag, **kwargs)


def flag_name(field: str) -> str:
    """'hidden_size' -> '--hidden-size': every architecture field is the pretrain_bam.py flag of that name."""
    return "--" + field.replace("_", "-")


def padded_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Megatron's embedding size: ``vocab_size`` rounded up to a multiple of divisible_by × TP.

    The padding makes the embedding split evenly over tensor-parallel ranks and keeps GEMM shapes
    friendly; the extra rows are never produced by the tokenizer.
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
        ("tensor_model_parallel_size", tensor_model_parallel_size),
    ):
        if int(value) != value or value < 1:
            raise ConfigError(f"{flag_name(name)} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def resolve_architecture(
    given: Mapping[str, Any],
    preset: Optional[str] = None,
    saved: Optional[Architecture] = None,
    saved_path: Optional[str] = None,
    padded_vocab: Optional[int] = None,
) -> Architecture:
    """The architecture of a run: the checkpoint's, else the flags', then the preset's, then defaults.

    ``given`` maps architecture fields to the values set explicitly on the command line (None: not
    given). With a checkpoint (``saved``, read from ``saved_path``) every field comes from it, as
    Megatron-LM's ``--use-checkpoint-args`` does, and a flag (or ``--preset``) that contradicts it is
    a `ConfigError` naming the flag, both values and the checkpoint. ``padded_vocab`` is the
    embedding size the tokenizer and flags give, used when there is no checkpoint.
    """
    from_preset = PRESETS[preset].architecture_fields() if preset else {}
    values: dict[str, Any] = {}
    for name in ARCHITECTURE_FIELDS:
        value, origin = given.get(name), flag_name(name)
        if value is None and name in from_preset:
            value, origin = from_preset[name], f"--preset {preset}"
        if saved is not None:
            recorded = getattr(saved, name)
            if value is not None and name != "padded_vocab_size" and value != recorded:
                raise ConfigError(
                    f"{origin} gives {name}={value}, but checkpoint {saved_path} was saved with {name}={recorded} "
                    "(the architecture comes from the checkpoint: drop the flag)"
                )
            values[name] = recorded
        elif value is not None:
            values[name] = value
    if saved is not None:
        return saved
    required = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
    missing = [flag_name(name) for name in required if name not in values]
    if missing:
        raise ConfigError("without --preset or a checkpoint to start from, give " + ", ".join(missing))
    if padded_vocab is None:
        raise ConfigError("the vocabulary size is unknown: give --tokenizer-model or --vocab-size")
    values.setdefault("variant", "dense")
    values.setdefault("num_query_groups", values["num_attention_heads"])
    values["padded_vocab_size"] = padded_vocab
    if values["variant"] == "dense":
        values["num_experts"] = None  # --num-experts describes mixtures only
    else:
        values.setdefault("num_experts", DEFAULT_NUM_EXPERTS)
    return Architecture(**values)
