"""Phase 3, mix: build one MoE checkpoint from the seed and the dense experts (docs/design.md §1).

    bam-upcycle --expert seed=runs/seed --expert code=runs/code --expert law=runs/law \\
        --expert math=runs/math --method bam --save runs/bam-init

Methods:

- ``bam``: FFN experts and attention experts copied from each source (soft MoA, expert KV);
  norms, embedding and output layer averaged; both routers newly initialised: at random, or from
  each expert's domain data (``--router-init domain``, `bam_megatron.conversion.router_init`).
- ``bam-shared-kv``: as ``bam``; K and V are one projection shared by all attention experts,
  the average of the sources' (``--shared-kv-init average``) or one source's.
- ``btx``: attention averaged, FFN experts copied (Branch-Train-MiX).
- ``sparse``: one source copied into every FFN expert (sparse upcycling); ``--num-experts``.

The MoE is built and written layer by layer (``bam_megatron.conversion.layerwise``): each
source's layer is read as its chunks of the ``torch_dist`` checkpoint (any TP/PP it was saved
with), so memory holds a layer or two of the MoE and one of a source, never a whole model
(docs/phases.md). The output is a checkpoint
that ``pretrain_bam.py --pretrained-checkpoint`` loads under the target TP/EP/PP; it is written
under a temporary name with a manifest (sources, their steps and hashes, method, router seed) and
renamed when complete, so a failed upcycle leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointError, CheckpointMeta, check_same_architecture, lineage
from bam_megatron.errors import ConfigError, UserError, run_tool
from bam_megatron.model.architecture import (
    Architecture,
    add_architecture_flags,
    check_bounds,
    check_routing,
    field_default,
    padded_vocab_size,
)
from bam_megatron.model.router_ramp import DEFAULT_RAMP_ITERS, DEFAULT_RAMP_START
from bam_megatron.model.variants import DEFAULT_NUM_EXPERTS, SOFT_MOA_VARIANTS, VARIANTS

METHODS = (*(v for v in VARIANTS if v != "dense"), "sparse")
"""What bam-upcycle builds; each is a model variant except ``sparse``, which builds a ``btx`` model."""
# The target-layout flags of bam-upcycle, in the words of the model checks (which name pretrain_bam.py's).
TARGET_FLAGS = {
    "--tensor-model-parallel-size": "--target-tensor-parallel-size",
    "--pipeline-model-parallel-size": "--target-pipeline-parallel-size",
    "--expert-model-parallel-size": "--target-expert-parallel-size",
}


ROUTING_FLAGS = (
    "num_experts",
    "moe_router_topk",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "attention_router_topk",
    "router_bias",
)
"""The architecture fields bam-upcycle takes as flags: the new mixture's routing."""


def variant_of(method: str) -> str:
    """The model variant a method builds (sparse upcycling builds the BTX architecture)."""
    return "btx" if method == "sparse" else method


class UpcycleError(UserError):
    """A source or a target setting that makes upcycling impossible; one line naming it."""


