"""One table per Hugging Face family, read both ways: the engine behind every native import and export.

A family's table (``Target.mappings(a)``, a list of `Mapping`) names, for every tensor, the
Hugging Face name pattern(s), our megatron-core parameter name and the transform between them with
its inverse. Patterns use ``{i}`` for the layer and ``{e}`` for the expert; entries without ``{i}``
belong to the unit ``TOP`` (embedding, final norm, output layer):

- `Rename`: the same tensor (import copies it; export writes the parameter as it is);
- `Scaled`: import multiplies by ``factor`` (Cohere's ``logit_scale`` folded into the final
  norm), export divides by it;
- `QKV`: ``q``, ``k``, ``v`` (or one ``[Q; K; V]``: Phi-3's ``qkv_proj``) fused into
  ``linear_qkv`` per KV group (its query heads, then key, then value), each Q and K head's rows
  optionally permuted (Cohere's interleaved RoPE); export splits them back;
- `GateUp`: ``gate``, ``up`` <-> ``linear_fc1`` = [gate; up] (concatenated / chunked);
- `Zeros`: tensors the class has and our model not, where zeros compute the same function
  (Llama's o_proj bias): export writes zeros, import requires zeros (or, ``optional``, skips them);
- `Tied`: a tied model's ``lm_head``: not exported; if stored, import requires it to equal the
  embedding.

Export (`TableTarget.unit`) maps one unit's parameters with the table; import (`TableImporter`)
fills one unit from the same table, and the tensors it expects (names, shapes) are those the
export of the same architecture writes, found by running the table on a meta-device model: import
and export of a family cannot drift apart, and `tests/conversion/hf/test_hf_families.py` checks
that import inverts export for every family, bit for bit. Both stream one unit at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Optional, Union

import torch

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.hf_files import SafetensorsWeights
from bam_megatron.conversion.hf.importer import TOP, Importer, fill_qkv
from bam_megatron.conversion.hf.target import Target, split_qkv_bias
from bam_megatron.model.architecture import Architecture
from bam_megatron.model.qkv_layout import split_qkv

Tensors = dict[str, torch.Tensor]

LAYER = "model.layers.{i}."  # a transformers decoder layer
OURS = "decoder.layers.{i}."  # megatron-core's


@dataclass(frozen=True, eq=False)
class Mapping:
    """One entry of a family's table: Hugging Face tensor name pattern(s) <-> one parameter of ours."""

    hf: Union[str, tuple[str, ...]]
    ours: Optional[str] = None
    optional: bool = False  # import: the tensors may be absent (read if present)

    def __post_init__(self) -> None:
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))

    def named(self, **where: int) -> Mapping:
        """This mapping with ``{i}`` (and ``{e}``) filled in."""
        ours = None if self.ours is None else self.ours.format(**where)
        return replace(self, hf=tuple(name.format(**where) for name in self.hf), ours=ours)

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        """Our parameter (from ``p``) -> the Hugging Face tensors, by name."""
        raise NotImplementedError(f"{type(self).__name__} does not define export(): each kind does")

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        """The Hugging Face tensors (from ``source``) -> our parameter in ``params``, in place."""
        raise NotImplementedError(f"{type(self).__name__} does not define load(): each kind does")

    def shapes(self, p: Tensors) -> dict[str, tuple[int, ...]]:
        """The Hugging Face tensors' shapes, from our parameters (on the meta device)."""
        return {name: tuple(t.shape) for name, t in self.export(p, torch.device("meta")).items()}


class Rename(Mapping):
    """The same tensor under another name."""

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        return {self.hf[0]: p[self.ours]}

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        params[self.ours].copy_(source.read(self.hf[0]))


@dataclass(frozen=True, eq=False, kw_only=True)
class Scaled(Mapping):
    """Ours = theirs x ``factor`` (exact for powers of two)."""

    factor: float = 1.0

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        ours = p[self.ours]
        return {self.hf[0]: ours if self.factor == 1.0 else ours / self.factor}

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        into = params[self.ours]
        into.copy_(source.read(self.hf[0]))
        into.mul_(self.factor)


