"""bam-convert-hf against transformers itself: Cohere export/import and the remote-code BAM export.

Sources are real pretrain_bam runs (one at TP=2 with sequence parallelism) with large random
weights (--init-method-std 0.3: attention far from uniform, so a wrong RoPE or head order shows).
Tolerance: fp32 logits agree within 1e-5 x the largest |logit| (the same math in another summation
order; logits here reach about 10, so about 1e-4 absolute, some 100 float32 ulps; a wrong RoPE
permutation or head order is off by tens of percent). Round trips are compared byte for byte.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support import paths
from tests.support.hf import convert, relative_error

ROOT = paths.REPO
RTOL = 1e-5  # max |Δlogit| / max |logit|
SEQ = 32
TOKENS = torch.randint(4, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))


def common(corpus, save: str, *extra: str) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--seq-length",
        str(SEQ),
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--lr",
        "1e-2",
        "--init-method-std",
        "0.3",
        "--eval-iters",
        "1",
        "--eval-interval",
        "1000",
        "--tokenizer-model",
        corpus["tokenizer"],
        "--data-path",
        corpus["code"],
        "--save",
        save,
        *extra,
    ]


def _pretrain(argvs: list[list[str]]) -> list[int]:
    from bam_megatron.cli.pretrain import main

    return [main(argv) for argv in argvs]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus):
    """Checkpoints: a LayerNorm dense model saved at TP=2 + SP; bam, bam-shared-kv, btx, RMSNorm dense at TP=1."""
    root = tmp_path_factory.mktemp("hf_sources")
    made = {name: str(root / name) for name in ("dense", "bam", "bam-shared-kv", "btx", "dense-rms")}
    dense = common(
        corpus,
        made["dense"],
        "--variant",
        "dense",
        "--normalization",
        "LayerNorm",
        "--rotary-base",
        "20000",
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
    )
    assert run_distributed(_pretrain, 2, args=([dense],)) == [[0], [0]]
    others = [
        common(corpus, made["bam"], "--variant", "bam", "--num-experts", "2", "--moe-router-topk", "2"),
        common(
            corpus,
            made["bam-shared-kv"],
            "--variant",
            "bam-shared-kv",
            "--num-experts",
            "2",
            "--attention-router-topk",
            "1",
        ),
        common(corpus, made["btx"], "--variant", "btx", "--num-experts", "2"),
        common(corpus, made["dense-rms"], "--variant", "dense"),
    ]
    assert run_distributed(_pretrain, 1, args=(others,)) == [[0, 0, 0, 0]]
    return made


def our_logits(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    """Rank body: logits [b, s, vocab] of our model (megatron-core, one rank) from ``checkpoint``."""
    from bam_megatron.checkpoint import store
    from bam_megatron.conversion.hf import megatron_io

    path, meta = megatron_io.read_checkpoint(checkpoint)
    model, _ = megatron_io.build_one_rank_model(meta.architecture, meta.seq_length)
    store.load_checkpoint(path, model, load_rng=False)
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def our_greedy(checkpoint: str, prompt: torch.Tensor, steps: int) -> list[int]:
    """Rank body: greedy continuation by our model, re-running the whole sequence each step."""
    seq = prompt.clone()
    for _ in range(steps):
        seq = torch.cat([seq, our_logits(checkpoint, seq)[:, -1:].argmax(-1)], dim=1)
    return seq[0, prompt.shape[1] :].tolist()


def hf_model(directory: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _export_and_compare(jobs: list[tuple[str, str, str]]) -> dict:
    """Rank body: export each (checkpoint, output, format) and compare transformers' logits with ours."""
    results = {}
    for checkpoint, output, fmt in jobs:
        code, text = convert("export", "--load", checkpoint, "--save", output, "--format", fmt)
        assert code == 0, text
        model = hf_model(output)
        with torch.no_grad():
            theirs = model(TOKENS).logits
        results[output] = {
            "class": type(model).__name__,
            "text": text,
            "error": relative_error(theirs, our_logits(checkpoint, TOKENS)),
        }
    return results


