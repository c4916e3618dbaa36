"""The checkpoints bam-eval compares: found and checked before any process group starts, then
loaded one at a time into a model built for the evaluation's parallel layout."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointError, CheckpointMeta
from bam_megatron.errors import ConfigError
from bam_megatron.platform.distributed import ParallelSizes


@dataclass(frozen=True)
class EvalModel:
    """One ``--model NAME=CHECKPOINT``: its name in reports, iteration directory and saved meta."""

    name: str
    path: str
    meta: CheckpointMeta

    @property
    def training(self) -> dict[str, Any]:
        """The settings of the run that wrote the checkpoint (defaults for the evaluation)."""
        return self.meta.training

    @property
    def variant(self) -> str:
        return self.meta.architecture.variant

    @property
    def is_moe(self) -> bool:
        """True for bam, bam-shared-kv and btx: models with routers to analyse."""
        return self.meta.architecture.is_moe

    @property
    def has_soft_moa(self) -> bool:
        """True when attention is a soft mixture with its own router."""
        return self.meta.architecture.has_soft_moa

    @property
    def num_experts(self) -> int:
        """FFN experts (and attention experts for soft MoA); 0 for a dense model."""
        return self.meta.architecture.num_experts or 0


def parse_model_flag(text: str) -> tuple[str, str]:
    """argparse type of ``--model``: 'NAME=CHECKPOINT' -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT_DIR, got {text!r}")
    return name, path


def find_models(flags: Sequence[tuple[str, str]]) -> list[EvalModel]:
    """Resolve every ``--model`` and read its meta; names must be unique."""
    names = [name for name, _ in flags]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--model names must be unique; repeated: {', '.join(duplicates)}")
    models = []
    for name, path in flags:
        resolved = checkpoint.resolve_checkpoint(path)
        models.append(EvalModel(name, resolved, checkpoint.read_meta(resolved)))
    return models


def check_same_tokenizer(models: Sequence[EvalModel], given: Optional[Any] = None, flag: str = "") -> str:
    """Perplexities are comparable only over one tokenization: every model must have been trained
    with the first model's tokenizer (same fingerprint). Returns that fingerprint.

    A checkpoint that records no tokenizer (trained on token ids: Megatron-LM's NullTokenizer, or
    --mock-data) takes ``given``, the tokenizer ``flag`` names as the one that made its data, if its
    vocabulary fits the checkpoint's padded vocabulary.
    """
    fingerprints = []
    for model in models:
        saved = model.meta.tokenizer_fingerprint
        if saved is None:
            if given is None:
                raise CheckpointError(
                    f"model {model.name} ({model.path}) records no tokenizer (it was trained on token ids: "
                    "Megatron-LM's NullTokenizer, --mock-data, or a tokenizer not found here); "
                    "give --tokenizer-model, the tokenizer that made its data"
                )
            padded = model.meta.architecture.padded_vocab_size
            if given.vocab_size > padded:
                raise ConfigError(
                    f"{flag} has {given.vocab_size} tokens, more than the {padded} rows of model {model.name}'s "
                    f"padded vocabulary ({model.path})"
                )
            saved = given.fingerprint
        if fingerprints and saved != fingerprints[0]:
            raise CheckpointError(
                f"model {model.name} ({model.path}) was trained with another tokenizer than "
                f"model {models[0].name}; all models must share one tokenizer"
            )
        fingerprints.append(saved)
    return fingerprints[0]


def load_model(model: EvalModel, sizes: ParallelSizes, seq_length: int) -> torch.nn.Module:
    """This rank's part of ``model`` under ``sizes``, weights loaded (resharded), in eval mode, fp32.

    Call after ``initialize(sizes)``. Dropout is off; a bf16-trained checkpoint is evaluated in fp32.
    """
    try:
        return checkpoint.load_model(
            model.path, model.meta, sizes.tensor, sizes.pipeline, sizes.expert, sizes.sequence_parallel, seq_length
        )
    except ConfigError as error:
        raise ConfigError(f"model {model.name}: {error}") from None
