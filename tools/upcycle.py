"""Phase 3: upcycle dense experts into a BAM / BTX / sparse-upcycled MoE (see bam_megatron.conversion.upcycle)."""

import sys

from bam_megatron.conversion.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
