"""REPORT.md: the reproduction's tables in the paper's layout, with seeds, error bars and t-tests.

Read from the pipeline's outputs only: WORKDIR/eval/*/perplexity.json and routing.json (tools/eval.py),
WORKDIR/runs/*/metrics.jsonl (pretrain_bam.py) and WORKDIR/stats.json (model_stats.py). The paper's
own numbers are not in this repository's docs (docs/, docs/design.md among them), so no cell shows one:
each table is compared with the paper by the ordering it claims, and the report says where that claim
is stated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from bam_demo.pipeline import DOMAINS, EXPERTS, step0_name

from bam_megatron.evaluation.report import own_expert_shares

from .arms import FLOPS_COUNT_LABELS, FLOPS_COUNTS, Arm, compute_matched_iters
from .significance import Paired, mean_std, one_sample_test, paired_test

COLUMNS = (*DOMAINS, "average")


@dataclass
class Results:
    """Perplexities by arm and seed (None where a run or its evaluation is missing), dense models, routing."""

    arms: list[Arm]
    seeds: list[int]
    stats: dict[str, dict]
    tokens_per_iter: int
    ppl: dict[str, dict[int, dict[str, float]]]  # arm -> seed -> column -> perplexity
    dense: dict[str, dict[str, float]]  # seed/code/law/math -> column -> perplexity
    routing: dict[str, dict[tuple[int, str], Any]]  # arm -> (seed, "step 0" | "trained") -> routing.json entry
    curves: dict[str, dict[int, list[dict]]]  # arm -> seed -> train records

    def arm(self, key: str) -> Arm:
        return next(a for a in self.arms if a.key == key)

    def values(self, key: str, column: str = "average") -> list[float]:
        """The per-seed values of an arm (seeds with results only)."""
        return [self.ppl[key][s][column] for s in self.seeds if s in self.ppl.get(key, {})]

    def paired(self, a: str, b: str) -> Optional[Paired]:
        """Paired test of arm ``a`` against arm ``b`` over the seeds both have."""
        common = [s for s in self.seeds if s in self.ppl.get(a, {}) and s in self.ppl.get(b, {})]
        if len(common) < 2:
            return None
        return paired_test([self.ppl[a][s]["average"] for s in common], [self.ppl[b][s]["average"] for s in common])


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect(pipeline) -> Results:
    """Everything the report needs from ``pipeline``'s work directory (a ReproducePipeline after its run)."""
    with open(pipeline.stats_file()) as f:
        stats = json.load(f)
    ppl: dict[str, dict[int, dict[str, float]]] = {}
    routing: dict[str, dict[tuple[int, str], Any]] = {}
    curves: dict[str, dict[int, list[dict]]] = {}
    for arm in pipeline.arms:
        ppl[arm.key], routing[arm.key], curves[arm.key] = {}, {}, {}
        for seed in pipeline.seeds:
            name = pipeline.eval_name(arm, seed)
            result = _read_json(os.path.join(pipeline.eval_dir(name), "perplexity.json"))
            if result and arm.key in result["models"]:
                ppl[arm.key][seed] = result["models"][arm.key]["perplexity"]
            route = _read_json(os.path.join(pipeline.eval_dir(name), "routing.json"))
            for state, model in (("trained", arm.key), ("step 0", step0_name(arm.key))):
                if route and model in route["models"]:
                    routing[arm.key][(seed, state)] = route["models"][model]
            path = os.path.join(pipeline.run_dir(arm, seed), "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    records = [json.loads(line) for line in f if line.strip()]
                curves[arm.key][seed] = [r for r in records if r.get("kind") == "train"]
    dense_result = _read_json(os.path.join(pipeline.eval_dir("dense"), "perplexity.json"))
    dense = {name: m["perplexity"] for name, m in dense_result["models"].items()} if dense_result else {}
    s = pipeline.s
    tokens = s.micro_batch_size * pipeline.nproc * s.seq_length
    return Results(pipeline.arms, pipeline.seeds, stats, tokens, ppl, dense, routing, curves)


# ---------------------------------------------------------------------------------------------
# tables


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def _header(extra: Sequence[str]) -> list[str]:
    cols = [*extra, *COLUMNS]
    return ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]


