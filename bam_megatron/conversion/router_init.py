"""Routers that know the domains at step 0: each expert's row from its domain's router inputs.

A mixture's experts were each trained on one domain, so which expert suits a token is already
known before the mixture phase starts; random routers (the paper's, and ``--router-init random``)
spend that phase finding it out. With ``bam-upcycle --router-init domain`` both routers of every
layer (the soft-MoA attention gates and the FFN router) start as a classifier of that layer's
router input by domain, fitted on a few sequences of each expert's training data.

The classifier has the router's own form, softmax(W x + b): multinomial logistic regression of
the domain label on the router inputs x ∈ R^d (docs/phases.md). Each domain weighs the same
however many tokens it has; the features are standardised by the pooled within-domain standard
deviation, shrunk towards its average (v ← 0.9 v + 0.1 mean(v)) so that near-constant features do
not dominate; an L2 penalty (``WEIGHT_DECAY``) keeps the fit finite where the domains separate;
L-BFGS solves it (convex). Without a router bias the fit has no intercept (the inputs' common
component plays that part). An expert without data (none given or recorded) gets a zero row and
bias: the others are preferred on their own domains, and it keeps the rest. A fit whose margin is
below ``MIN_FIT_MARGIN`` sees no domains in the inputs and leaves the rows at zero. (A diagonal-LDA
row, α (μ_e − μ̄) / v, was tried first: domains share most directions and many sub-word tokens,
and mean-difference rows classified single tokens markedly worse; docs/phases.md has the numbers.)

α, the temperature, is set in closed form from the stated margin m (``--router-margin``): the
mean over domains of (own expert's logit − the mean logit of the other experts) over the domain's
tokens equals m, so a typical token of a domain gives its own expert e^m times the weight of any
other. Logits are linear in α, so α = m / (that margin at α = 1).

The statistics are taken on the mixture as it is built (`DomainRouters` is called by the upcycler
for each unit in order): a layer's rows are fitted on the hidden states its own layer receives from
the mixture's earlier layers, with their routers already set. Within a layer the attention router
is set first, then the FFN router on the inputs it sees with those gates. Memory: one unit of the
mixture plus the calibration tokens' activations, whatever the depth.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy
import torch

from bam_megatron.checkpoint.layerwise import TOP, Unit

SHRINKAGE = 0.1
"""Share of the average variance mixed into each feature's variance (the standardisation)."""
WEIGHT_DECAY = 1e-3
"""L2 penalty of the domain classifier on standardised features (makes separable data's fit finite)."""
MIN_FIT_MARGIN = 1e-2
"""Below this mean margin (nats) of the regularised fit the inputs do not tell the domains apart:
scaling it up to --router-margin would make the routers sharp on noise, so the rows stay zero."""
MAX_ITERATIONS = 100
"""L-BFGS iterations of the fit (it is convex; a few dozen usually converge)."""


@dataclass(frozen=True)
class ExpertData:
    """Where one expert's calibration tokens come from: indexed-dataset prefixes and their weights."""

    expert: str
    prefixes: tuple[str, ...]
    weights: tuple[float, ...]
    origin: str  # "--router-data" or "recorded by its training run"


def resolve_expert_data(
    names: Sequence[str], recorded: Mapping[str, Optional[Sequence[str]]], given: Sequence[str]
) -> list[Optional[ExpertData]]:
    """Each expert's calibration data: its ``--router-data NAME=PREFIX`` flags, else the
    ``--data-path`` its training run recorded (``recorded[name]``, None if none), else None.
    Of a recorded mix, only the datasets of which this expert's mix has the largest share among
    all the experts' are kept (all of them if that leaves none): experts continued on "90% code +
    10% general" and a seed trained on an equal mix of everything are told apart by code and by
    general, not by the general data they share.
    Raises `ConfigError` (one line naming the flag or expert) for unknown names, missing files or
    fewer than two experts with data."""
    from bam_megatron.data.datasets import parse_data_path
    from bam_megatron.data.errors import DataError
    from bam_megatron.errors import ConfigError

    flags: dict[str, list[str]] = {}
    for spec in given:
        name, sep, prefix = spec.partition("=")
        if not sep or not name or not prefix:
            raise ConfigError(f"--router-data {spec!r}: expected NAME=PREFIX")
        if name not in names:
            raise ConfigError(f"--router-data {spec!r}: no expert {name!r} (the experts: {', '.join(names)})")
        flags.setdefault(name, []).append(prefix)
    parsed: dict[str, tuple[list, str]] = {}
    for name in names:
        if name in flags:
            path, origin = flags[name], "--router-data"
        elif recorded.get(name):
            path, origin = list(recorded[name]), "recorded by its training run"
        else:
            continue
        try:
            parsed[name] = (parse_data_path(path), origin)
        except DataError as error:
            where = "" if origin == "--router-data" else f" (give --router-data {name}=PREFIX)"
            raise ConfigError(f"expert {name}: calibration data ({origin}): {error}{where}") from None
    data: list[Optional[ExpertData]] = []
    for name in names:
        if name not in parsed:
            data.append(None)
            continue
        domains, origin = parsed[name]
        if origin != "--router-data":  # a recorded mix: keep the datasets this expert trained on most
            own = [
                d
                for d in domains
                if _share(d.prefix, domains) >= max(_share(d.prefix, ds) for ds, _ in parsed.values())
            ]
            if own and len(own) < len(domains):
                domains, origin = own, "recorded by its training run: the datasets it trained on most"
        data.append(ExpertData(name, tuple(d.prefix for d in domains), tuple(d.weight for d in domains), origin))
    if sum(d is not None for d in data) < 2:
        raise ConfigError(
            "--router-init domain needs calibration data for at least two experts: their training runs recorded "
            f"{sum(d is not None for d in data)}; give --router-data NAME=PREFIX"
        )
    return data


