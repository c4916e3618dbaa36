"""bam-convert-hf export: every (variant, block) to the transformers class that computes it, checked.

For each case of tests/support/hf.py (tiny checkpoints made by our own code, large random
weights), ``--format auto`` must pick the expected class (a native one wherever one is exact,
else remote code with the reason), the export must load with plain ``from_pretrained`` (or with
``trust_remote_code=True``) with no missing, unexpected or mis-shaped tensor, its fp32 logits
must equal ours within 1e-5 x max |logit|, and KV-cached greedy decoding must equal uncached.
Then: export -> import -> export is byte-identical (every native class and the remote code),
sharded output loads, forcing a class that cannot compute the model is a one-line refusal,
a weight transformers would re-initialise refuses the export, and AutoTokenizer loads the
shipped tokenizer (SentencePiece and Hugging Face) with the ids we trained on.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import (
    CASES,
    RTOL,
    TOKENS,
    architecture,
    convert,
    directory_files,
    hf_model,
    our_logits,
    relative_error,
    save_random_checkpoint,
)

NATIVE = [name for name, (_, cls) in CASES.items() if cls != "BamForCausalLM"]
ROUND_TRIPS = [*NATIVE, "bam-shared-kv-sequential", "dense-sequential-layernorm"]
SHARDED = "btx-sequential"


def _export_everything(root: str, tokenizers: dict[str, tuple[str, str]]) -> dict:
    """Rank body: every case saved, exported (auto), loaded by transformers and compared with ours;
    the round trips; a sharded export."""
    results: dict = {}
    prompt = TOKENS[:1, :5]
    for i, name in enumerate(CASES):
        checkpoint = save_random_checkpoint(os.path.join(root, name), architecture(name), i, tokenizers.get(name))
        out = os.path.join(root, f"{name}-hf")
        code, text = convert("export", "--load", checkpoint, "--save", out)
        assert code == 0, (name, text)
        model, problems = hf_model(out)
        with torch.no_grad():
            theirs = model(TOKENS).logits
            cached = model.generate(prompt, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
            uncached = model.generate(
                prompt, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0, use_cache=False
            )
        results[name] = {
            "class": type(model).__name__,
            "problems": problems,
            "text": text,
            "error": relative_error(theirs, our_logits(checkpoint, TOKENS)),
            "cached": cached[0, 5:].tolist(),
            "uncached": uncached[0, 5:].tolist(),
        }
        if name in ROUND_TRIPS:
            seed, again = os.path.join(root, f"{name}-seed"), os.path.join(root, f"{name}-again")
            results[name]["import"] = convert("import", "--load", out, "--save", seed)
            results[name]["export"] = convert("export", "--load", seed, "--save", again)
    checkpoint = os.path.join(root, SHARDED)
    sharded, seed = os.path.join(root, "sharded"), os.path.join(root, "sharded-seed")
    results["sharded"] = {
        "export": convert("export", "--load", checkpoint, "--save", sharded, "--max-shard-size", "30KB"),
        "import": convert("import", "--load", sharded, "--save", seed),
    }
    model, results["sharded"]["problems"] = hf_model(sharded)
    with torch.no_grad():
        results["sharded"]["logits"] = model(TOKENS).logits
        results["sharded"]["unsharded"] = hf_model(os.path.join(root, f"{SHARDED}-hf"))[0](TOKENS).logits
    results["sharded"]["seed_logits"] = our_logits(seed, TOKENS)
    results["sharded"]["logits_of_ours"] = our_logits(checkpoint, TOKENS)
    return results


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus):
    from tests.support.hf_models import write_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_export")
    hf_tokenizer = str(root / "hf-tokenizer")
    write_hf_tokenizer(hf_tokenizer)
    tokenizers = {
        "dense-sequential": (corpus["tokenizer"], "SentencePieceTokenizer"),
        "btx-sequential": (corpus["tokenizer"], "SentencePieceTokenizer"),
        "dense-sequential-qkv-bias": (hf_tokenizer, "HuggingFaceTokenizer"),
    }
    (results,) = run_distributed(_export_everything, 1, args=(str(root), tokenizers))
    return root, results


@pytest.mark.parametrize("name", list(CASES))
def test_each_variant_and_block_exports_to_the_class_that_computes_it(exported, name):
    root, results = exported
    result, expected = results[name], CASES[name][1]
    assert result["class"] == expected, (name, result["class"], result["text"])
    assert result["problems"] == {}, (name, result["problems"])
    assert result["error"] < RTOL, (name, result["error"])
    assert result["cached"] == result["uncached"] and len(result["cached"]) == 8, (name, result)
    manifest = json.load(open(root / f"{name}-hf" / "bam_export.json"))
    if expected == "BamForCausalLM":  # remote code, and --format auto says why
        assert "exported with --format bam (trust_remote_code) because" in result["text"], result["text"]
        assert manifest["format"] == "bam" and (root / f"{name}-hf" / "modeling_bam.py").is_file()
    else:
        assert "trust_remote_code" not in result["text"] and not (root / f"{name}-hf" / "modeling_bam.py").exists()
        config = json.load(open(root / f"{name}-hf" / "config.json"))
        assert config["architectures"] == [expected] and "auto_map" not in config
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(root / f"{name}-hf"))


def test_the_reasons_name_the_setting(exported):
    _, results = exported
    reasons = {
        "dense-parallel": "normalization=RMSNorm: CohereForCausalLM needs LayerNorm",
        "dense-sequential-layernorm": "normalization=LayerNorm: LlamaForCausalLM's norms are RMSNorm",
        "btx-sequential-scaled": "moe_router_topk_scaling_factor=1.5",
        "btx-parallel": "block_type=parallel with variant=btx",
        "bam-parallel": "variant=bam: no transformers class computes a soft mixture of attention experts",
        "bam-shared-kv-sequential": "variant=bam-shared-kv",
    }
    for name, reason in reasons.items():
        assert reason in results[name]["text"], (name, results[name]["text"])


def test_the_moe_configs_compute_our_routing(exported):
    root, _ = exported
    qwen = json.load(open(root / "btx-sequential-hf" / "config.json"))
    assert (qwen["norm_topk_prob"], qwen["shared_expert_intermediate_size"], qwen["qkv_bias"]) == (False, 0, False)
    assert (qwen["decoder_sparse_step"], qwen["mlp_only_layers"], qwen["num_experts_per_tok"]) == (1, [], 2)
    mixtral = json.load(open(root / "btx-sequential-renormalised-hf" / "config.json"))
    assert (mixtral["num_local_experts"], mixtral["sliding_window"]) == (3, None)
    assert json.load(open(root / "btx-sequential-top1-qkv-bias-hf" / "config.json"))["qkv_bias"] is True
    llama = json.load(open(root / "dense-sequential-hf" / "config.json"))
    assert llama["rope_parameters"]["rope_type"] == "llama3" and llama["rope_parameters"]["factor"] == 8.0
    assert json.load(open(root / "dense-sequential-qk-norm-hf" / "config.json"))["head_dim"] == 24
    assert json.load(open(root / "dense-sequential-qkv-bias-hf" / "config.json"))["attention_bias"] is True


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_export_import_export_is_byte_identical(exported, name):
    root, results = exported
    assert results[name]["import"][0] == 0 and results[name]["export"][0] == 0, results[name]
    first, again = directory_files(root / f"{name}-hf"), directory_files(root / f"{name}-again")
    assert sorted(first) == sorted(again), (sorted(first), sorted(again))
    for file in first:
        assert first[file] == again[file], (name, file)


def test_sharded_export_loads_and_imports(exported):
    root, results = exported
    sharded = results["sharded"]
    assert sharded["export"][0] == 0 and sharded["import"][0] == 0, sharded
    shards = sorted(n for n in os.listdir(root / "sharded") if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    index = json.load(open(root / "sharded" / "model.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == shards
    per_shard = {s: [n for n, f in index["weight_map"].items() if f == s] for s in shards}
    for shard, names in per_shard.items():  # at most 30 KB of data, or one larger tensor alone
        data = os.path.getsize(root / "sharded" / shard) - 8 - len(json.dumps({n: 0 for n in names}))
        assert len(names) == 1 or data <= 30_000, (shard, names)
    assert sharded["problems"] == {}
    assert torch.equal(sharded["logits"], sharded["unsharded"])
    assert torch.equal(sharded["seed_logits"], sharded["logits_of_ours"])


def test_autotokenizer_loads_the_shipped_tokenizers(exported, corpus):
    import sentencepiece
    from transformers import AutoTokenizer

    from tests.support.hf_models import write_hf_tokenizer

    root, _ = exported
    # SentencePiece: tokenizer.model, plus a tokenizer.json that encodes as SentencePiece does
    directory = root / "dense-sequential-hf"
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(directory))
    sp = sentencepiece.SentencePieceProcessor(model_file=corpus["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    texts = ["def return import class", "  court   statute\tpursuant\n\nclause ", "café ﬁ ½ 漢字 ☃", "", "x1 = 2.5"]
    for text in texts:
        ids = sp.encode(text)
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == sp.decode(ids), text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3, 0)
    config = json.load(open(directory / "generation_config.json"))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    # Hugging Face: the recorded directory's files, as they were
    directory = root / "dense-sequential-qkv-bias-hf"
    source = root / "hf-tokenizer-again"
    write_hf_tokenizer(str(source))
    theirs, ours = AutoTokenizer.from_pretrained(str(directory)), AutoTokenizer.from_pretrained(str(source))
    assert theirs("w1 w7 w30 w2")["input_ids"] == ours("w1 w7 w30 w2")["input_ids"] != []
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).read_bytes() == (root / "hf-tokenizer" / name).read_bytes()


def _refusals(root: str, checkpoints: dict[str, str]) -> list[tuple[int, str, bool]]:
    """Rank body: exports forced to a class that cannot compute the model; (code, output, output exists)."""
    cases = [
        ("btx-sequential", "mixtral"),
        ("btx-sequential", "llama"),
        ("dense-sequential", "qwen2_moe"),
        ("dense-sequential-qkv-bias", "mistral"),
        ("dense-sequential", "qwen3"),
        ("bam-sequential", "qwen2_moe"),
        ("dense-parallel", "cohere"),
        ("btx-parallel", "mixtral"),
        ("dense-parallel-layernorm", "llama"),
        ("dense-sequential-qkv-bias", "qwen2"),  # its (word-level) tokenizer is no Qwen tokenizer
    ]
    out = os.path.join(root, "refused")
    results = []
    for name, fmt in cases:
        code, text = convert("export", "--load", checkpoints[name], "--save", out, "--format", fmt)
        results.append((code, text, os.path.exists(out) or any(n.startswith("refused.tmp") for n in os.listdir(root))))
    return results


def test_forcing_a_class_that_cannot_compute_the_model_is_one_line(exported, tmp_path):
    root, _ = exported
    checkpoints = {name: str(root / name) for name in CASES}
    (results,) = run_distributed(_refusals, 1, args=(str(tmp_path), checkpoints))
    expected = [
        "--format mixtral: moe_router_pre_softmax=True: MixtralForCausalLM renormalises",
        "--format llama: variant=btx: LlamaForCausalLM has no experts",
        "--format qwen2_moe: variant=dense: Qwen2MoeForCausalLM is a mixture of experts",
        "--format mistral: add_qkv_bias=True: MistralForCausalLM has no q/k/v biases",
        "--format qwen3: qk_layernorm=False: Qwen3ForCausalLM always normalises q and k",
        "--format qwen2_moe: variant=bam: Qwen2MoeForCausalLM has one attention per layer",
        "--format cohere: normalization=RMSNorm",
        "--format mixtral: block_type=parallel",
        "--format llama: block_type=parallel",
        "--format qwen2: AutoTokenizer.from_pretrained would load the tokenizer as Qwen2Tokenizer",
    ]
    for (code, text, left), message in zip(results, expected):
        assert code == 2 and message in text, (message, text)
        assert len(text.strip().splitlines()) == 1 and not left, text


def _reinitialised(checkpoint: str, out: str) -> tuple[int, str, bool]:
    """Rank body: an export whose Llama mapping misnames one tensor (a bug the check must catch)."""
    from bam_megatron.conversion.hf import formats

    target = formats.TARGETS["llama"]
    original = type(target).unit

    def misnamed(self, unit, params, a, config):
        tensors = original(self, unit, params, a, config)
        if unit == 1:
            tensors["model.layers.1.post_attn_norm.weight"] = tensors.pop(
                "model.layers.1.post_attention_layernorm.weight"
            )
        return tensors

    type(target).unit = misnamed
    try:
        code, text = convert("export", "--load", checkpoint, "--save", out)
    finally:
        type(target).unit = original
    return code, text, os.path.exists(out)


def test_a_weight_transformers_would_reinitialise_refuses_the_export(exported, tmp_path):
    root, _ = exported
    ((code, text, left),) = run_distributed(
        _reinitialised, 1, args=(str(root / "dense-sequential"), str(tmp_path / "o"))
    )
    assert code == 2 and "LlamaForCausalLM: tensor model.layers.1.post_attention_layernorm.weight is missing" in text
    assert len(text.strip().splitlines()) == 1 and not left and os.listdir(tmp_path) == [], text