def _arm_row(r: Results, key: str, extra: Sequence[str], label: Optional[str] = None) -> str:
    cells = [_cell(r.values(key, c)) for c in COLUMNS]
    return f"| {label or r.arm(key).label} | " + " | ".join([*extra, *cells]) + " |"


def _dense_row(r: Results, name: str, extra: Sequence[str], label: str) -> str:
    cells = [f"{r.dense[name][c]:.2f}" if name in r.dense else "–" for c in COLUMNS]
    return f"| {label} | " + " | ".join([*extra, *cells]) + " |"


COMPUTE_COLUMNS = ("iterations", "tokens (M)", "compute, layers (TFLOP)", "compute, with output layer (TFLOP)")
"""Table 1's columns before the perplexities: the run's size, and its training compute in both FLOPs counts."""


def _compute(r: Results, key: str) -> tuple[str, ...]:
    """Iterations, tokens (M) and training compute (TFLOP) of an arm's run in each of `FLOPS_COUNTS`
    ("–" where stats.json lacks a count: one written before it had the complete count)."""
    arm = r.arm(key)
    tokens = arm.iters * r.tokens_per_iter
    row = r.stats[arm.init.stats]
    flops = [f"{tokens * row[f] / 1e12:.2f}" if f in row else "–" for f in FLOPS_COUNTS.values()]
    return (str(arm.iters), f"{tokens / 1e6:.2f}", *flops)


def sizing_lines(r: Results) -> list[str]:
    """Which FLOPs count sized the compute-matched arms, and the iterations the other count would give."""
    sized_by = r.arm("bam-cm").flops_count
    lines = [
        f"Compute-matched arms are sized by training FLOPs per token counted over {FLOPS_COUNT_LABELS[sized_by]} "
        "(bam-stats, docs/design.md section 6): they get BTX's compute in that count."
    ]
    budget = r.arm("btx").iters
    for other, field in FLOPS_COUNTS.items():
        if other == sized_by or not all(field in r.stats[k] for k in ("btx", "bam", "bam-shared-kv")):
            continue
        iters = {v: compute_matched_iters(budget, r.stats, v, other) for v in ("bam", "bam-shared-kv")}
        lines.append(
            f"Counted {FLOPS_COUNT_LABELS[other]}, BTX's compute would be {iters['bam']} iterations of BAM "
            f"(expert KV) and {iters['bam-shared-kv']} of BAM (shared KV) (not run here)."
        )
    return [" ".join(lines), ""]


def _params(r: Results, stats_key: str) -> tuple[str, str, str]:
    row = r.stats[stats_key]
    experts = str(row["num_experts"] or 1) + (f" (top-{row['moe_router_topk']})" if row["moe_router_topk"] > 1 else "")
    return experts, f"{row['total_params'] / 1e6:.3f} M", f"{row['active_params'] / 1e6:.3f} M"


def _test_lines(r: Results, pairs: Sequence[tuple[str, str]]) -> list[str]:
    lines = []
    for a, b in pairs:
        test = r.paired(a, b)
        if test is None:
            lines.append(f"- {r.arm(a).label} vs {r.arm(b).label}: fewer than 2 seeds with results, no test")
        else:
            lines.append("- " + test.sentence(r.arm(a).label, r.arm(b).label))
    return lines


