"""`bam-eval plot`: loss curves of any set of training runs, from their metrics files, as one PNG.

    bam-eval plot seed=ckpt/seed bam=ckpt/bam btx=runs/btx/metrics.jsonl --output loss.png

Reads the JSONL that pretrain_bam.py writes (``--metrics-file``, by default ``SAVE/metrics.jsonl``):
``train`` records (``lm_loss``; for MoE runs ``router_losses`` and ``router_losses_per_layer``, the
load-balancing loss and z-loss before their coefficients) and ``valid`` records (``loss`` per
domain). Panels: training loss, validation loss (mean over domains, or each domain), load-balancing
loss and z-loss; a panel is drawn when at least one run has its series. A resumed run appends to
the same file, so an iteration may appear more than once: its last record counts (the run that went
on from there).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from bam_megatron.errors import ConfigError, UserError, run_tool
from bam_megatron.platform.atomic import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROG = "bam-eval plot"
METRICS_FILE = "metrics.jsonl"
"""The metrics file's name in a --save directory (the training loop's default)."""
ROUTER_LOSSES = {
    "load_balancing_loss": "load-balancing loss\n(before its coefficient; balanced = 1)",
    "z_loss": "router z-loss\n(before its coefficient)",
}
"""megatron-core's names of the FFN-router losses in ``router_losses``, and their panel titles."""


