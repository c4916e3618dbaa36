"""Serving the remote-code BAM export: transformers' attention interface, caches, torch.compile, left padding.

Tiny checkpoints of BAM (expert K/V) and BAM shared-KV, parallel and sequential block, and Qwen-style (each
attention expert's own q/k/v biases and q/k norms) on the sequential block (tests/support/hf.py:
large random weights, so a wrong head order, gate or mask shows by tens of percent), exported with
``bam-convert-hf export`` and loaded with ``trust_remote_code=True``. For each: the logits of every
attention implementation (``eager``, ``sdpa``, ``flex_attention``) equal the checkpoint's (megatron-core)
within fp32 tolerance; greedy tokens are identical across implementations, across no cache, DynamicCache
and StaticCache (``generate(cache_implementation="static")``), with the decode step compiled
(``torch.compile(fullgraph=True)``) and not, and for a left-padded batch against each prompt alone; the
soft mixture is one attention call of N·H query heads per layer, through the interface a serving stack
replaces.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bam_megatron.model.architecture import Architecture
from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import (
    RTOL,
    SIZES,
    TOKENS,
    VOCAB,
    architecture,
    convert,
    our_logits,
    relative_error,
    save_random_checkpoint,
)

# Qwen-style soft MoA: each expert's own q/k/v biases and per-head q/k norms (head size 24)
QWEN_SOFT_MOA = {
    "bam-sequential-qwen": dict(
        variant="bam", block_type="sequential", num_experts=2, add_qkv_bias=True, qk_layernorm=True, kv_channels=24
    ),
    "bam-shared-kv-sequential-qwen": dict(
        variant="bam-shared-kv", block_type="sequential", num_experts=2, add_qkv_bias=True, qk_layernorm=True
    ),
}
SERVED = ["bam-parallel", "bam-sequential", "bam-shared-kv-parallel", "bam-shared-kv-sequential", *QWEN_SOFT_MOA]
OLDER = ["bam-parallel", "bam-shared-kv-sequential"]  # also as exports before the per-expert fields
PROMPTS = [TOKENS[0, :5], TOKENS[1, :11], TOKENS[0, 7:15]]  # different lengths, left-padded into one batch
PAD = 0
NEW = 8  # greedy new tokens


def _older(directory: str, older: str) -> None:
    """``directory`` as exports wrote it before config.json gave the wide attention's head counts: each
    expert's counts in num_attention_heads / num_key_value_heads, no per-expert fields."""
    shutil.copytree(directory, older)
    config = json.load(open(os.path.join(older, "config.json")))
    config["num_attention_heads"] = config.pop("attention_heads_per_expert")
    config["num_key_value_heads"] = config.pop("key_value_heads_per_expert")
    json.dump(config, open(os.path.join(older, "config.json"), "w"), indent=2)


def _export(root: str) -> dict:
    """Rank body: each served case saved, exported (--format auto: remote code), and our logits on TOKENS
    and on each prompt alone; for OLDER, that export in the older config format imported and exported
    again."""
    out = {}
    for i, name in enumerate(SERVED):
        if name in QWEN_SOFT_MOA:
            a = Architecture(**SIZES, padded_vocab_size=VOCAB, **QWEN_SOFT_MOA[name])
        else:
            a = architecture(name)
        checkpoint = save_random_checkpoint(os.path.join(root, name), a, 10 + i)
        directory = os.path.join(root, f"{name}-hf")
        code, text = convert("export", "--load", checkpoint, "--save", directory)
        assert code == 0, (name, text)
        out[name] = {
            "dir": directory,
            "logits": our_logits(checkpoint, TOKENS),
            "prompt_logits": [our_logits(checkpoint, p[None]) for p in PROMPTS],
        }
        if name in OLDER:
            older, seed, again = (os.path.join(root, f"{name}-{x}") for x in ("older", "seed", "again"))
            _older(directory, older)
            out[name]["older"] = older
            out[name]["import"] = convert("import", "--load", older, "--save", seed)
            out[name]["export"] = convert("export", "--load", seed, "--save", again)
            out[name]["again"] = again
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny matrices, and a second OpenMP thread on a shared 2-core machine spins
    at every op's barrier (a 64-wide linear took 14 ms instead of 0.1 ms under load). And TorchDynamo on,
    as a server has it: an earlier test in this worker process may have run one of our tools in-process,
    whose CPU mode turns TorchDynamo off (bam_megatron/platform/cpu_mode.py)."""
    import torch._dynamo

    threads, dynamo_disabled = torch.get_num_threads(), torch._dynamo.config.disable
    torch.set_num_threads(1)
    torch._dynamo.config.disable = False
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.disable = dynamo_disabled


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    (out,) = run_distributed(_export, 1, args=(str(tmp_path_factory.mktemp("hf_serving")),))
    return out


def _load(directory: str, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, attn_implementation=attn
    )
    assert model.config._attn_implementation == attn
    return model.eval()


def _greedy(model, prompts: torch.Tensor, mask=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts) if mask is None else mask,
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            eos_token_id=None,
            pad_token_id=PAD,
            **kwargs,
        )
    return out[:, prompts.shape[1] :]


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in PROMPTS)
    ids = torch.full((len(PROMPTS), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    return ids, mask


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """flex_attention without transformers' inductor compile of its kernel (minutes on 2 CPU cores: one
    compile per shape); the kernel is then torch's reference implementation of the same function. The
    model's side (BlockMask from create_causal_mask, grouped K/V heads, scale) is what is tested."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as integration

    monkeypatch.setattr(integration.WrappedFlexAttention, "__call__", lambda self: flex_attention)


