"""`bam-stats`: parameter counts and FLOPs per token of a preset and variant.

    bam-stats --preset paper-590m --variant bam --json
    python -m bam_megatron.stats --preset paper-2b --variant dense
    bam-stats --preset tiny --variant bam --seq-length 128 --measure

Parameters are counted on the model megatron-core really builds (`build_model` at TP=1, local
backend, on the meta device: no weight memory is allocated, so paper-2b costs nothing). FLOPs come
from the formula of docs/design.md §6 (`flops_per_token`): per layer (the paper's Table 7
convention), and per token in all with the output layer (the complete count, as Megatron-LM's
`num_floating_point_operations`: `training_flops_breakdown`). With ``--measure`` the model is also
built with real weights and one forward pass of one ``--seq-length`` sequence is measured by
DeepSpeed's FLOPs profiler (`bam_megatron.evaluation.flops_profile`), printed beside the formula
with their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

    from bam_megatron.model.config import BAMConfig

from bam_megatron.errors import ConfigError, run_tool
from bam_megatron.model.architecture import add_architecture_flags, check_bounds, check_routing, field_default
from bam_megatron.model.statistics import (
    FLOPS_CONVENTION,
    count_parameters,
    flops_per_token,
    training_flops_breakdown,
)
from bam_megatron.model.variants import DEFAULT_NUM_EXPERTS, PRESETS

# torch and megatron-core are imported where needed, so that --help and input errors answer at once.
FLOPS_CONTEXT_LENGTH = 2048
"""The context length n_ctx at which FLOPs per token are reported when --seq-length is not given:
the paper's, for every preset (docs/design.md §6). Not a training default: pretrain_bam.py trains
at `bam_megatron.training.arguments.DEFAULT_SEQ_LENGTH` unless told otherwise."""


@contextlib.contextmanager
def one_rank_parallel_state() -> Iterator[None]:
    """megatron-core's parallel state for one process at TP = PP = EP = 1, for building models.

    Uses the state already set up if there is one (it must be TP = PP = EP = 1); otherwise starts
    a one-rank gloo process group (a file store in a temporary folder: no port to pick), calls
    `bam_megatron.platform.distributed.initialize`, and undoes all of it, CPU mode included, on
    exit.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bam_megatron.platform import cpu_mode
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    if parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1):
            raise RuntimeError(f"counting parameters needs TP = PP = EP = 1, got {sizes}")
        yield
        return
    cpu_mode_was_active = cpu_mode.is_active()
    start_group = not dist.is_initialized()
    with tempfile.TemporaryDirectory(prefix="bam-stats-") as tmp:
        if start_group:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            initialize(ParallelSizes())
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if start_group:
                dist.destroy_process_group()
            if not cpu_mode_was_active:
                cpu_mode.disable()


def build_meta_model(config: BAMConfig, vocab_size: int, seq_length: int, untie_embeddings: bool) -> GPTModel:
    """The GPTModel `build_model` builds for ``config``, with every weight on the meta device.

    Needs megatron-core's parallel state at TP = PP = EP = 1 (`one_rank_parallel_state`). Always
    the local backend: Transformer Engine would fold the pre-norm into the QKV linear.
    """
    import torch

    from bam_megatron.model.builder import build_model

    if config.perform_initialization or not config.use_cpu_initialization:
        raise RuntimeError("a meta model needs use_cpu_initialization=True and perform_initialization=False")
    with torch.device("meta"):
        return build_model(config, vocab_size, seq_length, untie_embeddings, backend="local")