def _share(prefix: str, domains) -> float:
    """The share of ``prefix`` in a mix of domains (0 if it is not in it)."""
    return sum(d.weight for d in domains if d.prefix == prefix) / sum(d.weight for d in domains)


def calibration_tokens(data: ExpertData, sequences: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    """``sequences`` token sequences [n, seq_length] spread evenly over the expert's datasets
        (shares by weight; each sequence starts at a document evenly spaced in its file and runs on
        through the following ones). Raises `DataError` naming the file where a token read is beyond the
    vocabulary (the rest of a file is not read: a dataset can be far larger than its sample)."""
    from megatron.core.datasets.indexed_dataset import get_bin_path

    from bam_megatron.data.datasets import check_indexed_dataset
    from bam_megatron.data.errors import DataError

    total = sum(data.weights)
    counts = [max(1, round(sequences * w / total)) for w in data.weights]
    out = []
    for prefix, count in zip(data.prefixes, counts):
        index = check_indexed_dataset(prefix)
        tokens = numpy.memmap(get_bin_path(prefix), dtype=index.dtype, mode="r", shape=(index.tokens,))
        if index.tokens < seq_length:
            raise DataError(f"dataset {prefix} holds {index.tokens} tokens, fewer than one sequence of {seq_length}")
        starts = index.pointers // numpy.dtype(index.dtype).itemsize  # token offset of each document
        for i in range(count):
            start = int(starts[i * len(starts) // count])
            start = min(start, index.tokens - seq_length)
            out.append(torch.from_numpy(numpy.array(tokens[start : start + seq_length], dtype=numpy.int64)))
        largest = int(torch.stack(out[-count:]).max())
        if largest >= vocab_size:  # only what is read is checked: datasets can be far larger
            raise DataError(
                f"dataset {prefix} holds token id {largest}, but the model has {vocab_size} embedding rows: "
                "it was tokenized with another tokenizer"
            )
    return torch.stack(out)


def domain_rows(
    inputs: Sequence[Optional[torch.Tensor]], margin: float, with_bias: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Router rows (and bias) from each expert's router inputs [tokens, d] (None: no data); see the
    module docstring. Returns (weight [N, d], bias [N] or None, the margin before scaling)."""
    experts = len(inputs)
    known = [e for e, x in enumerate(inputs) if x is not None]
    d = inputs[known[0]].shape[-1]
    xs = [inputs[e].double() for e in known]
    variance = torch.stack([x.var(0, unbiased=False) for x in xs]).mean(0)
    scale = ((1 - SHRINKAGE) * variance + SHRINKAGE * variance.mean()).clamp_min(1e-12).sqrt()
    features = torch.cat(xs) / scale
    labels = torch.cat([torch.full((len(x),), i) for i, x in enumerate(xs)])
    # each domain weighs the same, however many tokens it has
    token_weight = torch.cat([torch.full((len(x),), 1.0 / (len(x) * len(xs))) for x in xs]).double()
    w = torch.zeros(len(known), d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(known), dtype=torch.float64, requires_grad=with_bias)
    optimizer = torch.optim.LBFGS([w, b] if with_bias else [w], max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        nll = torch.nn.functional.cross_entropy(features @ w.T + b, labels, reduction="none")
        loss = (nll * token_weight).sum() + 0.5 * WEIGHT_DECAY * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    weight = torch.zeros(experts, d, dtype=torch.float64)
    bias = torch.zeros(experts, dtype=torch.float64)
    weight[known], bias[known] = w.detach() / scale, b.detach()
    # The mean margin of each domain's own expert over the others, at α = 1.
    margins = []
    for e in known:
        logits = inputs[e].double() @ weight.T + bias
        others = torch.cat([logits[:, :e], logits[:, e + 1 :]], dim=1)
        margins.append(float((logits[:, e] - others.mean(1)).mean()))
    unscaled = sum(margins) / len(margins)
    if not unscaled > MIN_FIT_MARGIN or not math.isfinite(unscaled):
        return torch.zeros(experts, d), (torch.zeros(experts) if with_bias else None), unscaled
    alpha = margin / unscaled
    return (alpha * weight).float(), ((alpha * bias).float() if with_bias else None), unscaled


class _Captured(Exception):
    """Raised by a capture hook to stop a forward pass once the router's input is taken."""


class DomainRouters:
    """Sets the routers of each unit of a mixture being built from its experts' calibration tokens.

    ``tokens[e]``: expert e's calibration sequences [n_e, s] (None: no data). Call with each unit's
    parameters, in order (TOP, then every layer), after everything but the routers is filled.
    """

    def __init__(self, architecture, seq_length: int, tokens: Sequence[Optional[torch.Tensor]], margin: float):
        from bam_megatron.conversion.unit_forward import UnitForward

        self.forward = UnitForward(architecture, seq_length)
        self.margin = margin
        self.with_bias = architecture.router_bias
        known = [t for t in tokens if t is not None]
        self.tokens = torch.cat(known)
        self.slices: list[Optional[slice]] = []
        start = 0
        for t in tokens:
            self.slices.append(None if t is None else slice(start, start + len(t)))
            start += 0 if t is None else len(t)
        self.hidden: Optional[torch.Tensor] = None
        self.next_unit: Unit = TOP
        self.summary: list[dict] = []
        layer = self.forward.model.decoder.layers[0]
        self.routers = {
            "attention": getattr(layer.self_attention, "router", None),
            "ffn": getattr(layer.mlp, "router", None),
        }
        self._capture: Optional[str] = None
        self._captured: Optional[torch.Tensor] = None
        for kind, router in self.routers.items():
            if router is not None:
                router.register_forward_pre_hook(self._hook(kind))

    def _hook(self, kind: str):
        def hook(module, args):
            if self._capture == kind:
                self._captured = args[0].detach()
                raise _Captured

        return hook

    def __call__(self, unit: Unit, params: dict[str, torch.Tensor]) -> None:
        """Fill ``unit``'s router weights (and biases) in ``params`` (that unit's parameters, by full
        name, as the writer materialises them) and carry the hidden states on."""
        if unit != self.next_unit:
            raise RuntimeError(f"domain routers: unit {unit} came before unit {self.next_unit}")
        self.next_unit = 0 if unit == TOP else unit + 1
        if unit == TOP:
            self.hidden = self.forward.embed(params, self.tokens)
            return
        prefix = f"decoder.layers.{unit}."
        entry = {"layer": unit + 1}
        for kind, path in (("attention", "self_attention.router"), ("ffn", "mlp.router")):
            if self.routers[kind] is None:
                continue
            inputs = self._router_inputs(kind, unit, params)
            weight, bias, unscaled = domain_rows(inputs, self.margin, self.with_bias)
            if not unscaled > MIN_FIT_MARGIN:
                print(
                    f"warning: layer {unit + 1}: the {kind} router's inputs do not tell the domains apart "
                    f"(fitted margin {unscaled:.2g} nats); its rows are left at zero",
                    file=sys.stderr,
                    flush=True,
                )
            params[prefix + path + ".weight"].copy_(weight)
            if bias is not None:
                params[prefix + path + ".bias"].copy_(bias)
            entry[f"{kind}_own_share"] = self._own_share(inputs, weight, bias)
        self.summary.append(entry)
        self.hidden = self.forward.layer(params, self.hidden)

    def _router_inputs(self, kind: str, unit: int, params: Mapping[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Each expert's tokens' input to layer ``unit``'s ``kind`` router, [tokens, d]."""
        self._capture, self._captured = kind, None
        try:
            self.forward.layer(params, self.hidden)
        except _Captured:
            pass
        finally:
            self._capture = None
        if self._captured is None:
            raise RuntimeError(f"layer {unit + 1}: the {kind} router was not reached")
        captured = self._captured  # [s, b, d]
        return [None if s is None else captured[:, s].reshape(-1, captured.shape[-1]) for s in self.slices]

    @staticmethod
    def _own_share(inputs, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> list[Optional[float]]:
        """Per expert: the share of its domain's tokens whose largest router logit is its own."""
        shares = []
        for e, x in enumerate(inputs):
            if x is None:
                shares.append(None)
                continue
            logits = x.float() @ weight.T + (0 if bias is None else bias)
            shares.append(round(float((logits.argmax(-1) == e).float().mean()), 4))
        return shares


def format_summary(domain_routers: dict, names: Sequence[str]) -> str:
    """The manifest's ``domain_routers`` as a few lines: per router, each expert's own-domain share
    (tokens of its calibration data whose top logit is its own), the lowest and the mean over layers."""
    lines = [
        f"domain routers (margin {domain_routers['margin']}): share of each domain's tokens routed to its own expert"
    ]
    for kind in ("attention", "ffn"):
        per_layer = [entry[f"{kind}_own_share"] for entry in domain_routers["layers"] if f"{kind}_own_share" in entry]
        if not per_layer:
            continue
        cells = []
        for e, name in enumerate(names):
            shares = [layer[e] for layer in per_layer if layer[e] is not None]
            if shares:
                cells.append(f"{name} {min(shares):.2f}-{sum(shares) / len(shares):.2f}")
            else:
                cells.append(f"{name} (no data)")
        lines.append(f"  {kind:<9}  lowest-mean over layers: " + ", ".join(cells))
    return "\n".join(lines)
