"""Hugging Face interop: export checkpoints for transformers, import models as seeds (bam_megatron.conversion.hf)."""

import sys

from bam_megatron.conversion.hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
