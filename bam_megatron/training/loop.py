"""The training loop of pretrain_bam.py on megatron-core.

megatron-core supplies the pieces (GPTModel, pipeline schedules, DDP, the (distributed) optimizer,
OptimizerParamScheduler, dist_checkpointing); this module wires them in the order a run needs:
set-up and checks, resume, then per iteration one global batch through
``get_forward_backward_func``, a NaN/Inf guard, the optimizer step, and reports, evaluation,
checkpoints and preemption at their intervals.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from bam_megatron import checkpoint
from bam_megatron.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    SavedLayout,
    check_same_architecture,
    layout,
    lineage,
)
from bam_megatron.checkpoint.meta import MEGATRON_LM
from bam_megatron.data.datasets import TokenIds, build_datasets, build_mock_datasets, data_fingerprint, parse_data_path
from bam_megatron.data.tokenizer import load_tokenizer
from bam_megatron.errors import ConfigError
from bam_megatron.model import router_ramp
from bam_megatron.model.architecture import ARCHITECTURE_FIELDS, Architecture, padded_vocab_size, resolve_architecture
from bam_megatron.model.builder import build_from_architecture
from bam_megatron.model.moe_metrics import moe_aux_losses
from bam_megatron.model.statistics import training_flops_per_token
from bam_megatron.platform import faults
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.training import freezing
from bam_megatron.training.arguments import DEFAULT_SEQ_LENGTH, given_architecture
from bam_megatron.training.batches import MicroBatches, fixed_batches
from bam_megatron.training.checkpointer import Checkpointer
from bam_megatron.training.metrics import MetricsWriter

EXIT_PREEMPTED = 3
EXIT_TOO_MANY_NAN = 4


@dataclass
class Progress:
    """Counters that a checkpoint restores."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    consecutive_skips: int = 0
    preempted: bool = False
    router_loss_sums: dict = field(default_factory=dict)


class _Preemption:
    """SIGTERM / SIGUSR1 (Slurm's --signal) set a flag; the loop saves after the current step."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def model_settings(args) -> dict[str, Any]:
    """The TransformerConfig fields a training run sets besides the architecture: its parallel
    layout, regularisation, recompute, dtype and router loss coefficients."""
    settings: dict[str, Any] = dict(
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if args.bf16:
        settings.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    return settings


def freeze(model: torch.nn.Module, args) -> tuple[int, int]:
    """Apply --freeze-parameters / --train-only-parameters; return (trainable, total) counts."""
    for name, param in model.named_parameters():
        if args.train_only_parameters:
            param.requires_grad = any(re.search(p, name) for p in args.train_only_parameters)
        elif args.freeze_parameters:
            param.requires_grad = not any(re.search(p, name) for p in args.freeze_parameters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ConfigError("--freeze-parameters/--train-only-parameters left no parameter to train")
    return trainable, total


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_mask = loss_mask.view(-1).float()
    loss = (per_token_loss.view(-1).float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    # clone: megatron-core's schedule divides the returned loss in place by the micro-batch count
    return loss, {"lm loss": loss.detach().clone()}


def _device() -> torch.device:
    """Where tensors for collectives and batches go: the GPU of this rank (the CPU in CPU mode)."""
    return torch.device(torch.cuda.current_device())


def _forward_step(data_iterator, model):
    batch = {key: value.to(_device(), non_blocking=True) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, lambda out: _loss_func(batch["loss_mask"], out)


def _is_logging_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _mean_loss(losses: list[dict]) -> Optional[torch.Tensor]:
    """Mean loss over micro-batches and data-parallel ranks (last pipeline stage), else None."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    loss = torch.stack([d["lm loss"] for d in losses]).mean().clone()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss / parallel_state.get_data_parallel_world_size()


