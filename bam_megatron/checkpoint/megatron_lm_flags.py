"""``python -m bam_megatron.checkpoint.megatron_lm_flags RUN``: the Megatron-LM ``pretrain_gpt.py``
command that starts from a bam-megatron checkpoint (its ``args``, `megatron_lm_args.common_state`).

Apart from `bam_megatron.checkpoint.megatron_lm_args` because it reads checkpoints through `store`,
which itself uses `megatron_lm_reader` and `megatron_lm_args` to read and write Megatron-LM's records.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from bam_megatron.checkpoint import layout, store
from bam_megatron.checkpoint.megatron_lm_args import REVISION, no_megatron_lm_model, pretrain_gpt_flags
from bam_megatron.checkpoint.meta import MEGATRON_LM, CheckpointError


def describe(path: str, tensor: Optional[int] = None, pipeline: Optional[int] = None, expert: Optional[int] = None):
    """The pretrain_gpt.py command (as text) that starts Megatron-LM from the checkpoint at ``path``
    (a --save directory or an ``iter_*``); a one-line `CheckpointError` if Megatron-LM cannot load it."""
    from megatron.core import dist_checkpointing

    found = store.resolve_checkpoint(path)
    meta = store.read_meta(found)
    why = None if meta.source == MEGATRON_LM else no_megatron_lm_model(meta)
    if why is not None:
        raise CheckpointError(f"{found}: no Megatron-LM model computes this checkpoint's ({why})")
    common = dist_checkpointing.load_common_state_dict(found)
    if "args" not in common:
        raise CheckpointError(
            f"{found} has no Megatron-LM args in its common.pt (written by a bam-megatron before they were recorded)"
        )
    run = os.path.dirname(os.path.abspath(found))  # Megatron-LM loads a --save directory's latest iteration
    flags = pretrain_gpt_flags(common["args"], tensor, pipeline, expert)
    lines = [
        f"# {found}: a {meta.architecture.variant} model, iteration {meta.iteration}, for Megatron-LM {REVISION}",
        f"# Megatron-LM reads the latest iteration of the --save directory {run}",
    ]
    tracker = os.path.join(run, layout.LATEST)
    latest, named = layout.latest_text(run), layout.named_by_latest(run)
    if latest is None:
        lines.append(f"# (Megatron-LM finds no checkpoint there without {tracker} naming {os.path.basename(found)})")
    elif named != os.path.basename(found):
        lines.append(
            f"# (its latest is {latest}, not {os.path.basename(found)}: --ckpt-step {common.get('iteration')} "
            "picks that one; drop it once OUT holds checkpoints of its own)"
        )
    lines += [
        "torchrun --nproc-per-node N pretrain_gpt.py \\",
        *(f"    {flag} \\" for flag in flags),
        f"    --pretrained-checkpoint {run} --load OUT --save OUT \\",
        "    <data, batch, learning-rate and iteration flags>",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m bam_megatron.checkpoint.megatron_lm_flags CHECKPOINT``: print the pretrain_gpt.py command."""
    from bam_megatron.errors import run_tool

    parser = argparse.ArgumentParser(
        prog="python -m bam_megatron.checkpoint.megatron_lm_flags",
        description="Print the Megatron-LM pretrain_gpt.py flags that load a bam-megatron checkpoint.",
    )
    parser.add_argument("checkpoint", help="a --save directory (its latest iteration) or an iter_* directory")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: as saved")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="default: as saved")
    parser.add_argument("--expert-model-parallel-size", type=int, default=None, help="default: as saved")
    args = parser.parse_args(argv)

    def body() -> None:
        sizes = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size)
        print(describe(args.checkpoint, *sizes))

    return run_tool(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
