"""bam-eval: per-domain perplexity tables and routing analysis for dense and MoE checkpoints.

- ``checkpoints``: resolve ``NAME=CHECKPOINT`` flags, check the models share a tokenizer, load one
  under any TP/PP/EP layout;
- ``data``: each domain's held-out validation documents, in evaluation micro-batches;
- ``perplexity``: forward-only passes through megatron-core's schedule, exp(mean token loss);
- ``routing``: forward hooks on the attention and FFN routers, per-layer means per domain;
- ``report``: the markdown table, JSON files and routing heatmaps (written atomically);
- ``cli``: ``bam-eval`` / ``tools/eval.py``.
"""
