"""Training runs for the tests: pretrain_bam.py launched as srun would, its flags for the tiny corpus,
its metrics, and the logits of a checkpoint under any parallel layout."""

from __future__ import annotations

import json

import torch

from bam_megatron.checkpoint import store
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.launch import launch
from tests.support.paths import PRETRAIN_SCRIPT as SCRIPT


def base_args(corpus, *extra: str) -> list[str]:
    """pretrain_bam.py flags of a tiny BAM run on the corpus fixture's three domains, then ``extra``."""
    return [
        "--variant",
        "bam",
        "--preset",
        "tiny",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--lr",
        "3e-3",
        "--lr-decay-iters",
        "6",
        "--eval-iters",
        "1",
        "--eval-interval",
        "1000",
        "--log-interval",
        "1",
        "--tokenizer-model",
        corpus["tokenizer"],
        "--data-path",
        "0.5",
        corpus["code"],
        "0.3",
        corpus["law"],
        "0.2",
        corpus["math"],
        *extra,
    ]


def run(tmp_path, name: str, args: list[str], world: int = 2, env=None, timeout: float = 240):
    """pretrain_bam.py ``args`` on ``world`` ranks: (exit codes in rank order, rank 0's output)."""
    ranks = launch(SCRIPT, args, world, str(tmp_path / f"logs-{name}"), env=env)
    codes = ranks.wait(timeout)
    return codes, ranks.output(0)


def losses(metrics_file: str) -> dict[int, float]:
    """Iteration -> training loss, from a run's metrics.jsonl."""
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r["lm_loss"] for r in records if r["kind"] == "train"}


def last_record(metrics_file: str) -> dict:
    """The last training record of a run's metrics.jsonl."""
    with open(metrics_file) as f:
        return [json.loads(line) for line in f if '"train"' in line][-1]


def logits_from_checkpoint(path: str, sizes: ParallelSizes):
    """Rank body: full logits of fixed tokens from the checkpoint's weights under ``sizes``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(sizes)
    model = load_model(path, None, sizes.tensor, sizes.pipeline, sizes.expert, sizes.sequence_parallel)
    seq_length = store.read_meta(path).seq_length
    tokens = torch.arange(2 * seq_length).view(2, -1) % 200
    positions = torch.arange(seq_length).unsqueeze(0).expand_as(tokens)

    def forward_step(data_iterator, model):  # the pipeline schedule runs every stage
        output = model(tokens, positions, None)
        return output, lambda logits: (logits.sum() * 0, {"logits": logits.detach().clone()})

    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.config.finalize_model_grads_func = None
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=seq_length,
        micro_batch_size=2,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(out[0]["logits"])
