"""MoV: a soft mixture of E (IA)³ vector sets (Zadouri et al., 2023).

(IA)³ rescales activations elementwise by learned vectors; MoV merges E such vectors per token::

    l(x) = Σ_e p_e(x) · l_e,        p(x) = softmax(W_r x)

and applies l to the keys and values (the K and V parts of ``linear_qkv``'s output, before RoPE)
and to the FFN intermediate activation (the input of ``linear_fc2``, i.e. after SwiGLU).

Each vector is stored as its offset from one, l_e = 1 + d_e with d_e = 0 at initialisation: the
fresh model is exactly the base model (Σ_e p_e = 1), and weight decay (applied to these 2-D
tensors by megatron-core's optimizer) pulls towards the base model rather than towards zero.

Tensor parallelism: the vectors are split like the activations they scale (K/V by query groups,
the intermediate activation by features); the router reads the adapted module's input (the
attention input for K/V, the intermediate activation for the FFN) with the router layouts of
`bam_megatron.peft.router`.
"""

from __future__ import annotations

from typing import Optional

import torch

from bam_megatron.peft.adapter import Adapter


def _merged(delta: torch.Tensor, gates: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """1 + Σ_e p_e d_e: [..., n] (or [n] without a router)."""
    flat = delta.reshape(delta.shape[0], -1)
    if gates is None:
        return 1 + flat[0].to(dtype)
    return 1 + (gates.to(dtype) @ flat.to(dtype))


class MoVQKV(Adapter):
    """Per-expert (IA)³ vectors on the K and V heads of a fused ``linear_qkv`` (column-parallel).

    megatron-core's fused QKV output holds, per query group, the group's query heads, then its key
    head, then its value head (`bam_megatron.model.qkv_layout`); TP splits it by whole groups.
    """

    def __init__(self, info, config, key, device, dtype, groups: int, heads: int, head_dim: int) -> None:
        super().__init__(info, config, key, device, dtype)
        if info.kind != "column" or info.out_features != groups * (heads // groups + 2) * head_dim:
            raise ValueError(f"{key}: not a fused QKV projection of {heads} heads in {groups} groups of dim {head_dim}")
        self.groups, self.per_group, self.head_dim = groups, heads // groups, head_dim
        shape = (config.num_experts, groups * info.tp_size, head_dim)
        self._param("ia3_k", shape, 1, "zeros")
        self._param("ia3_v", shape, 1, "zeros")
        self._router(info.in_features, None)

    def scale(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Multiply the K and V heads of ``out`` by the merged vectors of ``x``'s tokens."""
        gates = self.router.column(x) if self.router is not None else None
        lead = out.shape[:-1]
        shape = (*lead, self.groups, 1, self.head_dim) if gates is not None else (self.groups, 1, self.head_dim)
        k = _merged(self.ia3_k, gates, out.dtype).view(shape)
        v = _merged(self.ia3_v, gates, out.dtype).view(shape)
        heads = out.view(*lead, self.groups, self.per_group + 2, self.head_dim)  # [q…, k, v] per group
        q, key, value = heads.split([self.per_group, 1, 1], dim=-2)
        return torch.cat([q, key * k, value * v], dim=-2).view(out.shape)

    def attach(self, linear_module: torch.nn.Module) -> None:
        """K, V ← l_K ⊙ K, l_V ⊙ V on the linear's output."""
        linear_module.register_forward_hook(self._output_hook(self.scale))


class MoVInput(Adapter):
    """Per-expert (IA)³ vectors on the input of a row-parallel linear (the FFN's ``linear_fc2``:
    its input is the intermediate activation)."""

    def __init__(self, info, config, key, device, dtype) -> None:
        super().__init__(info, config, key, device, dtype)
        if info.kind != "row":
            raise ValueError(f"{key}: MoV scales the input of a row-parallel linear")
        self._param("ia3_input", (config.num_experts, info.in_features * info.tp_size), 1, "zeros")
        self._router(info.in_features * info.tp_size, 1)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """l(x) ⊙ x (features split over TP; the gates' gradient is summed over ranks)."""
        gates = self.router.row(x, "partial") if self.router is not None else None
        return x * _merged(self.ia3_input, gates, x.dtype)

    def attach(self, linear_module: torch.nn.Module) -> None:
        """x ← l(x) ⊙ x, on the linear's input."""

        def pre_hook(module, args):
            return (self.scale_input(args[0]), *args[1:])

        linear_module.register_forward_pre_hook(pre_hook)
