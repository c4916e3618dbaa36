"""Generate from a checkpoint with megatron-core's KV cache (same as the ``bam-generate`` command); see ``--help``.

python tools/generate.py --load runs/bam --prompt "def main(" --max-new-tokens 32
torchrun --nproc-per-node 2 tools/generate.py --load runs/bam --prompt-tokens 5,17,9 --tensor-model-parallel-size 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_megatron.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
