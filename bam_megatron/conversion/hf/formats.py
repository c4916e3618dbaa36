"""The transformers classes that compute bam-megatron models exactly, and which one ``--format auto`` picks.

Each `Target` (`target`) is one ``bam-convert-hf export --format``. Tensors are written under the
names each class's checkpoints use on the Hub (what vLLM, SGLang and TGI read; transformers 5 fuses
the experts into ``gate_up_proj`` itself when it loads them).

- ``llama``: ``LlamaForCausalLM``: dense, sequential, RMSNorm, no q/k norms; q/k/v biases as
  ``attention_bias`` (which adds an o_proj bias too: written as zeros);
- ``mistral``: ``MistralForCausalLM``: as Llama without biases (``sliding_window: null``);
- ``qwen2``: ``Qwen2ForCausalLM``: as Llama with q/k/v biases (zeros where the model has none);
  ``--format auto`` takes it for seeds imported from Qwen2 only (transformers' AutoTokenizer
  builds Qwen's byte-level tokenizer for every ``qwen2`` directory);
- ``qwen3``: ``Qwen3ForCausalLM``: as Llama with per-head q/k RMSNorms (no biases);
- ``phi3``: ``Phi3ForCausalLM`` (Phi-3, Phi-4): as Llama without biases, fused ``qkv_proj`` and
  ``gate_up_proj``, plain RoPE; ``--format auto`` takes it for seeds imported from Phi-3 only;
- ``olmo2``: ``Olmo2ForCausalLM``: as Llama with its norms after attention and MLP and q/k
  RMSNorms over the whole projection (`olmo2`);
- ``cohere``: ``CohereForCausalLM``: dense, parallel, bias-free LayerNorm (`cohere`);
- ``qwen2_moe``: ``Qwen2MoeForCausalLM``: BTX, sequential; softmax then top-k (``norm_topk_prob``
  false) or renormalised (true); no shared expert;
- ``qwen3_moe``: ``Qwen3MoeForCausalLM``: as ``qwen2_moe`` with per-head q/k RMSNorms, no biases;
- ``mixtral``: ``MixtralForCausalLM``: BTX, sequential, renormalised top-k routing;
- ``bam``: remote code (`bam_format`): every variant and block.

All of them: RoPE (rotate-half, plain or Llama-3 scaling; Phi-3 plain), GQA, any head size, tied
or untied embeddings, no sliding window. Each native class is defined with its family (its table,
read both ways: `bridge`), in `llama`, `cohere`, `moe`, `phi3` and `olmo2`.
"""

from __future__ import annotations

from typing import Optional

from bam_megatron.conversion.hf.bam_format import BamTarget
from bam_megatron.conversion.hf.cohere import CohereTarget
from bam_megatron.conversion.hf.gemma2 import Gemma2Target
from bam_megatron.conversion.hf.gemma3 import Gemma3Target
from bam_megatron.conversion.hf.llama import LlamaTarget, MistralTarget, Qwen2Target, Qwen3Target
from bam_megatron.conversion.hf.moe import MixtralTarget, Qwen2MoeTarget, Qwen3MoeTarget
from bam_megatron.conversion.hf.olmo2 import Olmo2Target
from bam_megatron.conversion.hf.phi3 import Phi3Target
from bam_megatron.conversion.hf.target import Target
from bam_megatron.model.architecture import Architecture

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        LlamaTarget(),
        MistralTarget(),
        Qwen2Target(),
        Qwen3Target(),
        Phi3Target(),
        Olmo2Target(),
        Gemma3Target(),
        Gemma2Target(),
        Qwen2MoeTarget(),
        Qwen3MoeTarget(),
        MixtralTarget(),
        CohereTarget(),
        BamTarget(),
    )
}
"""--format -> its target."""

NATIVE_BY_MODEL_TYPE = {t.model_type: t for t in TARGETS.values() if not t.remote_code}


def preferences(a: Architecture, imported_model_type: Optional[str] = None) -> list[Target]:
    """The native classes ``--format auto`` tries for this architecture, in order: the family the
    seed was imported from, then by what the model computes."""
    order: list[str] = []
    family = NATIVE_BY_MODEL_TYPE.get(imported_model_type)
    if family is not None and getattr(family, "moe", False) == a.is_moe:
        order.append(family.name)
    if a.has_soft_moa:
        pass
    elif a.norm_placement == "both" or a.apply_layernorm_1p:
        order += [] if a.is_moe else ["gemma3_text", "gemma2"]
    elif a.norm_placement == "post" or a.qk_layernorm_scope == "projection":
        order += [] if a.is_moe else ["olmo2"]
    elif a.block_type == "parallel":
        order += [] if a.is_moe else ["cohere"]
    elif a.is_moe:
        order += (["mixtral"] if not a.moe_router_pre_softmax else []) + ["qwen2_moe", "qwen3_moe"]
    else:  # q/k/v biases go to Llama (attention_bias) unless the seed is a Qwen2: AutoTokenizer forces
        # Qwen's own byte-level tokenizer on model_type qwen2, whatever tokenizer the export ships
        order += ["qwen3"] if a.qk_layernorm else ["llama"]
    seen: list[Target] = []
    for name in order:
        if TARGETS[name] not in seen:
            seen.append(TARGETS[name])
    return seen
