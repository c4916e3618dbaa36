"""Start a script on N local ranks the way srun does: one process per rank, rendezvous from env.

Unlike torchrun, every rank's exit code and PID stay visible, which is what tests of
preemption (signal the ranks) and crash safety (SIGKILL them) need.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from bam_megatron.platform.distributed import free_port


@dataclass
class Ranks:
    """The processes of one job."""

    procs: list[subprocess.Popen]
    log_paths: list[str]

    def wait(self, timeout: float = 300) -> list[int]:
        """Exit codes in rank order (kills the job if it outlives ``timeout``)."""
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every rank still running."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def output(self, rank: int = 0) -> str:
        """Everything rank ``rank`` printed so far."""
        with open(self.log_paths[rank]) as f:
            return f.read()


def launch(
    script: str, args: Sequence[str], world_size: int, log_dir: str, env: Optional[dict[str, str]] = None
) -> Ranks:
    """Run ``python script args`` on ``world_size`` ranks; rank r's output goes to log_dir/rank{r}.log."""
    os.makedirs(log_dir, exist_ok=True)
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    procs, logs = [], []
    for rank in range(world_size):
        path = os.path.join(log_dir, f"rank{rank}.log")
        with open(path, "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, *args],
                    env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(path)
    return Ranks(procs, logs)
