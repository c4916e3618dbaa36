"""bam-generate: KV-cached decoding through megatron-core's StaticInferenceContext, every variant.

Models are tiny (2 layers, d=64, 2 experts) with large random weights (std 0.3: attention far
from uniform, so a wrong cache position or RoPE row shows), saved as checkpoints with the test
tokenizer: dense and bam at TP=1, btx and bam-shared-kv at TP=2, each loaded at TP=1 and TP=2.
Tolerance for logits: fp32, max |Δlogit| <= 1e-5 x max |logit| (the same math in another
summation order: the cache's keys vs a causal kernel over the whole sequence; logits here reach
about 10, so about 1e-4 absolute; a wrong position is off by whole units).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed

RTOL = 1e-5  # max |Δlogit| / max |logit|
VARIANTS = ("dense", "btx", "bam", "bam-shared-kv")
SAVED_AT_TP2 = ("btx", "bam-shared-kv")
EXPERTS = 2
NEW = 8
GEN = torch.Generator().manual_seed(0)
SAME_LENGTH = torch.randint(4, 320, (2, 7), generator=GEN).tolist()  # a batch of two 7-token prompts
MIXED = [torch.randint(4, 320, (5,), generator=GEN).tolist(), torch.randint(4, 320, (9,), generator=GEN).tolist()]


def _architecture(variant: str):
    from bam_megatron.model.architecture import Architecture

    return Architecture(
        variant,
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        padded_vocab_size=384,
        num_experts=None if variant == "dense" else EXPERTS,
        moe_router_topk=2 if variant == "bam" else 1,
    )


def _save(variants: list[str], root: str, tokenizer: str, tensor: int) -> None:
    """Rank body: random models of ``variants`` saved under ``root`` at TP=``tensor``."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bam_megatron.checkpoint import CheckpointMeta, save_checkpoint
    from bam_megatron.data.tokenizer import load_tokenizer
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(tensor=tensor))
    fingerprint = load_tokenizer(tokenizer).fingerprint
    for i, variant in enumerate(variants):
        architecture = _architecture(variant)
        torch.manual_seed(i)
        model_parallel_cuda_manual_seed(i)
        config = architecture.model_config(
            tensor_model_parallel_size=tensor, use_cpu_initialization=True, init_method_std=0.3
        )
        model = build_from_architecture(architecture, config, 32)
        meta = CheckpointMeta(architecture, seq_length=32, tokenizer_fingerprint=fingerprint, tokenizer_model=tokenizer)
        save_checkpoint(os.path.join(root, variant), 1, model, None, None, meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus) -> dict[str, str]:
    """variant -> a --save directory (dense, bam saved at TP=1; btx, bam-shared-kv at TP=2)."""
    root = str(tmp_path_factory.mktemp("generate"))
    at_tp1 = [v for v in VARIANTS if v not in SAVED_AT_TP2]
    run_distributed(_save, 1, args=(at_tp1, root, corpus["tokenizer"], 1))
    run_distributed(_save, 2, args=(list(SAVED_AT_TP2), root, corpus["tokenizer"], 2))
    return {v: os.path.join(root, v) for v in VARIANTS}


def _decode_everything(checkpoints: dict[str, str], tensor: int, expert: int = 1) -> dict:
    """Rank body: per variant, cached and uncached tokens (greedy, sampled), the cached logits
    against a full forward at each step, and the KV cache's bytes."""
    from bam_megatron.checkpoint import load_model, resolve_checkpoint
    from bam_megatron.inference.generate import Decoder, Sampling, generate
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(tensor=tensor, expert=expert))
    out = {}
    for variant, path in checkpoints.items():
        model = load_model(resolve_checkpoint(path), tensor=tensor, expert=expert)
        cached = generate(model, SAME_LENGTH, NEW, keep_logits=True)
        uncached = generate(model, SAME_LENGTH, NEW, use_kv_cache=False)
        sequence = torch.cat([torch.tensor(SAME_LENGTH), torch.tensor(cached.tokens)], dim=1)
        with torch.no_grad():
            full = model(
                sequence, torch.arange(sequence.shape[1]).expand_as(sequence), None, runtime_gather_output=True
            )
        reference = full[:, len(SAME_LENGTH[0]) - 1 : -1]  # the logits that predict each new token
        steps = torch.stack(cached.logits, dim=1)
        sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=3)
        decoder = Decoder(model, SAME_LENGTH, NEW)  # as the benchmark steps it: decode, rewind, decode again
        while not decoder.finished:
            decoder.step()
        decoder.restart_decoding()
        while not decoder.finished:
            decoder.step()
        out[variant] = {
            "cached": cached.tokens,
            "uncached": uncached.tokens,
            "restarted": decoder.result.tokens,
            "mixed_cached": generate(model, MIXED, NEW).tokens,
            "mixed_uncached": generate(model, MIXED, NEW, use_kv_cache=False).tokens,
            "sampled_cached": generate(model, MIXED, NEW, sampling).tokens,
            "sampled_uncached": generate(model, MIXED, NEW, sampling, use_kv_cache=False).tokens,
            "logit_error": ((steps - reference).abs().max() / reference.abs().max()).item(),
            "logits": steps,
            "kv_cache_bytes": cached.kv_cache_bytes,
            "uncached_kv_cache_bytes": uncached.kv_cache_bytes,
        }
    return out


