"""``make reproduce``: the BAM paper's comparisons on the demo's four domains, with seeds and error bars.

arms.py          what is compared: the mixtures (arms), their upcycling and training budgets
model_stats.py   parameters and FLOPs per token of every arm (bam-stats' counting), a pipeline tool
significance.py  mean, standard deviation and the paired t-test over seeds
pipeline.py      the stages after the demo's dense phases (examples/bam_demo/pipeline.py)
report.py        REPORT.md: the tables in the paper's layout, bar plots, loss curves, routing
run.py           the command line
"""
