"""bam-eval: per-domain perplexity of dense and MoE checkpoints, and where the MoE models route.

    bam-eval --model seed=ckpt/seed --model bam=ckpt/bam \\
        --data-path data/code_text_document data/law_text_document data/math_text_document \\
        --expert-names seed code law math --output-dir eval/

Runs on one process (``python tools/eval.py ...``) or under torchrun/srun with Megatron's
parallelism flags; checkpoints reshard to the layout on load. Everything that can be checked
without a process group (checkpoints, tokenizer, datasets, flags) is checked first; bad input is
one line ``bam-eval: error: ...`` and exit code 2, and no output is written.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from bam_megatron.checkpoint import CheckpointError, lineage
from bam_megatron.data.datasets import Domain, TokenIds, domain_name, parse_data_path
from bam_megatron.data.tokenizer import TOKENIZER_TYPES, load_tokenizer
from bam_megatron.errors import ConfigError, run_tool
from bam_megatron.evaluation import report
from bam_megatron.evaluation.checkpoints import EvalModel, check_same_tokenizer, find_models, parse_model_flag
from bam_megatron.platform.atomic import write_atomically
from bam_megatron.platform.distributed import ParallelSizes

PROG = "bam-eval"

UNRECORDED_DEFAULTS = {"seed": 1234, "split": "969,30,1", "micro_batch_size": 4}
"""The data settings of a checkpoint that records none (imported from Hugging Face or read from
Megatron-LM): Megatron-LM's --seed 1234 and its legacy --split, pretrain_bam.py's --micro-batch-size
(the same defaults pretrain_bam.py has)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Per-domain perplexity table and MoE routing analysis.",
        epilog="bam-eval plot RUN ...: loss curves from training metrics files (bam-eval plot --help); "
        "bam-eval harness --load CKPT --tasks T1,T2 --out DIR: lm-evaluation-harness tasks (bam-eval harness --help)",
    )
    g = p.add_argument_group("models")
    g.add_argument(
        "--model",
        action="append",
        required=True,
        type=parse_model_flag,
        metavar="NAME=CHECKPOINT",
        help="a --save directory (latest iteration) or an iter_* directory; repeat for each row",
    )
    g.add_argument(
        "--expert-names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names of the experts in routing reports (default: the names each mixture's checkpoint records, "
        "from bam-upcycle's --expert NAME=DIR and every --extend)",
    )
    g = p.add_argument_group("data (defaults: the first model's training flags)")
    g.add_argument(
        "--data-path",
        nargs="+",
        required=True,
        metavar="PREFIX",
        help="Megatron syntax ([W1] PREFIX1 [W2] PREFIX2 ...); a domain is named after its file",
    )
    g.add_argument(
        "--split",
        default=None,
        help="train,valid,test proportions; the valid part is evaluated (default: the first model's, else 969,30,1)",
    )
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the dataset shuffling seed (default: the first model's, else Megatron-LM's 1234)",
    )
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="the tokenizer the models were trained with: SentencePiece model or Hugging Face tokenizer directory",
    )
    g.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=None,
        help="Megatron-LM's name of its kind (default: the first model's recorded type, else from --tokenizer-model: "
        "a directory is HuggingFaceTokenizer, a file SentencePieceTokenizer)",
    )
    g.add_argument("--data-cache-path", default=None, help="dataset index caches (default: next to the data)")
    g.add_argument(
        "--eval-samples", type=int, default=None, help="samples per domain (default: the whole validation split)"
    )
    g.add_argument("--micro-batch-size", type=int, default=None, help="default: the first model's, else 4")
    ParallelSizes.add_flags(p.add_argument_group("parallelism"))
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="eval", help="perplexity.md/.json, routing.json, routing.md, routing_*.png")
    return p


@dataclass
class Plan:
    """Everything checked before any process group starts."""

    models: list[EvalModel]
    domains: list[Domain]
    tokens: TokenIds
    split: str
    seq_length: int
    seed: int
    micro_batch_size: int
    expert_names: Optional[list[str]]
    notes: list[str] = field(default_factory=list)
    """Info lines rank 0 prints once the process group is up (the defaults taken)."""


def _data_settings(args: argparse.Namespace, model: EvalModel) -> tuple[dict[str, Any], Optional[str]]:
    """{setting: value} of --split, --seed, --micro-batch-size: the flag, else what the run that
    trained ``model`` used, else `UNRECORDED_DEFAULTS`; and the info line naming the defaults taken."""
    settings, defaulted = {}, []
    for setting, default in UNRECORDED_DEFAULTS.items():
        value = getattr(args, setting)
        if value is None:
            value = model.training.get(setting)
        if value is None:
            value = default
            defaulted.append(f"--{setting.replace('_', '-')} {default}")
        settings[setting] = value
    if not defaulted:
        return settings, None
    return settings, (
        f"model {model.name} records no {', '.join(d.split()[0] for d in defaulted)} (it was not trained here): "
        f"using {', '.join(defaulted)} (pretrain_bam.py's defaults; the seed and split are Megatron-LM's too)"
    )


