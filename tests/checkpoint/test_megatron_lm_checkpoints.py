"""Megatron-LM checkpoints, read with no conversion step (bam_megatron.checkpoint.megatron_lm_reader).

The checkpoints here are laid out exactly as Megatron-LM's ``pretrain_gpt.py --ckpt-format
torch_dist`` writes them (read at Megatron-LM ``core_v0.16.1``, megatron/training/checkpointing.py):
megatron-core's stock ``GPTModel`` with the layer spec gpt_builders.py picks, its
``sharded_state_dict`` saved by ``dist_checkpointing.save`` under ``SAVE/iter_0000010`` (or
``SAVE/release``) with the common state ``generate_state_dict`` makes (``args``, the whole
argparse namespace; ``checkpoint_version`` 3.0; ``iteration``; the FLOP count; the scheduler; the
RNG states as a (PP, TP)-sharded object; the content metadata), then
``latest_checkpointed_iteration.txt``.

Transformer Engine is not installed here, so the checkpoints of its spec are made from the local
spec's model with the tensors renamed as the TE spec names them. For a dense layer that is no
renaming at all (both specs store the norms under the fused TE linears' names,
``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``); for an
MoE layer the local spec stores the norm in front of the experts as
``mlp.linear_fc1.layer_norm_weight`` (its dense key map applies there too) and the TE spec, whose
MoE layer has a separate ``TENorm``, as ``pre_mlp_layernorm.weight``. The experts are
``mlp.experts.experts.*`` in both. TE's extra states (FP8 metadata, ShardedObjects) are not
renamed: they keep their module names and bam-megatron does not read them.
"""

from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from bam_megatron.checkpoint import CheckpointError, megatron_lm_reader, store
from bam_megatron.model.architecture import Architecture
from bam_megatron.testing.distributed import run_distributed
from tests.support.megatron_lm import (
    LOCAL_MOE_NORM,
    TE_MOE_NORM,
    megatron_lm_args,
    model_state,
    save_as_megatron_lm,
    stock_gpt_model,
)

SEQ = 16
TOKENS = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
DENSE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)
MOE = dict(DENSE, num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2, kv_channels=32, qk_layernorm=True)
ARGS_OF = {
    "dense": megatron_lm_args(),
    "tp2": megatron_lm_args(tensor_model_parallel_size=2, world_size=2),
    "release": megatron_lm_args(bf16=True, params_dtype=torch.bfloat16, iteration=500),
    "moe-local": megatron_lm_args(**MOE, moe_router_pre_softmax=True),
    # Megatron-LM's default routing for top-k > 1 (a softmax over the top-k logits), scaled
    "moe-te": megatron_lm_args(**MOE, moe_router_topk_scaling_factor=2.5, transformer_impl="transformer_engine"),
}


