"""Which Hugging Face families ``bam-convert-hf import`` reads, and why it refuses some others.

Read: Cohere (parallel block, ``cohere.CohereImporter``), the Llama family, Llama, Mistral, Qwen2
and Qwen3 (sequential block, ``llama``), Phi-3 and Phi-4 (``phi3``), OLMo 2 (``olmo2``), Gemma 3
text (``gemma3``) and Gemma 2 (``gemma2``), the mixtures Qwen2-MoE, Qwen3-MoE and Mixtral (BTX seeds, ``moe``), and
bam-convert-hf's own remote-code exports (every variant, ``remote_import``).
Refused by name, with the reason: families whose forward pass megatron-core's GPT cannot compute
exactly here (OLMo 3) or not yet read (Gemma 1), and Gemma 3's multimodal class. Anything
else: one line naming its ``model_type`` and ``architectures``.
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.cohere import CohereImporter
from bam_megatron.conversion.hf.errors import ConversionError
from bam_megatron.conversion.hf.gemma2 import Gemma2Importer
from bam_megatron.conversion.hf.gemma3 import Gemma3Importer
from bam_megatron.conversion.hf.importer import Importer
from bam_megatron.conversion.hf.llama import LlamaImporter, MistralImporter, Qwen2Importer, Qwen3Importer
from bam_megatron.conversion.hf.moe import MixtralImporter, Qwen2MoeImporter, Qwen3MoeImporter
from bam_megatron.conversion.hf.olmo2 import Olmo2Importer
from bam_megatron.conversion.hf.phi3 import Phi3Importer
from bam_megatron.conversion.hf.remote_import import BamImporter

IMPORTERS: dict[str, type[Importer]] = {
    cls.model_type: cls
    for cls in (
        CohereImporter,
        LlamaImporter,
        MistralImporter,
        Qwen2Importer,
        Qwen3Importer,
        Phi3Importer,
        Olmo2Importer,
        Gemma2Importer,
        Gemma3Importer,
        Qwen2MoeImporter,
        Qwen3MoeImporter,
        MixtralImporter,
        BamImporter,
    )
}
"""model_type -> the family's importer."""

REFUSED: dict[str, str] = {
    "gemma": "Gemma (1) is not read: its layer has no norms after attention and MLP (Gemma 3 text, gemma3_text, "
    "is read)",
    "gemma3": "Gemma3ForConditionalGeneration is Gemma 3 with its vision tower: bam-convert-hf import reads the text "
    "model (model_type gemma3_text, Gemma3ForCausalLM)",
    "olmo3": "megatron-core cannot compute OLMo-3 exactly here: its sliding-window layers (OLMo 2, model_type "
    "olmo2, is read)",
}
"""model_type -> why it is refused (one line)."""


def importer_for(cfg: dict[str, Any], seq_length: Optional[int] = None) -> Importer:
    """The importer of config.json's family, its config checked; a `ConversionError` naming what is not read."""
    model_type, architectures = cfg.get("model_type"), cfg.get("architectures")
    described = f"model_type={model_type} (architectures={architectures})"
    if model_type in REFUSED:
        raise ConversionError(f"{described}: {REFUSED[model_type]}")
    if model_type not in IMPORTERS:
        readable = ", ".join(f"{name} ({cls.architecture_class})" for name, cls in IMPORTERS.items())
        raise ConversionError(f"{described}: bam-convert-hf import reads {readable}")
    return IMPORTERS[model_type](cfg, seq_length)