def prepare(args: argparse.Namespace) -> Plan:
    """Resolve checkpoints and datasets and check that they fit together (no process group needed)."""
    models = find_models(args.model)
    first = models[0]
    tokenizer_type = args.tokenizer_type or first.meta.tokenizer_type
    given = load_tokenizer(args.tokenizer_model, tokenizer_type) if args.tokenizer_model else None
    fingerprint = check_same_tokenizer(models, given, f"--tokenizer-model {args.tokenizer_model}")
    tokenizer_path = args.tokenizer_model or first.meta.tokenizer_model
    tokenizer = given or load_tokenizer(tokenizer_path, tokenizer_type)
    if tokenizer.fingerprint != fingerprint:
        raise CheckpointError(f"tokenizer {tokenizer_path} is not the one model {models[0].name} was trained with")
    for flag in ("eval_samples", "micro_batch_size", "seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    moe = [m for m in models if m.is_moe]
    if args.expert_names is not None:
        for model in moe:
            if len(args.expert_names) != model.num_experts:
                raise ConfigError(
                    f"--expert-names gives {len(args.expert_names)} names, but model {model.name} "
                    f"has {model.num_experts} experts"
                )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ConfigError(f"--output-dir {args.output_dir} is a file")
    settings, note = _data_settings(args, first)
    return Plan(
        models=models,
        domains=parse_data_path(args.data_path),
        tokens=TokenIds.of(tokenizer),
        split=settings["split"],
        seq_length=args.seq_length or first.meta.seq_length,
        seed=settings["seed"],
        micro_batch_size=settings["micro_batch_size"],
        expert_names=args.expert_names,
        notes=[note] if note else [],
    )


def _start_distributed(args: argparse.Namespace, seed: int):
    """torch.distributed from torchrun/srun variables (a plain `python` process: a world of one),
    then megatron-core."""
    from bam_megatron.platform.distributed import initialize

    sizes = ParallelSizes.from_args(args)
    try:
        initialize(sizes, seed=seed)
    except RuntimeError as error:  # megatron-core's own checks of the parallel sizes
        raise ConfigError(f"parallel sizes do not fit world size {dist.get_world_size()}: {error}") from None
    return sizes


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def evaluate(plan: Plan, args: argparse.Namespace, sizes) -> dict[str, Any]:
    """Perplexity of every model on every domain, and routing of the MoE models (every rank calls it)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from bam_megatron.data.datasets import validation_sets
    from bam_megatron.evaluation.checkpoints import load_model
    from bam_megatron.evaluation.data import eval_batches
    from bam_megatron.evaluation.perplexity import token_losses
    from bam_megatron.evaluation.routing import RoutingCollector

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cache = args.data_cache_path or os.path.join(os.path.dirname(plan.domains[0].prefix), "cache")
    datasets = validation_sets(plan.domains, plan.split, plan.seq_length, plan.seed, plan.tokens, cache)
    counts = {}
    for name, dataset in datasets.items():
        counts[name] = min(args.eval_samples or len(dataset), len(dataset))
        if args.eval_samples and args.eval_samples > len(dataset):
            _say(
                f"domain {name}: its validation split has {len(dataset)} samples of {plan.seq_length} tokens; "
                "evaluating all of them"
            )
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mbs = plan.micro_batch_size
    batches = {name: eval_batches(ds, counts[name], mbs, dp_rank, dp, device) for name, ds in datasets.items()}

    losses: dict[str, dict[str, Any]] = {}
    routing: dict[str, dict[str, Any]] = {}
    for model in plan.models:
        _say(f"{model.name}: loading {model.path} ({model.variant}, iteration {model.meta.iteration})")
        net = load_model(model, sizes, plan.seq_length)
        collector = None
        if model.is_moe:
            collector = RoutingCollector(net, model.meta.architecture.num_layers, model.num_experts, device)
            routing[model.name] = {
                "variant": model.variant,
                "num_layers": model.meta.architecture.num_layers,
                "moe_router_topk": model.meta.architecture.moe_router_topk,
            }
        losses[model.name] = {}
        for name in datasets:
            start = time.perf_counter()
            if collector is not None:
                collector.reset()
            loss = token_losses(
                net, batches[name], plan.seq_length, mbs, collector.set_batch if collector is not None else None
            )
            seconds = time.perf_counter() - start
            losses[model.name][name] = loss
            if collector is not None:
                for kind, per_layer in collector.result().items():
                    routing[model.name].setdefault(kind, {})[name] = per_layer
            _say(
                f"{model.name} | {name}: {counts[name]} samples, {loss.tokens} tokens, "
                f"{counts[name] / seconds:.1f} samples/s | "
                f"loss {loss.mean_loss:.4f} ppl {loss.perplexity:.2f}"
            )
        if collector is not None:
            collector.remove()
        del net, collector
        clear_aux_losses_tracker()
        gc.collect()
    return {"losses": losses, "routing": routing, "counts": counts}


def render(plan: Plan, args: argparse.Namespace, results: dict[str, Any]) -> dict[str, bytes]:
    """{file name: content} of every output, rendered before anything is written."""
    domains = [d.name for d in plan.domains]
    losses, routing = results["losses"], results["routing"]
    perplexities = {}
    for model in plan.models:
        row = {d: losses[model.name][d].perplexity for d in domains}
        row["average"] = report.macro_average([row[d] for d in domains])
        perplexities[model.name] = row
    first = losses[plan.models[0].name]
    table = report.perplexity_table(domains, perplexities)
    files = {
        "perplexity.md": (
            f"# Perplexity per domain\n\nexp(mean token loss) on each domain's validation split "
            f"(--split {plan.split}, --seq-length {plan.seq_length}, --seed {plan.seed}); "
            "average: unweighted mean over domains.\n\n" + table
        ).encode(),
        "perplexity.json": report.json_text(
            {
                "domains": domains,
                "split": plan.split,
                "seq_length": plan.seq_length,
                "seed": plan.seed,
                "samples": results["counts"],
                "tokens": {d: first[d].tokens for d in domains},
                "models": {
                    m.name: {
                        "checkpoint": m.path,
                        "iteration": m.meta.iteration,
                        "variant": m.variant,
                        "perplexity": perplexities[m.name],
                        "loss": {d: losses[m.name][d].mean_loss for d in domains},
                    }
                    for m in plan.models
                },
            }
        ).encode(),
    }
    if routing:
        summary = {"domains": domains, "models": {}}
        own_names = {d.name: domain_name(d.prefix) for d in plan.domains}
        for model in plan.models:
            if model.name not in routing:
                continue
            names = plan.expert_names or lineage.expert_names(model.meta)
            entry = dict(routing[model.name], expert_names=names, figure=report.figure_name(model.name))
            entry["own_expert"] = report.own_expert_shares(entry, names, own_names)
            summary["models"][model.name] = entry
            title = f"{model.name} ({model.variant})"
            files[entry["figure"]] = report.routing_heatmap_png(title, {model.name: entry}, domains, names)
        files["routing.json"] = report.json_text(summary).encode()
        files["routing.md"] = (
            "# Own expert's share\n\nEach domain's tokens that the expert named after the domain gets: the mean "
            "attention gate and the share of tokens whose top-k FFN experts include it; mean over layers, then "
            "each layer's (from layer 0).\n\n" + report.own_expert_table(summary["models"], domains)
        ).encode()
    return files


def _run(args: argparse.Namespace) -> int:
    plan = prepare(args)
    sizes = _start_distributed(args, plan.seed)
    for note in plan.notes:
        _say(note)
    results = evaluate(plan, args, sizes)
    if dist.get_rank() != 0:
        return 0
    files = render(plan, args, results)
    print(files["perplexity.md"].decode().split("\n\n", 2)[2], end="", flush=True)
    if "routing.md" in files:
        print("\nOwn expert's share (mean over layers, then each layer's):\n", flush=True)
        print(files["routing.md"].decode().split("\n\n", 2)[2], end="", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, content in files.items():
        write_atomically(os.path.join(args.output_dir, name), content)
    print(f"wrote {', '.join(os.path.join(args.output_dir, n) for n in files if n.endswith(('.md', '.json')))}")
    figures = [os.path.join(args.output_dir, n) for n in files if n.endswith(".png")]
    if figures:
        print(f"routing heatmaps: {', '.join(figures)}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``bam-eval``'s perplexity table (`bam_megatron.cli.eval` dispatches the sub-commands); returns
    the exit code (2 for bad input)."""
    import bam_megatron  # noqa: F401  (quiet megatron-core's import-time warnings)

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    started_here = not dist.is_initialized()
    try:
        return run_tool(
            PROG, lambda: _run(args), print_errors=lambda: not dist.is_initialized() or dist.get_rank() == 0
        )
    finally:
        if started_here and dist.is_initialized():
            from bam_megatron.platform.distributed import destroy

            destroy()
