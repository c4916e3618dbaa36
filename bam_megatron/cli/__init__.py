"""Entry points that join several layers: ``pretrain_bam.py`` (training, PEFT, checkpoints),
``bam-branch`` (the phase-1 conversion, written as pretrain_bam.py flags) and ``bam-eval`` (its
``harness`` sub-command evaluates Hugging Face exports: evaluation and conversion).

Tools that live within one layer keep their ``main`` beside their code (``bam-upcycle`` in
`bam_megatron.conversion.upcycle`, ``bam-eval``'s perplexity table in `bam_megatron.evaluation.cli`,
...). Every
tool applies the same error policy, `bam_megatron.errors.run_tool`.
"""
