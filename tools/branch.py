"""Phase 1: branch a seed checkpoint into dense-expert runs (see bam_megatron.conversion.branch)."""

import sys

from bam_megatron.cli.branch import main

if __name__ == "__main__":
    sys.exit(main())
