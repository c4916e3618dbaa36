"""Router bias through Hugging Face: the remote code carries both routers' biases (and a grown
mixture's new-expert offset, folded in), native MoE classes are refused for it with the reason,
and the remote-code import reads the biases back."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import (
    RTOL,
    SIZES,
    TOKENS,
    VOCAB,
    convert,
    directory_files,
    hf_model,
    our_logits,
    relative_error,
    save_random_checkpoint,
)

pytest.importorskip("transformers")

CASES = {  # router_bias on: soft MoA (both routers), and a BTX that would otherwise be Qwen2-MoE
    "bam": dict(variant="bam", num_experts=2),
    "btx-sequential": dict(variant="btx", block_type="sequential", num_experts=3, moe_router_topk=2),
}
# a mixture grown from 2 experts by 2 (bam-upcycle --extend), saved at step 0 of its ramp
GROWN = dict(variant="bam-shared-kv", num_experts=4)
GROWN_LINEAGE = {
    "grown": [
        {
            "expert_names": ["a", "b", "c", "d"],
            "joined": [],
            "left": [],
            "router_ramp": {"experts": [2, 3], "groups": [2, 2], "start_offset": 16.0, "iters": 10, "origin": 0},
        }
    ]
}


def _architecture(fields: dict):
    from bam_megatron.model.architecture import Architecture

    return Architecture(**SIZES, padded_vocab_size=VOCAB, router_bias=True, **fields)


def _export_all(root: str) -> dict:
    """Rank body: each case exported (auto) and compared with ours; an import and re-export; the
    grown mixture at step 0."""
    results = {}
    for i, (name, fields) in enumerate([*CASES.items(), ("grown", GROWN)]):
        lineage = GROWN_LINEAGE if name == "grown" else None
        checkpoint = save_random_checkpoint(os.path.join(root, name), _architecture(fields), i, lineage=lineage)
        out = os.path.join(root, f"{name}-hf")
        code, text = convert("export", "--load", checkpoint, "--save", out)
        assert code == 0, (name, text)
        model, problems = hf_model(out)
        with torch.no_grad():
            theirs = model(TOKENS).logits
        ours = our_logits(checkpoint, TOKENS)
        results[name] = {
            "class": type(model).__name__,
            "problems": problems,
            "text": text,
            "error": relative_error(theirs, ours),
            "config": json.load(open(os.path.join(out, "config.json"))),
            "biases": {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("router.bias")},
        }
        if name == "grown":  # the new experts' gates: exactly 0 in the export too
            layer = model.model.layers[0]
            x = torch.randn(2, 5, SIZES["hidden_size"])
            results[name]["gates"] = layer.self_attn.gates(x)
        else:
            seed, again = os.path.join(root, f"{name}-seed"), os.path.join(root, f"{name}-again")
            results[name]["import"] = convert("import", "--load", out, "--save", seed)
            results[name]["export"] = convert("export", "--load", seed, "--save", again)
            results[name]["same"] = directory_files(out) == directory_files(again)
    return results


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("router-bias")
    (results,) = run_distributed(_export_all, 1, args=(str(root),))
    return results


@pytest.mark.parametrize("name", [*CASES, "grown"])
def test_the_remote_code_carries_both_routers_biases(exported, name):
    r = exported[name]
    assert r["class"] == "BamForCausalLM" and not r["problems"], r
    assert r["error"] < RTOL, r["error"]
    assert r["config"]["router_bias"] is True
    layers = SIZES["num_layers"] * (2 if name != "btx-sequential" else 1)
    assert len(r["biases"]) == layers and all(b.abs().max() > 0 for b in r["biases"].values())


def test_a_native_class_without_router_bias_is_refused_for_remote_code(exported):
    text = exported["btx-sequential"]["text"]
    assert "exported with --format bam (trust_remote_code) because router_bias=True: Qwen2MoeForCausalLM's" in text


def test_forcing_a_native_class_for_a_biased_model_is_one_line(tmp_path, exported):
    ((code, text),) = run_distributed(_forced, 1, args=(str(tmp_path),))
    assert code == 2 and "--format qwen2_moe: router_bias=True: Qwen2MoeForCausalLM's router" in text, text
    assert len(text.strip().splitlines()) == 1


def _forced(root: str) -> tuple[int, str]:
    """Rank body: a biased BTX exported with --format qwen2_moe."""
    checkpoint = save_random_checkpoint(os.path.join(root, "btx"), _architecture(CASES["btx-sequential"]))
    return convert("export", "--load", checkpoint, "--save", os.path.join(root, "out"), "--format", "qwen2_moe")


def test_the_grown_mixtures_offset_is_folded_into_the_exported_bias(exported):
    r = exported["grown"]
    assert r["config"]["router_expert_groups"] == [2, 2]
    for name, bias in r["biases"].items():
        assert (bias[2:] < -1000).all() and (bias[:2].abs() < 10).all(), (name, bias)
    assert torch.equal(r["gates"][..., 2:], torch.zeros_like(r["gates"][..., 2:]))


@pytest.mark.parametrize("name", list(CASES))
def test_export_import_export_is_byte_identical_with_router_bias(exported, name):
    r = exported[name]
    assert r["import"][0] == 0 and r["export"][0] == 0, (r["import"], r["export"])
    assert r["same"]
