"""bam-megatron's own small lm-evaluation-harness tasks, run offline from the JSONL files here.

Each ``*.yaml`` is an lm-eval task (its YAML format); ``local_data.load`` reads the task's JSONL
splits next to it, so no dataset is downloaded. The texts were written for this project in the
spirit of public benchmarks (ARC, LegalBench, GSM8K); they test the pipeline, not a model's skill.

- ``bam_mc``: multiple choice, 4 options, short science questions (ARC-style), ``acc``/``acc_norm``;
- ``bam_legal``: yes/no clause classification (a LegalBench-style task), ``acc``;
- ``bam_gen``: arithmetic word problems answered ``#### N`` (GSM8K-style), ``exact_match``.

All three carry the tag ``bam_local``.
"""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
