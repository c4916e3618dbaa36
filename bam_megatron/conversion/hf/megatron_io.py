"""bam-megatron checkpoints in and out of the converter, on one process.

A checkpoint saved under any TP/PP/EP layout is read through dist_checkpointing into a TP=PP=EP=1
model (dist_checkpointing reshards on load), so the converter sees every tensor whole, by
megatron-core's parameter names. Imported weights are written the same way pretrain_bam.py saves:
an ``iter_*`` directory, the ``latest`` file and the meta (training flags, tokenizer fingerprint).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from bam_megatron.conversion.hf.errors import ConversionError


def read_checkpoint(path: str) -> tuple[str, dict[str, Any]]:
    """A --save directory or an iter_* directory -> (iteration directory, its meta)."""
    from bam_megatron.training import checkpointing

    if not os.path.exists(path):
        raise ConversionError(f"checkpoint not found: {path}")
    try:
        resolved = checkpointing.resolve_checkpoint(path)
        return resolved, checkpointing.read_meta(resolved)
    except checkpointing.CheckpointError as error:
        raise ConversionError(str(error)) from None


def model_config_for(args: dict[str, Any]):
    """The BAMConfig of a checkpoint's model on one rank (no process group needed)."""
    from bam_megatron.training import checkpointing
    from bam_megatron.training.loop import model_config

    config = model_config(checkpointing.one_rank_args(args))
    config.perform_initialization = False  # every weight is loaded or overwritten
    return config


def build_one_rank_model(args: dict[str, Any]):
    """(GPTModel, BAMConfig) for ``args`` on this process alone (a world of one unless one is running)."""
    from bam_megatron.model.builder import build_model
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    config = model_config_for(args)
    # The local (PyTorch) spec on any machine: its parameter names are the ones the converter maps.
    model = build_model(
        config,
        args["padded_vocab_size"],
        args["seq_length"],
        backend="local",
        untie_embeddings=args["untie_embeddings_and_output_weights"],
    )
    return model, config


def load_weights(path: str, meta: dict[str, Any]):
    """Every parameter of the checkpoint at ``path``, whole, in fp32, and the model's BAMConfig."""
    from bam_megatron.training import checkpointing

    model, config = build_one_rank_model(meta["args"])
    with warnings.catch_warnings():  # torch's notes on megatron-core's checkpoint internals, not the user's
        warnings.filterwarnings(
            "ignore", message=r"(`load_state_dict` is deprecated|Please use DTensor)", category=FutureWarning
        )
        checkpointing.load_checkpoint(path, model, load_rng=False)
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}, config


def seed_args(**fields: Any) -> dict[str, Any]:
    """pretrain_bam.py's flags (its defaults) with ``fields`` set: the meta of a new seed checkpoint."""
    from bam_megatron.training.arguments import build_parser

    args = vars(build_parser().parse_args([]))
    unknown = sorted(set(fields) - set(args) - {"padded_vocab_size"})
    if unknown:
        raise ValueError(f"not pretrain_bam.py flags: {', '.join(unknown)}")
    args.update(fields)
    return args


def save_weights(root: str, weights: dict[str, torch.Tensor], args: dict[str, Any], meta: dict[str, Any]) -> str:
    """Save ``weights`` (every parameter of the model ``args`` describe) as iteration 0 under ``root``."""
    from bam_megatron.training import checkpointing

    model, _ = build_one_rank_model(args)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:  # a mapping bug, not bad input
        raise RuntimeError(
            f"converted weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(weights[name].shape) != tuple(param.shape):
                raise RuntimeError(
                    f"{name}: converted shape {tuple(weights[name].shape)}, model has {tuple(param.shape)}"
                )
            param.copy_(weights[name])
    full_meta = {
        "consumed_samples": 0,
        "skipped_iterations": 0,
        "nan_iterations": 0,
        "args": args,
        "data_fingerprint": None,
        **meta,
    }
    return checkpointing.save_checkpoint(root, 0, model, None, None, full_meta)