def test_cohere_export_of_a_tp2_checkpoint_matches_transformers(sources, tmp_path, corpus):
    out = str(tmp_path / "cohere")
    (results,) = run_distributed(_export_and_compare, 1, args=([(sources["dense"], out, "auto")],))
    assert results[out]["class"] == "CohereForCausalLM", results
    assert results[out]["error"] < RTOL, results
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["logit_scale"] == 1.0 and config["rope_parameters"]["rope_theta"] == 20000.0
    assert not config["tie_word_embeddings"] and (config["bos_token_id"], config["eos_token_id"]) == (2, 3)
    with open(os.path.join(out, "tokenizer.model"), "rb") as a, open(corpus["tokenizer"], "rb") as b:
        assert a.read() == b.read()


def _round_trip(dense: str, root: str) -> list[int]:
    a, seed, b, half = (os.path.join(root, n) for n in ("a", "seed", "b", "bf16"))
    return [
        convert("export", "--load", dense, "--save", a)[0],
        convert("import", "--load", a, "--save", seed)[0],
        convert("export", "--load", seed, "--save", b)[0],
        convert("export", "--load", seed, "--save", half, "--dtype", "bfloat16")[0],
    ]


def test_export_import_export_is_byte_identical(sources, tmp_path, corpus):
    from safetensors.torch import load_file

    assert run_distributed(_round_trip, 1, args=(sources["dense"], str(tmp_path))) == [[0, 0, 0, 0]]
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        with open(tmp_path / "a" / name, "rb") as a, open(tmp_path / "b" / name, "rb") as b:
            assert a.read() == b.read(), name
    full, half = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "bf16" / "model.safetensors")),
    )
    assert sorted(full) == sorted(half) and all(torch.equal(full[n].bfloat16(), half[n]) for n in full)
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    from bam_megatron.checkpoint import store
    from bam_megatron.data.tokenizer import load_tokenizer

    meta = store.read_meta(store.resolve_checkpoint(str(tmp_path / "seed")))
    assert meta.tokenizer_fingerprint == load_tokenizer(corpus["tokenizer"]).fingerprint
    assert meta.architecture.normalization == "LayerNorm" and meta.architecture.padded_vocab_size == 512