def table1(r: Results) -> list[str]:
    """Table 1: the dense models, then BTX / BAM / BAM shared-KV data-matched and compute-matched."""
    lines = ["## Table 1: dense models and mixtures, data-matched (DM) and compute-matched (CM)", ""]
    lines += sizing_lines(r)
    lines += _header(COMPUTE_COLUMNS)
    blank = [""] * len(COMPUTE_COLUMNS)
    lines.append(_dense_row(r, "seed", blank, "Seed (dense, one run)"))
    for e in EXPERTS:
        lines.append(_dense_row(r, e, blank, f"{e.capitalize()} expert (dense, one run)"))
    lines.append("| **data-matched** |" + " |" * (len(COLUMNS) + len(COMPUTE_COLUMNS)))
    for key in ("btx", "bam", "bam-shared-kv"):
        lines.append(_arm_row(r, key, _compute(r, key)))
    lines.append("| **compute-matched** (BTX's compute) |" + " |" * (len(COLUMNS) + len(COMPUTE_COLUMNS)))
    for key in ("btx", "bam-cm", "bam-shared-kv-cm"):
        lines.append(_arm_row(r, key, _compute(r, key)))
    lines += ["", "Average perplexity, paired by seed (A − B < 0: A is better):", ""]
    lines += _test_lines(
        r,
        [
            ("bam", "btx"),
            ("bam-shared-kv", "btx"),
            ("bam", "bam-shared-kv"),
            ("bam-cm", "btx"),
            ("bam-shared-kv-cm", "btx"),
        ],
    )
    if "seed" in r.dense:
        for key in ("btx", "bam"):
            values = r.values(key)
            if len(values) > 1:
                test = one_sample_test(values, r.dense["seed"]["average"])
                lines.append("- " + test.sentence(r.arm(key).label, "the dense seed (one run; one-sample t-test)"))
    return lines + [""]


def table_params(r: Results, title: str, btx_key: str) -> list[str]:
    """Tables 4 and 5: BAM against a BTX with more parameters."""
    lines = [title, ""]
    lines += _header(["FFN experts", "total params", "active params"])
    for key in ("btx", btx_key, "bam"):
        lines.append(_arm_row(r, key, _params(r, r.arm(key).init.stats)))
    lines += ["", "Average perplexity, paired by seed:", ""]
    return lines + _test_lines(r, [("bam", btx_key), (btx_key, "btx")]) + [""]


ROUTER_ARMS = ("btx", "btx-domain", "bam", "bam-domain")
"""BTX and BAM with random routers and with domain routers, in the report's order."""


def own_share(entry: dict, kind: str) -> Optional[tuple[float, float]]:
    """Mean and lowest (over the experts' domains and the layers) share of a domain's tokens that its own
    expert gets in a routing.json entry (bam-eval's ``own_expert_shares``); None without that router."""
    if kind not in entry:
        return None
    own = own_expert_shares(entry, entry["expert_names"], {d: d for d in EXPERTS})
    values = [v for d in EXPERTS for v in own[d][kind]["per_layer"]]
    return sum(values) / len(values), min(values)


def _own_cell(r: Results, key: str, state: str, kind: str) -> str:
    """Own-expert share of ``key`` in ``state``: mean ± std over seeds of the mean, and the lowest anywhere."""
    shares = [own_share(r.routing[key][(s, state)], kind) for s in r.seeds if (s, state) in r.routing.get(key, {})]
    shares = [x for x in shares if x is not None]
    if not shares:
        return "–"
    return f"{_cell([mean for mean, _ in shares])} (lowest {min(low for _, low in shares):.2f})"


