"""Step time and peak memory of MoV and MoLoRA fine-tuning against full fine-tuning of the same model.

All three run pretrain_bam.py's own training step (megatron-core schedule, DDP, Adam, mock data):

- step time: one process holds the three trainers and times their steps interleaved
  (full, MoV, MoLoRA, full, ...), so machine noise hits all three alike; medians.
- peak memory: each configuration in a fresh process, over building the trainer and its first
  steps (gradient buffers come with DDP, optimizer state with the first step). On a GPU,
  torch.cuda.max_memory_allocated; on a CPU, the peak resident set size (sampled every
  millisecond) above the process's resident size before the trainer was built. Both count the
  weights (the same in all three, plus the adapters), the gradient buffers and optimizer state
  (for the trainable parameters only) and the activations.

    python bench/peft_step.py [--variant dense --hidden 256 --layers 4 --seq 256 --micro-batch 4 --experts 10 --rank 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bam_megatron  # noqa: E402,F401
from bam_megatron.testing.distributed import run_distributed  # noqa: E402
from bench.common import report  # noqa: E402

CONFIGS = ("full", "mov", "molora")


def _argv(settings: dict, config: str) -> list[str]:
    h = settings["hidden"]
    argv = [
        "--variant",
        settings["variant"],
        "--mock-data",
        "--vocab-size",
        "1024",
        "--train-iters",
        "100000",
        "--num-layers",
        str(settings["layers"]),
        "--hidden-size",
        str(h),
        "--num-attention-heads",
        str(max(1, h // 64)),
        "--ffn-hidden-size",
        str(4 * h),
        "--num-experts",
        "4",
        "--seq-length",
        str(settings["seq"]),
        "--micro-batch-size",
        str(settings["micro_batch"]),
        "--eval-iters",
        "0",
        "--lr",
        "1e-4",
    ]
    if config != "full":
        argv += ["--peft", config, "--peft-num-experts", str(settings["experts"]), "--lora-rank", str(settings["rank"])]
    if settings["bf16"]:
        argv.append("--bf16")
    return argv


def _trainer(settings: dict, config: str):
    from bam_megatron.cli.pretrain import make_trainer
    from bam_megatron.training.arguments import parse_args

    return make_trainer(parse_args(_argv(settings, config)))


def measure_time(settings: dict) -> dict:
    """Rank body: median seconds per step of each configuration, interleaved."""
    import torch

    trainers = {c: _trainer(settings, c) for c in CONFIGS}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(settings["warmup"]):
        for t in trainers.values():
            t._train_step()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(settings["rounds"]):
        for c, t in trainers.items():
            sync()
            start = time.perf_counter()
            t._train_step()
            sync()
            times[c].append(time.perf_counter() - start)
    return {
        c: {"step_s": statistics.median(times[c]), "trainable": trainers[c].trainable, "total": trainers[c].total}
        for c in CONFIGS
    }


def measure_memory(settings: dict, config: str) -> dict:
    """Rank body: peak memory of ``settings['memory_steps']`` steps of one configuration."""
    import threading

    import psutil
    import torch

    if torch.cuda.is_available():
        trainer = _trainer(settings, config)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(settings["memory_steps"]):
            trainer._train_step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "kind": "cuda max allocated"}
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer = _trainer(settings, config)
    for _ in range(settings["memory_steps"]):
        trainer._train_step()
    done.set()
    sampler.join()
    return {"peak_bytes": peak[0] - before, "kind": "cpu peak rss above the process before the trainer was built"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="dense", choices=("dense", "bam", "bam-shared-kv", "btx"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--experts", type=int, default=10, help="adapter experts of MoV and MoLoRA")
    parser.add_argument("--rank", type=int, default=4, help="MoLoRA rank")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="GPU only")
    settings = vars(parser.parse_args())
    (timing,) = run_distributed(measure_time, 1, args=(settings,), timeout=3600)
    memory = {c: run_distributed(measure_memory, 1, args=(settings, c), timeout=3600)[0] for c in CONFIGS}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (1 rank, 1 thread)"
    result = {"bench": "peft_step", "config": settings, "device": device, "memory_kind": memory["full"]["kind"]}
    for c in CONFIGS:
        result[c] = {
            "step_ms": round(1e3 * timing[c]["step_s"], 2),
            "peak_memory_mb": round(memory[c]["peak_bytes"] / 2**20, 1),
            "trainable_params": timing[c]["trainable"],
            "total_params": timing[c]["total"],
            "trainable_pct": round(100 * timing[c]["trainable"] / timing[c]["total"], 3),
        }
    for c in ("mov", "molora"):
        result[f"{c}_over_full"] = {
            "step_time": round(timing[c]["step_s"] / timing["full"]["step_s"], 3),
            "peak_memory": round(memory[c]["peak_bytes"] / memory["full"]["peak_bytes"], 3),
        }
    r = result
    report(
        result,
        f"peft_step ({settings['variant']}, d={settings['hidden']}, {device}): "
        f"step full {r['full']['step_ms']:.1f} ms, MoV {r['mov']['step_ms']:.1f} ms "
        f"({r['mov_over_full']['step_time']:.2f}x), MoLoRA {r['molora']['step_ms']:.1f} ms "
        f"({r['molora_over_full']['step_time']:.2f}x); peak memory full {r['full']['peak_memory_mb']:.0f} MB, "
        f"MoV {r['mov_over_full']['peak_memory']:.2f}x, MoLoRA {r['molora_over_full']['peak_memory']:.2f}x",
    )


if __name__ == "__main__":
    main()