@dataclass
class RunMetrics:
    """One run's curves: series name -> {iteration: value}.

    Series: ``lm_loss``; ``valid/DOMAIN`` per domain; each router loss by its name (mean over
    layers) and ``NAME/layer I`` per layer.
    """

    name: str
    path: str
    series: dict[str, dict[int, float]] = field(default_factory=dict)

    def add(self, series: str, iteration: int, value: Any) -> None:
        """Record one point (a later record of the same iteration replaces the earlier one)."""
        if value is not None:
            self.series.setdefault(series, {})[iteration] = float(value)

    def curve(self, series: str) -> tuple[list[int], list[float]]:
        """(iterations, values) of one series, in iteration order; empty when the run lacks it."""
        points = sorted(self.series.get(series, {}).items())
        return [i for i, _ in points], [v for _, v in points]

    def domains(self) -> list[str]:
        """The validation domains, in the order they first appear."""
        return [name.split("/", 1)[1] for name in self.series if name.startswith("valid/")]

    def validation_mean(self) -> tuple[list[int], list[float]]:
        """Mean validation loss over the domains, at the iterations where every domain was evaluated."""
        curves = [self.series[f"valid/{d}"] for d in self.domains()]
        if not curves:
            return [], []
        iterations = sorted(set.intersection(*(set(c) for c in curves)))
        return iterations, [sum(c[i] for c in curves) / len(curves) for i in iterations]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record: Any, where: str) -> Optional[str]:
    """The record's kind ('train', 'valid'; None for others), or a UserError naming what is wrong."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = record.get("kind")
    if kind not in ("train", "valid"):
        return None
    if not isinstance(record.get("iteration"), int):
        raise UserError(f"{where}: a {kind!r} record needs an integer 'iteration'")
    if kind == "train":
        if record.get("lm_loss") is not None and not _number(record["lm_loss"]):
            raise UserError(f"{where}: 'lm_loss' must be a number, got {record['lm_loss']!r}")
        for key in ("router_losses", "router_losses_per_layer"):
            if not isinstance(record.get(key, {}), dict):
                raise UserError(f"{where}: {key!r} must be an object")
    elif not isinstance(record.get("loss"), dict) or not all(_number(v) for v in record["loss"].values()):
        raise UserError(f"{where}: a 'valid' record needs 'loss', an object of numbers per domain")
    return kind


def read_metrics(path: str, name: Optional[str] = None) -> RunMetrics:
    """Read one run's metrics file (or the ``metrics.jsonl`` of a --save directory ``path``).

    Bad input is a `UserError` naming the file (and line): missing, not UTF-8, a line that is not
    JSON or a record without the fields the plot reads, or no train/valid record at all.
    """
    if os.path.isdir(path):
        directory, path = path, os.path.join(path, METRICS_FILE)
        if not os.path.isfile(path):
            raise UserError(
                f"{directory} holds no {METRICS_FILE} (pretrain_bam.py writes SAVE/{METRICS_FILE}, or --metrics-file)"
            )
    elif not os.path.isfile(path):
        raise UserError(f"metrics file {path} does not exist")
    run = RunMetrics(name or default_name(path), path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise UserError(f"metrics file {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"metrics file {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not JSON ({error.msg}, column {error.colno})") from None
        kind = _check_record(record, where)
        iteration = record.get("iteration")
        if kind == "train":
            run.add("lm_loss", iteration, record.get("lm_loss"))
            for loss, value in record.get("router_losses", {}).items():
                run.add(loss, iteration, value)
            for loss, per_layer in record.get("router_losses_per_layer", {}).items():
                for layer, value in enumerate(per_layer):
                    run.add(f"{loss}/layer {layer}", iteration, value)
        elif kind == "valid":
            for domain, value in record["loss"].items():
                run.add(f"valid/{domain}", iteration, value)
    if not run.series:
        raise UserError(f"metrics file {path} has no 'train' or 'valid' records with losses")
    return run


def default_name(path: str) -> str:
    """A run's label when none is given: its --save directory's name, else the file name without .jsonl."""
    path = os.path.abspath(path)
    if os.path.basename(path) == METRICS_FILE:
        return os.path.basename(os.path.dirname(path))
    return os.path.basename(path).removesuffix(".jsonl")


def parse_run(text: str) -> tuple[Optional[str], str]:
    """A RUN argument: 'NAME=PATH' or 'PATH' -> (name or None, path)."""
    name, sep, path = text.partition("=")
    if sep and name and path and os.sep not in name:
        return name, path
    return None, text


def loss_figure(runs: Sequence[RunMetrics], per_domain: bool = False, per_layer: bool = False) -> Figure:
    """The figure of ``runs``: one panel per quantity any run has, one line per run in each.

    ``per_domain``: a line per (run, domain) in the validation panel instead of the run's mean;
    ``per_layer``: a line per (run, layer) in the router-loss panels instead of the layer mean.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, list[tuple[str, tuple[list[int], list[float]]]]]] = []
    train = [(run.name, run.curve("lm_loss")) for run in runs]
    panels.append(("training loss", train))
    validation = []
    for run in runs:
        if per_domain:
            validation += [(f"{run.name} {d}", run.curve(f"valid/{d}")) for d in run.domains()]
        else:
            validation.append((run.name, run.validation_mean()))
    title = "validation loss, per domain" if per_domain else "validation loss (mean over domains)"
    panels.append((title, validation))
    for loss, loss_title in ROUTER_LOSSES.items():
        lines = []
        for run in runs:
            if per_layer:
                layers = sorted(
                    (int(s.rsplit(" ", 1)[1]) for s in run.series if s.startswith(f"{loss}/layer ")),
                )
                lines += [(f"{run.name} layer {i}", run.curve(f"{loss}/layer {i}")) for i in layers]
            else:
                lines.append((run.name, run.curve(loss)))
        panels.append((loss_title, lines))
    panels = [(title, [line for line in lines if line[1][0]]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.0 * columns, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, (title, lines) in zip(axes, panels):
        for label, (iterations, values) in lines:
            ax.plot(iterations, values, marker="." if len(iterations) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        figure.delaxes(ax)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes (written by the caller in one atomic step)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    """`bam-eval plot`'s flags."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Training and validation loss, load-balancing loss and z-loss of training runs, as one PNG.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="[NAME=]RUN",
        help="a metrics JSONL file, or a --save directory holding metrics.jsonl; NAME labels its lines "
        "(default: the directory's name)",
    )
    p.add_argument("--output", default="loss.png", help="the PNG to write (default: loss.png)")
    p.add_argument("--per-domain", action="store_true", help="a validation line per domain instead of the mean")
    p.add_argument("--per-layer", action="store_true", help="a router-loss line per layer instead of the mean")
    p.add_argument("--title", default=None, help="a title above the panels")
    return p


def _run(args: argparse.Namespace) -> None:
    if os.path.isdir(args.output):
        raise ConfigError(f"--output {args.output} is a directory")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise ConfigError(f"--output {args.output}: directory {parent} does not exist")
    runs = [read_metrics(path, name) for name, path in map(parse_run, args.runs)]
    names = [run.name for run in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"run names must be unique (give NAME=RUN); repeated: {', '.join(repeated)}")
    figure = loss_figure(runs, per_domain=args.per_domain, per_layer=args.per_layer)
    if args.title:
        figure.suptitle(args.title)
    write_atomically(args.output, png_bytes(figure))
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(names)})", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `bam-eval plot`; exit code 2 for bad input (nothing written)."""
    args = build_parser().parse_args(argv)
    return run_tool(PROG, lambda: _run(args))
