"""bam-eval harness's outputs: the results table (markdown) from lm-eval's numbers, kept verbatim (JSON).

lm-eval reports each task's metrics as ``"METRIC,FILTER": value`` with ``"METRIC_stderr,FILTER"``
beside it (``acc,none``, ``exact_match,strict-match``). results.json holds those dicts as lm-eval
returned them, per model; results.md has one row per (task, filter, metric) and one column per
model, ``value ± stderr``, rendered from the same dicts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bam_megatron.evaluation.report import file_safe

STDERR = "_stderr"


def metric_rows(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(task, metric, filter) of every reported metric, in lm-eval's order (stderr entries excluded)."""
    rows = []
    for task, entry in results.items():
        for key in entry:
            metric, sep, filt = key.partition(",")
            if sep and not metric.endswith(STDERR):
                rows.append((task, metric, filt))
    return rows


def cell(entry: Mapping[str, Any], metric: str, filt: str) -> str:
    """``value ± stderr`` with 4 decimals (lm-eval's own table rounds the same way); ``-`` when absent."""
    value = entry.get(f"{metric},{filt}")
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    stderr = entry.get(f"{metric}{STDERR},{filt}")
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else f"{value:.4f}"


def markdown(runs: Sequence[Any], settings: Mapping[str, Any]) -> str:
    """The table: a row per (task, filter, metric) of any model, a column per model."""
    rows: list[tuple[str, str, str]] = []
    for run in runs:
        rows += [r for r in metric_rows(run.output["results"]) if r not in rows]
    first = runs[0].output
    header = "| task | filter | metric | n-shot | docs | " + " | ".join(r.name for r in runs) + " |"
    lines = [header, "|---|---|---|---:|---:|" + "---:|" * len(runs)]
    for task, metric, filt in rows:
        shots = first.get("n-shot", {}).get(task, "")
        docs = first.get("n-samples", {}).get(task, {}).get("effective", "")
        cells = [cell(run.output["results"].get(task, {}), metric, filt) for run in runs]
        lines.append(f"| {task} | {filt} | {metric} | {shots} | {docs} | " + " | ".join(cells) + " |")
    models = "; ".join(f"{r.name}: {r.checkpoint} ({r.variant}, exported as {r.export_format})" for r in runs)
    limit = f", --limit {settings['limit']}" if settings.get("limit") else ""
    return (
        "# Downstream tasks (lm-evaluation-harness)\n\n"
        f"lm-eval's `hf` model on each checkpoint's Hugging Face export; value ± standard error{limit}. "
        f"Models: {models}.\n\n" + "\n".join(lines) + "\n"
    )


def samples_jsonl(samples: Sequence[Mapping[str, Any]]) -> str:
    """lm-eval's per-document records, one JSON object per line (what it cannot serialise as text)."""
    return "".join(json.dumps(s, default=str, ensure_ascii=False) + "\n" for s in samples)


def render(runs: Sequence[Any], tasks: Sequence[str], settings: Mapping[str, Any]) -> dict[str, bytes]:
    """{file name: content}: results.md, results.json and, with --log-samples, samples_MODEL_TASK.jsonl."""
    from importlib.metadata import version

    files = {"results.md": markdown(runs, settings).encode()}
    summary = {
        "lm_eval_version": version("lm_eval"),
        "tasks": list(tasks),
        "settings": {k: settings[k] for k in ("num_fewshot", "limit", "batch_size", "dtype", "format", "seed")},
        "models": {
            r.name: {
                "checkpoint": r.checkpoint,
                "variant": r.variant,
                "export_format": r.export_format,
                "export_notes": r.notes,
                **{k: v for k, v in r.output.items() if k != "samples"},
            }
            for r in runs
        },
    }
    files["results.json"] = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    for run in runs:
        for task, samples in run.output.get("samples", {}).items():
            files[f"samples_{file_safe(run.name)}_{file_safe(task)}.jsonl"] = samples_jsonl(samples).encode()
    return files