@dataclass(frozen=True, eq=False, kw_only=True)
class QKV(Mapping):
    """``q``, ``k``, ``v`` (``hf`` of three names; of one: Phi-3's ``qkv_proj`` = [Q; K; V]) <->
    megatron-core's fused ``linear_qkv`` weight or bias.

    megatron-core's layout is, per KV group, the group's ``heads / groups`` query heads, then its
    key head, then its value head; query head h belongs to KV group h // (heads / groups) in both
    (transformers' ``repeat_kv``). ``rows``: row ``r`` of each transformers Q and K head is row
    ``rows[r]`` of ours (Cohere's interleaved RoPE, `cohere.rope_permutation`).
    """

    heads: int
    groups: int
    rows: Optional[torch.Tensor] = None

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        fused = p[self.ours]
        if fused.dim() == 1:
            parts = split_qkv_bias(fused, self.heads, self.groups)
            q, k, v = (x.view(n, -1) for x, n in zip(parts, (self.heads, self.groups, self.groups)))
        else:
            q, k, v = split_qkv(fused, self.heads, self.groups)  # [heads or groups, d, ...]
        if self.rows is not None:
            q, k = q[:, self.rows], k[:, self.rows]
        flat = [x.reshape(-1, *fused.shape[1:]) for x in (q, k, v)]
        if len(self.hf) == 1:
            return {self.hf[0]: torch.cat(flat)}
        return dict(zip(self.hf, flat))

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        into = params[self.ours]
        d = into.shape[0] // (self.heads + 2 * self.groups)
        parts = [source.read(name) for name in self.hf]
        if len(parts) == 1:
            parts = list(parts[0].split([self.heads * d, self.groups * d, self.groups * d]))
        q, k, v = parts
        if self.rows is not None:
            inverse = torch.argsort(self.rows)  # their rows -> ours
            q = q.view(self.heads, d, *q.shape[1:])[:, inverse]
            k = k.view(self.groups, d, *k.shape[1:])[:, inverse]
        fill_qkv(into, q, k, v, self.heads, self.groups)


class GateUp(Mapping):
    """``gate``, ``up`` <-> megatron-core's gated ``linear_fc1`` = [gate; up]."""

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        gate, up = p[self.ours].chunk(2, dim=0)
        return {self.hf[0]: gate, self.hf[1]: up}

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        into = params[self.ours]
        ffn = into.shape[0] // 2
        into[:ffn].copy_(source.read(self.hf[0]))
        into[ffn:].copy_(source.read(self.hf[1]))


@dataclass(frozen=True, eq=False, kw_only=True)
class Zeros(Mapping):
    """Tensors the class has and our model has not, where zeros compute the same function: written as
    zeros; on import each must be zero (``refusal``, with ``{name}``, says why), or with ``optional``
    it may be absent and is not read (Qwen2-MoE's empty shared expert)."""

    shape: tuple[tuple[int, ...], ...]
    refusal: str = "tensor {name} is not zero: bam-megatron's model has no such tensor"

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        return {name: torch.zeros(shape, device=device) for name, shape in zip(self.hf, self.shape)}

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        if self.optional:
            return
        for name in self.hf:
            if bool(source.read(name).count_nonzero()):
                raise ConversionError(self.refusal.format(name=name))

    def shapes(self, p: Tensors) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.hf, self.shape))


@dataclass(frozen=True, eq=False, kw_only=True)
class Tied(Mapping):
    """A tied model's output layer: not exported; a stored one (``hf``) must equal the embedding
    (our ``ours``, transformers' ``same_as``)."""

    same_as: str
    optional: bool = True

    def export(self, p: Tensors, device: torch.device) -> Tensors:
        return {}

    def load(self, params: Tensors, source: SafetensorsWeights) -> None:
        name = self.hf[0]
        if name in source and not torch.equal(source.read(name).float(), params[self.ours]):
            raise ConversionError(f"tie_word_embeddings is true but {name} differs from {self.same_as}")

    def shapes(self, p: Tensors) -> dict[str, tuple[int, ...]]:
        return {self.hf[0]: tuple(p[self.ours].shape)}


# ----- entries most families share


def head_dim(a: Architecture) -> int:
    """The attention head size (``kv_channels``, else hidden / heads)."""
    return a.kv_channels or a.hidden_size // a.num_attention_heads


def embeddings(a: Architecture, norm_factor: Optional[float] = None) -> list[Mapping]:
    """``model.embed_tokens``, ``model.norm`` (times ``norm_factor`` if given), ``lm_head`` (tied or not)."""
    embedding = "embedding.word_embeddings.weight"
    norm = ("model.norm.weight", "decoder.final_layernorm.weight")
    return [
        Rename("model.embed_tokens.weight", embedding),
        Rename(*norm) if norm_factor is None else Scaled(*norm, factor=norm_factor),
        Rename("lm_head.weight", "output_layer.weight")
        if a.untie_embeddings_and_output_weights
        else Tied("lm_head.weight", embedding, same_as="model.embed_tokens.weight"),
    ]


