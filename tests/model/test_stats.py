"""`bam-stats`: parameter counts on the meta model match real models and hand counts; the FLOPs
formula matches torch's FlopCounterMode on a real forward; the CLI answers and fails cleanly.

Everything that builds a model runs in one fresh one-rank process (`_measure`), once per module.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bam_megatron.model.builder import build_model
from bam_megatron.model.configs import variant_config
from bam_megatron.model.statistics import count_parameters, flops_per_token
from bam_megatron.model.variants import PRESETS, VARIANTS
from bam_megatron.stats import (
    _parser,
    build_meta_model,
    format_table,
    human,
    model_stats,
    one_rank_parallel_state,
)
from bam_megatron.testing.distributed import run_distributed
from tests.support import paths

SEQ = 16  # the FLOP check's sequence length (n_ctx)
BATCH = 2
ROOT = Path(paths.REPO)
# (variant, FFN top-k) pairs whose real forward is counted: top-2 checks the k factor.
COUNTED = (("dense", 1), ("bam", 1), ("bam-shared-kv", 1), ("btx", 2))


def _layer_flops(config, vocab_size: int) -> dict[str, int]:
    """Matmul FLOPs FlopCounterMode sees in layer 0 of a real forward, by submodule.

    SDPA's math backend computes QK^T and AV as plain batched matmuls over the full (masked)
    square, which FlopCounterMode counts; it has no formula for the fused CPU kernel.
    """
    model = build_model(config, vocab_size, SEQ, backend="local").eval()
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, positions, None)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    layer = "GPTModel.decoder.layers.0"
    return {
        part: by_module.get(f"{layer}{suffix}", 0)
        for part, suffix in (
            ("layer", ""),
            ("self_attention", ".self_attention"),
            ("core_attention", ".self_attention.core_attention"),
            ("attention_router", ".self_attention.router"),
            ("mlp", ".mlp"),
            ("ffn_router", ".mlp.router"),
        )
    }


def _measure() -> dict:
    """One fresh rank: stats of every preset x variant, real tiny models' sizes, counted FLOPs."""
    stats = {(p, v): model_stats(p, v, seq_length=SEQ) for p in PRESETS for v in VARIANTS}
    real_numel, counted = {}, {}
    tiny = PRESETS["tiny"]
    with one_rank_parallel_state():
        for variant in VARIANTS:
            config = variant_config(variant, "tiny", use_cpu_initialization=True)
            model = build_model(config, tiny.vocab_size, SEQ, backend="local")
            real_numel[variant] = sum(p.numel() for p in model.parameters())
        tied = variant_config("dense", "tiny", use_cpu_initialization=True)
        real_tied = build_model(tied, tiny.vocab_size, SEQ, untie_embeddings=False, backend="local")
        real_numel["dense-tied"] = sum(p.numel() for p in real_tied.parameters())
        meta_config = variant_config("dense", "tiny", use_cpu_initialization=True, perform_initialization=False)
        meta_tied = build_meta_model(meta_config, tiny.vocab_size, SEQ, untie_embeddings=False)
        meta_tied_total = count_parameters(meta_tied, meta_config).total
        for variant, topk in COUNTED:
            torch.manual_seed(0)
            config = variant_config(variant, "tiny", moe_router_topk=topk, use_cpu_initialization=True)
            d_attn = config.num_attention_heads * config.kv_channels  # one expert's query width
            counted[variant, topk] = (
                _layer_flops(config, tiny.vocab_size),
                flops_per_token(config, SEQ),
                config.num_attention_experts,
                d_attn,
            )
    return dict(stats=stats, real_numel=real_numel, meta_tied_total=meta_tied_total, counted=counted)


@pytest.fixture(scope="module")
def measured() -> dict:
    (result,) = run_distributed(_measure, 1)
    return result


def _dense_total(preset: str) -> int:
    """Hand count of a dense preset: embedding, per layer (norm, QKV, O, SwiGLU fc1 and fc2),
    final norm, and an output layer unless tied."""
    p = PRESETS[preset]
    d, heads, groups, f, vocab = (
        p.hidden_size,
        p.num_attention_heads,
        p.num_query_groups,
        p.ffn_hidden_size,
        p.vocab_size,
    )
    head_dim = d // heads
    layer = d + (heads + 2 * groups) * head_dim * d + d * heads * head_dim + 2 * f * d + f * d
    return vocab * d + p.num_layers * layer + d + (vocab * d if p.untie_embeddings else 0)


def test_meta_counts_match_real_models(measured):
    for variant in VARIANTS:
        assert measured["stats"]["tiny", variant]["total_params"] == measured["real_numel"][variant]
    assert measured["meta_tied_total"] == measured["real_numel"]["dense-tied"]
    tiny = PRESETS["tiny"]
    untied = measured["real_numel"]["dense"]
    assert measured["meta_tied_total"] == untied - tiny.vocab_size * tiny.hidden_size


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dense_total_matches_a_hand_count(measured, preset):
    stats = measured["stats"][preset, "dense"]
    assert stats["total_params"] == _dense_total(preset)
    assert stats["active_params"] == stats["total_params"]
    assert stats["tied_embeddings"] == (not PRESETS[preset].untie_embeddings)


def test_paper_sizes_are_plausible(measured):
    # paper-590m: 6 layers of d 1024, untied 256k embeddings. paper-2b: 18 layers of d 2304 plus
    # one tied 256k x 2304 embedding (counting it twice would give 2.58e9).
    assert 5.5e8 < measured["stats"]["paper-590m", "dense"]["total_params"] < 6.5e8
    assert 1.9e9 < measured["stats"]["paper-2b", "dense"]["total_params"] < 2.1e9


