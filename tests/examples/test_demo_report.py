"""The demo's mixtures and its report of their routing, on made-up evaluation outputs (no training).

The quick demo (tests/e2e/test_demo.py) trains no domain-router mixture; this checks what the full
demo does with them: which mixtures it upcycles, trains and evaluates at step 0, the step 0 | trained
figures, and the own-expert lines the report prints against issue 22's targets.
"""

from __future__ import annotations

import json
import sys

from bam_megatron.evaluation.report import own_expert_shares
from tests.support import paths

sys.path.insert(0, paths.EXAMPLES)

from bam_demo import pipeline as demo  # noqa: E402

NAMES = ["seed", "code", "law", "math"]


def test_full_demo_builds_every_mixture_quick_only_what_it_shows():
    full, quick = demo.Settings(), demo.Settings(**demo.QUICK)
    assert full.mixtures == full.step0_mixtures == ("btx", "bam", "btx-domain", "bam-domain")
    assert set(quick.mixtures) == {"btx", "bam"} and set(quick.step0_mixtures) <= {"bam", "bam-domain"}
    assert [demo.method(m) for m in demo.MIXTURES] == ["btx", "bam", "btx", "bam"]
    assert demo.label("bam-domain") == "BAM (domain routers)" and demo.label("btx") == "BTX"


def _entry(own_share: list[float]) -> dict:
    """A routing.json entry whose every expert's domain gives its own expert ``own_share[layer]`` (FFN and
    attention), the rest spread evenly; general spread evenly."""
    spread = lambda share, own: [share if n == own else (1 - share) / 3 for n in NAMES]  # noqa: E731
    routing = {
        kind: {d: [spread(share, d) for share in own_share] for d in ("general", *demo.EXPERTS)}
        for kind in ("attention_gates", "ffn_selection")
    }
    entry = {"variant": "bam", "num_layers": len(own_share), "moe_router_topk": 1, "expert_names": NAMES, **routing}
    entry["own_expert"] = own_expert_shares(entry, NAMES, {d: d for d in demo.DOMAINS})
    return entry


def test_report_prints_own_expert_shares_and_draws_step0_beside_trained(tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    models = {
        "bam": _entry([0.3, 0.3]),
        demo.step0_name("bam"): _entry([0.3, 0.3]),
        "bam-domain": _entry([0.5, 0.05]),  # after training: layer 1 below the 10% target
        demo.step0_name("bam-domain"): _entry([0.9, 0.65]),  # step 0: every layer above 60%
        demo.step0_name("btx-domain"): _entry([0.9, 0.65]),  # step 0 only: no side-by-side figure
    }
    (eval_dir / "routing.json").write_text(json.dumps({"domains": list(demo.DOMAINS), "models": models}))
    ppl = {d: 10.0 for d in (*demo.DOMAINS, "average")}
    names = ["seed", *demo.EXPERTS, "bam", "bam-domain"]
    (eval_dir / "perplexity.json").write_text(json.dumps({"models": {n: {"perplexity": ppl} for n in names}}))
    (eval_dir / "perplexity.md").write_text("| model |\n")
    (eval_dir / "routing.md").write_text(
        "# Own expert's share\n\ntext\n\n| model | router |\n|---|---|\n| OWN TABLE |\n"
    )

    demo.write_step0_vs_trained(str(eval_dir))
    figures = sorted(p.name for p in eval_dir.glob("*.png"))
    assert figures == sorted([demo.comparison_figure("bam"), demo.comparison_figure("bam-domain")])
    assert all((eval_dir / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)

    demo.report(str(tmp_path))
    out = capsys.readouterr().out
    assert "| OWN TABLE |" in out  # bam-eval's table, printed
    assert "[yes] BAM (domain routers), step 0: own FFN top-1 share >= 60%" in out
    assert "(lowest: 0.65, code, layer 1)" in out
    assert "[yes] BAM (domain routers), step 0: own attention gate (the largest) >= 50%" in out
    assert "[NO ] BAM (domain routers), trained: own FFN top-1 share >= 10%" in out
    assert "[yes] BTX (domain routers), step 0: own FFN top-1 share >= 60%" in out
    assert "(and BAM (domain routers) vs random routers on average: 10.00 vs 10.00" in out
    assert "BAM (domain routers) beats the seed on average" in out
    for f in figures:
        assert str(eval_dir / f) in out
