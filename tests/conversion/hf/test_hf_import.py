"""bam-convert-hf import of the Llama family (Llama, Mistral, Qwen2, Qwen3) against transformers itself.

Nothing is downloaded: tiny random models are built with transformers here and saved with
``save_pretrained``, with large weights (init std 0.3, norms and biases perturbed, so attention is
far from uniform and a wrong head order, RoPE or bias shows by tens of percent). Tolerance as in
tests/conversion/hf/test_hf.py: fp32 logits within 1e-5 x the largest |logit|.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.launch import launch
from tests.support import paths
from tests.support.hf import convert, relative_error
from tests.support.hf_models import LLAMA3_ROPE, SEQ, TOKENS, VOCAB, hf_directory, write_hf_tokenizer

ROOT = paths.REPO
SCRIPT = os.path.join(ROOT, "pretrain_bam.py")
RTOL = 1e-5  # max |Δlogit| / max |logit|
# name -> (transformers class names, config settings, import flags)
FAMILIES = {
    "llama-gqa": (
        "Llama",
        dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
        [],
    ),
    "llama-tied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True), []),
    # Llama 3.1's RoPE scaling. With head size 16 and base 500000, channel pairs 4-7 have wavelengths
    # above 2048 tokens (4: smoothed, 5-7: divided by 8), so the scaling changes the logits at 64 tokens.
    "llama3-rope": (
        "Llama",
        dict(num_key_value_heads=2, max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE),
        ["--seq-length", str(SEQ)],
    ),
    # a sliding window as long as the recorded sequence never bites: accepted
    "mistral": ("Mistral", dict(num_key_value_heads=2, max_position_embeddings=SEQ, sliding_window=SEQ), []),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True), []),
    # head_dim 24 != hidden / heads = 16
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, max_position_embeddings=SEQ, head_dim=24), []),
}


def our_logits(checkpoint: str, tokens: torch.Tensor, **changes) -> torch.Tensor:
    """Rank body: our model's logits [b, s, vocab] from ``checkpoint`` (its architecture with ``changes``)."""
    from bam_megatron.checkpoint import store
    from bam_megatron.conversion.hf import megatron_io

    path, meta = megatron_io.read_checkpoint(checkpoint)
    model, _ = megatron_io.build_one_rank_model(meta.architecture.replace(**changes), meta.seq_length)
    store.load_checkpoint(path, model, load_rng=False)
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def _import_and_compare(jobs: list[tuple[str, str, list[str]]]) -> dict:
    """Rank body: import each (source, seed, flags); our logits vs the source's saved ones; the meta."""
    from bam_megatron.checkpoint import store

    results = {}
    for source, seed, flags in jobs:
        code, text = convert("import", "--load", source, "--save", seed, *flags)
        assert code == 0, text
        theirs = torch.load(os.path.join(source, "logits.pt"))
        meta = store.read_meta(store.resolve_checkpoint(seed))
        results[seed] = {"error": relative_error(theirs, our_logits(seed, TOKENS)), "meta": meta, "text": text}
        print(f"{os.path.basename(seed)}: max |dlogit| / max |logit| = {results[seed]['error']:.2e}")
        if meta.architecture.rope_scaling_factor is not None:  # the same weights without the scaling
            results[seed]["unscaled"] = relative_error(theirs, our_logits(seed, TOKENS, rope_scaling_factor=None))
    return results


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    """name -> a transformers directory of that family (with its logits.pt)."""
    root = tmp_path_factory.mktemp("hf_families")
    made = {}
    for name, (family, settings, _) in FAMILIES.items():
        made[name] = str(root / name)
        logits = hf_directory(made[name], family, **settings)
        torch.save(logits, os.path.join(made[name], "logits.pt"))
    return made


