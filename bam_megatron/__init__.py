"""bam-megatron: Branch-Attend-Mix mixture-of-experts upcycling on megatron-core.

Package layout (one folder per concern):

- ``platform``: process groups, CPU mode for megatron-core (gloo, no CUDA)
- ``model``: layer specs and model builders
- ``testing``: the multi-rank test harness and shard helpers
"""

from bam_megatron.version import __version__

__all__ = ["__version__"]
