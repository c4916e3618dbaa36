"""Made-up model sizes for the reproduction's fast tests (examples/reproduce/: arms and report)."""

from __future__ import annotations

import sys

from tests.support import paths

if paths.EXAMPLES not in sys.path:
    sys.path.insert(0, paths.EXAMPLES)

from reproduce.model_stats import shapes  # noqa: E402


def fake_stats() -> dict:
    """model_stats.py's output for made-up sizes: attention 4 units, FFN expert 6 units per layer (the paper's
    proportions), so 6 experts match BAM's total parameters."""
    out = {}
    for name, shape in shapes().items():
        experts, k = shape["num_experts"] or 1, shape["moe_router_topk"]
        attention = 4 if shape["variant"] in ("bam", "bam-shared-kv") else 1
        if shape["variant"] == "bam-shared-kv":
            attention = 2.5
        out[name] = {
            **shape,
            "total_params": int(1000 * (attention * 4 + experts * 6)),
            "active_params": int(1000 * (attention * 4 + k * 6)),
            "training_flops_per_token": int(1000 * (attention * 4 + k * 6)),
        }
    return out
