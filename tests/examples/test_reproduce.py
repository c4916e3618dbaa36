"""examples/reproduce/: the statistics, the arms' sizing and the report (fast), and --quick end to end (e2e)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import paths
from tests.support.reproduce import fake_stats

REPO = paths.REPO
sys.path.insert(0, paths.EXAMPLES)

from bam_demo.pipeline import DOMAINS, Settings  # noqa: E402
from bam_demo.runner import Console  # noqa: E402
from reproduce import arms, significance  # noqa: E402
from reproduce.pipeline import ReproducePipeline, stages  # noqa: E402
from reproduce.report import write_report  # noqa: E402


@pytest.mark.parametrize("t, df", [(12.706, 1), (4.303, 2), (2.776, 4), (2.228, 10), (1.960, 100000)])
def test_the_t_distribution_matches_the_tables_critical_values(t, df):
    assert significance.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert significance.t_two_sided_p(-t, df) == pytest.approx(0.05, abs=2e-4)
    assert significance.t_two_sided_p(0.0, df) == pytest.approx(1.0)


def test_the_paired_test_works_on_differences():
    test = significance.paired_test([10.0, 11.0, 12.5], [10.5, 11.4, 13.4])  # differences -0.5, -0.4, -0.9
    assert test.mean_diff == pytest.approx(-0.6) and test.df == 2 and test.a_lower == 3
    assert test.t == pytest.approx(-0.6 / (test.std_diff / 3**0.5))
    assert 0.01 < test.p < 0.1
    # a constant shift is the same test whatever the level of each seed
    shifted = significance.paired_test([10.0, 20.0, 30.5], [10.5, 20.4, 31.4])
    assert shifted.t == pytest.approx(test.t)
    assert significance.mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        significance.paired_test([1.0], [2.0])


def test_arms_are_sized_from_the_counts():
    stats = fake_stats()
    assert arms.total_matched_btx(stats) == "btx-e6"  # BAM: 16 + 24 = 40; BTX-6: 4 + 36 = 40
    by_key = {a.key: a for a in arms.build_arms(200, stats)}
    assert tuple(by_key) == arms.ARM_KEYS  # --arms names them
    assert set(by_key) == {
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
    }
    assert by_key["bam-cm"].iters == round(200 * 10 / 22) and by_key["btx"].iters == 200
    assert by_key["btx-total"].init.source_names() == ["seed", "code", "law", "math", "seed2", "seed3"]
    assert "--attention-router-topk" in by_key["bam-top1"].init.upcycle_flags()
    assert by_key["btx-e6-top3"].init.upcycle_flags()[:2] == ["--moe-router-topk", "3"]
    assert by_key["bam-cm"].init is by_key["bam"].init and len(arms.inits_of(list(by_key.values()))) == 9
    for key in ("btx", "bam"):  # the domain-router arms: the same mixture and budget, other routers
        domain, random = by_key[f"{key}-domain"], by_key[key]
        assert domain.iters == random.iters and domain.init.method == random.init.method
        assert domain.init.upcycle_flags() == [*random.init.upcycle_flags(), "--router-init", "domain"]
        assert "--router-init" not in random.init.upcycle_flags()  # bam-upcycle's default: random


def test_domain_router_arms_are_evaluated_apart_so_a_rerun_reuses_the_other_evaluations(tmp_path):
    pipeline = ReproducePipeline(str(tmp_path), Settings(mix_iters=200), 1, 1, Console(stages(2)), [1, 2])
    pipeline.arms = arms.build_arms(200, fake_stats())
    names = {arm.key: pipeline.eval_name(arm, 2) for arm in pipeline.arms}
    assert names["bam"] == names["btx"] == names["bam-top1"] == "s2-e4"  # as before the domain arms existed
    assert names["bam-domain"] == names["btx-domain"] == "s2-e4-domain"
    assert names["btx-total"] == "s2-e6"


def _write(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def _ppl(base: float) -> dict:
    values = {d: base + i for i, d in enumerate(DOMAINS)}
    return {"perplexity": {**values, "average": sum(values.values()) / len(values)}}


def test_the_report_has_every_table_the_orderings_and_the_figures(tmp_path):
    workdir = str(tmp_path / "work")
    stats = fake_stats()
    pipeline = ReproducePipeline(workdir, Settings(mix_iters=200), 1, 1, Console(stages(3)), [1, 2, 3])
    _write(pipeline.stats_file(), stats)
    pipeline.arms = arms.build_arms(200, stats)
    # made-up results: BAM below BTX in every seed; top-1 MoA above soft MoA; shared KV missing seed 3
    level = {"btx": 20.0, "bam": 18.0, "bam-top1": 19.0, "btx-total": 19.5, "btx-domain": 19.0, "bam-domain": 18.0}
    evals: dict[str, dict] = {}
    for arm in pipeline.arms:
        for seed in pipeline.seeds:
            if arm.key == "bam-shared-kv" and seed == 3:
                continue
            models = evals.setdefault(pipeline.eval_name(arm, seed), {})
            models[arm.key] = _ppl(level.get(arm.key, 18.5) + 0.1 * seed + (0.05 if seed == 2 else 0))
            records = [
                {"kind": "train", "iteration": i, "consumed_samples": 16 * i, "global_batch_size": 16}
                | {"lm_loss": 6.0 - 0.01 * i, "router_losses": {"load_balancing_loss": 1.0 + 0.1 / i}}
                for i in range(10, arm.iters + 1, 10)
            ]
            _write(os.path.join(pipeline.run_dir(arm, seed), "metrics.jsonl"), "\n".join(map(json.dumps, records)))
    for name, models in evals.items():
        _write(os.path.join(pipeline.eval_dir(name), "perplexity.json"), {"models": models})
    entry = {
        "num_layers": 2,
        "expert_names": list(arms.SOURCES),
        "ffn_selection": {d: [[0.25] * 4, [0.5, 0.02, 0.2, 0.28]] for d in DOMAINS},
    }
    for seed in pipeline.seeds:
        routing = {"btx": entry, "btx-step0": entry}
        _write(os.path.join(pipeline.eval_dir(f"s{seed}-e4"), "routing.json"), {"models": routing})
        # domain routers: at step 0 each domain's own expert gets 0.7 + 0.1·seed of its tokens at layer 0
        # (the other two experts' domains alike) and 0.9 at layer 1; after training 0.5 and 0.3
        own = lambda first, second: {  # noqa: E731
            d: [
                [first if name == d else (1 - first) / 3 for name in arms.SOURCES],
                [second if name == d else (1 - second) / 3 for name in arms.SOURCES],
            ]
            for d in DOMAINS
        }
        step0 = dict(entry, ffn_selection=own(0.7 + 0.1 * seed, 0.9), attention_gates=own(0.6, 0.6))
        trained = dict(entry, ffn_selection=own(0.5, 0.3))
        routing = {"btx-domain": trained, "btx-domain-step0": step0}
        _write(os.path.join(pipeline.eval_dir(f"s{seed}-e4-domain"), "routing.json"), {"models": routing})
    _write(
        os.path.join(pipeline.eval_dir("dense"), "perplexity.json"),
        {"models": {"seed": _ppl(25.0), **{e: _ppl(24.0) for e in ("code", "law", "math")}}},
    )
    out = str(tmp_path / "report")
    headline = write_report(pipeline, out, "python examples/reproduce/run.py", [("seed", 60.0, False)])
    report = open(os.path.join(out, "REPORT.md")).read()
    for title in ("Table 1", "Table 4", "Table 5", "Table 6", "random vs from each expert's domain", "orderings"):
        assert title in report, title
    assert "FFN routing" in report
    # random vs domain routers: rows, the paired tests (BTX: domain lower by 1.00 in every seed; BAM: equal)
    routers = report.split("## Routers initialised at random")[1].split("\n## ")[0]
    assert "| BTX, domain routers | 200 |" in routers and "| BAM (expert KV), domain routers | 200 |" in routers
    assert "BTX, domain routers − BTX: -1.00 ± 0.00" in routers
    assert "BAM (expert KV), domain routers − BAM (expert KV): +0.00 ± 0.00" in routers
    assert "So domain routers help BTX significantly" in routers
    # own FFN expert at step 0: per seed mean of (0.7 + 0.1·seed, 0.9) over layers, lowest 0.8 (seed 1, layer 0)
    means = [(0.7 + 0.1 * seed + 0.9) / 2 for seed in (1, 2, 3)]
    mean, std = significance.mean_std(means)
    step0_cell = f"{mean:.2f} ± {std:.2f} (lowest 0.80)"
    assert f"| BTX, domain routers | {step0_cell} | 0.40 ± 0.00 (lowest 0.30) | 0.60 ± 0.00 (lowest 0.60) | – |" in (
        routers
    ), routers
    # random routers: the shared entry, layer 0 flat (0.25), layer 1 code 0.02, law 0.20, math 0.28
    assert "| BTX | 0.21 ± 0.00 (lowest 0.02) | 0.21 ± 0.00 (lowest 0.02) | – | – |" in routers, routers
    assert headline in report and "compute-matched" in headline
    # the BTX row: mean ± std over the three seeds of the average column
    btx = [20.0 + 1.5 + 0.1 * s + (0.05 if s == 2 else 0) for s in (1, 2, 3)]
    mean, std = significance.mean_std(btx)
    assert re.search(rf"\| BTX \| 200 \| [\d.]+ \| [\d.]+ \|.*\| {mean:.2f} ± {std:.2f} \|", report)
    # the BAM vs BTX test is the paired test of those numbers (a constant shift: infinite t, p = 0)
    assert "BAM (expert KV) − BTX: -2.00 ± 0.00" in report
    assert re.search(r"\| BAM beats BTX, data-matched \(Table 1\) \|[^|]*\| 19\.72 vs 21\.72 \| yes", report)
    assert re.search(r"\| soft MoA beats top-1 MoA \(Table 6\) \|[^|]*\|[^|]*\| yes", report)
    assert re.search(r"\| BAM beats BTX with BAM's total parameters \(Table 4\) \|[^|]*\|[^|]*\| yes", report)
    # shared KV has two seeds: its test pairs those two
    assert "BAM (shared KV) − BTX" in report and "over 2 seeds" in report
    # the routing table names the starved expert at layer 1
    assert re.search(r"\| 1 \| step 0 \| 1 \| 0\.50 \| 0\.02 \| 0\.20 \| 0\.28 \| code \| seed \(0\.50\) \|", report)
    for figure in ("perplexity_bars.png", "loss_curves.png"):
        with open(os.path.join(out, "figures", figure), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_quick_reproduction_end_to_end(tmp_path):
    """`run.py --quick --arms btx,bam,bam-top1`: every stage with the real tools, 2 seeds, the arms that
    exercise BTX, soft MoA and top-k MoA upcycling (the others' flags: test_arms_are_sized_from_the_counts);
    then a second run skips every stage, and the report shows the arms not run as missing."""
    argv = [sys.executable, os.path.join(REPO, "examples", "reproduce", "run.py"), "--quick"]
    argv += [
        "--arms",
        "btx,bam,bam-top1",
        "--workdir",
        str(tmp_path / "work"),
        "--report-dir",
        str(tmp_path / "report"),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    report = (tmp_path / "report" / "REPORT.md").read_text()
    assert "Table 1" in report and "Table 6" in report and "--arms btx,bam,bam-top1" in report
    rows = {line.split("|")[1].strip(): line for line in report.split("## Table 1")[1].splitlines() if "|" in line}
    for label in ("BTX", "BAM (expert KV)"):
        assert re.search(r"\d+\.\d+ ± \d+\.\d+", rows[label]), rows[label]
    assert "±" not in rows["BAM (shared KV)"], rows["BAM (shared KV)"]  # not run: missing, not made up
    assert re.search(r"\| soft MoA beats top-1 MoA \(Table 6\) \|[^|]*\| [\d.]+ vs [\d.]+ \|", report), report
    runs = sorted(os.listdir(tmp_path / "work" / "runs"))
    assert {r.rsplit("-s", 1)[0] for r in runs if "-s" in r} >= {"btx", "bam", "bam-top1"}
    assert not any(r.startswith(("bam-shared-kv", "btx-e6")) for r in runs), runs
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert "stage done" not in again.stdout, again.stdout[-3000:]
    bad = subprocess.run([*argv[:2], "--arms", "btx,nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--arms: unknown arm nope" in bad.stderr, bad.stderr
