"""Hugging Face interop (``bam-convert-hf``, ``tools/convert_hf.py``).

Export (checkpoint -> Hugging Face directory):

- `export`: the driver: picks the class (``--format auto``), plans the tensors on a meta model,
  reads the checkpoint one layer at a time and writes sharded safetensors tensor by tensor, the
  configs and the tokenizer, then loads the result back with transformers before publishing it.
- `target`: what every export format provides (`Target`: exactness check, config.json, tensor
  mapping of one unit) and the shared mappings; `formats`: the registry of ``--format``s and
  ``auto``'s preferences; `bam_format`: the self-contained remote code (every variant and block;
  its code in `remote/`).
- `hf_tokenizer`: the tokenizer an export ships (a Hugging Face tokenizer copied; a SentencePiece
  model with a tokenizer.json built from it, so AutoTokenizer gives the ids we trained on).

Import (Hugging Face directory -> seed checkpoint):

- `importer` (what every family's import shares: config fields, RoPE settings, tensor checks),
  `remote_import` (our own remote-code exports, every variant), `families` (which model_type is
  read, and why Gemma and OLMo-2 are not).

The native families, both ways, one file each (its table of tensor mappings, read both ways by
`bridge`; its export checks and config.json; its import's config checks): `llama` (Llama,
Mistral, Qwen2, Qwen3: the sequential block), `phi3` (Phi-3, Phi-4: fused projections), `cohere`
(Cohere: the parallel block), `moe` (Qwen2-MoE, Qwen3-MoE, Mixtral: BTX). A new family is one
such file, registered in `formats.TARGETS` and `families.IMPORTERS` (docs/hf.md).

Both: `convert` (the import driver, and the entry points), `megatron_io` (our checkpoints on one
process; imports written layer by layer), `hf_files` (config.json, safetensors read tensor by
tensor and written in shards, atomic output), `cli` (the command line).
"""
