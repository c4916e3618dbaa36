"""CPU mode: what it changes, that it undoes it, and that megatron-core's RNG semantics survive."""

import os
import subprocess
import sys

import megatron.core
import pytest
import torch
import torch.distributed as dist

from bam_megatron.platform import cpu_mode
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.distributed import run_distributed
from tests.support.tiny_gpt import build, forward_backward

pytestmark = [
    pytest.mark.megatron_core,  # stock megatron-core on CPU (tests/conftest.py)
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is for machines without CUDA"),
]


@pytest.fixture
def cpu_mode_on():
    assert cpu_mode.enable()
    yield
    cpu_mode.disable()


def test_megatron_cuda_call_sites_run_on_cpu(cpu_mode_on):
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.utils import get_default_causal_mask

    # device="cuda" literals inside megatron-core modules
    assert get_default_causal_mask(4).device.type == "cpu"
    assert clip_grads.torch.zeros(1, dtype=torch.int, device="cuda").device.type == "cpu"
    # torch.cuda.* and .cuda() wherever they are called
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.cuda.Event().query()
    # The type-name check holds inside the optimizer's helpers only, not for user code.
    assert x.type() == "torch.FloatTensor"
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
    assert torch.allclose(params[0].grad, torch.full((3,), 0.5), atol=1e-5)


def test_user_code_is_not_remapped(cpu_mode_on):
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_disable_restores_everything():
    originals = {name: getattr(torch.cuda, name) for name in ("current_device", "synchronize", "Stream")}
    from megatron.core.tensor_parallel import random as mrandom

    set_state = mrandom._set_cuda_rng_state
    assert cpu_mode.enable()
    assert cpu_mode.is_active() and torch.cuda.synchronize is not originals["synchronize"]
    cpu_mode.disable()
    assert not cpu_mode.is_active()
    assert {n: getattr(torch.cuda, n) for n in originals} == originals
    assert mrandom._set_cuda_rng_state is set_state
    from megatron.core.transformer import utils as transformer_utils

    assert transformer_utils.torch is torch
    assert "cuda" not in vars(torch.Tensor)
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1).cuda()


def test_refuses_an_untested_megatron_core(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="0.99.0"):
        cpu_mode.enable()
    assert not cpu_mode.is_active()


def test_never_active_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    synchronize = torch.cuda.synchronize
    assert cpu_mode.enable() is False
    assert not cpu_mode.is_active()
    assert torch.cuda.synchronize is synchronize


def rng_streams():
    """Rank body (TP=2): draws from the default stream and from the tensor-parallel stream."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    initialize(ParallelSizes(tensor=2), seed=42)
    tracker = get_cuda_rng_tracker()
    first = torch.rand(4)
    with tracker.fork():
        forked = torch.rand(4)
    after_fork = torch.rand(4)
    parallel_state.destroy_model_parallel()
    initialize(ParallelSizes(tensor=2), seed=42)  # the same seeds again, no fork this time
    torch.rand(4)
    unforked_next = torch.rand(4)
    return {"first": first, "forked": forked, "after_fork": after_fork, "unforked_next": unforked_next}


def test_rng_tracker_fork_semantics():
    rank0, rank1 = run_distributed(rng_streams, 2)
    # The default stream is shared by the tensor-parallel group; the forked stream is per rank.
    assert torch.equal(rank0["first"], rank1["first"])
    assert not torch.equal(rank0["forked"], rank1["forked"])
    # Forking swaps the state out and back: the default stream continues as if it never happened.
    for rank in (rank0, rank1):
        assert torch.equal(rank["after_fork"], rank["unforked_next"])
        assert not torch.equal(rank["forked"], rank["first"])


def dropout_losses(seed: int):
    """Rank body (TP=2): two training losses with dropout on."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    _, ddp = build(ParallelSizes(tensor=2), "gpt", dropout=0.2)
    model_parallel_cuda_manual_seed(seed)
    return [forward_backward(ddp, 1, seed=step) for step in range(2)]


def test_dropout_is_reproducible():
    same_a = run_distributed(dropout_losses, 2, args=(5,))
    same_b = run_distributed(dropout_losses, 2, args=(5,))
    other = run_distributed(dropout_losses, 2, args=(6,))
    assert same_a == same_b
    assert same_a[0] == same_a[1]  # both TP ranks see the same (all-reduced) loss
    assert same_a[0] != other[0]


def test_gloo_collectives_are_used():
    """The harness really runs separate ranks on gloo (not a mocked world)."""

    results = run_distributed(_backend_and_sum, 2)
    assert results == [("gloo", 1), ("gloo", 1)]


def _backend_and_sum():
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return dist.get_backend(), int(t.item())


_START = """
import sys
import bam_megatron.training.loop  # what pretrain_bam.py imports: all of megatron-core's GPT
from bam_megatron.platform import cpu_mode
import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import swiglu  # decorated with torch.compile at import
print("torch._dynamo" not in sys.modules)
cpu_mode.enable()
y = torch.randn(4, 8)
a, b = y.chunk(2, -1)
print(torch.equal(swiglu(y), F.silu(a) * b), "torch._dynamo" not in sys.modules)  # eager: TorchDynamo is off
import torch._dynamo
print(torch._dynamo.config.disable)  # read from TORCH_COMPILE_DISABLE, which CPU mode set
cpu_mode.disable()
print(torch._dynamo.config.disable)
"""


def test_a_process_starts_without_torchdynamo_and_cpu_mode_never_imports_it():
    """bam_megatron/lazy_compile.py: megatron-core's import-time torch.compile waits for the first call, which
    in CPU mode runs the kernel eagerly; CPU mode turns TorchDynamo off without importing it (through
    TORCH_COMPILE_DISABLE, undone by disable)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    done = subprocess.run([sys.executable, "-c", _START], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "True", "True", "False"], done.stdout + done.stderr[-3000:]


def test_a_deferred_compile_compiles_once_on_the_first_call_and_not_while_disabled(monkeypatch):
    from bam_megatron import lazy_compile

    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *args: ("compiled", fn(*args))

    def double(x):
        return 2 * x

    with monkeypatch.context() as patch:
        patch.setattr(torch, "compile", fake_compile)
        with lazy_compile.compile_on_first_call():
            deferred = torch.compile(double)
            with_options = torch.compile(mode="max-autotune")(double)
    assert calls == []  # nothing at decoration
    monkeypatch.setattr(lazy_compile, "compile_disabled", lambda: True)
    assert deferred(3) == 6 and calls == []  # disabled: eager, and nothing compiled yet
    monkeypatch.setattr(lazy_compile, "compile_disabled", lambda: False)
    assert deferred(3) == ("compiled", 6) and deferred(4) == ("compiled", 8) and calls == [{}]
    assert with_options(1) == ("compiled", 2) and calls == [{}, {"mode": "max-autotune"}]
