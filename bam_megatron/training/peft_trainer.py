"""pretrain_bam.py with ``--peft``: the training loop of `bam_megatron.training.loop`, with adapters
(from `bam_megatron.peft`).

`PeftTrainer` changes four things of `Trainer`: the model gets adapters and a frozen base before
DDP wraps it; the base weights come from ``--pretrained-checkpoint`` (or a full checkpoint in
``--load``); checkpoints hold only the adapters (`bam_megatron.peft.checkpoint`); and the run
starts by printing the trainable parameters.
"""

from __future__ import annotations

import torch

from bam_megatron import checkpoint
from bam_megatron.checkpoint import CheckpointMeta
from bam_megatron.peft import checkpoint as peft_checkpoint
from bam_megatron.peft.apply import apply_peft
from bam_megatron.peft.config import PeftConfig
from bam_megatron.training.loop import Trainer, _say


def trainable_summary(trainable: int, total: int) -> str:
    """'trainable params: N (x.xx% of M)'."""
    return f"trainable params: {trainable:,} ({100.0 * trainable / total:.2f}% of {total:,})"


class PeftTrainer(Trainer):
    """A MoV / MoLoRA fine-tuning run (``--peft``)."""

    def __init__(self, args) -> None:
        self.peft = PeftConfig.from_args(args)
        super().__init__(args)

    def _build_model(self) -> torch.nn.Module:
        return apply_peft(super()._build_model(), self.peft)

    def _find_checkpoint(self):
        """The base checkpoint (weights only) drives the architecture checks and vocab padding."""
        self.found = peft_checkpoint.find_checkpoints(self.args.load, self.args.pretrained_checkpoint)
        if self.found.base is None and self.found.adapters is None:
            _say(
                f"--peft {self.peft.method}: no base checkpoint (--pretrained-checkpoint): adapting a randomly "
                "initialised model"
            )
        self.weights_only = True
        meta = self.found.base_meta if self.found.base is not None else self.found.adapters_meta
        return self.found.base or self.found.adapters, meta

    def _resume(self) -> None:
        found, args = self.found, self.args
        if found.base is not None:
            self.weights_only = True
            self._check_compatible(found.base, found.base_meta)
            checkpoint.load_checkpoint(found.base, peft_checkpoint.base_of(self.model), load_rng=False)
            _say(f"loaded the base model from {found.base}")
        if found.adapters is None:
            return
        self.weights_only = args.finetune
        self._check_compatible(found.adapters, found.adapters_meta)
        peft_checkpoint.check_same_adapters(found.adapters, found.adapters_meta.peft, self.peft.to_dict())
        adapters = peft_checkpoint.adapters_of(self.model)
        if args.finetune:
            checkpoint.load_checkpoint(found.adapters, adapters, load_rng=False)
            _say(f"loaded adapters from {found.adapters} (optimizer, schedule and iteration start afresh)")
            return
        checkpoint.load_checkpoint(
            found.adapters, adapters, self.optimizer, self.scheduler, load_rng=not args.no_load_rng
        )
        p = self._restore_progress(found.adapters_meta)
        _say(
            f"resumed adapters from {found.adapters} at iteration {p.iteration} ({p.consumed_samples} samples consumed)"
        )

    def _meta(self) -> CheckpointMeta:
        meta = super()._meta()
        meta.peft = peft_checkpoint.peft_meta(self.peft.to_dict(), self.found.base)
        return meta

    def save(self) -> None:
        """Save the adapters (and their optimizer state) under --save."""
        if self.args.save:
            path = checkpoint.save_checkpoint(
                self.args.save,
                self.progress.iteration,
                peft_checkpoint.adapters_of(self.model),
                self.optimizer,
                self.scheduler,
                self._meta(),
            )
            _say(f"saved adapters {path}")

    def run(self) -> int:
        """Report the trainable parameters, then train."""
        _say(
            f"--peft {self.peft.method} ({self.peft.num_experts} experts"
            f"{f', rank {self.peft.rank}, alpha {self.peft.alpha:g}' if self.peft.method == 'molora' else ''}): "
            f"{trainable_summary(self.trainable, self.total)}"
        )
        return super().run()
