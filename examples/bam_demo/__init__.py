"""The ``make demo`` pipeline: the whole Branch-Attend-Mix method on a CPU (entry point: run.py).

corpora.py   the four domains of text (general, code, law, math), found on the machine
pipeline.py  the stages and the flags they pass to pretrain_bam.py and tools/
runner.py    console, subprocess jobs, stamps (reuse of finished stages), interrupts
run.py       the command line
"""
