"""Which Hugging Face families ``bam-convert-hf import`` reads, and why it refuses some others.

Read: Cohere (parallel block, ``cohere.CohereImporter``), the Llama family, Llama, Mistral, Qwen2
and Qwen3 (sequential block, ``llama``), Phi-3 and Phi-4 (``phi3``), OLMo 2 (``olmo2``), the mixtures Qwen2-MoE,
Qwen3-MoE and Mixtral (BTX seeds, ``moe``), and bam-convert-hf's own remote-code exports (every
variant, ``remote_import``).
Refused by name, with the reason: families whose forward pass megatron-core's GPT cannot compute
exactly here (Gemma 1/2/3, OLMo 3). Anything else: one line naming its ``model_type`` and
``architectures``.
"""

from __future__ import annotations

from typing import Any, Optional

from bam_megatron.conversion.hf.cohere import CohereImporter
from bam_megatron.conversion.hf.errors import ConversionError
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
        Qwen2MoeImporter,
        Qwen3MoeImporter,
        MixtralImporter,
        BamImporter,
    )
}
"""model_type -> the family's importer."""

_GEMMA = (
    "its RMSNorm scales by (1 + weight), its embeddings are multiplied by sqrt(hidden_size) and its MLP is "
    "GeGLU (gelu_pytorch_tanh)"
)
REFUSED: dict[str, str] = {
    "gemma": f"megatron-core cannot compute Gemma exactly here: {_GEMMA}",
    "gemma2": f"megatron-core cannot compute Gemma 2 exactly here: {_GEMMA}, plus norms after attention and MLP, "
    "logit soft-capping and alternating sliding-window layers",
    "gemma3": f"megatron-core cannot compute Gemma 3 exactly here: {_GEMMA}, plus norms after attention and MLP, "
    "(1 + weight) q/k norms, alternating sliding-window layers with their own RoPE base",
    "gemma3_text": f"megatron-core cannot compute Gemma 3 exactly here: {_GEMMA}, plus norms after attention and "
    "MLP, (1 + weight) q/k norms, alternating sliding-window layers with their own RoPE base",
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
