"""bam-convert-hf import of transformers' mixtures (Qwen2-MoE, Qwen3-MoE, Mixtral) as BTX seeds, and
the way back out to the family a seed was imported from (Qwen2, Mistral included).

Tiny random models are built with transformers and saved with ``save_pretrained`` (large weights:
init std 0.3, norms and biases perturbed), as in tests/conversion/hf/test_hf_import.py. Each import must give
transformers' fp32 logits within 1e-5 x max |logit|; its export goes back to the same class,
whose logits are transformers' again, and export -> import -> export is byte-identical.
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
MOE = dict(num_key_value_heads=2, max_position_embeddings=SEQ, num_experts_per_tok=2)

# name -> (transformers family, config settings, the class the seed is exported to)
FAMILIES = {
    "qwen2-moe": (
        "Qwen2Moe",
        dict(MOE, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=0, qkv_bias=True),
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-moe-renormalised": (
        "Qwen2Moe",
        dict(
            MOE,
            num_experts=3,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=0,
            norm_topk_prob=True,
            qkv_bias=False,
            tie_word_embeddings=True,
        ),
        "Qwen2MoeForCausalLM",
    ),
    "qwen3-moe": ("Qwen3Moe", dict(MOE, num_experts=4, moe_intermediate_size=48, head_dim=24), "Qwen3MoeForCausalLM"),
    "mixtral": ("Mixtral", dict(MOE, num_local_experts=4), "MixtralForCausalLM"),
    # the dense families a seed goes back to because it was imported from them
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, max_position_embeddings=SEQ), "Qwen2ForCausalLM"),
    "mistral": (
        "Mistral",
        dict(num_key_value_heads=2, max_position_embeddings=SEQ, sliding_window=SEQ),
        "MistralForCausalLM",
    ),
    # Llama's attention_bias with o_proj biases of zeros: q/k/v biases (add_qkv_bias)
    "llama-attention-bias": (
        "Llama",
        dict(num_key_value_heads=2, max_position_embeddings=SEQ, attention_bias=True, zero_output_bias=True),
        "LlamaForCausalLM",
    ),
}


def _save(path: str, family: str, settings: dict) -> None:
    settings = dict(settings)
    zero_output_bias = settings.pop("zero_output_bias", False)
    logits = hf_directory(path, family, **settings)
    if zero_output_bias:  # transformers' random o_proj biases -> zeros, and the logits of that model
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        tensors = load_file(os.path.join(path, "model.safetensors"))
        for name in tensors:
            if name.endswith("o_proj.bias"):
                tensors[name] = torch.zeros_like(tensors[name])
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(TOKENS).logits
    torch.save(logits, os.path.join(path, "logits.pt"))


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_moe")
    made = {}
    for name, (family, settings, _) in FAMILIES.items():
        made[name] = str(root / name)
        _save(made[name], family, settings)
    return made


@pytest.fixture(scope="module")
def imported(families, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_moe_out"))
    (results,) = run_distributed(
        import_export_round_trips, 1, args=({name: (path, root) for name, path in families.items()}, TOKENS)
    )
    return root, results


@pytest.mark.parametrize("name", list(FAMILIES))
def test_imports_compute_transformers_logits_and_export_back_to_the_family(imported, name):
    root, results = imported
    result = results[name]
    assert_round_trip(root, name, result, FAMILIES[name][2], RTOL)


def test_the_imported_architectures(imported):
    _, results = imported
    arch = {name: result["architecture"] for name, result in results.items()}
    for name in ("qwen2-moe", "qwen2-moe-renormalised", "qwen3-moe", "mixtral"):
        assert arch[name].variant == "btx" and arch[name].block_type == "sequential", name
    assert (arch["qwen2-moe"].num_experts, arch["qwen2-moe"].moe_router_topk, arch["qwen2-moe"].ffn_hidden_size) == (
        4,
        2,
        48,
    )
    assert arch["qwen2-moe"].moe_router_pre_softmax and arch["qwen2-moe"].add_qkv_bias
    assert not arch["qwen2-moe-renormalised"].moe_router_pre_softmax and not arch["qwen2-moe-renormalised"].add_qkv_bias
    assert arch["qwen3-moe"].qk_layernorm and arch["qwen3-moe"].kv_channels == 24
    assert not arch["mixtral"].moe_router_pre_softmax and arch["mixtral"].ffn_hidden_size == 128
    assert arch["llama-attention-bias"].add_qkv_bias and arch["llama-attention-bias"].variant == "dense"


def test_mixtures_bam_megatron_cannot_hold_are_refused_in_one_line(families, tmp_path):
    base = json.load(open(os.path.join(families["qwen2-moe"], "config.json")))
    cases = [
        ("qwen2-moe", dict(shared_expert_intermediate_size=32), "shared_expert_intermediate_size=32"),
        ("qwen2-moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        ("qwen2-moe", dict(mlp_only_layers=[0]), "mlp_only_layers=[0]"),
        ("qwen2-moe", dict(norm_topk_prob=True, num_experts_per_tok=1), "renormalised top-1 routing"),
        ("mixtral", dict(num_experts_per_tok=1), "renormalised top-1 routing"),
        # (layer_types left out: Qwen2MoeConfig derives them, every other layer sliding)
        ("qwen2-moe", dict(use_sliding_window=True, sliding_window=16, layer_types=None), "use_sliding_window=true"),
    ]
    out = str(tmp_path / "out")
    for i, (family, changes, message) in enumerate(cases):
        bad = tmp_path / f"bad-{i}"
        shutil.copytree(families[family], bad)
        config = json.load(open(bad / "config.json")) if family != "qwen2-moe" else dict(base)
        json.dump({k: v for k, v in {**config, **changes}.items() if v is not None}, open(bad / "config.json", "w"))
        code, text = convert("import", "--load", str(bad), "--save", out)
        assert code == 2 and message in text, (changes, text)
        assert len(text.strip().splitlines()) == 1 and not os.path.exists(out), text


def _import(source: str, seed: str) -> tuple[int, str]:
    return convert("import", "--load", source, "--save", seed)


def test_a_non_zero_output_bias_is_refused_while_writing(tmp_path):
    """Llama's attention_bias adds an o_proj bias megatron-core's attention does not have: it must be zero."""
    source = str(tmp_path / "llama")
    hf_directory(source, "Llama", num_key_value_heads=2, max_position_embeddings=SEQ, attention_bias=True)
    ((code, text),) = run_distributed(_import, 1, args=(source, str(tmp_path / "seed")))
    assert code == 2 and "attention_bias=True: tensor model.layers.0.self_attn.o_proj.bias is not zero" in text, text
    assert len(text.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "seed"), text