@dataclass(frozen=True)
class Source:
    """One dense checkpoint, by name."""

    name: str
    path: str  # the iter_* directory
    meta: CheckpointMeta

    @property
    def label(self) -> str:
        """'source NAME (PATH)', for messages."""
        return f"source {self.name} ({self.path})"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags of bam-upcycle."""
    p = argparse.ArgumentParser(
        prog="bam-upcycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="NAME=DIR",
        help="a dense source checkpoint (a --save directory or an iter_* directory); "
        "repeat, in expert order (the seed first by convention); with --extend: the new experts",
    )
    p.add_argument("--method", choices=METHODS, help="required unless --extend")
    g = p.add_argument_group("grow a trained mixture (docs/phases.md)")
    g.add_argument(
        "--extend",
        metavar="MIXTURE",
        help="a trained bam, bam-shared-kv or btx checkpoint: add each --expert as a new attention "
        "and FFN expert, and/or remove each --drop-expert; everything shared is kept from the mixture",
    )
    g.add_argument("--drop-expert", action="append", metavar="NAME", help="with --extend: remove this expert")
    g.add_argument(
        "--new-expert-ramp-iters",
        type=int,
        default=DEFAULT_RAMP_ITERS,
        help="with --extend: iterations over which the new experts' router offset rises from "
        "-(--new-expert-ramp-start) to 0 (at step 0 it is -1024: the grown mixture is exactly the old one)",
    )
    g.add_argument(
        "--new-expert-ramp-start",
        type=float,
        default=DEFAULT_RAMP_START,
        help="with --extend: the new experts' router offset after the first step (logits; gates e^-start "
        "of the largest)",
    )
    g.add_argument(
        "--allow-foreign-lineage",
        action="store_true",
        help="with --extend: add experts not branched from the mixture's seed (a warning instead of an error)",
    )
    p.add_argument("--save", required=True, help="output directory (must not exist)")
    add_architecture_flags(
        p,
        ROUTING_FLAGS,
        defaults={name: field_default(name) for name in ("moe_router_topk", "moe_router_pre_softmax")},
        notes={
            "num_experts": "--method sparse only (the other methods have one per source)",
            "moe_router_pre_softmax": "--no-moe-router-pre-softmax makes --method sparse exactly function-preserving "
            "at step 0 (identical experts, weights summing to 1)",
            "attention_router_topk": "--method bam, bam-shared-kv",
        },
    )
    p.add_argument(
        "--function-preserving",
        action="store_true",
        help="--method sparse: routing that makes the MoE exactly the dense source at step 0 (top-1: "
        "zero-initialised router and routing weights scaled by the number of experts; top-k > 1: "
        "renormalised top-k)",
    )
    p.add_argument("--shared-kv-init", default="average", help="bam-shared-kv: 'average' or a source NAME")
    p.add_argument("--router-init-std", type=float, default=0.02, help="new routers' weights ~ N(0, std); 0: zeros")
    p.add_argument("--seed", type=int, default=1234, help="router initialisation seed")
    g = p.add_argument_group("domain-initialised routers (docs/phases.md)")
    g.add_argument(
        "--router-init",
        choices=("random", "domain"),
        default="random",
        help="random: N(0, --router-init-std), as the paper; domain: every layer's attention gates and FFN "
        "router start as a classifier of that layer's input by domain (each expert's data), fitted on the "
        "mixture as it is built",
    )
    g.add_argument(
        "--router-data",
        action="append",
        metavar="NAME=PREFIX",
        help="--router-init domain: calibration data of expert NAME (an indexed-dataset prefix; repeat for "
        "several); default: the --data-path its own training run recorded; an expert with none gets zero rows",
    )
    g.add_argument(
        "--router-margin",
        type=float,
        default=3.0,
        help="--router-init domain: mean logit margin of a domain's own expert over the others on its tokens "
        "(a typical token gives its expert e^margin times another's weight)",
    )
    g.add_argument(
        "--router-sequences",
        type=int,
        default=16,
        help="--router-init domain: calibration sequences per expert (of at most 128 tokens)",
    )
    p.add_argument(
        "--report-batches",
        type=int,
        default=2,
        help="batches of random tokens on which to report the MoE's step-0 distance to each source "
        "(max |dlogit|, KL, argmax agreement); runs each model one layer at a time (memory of a layer); 0 skips it",
    )
    g = p.add_argument_group("target layout (checked now; the checkpoint itself reshards on load)")
    g.add_argument("--target-tensor-parallel-size", type=int, default=1)
    g.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    g.add_argument("--target-expert-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def read_sources(specs: Sequence[str]) -> list[Source]:
    """NAME=DIR flags -> sources with their checkpoint meta; names must be unique."""
    sources = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UpcycleError(f"--expert {spec!r}: expected NAME=DIR")
        try:
            resolved = checkpoint.resolve_checkpoint(path)
            meta = checkpoint.read_meta(resolved)
        except CheckpointError as error:
            raise UpcycleError(f"source {name}: {error}") from None
        sources.append(Source(name, resolved, meta))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UpcycleError(f"--expert names must be unique, got {', '.join(names)}")
    return sources


def validate(sources: Sequence[Source], args: argparse.Namespace) -> Architecture:
    """Check the sources agree and the target layout fits; return the MoE's architecture."""
    first = sources[0]
    for s in sources:
        if s.meta.architecture.variant != "dense":
            raise UpcycleError(f"source {s.name} is a {s.meta.architecture.variant} model; sources must be dense")
        # The padded vocabulary may differ: it depends on the TP size a source was trained with.
        try:
            check_same_architecture(
                s.meta.architecture, s.label, first.meta.architecture, first.label, ignore=("padded_vocab_size",)
            )
        except CheckpointError as error:
            raise UpcycleError(f"{error}: sources must share one architecture") from None
        if s.meta.tokenizer_fingerprint != first.meta.tokenizer_fingerprint:
            raise UpcycleError(f"source {s.name} was trained with another tokenizer than {first.name}")
    try:
        check_bounds({name: getattr(args, name) for name in ROUTING_FLAGS})
    except ConfigError as error:
        raise UpcycleError(str(error)) from None
    for flag in (ours[2:].replace("-", "_") for ours in TARGET_FLAGS.values()):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UpcycleError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.method == "sparse":
        if len(sources) != 1:
            raise UpcycleError("--method sparse copies one source: give exactly one --expert")
        experts = args.num_experts or DEFAULT_NUM_EXPERTS
    else:
        if args.num_experts is not None and args.num_experts != len(sources):
            raise UpcycleError(f"--num-experts {args.num_experts} differs from the {len(sources)} sources")
        experts = len(sources)
        if experts < 2:
            raise UpcycleError(f"--method {args.method} needs at least 2 sources")
    if args.method == "bam-shared-kv" and args.shared_kv_init not in ["average", *(s.name for s in sources)]:
        raise UpcycleError(f"--shared-kv-init {args.shared_kv_init!r}: 'average' or one of the source names")
    if args.function_preserving:
        _choose_function_preserving_routing(args, experts)
    if args.router_init_std < 0:
        raise UpcycleError(f"--router-init-std must be >= 0, got {args.router_init_std}")
    if args.report_batches < 0:
        raise UpcycleError(f"--report-batches must be >= 0, got {args.report_batches}")
    _check_router_init(args)
    try:
        check_routing(
            variant_of(args.method),
            experts,
            args.moe_router_topk,
            args.attention_router_topk,
            args.moe_router_pre_softmax,
        )
    except ConfigError as error:
        raise UpcycleError(str(error)) from None
    target = target_architecture(sources, args, experts)
    _check_target_layout(target, args)
    return target


