"""Tiny bam-megatron checkpoints of every (variant, block) for the Hugging Face export tests.

Made by our own code: an `Architecture`, megatron-core's model built from it on one rank, large
random weights (std 0.3, norms 1 ± 0.2: attention far from uniform, routers decisive, so a wrong
head order, RoPE, routing or norm shows by tens of percent) and `store.save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Optional

import torch

SIZES = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2)
VOCAB = 384  # >= the 320 pieces of the corpus fixture's SentencePiece tokenizer
SEQ = 32
TOKENS = torch.randint(4, 320, (2, 24), generator=torch.Generator().manual_seed(0))
RTOL = 1e-5  # max |Δlogit| / max |logit|
MOE = dict(num_experts=3, moe_router_topk=2)

# name -> (Architecture settings beyond SIZES, the class --format auto exports it to)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "dense-parallel-layernorm": (dict(variant="dense", normalization="LayerNorm"), "CohereForCausalLM"),
    "dense-parallel": (dict(variant="dense"), "BamForCausalLM"),
    # Llama 3.1's RoPE scaling bites at 24 tokens with head size 16 and base 500000
    "dense-sequential": (
        dict(variant="dense", block_type="sequential", rope_scaling_factor=8.0, rotary_base=500000.0),
        "LlamaForCausalLM",
    ),
    # Llama's attention_bias (its o_proj bias written as zeros); Qwen2 only for seeds imported from it
    "dense-sequential-qkv-bias": (
        dict(variant="dense", block_type="sequential", add_qkv_bias=True, untie_embeddings_and_output_weights=False),
        "LlamaForCausalLM",
    ),
    "dense-sequential-qk-norm": (
        dict(variant="dense", block_type="sequential", qk_layernorm=True, kv_channels=24),
        "Qwen3ForCausalLM",
    ),
    "dense-sequential-layernorm": (
        dict(variant="dense", block_type="sequential", normalization="LayerNorm"),
        "BamForCausalLM",
    ),
    "btx-sequential": (dict(variant="btx", block_type="sequential", **MOE), "Qwen2MoeForCausalLM"),
    "btx-sequential-top1-qkv-bias": (
        dict(variant="btx", block_type="sequential", num_experts=3, add_qkv_bias=True),
        "Qwen2MoeForCausalLM",
    ),
    "btx-sequential-renormalised": (
        dict(variant="btx", block_type="sequential", moe_router_pre_softmax=False, **MOE),
        "MixtralForCausalLM",
    ),
    "btx-sequential-qk-norm": (
        dict(variant="btx", block_type="sequential", qk_layernorm=True, **MOE),
        "Qwen3MoeForCausalLM",
    ),
    # sparse upcycling's routing scale (E/k)
    "btx-sequential-scaled": (
        dict(variant="btx", block_type="sequential", moe_router_topk_scaling_factor=1.5, **MOE),
        "BamForCausalLM",
    ),
    "btx-parallel": (dict(variant="btx", moe_router_pre_softmax=False, **MOE), "BamForCausalLM"),
    "bam-parallel": (dict(variant="bam", num_experts=2, moe_router_topk=2), "BamForCausalLM"),
    "bam-sequential": (dict(variant="bam", block_type="sequential", num_experts=2), "BamForCausalLM"),
    "bam-shared-kv-parallel": (
        dict(variant="bam-shared-kv", num_experts=2, attention_router_topk=1),
        "BamForCausalLM",
    ),
    "bam-shared-kv-sequential": (
        dict(variant="bam-shared-kv", block_type="sequential", num_experts=3, moe_router_topk=2),
        "BamForCausalLM",
    ),
}


def architecture(name: str):
    """The `Architecture` of case ``name``."""
    from bam_megatron.model.architecture import Architecture

    return Architecture(**SIZES, padded_vocab_size=VOCAB, **CASES[name][0])


def save_random_checkpoint(
    root: str,
    a,
    seed: int = 0,
    tokenizer: Optional[tuple[str, str]] = None,
    seq_length: int = SEQ,
    lineage: Optional[dict] = None,
) -> str:
    """Rank body: a checkpoint of ``a`` with large random weights at ``root``; ``tokenizer``: (path, kind) recorded;
    ``seq_length``: the recorded --seq-length (an export's max_position_embeddings); ``lineage``: its meta's."""
    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.data.tokenizer import load_tokenizer
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    config = a.model_config(use_cpu_initialization=True, perform_initialization=False)
    model = build_from_architecture(a, config, seq_length, backend="local")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if param.dim() == 1 and not name.endswith(".bias") else 0.3 * noise)
    fields: dict[str, Any] = {}
    if tokenizer is not None:
        path, kind = tokenizer
        fields = dict(
            tokenizer_model=path, tokenizer_type=kind, tokenizer_fingerprint=load_tokenizer(path, kind).fingerprint
        )
    meta = CheckpointMeta(
        architecture=a, seq_length=seq_length, training={"init_method_std": 0.3}, lineage=lineage or {}, **fields
    )
    with contextlib.redirect_stdout(io.StringIO()):
        store.save_checkpoint(root, 0, model, None, None, meta)
    return root


def convert(*argv: str) -> tuple[int, str]:
    """bam-convert-hf in this process; (exit code, stdout + stderr)."""
    from bam_megatron.conversion.hf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def our_logits(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    """Rank body: our model's fp32 logits [b, s, vocab] from ``checkpoint``."""
    from bam_megatron.checkpoint import load_model, resolve_checkpoint

    model = load_model(resolve_checkpoint(checkpoint))
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def relative_error(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """max |theirs - ours| / max |ours|."""
    return ((theirs - ours).abs().max() / ours.abs().max()).item()


def hf_model(directory: str):
    """transformers' model of an export (fp32, eval) and its loading info."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    return model.eval(), problems


def directory_files(directory: str) -> dict[str, bytes]:
    """Every file of an export but its manifest (which names the source checkpoint), by name."""
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
        if name != "bam_export.json"
    }


def import_export_round_trips(jobs: dict[str, tuple[str, str]], tokens: torch.Tensor) -> dict:
    """Rank body of the family tests: for each name -> (a transformers directory holding ``logits.pt``,
    a work root): import; our logits against transformers' (relative error); export (``--format auto``);
    transformers' logits of the export; import and export again (for the byte-identity check)."""
    from bam_megatron.checkpoint import store

    results = {}
    for name, (source, root) in jobs.items():
        seed, out, seed2, again = (os.path.join(root, f"{name}-{x}") for x in ("seed", "hf", "seed2", "again"))
        result = results[name] = {"import": convert("import", "--load", source, "--save", seed)}
        if result["import"][0]:
            continue
        theirs = torch.load(os.path.join(source, "logits.pt"))
        result["error"] = relative_error(our_logits(seed, tokens), theirs)
        result["architecture"] = store.read_meta(store.resolve_checkpoint(seed)).architecture
        result["export"] = convert("export", "--load", seed, "--save", out)
        model, result["problems"] = hf_model(out)
        result["class"] = type(model).__name__
        with torch.no_grad():
            result["export_error"] = relative_error(model(tokens).logits, theirs)
        result["again"] = [
            convert("import", "--load", out, "--save", seed2),
            convert("export", "--load", seed2, "--save", again),
        ]
    return results


def assert_round_trip(root: str, name: str, result: dict, architecture_class: str, rtol: float) -> None:
    """What `import_export_round_trips` gives for ``name`` holds: the import succeeded with transformers' logits
    (relative error below ``rtol``), the export is ``architecture_class`` with transformers' logits again and
    nothing missing or unexpected, and export -> import -> export wrote the same bytes."""
    assert result["import"][0] == 0, result["import"]
    assert result["error"] < rtol, (name, result["error"])
    assert result["export"][0] == 0 and result["class"] == architecture_class, (name, result["export"], result["class"])
    assert result["problems"] == {} and result["export_error"] < rtol, (name, result)
    assert all(code == 0 for code, _ in result["again"]), result["again"]
    first = directory_files(os.path.join(root, f"{name}-hf"))
    again = directory_files(os.path.join(root, f"{name}-again"))
    assert sorted(first) == sorted(again) and all(first[f] == again[f] for f in first), name