@pytest.mark.parametrize("name", SERVED)
def test_every_attention_implementation_computes_the_checkpoints_logits(exports, name, uncompiled_flex):
    ours = exports[name]["logits"]
    for attn in ("eager", "sdpa", "flex_attention"):
        model = _load(exports[name]["dir"], attn)
        with torch.no_grad():
            theirs = model(TOKENS).logits
        assert relative_error(theirs, ours) < RTOL, (name, attn, relative_error(theirs, ours))


@pytest.mark.parametrize("name", SERVED)
def test_greedy_tokens_are_identical_across_implementations_and_caches(exports, name, uncompiled_flex):
    from transformers import DynamicCache

    prompts = TOKENS[:, :9]
    reference = _greedy(_load(exports[name]["dir"], "eager"), prompts, use_cache=False)
    runs = {}
    for attn in ("eager", "sdpa"):
        model = _load(exports[name]["dir"], attn)
        runs[(attn, "dynamic")] = _greedy(model, prompts)
        runs[(attn, "static")] = _greedy(model, prompts, cache_implementation="static")
    runs[("sdpa", "none")] = _greedy(model, prompts, use_cache=False)
    # a static cache allocated before the first step (chunked prefill): sized by the wide K/V heads
    runs[("sdpa", "static, prefill in chunks")] = _greedy(
        model, prompts, cache_implementation="static", prefill_chunk_size=4
    )
    # flex: the dynamic cache (transformers 5.23's generate calls .contiguous() on flex's BlockMask with a
    # static one; its own Llama too); one shape a step, each a trace of flex's reference kernel
    runs[("flex_attention", "dynamic")] = _greedy(_load(exports[name]["dir"], "flex_attention"), prompts)
    for key, tokens in runs.items():
        assert torch.equal(tokens, reference), (name, key, tokens.tolist(), reference.tolist())
    assert reference.shape == (2, NEW) and len(set(reference.flatten().tolist())) > 3  # not one repeated id
    # the cached steps' logits are the full forward's at those positions (no cache) within fp32 tolerance
    model = _load(exports[name]["dir"], "sdpa")
    for cache in ("dynamic", "static"):
        kwargs = {"cache_implementation": "static"} if cache == "static" else {"past_key_values": DynamicCache()}
        with torch.no_grad():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                max_new_tokens=NEW,
                eos_token_id=None,
                pad_token_id=PAD,
                output_logits=True,
                return_dict_in_generate=True,
                **kwargs,
            )
            full = model(out.sequences).logits[:, prompts.shape[1] - 1 : -1]
        assert relative_error(torch.stack(out.logits, 1), full) < RTOL, (name, cache)