def _check_router_init(args: argparse.Namespace) -> None:
    """--router-init and its companions: consistent with each other and with the method."""
    if args.router_init != "domain":
        if args.router_data:
            raise UpcycleError("--router-data needs --router-init domain")
        return
    if args.method == "sparse":
        raise UpcycleError(
            "--router-init domain: --method sparse copies one source into every expert; there are no domains "
            "to tell apart"
        )
    if not args.router_margin > 0:
        raise UpcycleError(f"--router-margin must be > 0, got {args.router_margin}")
    if args.router_sequences < 1:
        raise UpcycleError(f"--router-sequences must be >= 1, got {args.router_sequences}")


def _domain_routers(args: argparse.Namespace, sources: Sequence[Source], architecture: Architecture):
    """--router-init domain: the `DomainRouters` that set each layer's routers as the MoE is built,
    with each expert's calibration tokens (read and checked now, before anything is written)."""
    from bam_megatron.conversion.router_init import DomainRouters, calibration_tokens, resolve_expert_data

    recorded = {s.name: s.meta.training.get("data_path") for s in sources}
    try:
        data = resolve_expert_data([s.name for s in sources], recorded, args.router_data or [])
        seq_length = min(128, sources[0].meta.seq_length)
        vocab = min(s.meta.architecture.padded_vocab_size for s in sources)
        tokens = [None if d is None else calibration_tokens(d, args.router_sequences, seq_length, vocab) for d in data]
    except UserError as error:
        raise UpcycleError(str(error)) from None
    described = {
        d.expert: {"prefixes": list(d.prefixes), "weights": list(d.weights), "origin": d.origin} for d in data if d
    }
    return DomainRouters(architecture, seq_length, tokens, args.router_margin), described


