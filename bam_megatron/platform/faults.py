"""Fault injection for the reliability tests, through environment variables (off when unset).

- ``BAM_FAULT_SAVE_DELAY_S``: seconds to sleep after a checkpoint's shards are written and
  before it is published, so a test can SIGKILL the job in the middle of a save.
- ``BAM_FAULT_NAN_ITERATIONS``: comma-separated iterations whose loss is made NaN.
"""

from __future__ import annotations

import os
import time


def pause_before_publishing_checkpoint() -> None:
    """Sleep for BAM_FAULT_SAVE_DELAY_S seconds, if set."""
    delay = float(os.environ.get("BAM_FAULT_SAVE_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def nan_loss_injected(iteration: int) -> bool:
    """Whether BAM_FAULT_NAN_ITERATIONS lists ``iteration``."""
    listed = os.environ.get("BAM_FAULT_NAN_ITERATIONS", "")
    return str(iteration) in {s.strip() for s in listed.split(",") if s.strip()}