@pytest.fixture(scope="module")
def tp1(checkpoints) -> dict:
    (result,) = run_distributed(_decode_everything, 1, args=(checkpoints, 1))
    return result


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_gives_the_uncached_tokens_and_a_full_forward_s_logits(tp1, variant):
    r = tp1[variant]
    assert r["cached"] == r["uncached"] == r["restarted"] and all(len(row) == NEW for row in r["cached"]), r
    assert r["mixed_cached"] == r["mixed_uncached"], r  # prompts of 5 and 9 tokens in one batch
    assert r["sampled_cached"] == r["sampled_uncached"] and r["sampled_cached"] != r["mixed_cached"], r
    assert r["logit_error"] < RTOL, r["logit_error"]
    assert r["uncached_kv_cache_bytes"] == 0


def test_the_shared_kv_cache_is_one_nth_of_the_expert_kv_cache(tp1):
    layers, positions, batch, head_dim = 2, len(SAME_LENGTH[0]) + NEW, len(SAME_LENGTH), 64 // 4
    per_group = 2 * layers * positions * batch * head_dim * 4  # K and V, fp32
    groups = {"dense": 2, "btx": 2, "bam": EXPERTS * 2, "bam-shared-kv": 2}
    assert {v: tp1[v]["kv_cache_bytes"] for v in VARIANTS} == {v: g * per_group for v, g in groups.items()}
    assert tp1["bam"]["kv_cache_bytes"] == EXPERTS * tp1["bam-shared-kv"]["kv_cache_bytes"]


def test_tensor_parallel_decoding_gives_the_one_rank_tokens(checkpoints, tp1):
    ranks = run_distributed(_decode_everything, 2, args=(checkpoints, 2))
    for variant in VARIANTS:
        one, (first, second) = tp1[variant], (rank[variant] for rank in ranks)
        for key in ("cached", "uncached", "mixed_cached", "mixed_uncached", "sampled_cached", "sampled_uncached"):
            assert first[key] == second[key] == one[key], (variant, key, first[key], one[key])
        assert first["logit_error"] < RTOL, (variant, first["logit_error"])
        error = ((first["logits"] - one["logits"]).abs().max() / one["logits"].abs().max()).item()
        assert error < RTOL, (variant, error)
        assert first["kv_cache_bytes"] * 2 == one["kv_cache_bytes"], variant  # each rank caches half the groups


def test_expert_parallel_decoding_gives_the_one_rank_tokens(checkpoints, tp1):
    ranks = run_distributed(_decode_everything, 2, args=(checkpoints, 1, 2))
    for variant in VARIANTS:  # dense runs as two data-parallel replicas
        for rank in ranks:
            assert rank[variant]["cached"] == rank[variant]["uncached"] == tp1[variant]["cached"], variant
            assert rank[variant]["sampled_cached"] == tp1[variant]["sampled_cached"], variant
            assert rank[variant]["logit_error"] < RTOL, variant


def _cli(argvs: list[list[str]], tensor: int) -> list[tuple[int, str, str]]:
    """Rank body: bam-generate in this process; (exit code, stdout, stderr) per argv."""
    from bam_megatron.inference.cli import main
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(tensor=tensor))
    results = []
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results.append((code, out.getvalue(), err.getvalue()))
    return results