def _save_all(root: str) -> dict[str, str]:
    """Rank body (one rank): the TP=1 checkpoints."""
    return {
        "dense": save_as_megatron_lm(os.path.join(root, "dense"), ARGS_OF["dense"], seed=1),
        "release": save_as_megatron_lm(os.path.join(root, "release"), ARGS_OF["release"], seed=2, release=True),
        "moe-local": save_as_megatron_lm(os.path.join(root, "moe-local"), ARGS_OF["moe-local"], seed=3),
        "moe-te": save_as_megatron_lm(os.path.join(root, "moe-te"), ARGS_OF["moe-te"], seed=4, te_names=True),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Megatron-LM checkpoints: name -> its --save directory (dense at TP=1, TP=2 and a bf16 release;
    MoE of the local spec and of the TE spec)."""
    root = str(tmp_path_factory.mktemp("megatron-lm"))
    run_distributed(save_as_megatron_lm, 2, args=(os.path.join(root, "tp2"), ARGS_OF["tp2"], 5))
    (made,) = run_distributed(_save_all, 1, args=(root,))
    return {name: os.path.dirname(directory) for name, directory in made.items()} | {"tp2": os.path.join(root, "tp2")}


LLAMA = Architecture(
    "dense", **DENSE, padded_vocab_size=128, block_type="sequential", rotary_base=500000.0, rope_scaling_factor=8.0
)


def test_read_meta_describes_megatron_lm_checkpoints(checkpoints):
    for name in ("dense", "tp2", "release"):
        path = store.resolve_checkpoint(checkpoints[name])
        meta = store.read_meta(path)
        assert meta.architecture == LLAMA, name
        assert meta.source == "megatron-lm" and meta.stored_keys == {}
        assert meta.seq_length == 32 and meta.tokenizer_type == "SentencePieceTokenizer"
        assert meta.tokenizer_model == "/data/tokenizers/llama.model" and meta.tokenizer_fingerprint is None
        assert meta.lineage["megatron_lm"]["checkpoint_version"] == 3.0
        assert meta.lineage["megatron_lm"]["path"] == os.path.abspath(path)
    dense = store.read_meta(store.resolve_checkpoint(checkpoints["dense"]))
    assert dense.iteration == 10 and dense.consumed_samples == 80
    assert (dense.layout.tensor, dense.layout.world_size, dense.layout.distributed_optimizer) == (1, 1, True)
    assert store.read_meta(store.resolve_checkpoint(checkpoints["tp2"])).layout.tensor == 2
    release = store.resolve_checkpoint(checkpoints["release"])
    assert os.path.basename(release) == "release" and store.resolve_checkpoint(release) == release
    meta = store.read_meta(release)
    assert meta.iteration == 0 and meta.lineage["megatron_lm"]["iteration"] == 500
    assert meta.lineage["megatron_lm"]["release"]

    moe = LLAMA.replace(variant="btx", num_experts=4, moe_router_topk=2, ffn_hidden_size=48)
    moe = moe.replace(kv_channels=32, qk_layernorm=True)
    local, te = (store.read_meta(store.resolve_checkpoint(checkpoints[n])) for n in ("moe-local", "moe-te"))
    assert local.architecture == moe.replace(moe_router_pre_softmax=True)
    assert te.architecture == moe.replace(moe_router_pre_softmax=False, moe_router_topk_scaling_factor=2.5)
    assert local.stored_keys == {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"} and te.stored_keys == {}
    assert local.lineage["megatron_lm"]["spec"] == "local" and te.lineage["megatron_lm"]["spec"] == "transformer_engine"
    assert store.stored_key_names(local)(TE_MOE_NORM) == LOCAL_MOE_NORM
    # nothing of the files read is saved: what bam-megatron writes is its own checkpoint
    assert "source" not in dense.to_dict() and "stored_keys" not in dense.to_dict()


def _logits(paths: dict[str, str]) -> dict[str, tuple]:
    """Rank body: per checkpoint, (ours, megatron-core's stock GPTModel) logits, both loaded from its files."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    position_ids = torch.arange(SEQ).view(1, -1)
    out = {}
    for name, path in paths.items():
        args = ARGS_OF[name]
        stock_args = argparse.Namespace(
            **{**vars(args), "tensor_model_parallel_size": 1, "params_dtype": torch.float32}
        )
        stock = stock_gpt_model(stock_args)
        state = model_state(stock, te_names=name == "moe-te")
        stock.load_state_dict(dist_checkpointing.load({"model": state}, path)["model"])
        ours = load_model(path)
        with torch.no_grad():
            out[name] = (ours(TOKENS, position_ids, None), stock.eval()(TOKENS, position_ids, None))
        if name == "moe-local":  # without the local spec's renaming: one line naming the tensor it lacks
            meta = store.read_meta(path)
            meta.stored_keys = {}
            try:
                store._load_megatron_lm_weights(path, load_model(store.resolve_checkpoint(paths["moe-te"])), meta)
            except CheckpointError as error:
                out["unmapped"] = str(error)
        if name == "dense":  # a dense sequential block's tensors are megatron-core's, key for key
            meta = store.read_meta(path)
            model = build_from_architecture(meta.architecture, meta.architecture.one_rank_config(), SEQ)
            out["keys"] = tuple(
                sorted(getattr(v, "key", "") for v in nested_values(s.sharded_state_dict()))
                for s in (model, stock_gpt_model(stock_args))
            )
    return out


def test_our_models_compute_what_megatron_core_s_computes_from_the_same_files(checkpoints):
    paths = {name: store.resolve_checkpoint(save) for name, save in checkpoints.items()}
    (logits,) = run_distributed(_logits, 1, args=(paths,))
    ours_keys, stock_keys = logits.pop("keys")
    assert ours_keys == stock_keys
    assert (
        logits.pop("unmapped")
        == f"{paths['moe-local']}: Megatron-LM checkpoint has no tensor {TE_MOE_NORM}, which this model reads"
    )
    for name, (ours, stock) in logits.items():
        assert ours.shape == (2, SEQ, 128), name
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()), msg=name)


