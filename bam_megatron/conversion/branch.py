"""Phase 1, branch: one seed checkpoint -> N named dense-expert runs, ready for phase 2.

    python tools/branch.py --seed-checkpoint runs/seed --output-dir runs/experts \\
        --experts code law math --domain-data code=data/code_text_document \\
        law=data/law_text_document math=data/math_text_document --general-data data/web_text_document

For each expert NAME it writes, atomically (a temp directory renamed when complete):

    OUT/NAME/init/          the seed checkpoint, hard-linked (no bytes copied where the
                            filesystem allows it; copied otherwise)
    OUT/NAME/lineage.json   seed path, iteration and hash; the phase-2 settings
    OUT/NAME/phase2.args    pretrain_bam.py flags (argparse @file): the seed's training flags
                            (not its architecture, which pretrain_bam.py reads from the seed
                            checkpoint), the domain mixture (1 - f of the domain, f general),
                            the seed's peak LR x --lr-scale, --pretrained-checkpoint OUT/NAME/init,
                            --load/--save OUT/NAME/ckpt

Phase 2 is then ``pretrain_bam.py @OUT/NAME/phase2.args --train-iters N``: flags given after the
file override it, and a restarted job resumes OUT/NAME/ckpt instead of starting from the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointError, CheckpointMeta, layout
from bam_megatron.errors import UserError

# Seed settings that phase 2 must not inherit: they name the seed's own run, data or length, or
# derive the architecture (which comes from the seed checkpoint itself).
NOT_INHERITED = {
    "data_path",
    "load",
    "save",
    "pretrained_checkpoint",
    "finetune",
    "train_iters",
    "train_samples",
    "lr",
    "min_lr",
    "tensorboard_dir",
    "metrics_file",
    "exit_interval",
    "global_batch_size",
    "preset",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "seq_length",
}

FlagWriter = Callable[[Mapping[str, Any]], list[str]]
"""Renders settings (flag dest -> value) as pretrain_bam.py flags (`bam_megatron.training.arguments.as_flags`)."""


class BranchError(UserError):
    """Bad input to branch.py; one line naming it."""


def _link_tree(src: str, dst: str) -> None:
    """Hard-link every file of ``src`` into ``dst``; copy where linking is not possible."""
    os.makedirs(dst)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            _link_tree(s, d)
            continue
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)


def phase2_flags(
    seed: CheckpointMeta, domain: str, general: str, args, out: str, init: str, as_flags: FlagWriter
) -> list[str]:
    """pretrain_bam.py flags for one expert: the seed's training settings, then phase-2 settings."""
    inherited = {k: v for k, v in seed.training.items() if k not in NOT_INHERITED}
    if seed.tokenizer_model and not inherited.get("tokenizer_model"):  # e.g. an imported seed: not trained here
        inherited["tokenizer_model"] = seed.tokenizer_model
    lr = seed.training.get("lr", 3e-4) * args.lr_scale
    phase2 = {
        "data_path": [str(1 - args.general_fraction), domain, str(args.general_fraction), general],
        "lr": repr(lr),
        "min_lr": repr(0.1 * lr),
        "pretrained_checkpoint": init,
        "load": os.path.join(out, "ckpt"),
        "save": os.path.join(out, "ckpt"),
    }
    return as_flags(inherited) + as_flags(phase2)


def branch(args: argparse.Namespace, as_flags: FlagWriter) -> list[str]:
    """Create the expert runs; return their directories. ``as_flags`` writes pretrain_bam.py flags."""
    from bam_megatron.data.datasets import check_indexed_dataset
    from bam_megatron.data.errors import DataError

    try:
        seed = checkpoint.resolve_checkpoint(args.seed_checkpoint)
        meta = checkpoint.read_meta(seed)
    except CheckpointError as error:
        raise BranchError(f"--seed-checkpoint: {error}") from None
    if meta.architecture.variant != "dense":
        raise BranchError(f"--seed-checkpoint {seed} is a {meta.architecture.variant} model; the seed must be dense")
    if not 0 < args.general_fraction < 1:
        raise BranchError(f"--general-fraction must be in (0, 1), got {args.general_fraction}")
    if not args.lr_scale > 0:
        raise BranchError(f"--lr-scale must be > 0, got {args.lr_scale}")
    domains = dict(spec.split("=", 1) for spec in args.domain_data if "=" in spec)
    missing = [n for n in args.experts if n not in domains]
    if missing or len(domains) != len(args.domain_data):
        raise BranchError(
            f"--domain-data: expected NAME=PREFIX for every expert, missing {', '.join(missing) or 'NAME='}"
        )
    if len(set(args.experts)) != len(args.experts):
        raise BranchError("--experts names must be unique")
    try:
        for prefix in [*domains.values(), args.general_data]:
            check_indexed_dataset(prefix)
    except DataError as error:
        raise BranchError(str(error)) from None
    existing = [n for n in args.experts if os.path.exists(os.path.join(args.output_dir, n))]
    if existing:
        raise BranchError(f"{os.path.join(args.output_dir, existing[0])} already exists")

    seed_hash = checkpoint.checkpoint_hash(seed)
    made = []
    for name in args.experts:
        out = os.path.join(args.output_dir, name)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            init = os.path.join(out, "init")
            # the seed as the latest checkpoint of a --save directory (a Megatron-LM release stays one)
            released = os.path.basename(os.path.normpath(seed)) == layout.RELEASE
            iteration_dir = layout.RELEASE if released else layout.iteration_name(meta.iteration)
            _link_tree(seed, os.path.join(tmp, "init", iteration_dir))
            layout.write_latest(os.path.join(tmp, "init"), iteration_dir)
            flags = phase2_flags(meta, domains[name], args.general_data, args, out, init, as_flags)
            with open(os.path.join(tmp, "phase2.args"), "w") as f:
                f.write("\n".join(flags) + "\n")
            lineage = {
                "expert": name,
                "seed": {"path": os.path.abspath(seed), "iteration": meta.iteration, "hash": seed_hash},
                "domain_data": domains[name],
                "general_data": args.general_data,
                "general_fraction": args.general_fraction,
                "lr_scale": args.lr_scale,
            }
            with open(os.path.join(tmp, "lineage.json"), "w") as f:
                json.dump(lineage, f, indent=2)
            os.makedirs(args.output_dir, exist_ok=True)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        made.append(out)
        print(f"branched {name}: {out} (phase 2: pretrain_bam.py @{os.path.join(out, 'phase2.args')} --train-iters N)")
    return made
