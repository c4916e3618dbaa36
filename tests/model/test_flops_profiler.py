"""`bam-stats --measure`: DeepSpeed's FLOPs profiler on one real forward pass of each variant agrees
with the docs/design.md §6 formula, part by part, once its full-square core attention is halved.

Everything that builds a model runs in one fresh one-rank process (`_measure`), once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from bam_megatron.model.variants import PRESETS
from bam_megatron.stats import format_table, main, model_stats

SEQ = 16  # the profiled sequence length (n_ctx of the formula)
# (variant, FFN top-k): every variant, and top-2 to check that the profiler sees k experts per token.
CASES = (("dense", 1), ("btx", 2), ("bam", 1), ("bam", 2), ("bam-shared-kv", 1))


def _measure() -> dict:
    """One fresh rank: bam-stats --measure --json's output first (DeepSpeed is imported by it), then
    `model_stats(..., measure=True)` of every case."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--preset", "tiny", "--variant", "btx", "--seq-length", str(SEQ), "--measure", "--json"])
    stats = {
        case: model_stats("tiny", case[0], moe_router_topk=case[1], seq_length=SEQ, measure=True) for case in CASES
    }
    return {"cli": (code, out.getvalue()), "stats": stats}


@pytest.fixture(scope="module")
def measured() -> dict:
    from bam_megatron.testing.distributed import run_distributed

    (result,) = run_distributed(_measure, 1)
    return result


@pytest.mark.parametrize("case", CASES, ids=[f"{v}-top{k}" for v, k in CASES])
def test_the_profiler_agrees_with_the_formula(measured, case):
    stats = measured["stats"][case]
    formula, profiled = stats["flops_per_token"], stats["measured_flops"]
    assert profiled["tokens"] == SEQ and profiled["seq_length"] == SEQ
    for part in ("attention", "ffn", "router", "total"):
        assert profiled["per_layer"][part] == pytest.approx(formula[part], rel=1e-12), part
        assert stats["flops_ratio"][part] == pytest.approx(1.0, rel=1e-12), part
    assert (profiled["per_layer"]["router"] > 0) == (case[0] != "dense")
    assert profiled["unattributed"] == 0  # §6's three parts hold every matrix product of a layer


@pytest.mark.parametrize("case", CASES, ids=[f"{v}-top{k}" for v, k in CASES])
def test_what_the_profiler_counts_beyond_the_formula(measured, case):
    """SDPA as the full s x s square (twice §6's causal term), the output layer (outside §6), and
    nothing else: 2 x its MACs are those plus the layers' formula FLOPs."""
    stats = measured["stats"][case]
    profiled, tiny = stats["measured_flops"], PRESETS["tiny"]
    d_attn = tiny.hidden_size  # heads x head dim of one attention expert
    context = stats["num_attention_experts"] * 2 * SEQ * d_attn  # §6: 2*n_ctx*d_attn per expert
    assert profiled["core_attention_full_square"] == 2 * context
    assert profiled["output_layer"] == 2 * tiny.hidden_size * tiny.vocab_size
    layers = stats["num_layers"]
    per_token_macs = profiled["deepspeed_macs"] / profiled["tokens"]
    assert 2 * per_token_macs == layers * (stats["flops_per_token"]["total"] + context) + profiled["output_layer"]
    assert profiled["deepspeed_flops"] >= 2 * profiled["deepspeed_macs"]


def test_cli_prints_json_only_and_the_table_shows_both_counts(measured):
    code, out = measured["cli"]
    assert code == 0
    stats = json.loads(out)  # DeepSpeed's own log lines went to stderr
    assert stats["flops_ratio"]["total"] == pytest.approx(1.0, rel=1e-12)
    assert stats["measured_flops"]["per_layer"]["total"] == stats["flops_per_token"]["total"]
    table = format_table(measured["stats"]["bam", 2])
    assert "measured by DeepSpeed's FLOPs profiler" in table
    formula = measured["stats"]["bam", 2]["flops_per_token"]
    assert f"formula {formula['total']:,}, measured {formula['total']:,}, ratio 1.0000" in table


def test_measure_without_deepspeed_is_one_error_line(monkeypatch, capsys):
    # as if not installed: its import fails (submodules too: an earlier test in this process may have imported them)
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["--preset", "tiny", "--variant", "bam", "--measure"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("bam-stats: error: measuring FLOPs needs DeepSpeed")
    assert "pip install -e '.[deepspeed]'" in captured.err and captured.err.count("\n") == 1
