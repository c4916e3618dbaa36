"""Start a script on N local ranks the way srun does: one process per rank, rendezvous from env.

Unlike torchrun, every rank's exit code and PID stay visible, which is what tests of
preemption (signal the ranks) and crash safety (SIGKILL them) need.

Each rank is a child of the same forkserver as `run_distributed`'s ranks, with torch and
megatron-core already imported: the script then runs as ``python script args`` would run it
(``__main__``, its own ``sys.argv``, ``sys.path[0]`` and environment, stdout and stderr in the
rank's log, the exit code of its ``SystemExit`` or -signal), without paying about nine seconds of
imports per rank. ``fresh_interpreter=True`` starts a new Python instead, for a test that is about
the interpreter's start itself.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from bam_megatron.platform.distributed import free_port
from bam_megatron.testing.distributed import forkserver_context


class RankProcess:
    """A forkserver child running a script, with the part of `subprocess.Popen` the tests use."""

    def __init__(self, process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._process.exitcode

    def poll(self) -> Optional[int]:
        """The exit code (-N for signal N), or None while it runs."""
        return self._process.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit code; `subprocess.TimeoutExpired` if it outlives ``timeout``."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process if it still runs."""
        if self._process.exitcode is None:
            os.kill(self._process.pid, signum)


@dataclass
class Ranks:
    """The processes of one job."""

    procs: list[Union[subprocess.Popen, RankProcess]]
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


def _run_script(script: str, args: list[str], env: dict[str, str], log_path: str) -> None:
    """Forkserver child: run ``script`` as ``python script args`` would, output to ``log_path``."""
    os.environ.clear()
    os.environ.update(env)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # the interpreter would run them at exit; a forkserver child does not


def _start_rank(
    script: str, args: list[str], env: dict[str, str], log_path: str, name: str, fresh_interpreter: bool
) -> Union[subprocess.Popen, RankProcess]:
    """One rank: a fresh interpreter, or a child of the preloaded forkserver running `_run_script`."""
    with open(log_path, "w") as log:  # exists (empty) from the start: output() may read it at once
        if fresh_interpreter:
            return subprocess.Popen([sys.executable, script, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    process = forkserver_context().Process(target=_run_script, args=(script, args, env, log_path), name=name)
    process.start()
    return RankProcess(process)


def launch(
    script: str,
    args: Sequence[str],
    world_size: int,
    log_dir: str,
    env: Optional[dict[str, str]] = None,
    fresh_interpreter: bool = False,
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
    procs: list[Union[subprocess.Popen, RankProcess]] = []
    logs = []
    for rank in range(world_size):
        logs.append(os.path.join(log_dir, f"rank{rank}.log"))
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(_start_rank(script, list(args), rank_env, logs[-1], f"rank{rank}", fresh_interpreter))
    return Ranks(procs, logs)
