"""What the reproduction compares: the upcycled mixtures (``Init``) and their training runs (``Arm``).

Every arm is trained once per mixture seed (``--seeds``): seed ``s`` initialises the upcycled
routers (``bam-upcycle --seed s``) and orders the training data (``pretrain_bam.py --seed s``), so
the runs of one seed see the same batches in every arm (the t-tests pair them by seed). The dense
seed and experts are shared by all arms (one run each).

- Table 1: BTX, BAM (expert KV) and BAM shared-KV, data-matched (DM: the same tokens) and
  compute-matched (CM: BAM gets BTX's training FLOPs, so fewer tokens; FLOPs per token from
  model_stats.py, i.e. bam-stats' counting, in one of its two counts: `FLOPS_COUNTS`).
- Table 4: BTX with more FFN experts (copies of the seed) to match BAM's total parameters.
- Table 5: BTX with 6 experts, top-3 (the paper's active-parameter match).
- Table 6: BAM with soft MoA, top-2 and top-1 MoA (``bam-upcycle --attention-router-topk``).
- Routers: BTX and BAM upcycled with routers initialised from each expert's domain
  (``bam-upcycle --router-init domain``) instead of at random, data-matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bam_megatron.model.variants import SOFT_MOA_VARIANTS

SOURCES = ("seed", "code", "law", "math")
"""The dense models, in expert order (the demo's ``Pipeline.sources``)."""


FLOPS_COUNTS = {
    "layers": "training_flops_per_token",
    "with-output-layer": "training_flops_per_token_with_output_layer",
}
"""The counts of training FLOPs per token a compute-matched arm can be sized by -> their model_stats.py field:
the transformer layers only (the paper's Table 7 convention), or complete, the output layer included
(Megatron-LM's num_floating_point_operations; docs/design.md section 6)."""

DEFAULT_FLOPS_COUNT = "layers"
"""What sizes the present report's compute-matched arms: the count it was run with, so its runs stay current."""

FLOPS_COUNT_LABELS = {
    "layers": "the transformer layers only (the paper's Table 7 convention)",
    "with-output-layer": "the whole model, the output layer included (Megatron-LM's num_floating_point_operations)",
}
"""How the report names each of `FLOPS_COUNTS`."""


@dataclass(frozen=True)
class Init:
    """One upcycled mixture: bam-upcycle's method, FFN experts (beyond four: copies of the seed) and routing."""

    key: str
    method: str
    experts: int = 4
    ffn_topk: int = 1
    attention_topk: Optional[int] = None
    router_init: str = "random"  # bam-upcycle's --router-init
    stats: str = ""  # its row in model_stats.py's output

    def source_names(self) -> list[str]:
        """Expert names in order: the four sources, then seed2, seed3, ... (the extra copies of the seed)."""
        return [*SOURCES, *(f"seed{i}" for i in range(2, self.experts - len(SOURCES) + 2))]

    def upcycle_flags(self) -> list[str]:
        """bam-upcycle flags beyond --expert, --method and --save."""
        flags = ["--moe-router-topk", str(self.ffn_topk), "--report-batches", "0"]
        if self.attention_topk is not None:
            flags += ["--attention-router-topk", str(self.attention_topk)]
        if self.router_init != "random":  # the default: the flag left out, as before the option existed
            flags += ["--router-init", self.router_init]
        return flags


@dataclass(frozen=True)
class Arm:
    """One training recipe: an upcycled ``init`` trained for ``iters`` iterations (each seed)."""

    key: str
    label: str
    init: Init
    iters: int
    flops_count: Optional[str] = None  # compute-matched arms: the `FLOPS_COUNTS` entry that sized ``iters``


def total_matched_btx(stats: dict[str, dict]) -> str:
    """The BTX (more FFN experts, top-1) whose total parameters are closest to BAM's."""
    candidates = [name for name in stats if name.startswith("btx-e") and name[5:].isdigit()]
    target = stats["bam"]["total_params"]
    return min(candidates, key=lambda name: (abs(stats[name]["total_params"] - target), name))


def compute_matched_iters(
    iters: int, stats: dict[str, dict], variant: str, flops_count: str = DEFAULT_FLOPS_COUNT
) -> int:
    """Iterations that give ``variant`` the training FLOPs of BTX's ``iters`` (same tokens per iteration),
    FLOPs per token counted by ``flops_count`` (a key of `FLOPS_COUNTS`)."""
    if flops_count not in FLOPS_COUNTS:
        raise ValueError(f"unknown FLOPs count {flops_count!r}; choose from {', '.join(FLOPS_COUNTS)}")
    field = FLOPS_COUNTS[flops_count]
    ratio = stats["btx"][field] / stats[variant][field]
    return max(1, round(iters * ratio))


ARM_KEYS = (
    "btx",
    "bam",
    "bam-shared-kv",
    "bam-cm",
    "bam-shared-kv-cm",
    "btx-total",
    "btx-e6-top3",
    "bam-top2",
    "bam-top1",
    "btx-domain",
    "bam-domain",
)
"""Every arm's key, in the report's order (build_arms makes them)."""


def build_arms(iters: int, stats: dict[str, dict], flops_count: str = DEFAULT_FLOPS_COUNT) -> list[Arm]:
    """Every arm, for a data-matched budget of ``iters`` iterations; the compute-matched arms sized by
    ``flops_count`` (a key of `FLOPS_COUNTS`)."""
    btx_total = total_matched_btx(stats)
    inits = {
        "btx": Init("btx", "btx", stats="btx"),
        "bam": Init("bam", "bam", stats="bam"),
        "bam-shared-kv": Init("bam-shared-kv", "bam-shared-kv", stats="bam-shared-kv"),
        btx_total: Init(btx_total, "btx", experts=int(btx_total[5:]), stats=btx_total),
        "btx-e6-top3": Init("btx-e6-top3", "btx", experts=6, ffn_topk=3, stats="btx-e6-top3"),
        "bam-top2": Init("bam-top2", "bam", attention_topk=2, stats="bam"),
        "bam-top1": Init("bam-top1", "bam", attention_topk=1, stats="bam"),
        "btx-domain": Init("btx-domain", "btx", router_init="domain", stats="btx"),
        "bam-domain": Init("bam-domain", "bam", router_init="domain", stats="bam"),
    }
    cm = {v: compute_matched_iters(iters, stats, v, flops_count) for v in SOFT_MOA_VARIANTS}
    return [
        Arm("btx", "BTX", inits["btx"], iters),
        Arm("bam", "BAM (expert KV)", inits["bam"], iters),
        Arm("bam-shared-kv", "BAM (shared KV)", inits["bam-shared-kv"], iters),
        Arm("bam-cm", "BAM (expert KV), compute-matched", inits["bam"], cm["bam"], flops_count),
        Arm(
            "bam-shared-kv-cm",
            "BAM (shared KV), compute-matched",
            inits["bam-shared-kv"],
            cm["bam-shared-kv"],
            flops_count,
        ),
        Arm("btx-total", f"BTX, {inits[btx_total].experts} FFN experts (total params)", inits[btx_total], iters),
        Arm("btx-e6-top3", "BTX, 6 FFN experts, top-3 (active params)", inits["btx-e6-top3"], iters),
        Arm("bam-top2", "BAM, top-2 MoA", inits["bam-top2"], iters),
        Arm("bam-top1", "BAM, top-1 MoA", inits["bam-top1"], iters),
        Arm("btx-domain", "BTX, domain routers", inits["btx-domain"], iters),
        Arm("bam-domain", "BAM (expert KV), domain routers", inits["bam-domain"], iters),
    ]


def inits_of(arms: list[Arm]) -> list[Init]:
    """The distinct upcycled mixtures the arms start from, in order."""
    seen: dict[str, Init] = {}
    for arm in arms:
        seen.setdefault(arm.init.key, arm.init)
    return list(seen.values())
