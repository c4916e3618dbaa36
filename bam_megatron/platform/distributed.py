"""Process-group and model-parallel set-up shared by training, tools and tests.

One call, `initialize`, does what every entry point needs in the same order: CPU mode when CUDA is
absent, the default process group (NCCL on GPUs, gloo otherwise), megatron-core's parallel state,
and the model-parallel RNG seeds.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bam_megatron.errors import ConfigError
from bam_megatron.platform import cpu_mode


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel layout; data parallelism is whatever the world size leaves over."""

    @staticmethod
    def add_flags(group) -> None:
        """Megatron-LM's four layout flags, on an argparse parser or group (every multi-rank tool's)."""
        group.add_argument("--tensor-model-parallel-size", type=int, default=1)
        group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
        group.add_argument("--expert-model-parallel-size", type=int, default=1)
        group.add_argument("--sequence-parallel", action="store_true")

    @classmethod
    def from_args(cls, args) -> ParallelSizes:
        """The sizes an argparse Namespace with `add_flags`' flags holds."""
        return cls(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.expert_model_parallel_size,
            args.sequence_parallel,
        )

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    sequence_parallel: bool = False

    def validate(self, world_size: int) -> None:
        """Fail with a one-line message naming the flag when the sizes cannot tile the world."""
        for flag, value in (
            ("--tensor-model-parallel-size", self.tensor),
            ("--pipeline-model-parallel-size", self.pipeline),
            ("--expert-model-parallel-size", self.expert),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"({self.tensor}) x --pipeline-model-parallel-size ({self.pipeline})"
            )
        # megatron-core's experts are also split over TP (expert tensor parallel size = TP), so
        # each pipeline stage's ranks must hold whole EP x TP groups.
        if (world_size // self.pipeline) % (self.expert * self.tensor):
            raise ConfigError(
                f"--expert-model-parallel-size {self.expert} x --tensor-model-parallel-size {self.tensor} "
                f"must divide the {world_size // self.pipeline} ranks of a pipeline stage"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """NCCL where CUDA is usable, gloo everywhere else."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(
    sizes: ParallelSizes = ParallelSizes(),
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Start torch.distributed (from torchrun/Slurm env vars, else as a world of one, unless already
    started) and megatron-core.

    Enables CPU mode first when CUDA is absent, so that everything after this call may treat the
    machine as a GPU machine.
    """
    cpu_mode.enable()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            # Started as a plain `python` process, not by torchrun / srun: a world of one, whose
            # store is a file (a TCP port picked here could be taken by another process meanwhile).
            # No RANK/WORLD_SIZE in the environment: processes this one starts are not its ranks.
            if torch.cuda.is_available():
                torch.cuda.set_device(0)
            store = tempfile.NamedTemporaryFile(prefix="bam-world-of-one-", delete=False).name
            atexit.register(lambda: os.path.exists(store) and os.remove(store))
            dist.init_process_group(
                backend=default_backend(), init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout
            )
        else:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=default_backend(), timeout=timeout)
    sizes.validate(dist.get_world_size())

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():  # a second model in the same process
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