def _check_target_layout(target: Architecture, args: argparse.Namespace) -> None:
    """The --target-* layout must split the model (the checks name bam-upcycle's flags)."""
    try:
        target.check_layout(
            args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.target_expert_parallel_size
        )
    except ConfigError as error:
        message = str(error)
        for flag, ours in TARGET_FLAGS.items():
            message = message.replace(flag, ours)
        raise UpcycleError(message) from None


def _choose_function_preserving_routing(args: argparse.Namespace, experts: int) -> None:
    """--function-preserving: set the routing flags that make a sparse upcycle its source at step 0.

    Top-k > 1: renormalised weights over identical experts sum to 1, whatever the router says.
    Top-1 (megatron-core refuses to renormalise a single weight): a zero router gives every expert
    probability 1/E, and scaling the weights by E makes the one chosen expert's weight 1.
    """
    if args.method != "sparse":
        raise UpcycleError(
            f"--function-preserving: --method {args.method} mixes different experts, which no routing "
            "makes equal to every source; the step-0 report measures the distance"
        )
    if args.moe_router_topk > 1:
        args.moe_router_pre_softmax = False
    else:
        args.router_init_std, args.moe_router_topk_scaling_factor = 0.0, float(experts)


def _meta_model(architecture: Architecture, seq_length: int):
    """(model, config): the one-rank model of ``architecture`` on the meta device (layerwise is
    imported when a conversion runs, not at the tool's start)."""
    from bam_megatron.checkpoint.layerwise import architecture_meta_model

    return architecture_meta_model(architecture, seq_length)


def target_architecture(sources: Sequence[Source], args: argparse.Namespace, experts: int) -> Architecture:
    """The MoE's architecture: the sources' with the method's variant, experts and routing."""
    first = sources[0].meta
    # The largest padding among the sources; rounded up only if the target TP size does not divide it
    # (an imported model keeps its vocabulary as it is).
    divisible_by = first.training.get("make_vocab_size_divisible_by", 128)
    largest = max(s.meta.architecture.padded_vocab_size for s in sources)
    tp = args.target_tensor_parallel_size
    rows = largest if largest % tp == 0 else padded_vocab_size(largest, divisible_by, tp)
    return first.architecture.replace(
        variant=variant_of(args.method),
        num_experts=experts,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        attention_router_topk=args.attention_router_topk,
        router_bias=bool(args.router_bias),
        padded_vocab_size=rows,
    )


