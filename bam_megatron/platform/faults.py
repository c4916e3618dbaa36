"""Fault injection for the reliability tests, through environment variables (off when unset).

- ``BAM_FAULT_SAVE_DELAY_S``: seconds to sleep after a checkpoint's shards are written and
  before it is published, so a test can SIGKILL the job in the middle of a save.
- ``BAM_FAULT_NAN_ITERATIONS``: comma-separated iterations whose loss is made NaN.
- ``BAM_FAULT_KILL_AT``: ``POINT`` or ``POINT@N``: the process SIGKILLs itself (no clean-up, no
  ``finally``, as the OOM killer or a node failure would) the first (or N-th) time it reaches
  the named point. The points (`KILL_POINTS`) sit where a crash is hardest to survive: in the
  middle of writing an output and between the renames that publish it.
"""

from __future__ import annotations

import os
import signal
import time

KILL_POINTS = {
    "checkpoint-writing": "a checkpoint's temporary directory exists, no shard written yet",
    "checkpoint-written": "shards and integrity record written, not yet renamed into place",
    "checkpoint-renamed": "iter_N renamed into place, the latest file not yet updated",
    "dataset-writing": "bam-preprocess-data has written its first chunk of documents to the temporary files",
    "dataset-publishing": "bam-preprocess-data has renamed the .bin files, not yet the .idx files",
    "export-writing": "bam-convert-hf has written the first layer's tensors into its temporary directory",
    "directory-publishing": "bam-convert-hf's temporary directory is complete, not yet renamed",
}
_arrivals: dict[str, int] = {}


def reached(point: str) -> None:
    """SIGKILL this process if BAM_FAULT_KILL_AT names ``point`` (at this arrival)."""
    wanted = os.environ.get("BAM_FAULT_KILL_AT", "")
    if not wanted:
        return
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if _arrivals[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_before_publishing_checkpoint() -> None:
    """Sleep for BAM_FAULT_SAVE_DELAY_S seconds, if set."""
    delay = float(os.environ.get("BAM_FAULT_SAVE_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def nan_loss_injected(iteration: int) -> bool:
    """Whether BAM_FAULT_NAN_ITERATIONS lists ``iteration``."""
    listed = os.environ.get("BAM_FAULT_NAN_ITERATIONS", "")
    return str(iteration) in {s.strip() for s in listed.split(",") if s.strip()}