def _with_args(checkpoints, tmp_path, name: str = "dense", **changes) -> str:
    """A copy of one of the checkpoints with some of its args changed: its iteration directory."""
    source = store.resolve_checkpoint(checkpoints[name])
    copy = str(tmp_path / f"{name}-{'-'.join(changes) or 'copy'}")
    shutil.copytree(source, copy)
    common = torch.load(os.path.join(copy, "common.pt"), weights_only=False)
    for field, value in changes.items():
        if value is _ABSENT:
            delattr(common["args"], field)
        else:
            setattr(common["args"], field, value)
    torch.save(common, os.path.join(copy, "common.pt"))
    return copy


_ABSENT = object()
REFUSED = [
    ("rotary_percent", 0.5, "dense"),
    ("position_embedding_type", "learned_absolute", "dense"),
    ("add_bias_linear", True, "dense"),
    ("swiglu", False, "dense"),
    ("layernorm_zero_centered_gamma", True, "dense"),
    ("rotary_interleaved", True, "dense"),
    ("normalization", "LayerNorm", "dense"),
    ("qk_l2_norm", True, "dense"),
    ("multi_latent_attention", True, "dense"),
    ("window_size", (128, 0), "dense"),
    ("mtp_num_layers", 1, "dense"),
    ("ckpt_format", "torch_dcp", "dense"),
    ("moe_shared_expert_intermediate_size", 64, "moe-local"),
    ("moe_router_score_function", "sigmoid", "moe-local"),
    ("moe_router_enable_expert_bias", True, "moe-local"),
    ("moe_layer_freq", 2, "moe-local"),
    ("moe_expert_capacity_factor", 1.0, "moe-local"),
]


