"""Command-line flags of pretrain_bam.py, with Megatron-LM's names where one exists."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from bam_megatron.data.tokenizer import TOKENIZER_TYPES
from bam_megatron.errors import ConfigError
from bam_megatron.model.architecture import ARCHITECTURE_FLAGS, add_architecture_flags, check_bounds
from bam_megatron.model.moe_defaults import MOE_TRAINING_DEFAULTS
from bam_megatron.model.variants import PRESETS
from bam_megatron.platform.distributed import ParallelSizes

DEFAULT_SEQ_LENGTH = 256


def build_parser() -> argparse.ArgumentParser:
    """The grouped parser; every flag documented."""
    p = argparse.ArgumentParser(
        prog="pretrain_bam.py",
        description="Train a dense, BAM, BAM shared-KV or BTX model on megatron-core "
        "(phase 1 seed, phase 2 dense experts, phase 3 mixture). Launch with torchrun or srun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        fromfile_prefix_chars="@",  # pretrain_bam.py @phase2.args: flags one per line (tools/branch.py)
    )
    g = p.add_argument_group(
        "model architecture",
        "With a checkpoint to start from (--load, --pretrained-checkpoint) the architecture is the "
        "checkpoint's: these flags may be left out, and one that contradicts it is an error. "
        "Without one, the flags, then --preset, then the defaults named below decide.",
    )
    add_architecture_flags(g, ["variant"])
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="architecture sizes; flags below override")
    add_architecture_flags(g, [name for name in ARCHITECTURE_FLAGS if name != "variant"])
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=None, help="only without --tokenizer-model (mock data)")

    g = p.add_argument_group("model training settings")
    g.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help=f"default: the checkpoint's, else {DEFAULT_SEQ_LENGTH}",
    )
    g.add_argument(
        "--moe-aux-loss-coeff",
        type=float,
        default=MOE_TRAINING_DEFAULTS["moe_aux_loss_coeff"],
        help="Switch load-balancing loss",
    )
    g.add_argument(
        "--moe-z-loss-coeff", type=float, default=MOE_TRAINING_DEFAULTS["moe_z_loss_coeff"], help="router z-loss"
    )
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)

    g = p.add_argument_group("parallelism")
    ParallelSizes.add_flags(g)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="PREFIX... or W1 PREFIX1 W2 PREFIX2 ...: weighted domain mixture (Megatron syntax)",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of each corpus")
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece model (tools/train_tokenizer.py) or Hugging Face tokenizer directory (tokenizer.json)",
    )
    g.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=None,
        help="Megatron-LM's name of the tokenizer kind; default: from --tokenizer-model (a directory is "
        "HuggingFaceTokenizer, a file SentencePieceTokenizer)",
    )
    g.add_argument("--mock-data", action="store_true", help="random tokens, no files (smoke tests)")
    g.add_argument("--data-cache-path", default=None, help="where dataset index caches go (default: next to the data)")
    g.add_argument(
        "--instruct-data-path",
        default=None,
        help="instruction tuning instead of --data-path: JSONL of prompt/response pairs, loss on the "
        "response tokens only, padded to --seq-length (docs/peft.md)",
    )
    g.add_argument("--instruct-valid-path", default=None, help="held-out JSONL pairs for the validation loss")
    g.add_argument("--instruct-prompt-key", default="prompt", help="JSON key of the prompt")
    g.add_argument("--instruct-response-key", default="response", help="JSON key of the response")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="stop (after saving, with --save) once the iteration is a multiple of this",
    )
    g.add_argument(
        "--max-skipped-iterations",
        type=int,
        default=10,
        help="stop after this many consecutive iterations with a NaN/Inf loss or grad norm",
    )
    g.add_argument(
        "--freeze-parameters",
        nargs="+",
        default=[],
        metavar="REGEX",
        help="freeze parameters whose name matches any REGEX",
    )
    g.add_argument(
        "--train-only-parameters",
        nargs="+",
        default=[],
        metavar="REGEX",
        help="freeze everything except parameters matching a REGEX (e.g. 'router')",
    )
    g.add_argument(
        "--freeze-old-experts",
        action="store_true",
        help="for a mixture grown by bam-upcycle --extend: freeze the attention and FFN experts it had "
        "before (their weights stay exactly as loaded) and train the new experts, the routers and "
        "everything shared; parameters holding frozen slices get no weight decay (docs/phases.md)",
    )

    g = p.add_argument_group(
        "PEFT",
        "parameter-efficient MoE fine-tuning (docs/peft.md): freeze the base model, "
        "train adapters and their routers only, save adapter-only checkpoints",
    )
    g.add_argument(
        "--peft",
        choices=("mov", "molora"),
        default=None,
        help="mov: mixture of (IA)3 vectors on K, V and the FFN activation; molora: mixture of LoRA "
        "adapters on Q/K/V, O and both FFN projections",
    )
    g.add_argument(
        "--peft-num-experts", type=int, default=10, help="adapter experts per adapted module (1: plain (IA)3 / LoRA)"
    )
    g.add_argument("--lora-rank", type=int, default=4, help="MoLoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="MoLoRA scaling: updates are scaled by alpha / r")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam is AdamW (decoupled wd)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=None, help="default: 10%% of --lr (the paper's recipe)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (GPU)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint here")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument(
        "--finetune", action="store_true", help="load model weights only: new optimizer, scheduler, iteration 0"
    )
    g.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="when --load holds no checkpoint yet, start from these weights (a --save directory "
        "or an iter_* directory): the seed for phase 2, the upcycled model for phase 3",
    )
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument(
        "--override-data-fingerprint",
        action="store_true",
        help="resume even though the data configuration differs from the checkpoint's",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument(
        "--metrics-file", default=None, help="JSONL, one record per log interval (default: SAVE/metrics.jsonl)"
    )
    g.add_argument(
        "--exit-signal-handler",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on SIGTERM/SIGUSR1 finish the step, save and exit with code 3",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check flags; a bad combination exits with a one-line message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ConfigError as error:
        parser.error(str(error))
    return args


def validate(args: argparse.Namespace) -> None:
    """Checks that need no process group (the rest happen once the world size is known)."""
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give exactly one of --train-iters and --train-samples")
    if args.data_path is None and not args.mock_data and args.instruct_data_path is None:
        raise ConfigError("--data-path is required (or --mock-data, or --instruct-data-path)")
    if args.data_path is not None and args.tokenizer_model is None:
        raise ConfigError("--data-path needs --tokenizer-model")
    if args.instruct_data_path is not None and (args.tokenizer_model is None or args.data_path or args.mock_data):
        raise ConfigError("--instruct-data-path needs --tokenizer-model and replaces --data-path / --mock-data")
    if args.peft and (args.freeze_parameters or args.train_only_parameters or args.freeze_old_experts):
        raise ConfigError(
            "--peft freezes the base model itself: drop --freeze-parameters, --train-only-parameters "
            "and --freeze-old-experts"
        )
    if args.mock_data and args.tokenizer_model is None and args.vocab_size is None:
        raise ConfigError("--mock-data needs --vocab-size or --tokenizer-model")
    _check_ranges(args)
    if args.finetune and args.load is None:
        raise ConfigError("--finetune needs --load")
    if args.save_interval is not None and args.save is None:
        raise ConfigError("--save-interval needs --save")
    if args.freeze_parameters and args.train_only_parameters:
        raise ConfigError("use either --freeze-parameters or --train-only-parameters, not both")


# Flags with a lower bound: a value below it names the flag (not a bare assertion deep in megatron-core).
# The architecture flags' bounds are their fields' (`check_bounds`).
_AT_LEAST_ONE = (
    "train_iters",
    "train_samples",
    "seq_length",
    "vocab_size",
    "micro_batch_size",
    "global_batch_size",
    "log_interval",
    "eval_interval",
    "save_interval",
    "exit_interval",
    "lr_decay_iters",
    "max_skipped_iterations",
    "make_vocab_size_divisible_by",
    "peft_num_experts",
    "lora_rank",
)
_AT_LEAST_ZERO = ("eval_iters", "lr_warmup_iters", "lr", "min_lr", "weight_decay", "clip_grad", "init_method_std")
_PROBABILITIES = ("hidden_dropout", "attention_dropout")


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag within its range, and --save/--load/--pretrained-checkpoint not naming a file."""
    check_bounds(given_architecture(args))  # the ranges the architecture fields declare
    for flag in _AT_LEAST_ONE:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in _AT_LEAST_ZERO:
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    for flag in _PROBABILITIES:
        value = getattr(args, flag)
        if not 0 <= value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    for flag in ("save", "load", "pretrained_checkpoint", "tensorboard_dir", "data_cache_path"):
        path = getattr(args, flag, None)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path} is a file, not a directory")


def given_architecture(args: argparse.Namespace) -> dict:
    """The architecture fields set on the command line (None where a flag was not given)."""
    return {name: getattr(args, name, None) for name in ARCHITECTURE_FLAGS}


def as_flags(values: Mapping[str, Any]) -> list[str]:
    """The pretrain_bam.py flags that set ``values`` (flag dest -> value), defaults left out.

    What tools write into argparse @files (bam-branch's phase2.args). Keys that are not flags of
    this parser (settings a checkpoint of an older version recorded) are left out.
    """
    # argparse has no public listing of a parser's flags; this module owns the parser it reads.
    actions = {action.dest: action for action in build_parser()._actions if action.option_strings}
    flags: list[str] = []
    for key, action in actions.items():  # in the parser's order
        if key not in values:
            continue
        value = values[key]
        if value is None or value == action.default or value == []:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true / BooleanOptionalAction
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags
