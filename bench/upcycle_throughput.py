"""Upcycling speed and memory: bam-upcycle of 4 dense sources vs a plain copy of the same bytes.

Four dense checkpoints (random weights; ours, or Megatron-LM's layout with ``--source-format
megatron-lm``) are created, then upcycled to BAM; the reference is copying the same source files
on the same disk, then syncing (the I/O limit: an upcycle reads every source byte once and writes
the MoE once, a copy reads and writes every byte once). Copies and upcycles alternate
(``--repeats`` each, a copy first and last) and medians are compared. Throughput is source GB per
second, for the upcycle's work (from reading the sources to the published checkpoint, as its
manifest records) and for the whole command (plus interpreter start and imports); the ratios are
ours / copy (goals: >= 0.8 for the work, >= 0.5 for the whole command).

The command is bam-upcycle's default one (its step-0 report on, streamed layer by layer) unless
``--report-batches N`` is given (0: off). ``--router-init domain`` also fits domain routers: each
source gets a small dataset of random tokens from its own quarter of the vocabulary, given to the
upcycler with ``--router-data``.

Memory: the same is repeated with sources twice as deep (``--layers`` and 2 x ``--layers``); the
upcycler streams layer by layer, so its peak RSS should not grow with depth.

    python bench/upcycle_throughput.py [--hidden 1536 --layers 6 --vocab 32000 --repeats 3]

``--keep-sources DIR`` keeps (and reuses) the generated sources there; ``--depths 1`` measures
only the first depth; ``--compare ROOT`` also times another checkout's ``tools/upcycle.py``
(e.g. ``git archive`` of an older commit), interleaved with this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bam_megatron  # noqa: E402,F401
from bam_megatron.testing.distributed import run_distributed  # noqa: E402
from bench.common import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["seed", "code", "law", "math"]


def make_source(directory: str, flags: list[str], seed: int) -> None:
    """Rank body: a randomly initialised dense checkpoint with pretrain_bam.py's metadata."""
    import torch

    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.model.architecture import padded_vocab_size, resolve_architecture
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from bam_megatron.training.arguments import DEFAULT_SEQ_LENGTH, given_architecture, parse_args

    initialize(ParallelSizes(), seed=seed)
    args = parse_args(flags + ["--seed", str(seed)])
    padded = padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, 1)
    architecture = resolve_architecture(given_architecture(args), args.preset, padded_vocab=padded)
    seq_length = args.seq_length or DEFAULT_SEQ_LENGTH
    torch.manual_seed(seed)
    config = architecture.model_config(use_cpu_initialization=True)
    model = build_from_architecture(architecture, config, seq_length)
    meta = CheckpointMeta(architecture, seq_length=seq_length, training={"seed": seed})
    store.save_checkpoint(directory, 1, model, None, None, meta)


def make_megatron_lm_source(directory: str, settings: dict, layers: int, seed: int) -> None:
    """Rank body: a dense checkpoint as Megatron-LM's save_checkpoint writes it (its args, local spec)."""
    from tests.support.megatron_lm import megatron_lm_args, save_as_megatron_lm

    hidden = settings["hidden"]
    args = megatron_lm_args(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        num_attention_heads=hidden // 64,
        num_query_groups=hidden // 64,
        group_query_attention=False,
        kv_channels=64,
        padded_vocab_size=settings["vocab"],
        max_position_embeddings=1024,
        seq_length=1024,
        tokenizer_model=None,
    )
    save_as_megatron_lm(directory, args, seed)


