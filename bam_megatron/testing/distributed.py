"""Run a function on N gloo ranks in fresh processes: the harness behind every multi-rank test.

    results = run_distributed(check_tp_matches_serial, world_size=2, args=(...,))

Each rank is a separate process (a forkserver child with torch and megatron-core already
imported, so a test pays the import once). The default process group is initialised over a
FileStore (no TCP port to collide on); the function then sets up whatever model parallelism it
tests. The return values of all ranks come back in rank order. If any rank raises, times out or
dies, `DistributedTestError` carries that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

_PRELOAD = [
    "bam_megatron",  # first: its warning filters apply to megatron-core's imports
    "torch",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "bam_megatron.platform.cpu_mode",
]


class DistributedTestError(AssertionError):
    """A rank failed; the message holds its traceback."""


def forkserver_context() -> mp.context.BaseContext:
    """The forkserver whose children start with torch and megatron-core imported (ranks and launched scripts)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store_path: str,
    args: bytes,  # the pickled positional arguments of fn
    results: mp.Queue[tuple[int, bool, Any]],
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist

        from bam_megatron.platform import cpu_mode

        torch.set_num_threads(1)  # N ranks share the machine's cores
        cpu_mode.enable()
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        try:
            value = fn(*pickle.loads(args))
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with the rank.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` gloo ranks and return each rank's result, in rank order.

    ``fn`` must be importable (a module-level function) because ranks are separate processes.
    """
    ctx = forkserver_context()
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bam-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_rank_main,
                # args by value too: as shared-memory handles, each tensor would take one of the
                # forkserver's 256 file descriptors per process
                args=(fn, rank, world_size, store, pickle.dumps(tuple(args)), results),
                name=f"rank{rank}",
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcome) < world_size:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    if not all(ok for ok, _ in outcome.values()):
                        break  # the others are likely blocked in a collective with the failed rank
                    _raise_if_stuck(fn, procs, outcome, deadline, timeout, results)
                    continue
                outcome[rank] = (ok, value)
        finally:
            for p in procs:
                p.join(timeout=5 if len(outcome) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    failure = _failures(outcome)
    if failure:
        raise DistributedTestError(f"{fn.__name__} failed on {world_size} ranks" + failure)
    return [pickle.loads(outcome[rank][1]) for rank in range(world_size)]


def _raise_if_stuck(fn, procs, outcome, deadline: float, timeout: float, results) -> None:
    """Raise if a rank died without reporting, or if the run is past its deadline."""
    dead = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode is not None]
    if dead:
        try:  # its last report may still be in flight
            rank, ok, value = results.get(timeout=2.0)
            outcome[rank] = (ok, value)
            return
        except queue.Empty:
            raise DistributedTestError(
                f"{fn.__name__}: rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                "without reporting" + _failures(outcome)
            ) from None
    if time.monotonic() > deadline:
        missing = sorted(set(range(len(procs))) - set(outcome))
        raise DistributedTestError(
            f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f} s" + _failures(outcome)
        )


def _failures(outcome: dict[int, tuple[bool, Any]]) -> str:
    """Every failed rank's traceback (a rank's error often makes its peers' collectives fail)."""
    return "".join(
        f"\n--- rank {rank} traceback ---\n{value}" for rank, (ok, value) in sorted(outcome.items()) if not ok
    )
