"""The checkpoints bam-eval compares: found and checked before any process group starts, then
loaded one at a time into a model built for the evaluation's parallel layout."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.training import checkpointing
from bam_megatron.training.checkpointing import CheckpointError

SOFT_MOA_VARIANTS = ("bam", "bam-shared-kv")


@dataclass(frozen=True)
class EvalModel:
    """One ``--model NAME=CHECKPOINT``: its name in reports, iteration directory and saved meta."""

    name: str
    path: str
    meta: dict[str, Any]

    @property
    def args(self) -> dict[str, Any]:
        """The training flags the checkpoint was saved with."""
        return self.meta["args"]

    @property
    def variant(self) -> str:
        return self.args["variant"]

    @property
    def is_moe(self) -> bool:
        """True for bam, bam-shared-kv and btx: models with routers to analyse."""
        return self.variant != "dense"

    @property
    def has_soft_moa(self) -> bool:
        """True when attention is a soft mixture with its own router."""
        return self.variant in SOFT_MOA_VARIANTS

    @property
    def num_experts(self) -> int:
        """FFN experts (and attention experts for soft MoA); 0 for a dense model."""
        return int(self.args["num_experts"]) if self.is_moe else 0


def parse_model_flag(text: str) -> tuple[str, str]:
    """argparse type of ``--model``: 'NAME=CHECKPOINT' -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT_DIR, got {text!r}")
    return name, path


def resolve_checkpoint(path: str) -> str:
    """A --save directory (its latest iteration) or an iter_* directory -> the iteration directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return checkpointing.resolve_checkpoint(path)


def find_models(flags: Sequence[tuple[str, str]]) -> list[EvalModel]:
    """Resolve every ``--model`` and read its meta; names must be unique."""
    names = [name for name, _ in flags]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--model names must be unique; repeated: {', '.join(duplicates)}")
    models = []
    for name, path in flags:
        resolved = resolve_checkpoint(path)
        models.append(EvalModel(name, resolved, checkpointing.read_meta(resolved)))
    return models


def check_same_tokenizer(models: Sequence[EvalModel]) -> str:
    """Perplexities are comparable only over one tokenization: every model must have been trained
    with the first model's tokenizer (same fingerprint). Returns that fingerprint."""
    reference = models[0]
    for model in models:
        saved = model.meta.get("tokenizer_fingerprint")
        if saved is None:
            raise CheckpointError(
                f"model {model.name} ({model.path}) was trained without a tokenizer (--mock-data); "
                "it cannot be evaluated on tokenized datasets"
            )
        if saved != reference.meta["tokenizer_fingerprint"]:
            raise CheckpointError(
                f"model {model.name} ({model.path}) was trained with another tokenizer than "
                f"model {reference.name}; all models must share one tokenizer"
            )
    return reference.meta["tokenizer_fingerprint"]


def load_model(model: EvalModel, sizes: ParallelSizes, seq_length: int) -> torch.nn.Module:
    """This rank's part of ``model`` under ``sizes``, weights loaded (resharded), in eval mode, fp32.

    Call after ``initialize(sizes)``. Dropout is off; a bf16-trained checkpoint is evaluated in fp32.
    """
    from bam_megatron.model.builder import build_model
    from bam_megatron.training.loop import model_config

    args = argparse.Namespace(**model.args)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = sizes.tensor, sizes.pipeline
    args.expert_model_parallel_size = sizes.expert if model.is_moe else 1  # megatron-core: EP needs experts
    args.sequence_parallel = sizes.sequence_parallel
    args.hidden_dropout = args.attention_dropout = 0.0
    args.recompute_granularity = args.recompute_method = args.recompute_num_layers = None
    args.bf16 = False
    if model.is_moe and args.num_experts % sizes.expert:
        raise CheckpointError(
            f"model {model.name} has {args.num_experts} experts, which "
            f"--expert-model-parallel-size {sizes.expert} does not divide"
        )
    if args.padded_vocab_size % sizes.tensor:
        raise CheckpointError(
            f"model {model.name}'s vocabulary ({args.padded_vocab_size} rows) does not split "
            f"over --tensor-model-parallel-size {sizes.tensor}"
        )
    built = build_model(
        model_config(args),
        args.padded_vocab_size,
        seq_length,
        untie_embeddings=args.untie_embeddings_and_output_weights,
    )
    with warnings.catch_warnings():  # torch's notes on megatron-core's checkpoint internals, not the user's
        warnings.filterwarnings(
            "ignore", message=r"(`load_state_dict` is deprecated|Please use DTensor)", category=FutureWarning
        )
        checkpointing.load_checkpoint(model.path, built, load_rng=False)
    built.config.finalize_model_grads_func = None  # forward only
    return built.eval()
