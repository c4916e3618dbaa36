"""A model's forward pass one unit at a time, in the memory of a unit, not of the model.

The converters hold a model on the meta device and give real storage to one unit (``TOP``: the
embedding, final norm and output layer; or one transformer layer) at a time
(`bam_megatron.checkpoint.layerwise`). Some of them also need the model's *function*: the
upcycler's step-0 report compares the mixture's logits with each source's, and domain-initialised
routers need the input each router will really see. ``UnitForward`` runs megatron-core's own
modules for that: a real one-layer ``GPTModel`` of the same architecture (the *carrier*: its
embedding, rotary embedding, one transformer layer, final norm and output layer, all built without
storage of their own) to which each unit's weights are lent in turn. Hidden states are carried
from layer to layer by the caller, so memory holds one unit of weights plus the activations of
the few batches being run, whatever the depth.

The pass is the one ``GPTModel.forward`` makes at TP = PP = EP = 1 in eval mode (no attention
mask: causal; GPTModel's own preprocessing for the embedding and RoPE, each layer as
``TransformerBlock`` calls it, the final norm, GPTModel's postprocessing for the logits; a grown
mixture's new-expert router offsets at the checkpoint's iteration, as `load_model` applies them),
so its logits equal the whole model's (`tests/conversion/test_unit_forward.py` compares them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from bam_megatron.checkpoint.layerwise import LAYERS, TOP, Unit
from bam_megatron.platform import internals

if TYPE_CHECKING:
    from bam_megatron.checkpoint.meta import CheckpointMeta
    from bam_megatron.model.architecture import Architecture


def carrier_name(name: str) -> str:
    """A parameter's full name -> its name in the carrier (every layer is the carrier's layer 0)."""
    if not name.startswith(LAYERS):
        return name
    return LAYERS + "0." + name[len(LAYERS) :].split(".", 1)[1]


class UnitForward:
    """Runs token batches through ``architecture`` one unit at a time (see the module docstring).

    Call `embed` with the TOP unit, `layer` with each layer's unit in order, `logits` with the TOP
    unit again; every call takes the unit's parameters by their full names (as
    `layerwise.read_unit` returns them) and lends them to the carrier only for its duration.
    Call after `bam_megatron.platform.distributed.initialize` (TP = PP = EP = 1).
    """

    def __init__(self, architecture: Architecture, seq_length: int) -> None:
        from bam_megatron.model.builder import build_from_architecture

        one_layer = architecture.replace(num_layers=1)
        config = one_layer.one_rank_config()  # fp32, no initialisation: every weight is lent
        self.model = build_from_architecture(one_layer, config, seq_length).eval()
        # Drop the carrier's own (uninitialised) storage: only lent weights are ever used.
        for param in self.model.parameters():
            param.requires_grad_(False)
            param.data = torch.empty(0)
        self._rotary: torch.Tensor | None = None

    @contextlib.contextmanager
    def lend(self, unit_params: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The carrier with ``unit_params`` (full names) as its weights, fp32; taken back on exit."""
        own = dict(self.model.named_parameters())
        lent = []
        try:
            for name, tensor in unit_params.items():
                param = own[carrier_name(name)]
                if param.numel():
                    raise RuntimeError(f"{name}: two weights lent to one carrier parameter")
                param.data = tensor.detach().float()
                lent.append(param)
            yield self.model
        finally:
            for param in lent:
                param.data = torch.empty(0)

    @torch.no_grad()
    def embed(self, top: Mapping[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] -> the first layer's input [s, b, h] (and RoPE for the layers)."""
        positions = torch.arange(tokens.shape[-1]).expand_as(tokens)
        with self.lend(top) as model:
            hidden, rotary = internals.gpt_embed(model, tokens, positions)
        self._rotary = rotary
        return hidden

    @torch.no_grad()
    def layer(self, params: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """One transformer layer (its parameters by full name) applied to ``hidden`` [s, b, h]."""
        with self.lend(params) as model:
            output = model.decoder.layers[0](hidden_states=hidden, attention_mask=None, rotary_pos_emb=self._rotary)
        return output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def logits(self, top: Mapping[str, torch.Tensor], hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The last layer's output [s, b, h] -> logits [b, s, vocab] (final norm, output layer)."""
        positions = torch.arange(tokens.shape[-1]).expand_as(tokens)
        with self.lend(top) as model:
            hidden = model.decoder.final_layernorm(hidden)
            return internals.gpt_logits(model, hidden, tokens, positions).float()


def unit_params(model, unit: Unit, checkpoint_dir: str, meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """One unit of the checkpoint at ``checkpoint_dir`` (``model``: a meta model of its architecture)."""
    from bam_megatron.checkpoint.layerwise import read_unit
    from bam_megatron.checkpoint.store import stored_key_names

    return read_unit(model, unit, checkpoint_dir, stored_key_names(meta))


def streamed_logits(checkpoint_dir: str, meta: CheckpointMeta, batches: torch.Tensor) -> torch.Tensor:
    """The logits [n, b, s, vocab] of the checkpoint for token batches [n, b, s], read and run one
    unit at a time: memory for the TOP unit, one layer and the activations, whatever the depth."""
    from bam_megatron.checkpoint.layerwise import architecture_meta_model, num_layers
    from bam_megatron.model.router_ramp import apply_ramp

    architecture = meta.architecture
    model, _ = architecture_meta_model(architecture, meta.seq_length)
    forward = UnitForward(architecture, meta.seq_length)
    apply_ramp(forward.model, meta.lineage, meta.iteration, architecture.num_experts or 0)
    flat = batches.reshape(-1, batches.shape[-1])
    top = unit_params(model, TOP, checkpoint_dir, meta)
    hidden = forward.embed(top, flat)
    for layer in range(num_layers(model)):
        hidden = forward.layer(unit_params(model, layer, checkpoint_dir, meta), hidden)
    logits = forward.logits(top, hidden, flat)
    return logits.reshape(*batches.shape, -1)
