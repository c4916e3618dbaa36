"""MoLoRA: a soft mixture of E LoRA adapters on a linear layer (Zadouri et al., 2023).

    y = W x + (α / r) · Σ_e p_e(x) · B_e A_e x,        p(x) = softmax(W_r x)

A_e ∈ R^{r×in} starts normal (std 0.02), B_e ∈ R^{out×r} at zero, so a fresh adapter leaves the
model's output exactly unchanged. All experts run as two GEMMs: A = [A_1; …; A_E] gives the
E·r-wide intermediate, which is scaled per expert by its gate, then B = [B_1 … B_E].

Tensor parallelism follows the adapted linear (`bam_megatron.peft.parallel`):

- column-parallel: A and the router replicated, B split along its output rows like W. For a
  SwiGLU ``linear_fc1`` the local output is [gate half; up half], so B is stored
  [E, 2, out/2, r] and split along the third axis, keeping both halves together on each rank.
- row-parallel: A and the router split along their input columns like W, B replicated. Each rank's
  A x is a partial sum: it is reduced over the group (all-reduce, or reduce-scatter along the
  sequence under sequence parallelism) and B applied after the linear's own reduction; when the
  linear leaves its output unreduced (experts, the parallel block's fused reduction), the partial
  update B (p ⊙ A_local x) is added *before* that reduction, which sums it exactly.
"""

from __future__ import annotations

import torch

from bam_megatron.peft.adapter import Adapter
from bam_megatron.peft.parallel import column_spread, linear, reduce_partial, replicated_weight
from bam_megatron.peft.router import mix


class MoLoRA(Adapter):
    """E LoRA experts on one column- or row-parallel linear.

    Args (besides `Adapter`'s): ``out_chunks``: contiguous blocks of the local output that TP
    splits separately (2 for a gated ``linear_fc1``, else 1).
    """

    def __init__(self, info, config, key, device, dtype, out_chunks: int = 1) -> None:
        super().__init__(info, config, key, device, dtype)
        e, r, tp = config.num_experts, config.rank, info.tp_size
        self.rank, self.scaling = r, config.scaling
        self.out_chunks = out_chunks
        if info.kind == "column":
            if info.out_features % out_chunks:
                raise ValueError(f"{key}: {info.out_features} output features do not split into {out_chunks} chunks")
            sp = info.sequence_parallel  # replicated, fed this rank's sequence chunk
            self._param("lora_a", (e, r, info.in_features), None, "normal", config.lora_a_std, sequence_parallel=sp)
            self._param("lora_b", (e, out_chunks, info.out_features * tp // out_chunks, r), 2, "zeros")
            self._router(info.in_features, None)
        else:
            self._param("lora_a", (e, r, info.in_features * tp), 2, "normal", config.lora_a_std)
            # replicated; under SP applied to this rank's sequence chunk
            sp = info.sequence_parallel and not info.partial
            self._param("lora_b", (e, info.out_features, r), None, "zeros", sequence_parallel=sp)
            self._router(info.in_features * tp, 1)

    def _a(self) -> torch.Tensor:
        return self.lora_a.reshape(-1, self.lora_a.shape[-1])  # [E·r, in]

    def _b(self) -> torch.Tensor:
        b = self.lora_b.reshape(self.num_experts, -1, self.rank)  # [E, out, r] (fc1: halves in order)
        out = b.shape[1]
        return b.permute(1, 0, 2).reshape(out, -1)  # [out, E·r], expert-major columns

    def column_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) Σ_e p_e B_e A_e x for this rank's output features, whole sequence."""
        info = self.info
        a = replicated_weight(self._a(), info) if info.partial else self._a()
        t = column_spread(info)(linear(x, a))  # [..., E·r]
        gates = self.router.column(x) if self.router is not None else None
        return linear(mix(t, gates, self.num_experts), self._b()) * self.scaling

    def row_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update to a row-parallel linear's output: a partial sum where the linear's output
        is partial, else reduced (this rank's sequence chunk under SP)."""
        info = self.info
        t = linear(x, self._a())  # partial sum over the TP group
        if info.partial:
            gates = self.router.row(x, "partial") if self.router is not None else None
            b = replicated_weight(self._b(), info)
        else:
            scatter = info.sequence_parallel
            t = reduce_partial(t, info, scatter=scatter)
            gates = self.router.row(x, "scattered" if scatter else "reduced") if self.router is not None else None
            b = self._b()
        return linear(mix(t, gates, self.num_experts), b) * self.scaling

    def attach(self, linear_module: torch.nn.Module) -> None:
        """y ← y + update, on the linear's output."""
        delta = self.column_delta if self.info.kind == "column" else self.row_delta
        linear_module.register_forward_hook(self._output_hook(lambda x, out: out + delta(x).to(out.dtype)))