def test_every_family_imports_with_transformers_logits(families, tmp_path):
    jobs = [(families[name], str(tmp_path / name), flags) for name, (_, _, flags) in FAMILIES.items()]
    (results,) = run_distributed(_import_and_compare, 1, args=(jobs,))
    by_name = {os.path.basename(seed): result for seed, result in results.items()}
    for name, result in by_name.items():
        assert result["error"] < RTOL, (name, result["error"])
    # Llama-3 scaling matters here: dropping it is off by far more than the tolerance
    print("llama3-rope without the scaling:", by_name["llama3-rope"]["unscaled"])
    assert by_name["llama3-rope"]["unscaled"] > 100 * RTOL, by_name["llama3-rope"]
    arch = {name: result["meta"].architecture for name, result in by_name.items()}
    assert all(a.block_type == "sequential" and a.normalization == "RMSNorm" for a in arch.values())
    assert (arch["llama-gqa"].num_query_groups, arch["llama-gqa"].norm_epsilon) == (2, 1e-5)
    assert arch["llama-gqa"].rotary_base == 20000.0 and arch["llama-gqa"].untie_embeddings_and_output_weights
    assert not arch["llama-tied"].untie_embeddings_and_output_weights and arch["llama-tied"].norm_epsilon == 1e-6
    assert (arch["llama3-rope"].rope_scaling_factor, arch["llama3-rope"].rotary_base) == (8.0, 500000.0)
    assert arch["qwen2"].add_qkv_bias and not arch["qwen2"].untie_embeddings_and_output_weights
    assert arch["qwen3"].qk_layernorm and arch["qwen3"].kv_channels == 24 and not arch["qwen3"].add_qkv_bias
    assert arch["mistral"].kv_channels is None
    # the meta: sequence length (--seq-length, else max_position_embeddings) and where it came from
    meta = by_name["llama3-rope"]["meta"]
    assert meta.seq_length == SEQ and by_name["qwen3"]["meta"].seq_length == SEQ
    imported = meta.lineage["imported"]
    assert (imported["model_type"], imported["architectures"]) == ("llama", "LlamaForCausalLM")
    assert imported["path"] == families["llama3-rope"] and imported["config"]["rope_parameters"] == LLAMA3_ROPE
    assert by_name["qwen3"]["meta"].lineage["imported"]["config"]["head_dim"] == 24
    assert meta.tokenizer_fingerprint is None and "no tokenizer" in by_name["qwen3"]["text"]
    assert os.path.isfile(tmp_path / "qwen2" / "import_manifest.json")


def _import_both(single: str, sharded: str, root: str) -> dict:
    """Rank body: import a single-file and a sharded copy of one model; every parameter of each."""
    from bam_megatron.conversion.hf import megatron_io

    weights = {}
    for name, source in (("single", single), ("sharded", sharded)):
        seed = os.path.join(root, f"seed-{name}")
        code, text = convert("import", "--load", source, "--save", seed)
        assert code == 0, text
        path, meta = megatron_io.read_checkpoint(seed)
        weights[name] = megatron_io.load_weights(path, meta)[0]
    return weights


def test_sharded_safetensors_give_the_same_checkpoint(tmp_path):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    settings = dict(num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False)
    hf_directory(single, "Qwen2", **settings)
    hf_directory(sharded, "Qwen2", save={"max_shard_size": "40KB"}, **settings)
    shards = [name for name in os.listdir(sharded) if name.endswith(".safetensors")]
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json")) and len(shards) > 3, shards
    (weights,) = run_distributed(_import_both, 1, args=(single, sharded, str(tmp_path)))
    assert sorted(weights["single"]) == sorted(weights["sharded"])
    for name, tensor in weights["single"].items():
        assert torch.equal(tensor, weights["sharded"][name]), name


