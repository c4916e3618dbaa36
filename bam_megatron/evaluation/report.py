"""bam-eval's outputs: the perplexity table (markdown + JSON), routing.json, the own-expert table and routing heatmaps.

Everything is rendered in memory first and each file is written under a temporary name and renamed,
so a failed run leaves no partial files and a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

KIND_TITLES = {
    "attention_gates": "attention:\nmean gate",
    "ffn_selection": "FFN: share of tokens\nrouted (top-{k})",
}


def kind_label(kind: str, topk: int) -> str:
    """One-line name of a routing kind, e.g. 'FFN: share of tokens routed (top-1)'."""
    return KIND_TITLES[kind].format(k=topk).replace("\n", " ")


def macro_average(values: Sequence[float]) -> float:
    """Unweighted mean over domains: each domain counts the same, whatever its size."""
    return sum(values) / len(values)


def perplexity_table(domains: Sequence[str], perplexities: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per model, one column per domain, then the average column."""
    lines = ["| model | " + " | ".join(domains) + " | average |", "|---|" + "---:|" * (len(domains) + 1)]
    for model, row in perplexities.items():
        cells = [f"{row[d]:.2f}" for d in (*domains, "average")]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def own_expert_shares(
    routing: Mapping[str, Any], expert_names: Sequence[str], own_names: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Per domain, the share of its tokens that its own expert gets: ``own_names`` maps each domain of
    ``routing`` (a routing.json entry) to the name its own expert would have. Returns {domain:
    {"expert": name, kind: {"per_layer": [...], "mean": mean over layers}}}, ``"expert": None`` for a
    domain no expert is named after."""
    out: dict[str, dict[str, Any]] = {}
    for domain, name in own_names.items():
        if name not in expert_names:
            out[domain] = {"expert": None}
            continue
        index = list(expert_names).index(name)
        entry: dict[str, Any] = {"expert": name}
        for kind in KIND_TITLES:
            if kind in routing:
                per_layer = [row[index] for row in routing[kind][domain]]
                entry[kind] = {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)}
        out[domain] = entry
    return out


def own_expert_table(models: Mapping[str, Mapping[str, Any]], domains: Sequence[str]) -> str:
    """Markdown: a row per MoE model and router kind, a column per domain; a cell is the own expert's
    share, mean over layers, then each layer's in brackets ('no expert' where none has the domain's name).
    ``models``: {model: routing.json entry with its "own_expert"}."""
    lines = ["| model | router | " + " | ".join(domains) + " |", "|---|---|" + "---:|" * len(domains)]
    for model, entry in models.items():
        own = entry["own_expert"]
        for kind in KIND_TITLES:
            if kind not in entry:
                continue
            cells = []
            for domain in domains:
                if own[domain]["expert"] is None:
                    cells.append("no expert")
                    continue
                share = own[domain][kind]
                cells.append(f"{share['mean']:.2f} (" + ", ".join(f"{v:.2f}" for v in share["per_layer"]) + ")")
            label = kind_label(kind, entry.get("moe_router_topk", 1))
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def file_safe(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def figure_name(model: str) -> str:
    """File name of a model's routing heatmap (the model name made file-safe)."""
    return f"routing_{file_safe(model)}.png"


def routing_heatmap_png(
    title: str, states: Mapping[str, Mapping[str, Any]], domains: Sequence[str], expert_names: Sequence[str]
) -> bytes:
    """PNG of one mixture's routing in one or more ``states`` ({label: routing.json entry}, e.g. step 0
    and trained), side by side: a row of panels per domain, a column per router kind and state (each
    kind's states next to each other); in each panel rows are layers (plus their mean), columns experts,
    cells annotated, one colour scale 0-1. Reading down a column shows where that expert's share of a
    domain's tokens lies.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(states.values()))
    columns = [(kind, label) for kind in KIND_TITLES if kind in first for label in states]
    layers = first["num_layers"]
    experts = len(expert_names)
    rows = [f"layer {i}" for i in range(layers)] + ["mean"]
    width = max(4.0, len(columns) * (0.9 + 0.55 * experts) + 1.5)
    height = max(3.5, len(domains) * (0.7 + 0.3 * len(rows)) + 1.2)
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(domains), len(columns), squeeze=False)
    image = None
    for r, domain in enumerate(domains):
        for c, (kind, label) in enumerate(columns):
            entry = states[label]
            per_layer = entry[kind][domain]
            matrix = [*per_layer, [sum(col) / layers for col in zip(*per_layer)]]
            ax = axes[r][c]
            image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if value > 0.55 else "black",
                    )
            ax.axhline(layers - 0.5, color="black", linewidth=1.0)  # separates the mean row
            last = r == len(domains) - 1
            names = expert_names if last else [""] * experts
            ax.set_xticks(range(experts), names, rotation=30 if max(map(len, expert_names)) > 6 else 0)
            ax.set_yticks(range(len(rows)), rows if c == 0 else [""] * len(rows))
            if r == 0:
                heading = KIND_TITLES[kind].format(k=entry.get("moe_router_topk", 1))
                ax.set_title(heading + (f"\n{label}" if len(states) > 1 else ""), fontsize=10)
            if c == 0:
                ax.set_ylabel(domain, fontsize=11)
            if last:
                ax.set_xlabel("expert", fontsize=9)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    figure.suptitle(f"{title}: routing per domain", fontsize=12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