def model_stats(
    preset: str,
    variant: str,
    num_experts: int = DEFAULT_NUM_EXPERTS,
    moe_router_topk: int = 1,
    seq_length: int = FLOPS_CONTEXT_LENGTH,
    measure: bool = False,
) -> dict[str, Any]:
    """Everything `bam-stats` reports, as one JSON-ready dict (counts on a meta model, FLOPs by
    formula). ``num_experts`` / ``moe_router_topk`` are reported as null for ``dense``.

    ``measure``: also ``measured_flops``, DeepSpeed's profiler on one forward pass of a real model
    (one sequence of ``seq_length``), restated in the formula's convention, and ``flops_ratio``
    (measured / formula per part).
    """
    check_bounds({"num_experts": num_experts, "moe_router_topk": moe_router_topk})
    check_routing("btx", num_experts, moe_router_topk)  # the FFN routing any mixture of these would have
    if seq_length < 1:
        raise ConfigError(f"--seq-length must be >= 1, got {seq_length}")
    if measure:
        from bam_megatron.evaluation.flops_profile import load_profiler

        load_profiler()  # DeepSpeed missing: say so before building anything
    from bam_megatron.model.configs import variant_config  # megatron: after the checks

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = variant_config(
        variant,
        preset,
        num_experts=num_experts,
        moe_router_topk=moe_router_topk,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    sizes = PRESETS[preset]
    training = training_flops_breakdown(config, seq_length, sizes.vocab_size)  # the model's embedding rows
    measured = None
    with one_rank_parallel_state():
        model = build_meta_model(config, sizes.vocab_size, seq_length, sizes.untie_embeddings)
        params = count_parameters(model, config)
        if measure:
            measured = measure_real_model(config, sizes.vocab_size, seq_length, sizes.untie_embeddings)
    mixture = variant != "dense"
    stats = {
        "preset": preset,
        "variant": variant,
        "num_experts": num_experts if mixture else None,
        "moe_router_topk": moe_router_topk if mixture else None,
        "seq_length": seq_length,
        "num_layers": config.num_layers,
        "num_attention_experts": config.num_attention_experts,
        "num_ffn_experts": config.num_moe_experts or 1,
        "tied_embeddings": not sizes.untie_embeddings,
        "padded_vocab_size": sizes.vocab_size,
        "total_params": params.total,
        "active_params": params.active,
        "params_by_part": params.by_part,
        "flops_per_token": flops_per_token(config, seq_length),
        "training_flops_per_token": training["layers"],  # transformer layers only (Table 7)
        "training_flops_per_token_output_layer": training["output_layer"],
        "training_flops_per_token_embedding": training["embedding"],
        "training_flops_per_token_with_output_layer": training["total"],  # complete: the MFU numerator
        "flops_convention": FLOPS_CONVENTION,
    }
    if measured is not None:
        from bam_megatron.evaluation.flops_profile import compare

        stats["measured_flops"] = measured
        stats["flops_ratio"] = compare(stats["flops_per_token"], measured)
    return stats


def measure_real_model(config: BAMConfig, vocab_size: int, seq_length: int, untie_embeddings: bool) -> dict[str, Any]:
    """DeepSpeed's profile of one forward pass (one sequence) of ``config``'s model with real weights.

    Needs `one_rank_parallel_state`. Builds and initialises every weight on the CPU: for the paper
    presets that is their full size in memory (fp32), and the pass costs what the model costs.
    """
    import dataclasses

    from bam_megatron.evaluation.flops_profile import measure_forward_flops
    from bam_megatron.model.builder import build_model

    real = dataclasses.replace(config, perform_initialization=True)
    model = build_model(real, vocab_size, seq_length, untie_embeddings, backend="local")
    return measure_forward_flops(model, real, vocab_size, seq_length)


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (or '1.23 MFLOP' with unit='FLOP'): three significant-ish digits."""
    prefixes = ("K", "M", "G", "T", "P") if unit else ("K", "M", "B", "T", "P")
    scaled, prefix = float(value), ""
    for candidate in prefixes:
        if abs(scaled) < 1000:
            break
        scaled, prefix = scaled / 1000, candidate
    return f"{scaled:.2f} {prefix}{unit}".rstrip() if prefix else f"{value:g} {unit}".rstrip()


def format_table(stats: dict[str, Any]) -> str:
    """The `model_stats` dict as an aligned, human-readable table."""
    if stats["variant"] == "dense":
        shape = "one attention, dense FFN"
    else:
        attention = stats["num_attention_experts"]
        shape = (
            f"{attention} attention expert{'s' if attention > 1 else ''}, "
            f"{stats['num_ffn_experts']} FFN experts, FFN top-{stats['moe_router_topk']}"
        )
    header = [
        f"bam-stats: {stats['preset']}, {stats['variant']} ({shape})",
        f"{stats['num_layers']} layers, seq length (n_ctx) {stats['seq_length']}",
    ]
    rows: list[tuple[str, str, str]] = [
        ("parameters", "", ""),
        ("  total", human(stats["total_params"]), f"{stats['total_params']:,}"),
        ("  active per token", human(stats["active_params"]), f"{stats['active_params']:,}"),
    ]
    for part, count in stats["params_by_part"].items():
        tied = part == "embedding" and stats["tied_embeddings"]
        note = " (also the output layer: tied)" if tied else ""
        rows.append((f"  {part.replace('_', ' ')}", human(count), f"{count:,}{note}"))
    rows.append(("forward FLOPs per token per layer", "", "(docs/design.md section 6)"))
    for part, flops in stats["flops_per_token"].items():
        rows.append((f"  {part}", human(flops, "FLOP"), f"{flops:,}"))
    vocab = stats["padded_vocab_size"]
    rows.append(("training FLOPs per token", "", "(3 x forward; outside the layers as Megatron-LM counts)"))
    for label, key, note in (
        ("  layers", "training_flops_per_token", "3 x forward x layers: Table 7 convention"),
        ("  output layer", "training_flops_per_token_output_layer", f"3 x 2 x d x V, V = {vocab:,}"),
        ("  embedding", "training_flops_per_token_embedding", "lookup and its gradient: not counted"),
        ("  total with output layer", "training_flops_per_token_with_output_layer", "the complete count"),
    ):
        rows.append((label, human(stats[key], "FLOP"), f"{stats[key]:,} ({note})"))
    measured = stats.get("measured_flops")
    if measured is not None:
        tokens = measured["tokens"]
        rows.append(
            (
                "forward FLOPs per token per layer, measured by DeepSpeed's FLOPs profiler",
                "",
                f"(one forward pass, {tokens} tokens; its full-square core attention halved)",
            )
        )
        for part, ratio in stats["flops_ratio"].items():
            value = measured["per_layer"][part]
            note = f"formula {stats['flops_per_token'][part]:,}, measured {value:,.0f}, ratio {ratio:.4f}"
            rows.append((f"  {part}", human(value, "FLOP"), note))
        rows += [
            (
                "  output layer, per token",
                human(measured["output_layer"], "FLOP"),
                f"(forward; formula 2 x d x V = {stats['training_flops_per_token_output_layer'] // 3:,})",
            ),
            (
                "  DeepSpeed's total, per token",
                human(measured["deepspeed_flops"] / tokens, "FLOP"),
                "(as the profiler counts: whole model, full-square attention)",
            ),
        ]
    label_width = max(len(label) for label, value, _ in rows if value)
    value_width = max(len(value) for _, value, _ in rows)
    lines = header
    for label, value, note in rows:
        if value:
            lines.append(f"{label:<{label_width}}  {value:>{value_width}}  {note}")
        else:
            lines += ["", f"{label} {note}".rstrip()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bam-stats",
        description=(
            "Parameter counts (total and active per token) and FLOPs per token of a BAM model "
            "preset and variant. Parameters are counted on the model megatron-core builds (on "
            "the meta device: nothing is allocated)."
        ),
        epilog="FLOPs convention: " + FLOPS_CONVENTION,
    )
    parser.add_argument(
        "--preset", required=True, choices=tuple(PRESETS), help="model sizes (docs/design.md section 5)"
    )
    add_architecture_flags(
        parser,
        ("variant", "num_experts", "moe_router_topk"),
        defaults={"num_experts": DEFAULT_NUM_EXPERTS, "moe_router_topk": field_default("moe_router_topk")},
        required=("variant",),
        notes={"num_experts": "N (dense ignores it)", "moe_router_topk": "k, 1 <= k <= N (dense ignores it)"},
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=FLOPS_CONTEXT_LENGTH,
        help=f"context length n_ctx of the attention FLOPs (default {FLOPS_CONTEXT_LENGTH} for every preset)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also measure the forward FLOPs with DeepSpeed's FLOPs profiler on the real model (built with "
        "weights, one --seq-length sequence: use the tiny preset or a short --seq-length on a CPU) and print "
        "both counts and their ratio (needs the deepspeed extra)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (`bam-stats`, `python -m bam_megatron.stats`); exit code 2 for bad input."""
    args = _parser().parse_args(argv)

    def body() -> None:
        stats = model_stats(
            args.preset, args.variant, args.num_experts, args.moe_router_topk, args.seq_length, args.measure
        )
        print(json.dumps(stats, indent=2) if args.json else format_table(stats))

    return run_tool("bam-stats", body)


if __name__ == "__main__":
    sys.exit(main())