def cohere_directory(path: str, tokenizer: str) -> torch.Tensor:
    """A random CohereForCausalLM as transformers saves it (tied, GQA, logit_scale 1/16); its logits of TOKENS."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        logit_scale=0.0625,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = CohereForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
        model.save_pretrained(path)
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
        return model(TOKENS).logits


def _import_then_train(src: str, seed: str, out: str, train: list[str]) -> dict:
    code, text = convert("import", "--load", src, "--save", seed)
    assert code == 0, text
    result = {"error": relative_error(our_logits(seed, TOKENS), torch.load(os.path.join(src, "logits.pt")))}
    result["export"] = convert("export", "--load", seed, "--save", out)
    result["train"] = _pretrain([train])
    return result


def test_transformers_cohere_model_imports_as_a_seed_that_trains_and_branches(tmp_path, corpus):
    from safetensors.torch import load_file

    src, seed, out = (str(tmp_path / n) for n in ("cohere", "seed", "out"))
    torch.save(cohere_directory(src, corpus["tokenizer"]), os.path.join(src, "logits.pt"))
    train = [
        "--variant",
        "dense",
        "--normalization",
        "LayerNorm",
        "--rotary-base",
        "20000",
        "--no-untie-embeddings-and-output-weights",
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--ffn-hidden-size",
        "96",
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "2",
        "--seq-length",
        str(SEQ),
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--eval-iters",
        "1",
        "--tokenizer-model",
        corpus["tokenizer"],
        "--data-path",
        corpus["code"],
        "--pretrained-checkpoint",
        seed,
        "--save",
        str(tmp_path / "trained"),
    ]
    (result,) = run_distributed(_import_then_train, 1, args=(src, seed, out, train))
    assert result["error"] < RTOL, result
    assert result["export"][0] == 0 and result["train"] == [0], result
    # back to Cohere: the same tensors, logit_scale folded into the final norm (exact: a power of two)
    before, after = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        expected = before[name] * 0.0625 if name == "model.norm.weight" else before[name]
        assert torch.equal(after[name], expected), name
    # tools/branch.py takes the imported seed
    from bam_megatron.cli.branch import main as branch

    assert (
        branch(
            [
                "--seed-checkpoint",
                seed,
                "--output-dir",
                str(tmp_path / "experts"),
                "--experts",
                "law",
                "--domain-data",
                f"law={corpus['law']}",
                "--general-data",
                corpus["code"],
            ]
        )
        == 0
    )
    # phase 2 takes the architecture from the linked seed, which is the imported one; no flags repeat it
    from bam_megatron.checkpoint import store
    from bam_megatron.training.arguments import given_architecture, parse_args

    phase2 = parse_args([f"@{tmp_path / 'experts' / 'law' / 'phase2.args'}", "--train-iters", "1"])
    assert set(given_architecture(phase2).values()) == {None}
    init = store.read_meta(store.resolve_checkpoint(phase2.pretrained_checkpoint)).architecture
    assert (init.normalization, init.rotary_base, init.untie_embeddings_and_output_weights) == (
        "LayerNorm",
        20000.0,
        False,
    )


def _remote_code_checks(jobs: list[tuple[str, str, str]]) -> dict:
    """Rank body: exported logits as above, plus cached generation = uncached = our greedy decoding."""
    results = _export_and_compare(jobs)
    prompt = TOKENS[:1, :5]
    for checkpoint, output, _ in jobs:
        model = hf_model(output)
        with torch.no_grad():
            cached = model.generate(prompt, do_sample=False, max_new_tokens=8, eos_token_id=None)
            uncached = model.generate(prompt, do_sample=False, max_new_tokens=8, eos_token_id=None, use_cache=False)
            # step by step through the cache = one full forward
            full = model(TOKENS[:, :12]).logits
            step = model(TOKENS[:, :6], use_cache=True)
            logits, past = [step.logits], step.past_key_values
            for t in range(6, 12):
                step = model(TOKENS[:, t : t + 1], past_key_values=past, use_cache=True)
                logits.append(step.logits)
                past = step.past_key_values
            # a left-padded batch generates what each prompt generates alone
            short = TOKENS[1:, :3]
            batch = torch.cat([prompt, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
            mask = torch.ones_like(batch)
            mask[1, :2] = 0
            padded = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=4, eos_token_id=None)
            alone = model.generate(short, do_sample=False, max_new_tokens=4, eos_token_id=None)
        results[output].update(
            cached=cached[0, 5:].tolist(),
            uncached=uncached[0, 5:].tolist(),
            ours=our_greedy(checkpoint, prompt, 8),
            cache_error=relative_error(torch.cat(logits, 1), full),
            padded=padded[1, 5:].tolist(),
            alone=alone[0, 3:].tolist(),
        )
    return results


def test_remote_code_export_of_every_variant_matches_and_generates(sources, tmp_path):
    jobs = [(sources[v], str(tmp_path / v), "auto") for v in ("bam", "bam-shared-kv", "btx", "dense-rms")]
    jobs.append((sources["dense"], str(tmp_path / "dense-layernorm"), "bam"))
    (results,) = run_distributed(_remote_code_checks, 1, args=(jobs,))
    for (_, out, _), result in zip(jobs, results.values()):
        name = os.path.basename(out)
        assert result["class"] == "BamForCausalLM", (name, result)
        assert result["error"] < RTOL and result["cache_error"] < RTOL, (name, result)
        assert result["cached"] == result["uncached"] == result["ours"] and len(result["ours"]) == 8, (name, result)
        assert result["padded"] == result["alone"], (name, result)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_bam.BamForCausalLM"
        assert os.path.isfile(os.path.join(out, "modeling_bam.py")) and os.path.isfile(
            os.path.join(out, "tokenizer.model")
        )
    assert "because variant=bam" in results[str(tmp_path / "bam")]["text"]
    assert "because normalization=RMSNorm" in results[str(tmp_path / "dense-rms")]["text"]
    shared = json.load(open(tmp_path / "bam-shared-kv" / "config.json"))
    assert (shared["attention_kv_mode"], shared["attention_router_topk"]) == ("shared", 1)
    # the example script generates from the export, text in and out through the copied tokenizer
    spec = importlib.util.spec_from_file_location("hf_generate", os.path.join(ROOT, "examples", "hf_generate.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert example.main([str(tmp_path / "bam"), "--prompt", "def return", "--max-new-tokens", "4"]) == 0
    assert "BamForCausalLM: " in out.getvalue() and "'def return" in out.getvalue(), out.getvalue()


def test_bad_input_is_refused_in_one_line_without_output(sources, tmp_path, corpus):
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "out")
    cases = [
        (("export", "--load", str(tmp_path / "nothing"), "--save", out), "checkpoint not found"),
        (("export", "--load", sources["bam"], "--save", out, "--format", "cohere"), "variant=bam: CohereForCausalLM"),
        (("export", "--load", sources["dense-rms"], "--save", out, "--format", "cohere"), "normalization=RMSNorm"),
        (
            ("export", "--load", sources["dense"], "--save", out, "--tokenizer-model", corpus["other_tokenizer"]),
            "is not the tokenizer the checkpoint was trained with",
        ),
        (("export", "--load", sources["dense"], "--save", sources["bam"]), "already exists"),
        (("import", "--load", str(tmp_path), "--save", out), "no config.json"),
    ]
    src = tmp_path / "cohere"
    cohere_directory(str(src), corpus["tokenizer"])
    config = json.load(open(src / "config.json"))
    for key, value, message in (
        ("model_type", "llama", "model_type=llama"),
        ("use_qk_norm", True, "use_qk_norm=True"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1.0}, "rope_type=yarn"),
    ):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(src, bad)
        json.dump(dict(config, **{key: value}), open(bad / "config.json", "w"))
        cases.append((("import", "--load", str(bad), "--save", out), message))
    tensors = load_file(str(src / "model.safetensors"))
    for name, change, message in (
        ("missing", "pop", "tensor model.layers.1.mlp.down_proj.weight is missing"),
        ("shape", "shape", "tensor model.layers.1.mlp.down_proj.weight has shape (64, 95)"),
        ("extra", "extra", "tensor model.layers.2.mlp.down_proj.weight is not part"),
    ):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(src, bad)
        changed = dict(tensors)
        down = changed.pop("model.layers.1.mlp.down_proj.weight")
        if change == "shape":
            changed["model.layers.1.mlp.down_proj.weight"] = down[:, :95].contiguous()
        elif change == "extra":
            changed["model.layers.1.mlp.down_proj.weight"] = down
            changed["model.layers.2.mlp.down_proj.weight"] = down.clone()
        save_file(changed, str(bad / "model.safetensors"))
        cases.append((("import", "--load", str(bad), "--save", out), message))
    for argv, message in cases:
        code, text = convert(*argv)
        assert code == 2 and message in text, (argv, text)
        assert len(text.strip().splitlines()) == 1, text
        assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith("out.tmp")]


def _failing_writes(checkpoint: str, cohere_dir: str, root: str) -> list[str]:
    """Rank body: a write that fails midway, in export and in import, leaves nothing at --save."""
    from bam_megatron.conversion.hf import bam_format, megatron_io

    def broken(*args, **kwargs):
        raise OSError("disk full")

    real_save = megatron_io.save_weights

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)  # the checkpoint is complete inside the temporary directory...
        raise OSError("disk full")  # ...and then the import fails

    bam_format.copy_model_code, megatron_io.save_weights = broken, save_then_fail
    errors = []
    for argv in (
        ("export", "--load", checkpoint, "--save", os.path.join(root, "hf"), "--format", "bam"),
        ("import", "--load", cohere_dir, "--save", os.path.join(root, "seed")),
    ):
        with pytest.raises(OSError) as error:
            convert(*argv)
        errors.append(str(error.value))
    return errors


def test_a_failed_write_leaves_no_partial_output(sources, tmp_path, corpus):
    cohere_directory(str(tmp_path / "cohere"), corpus["tokenizer"])
    root = tmp_path / "outputs"
    root.mkdir()
    assert run_distributed(_failing_writes, 1, args=(sources["bam"], str(tmp_path / "cohere"), str(root))) == [
        ["disk full", "disk full"]
    ]
    assert os.listdir(root) == []
