"""bam-eval's own-expert share: for each domain, the share of its tokens that the expert of its name gets.

The fixture is a tiny BAM mixture whose routing the test sets: every token embeds to the same vector
e_0 and the attention and FFN outputs are zero, so every layer's router sees the same normed input
x̂ = s·e_0 for every token of every domain, and each router's first weight column alone decides its
gates. The attention gates are then exactly ``GATES[layer]`` and the top-1 FFN expert is
``FFN_WINNER[layer]`` for every token, so each domain's own-expert share is known exactly. The
experts are named (in the checkpoint's lineage, as bam-upcycle records them) so that code and law
have an expert of their name, at different indices, and math has none.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed

EXPERTS = ["seed", "law", "code", "bio"]  # code and law at indices 2 and 1; no math expert
DOMAINS = ["code", "law", "math"]
GATES = [[0.1, 0.2, 0.3, 0.4], [0.05, 0.6, 0.1, 0.25]]  # attention gates of every token, per layer
FFN_WINNER = [2, 1]  # top-1 FFN expert of every token, per layer: code at layer 0, law at layer 1
SEQ = 32


def _save_and_evaluate(root: str, tokenizer_model: str, argv: list[str]) -> tuple[int, str]:
    """Rank body: save the fixture mixture under ``root``/mix, then bam-eval ``argv`` in this process."""
    from megatron.core import parallel_state

    from bam_megatron.checkpoint import CheckpointMeta, save_checkpoint
    from bam_megatron.data.tokenizer import load_tokenizer
    from bam_megatron.evaluation.cli import main
    from bam_megatron.model.architecture import Architecture, padded_vocab_size
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.model.variants import PRESETS
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    tokenizer = load_tokenizer(tokenizer_model)
    architecture = Architecture(
        variant="bam",
        num_experts=len(EXPERTS),
        padded_vocab_size=padded_vocab_size(tokenizer.vocab_size, 128, 1),
        **PRESETS["tiny"].architecture_fields(),
    )
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), SEQ)
    params = dict(model.named_parameters())
    scale = 1.0 / math.sqrt(1.0 / architecture.hidden_size + architecture.norm_epsilon)  # RMSNorm(e_0)[0]
    with torch.no_grad():
        params["embedding.word_embeddings.weight"].zero_()[:, 0] = 1.0
        for layer in range(architecture.num_layers):
            prefix = f"decoder.layers.{layer}."
            params[prefix + "self_attention.linear_proj.weight"].zero_()
            for k in range(len(EXPERTS)):
                params[prefix + f"mlp.experts.local_experts.{k}.linear_fc2.weight"].zero_()
            attention = params[prefix + "self_attention.router.weight"].zero_()
            attention[:, 0] = torch.tensor(GATES[layer]).log() / scale  # softmax(log g) = g
            ffn = params[prefix + "mlp.router.weight"].zero_()
            ffn[FFN_WINNER[layer], 0] = 1.0
    meta = CheckpointMeta(
        architecture=architecture,
        seq_length=SEQ,
        tokenizer_fingerprint=tokenizer.fingerprint,
        tokenizer_model=tokenizer_model,
        lineage={"upcycled": {"expert_names": EXPERTS}},
    )
    save_checkpoint(os.path.join(root, "mix"), 1, model, None, None, meta)
    parallel_state.destroy_model_parallel()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, corpus):
    """bam-eval of the fixture mixture on code, law and math (expert names from the lineage)."""
    root = tmp_path_factory.mktemp("own-expert")
    output_dir = root / "out"
    argv = ["--model", f"mix={root / 'mix'}", "--data-path", *[corpus[d] for d in DOMAINS]]
    argv += ["--eval-samples", "3", "--micro-batch-size", "2", "--output-dir", str(output_dir)]
    ((code, out),) = run_distributed(_save_and_evaluate, 1, args=(str(root), corpus["tokenizer"], argv))
    assert code == 0, out
    return {"stdout": out, "routing": json.loads((output_dir / "routing.json").read_text()), "dir": output_dir}


def test_own_expert_shares_in_routing_json_are_the_shares_the_routers_give(evaluated):
    entry = evaluated["routing"]["models"]["mix"]
    assert entry["expert_names"] == EXPERTS  # from the lineage
    own = entry["own_expert"]
    for domain in ("code", "law"):
        index = EXPERTS.index(domain)
        gates = [GATES[layer][index] for layer in range(2)]
        shares = [float(FFN_WINNER[layer] == index) for layer in range(2)]
        assert own[domain]["expert"] == domain
        assert own[domain]["attention_gates"]["per_layer"] == pytest.approx(gates, abs=1e-5)
        assert own[domain]["attention_gates"]["mean"] == pytest.approx(sum(gates) / 2, abs=1e-5)
        assert own[domain]["ffn_selection"] == {"per_layer": shares, "mean": 0.5}
    assert own["math"] == {"expert": None}  # no expert of its name: shown as such, not an error


def test_own_expert_table_is_printed_and_written(evaluated):
    lines = (evaluated["dir"] / "routing.md").read_text().splitlines()
    header = lines.index("| model | router | code | law | math |")
    assert lines[header + 2] == "| mix | attention: mean gate | 0.20 (0.30, 0.10) | 0.40 (0.20, 0.60) | no expert |"
    assert lines[header + 3] == (
        "| mix | FFN: share of tokens routed (top-1) | 0.50 (1.00, 0.00) | 0.50 (0.00, 1.00) | no expert |"
    )
    for line in lines[header:]:
        assert line in evaluated["stdout"]
    assert str(evaluated["dir"] / "routing_mix.png") in evaluated["stdout"]
