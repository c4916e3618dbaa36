"""Data: tokenizer, tokenizer training, JSONL -> megatron-core indexed datasets, and the training datasets.

- ``tokenizer``: ``SentencePieceTokenizer`` (the ids megatron-core's GPTDataset needs) and Megatron's
  padded vocabulary size
- ``train_tokenizer``: ``bam-train-tokenizer`` / ``tools/train_tokenizer.py``
- ``preprocess``: ``bam-preprocess-data`` / ``tools/preprocess_data.py`` (Megatron-LM's flags and output
  names), built from ``jsonl`` (reading), ``encoder`` (worker-side tokenizing) and ``indexed_writer``
  (complete-or-absent datasets)
- ``datasets``, ``atomic_cache``: domain mixtures over GPTDataset for training
- ``synthetic``: deterministic generated text for tests and benchmarks
- ``errors``: ``DataError``, the one exception type for bad input anywhere in this package
"""
