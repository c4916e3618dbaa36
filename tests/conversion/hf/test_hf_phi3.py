"""bam-convert-hf import and export of Phi-3 / Phi-4 (``Phi3ForCausalLM``) against transformers itself.

Tiny random ``Phi3ForCausalLM`` models are built with transformers and saved with
``save_pretrained`` (large weights: init std 0.3, norms perturbed), as in test_hf_import.py. Each
import must give transformers' fp32 logits within 1e-5 x max |logit|; its export (``--format
auto``) goes back to Phi3ForCausalLM, whose logits are transformers' again, and export -> import
-> export is byte-identical. Settings megatron-core cannot compute are refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import assert_round_trip, convert, import_export_round_trips
from tests.support.hf_models import SEQ, TOKENS, hf_directory

RTOL = 1e-5
PHI3 = dict(num_key_value_heads=2, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "phi3-gqa": dict(PHI3, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    # Phi-4-like: tied embeddings; head_dim 24 != hidden / heads = 16; a window as long as the sequence
    "phi3-tied": dict(PHI3, tie_word_embeddings=True, head_dim=24, sliding_window=SEQ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_phi3")
    made = {}
    for name, settings in MODELS.items():
        made[name] = str(root / name)
        torch.save(hf_directory(made[name], "Phi3", **settings), os.path.join(made[name], "logits.pt"))
    return made


@pytest.fixture(scope="module")
def imported(models, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_phi3_out"))
    (results,) = run_distributed(
        import_export_round_trips, 1, args=({name: (path, root) for name, path in models.items()}, TOKENS)
    )
    return root, results


@pytest.mark.parametrize("name", list(MODELS))
def test_phi3_imports_with_transformers_logits_and_exports_back_to_phi3(imported, name):
    root, results = imported
    result = results[name]
    assert_round_trip(root, name, result, "Phi3ForCausalLM", RTOL)
    config = json.load(open(os.path.join(root, f"{name}-hf", "config.json")))
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["sliding_window"] is None


def test_the_imported_phi3_architectures(imported):
    _, results = imported
    gqa, tied = results["phi3-gqa"]["architecture"], results["phi3-tied"]["architecture"]
    for a in (gqa, tied):
        assert (a.variant, a.block_type, a.normalization, a.num_query_groups) == ("dense", "sequential", "RMSNorm", 2)
        assert not a.add_qkv_bias and not a.qk_layernorm and a.rope_scaling_factor is None
    assert gqa.rotary_base == 20000.0 and gqa.untie_embeddings_and_output_weights and gqa.kv_channels is None
    assert not tied.untie_embeddings_and_output_weights and tied.kv_channels == 24 and tied.norm_epsilon == 1e-5


def test_phi3_settings_megatron_core_cannot_compute_are_refused_in_one_line(models, tmp_path):
    base = json.load(open(os.path.join(models["phi3-gqa"], "config.json")))
    factors = [1.0] * 8  # head size 16: 8 frequencies
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": factors, "long_factor": factors}
    cases = [
        (dict(rope_parameters=longrope), "rope_parameters.rope_type=longrope"),
        (
            dict(rope_parameters=None, rope_scaling={"type": "su", "short_factor": factors, "long_factor": factors}),
            "rope_scaling.type=su",
        ),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}),
            "partial_rotary_factor=0.75",
        ),
        (dict(sliding_window=16), "sliding_window=16"),
        (dict(hidden_act="gelu_new"), "hidden_act=gelu_new"),
        (dict(architectures=["Phi3ForSequenceClassification"]), "Phi3ForSequenceClassification"),
    ]
    out = str(tmp_path / "out")
    for i, (changes, message) in enumerate(cases):
        bad = tmp_path / f"bad-{i}"
        shutil.copytree(models["phi3-gqa"], bad)
        json.dump({k: v for k, v in {**base, **changes}.items() if v is not None}, open(bad / "config.json", "w"))
        code, text = convert("import", "--load", str(bad), "--save", out)
        assert code == 2 and message in text, (changes, text)
        assert len(text.strip().splitlines()) == 1 and not os.path.exists(out), text
        assert not [n for n in os.listdir(tmp_path) if n.startswith("out.tmp")]


def _forced(root: str) -> list[tuple[int, str, bool]]:
    """Rank body: checkpoints Phi3ForCausalLM cannot compute, exported with --format phi3."""
    from bam_megatron.model.architecture import Architecture
    from tests.support.hf import SIZES, VOCAB, save_random_checkpoint

    cases = {
        "scaled": dict(rope_scaling_factor=8.0, rotary_base=500000.0),
        "biased": dict(add_qkv_bias=True),
        "parallel": dict(block_type="parallel"),
    }
    results = []
    out = os.path.join(root, "refused")
    for name, settings in cases.items():
        settings = {"variant": "dense", "block_type": "sequential", **settings}
        a = Architecture(**SIZES, padded_vocab_size=VOCAB, **settings)
        checkpoint = save_random_checkpoint(os.path.join(root, name), a)
        code, text = convert("export", "--load", checkpoint, "--save", out, "--format", "phi3")
        results.append((code, text, os.path.exists(out) or any(n.startswith("refused.tmp") for n in os.listdir(root))))
    return results


def test_forcing_phi3_on_a_model_it_cannot_compute_is_one_line(tmp_path):
    (results,) = run_distributed(_forced, 1, args=(str(tmp_path),))
    expected = [
        "--format phi3: rope_scaling_factor=8.0: Phi3ForCausalLM has no Llama-3 RoPE scaling",
        "--format phi3: add_qkv_bias=True: Phi3ForCausalLM has no q/k/v biases",
        "--format phi3: block_type=parallel: Phi3ForCausalLM's layer is the sequential block",
    ]
    for (code, text, left), message in zip(results, expected):
        assert code == 2 and message in text, (message, text)
        assert len(text.strip().splitlines()) == 1 and not left, text


def test_phi3_defaults_are_transformers_defaults():
    """A config.json that leaves fields out is read with Phi3Config's values for them."""
    import transformers

    from bam_megatron.conversion.hf import families

    sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=32, vocab_size=1000)
    theirs = transformers.Phi3Config(**sizes, pad_token_id=0)
    ours = families.IMPORTERS["phi3"]({"model_type": "phi3", **sizes}, seq_length=16)
    a = ours.architecture
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads and ours.kv_heads == 32
    assert ours.kv_heads == theirs.num_key_value_heads
    assert (a.norm_epsilon, a.rotary_base) == (theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"])
    assert a.untie_embeddings_and_output_weights != theirs.tie_word_embeddings
    assert ours.default_seq_length() == theirs.max_position_embeddings
    assert ours.get("sliding_window") == theirs.sliding_window is None
