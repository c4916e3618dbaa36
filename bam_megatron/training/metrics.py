"""Training reports: the Megatron-style log line, TensorBoard scalars and a JSONL metrics file."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional


def format_log_line(record: dict[str, Any]) -> str:
    """One Megatron-LM-style line from a metrics record."""
    parts = [
        f" iteration {record['iteration']:8d}/{record['train_iters']:8d}",
        f"consumed samples: {record['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {record['ms_per_iteration']:.1f}",
        f"tokens/s: {record['tokens_per_second']:.0f}",
        f"TFLOP/s per device: {record['tflops_per_device']:.4g}",
        f"learning rate: {record['learning_rate']:.6E}",
        f"global batch size: {record['global_batch_size']:5d}",
    ]
    if record.get("lm_loss") is not None:
        parts.append(f"lm loss: {record['lm_loss']:.6E}")
    for name, value in sorted(record.get("router_losses", {}).items()):
        parts.append(f"{name}: {value:.6E}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm: {record['grad_norm']:.3f}")
    parts.append(f"number of skipped iterations: {record['skipped_iterations']:3d}")
    parts.append(f"number of nan iterations: {record['nan_iterations']:3d}")
    return " | ".join(parts) + " |"


def format_validation(iteration: int, losses: dict[str, float]) -> str:
    """Per-domain validation loss and perplexity, plus their average."""
    cells = [f"{name}: loss {loss:.4f} ppl {math.exp(min(loss, 50)):.2f}" for name, loss in losses.items()]
    mean = sum(losses.values()) / len(losses)
    cells.append(f"average: loss {mean:.4f} ppl {math.exp(min(mean, 50)):.2f}")
    return f" validation at iteration {iteration} | " + " | ".join(cells)


class MetricsWriter:
    """Where reports go on the logging rank: stdout, TensorBoard (optional), JSONL (optional)."""

    def __init__(self, tensorboard_dir: Optional[str], metrics_file: Optional[str]) -> None:
        self._tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        # Opened at the first record: a run that fails or has nothing to do leaves no file behind.
        self._metrics_file, self._jsonl = metrics_file, None

    def training(self, record: dict[str, Any]) -> None:
        """Report one log interval."""
        print(format_log_line(record), flush=True)
        self._emit("train", record)
        if self._tb is not None:
            step = record["iteration"]
            for key in ("lm_loss", "learning_rate", "grad_norm", "tokens_per_second", "tflops_per_device"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for name, value in record.get("router_losses", {}).items():
                self._tb.add_scalar(f"train/{name}", value, step)
            for name, per_layer in record.get("router_losses_per_layer", {}).items():
                for layer, value in enumerate(per_layer):
                    self._tb.add_scalar(f"moe/{name}_layer_{layer}", value, step)

    def validation(self, iteration: int, losses: dict[str, float]) -> None:
        """Report per-domain validation losses."""
        print(format_validation(iteration, losses), flush=True)
        record = {
            "iteration": iteration,
            "loss": losses,
            "perplexity": {k: math.exp(min(v, 50)) for k, v in losses.items()},
        }
        self._emit("valid", record)
        if self._tb is not None:
            for name, loss in losses.items():
                self._tb.add_scalar(f"valid/{name}_loss", loss, iteration)
                self._tb.add_scalar(f"valid/{name}_ppl", math.exp(min(loss, 50)), iteration)

    def _emit(self, kind: str, record: dict[str, Any]) -> None:
        if self._metrics_file and self._jsonl is None:
            os.makedirs(os.path.dirname(os.path.abspath(self._metrics_file)), exist_ok=True)
            self._jsonl = open(self._metrics_file, "a", buffering=1)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, "time": time.time(), **record}) + "\n")

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
