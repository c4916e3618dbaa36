"""A second opinion on the FLOPs convention: DeepSpeed's FLOPs profiler on one real forward pass.

`measure_forward_flops` runs one forward pass of a model megatron-core built under
``deepspeed.profiling.flops_profiler.FlopsProfiler`` and restates what the profiler saw in the
convention of docs/design.md §6 (`bam_megatron.model.statistics.flops_per_token`), so that the two
counts can be compared part by part (`compare`; `bam-stats --measure` prints both).

What the profiler counts: it monkey-patches ``torch.nn.functional`` (``linear``, ``softmax``,
``silu``, ``scaled_dot_product_attention``, …) and ``torch``'s ``matmul``/``mm``/``bmm``/``addmm``/
``baddbmm``/``einsum``/``mul``/``add`` while profiling, and adds each call's count to the module
it runs in. Its MACs are the multiply-accumulates of matrix products only (elementwise ops have
none), so 2 x MACs is the matrix-multiply FLOPs that §6 counts, with one difference:
``scaled_dot_product_attention`` is counted as the full s x s square of Q·Kᵀ and A·V, where §6
counts the causal half. The restatement therefore halves the core-attention MACs. Everything
else is taken as measured: the QKV/output projections, the soft-MoA router and the FFN experts the
router really sent each token to (top-k), on their real shapes. docs/design.md §6 lists what each
side counts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bam_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from bam_megatron.model.config import BAMConfig

DEEPSPEED_HINT = "pip install -e '.[deepspeed]' (DS_BUILD_OPS=0: no compiled ops are needed)"
PER_LAYER_PARTS = ("attention", "ffn", "router")
"""The parts of `flops_per_token` (per transformer layer, per token) that are measured."""
# torch functions DeepSpeed's profiler patches on the torch module (its _patch_tensor_methods).
_PATCHED_TORCH_FUNCTIONS = ("matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "mul", "add")


def load_profiler() -> types.ModuleType:
    """deepspeed's flops_profiler.profiler, or a UserError saying how to install it.

    DeepSpeed's logger writes to stdout; here it writes to stderr, so that ``bam-stats --json``
    prints JSON only.
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its logger binds the stdout of its import
            from deepspeed.profiling.flops_profiler import profiler
    except ImportError as error:
        raise UserError(f"measuring FLOPs needs DeepSpeed ({error}): {DEEPSPEED_HINT}") from None
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return profiler


@contextlib.contextmanager
def _torch_views_see_the_profiler() -> Iterator[None]:
    """Let megatron-core modules that hold a view of ``torch`` of their own see the profiler's patches.

    On a machine without CUDA, `bam_megatron.platform.cpu_mode` gives some megatron-core modules
    (``moe_utils`` among them: the FFN router's ``torch.mm``) a copy of the ``torch`` namespace;
    DeepSpeed patches the real module only, so the router GEMM would go uncounted on CPU while a GPU
    run counts it. Enter after ``start_profile`` and leave before ``end_profile``: each view gets the
    patched functions for the duration and its own ones back afterwards.
    """
    import torch

    saved = []
    for name, module in list(sys.modules.items()):
        view = getattr(module, "__dict__", {}).get("torch") if name.startswith("megatron.") else None
        if isinstance(view, types.ModuleType) and view is not torch and view.__name__ == "torch":
            for function in _PATCHED_TORCH_FUNCTIONS:
                if function in view.__dict__ and view.__dict__[function] is not getattr(torch, function):
                    saved.append((view, function, view.__dict__[function]))
                    setattr(view, function, getattr(torch, function))
    try:
        yield
    finally:
        for view, function, original in reversed(saved):
            setattr(view, function, original)


def _part(name: str) -> str:
    """Which per-layer part of `flops_per_token` a module (by its GPTModel name) belongs to."""
    if ".router" in name:
        return "router"
    if ".self_attention." in name or name.endswith(".self_attention"):
        return "attention"
    if ".mlp." in name or name.endswith(".mlp"):
        return "ffn"
    return "other"


def measure_forward_flops(
    model: torch.nn.Module, config: BAMConfig, vocab_size: int, seq_length: int, batch_size: int = 1
) -> dict[str, Any]:
    """Profile one forward pass of ``model`` on ``batch_size`` random sequences of ``seq_length``.

    Returns the profiler's own totals (``deepspeed_flops``, ``deepspeed_macs``: whole model, SDPA
    as a full square, elementwise ops it sees included) and, in the §6 convention, per token per
    transformer layer (mean over layers): ``per_layer`` = {attention, ffn, router, total}, plus
    ``output_layer`` (2 x MACs per token) and ``core_attention_full_square`` (what the profiler
    gave the core attention per token per layer before halving) and ``unattributed`` (matrix
    products in the layers outside attention, FFN and routers: 0 when §6's parts cover them all).
    Needs megatron-core's parallel state at TP = PP = EP = 1 and a model with real (not meta) weights.
    """
    import torch

    profiler = load_profiler()
    tokens = batch_size * seq_length
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_length), generator=generator)
    positions = torch.arange(seq_length).expand(batch_size, seq_length)
    was_training = model.training
    model.eval()
    prof = profiler.FlopsProfiler(model)
    try:
        prof.start_profile()
        with _torch_views_see_the_profiler(), torch.no_grad():
            model(input_ids, positions, None)
        macs = {name: module.__macs__ for name, module in model.named_modules()}
        totals = {"deepspeed_flops": prof.get_total_flops(), "deepspeed_macs": prof.get_total_macs()}
    finally:
        prof.end_profile()
        model.train(was_training)

    layers = config.num_layers
    per_layer = dict.fromkeys(PER_LAYER_PARTS, 0.0)
    core_attention = output_layer = unattributed = 0
    for name, count in macs.items():
        if name.endswith(".core_attention"):
            core_attention += count
        if name.startswith("output_layer"):
            output_layer += count
        part = _part(name)
        if part in per_layer:
            per_layer[part] += 2 * count
        elif name.startswith("decoder.layers."):
            unattributed += count
    per_layer["attention"] -= core_attention  # 2 x MACs of the full square -> the causal half
    per_layer = {part: value / tokens / layers for part, value in per_layer.items()}
    per_layer["total"] = sum(per_layer.values())
    return {
        "batch_size": batch_size,
        "seq_length": seq_length,
        "tokens": tokens,
        "per_layer": per_layer,
        "core_attention_full_square": 2 * core_attention / tokens / layers,
        "output_layer": 2 * output_layer / tokens,
        "unattributed": 2 * unattributed / tokens / layers,
        **totals,
    }


def compare(analytic: dict[str, int], measured: dict[str, Any]) -> dict[str, float]:
    """measured / analytic per part of the per-layer FLOPs (1.0 = agreement); parts both give as 0 are 1.0."""
    ratios = {}
    for part in (*PER_LAYER_PARTS, "total"):
        value, reference = measured["per_layer"][part], analytic[part]
        ratios[part] = 1.0 if value == reference == 0 else (value / reference if reference else float("inf"))
    return ratios
