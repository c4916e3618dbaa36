"""Helpers for the test suite (and benchmarks) that are useful outside tests/ too."""
