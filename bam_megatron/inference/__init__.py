"""bam-generate: text generation from any checkpoint with megatron-core's KV cache (docs/generation.md).

- ``generate``: the decoding loop over megatron-core's `StaticInferenceContext` (or without a
  cache, the reference), greedy or sampled (temperature, top-k, top-p), tensor-parallel aware;
- ``cli``: ``bam-generate`` / ``tools/generate.py``.
"""