def _router_init(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """A new router's weight: N(0, std), seeded per parameter so it does not depend on write order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


def _running_mean(target: torch.Tensor, weight: torch.Tensor, seen: torch.Tensor) -> None:
    """Fold ``weight`` into the mean held in ``target``; ``seen`` counts sources per row.

    Rows beyond a source's vocabulary (it padded less) are left to the sources that have them;
    rows no source has stay zero, as no token id reaches them. In place (no model-sized
    temporaries) and exact for identical sources: t + (x - t)/k == x when t == x.
    """
    rows = weight.shape[0]
    seen[:rows] += 1
    counts = seen[:rows]
    if bool((counts == counts[0]).all()):
        target[:rows].lerp_(weight, 1.0 / float(counts[0]))
    else:
        target[:rows].lerp_(weight, (1.0 / counts).view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


class _Mixer:
    """Fills one unit (TOP or a layer) of the MoE from the same unit of every source."""

    def __init__(self, args: argparse.Namespace, sources: Sequence[Source], experts: int, config, domain=None):
        self.args, self.sources, self.experts, self.config = args, sources, experts, config
        self.domain = domain  # DomainRouters (--router-init domain) or None
        self.source_models = [_meta_model(s.meta.architecture, s.meta.seq_length)[0] for s in sources]
        self.moa = variant_of(args.method) in SOFT_MOA_VARIANTS

    def __call__(self, unit: int, params: dict) -> None:
        from bam_megatron.checkpoint.layerwise import TOP, read_unit, unit_of_parameter
        from bam_megatron.checkpoint.store import stored_key_names

        label = "embeddings and output layer" if unit == TOP else f"layer {unit + 1}/{self.config.num_layers}"
        print(f"upcycling {label}", flush=True)
        written: set[str] = set()
        seen: dict[str, torch.Tensor] = {}
        attention: dict[str, list] = {}  # soft MoA: each source's attention tensors, by name in the attention
        for index, (source, model) in enumerate(zip(self.sources, self.source_models)):
            names = [n for n, _ in model.named_parameters() if unit_of_parameter(n) == unit]
            # Read straight into the MoE where a source's tensor is copied as it is: its FFN expert,
            # and the first source's share of an average (the mean of one source is that source).
            into = {n: params[self._expert_name(n, index)] for n in names if ".mlp.linear_fc" in n}
            if index == 0:
                averaged = [n for n in names if n in params and n not in into and not self._attention(n)]
                into.update({n: params[n] for n in averaged if params[n].shape == model.get_parameter(n).shape})
            for name, weight in read_unit(model, unit, source.path, stored_key_names(source.meta), into).items():
                if ".mlp.linear_fc" in name:  # FFN: one expert per source (every expert: sparse)
                    layer_prefix, fc = name.split(".mlp.")
                    for e in range(self.experts) if self.args.method == "sparse" else [index]:
                        target = f"{layer_prefix}.mlp.experts.local_experts.{e}.{fc}"
                        if params[target] is not weight:
                            params[target].copy_(weight)
                        written.add(target)
                elif self._attention(name):
                    attention.setdefault(name.split(".self_attention.")[1], []).append(weight)
                else:  # norms, embedding, output layer, (btx) attention: averaged
                    if name not in seen:
                        seen[name] = torch.zeros(params[name].shape[0], dtype=torch.int64)
                        if params[name] is weight:  # read in place: the mean of one source
                            seen[name] += 1
                            written.add(name)
                            continue
                        params[name].zero_()
                    _running_mean(params[name], weight, seen[name])
                    written.add(name)
        if attention:
            self._mix_attention(unit, params, attention, written)
        for name, param in params.items():  # new routers: small random init, bias (--router-bias) zero
            if name.endswith("router.weight"):
                param.copy_(_router_init(name, param.shape, self.args.seed, self.args.router_init_std))
                written.add(name)
            elif name.endswith("router.bias"):
                param.zero_()
                written.add(name)
        if self.domain is not None:  # --router-init domain: overwrite them from the experts' data
            self.domain(unit, params)
        missing = sorted(set(params) - written)
        if missing:  # uninitialised memory must never reach the checkpoint
            raise RuntimeError(f"upcycling left {', '.join(missing)} unset")

    def _attention(self, name: str) -> bool:
        """Soft MoA: the attention tensors of every source (projections, QKV biases, Q/K norms),
        mixed into the MoE's (not averaged)."""
        return self.moa and ".self_attention." in name

    def _expert_name(self, name: str, index: int) -> str:
        """A source's FFN parameter -> the MoE expert it is copied to (sparse: the first of all)."""
        layer_prefix, fc = name.split(".mlp.")
        return f"{layer_prefix}.mlp.experts.local_experts.{0 if self.args.method == 'sparse' else index}.{fc}"

    def _mix_attention(self, layer: int, params: dict, attention: dict, written: set) -> None:
        """One layer's soft MoA from every source's attention (`qkv_layout`): the wide QKV weight and
        bias, the output projection, the per-expert Q/K norms; shared KV: the average's or one
        source's K/V (and K norm), as --shared-kv-init says."""
        from bam_megatron.model.qkv_layout import soft_moa_attention_weights, soft_moa_qk_norms, soft_moa_qkv, split_qkv

        chosen = None  # shared KV from one source (--shared-kv-init NAME): its K, V, K/V biases, K norm
        if self.args.method == "bam-shared-kv" and self.args.shared_kv_init != "average":
            chosen = [s.name for s in self.sources].index(self.args.shared_kv_init)

        def shared_kv(tensors: list) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
            if chosen is None:
                return None
            return split_qkv(tensors[chosen], self.config.num_attention_heads, self.config.num_query_groups)[1:]

        qkv = attention.pop("linear_qkv.weight")
        mixed = dict(
            zip(
                ("linear_qkv.weight", "linear_proj.weight"),
                soft_moa_attention_weights(qkv, attention.pop("linear_proj.weight"), self.config, shared_kv(qkv)),
            )
        )
        if "linear_qkv.bias" in attention:  # Qwen2's QKV biases: a bias is a QKV weight of one column
            biases = [b.unsqueeze(-1) for b in attention.pop("linear_qkv.bias")]
            mixed["linear_qkv.bias"] = soft_moa_qkv(biases, self.config, shared_kv(biases)).squeeze(-1)
        if "q_layernorm.weight" in attention:  # Q/K norms: each expert's (Qwen3's per head, OLMo 2's projection)
            k_norms = attention.pop("k_layernorm.weight")
            mixed["q_layernorm.weight"], mixed["k_layernorm.weight"] = soft_moa_qk_norms(
                attention.pop("q_layernorm.weight"), k_norms, self.config, None if chosen is None else k_norms[chosen]
            )
        if attention:
            raise RuntimeError(f"upcycling does not know how to mix attention tensors {', '.join(sorted(attention))}")
        for name, tensor in mixed.items():
            params[f"decoder.layers.{layer}.self_attention.{name}"].copy_(tensor)
            written.add(f"decoder.layers.{layer}.self_attention.{name}")


def upcycle(args: argparse.Namespace) -> dict:
    """Build and save the MoE layer by layer; return the manifest. Runs on one process (gloo, CPU).

    The MoE is a meta-device model; ``StreamingSaveStrategy`` materialises one unit at a time
    (embeddings, then each layer), ``_Mixer`` fills it from that unit of every source, and the
    checkpoint writer streams it to disk. Memory: one unit of the MoE plus one unit of a source
    (all sources' attention of one layer for soft MoA), whatever the depth.
    """
    from bam_megatron.checkpoint.layerwise import StreamingSaveStrategy
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from bam_megatron.platform.memory import return_freed_tensors_to_os

    start = time.time()
    return_freed_tensors_to_os()
    sources = read_sources(args.expert)
    architecture = validate(sources, args)
    experts = architecture.num_experts
    if os.path.exists(args.save):
        raise UpcycleError(f"--save {args.save} already exists")
    initialize(ParallelSizes(), seed=args.seed)

    first = sources[0].meta
    target, config = _meta_model(architecture, first.seq_length)
    domain, router_data = _domain_routers(args, sources, architecture) if args.router_init == "domain" else (None, None)
    strategy = StreamingSaveStrategy(target, _Mixer(args, sources, experts, config, domain))

    manifest = {
        "method": args.method,
        "experts": experts,
        "router_init_seed": args.seed,
        "router_init": args.router_init,
        "router_init_std": args.router_init_std,
        "moe_router_topk": args.moe_router_topk,
        "moe_router_pre_softmax": args.moe_router_pre_softmax,
        "moe_router_topk_scaling_factor": args.moe_router_topk_scaling_factor,
        "attention_router_topk": args.attention_router_topk,
        "shared_kv_init": args.shared_kv_init if args.method == "bam-shared-kv" else None,
        "sources": [
            {"name": s.name, **lineage.identity(s.path, s.meta), "root": lineage.root_of(s.path, s.meta)}
            for s in sources
        ],
        "expert_names": [s.name for s in sources] if args.method != "sparse" else [sources[0].name] * experts,
    }
    if domain is not None:  # the per-layer summary is filled as the layers are written
        manifest["domain_routers"] = {
            "margin": args.router_margin,
            "sequences": args.router_sequences,
            "data": router_data,
            "layers": domain.summary,
        }
    meta = CheckpointMeta(
        architecture=architecture,
        seq_length=first.seq_length,
        tokenizer_fingerprint=first.tokenizer_fingerprint,
        tokenizer_model=first.tokenizer_model,
        tokenizer_type=first.tokenizer_type,
        lineage={"upcycled": manifest},
        training=dict(first.training),  # the first source's settings: defaults for tools that evaluate it
    )
    return _publish(args, target, strategy, meta, manifest, sources, start)


class _Verification:
    """Every source's files checked against its integrity record (`store.verify_checkpoint`: sizes,
    CRC-32) on a helper thread while the layers are read: the upcycler reads the tensors itself,
    past store's checks, and a second pass before it would cost as much as the reading."""

    def __init__(self, sources: Sequence[Source]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bam-verify")
        self._checks = [(s, self._pool.submit(checkpoint.verify_checkpoint, s.path)) for s in sources]
        self._pool.shutdown(wait=False)

    def result(self) -> None:
        """Wait for the checks; the first damaged source is an `UpcycleError` naming it and its file."""
        for source, check in self._checks:
            try:
                check.result()
            except CheckpointError as error:
                raise UpcycleError(f"source {source.name}: {error}") from None


def _publish(args, model, strategy, meta: CheckpointMeta, manifest: dict, compare_to: Sequence[Source], start) -> dict:
    """Write the model under SAVE.tmp with ``strategy``, report its step-0 distance to ``compare_to``,
    write the manifest, and rename SAVE.tmp to SAVE; on any failure nothing is left. The sources
    are verified meanwhile (`_Verification`); a damaged one fails the upcycle, naming its file,
    whatever error reading it gave."""
    tmp = args.save.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    verification = _Verification(compare_to)
    try:
        try:
            checkpoint.save_checkpoint(tmp, 0, model, None, None, meta, sharded_strategy=strategy)
        except BaseException:
            verification.result()  # a damaged source is the cause: say which file
            raise
        verification.result()
        if args.report_batches:
            from bam_megatron.conversion.function_report import function_distance

            written = checkpoint.checkpoint_path(tmp, 0)
            manifest["step0"] = function_distance(
                written,
                checkpoint.read_meta(written),
                [(s.name, s.path, s.meta) for s in compare_to],
                args.report_batches,
                args.seed,
            )
        # the whole command's work and memory, the step-0 report included
        manifest["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        manifest["seconds"] = round(time.time() - start, 2)
        with open(os.path.join(tmp, "upcycle_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, args.save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def grow_mixture(args: argparse.Namespace) -> dict:
    """--extend MIXTURE [--expert NAME=DENSE ...] [--drop-expert NAME ...]: the grown mixture,
    written layer by layer like an upcycle; return its manifest (`bam_megatron.conversion.grow`)."""
    from bam_megatron.checkpoint.layerwise import StreamingSaveStrategy
    from bam_megatron.conversion import grow
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from bam_megatron.platform.memory import return_freed_tensors_to_os

    start = time.time()
    return_freed_tensors_to_os()
    (mixture,) = read_sources([f"mixture={args.extend}"])
    if mixture.meta.architecture.variant not in grow.MIXTURES:
        raise UpcycleError(
            f"--extend {mixture.path} is a {mixture.meta.architecture.variant} model; it must be one of "
            f"{', '.join(grow.MIXTURES)}"
        )
    new = read_sources(args.expert or [])
    names, drop = lineage.expert_names(mixture.meta), list(args.drop_expert or [])
    if not new and not drop:
        raise UpcycleError("--extend needs --expert NAME=DIR to add or --drop-expert NAME to remove")
    unknown = [n for n in drop if n not in names]
    if unknown:
        raise UpcycleError(f"--drop-expert {unknown[0]}: the mixture's experts are {', '.join(names)}")
    taken = sorted({s.name for s in new} & (set(names) - set(drop)))
    if taken:
        raise UpcycleError(f"--expert {taken[0]}: the mixture already has an expert of that name")
    for s in new:
        if s.meta.tokenizer_fingerprint != mixture.meta.tokenizer_fingerprint:
            raise UpcycleError(f"source {s.name} was trained with another tokenizer than mixture {mixture.path}")
    try:
        for warning in grow.check_lineage(mixture.meta, mixture.path, new, args.allow_foreign_lineage):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        plan, out_names = grow.slots(names, [s.name for s in new], drop)
        # --router-bias not given (None): on when experts join, so that growth is exact;
        # --no-router-bias: the old, inexact growth (refused for a mixture that has a bias)
        architecture = grow.grown_architecture(
            mixture.meta.architecture, new, len(plan), mixture.path, router_bias=args.router_bias
        )
    except CheckpointError as error:
        raise UpcycleError(str(error)) from None
    _check_target_layout(architecture, args)
    if args.new_expert_ramp_iters < 0 or args.new_expert_ramp_start < 0:
        bad = "iters" if args.new_expert_ramp_iters < 0 else "start"
        raise UpcycleError(f"--new-expert-ramp-{bad} must be >= 0, got {getattr(args, 'new_expert_ramp_' + bad)}")
    if os.path.exists(args.save):
        raise UpcycleError(f"--save {args.save} already exists")
    initialize(ParallelSizes(), seed=args.seed)

    meta_in = mixture.meta
    target, config = _meta_model(architecture, meta_in.seq_length)
    mixture_model, _ = _meta_model(meta_in.architecture, meta_in.seq_length)
    new_models = [_meta_model(s.meta.architecture, s.meta.seq_length)[0] for s in new]
    strategy = StreamingSaveStrategy(target, grow.GrowMixer(mixture, mixture_model, new, new_models, plan, config))
    growth = grow.record_growth(
        meta_in,
        new,
        drop,
        out_names,
        mixture.path,
        ramp_iters=args.new_expert_ramp_iters,
        ramp_start=args.new_expert_ramp_start,
        router_bias=architecture.router_bias,
    )
    manifest = {"method": "extend", "experts": len(plan), **growth}
    meta = CheckpointMeta(
        architecture=architecture,
        seq_length=meta_in.seq_length,
        tokenizer_fingerprint=meta_in.tokenizer_fingerprint,
        tokenizer_model=meta_in.tokenizer_model,
        tokenizer_type=meta_in.tokenizer_type,
        lineage=dict(meta_in.lineage, grown=[*meta_in.lineage.get("grown", []), growth]),
        training=dict(meta_in.training),
    )
    return _publish(args, target, strategy, meta, manifest, [mixture, *new], start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of bam-upcycle / tools/upcycle.py; exit code 2 for bad input."""
    import bam_megatron  # noqa: F401

    args = parse_args(argv)

    def body() -> None:
        if args.extend is None and (args.method is None or not args.expert):
            raise UpcycleError("give --method and --expert NAME=DIR (or --extend MIXTURE to grow one)")
        if args.extend is not None and args.method is not None:
            raise UpcycleError("--extend grows a mixture of its own kind: drop --method")
        if args.extend is not None and (args.router_init != "random" or args.router_data):
            raise UpcycleError(
                "--router-init domain / --router-data build a new mixture's routers; --extend keeps the trained "
                "routers and starts the new experts' rows from them (docs/phases.md)"
            )
        manifest = grow_mixture(args) if args.extend else upcycle(args)
        if args.extend:
            joined, left = [j["name"] for j in manifest["joined"]], manifest["left"]
            changes = f"joined: {', '.join(joined) or '-'}; left: {', '.join(left) or '-'}"
            what = f"{', '.join(manifest['expert_names'])} ({changes})"
        else:
            names = ", ".join(s["name"] for s in manifest["sources"])
            what = f"{args.method} with {manifest['experts']} experts from {names}"
        print(
            f"wrote {args.save}: {what} in {manifest['seconds']} s, peak memory {manifest['peak_rss_mb']} MB",
            flush=True,
        )
        if "step0" in manifest:
            from bam_megatron.conversion.function_report import format_report

            print(format_report(manifest["step0"]), flush=True)
        if "domain_routers" in manifest:
            from bam_megatron.conversion.router_init import format_summary

            print(format_summary(manifest["domain_routers"], manifest["expert_names"]), flush=True)

    return run_tool("bam-upcycle", body)
