"""What every Hugging Face family's import has in common: reading config.json's fields, RoPE
settings, the tensors a config implies, and filling one unit of our model at a time.

A family's `Importer` (``llama.LlamaImporter``, ``cohere.CohereImporter``) checks config.json on
construction, refusing each setting bam-megatron cannot compute exactly in one line naming the
field, and then knows (a) the `Architecture` of the seed, (b) every Hugging Face tensor the model
is made of, with its shape, and (c) how one unit of our model (``layerwise.TOP`` or a layer) is
filled from those tensors. ``convert.import_hf`` checks the tensors against (b) from the files'
headers before anything is written, then streams the checkpoint unit by unit with (c). The
native families get (b) and (c) from their table (`bridge.TableImporter`: the same table their
export uses); the remote-code import (`remote_import`) spells them out with the helpers below.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.hf_files import SafetensorsWeights
from bam_megatron.model.architecture import Architecture

TOP = -1
"""The unit holding embedding, final norm and output layer: ``bam_megatron.checkpoint.layerwise.TOP``
(not imported from there, which loads megatron-core: ``bam-convert-hf --help`` stays quick)."""

# megatron-core's Llama-3 RoPE scaling (RotaryEmbedding._apply_scaling) takes only the factor; the
# other three parameters of transformers' 'llama3' rope_type are fixed to these values.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def embedding_shapes(vocab: int, hidden: int, untied: bool) -> dict[str, tuple[int, ...]]:
    """The tensors outside the layers of a transformers decoder: embedding, final norm, lm_head if untied."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if untied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def attention_shapes(layer: str, hidden: int, q: int, kv: int) -> dict[str, tuple[int, ...]]:
    """A layer's Q/K/V/O projections (``layer`` is ``model.layers.N.``)."""
    return {
        layer + "self_attn.q_proj.weight": (q, hidden),
        layer + "self_attn.k_proj.weight": (kv, hidden),
        layer + "self_attn.v_proj.weight": (kv, hidden),
        layer + "self_attn.o_proj.weight": (hidden, q),
    }


