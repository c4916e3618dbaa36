"""examples/reproduce/: the compute-matched arms sized by either FLOPs count, and Table 1 saying which (fast)."""

from __future__ import annotations

import sys

import pytest

from tests.support import paths
from tests.support.reproduce import fake_stats

sys.path.insert(0, paths.EXAMPLES)

from reproduce import arms  # noqa: E402
from reproduce.report import COMPUTE_COLUMNS, Results, table1  # noqa: E402

OUTPUT_LAYER = 8000  # made-up training FLOPs per token of the output layer, the same in every model


def complete_stats() -> dict:
    """test_reproduce's made-up sizes with the complete count too: layers + the output layer."""
    stats = fake_stats()
    for row in stats.values():
        row["training_flops_per_token_with_output_layer"] = row["training_flops_per_token"] + OUTPUT_LAYER
    return stats


def test_compute_matched_arms_by_either_count():
    stats = complete_stats()
    # layers: BTX 10,000, BAM 22,000, BAM shared-KV 16,000 per token -> 200 x 10/22 = 91, 200 x 10/16 = 125
    default = {a.key: a for a in arms.build_arms(200, stats)}
    assert arms.DEFAULT_FLOPS_COUNT == "layers"
    assert (default["bam-cm"].iters, default["bam-shared-kv-cm"].iters) == (91, 125)
    assert default["bam-cm"].flops_count == default["bam-shared-kv-cm"].flops_count == "layers"
    assert default["bam"].flops_count is None and default["btx"].flops_count is None  # data-matched
    # with the output layer: BTX 18,000, BAM 30,000, shared KV 24,000 -> 200 x 18/30 = 120, 200 x 18/24 = 150
    complete = {a.key: a for a in arms.build_arms(200, stats, "with-output-layer")}
    assert (complete["bam-cm"].iters, complete["bam-shared-kv-cm"].iters) == (120, 150)
    assert complete["bam-cm"].flops_count == "with-output-layer"
    assert {k: a.iters for k, a in complete.items() if not k.endswith("-cm")} == {
        k: a.iters for k, a in default.items() if not k.endswith("-cm")
    }
    assert arms.compute_matched_iters(200, stats, "bam", "with-output-layer") == 120
    with pytest.raises(ValueError, match="with-output-layer"):
        arms.compute_matched_iters(200, stats, "bam", "everything")


def _results(flops_count: str, stats: dict) -> Results:
    """Results without any run: Table 1's sizing and compute cells only."""
    built = arms.build_arms(200, stats, flops_count)
    return Results(built, [1], stats, 1000, {}, {}, {}, {})


@pytest.mark.parametrize("flops_count", list(arms.FLOPS_COUNTS))
def test_table1_states_which_count_sized_the_arms(flops_count):
    lines = table1(_results(flops_count, complete_stats()))
    text = "\n".join(lines)
    assert f"counted over {arms.FLOPS_COUNT_LABELS[flops_count]}" in text
    other = next(c for c in arms.FLOPS_COUNTS if c != flops_count)
    would = {"layers": (91, 125), "with-output-layer": (120, 150)}[other]
    assert f"Counted {arms.FLOPS_COUNT_LABELS[other]}, BTX's compute would be {would[0]} iterations" in text
    assert "| " + " | ".join(COMPUTE_COLUMNS) + " |" in text
    # BTX: 200 iterations x 1,000 tokens = 0.2 M tokens; x 10,000 = 2e9 FLOP (layers), x 18,000 = 3.6e9
    assert "| BTX | 200 | 0.20 | 0.00 | 0.00 |" in text  # TFLOP at two decimals
    row = next(line for line in lines if line.startswith("| BAM (expert KV), compute-matched |"))
    iters = arms.compute_matched_iters(200, complete_stats(), "bam", flops_count)
    assert row.startswith(f"| BAM (expert KV), compute-matched | {iters} |")


def test_table1_reads_a_stats_file_without_the_complete_count():
    """A stats.json written before the complete count: its compute cell is '–', the other count not offered."""
    text = "\n".join(table1(_results("layers", fake_stats())))
    assert "| BTX | 200 | 0.20 | 0.00 | – |" in text
    assert "would be" not in text
