"""Parameter-efficient mixture-of-experts fine-tuning: MoV and MoLoRA (docs/design.md §4, docs/peft.md)."""

from bam_megatron.peft.apply import adapter_parameters, apply_peft, is_adapter_name
from bam_megatron.peft.config import METHODS, PeftConfig

__all__ = ["METHODS", "PeftConfig", "adapter_parameters", "apply_peft", "is_adapter_name"]
