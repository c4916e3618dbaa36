"""bam-generate: continue prompts with any checkpoint (dense, BTX, BAM, BAM shared-KV), KV-cached.

    bam-generate --load runs/bam --prompt "def main(" --max-new-tokens 32
    bam-generate --load runs/bam --prompt-tokens 5,17,9 --temperature 0.8 --top-p 0.9 --seed 7 --json
    torchrun --nproc-per-node 2 tools/generate.py --load runs/bam --prompt "..." --tensor-model-parallel-size 2

Any layout the checkpoint was saved at loads under any tensor-parallel size that divides its heads
(megatron-core reshards on load). Text prompts are encoded with the checkpoint's tokenizer.
Everything that can be checked before a process group starts (the checkpoint, the tokenizer, the
prompts, the flags) is checked first; bad input is one line ``bam-generate: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from bam_megatron.errors import ConfigError, run_tool
from bam_megatron.platform.distributed import ParallelSizes

PROG = "bam-generate"


def _token_list(text: str) -> list[int]:
    """argparse type of ``--prompt-tokens``: '5,17,9' or '5 17 9' -> [5, 17, 9]."""
    try:
        return [int(piece) for piece in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids such as 5,17,9, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``bam-generate`` flags (Megatron-LM's names for the parallel layout)."""
    p = argparse.ArgumentParser(prog=PROG, description="Generate from a checkpoint with megatron-core's KV cache.")
    p.add_argument("--load", required=True, help="a --save directory (latest iteration) or an iter_* directory")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a text prompt (the checkpoint's tokenizer); repeat: a batch"
    )
    prompts.add_argument(
        "--prompt-tokens",
        action="append",
        type=_token_list,
        metavar="IDS",
        help="a prompt as token ids, e.g. 5,17,9; repeat for a batch",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    g = p.add_argument_group("sampling (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set reaching p (1: all)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the sampler")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the whole sequence every step (the reference)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop a prompt at the tokenizer's eos token")
    p.add_argument(
        "--tokenizer-model",
        default=None,
        help="the tokenizer (default: the one the checkpoint records; must be the one it was trained with)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings)")
    ParallelSizes.add_flags(p.add_argument_group("parallelism"))
    return p


@dataclass
class Plan:
    """What to generate, checked before any process group starts."""

    path: str
    meta: Any
    prompts: list[list[int]]
    tokenizer: Any
    eos_id: Optional[int]
    sampling: Any


def _tokenizer(args: argparse.Namespace, meta: Any, needed: bool) -> Any:
    """The checkpoint's tokenizer (or ``--tokenizer-model``, checked against its fingerprint); None
    when the checkpoint has none and none is ``needed``."""
    from bam_megatron.data.tokenizer import load_tokenizer

    path = args.tokenizer_model or meta.tokenizer_model
    if path is None or (args.tokenizer_model is None and not os.path.exists(path)):
        if needed:
            where = "records no tokenizer" if path is None else f"records the tokenizer {path}, which is missing"
            raise ConfigError(f"--prompt: checkpoint {args.load} {where}; pass --tokenizer-model or --prompt-tokens")
        return None
    tokenizer = load_tokenizer(path, meta.tokenizer_type if args.tokenizer_model is None else None)
    if meta.tokenizer_fingerprint is not None and tokenizer.fingerprint != meta.tokenizer_fingerprint:
        raise ConfigError(f"tokenizer {path} is not the one checkpoint {args.load} was trained with")
    return tokenizer


def prepare(args: argparse.Namespace) -> Plan:
    """Resolve the checkpoint, tokenizer and prompts and check every flag (no process group yet)."""
    from bam_megatron import checkpoint
    from bam_megatron.inference.generate import Sampling, check_prompts

    sizes = ParallelSizes.from_args(args)
    if sizes.pipeline > 1:
        raise ConfigError("--pipeline-model-parallel-size: bam-generate supports tensor (and expert) parallelism only")
    if sizes.sequence_parallel:
        raise ConfigError("--sequence-parallel: decoding one token at a time has no sequence to split")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    path = checkpoint.resolve_checkpoint(args.load)
    meta = checkpoint.read_meta(path)
    if meta.peft is not None:
        raise ConfigError(f"{path} holds {meta.peft['method']} adapters only; generate from the base checkpoint")
    tokenizer = _tokenizer(args, meta, needed=args.prompt is not None)
    prompts = [tokenizer.tokenize(text) for text in args.prompt] if args.prompt else args.prompt_tokens
    check_prompts(prompts, meta.architecture.padded_vocab_size)
    eos = None if tokenizer is None or args.ignore_eos or tokenizer.eos < 0 else tokenizer.eos
    return Plan(path, meta, prompts, tokenizer, eos, sampling)


def _start_distributed(args: argparse.Namespace, seed: int) -> ParallelSizes:
    """torch.distributed from torchrun/srun variables (a plain process: a world of one), then megatron-core."""
    from bam_megatron.platform.distributed import initialize

    sizes = ParallelSizes.from_args(args)
    try:
        initialize(sizes, seed=seed)
    except RuntimeError as error:  # megatron-core's own checks of the parallel sizes
        raise ConfigError(f"parallel sizes do not fit world size {dist.get_world_size()}: {error}") from None
    return sizes


def _text(tokenizer: Any, ids: list[int]) -> Optional[str]:
    if tokenizer is None:
        return None
    return tokenizer.detokenize([i for i in ids if i < tokenizer.vocab_size])  # padded rows have no text


def _run(args: argparse.Namespace) -> int:
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.inference.generate import generate

    plan = prepare(args)
    sizes = _start_distributed(args, plan.sampling.seed)
    model = load_model(plan.path, plan.meta, sizes.tensor, sizes.pipeline, sizes.expert)
    result = generate(
        model, plan.prompts, args.max_new_tokens, plan.sampling, use_kv_cache=not args.no_kv_cache, eos_id=plan.eos_id
    )
    if dist.get_rank() != 0:
        return 0
    if args.json:
        steps = result.step_seconds
        record = {
            "checkpoint": plan.path,
            "variant": plan.meta.architecture.variant,
            "kv_cache": not args.no_kv_cache,
            "prompt_tokens": plan.prompts,
            "tokens": result.tokens,
            "text": [_text(plan.tokenizer, ids) for ids in result.tokens] if plan.tokenizer else None,
            "prefill_seconds": result.prefill_seconds,
            "seconds_per_step": sum(steps) / len(steps) if steps else None,
            "kv_cache_bytes_per_rank": result.kv_cache_bytes,
        }
        print(json.dumps(record), flush=True)
    else:
        for prompt, ids in zip(plan.prompts, result.tokens):
            if plan.tokenizer is None:
                print(" ".join(map(str, ids)), flush=True)
            else:
                print(repr(_text(plan.tokenizer, prompt)) + " -> " + repr(_text(plan.tokenizer, ids)), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point (`bam-generate`, `tools/generate.py`); returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    import bam_megatron.checkpoint.models  # noqa: F401
    import bam_megatron.inference.generate  # noqa: F401

    started_here = not dist.is_initialized()
    try:
        return run_tool(
            PROG, lambda: _run(args), print_errors=lambda: not dist.is_initialized() or dist.get_rank() == 0
        )
    finally:
        if started_here and dist.is_initialized():
            from bam_megatron.platform.distributed import destroy

            destroy()
