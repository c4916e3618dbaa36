"""Per-domain perplexity table and MoE routing heatmaps (same as the ``bam-eval`` command); see ``--help``.

python tools/eval.py --model seed=ckpt/seed --model bam=ckpt/bam --data-path data/code_text_document ...
torchrun --nproc-per-node 2 tools/eval.py ... --tensor-model-parallel-size 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_megatron.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
