"""Tiny CPU demo: a few training steps of a small megatron-core GPT on gloo ranks.

    torchrun --standalone --nproc-per-node 2 examples/demo_cpu.py [--tensor-model-parallel-size 2]

Runs megatron-core's real stack (GPTModel, 1F1B/no-pipelining schedules, DDP, distributed
optimizer) on CPU through `bam_megatron.platform.cpu_mode`. The data is a synthetic language
with structure (a fixed successor for every token), so the loss visibly falls.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import bam_megatron  # noqa: F401  (first: quiets megatron-core's import-time warnings)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-micro-batches", type=int, default=2)
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def markov_batch(args, successor: torch.Tensor, generator: torch.Generator):
    """A toy language: each token is followed by its fixed successor 90% of the time.

    Learnable in a few dozen steps (the loss floor is about 0.5 nats, against ln(vocab) at the
    start), so the printed loss visibly falls.
    """
    rows, length = args.micro_batch_size, args.seq_length + 1
    seq = torch.empty(rows, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, args.vocab_size, (rows,), generator=generator)
    noise = torch.randint(0, args.vocab_size, (rows, length), generator=generator)
    keep = torch.rand(rows, length, generator=generator) < 0.9
    for i in range(1, length):
        seq[:, i] = torch.where(keep[:, i], successor[seq[:, i - 1]], noise[:, i])
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def main() -> None:
    args = parse_args()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from bam_megatron.model.gpt import build_gpt, local_gpt_layer_spec
    from bam_megatron.platform import cpu_mode, distributed

    sizes = distributed.ParallelSizes(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size
    )
    distributed.initialize(sizes, seed=args.seed)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        world = torch.distributed.get_world_size()
        print(
            f"world size {world} (TP={sizes.tensor}, PP={sizes.pipeline}, "
            f"DP={parallel_state.get_data_parallel_world_size()}), "
            f"backend {torch.distributed.get_backend()}, CPU mode {cpu_mode.is_active()}",
            flush=True,
        )

    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * args.hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        pipeline_dtype=torch.float32,
        bias_activation_fusion=False,
    )
    model = build_gpt(config, local_gpt_layer_spec(), args.vocab_size, args.seq_length)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp],
    )
    successor = torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(args.seed))
    data_gen = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None, labels=labels)
        return output, lambda loss: (loss.mean(), {"lm loss": loss.mean().detach()})

    forward_backward = get_forward_backward_func()
    for iteration in range(1, args.train_iters + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        ddp.zero_grad_buffer()
        batches = [markov_batch(args, successor, data_gen) for _ in range(args.num_micro_batches)]
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=args.num_micro_batches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        if (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        ):
            loss = torch.stack([d["lm loss"] for d in losses]).mean().item()
            ms = (time.perf_counter() - start) * 1e3
            print(
                f" iteration {iteration:4d}/{args.train_iters} | lm loss {loss:.4f} | "
                f"grad norm {grad_norm:.3f} | {ms:.1f} ms/iter",
                flush=True,
            )
    distributed.destroy()


if __name__ == "__main__":
    main()