@pytest.mark.parametrize("field,value,name", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_what_our_models_cannot_compute_is_refused_naming_the_field(checkpoints, tmp_path, field, value, name):
    path = _with_args(checkpoints, tmp_path, name, **{field: value})
    with pytest.raises(CheckpointError) as error:
        store.read_meta(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: Megatron-LM checkpoint with args.{field}={value!r}")


def test_older_args_names_and_tensors_that_do_not_fit(checkpoints, tmp_path):
    # Megatron-LM <= 0.15 spelled the norm settings norm_epsilon / apply_layernorm_1p
    old = _with_args(checkpoints, tmp_path, layernorm_epsilon=_ABSENT, norm_epsilon=1e-6)
    assert store.read_meta(old).architecture.norm_epsilon == 1e-6
    old_1p = _with_args(checkpoints, tmp_path, layernorm_zero_centered_gamma=_ABSENT, apply_layernorm_1p=True)
    with pytest.raises(CheckpointError, match=r"args\.apply_layernorm_1p=True \(--apply-layernorm-1p\)"):
        store.read_meta(old_1p)
    mha = megatron_lm_reader.architecture_from_args(
        megatron_lm_args(group_query_attention=False, num_query_groups=1), "x", {}
    )
    assert mha.num_query_groups == 4  # without --group-query-attention every head has its own K/V
    wrong = _with_args(checkpoints, tmp_path, ffn_hidden_size=128)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight has shape \(2, 192, 64\)"):
        store.read_meta(wrong)


def test_the_tokenizer_fingerprint_is_bam_megatron_s_where_the_tokenizer_is_found(checkpoints, tmp_path):
    import io

    import sentencepiece

    from bam_megatron.data.tokenizer import SentencePieceTokenizer

    written = io.BytesIO()
    lines = [f"document {i} of the corpus, with some words and numbers {i * 7}" for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=written, vocab_size=60)
    tokenizer = tmp_path / "llama.model"
    tokenizer.write_bytes(written.getvalue())
    meta = store.read_meta(_with_args(checkpoints, tmp_path, tokenizer_model=str(tokenizer)))
    assert meta.tokenizer_fingerprint == SentencePieceTokenizer(tokenizer).fingerprint
    assert meta.tokenizer_type == "SentencePieceTokenizer" and meta.tokenizer_model == str(tokenizer)
    gpt2 = store.read_meta(_with_args(checkpoints, tmp_path, tokenizer_type="GPT2BPETokenizer"))
    assert gpt2.tokenizer_type is None and gpt2.lineage["megatron_lm"]["tokenizer_type"] == "GPT2BPETokenizer"


def test_other_formats_and_what_is_not_read_get_one_line(checkpoints, tmp_path):
    legacy = tmp_path / "legacy"
    os.makedirs(legacy / "iter_0000010" / "mp_rank_00")
    torch.save(
        {"args": megatron_lm_args(ckpt_format="torch")}, legacy / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    )
    (legacy / "latest_checkpointed_iteration.txt").write_text("10")
    for given in (legacy, legacy / "iter_0000010", legacy / "iter_0000010" / "mp_rank_00"):
        with pytest.raises(CheckpointError) as error:
            store.resolve_checkpoint(str(given))
        message = str(error.value)
        assert "\n" not in message and "legacy --ckpt-format torch" in message
        assert (
            f"--load {legacy} --ckpt-format torch --ckpt-convert-format torch_dist --ckpt-convert-save OUT" in message
        )
    dcp = tmp_path / "dcp" / "iter_0000010"
    os.makedirs(dcp)
    (dcp / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="torch_dcp or fsdp_dtensor"):
        store.resolve_checkpoint(str(dcp))

    release_run = checkpoints["release"]
    with pytest.raises(CheckpointError, match="says 'release'.*--pretrained-checkpoint"):
        store.latest_iteration(release_run)  # what resuming (--load) reads
    path = store.resolve_checkpoint(checkpoints["dense"])
    with pytest.raises(CheckpointError, match="resuming Megatron-LM's optimizer state is not supported"):
        store.load_checkpoint(path, model=None, optimizer=object())


def _upcycle_and_load(argv: list[str], out: str, sources: dict[str, str]):
    """Rank body: bam-upcycle, then the weights of the MoE and of each source."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.conversion.upcycle import main as upcycle_main

    code = upcycle_main(argv)
    weights = {}
    for name, path in [("moe", out), *sources.items()]:
        model = load_model(store.resolve_checkpoint(path))
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return code, weights


def test_bam_upcycle_takes_megatron_lm_checkpoints(checkpoints, tmp_path):
    out = str(tmp_path / "btx")
    sources = {"a": checkpoints["dense"], "b": checkpoints["tp2"]}
    argv = ["--method", "btx", "--expert", f"a={sources['a']}", "--expert", f"b={sources['b']}", "--save", out]
    ((code, weights),) = run_distributed(_upcycle_and_load, 1, args=(argv, out, sources))
    assert code == 0
    moe = weights["moe"]
    for layer in range(2):
        p = f"decoder.layers.{layer}"
        for e, name in enumerate(("a", "b")):  # FFN expert e is source e's FFN
            for fc in ("linear_fc1", "linear_fc2"):
                assert torch.equal(
                    moe[f"{p}.mlp.experts.local_experts.{e}.{fc}.weight"], weights[name][f"{p}.mlp.{fc}.weight"]
                )
        qkv = f"{p}.self_attention.linear_qkv.weight"
        torch.testing.assert_close(moe[qkv], (weights["a"][qkv] + weights["b"][qkv]) / 2)
    meta = store.read_meta(store.resolve_checkpoint(out))
    assert meta.source == "bam-megatron" and meta.architecture.block_type == "sequential"
    assert meta.architecture.rope_scaling_factor == 8.0 and meta.architecture.rotary_base == 500000.0
