"""Phase 1, branch: one seed checkpoint -> N named dense-expert runs, ready for phase 2.

    python tools/branch.py --seed-checkpoint runs/seed --output-dir runs/experts \\
        --experts code law math --domain-data code=data/code_text_document \\
        law=data/law_text_document math=data/math_text_document --general-data data/web_text_document

For each expert NAME it writes, atomically (a temp directory renamed when complete):

    OUT/NAME/init/          the seed checkpoint, hard-linked (no bytes copied where the
                            filesystem allows it; copied otherwise)
    OUT/NAME/lineage.json   seed path, iteration and hash; the phase-2 settings
    OUT/NAME/phase2.args    pretrain_bam.py flags (argparse @file): the seed's architecture and
                            training flags, the domain mixture (1 - f of the domain, f general),
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
import sys
from collections.abc import Sequence
from typing import Optional

from bam_megatron.training import checkpointing

# Seed flags that phase 2 must not inherit: they name the seed's own run, data or length.
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
    "padded_vocab_size",
    "exit_interval",
    "global_batch_size",
    "num_experts",
}


class BranchError(ValueError):
    """Bad input to branch.py; one line naming it."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags of tools/branch.py."""
    p = argparse.ArgumentParser(
        prog="branch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed-checkpoint", required=True, help="the seed: a --save directory or an iter_* directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--experts", nargs="+", required=True, metavar="NAME")
    p.add_argument(
        "--domain-data",
        nargs="+",
        required=True,
        metavar="NAME=PREFIX",
        help="each expert's domain corpus (indexed-dataset prefix)",
    )
    p.add_argument("--general-data", required=True, metavar="PREFIX", help="general data mixed into every domain")
    p.add_argument("--general-fraction", type=float, default=0.1, help="share of general data in phase 2")
    p.add_argument("--lr-scale", type=float, default=0.5, help="phase-2 peak LR = the seed's x this")
    return p.parse_args(argv)


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


def phase2_flags(seed_args: dict, name: str, domain: str, general: str, args, out: str, init: str) -> list[str]:
    """pretrain_bam.py flags for expert ``name``: inherited from the seed, then phase-2 settings."""
    from bam_megatron.training.arguments import build_parser

    flags: list[str] = []
    for action in build_parser()._actions:  # the seed's values, in pretrain_bam.py's own flag names
        key = action.dest
        if key in NOT_INHERITED or key == "help" or key not in seed_args or not action.option_strings:
            continue
        value, default = seed_args[key], action.default
        if value is None or value == default or value == []:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true / BooleanOptionalAction
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    lr = seed_args["lr"] * args.lr_scale
    flags += [
        "--data-path",
        str(1 - args.general_fraction),
        domain,
        str(args.general_fraction),
        general,
        "--lr",
        repr(lr),
        "--min-lr",
        repr(0.1 * lr),
        "--pretrained-checkpoint",
        init,
        "--load",
        os.path.join(out, "ckpt"),
        "--save",
        os.path.join(out, "ckpt"),
    ]
    return flags


def branch(args: argparse.Namespace) -> list[str]:
    """Create the expert runs; return their directories."""
    from bam_megatron.data.datasets import check_indexed_dataset
    from bam_megatron.data.errors import DataError

    try:
        seed = checkpointing.resolve_checkpoint(args.seed_checkpoint)
        meta = checkpointing.read_meta(seed)
    except checkpointing.CheckpointError as error:
        raise BranchError(f"--seed-checkpoint: {error}") from None
    if meta["args"]["variant"] != "dense":
        raise BranchError(f"--seed-checkpoint {seed} is a {meta['args']['variant']} model; the seed must be dense")
    if not 0 < args.general_fraction < 1:
        raise BranchError(f"--general-fraction must be in (0, 1), got {args.general_fraction}")
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

    seed_hash = checkpointing.checkpoint_hash(seed)
    made = []
    for name in args.experts:
        out = os.path.join(args.output_dir, name)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            init = os.path.join(out, "init")
            iteration_dir = os.path.basename(seed)
            _link_tree(seed, os.path.join(tmp, "init", iteration_dir))
            with open(os.path.join(tmp, "init", checkpointing.LATEST), "w") as f:
                f.write(str(meta["iteration"]))
            flags = phase2_flags(meta["args"], name, domains[name], args.general_data, args, out, init)
            with open(os.path.join(tmp, "phase2.args"), "w") as f:
                f.write("\n".join(flags) + "\n")
            lineage = {
                "expert": name,
                "seed": {"path": os.path.abspath(seed), "iteration": meta["iteration"], "hash": seed_hash},
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of tools/branch.py; exit code 2 for bad input."""
    try:
        branch(parse_args(argv))
    except BranchError as error:
        print(f"branch.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