def swiglu_shapes(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """A SwiGLU MLP's ``gate_proj``/``up_proj``/``down_proj`` under ``prefix`` (``...mlp.``)."""
    return {
        prefix + "gate_proj.weight": (ffn, hidden),
        prefix + "up_proj.weight": (ffn, hidden),
        prefix + "down_proj.weight": (hidden, ffn),
    }


class Missing:
    """Marks a config.json field that transformers requires (no default)."""


REQUIRED = Missing()


class Importer:
    """One family's config checks, architecture and tensor mapping; subclasses fill in the family.

    Subclasses set ``model_type``, ``architecture_class`` and ``defaults`` (transformers' value of
    each field config.json may leave out; `REQUIRED` where it has none) and implement
    `tensor_shapes` and `fill`. Construction checks config.json and sets ``architecture``,
    ``seq_length`` and ``notes``.
    """

    model_type: str = ""
    architecture_class: str = ""
    defaults: dict[str, Any] = {}

    def __init__(self, cfg: dict[str, Any], seq_length: Optional[int] = None) -> None:
        self.cfg = cfg
        self.notes: list[str] = []
        architectures = cfg.get("architectures")
        if architectures is not None and architectures != [self.architecture_class]:
            raise ConversionError(
                f"model_type={self.model_type} but architectures={architectures}: only "
                f"{self.architecture_class} checkpoints of this family can be imported"
            )
        if cfg.get("quantization_config") is not None:
            method = (cfg["quantization_config"] or {}).get("quant_method", "?")
            raise ConversionError(f"quantization_config (quant_method={method}): only unquantized weights are read")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = self.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConversionError(f"config.json: {key} must be a positive integer, got {value!r}")
        if seq_length is not None and seq_length < 1:
            raise ConversionError(f"--seq-length must be >= 1, got {seq_length}")
        self.seq_length = seq_length or self.default_seq_length()
        self.architecture = self.check()

    # ----- config.json
    def get(self, key: str) -> Any:
        """config.json's ``key``, else transformers' default for this family (None if it has none)."""
        if key in self.cfg:
            return self.cfg[key]
        default = self.defaults.get(key)
        if default is REQUIRED:
            raise ConversionError(f"config.json gives no {key}")
        return default

    def require(self, key: str, wanted: Any, why: str) -> None:
        """Refuse, naming the field, a config value other than ``wanted``."""
        value = self.get(key)
        if value != wanted:
            raise ConversionError(f"{key}={value}: bam-megatron needs {key}={wanted} ({why})")

    def default_seq_length(self) -> int:
        """The recorded sequence length without --seq-length: max_position_embeddings."""
        value = self.get("max_position_embeddings")
        if not isinstance(value, int) or value < 1:
            raise ConversionError(f"config.json: max_position_embeddings must be a positive integer, got {value!r}")
        return value

    def groups(self) -> int:
        """num_key_value_heads (transformers: None means one KV head per query head)."""
        heads = self.get("num_attention_heads")
        groups = self.get("num_key_value_heads")
        groups = heads if groups is None else groups
        if not isinstance(groups, int) or groups < 1 or heads % groups:
            raise ConversionError(
                f"num_key_value_heads={groups}: must be a positive divisor of num_attention_heads={heads}"
            )
        return groups

    def rope(self, allow_llama3: bool = True) -> tuple[float, Optional[float]]:
        """(rope_theta, Llama-3 scaling factor or None) from a transformers 5.x (``rope_parameters``)
        or 4.x (``rope_theta``, ``rope_scaling``) config; other RoPE kinds are refused by name."""
        params, field = dict(self.cfg.get("rope_parameters") or {}), "rope_parameters"
        if self.cfg.get("rope_scaling"):
            params, field = {**params, **self.cfg["rope_scaling"]}, "rope_scaling"
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConversionError(f"{field}={params}: one RoPE setting for every layer is supported")
        theta = params.get("rope_theta", self.get("rope_theta"))
        if theta is None:
            raise ConversionError("config.json gives no rope_theta (rope_parameters.rope_theta)")
        partial = params.get("partial_rotary_factor", self.cfg.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ConversionError(f"partial_rotary_factor={partial}: bam-megatron rotates every channel of a head")
        kind_key = "rope_type" if "rope_type" in params else "type"
        kind = params.get(kind_key, "default")
        if kind == "default":
            return float(theta), None
        supported = (
            "plain RoPE ('default') and Llama-3 scaling ('llama3')" if allow_llama3 else "plain RoPE ('default')"
        )
        if kind != "llama3" or not allow_llama3:
            raise ConversionError(
                f"{field}.{kind_key}={kind}: only {supported} can be imported (megatron-core computes no other)"
            )
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or not factor >= 1:
            raise ConversionError(f"{field}.factor={factor}: Llama-3 RoPE scaling needs a factor >= 1")
        for key, fixed in MEGATRON_LLAMA3_ROPE.items():
            value = params.get(key)
            if key == "original_max_position_embeddings" and value is None:
                value = self.get("max_position_embeddings")  # transformers' fallback
            if not isinstance(value, (int, float)) or not math.isclose(value, fixed):
                raise ConversionError(
                    f"{field}.{key}={value}: megatron-core's Llama-3 RoPE scaling fixes {key}={fixed:g} "
                    "(low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192)"
                )
        return float(theta), float(factor)

    # ----- what subclasses provide
    def check(self) -> Architecture:
        """Check config.json (each refusal one line naming the field); the seed's architecture."""
        raise NotImplementedError(f"{type(self).__name__} does not define check(): each subclass does")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face tensor the model is made of, by name, with its shape."""
        raise NotImplementedError(f"{type(self).__name__} does not define tensor_shapes(): each subclass does")

    def optional_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may hold besides those (e.g. a tied lm_head.weight): checked, not needed."""
        return {}

    def record(self) -> dict[str, Any]:
        """What the seed's lineage records about the source besides its family, path and config.json."""
        return {}

    def fill(self, unit: int, params: dict[str, torch.Tensor], source: SafetensorsWeights) -> None:
        """Write unit ``unit`` of our model (``layerwise.TOP`` or a layer; ``params``: its parameters
        by name) from the Hugging Face tensors of ``source``."""
        raise NotImplementedError(f"{type(self).__name__} does not define fill(): each subclass does")

    # ----- shared by the fills
    def check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse, naming the tensor, a missing, mis-shaped or unexpected tensor (from the files' headers)."""
        wanted, optional = self.tensor_shapes(), self.optional_tensors()
        for name in wanted:
            if name not in shapes:
                raise ConversionError(f"tensor {name} is missing from the checkpoint")
        for name, shape in {**wanted, **optional}.items():
            if name in shapes and tuple(shapes[name]) != tuple(shape):
                raise ConversionError(
                    f"tensor {name} has shape {tuple(shapes[name])}, config.json implies {tuple(shape)}"
                )
        extra = sorted(name for name in shapes if name not in wanted and name not in optional and not _ignored(name))
        if extra:
            layers = self.get("num_hidden_layers")
            raise ConversionError(
                f"tensor {extra[0]} is not part of a {layers}-layer {self.architecture_class} model"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )


def _ignored(name: str) -> bool:
    """Buffers some checkpoints store that carry no weights (RoPE's inverse frequencies)."""
    return name.endswith("rotary_emb.inv_freq")


def fill_qkv(fused: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> None:
    """Copy Q [H·d, ...], K, V [G·d, ...] into megatron-core's fused ``linear_qkv`` weight or bias, in place.

    The fused layout is, per KV group, the group's H/G query heads, then its key head, then its
    value head (`bam_megatron.model.qkv_layout.merge_qkv`); written through a view, so no merged
    copy is made. Query head h belongs to KV group h // (H/G) in both (transformers' repeat_kv).
    """
    per_group = heads // groups
    trailing = fused.shape[1:]
    view = fused.view(groups, per_group + 2, -1, *trailing)
    view[:, :per_group].copy_(q.view(groups, per_group, -1, *trailing))
    view[:, per_group].copy_(k.view(groups, -1, *trailing))
    view[:, per_group + 1].copy_(v.view(groups, -1, *trailing))


def fill_swiglu(
    params: dict, ours: str, read, theirs: str, ffn: int, names=("gate_proj", "up_proj", "down_proj")
) -> None:
    """megatron-core's gated MLP ``ours`` (``linear_fc1`` = [gate; up], ``linear_fc2``) from three projections
    (the remote-code import's; the native families' tables use `bridge.swiglu`)."""
    fc1 = params[ours + "linear_fc1.weight"]
    fc1[:ffn].copy_(read(f"{theirs}{names[0]}.weight"))
    fc1[ffn:].copy_(read(f"{theirs}{names[1]}.weight"))
    params[ours + "linear_fc2.weight"].copy_(read(f"{theirs}{names[2]}.weight"))
