"""examples/reproduce/token_bound.py: the single-token bound on a first-layer router, on made-up counts."""

from __future__ import annotations

import numpy

from examples.reproduce.token_bound import single_token_bound


def test_each_domain_keeps_the_tokens_most_frequent_in_it():
    counts = {
        "a": numpy.array([6, 2, 2, 0]),  # token 0 is a's; token 1 is shared equally with b (ties go to a)
        "b": numpy.array([1, 2, 7, 0]),  # token 2 is b's
        "c": numpy.array([0, 0, 1, 9]),  # token 3 is c's
    }
    # a: P(0|a)=0.6 beats b 0.1; P(1|a)=0.2 ties P(1|b)=0.2 -> a; P(2|a)=0.2 < P(2|b)=0.7
    assert single_token_bound(counts) == {"a": 0.8, "b": 0.7, "c": 0.9}