def domain_data(directory: str, name: str, vocab: int) -> str:
    """PREFIX of a small indexed dataset of random tokens from domain ``name``'s quarter of the vocabulary."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, f"{name}_text_document")
    if not os.path.exists(prefix + ".idx"):
        quarter = vocab // len(NAMES)
        low = NAMES.index(name) * quarter
        generator = numpy.random.default_rng(NAMES.index(name))
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
        for _ in range(64):
            builder.add_document(generator.integers(low, low + quarter, 256, dtype=numpy.int64), [256])
        builder.finalize(prefix + ".idx")
    return prefix


def size_of(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def create_sources(directory: str, layers: int, settings: argparse.Namespace) -> list[str]:
    """The 4 sources of ``layers`` layers under ``directory`` (reused when complete)."""
    sources = [os.path.join(directory, n) for n in NAMES]
    done = os.path.join(directory, "complete")
    if os.path.exists(done):
        return sources
    shutil.rmtree(directory, ignore_errors=True)
    flags = [
        *("--variant", "dense", "--mock-data", "--train-iters", "1", "--vocab-size", str(settings.vocab)),
        *("--num-layers", str(layers), "--hidden-size", str(settings.hidden)),
        *("--num-attention-heads", str(settings.hidden // 64), "--ffn-hidden-size", str(4 * settings.hidden)),
    ]
    for i, path in enumerate(sources):
        if settings.source_format == "megatron-lm":
            run_distributed(make_megatron_lm_source, 1, args=(path, vars(settings), layers, i), timeout=3600)
        else:
            run_distributed(make_source, 1, args=(path, flags, i), timeout=3600)
    open(done, "w").close()
    return sources


def upcycle_sources(workdir: str, sources: list[str], layers: int, settings: argparse.Namespace) -> dict:
    """Alternate copies and upcycles of ``sources``; medians and peak RSS."""
    source_bytes = sum(size_of(p) for p in sources)

    def copy() -> float:
        target = os.path.join(workdir, "copy")
        shutil.rmtree(target, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        for name, path in zip(NAMES, sources):
            shutil.copytree(path, os.path.join(target, name))
        os.sync()
        return time.perf_counter() - start

    def upcycle(root: str) -> tuple[float, dict]:
        out = os.path.join(workdir, "bam")
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        argv = [sys.executable, os.path.join(root, "tools", "upcycle.py"), "--method", "bam", "--save", out]
        if settings.report_batches is not None:
            argv += ["--report-batches", str(settings.report_batches)]
        for name, path in zip(NAMES, sources):
            argv += ["--expert", f"{name}={path}"]
        if settings.router_init == "domain":
            argv += ["--router-init", "domain"]
            argv += [f for n in NAMES for f in ("--router-data", f"{n}={domain_data(workdir, n, settings.vocab)}")]
        env = dict(os.environ, PYTHONPATH=root)  # (its own bam_megatron before the installed one)
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
        os.sync()
        wall = time.perf_counter() - start
        return wall, json.load(open(os.path.join(out, "upcycle_manifest.json")))

    roots = {"upcycle": ROOT, **({"compare": settings.compare} if settings.compare else {})}
    copies, walls, works, peaks = [], {r: [] for r in roots}, {r: [] for r in roots}, {r: [] for r in roots}
    for _ in range(settings.repeats):
        copies.append(copy())
        for label, root in roots.items():
            wall, manifest = upcycle(root)
            walls[label].append(wall)
            works[label].append(manifest["seconds"])
            peaks[label].append(manifest["peak_rss_mb"])
    copies.append(copy())
    output_mb = size_of(os.path.join(workdir, "bam")) / 1e6
    shutil.rmtree(os.path.join(workdir, "copy"), ignore_errors=True)
    shutil.rmtree(os.path.join(workdir, "bam"), ignore_errors=True)
    gb = source_bytes / 1e9
    copy_s = statistics.median(copies)
    result = {
        "layers": layers,
        "source_gb_total": round(gb, 3),
        "one_source_mb": round(size_of(sources[0]) / 1e6, 1),
        "output_mb": round(output_mb, 1),
        "copy_seconds": [round(x, 2) for x in copies],
        "copy_gb_per_s": round(gb / copy_s, 3),
    }
    for label in roots:  # "upcycle": this checkout; "compare": --compare's
        work_s, wall_s = statistics.median(works[label]), statistics.median(walls[label])
        result[label] = {
            "work_seconds": works[label],
            "command_seconds": [round(x, 2) for x in walls[label]],
            "work_gb_per_s": round(gb / work_s, 3),
            "command_gb_per_s": round(gb / wall_s, 3),
            "ratio_work_over_copy": round(copy_s / work_s, 3),
            "ratio_command_over_copy": round(copy_s / wall_s, 3),
            "peak_rss_mb": max(peaks[label]),
        }
    return result


def main() -> None:
    """Run the benchmark at ``--layers`` (and twice as deep) and print the JSON record and summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depths", type=int, choices=(1, 2), default=2, help="2: also at 2 x --layers (memory)")
    parser.add_argument("--source-format", choices=("bam-megatron", "megatron-lm"), default="bam-megatron")
    parser.add_argument(
        "--report-batches", type=int, default=None, help="bam-upcycle's step-0 report (default: its default; 0: off)"
    )
    parser.add_argument("--router-init", choices=("random", "domain"), default="random", help="bam-upcycle's")
    parser.add_argument("--workdir", default="/tmp/bam-upcycle-bench")
    parser.add_argument("--keep-sources", metavar="DIR", help="keep the generated sources here and reuse them")
    parser.add_argument("--compare", metavar="ROOT", help="another checkout: its tools/upcycle.py, interleaved")
    settings = parser.parse_args()
    runs = []
    for layers in [settings.layers, 2 * settings.layers][: settings.depths]:
        shutil.rmtree(settings.workdir, ignore_errors=True)
        os.makedirs(settings.workdir)
        cache = settings.keep_sources or os.path.join(settings.workdir, "sources")
        name = f"{settings.source_format}-d{settings.hidden}-l{layers}-v{settings.vocab}"
        sources = create_sources(os.path.join(cache, name), layers, settings)
        runs.append(upcycle_sources(settings.workdir, sources, layers, settings))
        shutil.rmtree(settings.workdir, ignore_errors=True)
    base, deep = runs[0], runs[-1]
    ours = base["upcycle"]
    summary = (
        f"upcycle_throughput ({settings.source_format} sources): {ours['work_gb_per_s']:.3f} GB/s upcycling "
        f"4 x {base['one_source_mb']:.0f} MB vs {base['copy_gb_per_s']:.3f} GB/s copying: ratio "
        f"{ours['ratio_work_over_copy']:.2f} (goal >= 0.8), {ours['ratio_command_over_copy']:.2f} for the whole "
        f"command (goal >= 0.5); peak memory {ours['peak_rss_mb']:.0f} MB at {base['layers']} layers, "
        f"{deep['upcycle']['peak_rss_mb']:.0f} MB at {deep['layers']} layers"
    )
    if settings.compare:
        theirs = base["compare"]
        summary += (
            f"; {settings.compare}: ratio {theirs['ratio_work_over_copy']:.2f} "
            f"({theirs['ratio_command_over_copy']:.2f} whole command), peak {theirs['peak_rss_mb']:.0f} MB"
        )
    report({"bench": "upcycle_throughput", "config": vars(settings), "runs": runs}, summary)


if __name__ == "__main__":
    main()