def table_routers(r: Results) -> list[str]:
    """BTX and BAM with random and with domain routers: perplexity, tests, and the own expert's share."""
    lines = ["## Routers initialised at random vs from each expert's domain", ""]
    lines.append(
        "`bam-upcycle --router-init domain` sets both routers (attention gates and FFN router) from statistics of "
        "each expert's domain data; the other arms' routers are random (the paper's, bam-upcycle's default). "
        "Data-matched, same seeds (data order) as the other arms."
    )
    lines += ["", *_header(["iterations"])]
    for key in ROUTER_ARMS:
        lines.append(_arm_row(r, key, [str(r.arm(key).iters)]))
    lines += ["", "Average perplexity, paired by seed:", ""]
    pairs = [("btx-domain", "btx"), ("bam-domain", "bam"), ("bam-domain", "btx-domain")]
    lines += _test_lines(r, pairs)
    helped = []
    for domain_key, random_key in pairs[:2]:
        test = r.paired(domain_key, random_key)
        if test is not None and test.mean_diff < 0 and test.p < 0.05:
            helped.append(r.arm(random_key).label.split(" ")[0])
    if all(r.paired(a, b) is not None for a, b in pairs[:2]):
        lines.append(
            "- So domain routers "
            + (f"help {' and '.join(helped)}" if helped else "help neither BTX nor BAM")
            + " significantly at the 5% level here."
        )
    lines += [
        "",
        "Share of a domain's tokens that its own expert gets (code, law and math; the seed expert has no "
        "domain of its name): mean over those domains and the layers, mean ± std over seeds, and the "
        "lowest of any domain, layer and seed. FFN: top-1 share; attention: mean gate (BAM only). "
        "A random router gives about 0.25.",
        "",
        "| model | FFN, step 0 | FFN, trained | attention, step 0 | attention, trained |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ROUTER_ARMS:
        cells = [
            _own_cell(r, key, state, kind)
            for kind in ("ffn_selection", "attention_gates")
            for state in ("step 0", "trained")
        ]
        lines.append(f"| {r.arm(key).label} | " + " | ".join(cells) + " |")
    return lines + [""]


def table6(r: Results) -> list[str]:
    """Table 6: soft MoA against top-2 and top-1 MoA."""
    lines = ["## Table 6: soft mixture of attention vs top-k MoA", ""]
    lines += _header(["attention experts per token"])
    for key, k in (("bam", "all 4 (soft)"), ("bam-top2", "2"), ("bam-top1", "1")):
        lines.append(_arm_row(r, key, [k]))
    lines += ["", "Average perplexity, paired by seed:", ""]
    return lines + _test_lines(r, [("bam", "bam-top2"), ("bam", "bam-top1"), ("bam-top2", "bam-top1")]) + [""]


CLAIMS = (
    # (claim, arm that should be lower, arm it should beat, where the paper's claim is stated)
    ("BAM beats BTX, data-matched (Table 1)", "bam", "btx", "the paper's Table 1; issue 17"),
    ("BAM beats BTX, compute-matched (Table 1)", "bam-cm", "btx", "the paper's Table 1; issue 17"),
    ("BAM shared-KV beats BTX, data-matched (Table 1)", "bam-shared-kv", "btx", "the paper's Table 1"),
    ("expert KV beats shared KV (Table 1)", "bam", "bam-shared-kv", "docs/design.md §1: expert KV 'the best quality'"),
    ("BAM beats BTX with BAM's total parameters (Table 4)", "bam", "btx-total", "the paper's Table 4; issue 17"),
    ("BAM beats BTX 6 experts top-3 (Table 5)", "bam", "btx-e6-top3", "the paper's Table 5; issue 17"),
    ("soft MoA beats top-2 MoA (Table 6)", "bam", "bam-top2", "the paper's Table 6; docs/design.md §1 (ablation)"),
    ("soft MoA beats top-1 MoA (Table 6)", "bam", "bam-top1", "the paper's Table 6; docs/design.md §1 (ablation)"),
)


def orderings(r: Results) -> list[str]:
    """The claimed orderings against ours: holds (significant or not) or does not."""
    lines = [
        "## The paper's orderings against ours",
        "",
        "| claim | stated in | ours (average perplexity, mean over seeds) | holds? |",
        "|---|---|---|---|",
    ]
    for claim, lower, higher, source in CLAIMS:
        test = r.paired(lower, higher)
        a, b = r.values(lower), r.values(higher)
        if test is None or not a or not b:
            lines.append(f"| {claim} | {source} | not enough seeds | – |")
            continue
        ours = f"{mean_std(a)[0]:.2f} vs {mean_std(b)[0]:.2f}"
        if test.mean_diff < 0:
            verdict = f"yes (p = {test.p:.3f}{'' if test.p < 0.05 else ', not significant'})"
        else:
            verdict = f"**no** (p = {test.p:.3f}{'' if test.p < 0.05 else ', not significant'})"
        lines.append(f"| {claim} | {source} | {ours} | {verdict} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# routing


def _shares(entry: dict, layer: int) -> Optional[list[float]]:
    """FFN share of tokens per expert at ``layer``, averaged over the domains."""
    per_domain = entry.get("ffn_selection")
    if not per_domain:
        return None
    rows = [per_domain[d][layer] for d in DOMAINS if d in per_domain]
    return [sum(col) / len(rows) for col in zip(*rows)]


def routing_section(r: Results) -> list[str]:
    """The FFN routing of BTX and BAM at step 0 and after training, per seed and layer, and what it says."""
    lines = ["## FFN routing at step 0 and after training", ""]
    found = False
    for key in ROUTER_ARMS:
        models = r.routing.get(key, {})
        if not models:
            continue
        names = next(iter(models.values())).get("expert_names", [])
        layers = next(iter(models.values()))["num_layers"]
        lines += [
            f"**{r.arm(key).label}**: share of tokens whose top-1 FFN expert is each expert (mean over the four "
            "domains; a balanced router gives 0.25 each), and where the code domain's tokens go.",
            "",
            "| seed | model | layer | " + " | ".join(names) + " | least used | code tokens' top expert |",
            "|---|---|---:|" + "---:|" * len(names) + "---|---|",
        ]
        for seed in r.seeds:
            for state in ("step 0", "trained"):
                if (seed, state) not in models:
                    continue
                for layer in range(layers):
                    shares = _shares(models[(seed, state)], layer)
                    if shares is None:
                        continue
                    found = True
                    code = models[(seed, state)]["ffn_selection"]["code"][layer]
                    least = names[min(range(len(shares)), key=shares.__getitem__)]
                    top = max(range(len(code)), key=code.__getitem__)
                    cells = " | ".join(f"{v:.2f}" for v in shares)
                    lines.append(f"| {seed} | {state} | {layer} | {cells} | {least} | {names[top]} ({code[top]:.2f}) |")
        lines.append("")
    if found:
        lines += routing_findings(r)
    return lines if found else []


def _least_used(entry: dict, layer: int, names: Sequence[str]) -> tuple[str, float]:
    shares = _shares(entry, layer)
    k = min(range(len(shares)), key=shares.__getitem__)
    return names[k], shares[k]


def routing_findings(r: Results) -> list[str]:
    """What the routing tables say about the starved FFN expert, in numbers read from them."""
    lines = ["What this says about the starved FFN expert of the demo's heatmaps (issue 17):", ""]
    for key in ("btx", "bam"):
        models = r.routing.get(key, {})
        if not models:
            continue
        entry = next(iter(models.values()))
        names, last = entry.get("expert_names", []), entry["num_layers"] - 1
        pairs = [s for s in r.seeds if (s, "step 0") in models and (s, "trained") in models]
        if not pairs:
            continue
        strongest, kept, total = (0.0, "", "", 0), 0, 0
        for s in pairs:
            for domain in DOMAINS:
                before = models[(s, "step 0")]["ffn_selection"][domain][last]
                after = models[(s, "trained")]["ffn_selection"][domain][last]
                top = max(range(len(before)), key=before.__getitem__)
                strongest = max(strongest, (before[top], domain, names[top], s))
                kept += top == max(range(len(after)), key=after.__getitem__)
                total += 1
        step0 = ", ".join(f"{_least_used(models[(s, 'step 0')], last, names)[0]}" for s in pairs)
        trained = ", ".join("{} ({:.2f})".format(*_least_used(models[(s, "trained")], last, names)) for s in pairs)
        share, domain, expert, seed = strongest
        lines.append(
            f"- {r.arm(key).label}, layer {last}: at step 0, before any mixture training, the router already sends "
            f"up to {share:.0%} of a domain's tokens to one expert ({domain} → {expert}, seed {seed}); a domain's "
            f"top expert at step 0 is still its top expert after training in {kept}/{total} (domain, seed) pairs. "
            f"Least-used expert per seed ({', '.join(map(str, pairs))}): at step 0 {step0}; trained {trained}."
        )
    if len(lines) == 2:  # the random-router arms were not run: nothing to say about their draw
        return []
    lines += [
        "",
        "So the skew is not an order defect and not (only) what the experts learned. "
        "tests/conversion/test_routing_order.py upcycles four dense sources with independent weights, trains and "
        "reloads the mixture, and checks that FFN "
        "expert k is (nearest to) source k and that the report's share of expert k equals the tokens expert k's "
        "module computes; it also checks that BAM and BTX upcycled with one --seed start from the same FFN router "
        "(bam-upcycle draws each router from its parameter name and the seed), which is why the demo (one router "
        "seed, 1234) showed the same pattern in both. The upcycled router (N(0, 0.02²), no bias, top-1) is far "
        "from uniform at step 0: each token goes to the argmax of a random projection of its hidden state, and "
        "training over this many iterations mostly sharpens that assignment. The load-balancing loss is applied "
        "at the scale megatron-core expects (the training loop runs megatron-core's forward-backward schedule, "
        "which sets MoEAuxLossAutoScaler's scale to 1 / the micro-batch count, the LM loss being a per-token "
        "mean); at α = 0.01 it does not undo the skew in this many iterations (loss curves: the load-balancing "
        "loss rises above 1). Which expert ends up least used is decided by the router's draw and by training "
        "together (compare the step-0 and trained lines above), so the demo's starved code expert is not "
        "evidence of what the code expert learned.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# figures


def bar_figure(r: Results, path: str) -> None:
    """Average perplexity of every arm, mean with the standard deviation over seeds as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [
        ("Table 1 (DM / CM)", ["btx", "bam", "bam-shared-kv", "bam-cm", "bam-shared-kv-cm"]),
        ("Tables 4-5 (params)", ["btx", "btx-total", "btx-e6-top3", "bam"]),
        ("Table 6 (MoA)", ["bam", "bam-top2", "bam-top1"]),
        ("Routers (random / domain)", list(ROUTER_ARMS)),
    ]
    figure = Figure(figsize=(17, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(groups))  # each panel its own range (the axes do not start at 0)
    for ax, (title, keys) in zip(axes, groups):
        stats = [mean_std(r.values(k)) if r.values(k) else (0.0, 0.0) for k in keys]
        ax.bar(range(len(keys)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="tab:blue")
        for i, k in enumerate(keys):  # the seeds themselves
            values = r.values(k)
            ax.plot([i] * len(values), values, "k.", markersize=4)
        if "seed" in r.dense:
            ax.axhline(r.dense["seed"]["average"], color="gray", linestyle="--", linewidth=1, label="dense seed")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        all_values = [v for k in keys for v in r.values(k)]
        if all_values:
            span = max(all_values) - min(all_values)
            ax.set_ylim(min(all_values) - span - 0.5, max(all_values) + span + 0.5)
    axes[0].set_ylabel("average validation perplexity\n(mean ± std over seeds; dots: seeds)")
    figure.savefig(path, dpi=100)


def curve_figure(r: Results, path: str) -> None:
    """Training LM loss and load-balancing loss against tokens, mean over seeds, one line per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, lb_ax = figure.subplots(1, 2)
    for arm in r.arms:
        runs = [records for records in r.curves.get(arm.key, {}).values() if records]
        if not runs:
            continue
        length = min(len(records) for records in runs)
        x = [
            runs[0][i]["consumed_samples"] * r.tokens_per_iter / runs[0][i]["global_batch_size"] / 1e6
            for i in range(length)
        ]
        loss = [sum(records[i]["lm_loss"] for records in runs) / len(runs) for i in range(length)]
        (line,) = loss_ax.plot(x, loss, label=arm.key, linewidth=1)
        lb = [
            sum(records[i].get("router_losses", {}).get("load_balancing_loss", float("nan")) for records in runs)
            / len(runs)
            for i in range(length)
        ]
        lb_ax.plot(x, lb, color=line.get_color(), label=arm.key, linewidth=1)
    loss_ax.set_xlabel("training tokens (M)")
    loss_ax.set_ylabel("training LM loss (mean over seeds)")
    lb_ax.set_xlabel("training tokens (M)")
    lb_ax.set_ylabel("Switch load-balancing loss (1 = balanced)")
    loss_ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# the report


def write_report(pipeline, out_dir: str, command: str, times: Sequence[tuple[str, float, bool]]) -> str:
    """Write REPORT.md and its figures under ``out_dir``; return the headline (Table 1) as markdown."""
    r = collect(pipeline)
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    bar_figure(r, os.path.join(figures, "perplexity_bars.png"))
    curve_figure(r, os.path.join(figures, "loss_curves.png"))
    s = pipeline.s
    t1 = table1(r)
    lines = [
        "# Reproducing the BAM paper's comparisons at laptop scale",
        "",
        f"Generated by `{command}` (examples/reproduce/). Four domains (general, code, law, math: "
        "examples/bam_demo/corpora.py), a dense seed "
        f"({s.num_layers} layers, d={s.hidden_size}, FFN {s.ffn_hidden_size}, {s.num_attention_heads} heads, "
        f"context {s.seq_length}) trained {s.seed_iters} iterations, three dense experts "
        f"{s.expert_iters} iterations each (shared by every arm, one run each), then every mixture trained "
        f"{s.mix_iters} iterations (data-matched) at LR {s.mix_lr} with {r.tokens_per_iter} tokens per "
        f"iteration, once per mixture seed ({', '.join(map(str, r.seeds))}): the seed sets the upcycled "
        "routers' initialisation and the data order. Perplexity: tools/eval.py on the whole validation "
        "split of each domain; `average` is the unweighted mean over domains. Cells are mean ± standard "
        "deviation over seeds. Compute: bam-stats' training FLOPs per token × tokens, in two counts: the "
        "transformer layers only (the paper's Table 7 convention) and complete, with the output layer "
        "(Megatron-LM's num_floating_point_operations); Table 1 says which sized the compute-matched arms. "
        "Significance: two-sided paired t-test over seeds (the runs "
        "of one seed share data order and router seed), 5% level; with 3 seeds it has little power.",
        "",
        "The paper's numbers are not summarised in this repository's docs (docs/, docs/design.md among them), "
        "so no cell shows one: each table is compared with the paper by the ordering it claims (last "
        "section but one), not by value. At this scale (sub-million-parameter experts, minutes of "
        "training) the absolute numbers mean nothing for the paper's; only orderings can be compared.",
        "",
        *t1,
        *table_params(
            r, "## Table 4: BTX with BAM's total parameters (extra FFN experts copied from the seed)", "btx-total"
        ),
        *table_params(
            r, "## Table 5: BTX with 6 FFN experts, top-3 (the paper's active-parameter match)", "btx-e6-top3"
        ),
        *table6(r),
        *table_routers(r),
        *orderings(r),
        *routing_section(r),
        "## Figures",
        "",
        "![average perplexity per arm](figures/perplexity_bars.png)",
        "",
        "![training loss and load-balancing loss](figures/loss_curves.png)",
        "",
        "## Stage times" if times else "",
        "",
        ", ".join(
            f"{name} {seconds / 60:.1f} min" + (" (skipped)" if skipped else "") for name, seconds, skipped in times
        )
        + (" (a skipped stage was done by an earlier launch in the same work directory)" if times else ""),
        "",
    ]
    path = os.path.join(out_dir, "REPORT.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return "\n".join(t1)