def _all_finite(loss: Optional[torch.Tensor], model: torch.nn.Module) -> bool:
    """True when the loss and every gradient are finite, on every rank."""
    bad = loss is not None and not bool(torch.isfinite(loss))
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is not None and not bad:
            bad = not bool(torch.isfinite(grad).all())
    flag = torch.tensor([1 if bad else 0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


class Trainer:
    """One training run: everything set up from the flags, then `run()`."""

    def __init__(self, args) -> None:
        self.args = args
        sizes = ParallelSizes.from_args(args)
        initialize(sizes, seed=args.seed)
        dp = parallel_state.get_data_parallel_world_size()
        args.global_batch_size = args.global_batch_size or args.micro_batch_size * dp
        if args.global_batch_size % (args.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {args.global_batch_size} is not a multiple of "
                f"--micro-batch-size x data-parallel size ({args.micro_batch_size} x {dp})"
            )
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
        if args.train_iters is None:
            args.train_iters = math.ceil(args.train_samples / args.global_batch_size)
        if args.min_lr is None:
            args.min_lr = 0.1 * args.lr  # cosine decay to 10% of peak (the paper's recipe)

        self.tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type) if args.tokenizer_model else None
        self.checkpoint, self.checkpoint_meta = self._find_checkpoint()
        self.architecture = self._resolve_architecture()
        meta = self.checkpoint_meta
        self.lineage = lineage.started_from(self.checkpoint, meta, self.weights_only) if meta else {}
        if meta and self.weights_only:  # this run counts from 0: a new-expert ramp goes on where meta left it
            self.lineage = router_ramp.restarted_lineage(self.lineage, meta.iteration)
        self._ramp_said: Optional[float] = None  # the last router offset reported (`_ramp_routers`)
        if args.seq_length is None:
            args.seq_length = self.checkpoint_meta.seq_length if self.checkpoint_meta else DEFAULT_SEQ_LENGTH
        settings = model_settings(args)
        if self.architecture.is_moe:
            settings.update(moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff)
        self.config = self.architecture.model_config(**settings)
        self._build_data(dp)

        model = self._build_model()
        if args.bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(self.config, model)
        self.trainable, self.total = freeze(model, args)
        self._freeze_old_experts(model)
        self.model = model
        self.ddp = DistributedDataParallel(
            self.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer
            ),
            model,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=args.optimizer,
                lr=args.lr,
                min_lr=args.min_lr,
                weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1,
                adam_beta2=args.adam_beta2,
                adam_eps=args.adam_eps,
                clip_grad=args.clip_grad,
                bf16=args.bf16,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            [self.ddp],
            config_overrides=freezing.no_weight_decay_on_frozen() if args.freeze_old_experts else None,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=args.lr_decay_iters or args.train_iters,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters,
            wd_incr_style="constant",
        )
        self.progress = Progress()
        self._resume()
        self.checkpointer = Checkpointer(args.save, args.save_interval, self.save)
        self.batches = MicroBatches(
            self.train_ds,
            args.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            dp,
            self.progress.consumed_samples,
        )
        metrics_file = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
        self.writer = MetricsWriter(args.tensorboard_dir, metrics_file) if _is_logging_rank() else None
        self.flops_per_token = training_flops_per_token(self.config, args.seq_length)

    # ---------------------------------------------------------------------------------------
    def _resolve_architecture(self) -> Architecture:
        """The model's architecture: the starting checkpoint's, else the flags' (see resolve_architecture)."""
        args, meta = self.args, self.checkpoint_meta
        raw_vocab = self.tokenizer.vocab_size if self.tokenizer else args.vocab_size
        tp = args.tensor_model_parallel_size
        padded = padded_vocab_size(raw_vocab, args.make_vocab_size_divisible_by, tp) if raw_vocab else None
        architecture = resolve_architecture(
            given_architecture(args), args.preset, meta.architecture if meta else None, self.checkpoint, padded
        )
        if raw_vocab is not None and raw_vocab > architecture.padded_vocab_size:
            raise CheckpointError(
                f"the vocabulary has {raw_vocab} tokens, but checkpoint {self.checkpoint} has only "
                f"{architecture.padded_vocab_size} embedding rows"
            )
        architecture.check_layout(tp, args.pipeline_model_parallel_size, args.expert_model_parallel_size)
        return architecture

    def _build_model(self) -> torch.nn.Module:
        """This rank's model, before bf16 wrapping and freezing (PeftTrainer adds adapters here)."""
        return build_from_architecture(self.architecture, self.config, self.args.seq_length)

    def _freeze_old_experts(self, model: torch.nn.Module) -> None:
        """--freeze-old-experts: mask the gradients of the experts the mixture had before it grew."""
        if not self.args.freeze_old_experts:
            return
        meta = self.checkpoint_meta
        old = lineage.experts_before_last_growth(meta) if meta else None
        if old is None:
            raise ConfigError(
                f"--freeze-old-experts: checkpoint {self.checkpoint} is not a mixture grown by bam-upcycle --extend"
                if meta
                else "--freeze-old-experts needs --pretrained-checkpoint or --load of a grown mixture"
            )
        frozen = freezing.freeze_experts(model, self.config, old)
        names = lineage.expert_names(meta)
        _say(f"froze experts {', '.join(names[i] for i in old)} ({frozen:,} weights on this rank)")

    def _build_data(self, dp: int) -> None:
        args = self.args
        train_samples = args.train_iters * args.global_batch_size
        valid_samples = max(1, args.eval_iters) * args.micro_batch_size * dp
        tok = self.tokenizer
        tokens = TokenIds.of(tok) if tok else TokenIds(0, 1, args.vocab_size)
        if args.mock_data:
            self.domains = []
            self.train_ds, self.valid_ds = build_mock_datasets(
                args.seq_length, args.seed, train_samples, valid_samples, tokens
            )
            self.data_fingerprint = f"mock:{args.seq_length}:{args.seed}"
        elif args.instruct_data_path:  # prompt/response pairs, loss on the response (docs/peft.md)
            from bam_megatron.data.instruct import build_instruct_datasets

            self.domains = []
            self.train_ds, self.valid_ds, self.data_fingerprint, summary = build_instruct_datasets(
                args.instruct_data_path,
                args.instruct_valid_path,
                tok,
                args.seq_length,
                args.seed,
                train_samples,
                args.instruct_prompt_key,
                args.instruct_response_key,
            )
            _say(summary)
        else:
            self.domains = parse_data_path(args.data_path)
            self.train_ds, self.valid_ds = build_datasets(
                self.domains,
                args.split,
                args.seq_length,
                args.seed,
                train_samples,
                valid_samples,
                tokens,
                args.data_cache_path or os.path.join(os.path.dirname(self.domains[0].prefix), "cache"),
            )
            self.data_fingerprint = data_fingerprint(self.domains, args.split, args.seq_length, args.seed)
            if not self.valid_ds and args.eval_iters > 0:
                _say(f"--split {args.split} leaves no validation data: validation is skipped (as with --eval-iters 0)")

    def _meta(self) -> CheckpointMeta:
        """What a checkpoint of this run records besides its tensors (store.save_checkpoint adds the rest)."""
        p, args = self.progress, self.args
        return CheckpointMeta(
            architecture=self.architecture,
            seq_length=args.seq_length,
            layout=SavedLayout(distributed_optimizer=args.use_distributed_optimizer),
            consumed_samples=p.consumed_samples,
            skipped_iterations=p.skipped_iterations,
            nan_iterations=p.nan_iterations,
            tokenizer_fingerprint=self.tokenizer.fingerprint if self.tokenizer else None,
            tokenizer_model=os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None,
            tokenizer_type=self.tokenizer.tokenizer_type if self.tokenizer else None,
            data_fingerprint=self.data_fingerprint,
            lineage=self.lineage,
            training={k: v for k, v in vars(args).items() if k not in ARCHITECTURE_FIELDS},
        )

    def _find_checkpoint(self) -> tuple[Optional[str], Optional[CheckpointMeta]]:
        """The checkpoint to start from and its meta, or (None, None); sets ``self.weights_only``.

        --load's latest checkpoint resumes the run (weights only with --finetune). When --load
        holds none yet, --pretrained-checkpoint's weights initialise the model: so every phase
        can always pass both, and a restarted job resumes its own checkpoints.
        """
        args = self.args
        self.weights_only = args.finetune
        if args.load and layout.is_checkpoint(args.load):  # an iter_* directory itself
            path = checkpoint.resolve_checkpoint(args.load)
            return path, checkpoint.read_meta(path)
        if args.load:
            iteration = layout.latest_iteration(args.load) if os.path.isdir(args.load) else None
            if iteration is None:
                saved = layout.saved_iterations(args.load)
                if saved:
                    raise CheckpointError(
                        f"--load {args.load} holds {', '.join(saved)} but no {layout.LATEST}: pass the "
                        "iter_* directory to resume from as --load"
                    )
            if iteration is not None:
                path = layout.checkpoint_path(args.load, iteration)
                return path, checkpoint.read_meta(path)
            if args.finetune and not args.pretrained_checkpoint:
                raise CheckpointError(f"--finetune: no checkpoint in {args.load}")
        if args.pretrained_checkpoint:
            path = checkpoint.resolve_checkpoint(args.pretrained_checkpoint)
            self.weights_only = True
            return path, checkpoint.read_meta(path)
        if args.load:
            _say(f"no checkpoint in {args.load}: starting from scratch")
        return None, None

    def _resume(self) -> None:
        args, path, meta = self.args, self.checkpoint, self.checkpoint_meta
        if path is None:
            return
        self._check_compatible(path, meta)
        if self.weights_only:
            checkpoint.load_checkpoint(path, self.model, load_rng=False)
            _say(f"loaded weights from {path} (optimizer, schedule and iteration start afresh)")
            return
        rng_restored = checkpoint.load_checkpoint(
            path, self.model, self.optimizer, self.scheduler, load_rng=not args.no_load_rng
        )
        p = self._restore_progress(meta)
        _say(
            f"resumed from {path} at iteration {p.iteration} ({p.consumed_samples} samples consumed"
            f"{'' if rng_restored else '; RNG states not restored: different parallel layout'})"
        )

    def _restore_progress(self, meta: CheckpointMeta) -> Progress:
        """Iteration, samples consumed and skip counts of a resumed checkpoint."""
        p = self.progress
        p.iteration, p.consumed_samples = meta.iteration, meta.consumed_samples
        p.skipped_iterations, p.nan_iterations = meta.skipped_iterations, meta.nan_iterations
        return p

    def _check_compatible(self, path: str, meta: CheckpointMeta) -> None:
        """Refuse a checkpoint this run cannot load: another architecture or tokenizer; to resume
        (not weights only), another optimizer, EP size or data."""
        check_same_architecture(meta.architecture, f"checkpoint {path}", self.architecture, "this run")
        foreign = meta.source == MEGATRON_LM
        if foreign and not self.weights_only:
            raise CheckpointError(
                f"checkpoint {path} was written by Megatron-LM: its weights load (--pretrained-checkpoint, or "
                "--finetune), its optimizer and schedule do not"
            )
        saved_dist_opt = meta.layout.distributed_optimizer
        if not self.weights_only and saved_dist_opt != self.args.use_distributed_optimizer:
            raise CheckpointError(
                f"checkpoint {path} was saved {'with' if saved_dist_opt else 'without'} "
                "--use-distributed-optimizer; resume with the same optimizer (or load weights only with --finetune)"
            )
        saved_ep = meta.layout.expert
        if not self.weights_only and saved_ep != self.args.expert_model_parallel_size:
            # megatron-core 0.16.1 groups expert parameters into their own optimizer only when EP > 1,
            # and cannot map optimizer state between the two structures.
            raise CheckpointError(
                f"checkpoint {path} was saved with --expert-model-parallel-size {saved_ep}: its optimizer "
                "state reshards across TP, PP and DP but not EP; keep that EP size, or load the weights "
                "only with --finetune"
            )
        ours = self.tokenizer.fingerprint if self.tokenizer else None
        if foreign and meta.tokenizer_fingerprint is None and ours is not None:
            _say(
                f"warning: checkpoint {path} was written by Megatron-LM with tokenizer {meta.tokenizer_model}, "
                f"which is not on this machine: --tokenizer-model {self.args.tokenizer_model} is taken on trust"
            )
        elif meta.tokenizer_fingerprint != ours:
            raise CheckpointError(
                f"checkpoint {path} was trained with another tokenizer than {self.args.tokenizer_model}"
            )
        if (
            not self.weights_only
            and not self.args.override_data_fingerprint
            and meta.data_fingerprint != self.data_fingerprint
        ):
            raise CheckpointError(
                f"checkpoint {path} was trained on another data configuration (--data-path, --split, "
                "--seq-length or --seed differ, or the files changed); pass --override-data-fingerprint "
                "to resume anyway"
            )

    # ---------------------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the current iteration under --save."""
        if self.args.save:
            path = checkpoint.save_checkpoint(
                self.args.save, self.progress.iteration, self.model, self.optimizer, self.scheduler, self._meta()
            )
            _say(f"saved checkpoint {path}")

    def _ramp_routers(self) -> None:
        """A grown mixture's new-expert router offsets at this iteration (`router_ramp`): a function
        of the iteration alone, so a resumed run sets the same ones."""
        offset = router_ramp.apply_ramp(
            self.model, self.lineage, self.progress.iteration, self.architecture.num_experts or 0
        )
        said = self._ramp_said
        exact = said == -router_ramp.EXACT_OFFSET
        if offset is not None and (said is None or exact or (offset == 0) != (said == 0)):  # step 0, 1 and the end
            _say(f"iteration {self.progress.iteration}: the new experts' router offset is {offset:g}")
            self._ramp_said = offset

    def _train_step(self) -> tuple[Optional[float], Optional[float], bool]:
        self._ramp_routers()
        batches = self.batches.next_global_batch(self.num_microbatches)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(batches),
            model=[self.ddp],
            num_microbatches=self.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=False,
        )
        loss = _mean_loss(losses)
        if loss is not None and faults.nan_loss_injected(self.progress.iteration + 1):
            loss = loss * float("nan")
        if not _all_finite(loss, self.model):
            return None if loss is None else loss.item(), None, False
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return None if loss is None else loss.item(), grad_norm, ok

    def evaluate(self) -> dict[str, float]:
        """Mean validation loss of every domain (forward only, fixed samples)."""
        self._ramp_routers()
        losses = {}
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        for name, dataset in self.valid_ds.items():
            batches = fixed_batches(dataset, self.args.micro_batch_size, dp_rank, dp, self.args.eval_iters)
            out = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iter(batches),
                model=[self.ddp],
                num_microbatches=len(batches),
                seq_length=self.args.seq_length,
                micro_batch_size=self.args.micro_batch_size,
                forward_only=True,
            )
            loss = _mean_loss(out)
            if loss is not None:
                losses[name] = loss.item()
        moe_aux_losses(reduce_across_ranks=False)  # evaluation does not count toward training logs
        return losses

    def run(self) -> int:
        """Train to --train-iters; return the process exit code."""
        args, p = self.args, self.progress
        pct = 100.0 * self.trainable / self.total
        _say(
            f"{self.architecture.variant} model: {self.total:,} parameters on rank 0, "
            f"{self.trainable:,} trainable ({pct:.1f}%); "
            f"{self.num_microbatches} micro-batches x {args.micro_batch_size} per data-parallel rank"
        )
        if p.iteration >= args.train_iters:
            _say(
                f"resumed at iteration {p.iteration}, and --train-iters is {args.train_iters}: the run is "
                "finished, nothing to do"
            )
            return 0
        preemption = _Preemption() if args.exit_signal_handler else None
        interval_start, interval_iters = time.perf_counter(), 0
        while p.iteration < args.train_iters:
            loss, grad_norm, stepped = self._train_step()
            p.iteration += 1
            p.consumed_samples += args.global_batch_size
            interval_iters += 1
            if not stepped:
                p.skipped_iterations += 1
                p.nan_iterations += 1
                p.consecutive_skips += 1
                _say(
                    f" iteration {p.iteration}: NaN/Inf loss or gradient, update skipped "
                    f"({p.consecutive_skips} in a row)"
                )
                if p.consecutive_skips >= args.max_skipped_iterations:
                    _say(
                        f"stopping: {p.consecutive_skips} consecutive iterations with NaN/Inf "
                        f"(--max-skipped-iterations {args.max_skipped_iterations})"
                    )
                    return EXIT_TOO_MANY_NAN
            else:
                p.consecutive_skips = 0
            router = moe_aux_losses()
            for name, per_layer in router.items():
                p.router_loss_sums[name] = p.router_loss_sums.get(name, 0.0) + sum(per_layer) / len(per_layer)
            if p.iteration % args.log_interval == 0:
                elapsed = time.perf_counter() - interval_start
                self._log(loss, grad_norm, elapsed / interval_iters, interval_iters, router)
                interval_start, interval_iters = time.perf_counter(), 0
            if args.eval_iters > 0 and self.valid_ds and p.iteration % args.eval_interval == 0:
                losses = self.evaluate()
                if self.writer is not None:
                    self.writer.validation(p.iteration, losses)
                interval_start = time.perf_counter()  # iteration times exclude evaluation
            if self.checkpointer.step(p.iteration):
                interval_start = time.perf_counter()
            if args.exit_interval and p.iteration % args.exit_interval == 0 and p.iteration < args.train_iters:
                _say(f"--exit-interval {args.exit_interval}: stopping at iteration {p.iteration}")
                self.checkpointer.step(p.iteration, last_step=True)
                return 0
            if preemption is not None and preemption.any_rank():
                _say(f"preemption signal received: saving at iteration {p.iteration} and exiting")
                self.checkpointer.step(p.iteration, last_step=True)
                return EXIT_PREEMPTED
        self.checkpointer.step(p.iteration, last_step=True)
        if self.writer is not None:
            self.writer.close()
        return 0

    def _log(self, loss, grad_norm, seconds_per_iter: float, iters: int, router_last: dict) -> None:
        p, args = self.progress, self.args
        if self.writer is None:
            p.router_loss_sums = {}
            return
        tokens = args.global_batch_size * args.seq_length
        self.writer.training(
            {
                "iteration": p.iteration,
                "train_iters": args.train_iters,
                "consumed_samples": p.consumed_samples,
                "ms_per_iteration": seconds_per_iter * 1e3,
                "tokens_per_second": tokens / seconds_per_iter,
                "tflops_per_device": self.flops_per_token * tokens / seconds_per_iter / dist.get_world_size() / 1e12,
                "learning_rate": self.optimizer.param_groups[0]["lr"],
                "global_batch_size": args.global_batch_size,
                "lm_loss": loss,
                "grad_norm": grad_norm,
                "router_losses": {k: v / iters for k, v in p.router_loss_sums.items()},
                "router_losses_per_layer": router_last,
                "skipped_iterations": p.skipped_iterations,
                "nan_iterations": p.nan_iterations,
            }
        )
        p.router_loss_sums = {}
