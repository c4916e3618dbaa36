"""Remote-code export of a BAM upcycled from Qwen-style sources: each attention expert's own QKV biases
(Qwen2) or per-head Q/K norms (Qwen3, a row per expert) reach transformers, whose logits and KV-cached
generation are ours; the export imports back to the same checkpoint, and bam-generate's KV-cached
decoding (megatron-core's static cache) gives its uncached tokens. The same for OLMo 2-style sources
(norms after attention and FFN, each expert's Q/K norms over its whole projection), BTX included
(no MoE class has OLMo 2's norms: remote code); and for Gemma 3-style sources (Gemma's layer, local
layers) and Gemma 2-style ones (soft-capping)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import RTOL, TOKENS, VOCAB

QWEN = {
    "qwen3": dict(qk_layernorm=True, kv_channels=24),
    "qwen2": dict(add_qkv_bias=True),
    "olmo2": dict(norm_placement="post", qk_layernorm=True, qk_layernorm_scope="projection"),
    # Gemma 3's layer: (1 + w) norms before and after, GeGLU, scaled embeddings, layer 1 local
    "gemma3": dict(
        norm_placement="both",
        apply_layernorm_1p=True,
        activation="geglu",
        scale_embeddings=True,
        qk_layernorm=True,
        query_pre_attn_scalar=24.0,
        local_rotary_base=1000.0,
        global_attention_every=2,
    ),
    # Gemma 2's: soft caps small enough to bite
    "gemma2": dict(
        norm_placement="both",
        apply_layernorm_1p=True,
        activation="geglu",
        scale_embeddings=True,
        query_pre_attn_scalar=24.0,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
}
CASES = [(kind, method) for kind in ("qwen3", "qwen2") for method in ("bam", "bam-shared-kv")]
# OLMo 2's shared K norm over the projection is its own path; Gemma's shared per-head K norm is Qwen3's
CASES += [("olmo2", method) for method in ("bam", "bam-shared-kv", "btx")]
CASES += [(kind, method) for kind in ("gemma3", "gemma2") for method in ("bam", "btx")]
NEW = 8


def _upcycle_export_import(root: str, kind: str, method: str) -> dict:
    """Rank body: two random Qwen-style dense sources -> bam-upcycle ``method`` -> export -> import;
    logits, tokens and tensor shapes along the way."""
    from bam_megatron.checkpoint import load_model, resolve_checkpoint
    from bam_megatron.inference.generate import generate
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize
    from tests.support.hf import convert, hf_model, our_logits, save_random_checkpoint
    from tests.support.tools import run_main

    a = Architecture("dense", 2, 64, 96, 4, 2, VOCAB, block_type="sequential", **QWEN[kind])
    dense = [save_random_checkpoint(os.path.join(root, f"dense-{i}"), a, seed=i) for i in range(2)]
    bam, exported, back = (os.path.join(root, name) for name in (method, "hf", "back"))
    experts = ["--expert", f"a={dense[0]}", "--expert", f"b={dense[1]}"]
    # decisive attention gates (std 0.5), so that a wrong expert's norm or bias would show
    argv = [*experts, "--method", method, "--save", bam, "--report-batches", "0", "--router-init-std", "0.5"]
    code, err = run_main("bam-upcycle", argv)
    assert code == 0, err
    initialize(ParallelSizes())
    code, text = convert("export", "--load", bam, "--save", exported)
    assert code == 0, text
    ours = our_logits(bam, TOKENS)
    model, problems = hf_model(exported)
    prompt = TOKENS[:1, :9]
    with torch.no_grad():
        theirs = model(TOKENS).logits
        hf_tokens = {
            cached: model.generate(
                prompt, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, use_cache=cached
            )[0, prompt.shape[1] :].tolist()
            for cached in (True, False)
        }
    code, text = convert("import", "--load", exported, "--save", back)
    assert code == 0, text
    megatron = load_model(resolve_checkpoint(bam))
    return {
        "class": json.load(open(os.path.join(exported, "config.json")))["architectures"],
        "problems": problems,
        "shapes": {n: tuple(p.shape) for n, p in model.named_parameters() if ".layers.0.self_attn." in n},
        "error": ((theirs - ours).abs().max() / ours.abs().max()).item(),
        "imported_equal": torch.equal(our_logits(back, TOKENS), ours),
        "hf_tokens": hf_tokens,
        "cached": generate(megatron, prompt.tolist(), NEW).tokens[0],
        "uncached": generate(megatron, prompt.tolist(), NEW, use_kv_cache=False).tokens[0],
    }


@pytest.mark.parametrize("kind, method", CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_qwen_sourced_bam_exports_computes_transformers_logits_imports_back_and_decodes(tmp_path, kind, method):
    (r,) = run_distributed(_upcycle_export_import, 1, args=(str(tmp_path), kind, method))
    assert r["class"] == ["BamForCausalLM"] and not r["problems"], r
    shapes, n, kv = r["shapes"], 2, 2 if method == "bam" else 1  # two experts; K/V heads' owners
    if method == "btx":  # one attention
        n = kv = 1
    if kind == "olmo2":  # every channel of the wide Q and K: N·H·d, N·H_kv·d (expert) or H_kv·d (shared)
        assert shapes["model.layers.0.self_attn.q_norm.weight"] == (n * 4 * 16,), shapes
        assert shapes["model.layers.0.self_attn.k_norm.weight"] == (kv * 2 * 16,), shapes
    elif kind in ("qwen3", "gemma3"):  # each expert's Q norm a row; K norm too unless K/V is shared
        d, rows = (24 if kind == "qwen3" else 16), (n,) if n > 1 else ()
        assert shapes["model.layers.0.self_attn.q_norm.weight"] == (*rows, d), shapes
        assert shapes["model.layers.0.self_attn.k_norm.weight"] == ((*rows, d) if kv == n else (d,)), shapes
    elif (
        kind == "qwen2"
    ):  # the wide attention's biases: N·H query heads, N·H_kv (expert) or H_kv (shared) K/V heads of 16
        assert shapes["model.layers.0.self_attn.q_proj.bias"] == (n * 4 * 16,), shapes
        assert shapes["model.layers.0.self_attn.k_proj.bias"] == (kv * 2 * 16,), shapes
    assert r["error"] < RTOL, r["error"]
    assert r["imported_equal"]
    assert r["hf_tokens"][True] == r["hf_tokens"][False] == r["cached"] == r["uncached"], r
    assert len(r["cached"]) == NEW
