"""bam-eval's outputs: the perplexity table (markdown + JSON), routing.json and routing heatmaps.

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


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def file_safe(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def figure_name(model: str) -> str:
    """File name of a model's routing heatmap (the model name made file-safe)."""
    return f"routing_{file_safe(model)}.png"


def routing_heatmap_png(
    model: str, routing: Mapping[str, Any], domains: Sequence[str], expert_names: Sequence[str]
) -> bytes:
    """PNG of one model's routing: a row of panels per kind (attention gates, FFN selection), a
    panel per domain; in each panel rows are layers (plus their mean), columns experts, cells
    annotated. Reading down a column shows where that expert's share of a domain's tokens lies.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = [k for k in KIND_TITLES if k in routing]
    layers = routing["num_layers"]
    experts = len(expert_names)
    rows = [f"layer {i}" for i in range(layers)] + ["mean"]
    width = max(4.0, len(domains) * (1.4 + 0.6 * experts) + 1.5)
    height = max(3.5, len(kinds) * (1.2 + 0.32 * len(rows)) + 0.8)
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(kinds), len(domains), squeeze=False)
    for r, kind in enumerate(kinds):
        image = None
        for c, domain in enumerate(domains):
            per_layer = routing[kind][domain]
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
            ax.set_xticks(range(experts), expert_names, rotation=30 if max(map(len, expert_names)) > 6 else 0)
            ax.set_yticks(range(len(rows)), rows if c == 0 else [""] * len(rows))
            ax.set_title(domain if r == 0 else "", fontsize=11)
            if c == 0:
                ax.set_ylabel(KIND_TITLES[kind].format(k=routing.get("moe_router_topk", 1)), fontsize=10)
            ax.set_xlabel("expert", fontsize=9)
        figure.colorbar(image, ax=list(axes[r]), shrink=0.9)
    figure.suptitle(f"{model} ({routing['variant']}): routing per domain", fontsize=12)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
