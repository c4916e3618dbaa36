"""Training on megatron-core: arguments, data loading, the loop, checkpoints, logging."""
