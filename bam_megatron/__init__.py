"""bam-megatron: Branch-Attend-Mix mixture-of-experts upcycling on megatron-core.

Package layout (one folder per concern):

- ``platform``: process groups, CPU mode for megatron-core (gloo, no CUDA)
- ``model``: BAMConfig, soft MoA attention, parallel block, layer specs, model builder
- ``data``: SentencePiece tokenizer, preprocessing to indexed datasets, domain mixtures
- ``training``: pretrain_bam.py's flags, loop, checkpoints and metrics
- ``conversion``: branching a seed into experts, upcycling dense experts into an MoE
- ``evaluation``: per-domain perplexity tables and routing analysis (``bam-eval``)
- ``stats``: ``bam-stats``, parameter counts and FLOPs per token
- ``testing``: the multi-rank test harness, rank launcher and shard helpers
"""

import warnings

from bam_megatron import lazy_compile
from bam_megatron.version import __version__

# megatron-core's torch.compile decorators import TorchDynamo at import time: deferred to their first call
# in every process that imports this package (bam_megatron.lazy_compile).
lazy_compile.install()

# megatron-core warns at import time, once per module, that Transformer Engine / apex are missing.
# Without a GPU that is the expected state (the local spec and CPU mode cover it), not news.
warnings.filterwarnings(
    "ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed", category=UserWarning
)
# Emitted by every TransformerConfig built with megatron-core's own default cuda_graph_scope.
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
# megatron-core 0.16.1 still calls torch.distributed's older collective names.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

__all__ = ["__version__"]