def test_the_command_generates_text_with_the_checkpoint_s_tokenizer(checkpoints, tp1, corpus):
    from bam_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(corpus["tokenizer"])
    prompt = "def return import"
    bam = checkpoints["bam"]
    argvs = [
        ["--load", bam, "--prompt", prompt, "--max-new-tokens", "6", "--json", "--ignore-eos"],
        ["--load", bam, "--prompt", prompt, "--max-new-tokens", "6", "--json", "--ignore-eos", "--no-kv-cache"],
        ["--load", bam, "--prompt-tokens", ",".join(map(str, MIXED[0])), "--max-new-tokens", str(NEW), "--json"],
        ["--load", bam, "--prompt", prompt, "--max-new-tokens", "4"],
    ]
    (one_rank,) = run_distributed(_cli, 1, args=(argvs, 1))
    two_ranks = run_distributed(_cli, 2, args=([a + ["--tensor-model-parallel-size", "2"] for a in argvs], 2))
    assert all(code == 0 for code, _, _ in one_rank + two_ranks[0] + two_ranks[1]), (one_rank, two_ranks)
    assert all(out == "" for _, out, _ in two_ranks[1]), "only rank 0 prints"
    records = [json.loads(out) for _, out, _ in one_rank[:3]]
    assert records[0]["tokens"] == records[1]["tokens"] and len(records[0]["tokens"][0]) == 6
    assert records[0]["prompt_tokens"] == [tokenizer.tokenize(prompt)]
    assert records[0]["text"] == [tokenizer.detokenize(records[0]["tokens"][0])]
    assert records[0]["kv_cache_bytes_per_rank"] > 0 and records[1]["kv_cache_bytes_per_rank"] == 0
    assert records[2]["tokens"][0] == tp1["bam"]["mixed_cached"][0]
    assert one_rank[3][1].startswith(repr(prompt) + " -> "), one_rank[3]
    tp2 = [json.loads(out) for _, out, _ in two_ranks[0][:3]]
    assert [r["tokens"] for r in tp2] == [r["tokens"] for r in records] and two_ranks[0][3][1] == one_rank[3][1]


def _bad_inputs(checkpoint: str, cases: list[list[str]]) -> list[tuple[int, str, str]]:
    return _cli([["--load", checkpoint, *case] for case in cases], 1)


def test_bad_input_is_refused_in_one_line(checkpoints, tmp_path):
    cases = {
        "token id 999 is outside the model's vocabulary [0, 384)": ["--prompt-tokens", "5,999"],
        "--top-p must be in (0, 1]": ["--prompt-tokens", "5", "--top-p", "0"],
        "--max-new-tokens must be >= 0": ["--prompt-tokens", "5", "--max-new-tokens", "-1"],
        "--pipeline-model-parallel-size": ["--prompt-tokens", "5", "--pipeline-model-parallel-size", "2"],
        "--sequence-parallel": ["--prompt-tokens", "5", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "is not the one checkpoint": ["--prompt", "x", "--tokenizer-model", str(_other_tokenizer(tmp_path))],
    }
    (results,) = run_distributed(_bad_inputs, 1, args=(checkpoints["dense"], list(cases.values())))
    for (wanted, _), (code, out, err) in zip(cases.items(), results):
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("bam-generate: error: "), err
        assert wanted in err, (wanted, err)


def _other_tokenizer(tmp_path) -> str:
    from tests.support.corpus import train_tokenizer

    return train_tokenizer(str(tmp_path), seed=2, vocab_size=300)


def _ours_and_hugging_face_s(checkpoint: str, output: str) -> tuple[list[int], list[int]]:
    """Rank body: our greedy tokens and those of the remote-code export's KV-cached generate."""
    from transformers import AutoModelForCausalLM

    from bam_megatron.checkpoint import load_model, resolve_checkpoint
    from bam_megatron.conversion.hf.cli import main as convert
    from bam_megatron.inference.generate import generate
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    with contextlib.redirect_stdout(io.StringIO()):
        assert convert(["export", "--load", checkpoint, "--save", output, "--format", "bam"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    prompt = torch.tensor(MIXED[1:])
    with torch.no_grad():
        theirs = hf.generate(prompt, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    initialize(ParallelSizes())
    ours = generate(load_model(resolve_checkpoint(checkpoint)), MIXED[1:], NEW)
    return ours.tokens[0], theirs[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("variant", ["bam", "bam-shared-kv"])
def test_greedy_tokens_equal_the_hugging_face_export_s(checkpoints, tmp_path, variant):
    ((ours, theirs),) = run_distributed(_ours_and_hugging_face_s, 1, args=(checkpoints[variant], str(tmp_path / "hf")))
    assert ours == theirs and len(ours) == NEW, (ours, theirs)
