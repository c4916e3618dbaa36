"""Hugging Face interop (``bam-convert-hf``, ``tools/convert_hf.py``).

- `cohere`: a dense parallel-block model <-> transformers' ``CohereForCausalLM`` (same block:
  one bias-free LayerNorm, attention and SwiGLU FFN in parallel), both directions, exact.
- `bam_format`: any bam-megatron model (dense, BTX, BAM, BAM shared-KV) -> a self-contained
  directory that ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads; its
  code is in `remote/`.
- importing Hugging Face models as seeds: `importer` (what every family's import shares: config
  fields, RoPE settings, tensor checks), `llama` (Llama, Mistral, Qwen2, Qwen3: the sequential
  block), `cohere.CohereImporter`, `families` (which model_type is read, and why Gemma and OLMo-2
  are not).
- `megatron_io`: our checkpoints in and out (any TP/PP/EP, read on one process; imports written
  layer by layer).
- `hf_files`: Hugging Face directories: config.json, safetensors (single or sharded), tokenizer,
  atomic output.
- `cli`: the command line.
"""
