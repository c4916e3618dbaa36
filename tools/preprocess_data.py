"""JSONL -> megatron-core indexed datasets (same as the ``bam-preprocess-data`` command); see ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_megatron.data.preprocess import main  # noqa: E402

if __name__ == "__main__":  # guarded: worker processes may re-import this file
    raise SystemExit(main())
