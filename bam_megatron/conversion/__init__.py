"""Checkpoint conversion: branching a seed into experts, upcycling dense experts into an MoE."""
