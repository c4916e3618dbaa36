"""The new-expert ramp of a grown mixture: exact at step 0, learning from step 1 (docs/phases.md).

``bam-upcycle --extend`` gives each router of the grown mixture a per-expert bias (``router_bias``)
and records, in the lineage entry of the growth (``grown[-1]["router_ramp"]``), which experts are
new and a schedule of logit offsets for them. A biased router's logits are ``W x + (b + offset)``
(`bam_megatron.model.router`); the bias b is a trained parameter from the first step, the offset a
non-persistent buffer that is a function of the iteration alone (the record also holds the routers'
``groups`` of experts, each computed by its own GEMM: `bam_megatron.model.router`)::

    offset(t) = -exact_offset                       t = 0        (-1024: the new gates are exactly 0)
              = -start_offset * (1 - t / iters)     0 < t < iters
              = 0                                   t >= iters

where t counts the optimizer steps since the grown checkpoint (``t = iteration - origin``).

Why two pieces: a gate exactly 0 (what makes step 0 bit-identical to the old mixture) has exactly
zero gradient (the softmax's derivative is proportional to the gate), so an offset that kept it 0
would never let the new expert or its bias learn; a linear ramp from -1024 would keep it 0 for 98%
of the ramp. From step 1 the offset is -start_offset (16: a gate below e^-16 of the largest, a change
of the function of order 1e-7), from where the new gates, and the gradients of the new bias and
experts, grow geometrically until the offset is gone at t = iters. Being a function of the
iteration, a resumed run computes the same offsets with no extra state. A run that starts from a
checkpoint's weights only (``--pretrained-checkpoint``, iteration counted from 0 again) continues
the ramp where the checkpoint left it: its ``origin`` moves back by the checkpoint's iteration.
Tools that compute with a checkpoint (`bam_megatron.checkpoint.models.load_model`) apply the offset
of its iteration; exports fold it into the bias.

This module imports torch only inside the functions that touch a model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

EXACT_OFFSET = 1024.0
"""The new experts' offset at step 0: e^-1024 is 0 in fp64, fp32, bf16 and fp16, and the new router
row (the mean of the old rows) and bias (the least of the old biases) never exceed the largest old
logit, so every new gate is exactly 0 and the old gates keep every bit."""

DEFAULT_RAMP_ITERS = 100
"""Iterations over which the new experts' offset goes from -start_offset to 0 (bam-upcycle --extend)."""

DEFAULT_RAMP_START = 16.0
"""The new experts' offset after the first step: gates below e^-16 of the largest at step 1."""

LINEAGE_KEY = "router_ramp"
"""Where a growth's entry in the lineage (``grown[-1]``) records its ramp."""


@dataclass(frozen=True)
class RouterRamp:
    """The offset schedule of the experts a mixture gained at its last growth (see the module doc)."""

    experts: tuple[int, ...]
    groups: tuple[int, ...] = ()
    exact_offset: float = EXACT_OFFSET
    start_offset: float = DEFAULT_RAMP_START
    iters: int = DEFAULT_RAMP_ITERS
    origin: int = 0

    def __post_init__(self) -> None:
        if self.iters < 0 or self.start_offset < 0 or self.exact_offset < 0:
            raise ValueError(f"a router ramp needs iters, start_offset, exact_offset >= 0, got {self}")

    def offset(self, iteration: int) -> float:
        """The new experts' logit offset at ``iteration`` (this run's count; see the module doc)."""
        t = iteration - self.origin
        if t <= 0:
            return -self.exact_offset
        if t >= self.iters:
            return 0.0
        return -self.start_offset * (1.0 - t / self.iters)

    def offsets(self, iteration: int, num_experts: int) -> list[float]:
        """The offset of every expert of the mixture at ``iteration`` (0 for the old ones)."""
        value = self.offset(iteration)
        return [value if e in self.experts else 0.0 for e in range(num_experts)]

    def done(self, iteration: int) -> bool:
        """True once the offset is 0 for good."""
        return iteration - self.origin >= max(self.iters, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as the lineage records it."""
        return {**asdict(self), "experts": list(self.experts), "groups": list(self.groups)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RouterRamp:
        """The inverse of `to_dict`."""
        return cls(**{**record, "experts": tuple(record["experts"]), "groups": tuple(record.get("groups", ()))})


def ramp_of(lineage: Mapping[str, Any]) -> Optional[RouterRamp]:
    """The ramp recorded by the mixture's last growth, or None."""
    grown = lineage.get("grown") or []
    record = grown[-1].get(LINEAGE_KEY) if grown else None
    return RouterRamp.from_dict(record) if record else None


def restarted_lineage(lineage: Mapping[str, Any], iteration: int) -> dict[str, Any]:
    """The lineage of a run that starts from the weights of a checkpoint at ``iteration`` and counts
    its own iterations from 0: the ramp's origin moves back by ``iteration`` (so it goes on where
    the checkpoint left it). A copy; the lineage as it is when there is no ramp."""
    ramp = ramp_of(lineage)
    if ramp is None or iteration == 0:
        return dict(lineage)
    moved = copy.deepcopy(dict(lineage))
    moved["grown"][-1][LINEAGE_KEY] = replace(ramp, origin=ramp.origin - iteration).to_dict()
    return moved


def biased_routers(model) -> list:
    """Every router of ``model`` with a bias offset buffer (`bam_megatron.model.router`)."""
    from bam_megatron.model.router import BIAS_OFFSET

    return [m for m in model.modules() if BIAS_OFFSET in getattr(m, "_buffers", {})]


def set_offsets(model, offsets: Sequence[float], groups: Sequence[int] = ()) -> None:
    """Set the offset buffer (fp32, on the buffer's device) and the expert groups of every biased
    router of ``model`` (`bam_megatron.model.router.grouped_logits`)."""
    import torch

    from bam_megatron.model.router import BIAS_OFFSET

    for router in biased_routers(model):
        current = getattr(router, BIAS_OFFSET)
        setattr(router, BIAS_OFFSET, torch.tensor(list(offsets), dtype=torch.float32, device=current.device))
        router.expert_groups = tuple(groups) or None


def apply_ramp(model, lineage: Mapping[str, Any], iteration: int, num_experts: int) -> Optional[float]:
    """Set ``model``'s router offsets for ``iteration`` and expert groups from the ramp ``lineage``
    records; return the new experts' offset (None without a ramp, or when the model has no biased
    router)."""
    ramp = ramp_of(lineage)
    if ramp is None or not biased_routers(model):
        return None
    set_offsets(model, ramp.offsets(iteration, num_experts), ramp.groups)
    return ramp.offset(iteration)


def folded_bias(bias, lineage: Mapping[str, Any], iteration: int):
    """A router bias tensor [..., N] with the ramp's offset at ``iteration`` folded in, computed as
    the routers compute b + offset (fp32 sum, back to the bias's dtype): what exports write, so an
    exported checkpoint computes the logits the checkpoint does. The bias itself without a ramp."""
    import torch

    ramp = ramp_of(lineage)
    if ramp is None:
        return bias
    offsets = torch.tensor(ramp.offsets(iteration, bias.shape[-1]), dtype=torch.float32)
    return (bias.float() + offsets).to(bias.dtype)