@pytest.mark.parametrize("name", SERVED)
def test_a_compiled_decode_step_gives_the_same_tokens(exports, name):
    from transformers import CompileConfig

    model = _load(exports[name]["dir"], "sdpa")
    prompts = TOKENS[:, :9]
    eager = _greedy(model, prompts, cache_implementation="static", disable_compile=True)
    assert not hasattr(model, "_compiled_call")
    # aot_eager: dynamo's whole-graph capture (fullgraph: no graph break), functionalised in-place cache
    # updates, no C++ code generation (inductor takes minutes here; the same tokens, checked by hand)
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    compiled = _greedy(model, prompts, cache_implementation="static", compile_config=config)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(compiled, eager), (name, compiled.tolist(), eager.tolist())


@pytest.mark.parametrize("name", SERVED)
def test_a_left_padded_batch_decodes_each_prompt_as_alone(exports, name):
    ids, mask = _left_padded()
    alone = [_greedy(_load(exports[name]["dir"], "sdpa"), p[None])[0] for p in PROMPTS]
    assert len({tuple(a.tolist()) for a in alone}) == len(PROMPTS)  # the rows differ
    for attn in ("eager", "sdpa"):
        model = _load(exports[name]["dir"], attn)
        for cache in ("dynamic", "static"):
            kwargs = {"cache_implementation": "static"} if cache == "static" else {}
            batch = _greedy(model, ids, mask, **kwargs)
            for row, tokens in enumerate(alone):
                assert torch.equal(batch[row], tokens), (name, attn, cache, row, batch[row].tolist(), tokens.tolist())
        # the padded batch's logits at each prompt's own positions are the checkpoint's for that prompt alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, p in enumerate(PROMPTS):
            theirs = logits[row, ids.shape[1] - len(p) :]
            ours = exports[name]["prompt_logits"][row][0]
            assert relative_error(theirs, ours) < RTOL, (name, attn, row, relative_error(theirs, ours))


@pytest.mark.parametrize("name", SERVED)
def test_soft_moa_is_one_attention_call_of_all_heads_through_the_interface(exports, name):
    """What a serving stack's kernel sees: per layer one call with N·H query heads and the wide K/V heads,
    and the cache holds exactly those K/V heads (N·H_kv with expert K/V, H_kv shared)."""
    from transformers import AttentionInterface, StaticCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = json.load(open(os.path.join(exports[name]["dir"], "config.json")))
    n, h, kv = (
        config["num_attention_experts"],
        config["attention_heads_per_expert"],
        config["key_value_heads_per_expert"],
    )
    wide_kv = n * kv if config["attention_kv_mode"] == "expert" else kv
    # config.json's standard head counts are the wide attention's: what caches and serving stacks size by
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (n * h, wide_kv), config
    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, query.shape[1], key.shape[1], value.shape[1]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("bam_test_counting", counting)
    model = _load(exports[name]["dir"], "bam_test_counting")
    cache = StaticCache(config=model.config, max_cache_len=TOKENS.shape[1])
    with torch.no_grad():
        theirs = model(TOKENS, past_key_values=cache, use_cache=True).logits
    assert relative_error(theirs, exports[name]["logits"]) < RTOL
    assert calls == [(layer, n * h, wide_kv, wide_kv) for layer in range(config["num_hidden_layers"])], calls
    for layer in cache.layers:
        assert layer.keys.shape == (2, wide_kv, TOKENS.shape[1], config["head_dim"]), layer.keys.shape
    assert model._get_static_cache_init_shape() == (wide_kv, config["head_dim"])


@pytest.mark.parametrize("name", OLDER)
def test_exports_written_before_the_wide_head_counts_still_load_and_import(exports, name):
    """An older config.json (per-expert counts in num_attention_heads / num_key_value_heads) loads with
    the same logits, and bam-convert-hf import reads it: exported again, it is today's export."""
    older = exports[name]["older"]
    with torch.no_grad():
        theirs = _load(older, "sdpa")(TOKENS).logits
    assert relative_error(theirs, exports[name]["logits"]) < RTOL
    assert exports[name]["import"][0] == 0 and exports[name]["export"][0] == 0, exports[name]
    for file in ("config.json", "model.safetensors"):
        first = open(os.path.join(exports[name]["dir"], file), "rb").read()
        assert first == open(os.path.join(exports[name]["again"], file), "rb").read(), file