def swiglu(
    theirs: str, ours: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> list[Mapping]:
    """A SwiGLU MLP: ``{theirs}{gate,up}`` <-> ``{ours}linear_fc1``, ``{theirs}{down}`` <-> ``{ours}linear_fc2``."""
    gate, up, down = names
    return [
        GateUp((f"{theirs}{gate}.weight", f"{theirs}{up}.weight"), f"{ours}linear_fc1.weight"),
        Rename(f"{theirs}{down}.weight", f"{ours}linear_fc2.weight"),
    ]


# ----- the engine


def unit_mappings(table: list[Mapping], unit: int, experts: int) -> list[Mapping]:
    """The entries of ``table`` for one unit (TOP or a layer), names filled in (``{e}``: every expert)."""
    out: list[Mapping] = []
    for m in table:
        names = (*m.hf, m.ours or "")
        layered = any("{i}" in name for name in names)
        if layered != (unit != TOP):
            continue
        if any("{e}" in name for name in names):
            out += [m.named(i=unit, e=e) for e in range(experts)]
        else:
            out.append(m.named(i=unit) if layered else m)
    return out


def export_unit(table: list[Mapping], unit: int, p: Tensors, experts: int) -> Tensors:
    """The Hugging Face tensors of one unit from its parameters ``p`` (any device, meta included)."""
    device = next(iter(dict.values(p))).device  # (dict.values: reading no parameter)
    out: Tensors = {}
    for m in unit_mappings(table, unit, experts):
        out.update(m.export(p, device))
    return out


def import_unit(table: list[Mapping], unit: int, params: Tensors, source: SafetensorsWeights, experts: int) -> None:
    """Fill one unit's parameters ``params`` from the Hugging Face tensors of ``source``."""
    for m in unit_mappings(table, unit, experts):
        m.load(params, source)


def meta_units(a: Architecture, seq_length: int) -> tuple[Any, Any, dict[int, Tensors]]:
    """(model, config, parameters by unit) of ``a``'s one-rank model on the meta device (TP = PP = EP = 1,
    local spec: the parameter names the tables use)."""
    from bam_megatron.checkpoint.layerwise import architecture_meta_model, unit_of_parameter
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    model, config = architecture_meta_model(a, seq_length, backend="local")
    units: dict[int, Tensors] = {}
    for name, param in model.named_parameters():
        units.setdefault(unit_of_parameter(name), {})[name] = param
    return model, config, units


class TableTarget(Target):
    """An export format driven by its family's table: `mappings` is the table, `unit` applies it."""

    def mappings(self, a: Architecture, **options: Any) -> list[Mapping]:
        """The family's table for architecture ``a`` (``options``: import-only settings, e.g. a logit scale;
        their defaults are what this target's config.json says)."""
        raise NotImplementedError(f"{type(self).__name__} does not define mappings(): each family does")

    def unit(self, unit: int, p: Tensors, a: Architecture, config) -> Tensors:
        """The Hugging Face tensors of one unit, by the table."""
        return export_unit(self.mappings(a), unit, p, a.num_experts or 0)


class TableImporter(Importer):
    """A family's import driven by its target's table: the tensors expected are those the target
    would export for the imported architecture; ``fill`` inverts the table's transforms."""

    target: TableTarget

    def table_options(self) -> dict[str, Any]:
        """Settings of config.json the table depends on beyond the architecture (Cohere's logit scale)."""
        return {}

    def table(self) -> list[Mapping]:
        """The family's table for this checkpoint."""
        return self.target.mappings(self.architecture, **self.table_options())

    @cached_property
    def _shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """(required, optional) tensor shapes, from the table run on a meta-device model."""
        _, _, units = meta_units(self.architecture, self.seq_length)
        required: dict[str, tuple[int, ...]] = {}
        optional: dict[str, tuple[int, ...]] = {}
        table, experts = self.table(), self.architecture.num_experts or 0
        for unit, params in units.items():
            for m in unit_mappings(table, unit, experts):
                (optional if m.optional else required).update(m.shapes(params))
        return required, optional

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the target would export for this architecture, with its shape."""
        return self._shapes[0]

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may hold besides (a tied lm_head, Qwen2-MoE's empty shared expert)."""
        return self._shapes[1]

    def fill(self, unit: int, params: Tensors, source: SafetensorsWeights) -> None:
        """Write one unit of our model from the Hugging Face tensors, by the table."""
        import_unit(self.table(), unit, params, source, self.architecture.num_experts or 0)
