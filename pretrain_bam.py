"""Train the seed, the dense experts or a BAM/BTX mixture on megatron-core.

    torchrun --nproc-per-node 2 pretrain_bam.py --variant dense --preset tiny \
        --data-path 0.5 data/code_text_document 0.5 data/law_text_document \
        --tokenizer-model tok.model --train-iters 100 --save runs/seed

`python pretrain_bam.py --help` lists every flag (Megatron-LM names where one exists).
Exit codes: 0 done, 2 bad input, 3 preempted (checkpoint saved), 4 too many NaN/Inf iterations.
"""

import sys

from bam_megatron.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
