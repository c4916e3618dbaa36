"""The self-contained Hugging Face model code that bam-convert-hf copies into an exported directory.

``configuration_bam.py`` and ``modeling_bam.py`` import only torch and transformers (never
bam_megatron), so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works on a
machine without this package.
"""
