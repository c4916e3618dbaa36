"""Train a SentencePiece tokenizer (same as the ``bam-train-tokenizer`` command); see ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bam_megatron.data.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