def _write_config(path, **config) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_refused_configurations_are_one_line_and_leave_no_output(families, tmp_path):
    from safetensors.torch import load_file, save_file

    base = json.load(open(os.path.join(families["llama-gqa"], "config.json")))
    out = str(tmp_path / "out")

    def variant(name: str, **changes) -> str:
        bad = tmp_path / name
        shutil.copytree(families["llama-gqa"], bad)
        config = {k: v for k, v in {**base, **changes}.items() if v is not None}
        json.dump(config, open(bad / "config.json", "w"))
        return str(bad)

    llama3 = dict(LLAMA3_ROPE)
    cases = [
        # Mistral's sliding window, shorter than the recorded length (max_position_embeddings 131072)
        (
            variant("mistral-window", model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16),
            "sliding_window=16",
        ),
        # Qwen2 with its sliding window on from layer 1
        (
            variant(
                "qwen2-window",
                model_type="qwen2",
                architectures=["Qwen2ForCausalLM"],
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=1,
            ),
            "use_sliding_window=true",
        ),
        (variant("yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_type=yarn"),
        (variant("v4-linear", rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "type=linear"),
        (variant("low-freq", rope_parameters={**llama3, "low_freq_factor": 2.0}), "low_freq_factor=2.0"),
        (
            variant("original", rope_parameters={**llama3, "original_max_position_embeddings": 4096}),
            "original_max_position_embeddings=4096",
        ),
        (variant("attention-bias", attention_bias=True), "attention_bias=True"),
        (variant("mlp-bias", mlp_bias=True), "mlp_bias=True"),
        (variant("gelu", hidden_act="gelu"), "hidden_act=gelu"),
        (variant("partial", partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (variant("classifier", architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
        (variant("quantized", quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (_write_config(tmp_path / "gemma", model_type="gemma", architectures=["GemmaForCausalLM"]), "is not read"),
        (
            _write_config(tmp_path / "gemma3", model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
            "model_type gemma3_text",
        ),
        (
            _write_config(tmp_path / "olmo3", model_type="olmo3", architectures=["Olmo3ForCausalLM"]),
            "its sliding-window layers",
        ),
        (_write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type=gpt2"),
    ]
    # tensors: a quantized dtype, a missing one, a wrong shape
    tensors = load_file(os.path.join(families["llama-gqa"], "model.safetensors"))
    for name, change, message in (
        ("int8", "dtype", "tensor model.layers.1.mlp.down_proj.weight is I8"),
        ("missing", "pop", "tensor model.layers.1.mlp.down_proj.weight is missing"),
        ("shape", "shape", "tensor model.layers.1.mlp.down_proj.weight has shape (64, 127)"),
    ):
        bad = tmp_path / f"tensor-{name}"
        shutil.copytree(families["llama-gqa"], bad)
        changed = dict(tensors)
        down = changed.pop("model.layers.1.mlp.down_proj.weight")
        if change == "dtype":
            changed["model.layers.1.mlp.down_proj.weight"] = down.to(torch.int8)
        elif change == "shape":
            changed["model.layers.1.mlp.down_proj.weight"] = down[:, :127].contiguous()
        save_file(changed, str(bad / "model.safetensors"))
        cases.append((str(bad), message))
    for source, message in cases:
        code, text = convert("import", "--load", source, "--save", out)
        assert code == 2 and message in text, (source, text)
        assert len(text.strip().splitlines()) == 1, text
        assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith("out.tmp")]
    gemma = convert("import", "--load", str(tmp_path / "gemma"), "--save", out)[1]
    assert "model_type=gemma (architectures=['GemmaForCausalLM'])" in gemma and "Gemma (1) is not read" in gemma


def _import_tied_mismatch(source: str, out: str) -> tuple[int, str]:
    return convert("import", "--load", source, "--save", out)


def test_a_tied_lm_head_that_differs_is_refused_while_writing(families, tmp_path):
    """Found only while the checkpoint is being written: still one line, exit 2, nothing at --save."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "tied"
    shutil.copytree(families["llama-tied"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(bad / "model.safetensors"))
    out = str(tmp_path / "out")
    ((code, text),) = run_distributed(_import_tied_mismatch, 1, args=(str(bad), out))
    assert code == 2 and "lm_head.weight differs from model.embed_tokens.weight" in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith("out.tmp")]


def test_defaults_are_transformers_defaults():
    """A config.json that leaves fields out is read with transformers' values for them."""
    import transformers

    from bam_megatron.checkpoint import layerwise
    from bam_megatron.conversion.hf import families, importer

    assert importer.TOP == layerwise.TOP
    sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=32, vocab_size=1000)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "olmo2"):
        cls = families.IMPORTERS[model_type]
        family = cls.architecture_class[: -len("ForCausalLM")]
        theirs = getattr(transformers, f"{family}Config")(**sizes)
        ours = cls({"model_type": model_type, **sizes}, seq_length=16)
        a = ours.architecture
        head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
        assert ours.head_dim == head_dim and ours.kv_heads == theirs.num_key_value_heads, model_type
        assert (a.norm_epsilon, a.rotary_base) == (theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"])
        assert a.untie_embeddings_and_output_weights != theirs.tie_word_embeddings, model_type
        assert ours.default_seq_length() == theirs.max_position_embeddings, model_type
        if model_type == "mistral":
            assert ours.get("sliding_window") == theirs.sliding_window
        elif model_type not in ("llama", "olmo2"):
            assert not ours.get("use_sliding_window") and ours.get("max_window_layers") == theirs.max_window_layers
            assert set(theirs.layer_types) == {"full_attention"}


def _import(source: str, seed: str) -> tuple[int, str]:
    return convert("import", "--load", source, "--save", seed)


def test_the_imported_seed_trains_with_its_tokenizer(families, tmp_path):
    from bam_megatron.checkpoint import store
    from bam_megatron.data.tokenizer import load_tokenizer

    with_tokenizer = tmp_path / "llama"
    shutil.copytree(families["llama-gqa"], with_tokenizer)
    write_hf_tokenizer(str(with_tokenizer))
    seeds = {name: str(tmp_path / f"seed-{name}") for name in ("qwen3", "llama")}
    assert run_distributed(_import, 1, args=(families["qwen3"], seeds["qwen3"]))[0][0] == 0
    assert run_distributed(_import, 1, args=(str(with_tokenizer), seeds["llama"]))[0][0] == 0
    meta = store.read_meta(store.resolve_checkpoint(seeds["llama"]))
    copy = os.path.join(seeds["llama"], "tokenizer")
    assert meta.tokenizer_type == "HuggingFaceTokenizer" and meta.tokenizer_model == copy
    assert (
        meta.tokenizer_fingerprint
        == load_tokenizer(copy).fingerprint
        == load_tokenizer(str(with_tokenizer)).fingerprint
    )
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(copy))

    # pretrain_bam.py takes the architecture from the seed: no architecture flags
    common = [
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
        "--mock-data",
    ]
    runs = {
        "qwen3": [*common, "--vocab-size", str(VOCAB), "--pretrained-checkpoint", seeds["qwen3"]],
        "llama": [
            *common,
            "--seq-length",
            "32",  # (the seed records max_position_embeddings, 2048)
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            copy,
            "--pretrained-checkpoint",
            seeds["llama"],
        ],
    }
    for name, argv in runs.items():
        save = str(tmp_path / f"trained-{name}")
        ranks = launch(SCRIPT, [*argv, "--save", save], 1, str(tmp_path / f"logs-{name}"))
        assert ranks.wait(240) == [0], ranks.output(0)
        trained = store.read_meta(store.resolve_checkpoint(save))
        assert trained.iteration == 1 and trained.lineage["imported"]["model_type"] == name
        assert trained.architecture == store.read_meta(store.resolve_checkpoint(seeds[name])).architecture


def test_memory_stays_flat_in_depth(tmp_path):
    """A Llama-shaped import at 1 and 3 layers, each in a fresh process: peak RSS (imports included).

    Shape: hidden 2048, intermediate 5504, 16 heads, vocabulary 16000, untied, bf16 shards (one fp32
    layer is 202 MB, embeddings + output layer 262 MB). Streaming holds two units at most, so the
    peak may grow from 1 to 3 layers by at most a layer's worth of overlap; a whole-model import
    would grow by two fp32 layers (404 MB) plus their sources. The Llama-2-7B shape itself is
    bench/hf_import_memory.py (2.2 GB at 1 and at 3 layers).
    """
    sys.path.insert(0, ROOT)
    from bench.hf_import_memory import depth_runs, unit_mb

    shape = dict(hidden=2048, ffn=5504, heads=16, kv_heads=16, vocab=16000)
    layer_mb = unit_mb(shape)["layer_mb"]
    one, three = depth_runs(str(tmp_path), shape, [1, 3])
    print(f"peak RSS {one['peak_rss_mb']} MB at 1 layer, {three['peak_rss_mb']} MB at 3 (layer {layer_mb} MB)")
    assert three["output_mb"] - one["output_mb"] > 1.9 * layer_mb, (one, three)  # the layers are really there
    assert three["peak_rss_mb"] < 1200 and one["peak_rss_mb"] < 1200, (one, three)
    assert three["peak_rss_mb"] - one["peak_rss_mb"] < layer_mb, (one, three, layer_mb)