@pytest.mark.parametrize("preset", list(PRESETS))
def test_variants_relative_to_dense(measured, preset):
    n = 4
    stats = {v: measured["stats"][preset, v] for v in VARIANTS}
    parts = {v: s["params_by_part"] for v, s in stats.items()}
    p = PRESETS[preset]
    head_dim = p.hidden_size // p.num_attention_heads
    q_and_o = 2 * p.hidden_size * p.num_attention_heads * head_dim
    k_and_v = 2 * p.hidden_size * p.num_query_groups * head_dim

    assert parts["bam"]["attention"] == n * parts["dense"]["attention"]
    assert parts["bam-shared-kv"]["attention"] == p.num_layers * (n * q_and_o + k_and_v)
    assert parts["bam-shared-kv"]["attention"] < parts["bam"]["attention"]
    assert parts["btx"]["attention"] == parts["dense"]["attention"]
    assert parts["btx"]["ffn"] == parts["bam"]["ffn"] == n * parts["dense"]["ffn"]
    assert parts["bam"]["routers"] == p.num_layers * 2 * n * p.hidden_size  # [N, d] + [E, d]
    assert parts["btx"]["routers"] == p.num_layers * n * p.hidden_size
    assert "routers" not in parts["dense"]

    # top-1: a token sees one FFN expert, the size of the dense FFN, and all attention experts
    dense_total = stats["dense"]["total_params"]
    assert stats["btx"]["active_params"] == dense_total + parts["btx"]["routers"]
    extra_attention = parts["bam"]["attention"] - parts["dense"]["attention"]
    assert stats["bam"]["active_params"] == dense_total + extra_attention + parts["bam"]["routers"]
    assert stats["bam"]["active_params"] < stats["bam"]["total_params"]


@pytest.mark.parametrize("case", COUNTED, ids=[f"{v}-top{k}" for v, k in COUNTED])
def test_flops_formula_matches_flop_counter(measured, case):
    """FlopCounterMode counts every matmul of layer 0 over BATCH x SEQ tokens. Per token:

    - routers and FFN: exactly the formula (MoE experts run each token through its top-k only);
    - QKV/O projections: the formula's attention minus its context term 2*n_ctx*d_attn per expert;
    - core attention (QK^T and AV as full masked SEQ x SEQ products): twice that context term,
      since docs/design.md's term counts the causal half.
    """
    counts, formula, experts, d_attn = measured["counted"][case]
    tokens = BATCH * SEQ
    context = experts * 2 * SEQ * d_attn  # docs/design.md §6: 2*n_ctx*d_attn per attention expert
    routers = counts["attention_router"] + counts["ffn_router"]

    assert routers == tokens * formula["router"]
    assert counts["mlp"] - counts["ffn_router"] == tokens * formula["ffn"]
    assert counts["core_attention"] == tokens * 2 * context
    projections = counts["self_attention"] - counts["attention_router"] - counts["core_attention"]
    assert projections == tokens * (formula["attention"] - context)
    assert counts["layer"] == tokens * (formula["total"] + context)
    assert formula["total"] == formula["attention"] + formula["ffn"] + formula["router"]
    assert (counts["attention_router"] > 0) == (experts > 1)


def test_training_flops_and_inputs_in_stats(measured):
    stats = measured["stats"]["paper-590m", "bam"]
    assert stats["training_flops_per_token"] == 3 * 6 * stats["flops_per_token"]["total"]
    assert (stats["num_experts"], stats["moe_router_topk"], stats["seq_length"]) == (4, 1, SEQ)
    assert measured["stats"]["paper-590m", "dense"]["num_experts"] is None


def test_table_shows_the_numbers(measured):
    stats = measured["stats"]["paper-2b", "bam"]
    table = format_table(stats)
    assert human(stats["total_params"]) in table and f"{stats['active_params']:,}" in table
    for flops in stats["flops_per_token"].values():
        assert f"{flops:,}" in table
    assert human(2_000_000_000) == "2.00 B" and human(4_560_000_000, "FLOP") == "4.56 GFLOP"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bam_megatron.stats", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_cli_offers_every_preset_and_variant():
    choices = {action.dest: action.choices for action in _parser()._actions if action.choices}
    assert tuple(choices["preset"]) == tuple(PRESETS) and tuple(choices["variant"]) == VARIANTS


def test_cli_json(measured):
    result = _cli("--preset", "tiny", "--variant", "bam", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["total_params"] == measured["stats"]["tiny", "bam"]["total_params"]
    assert stats["active_params"] == measured["stats"]["tiny", "bam"]["active_params"]
    assert set(stats["flops_per_token"]) == {"attention", "ffn", "router", "total"}
    assert stats["seq_length"] == 2048 and stats["num_layers"] == PRESETS["tiny"].num_layers


@pytest.mark.parametrize(
    "args,flag",
    [
        (("--num-experts", "4", "--moe-router-topk", "5"), "--moe-router-topk"),
        (("--num-experts", "0"), "--num-experts"),
        (("--seq-length", "0"), "--seq-length"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, flag):
    result = _cli("--preset", "tiny", "--variant", "bam", *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "bam-stats"
    assert script.exists(), "bam-stats is missing: pip install -e ."
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--moe-router-topk" in result.stdout


def test_paper_2b_allocates_no_weights(measured):
    """The 2B model is counted on the meta device: the process stays far below its 8 GB of fp32."""
    code = (
        "import resource, sys; from bam_megatron.stats import main; main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--preset", "paper-2b", "--variant", "dense", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["total_params"]
    assert total == measured["stats"]["paper-2b", "dense"]["total_params"]
    assert total == _dense_total("paper-2b")
    max_rss_bytes = int(result.stderr.strip().splitlines()[-1]) * 1024  # Linux: KiB
    assert max_rss_bytes < 2 * 2**30
