"""How well any first-layer router can tell the domains apart: the bound set by single tokens.

A first layer's router sees one token's embedding (after its norm), nothing of its context, so the
best it can do for a token is the domain in which that token is most frequent. This counts, for
each domain, the share of its tokens for which that is its own domain (equal priors), over the
whole indexed datasets of the reproduction (or the demo):

    python examples/reproduce/token_bound.py [--data-dir runs/reproduce/data/bin] [--domains general,code,law,math]

It prints JSON and a one-line summary; `--domains` without the general domain gives the bound for
a router that never picks the seed expert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def token_counts(prefix: str) -> numpy.ndarray:
    """How often each token id occurs in the indexed dataset ``prefix``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return numpy.bincount(numpy.concatenate([dataset[i] for i in range(len(dataset))]))


def single_token_bound(counts: dict[str, numpy.ndarray]) -> dict[str, float]:
    """Per domain: the share of its tokens whose most likely domain (P(token | domain), equal
    priors) is itself: what the best router of single tokens sends to its own expert."""
    size = max(len(c) for c in counts.values())
    frequency = numpy.stack([numpy.pad(c, (0, size - len(c))) / c.sum() for c in counts.values()])
    best = frequency.argmax(0)
    return {name: round(float(frequency[i][best == i].sum()), 4) for i, name in enumerate(counts)}


def main() -> None:
    """Print the bound for the given domains."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="runs/reproduce/data/bin")
    parser.add_argument("--domains", default="general,code,law,math")
    args = parser.parse_args()
    names = args.domains.split(",")
    bound = single_token_bound({n: token_counts(os.path.join(args.data_dir, f"{n}_text_document")) for n in names})
    print(json.dumps({"data_dir": args.data_dir, "single_token_bound": bound}))
    print(
        "best first-layer router, share of each domain's tokens to its own expert: "
        + ", ".join(f"{n} {v:.2f}" for n, v in bound.items())
    )


if __name__ == "__main__":
    main()
