"""MoV and MoLoRA: identity at initialisation, the mixture's formula, gradients only on adapters,
TP/SP/EP equivalence with one rank, adapter-only checkpoints that restore exactly, and
pretrain_bam.py --peft end to end (save, resume on the recorded base).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bam_megatron.errors import ConfigError
from bam_megatron.peft import PeftConfig, adapter_parameters, apply_peft, is_adapter_name
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble
from tests.support.training import losses, run

VARIANTS = ("dense", "bam", "btx")
BLOCKS = {"": {}, "-sequential": {"block_type": "sequential"}}  # variant name suffix -> config overrides
MODELS = tuple(v + suffix for suffix in BLOCKS for v in VARIANTS)
METHODS = ("molora", "mov")
SMALL = dict(num_experts=3, rank=2, alpha=4.0)


def _randomize_adapters(model, seed: int = 5) -> None:
    """Non-trivial adapters (fresh ones are the identity and would hide any mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if "router" in name else 0.1))


# ---------------------------------------------------------------------------------------------
# one rank: identity, formula, checkpoint round trip


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def single_rank_checks(checkpoint_dir: str) -> dict:
    """Rank body (one rank): every check that needs a built model but no parallelism."""
    from megatron.core.transformer.mlp import MLP

    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_model
    from bam_megatron.peft import checkpoint as peft_checkpoint
    from bam_megatron.platform.distributed import initialize
    from tests.support.tiny_gpt import NUM_EXPERTS, SEQ, VOCAB, bam_config

    initialize(ParallelSizes(), seed=1234)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out: dict = {"identity": {}, "trainable": {}}
    for variant in VARIANTS:
        for suffix, block in BLOCKS.items():
            for method in METHODS:
                model = build_model(bam_config(ParallelSizes(), variant, **block), VOCAB, SEQ)
                before = _logits(model, tokens)
                apply_peft(model, PeftConfig(method, **SMALL))
                out["identity"][variant + suffix, method] = torch.equal(_logits(model, tokens), before)
                out["trainable"][variant + suffix, method] = sorted(
                    {
                        n.split(".")[-1] if "router" not in n else "router"
                        for n, p in model.named_parameters()
                        if p.requires_grad
                    }
                )

    # the mixture's formula, on the dense model's modules
    model = build_model(bam_config(ParallelSizes(), "dense"), VOCAB, SEQ)
    apply_peft(model, PeftConfig("molora", **SMALL))
    _randomize_adapters(model)
    layer = model.decoder.layers[0]
    x = torch.randn(SEQ, 2, layer.self_attention.linear_qkv.weight.shape[1])
    ad = layer.self_attention.linear_qkv_molora
    gates = torch.softmax(x @ ad.router.weight.T, dim=-1)  # [s, b, E]
    b = ad.lora_b.reshape(3, -1, 2)  # [E, out, r]
    naive = x @ layer.self_attention.linear_qkv.weight.T + 2.0 * sum(
        gates[..., e : e + 1] * (x @ ad.lora_a[e].T @ b[e].T) for e in range(3)
    )
    out["molora_formula"] = (layer.self_attention.linear_qkv(x)[0], naive)

    model = build_model(bam_config(ParallelSizes(), "dense"), VOCAB, SEQ)
    apply_peft(model, PeftConfig("mov", **SMALL))
    _randomize_adapters(model)
    mlp: MLP = model.decoder.layers[0].mlp
    h = torch.randn(SEQ, 2, mlp.linear_fc2.weight.shape[1])
    ad = mlp.linear_fc2_mov
    scale = 1 + torch.softmax(h @ ad.router.weight.T, dim=-1) @ ad.ia3_input
    out["mov_formula"] = (mlp.linear_fc2(h)[0], (h * scale) @ mlp.linear_fc2.weight.T)
    attn = model.decoder.layers[0].self_attention
    x = torch.randn(SEQ, 2, attn.linear_qkv.weight.shape[1])
    plain = (x @ attn.linear_qkv.weight.T).view(SEQ, 2, 2, 4, 16)  # 2 groups of [q, q, k, v], head dim 16
    ad = attn.linear_qkv_mov
    gates = torch.softmax(x @ ad.router.weight.T, dim=-1)
    k = 1 + torch.einsum("sbe,egd->sbgd", gates, ad.ia3_k)
    v = 1 + torch.einsum("sbe,egd->sbgd", gates, ad.ia3_v)
    expected = torch.cat(
        [plain[..., :2, :], plain[..., 2:3, :] * k[..., None, :], plain[..., 3:, :] * v[..., None, :]], -2
    )
    out["mov_qkv_formula"] = (attn.linear_qkv(x)[0], expected.view(SEQ, 2, -1))

    # adapter-only checkpoint: holds the adapters alone, and restores them exactly into a fresh model
    model = build_model(bam_config(ParallelSizes(), "bam"), VOCAB, SEQ)
    apply_peft(model, PeftConfig("molora", **SMALL))
    _randomize_adapters(model)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = CheckpointMeta(Architecture("bam", 2, 64, 128, 4, 2, VOCAB, num_experts=NUM_EXPERTS), seq_length=SEQ)
    store.save_checkpoint(checkpoint_dir, 1, peft_checkpoint.adapters_of(model), None, None, meta)
    fresh = build_model(bam_config(ParallelSizes(), "bam"), VOCAB, SEQ)
    apply_peft(fresh, PeftConfig("molora", **SMALL))
    base_before = {n: p.detach().clone() for n, p in fresh.named_parameters() if not is_adapter_name(n)}
    store.load_checkpoint(store.checkpoint_path(checkpoint_dir, 1), peft_checkpoint.adapters_of(fresh), load_rng=False)
    now = dict(fresh.named_parameters())
    out["restored"] = all(torch.equal(now[n], saved[n]) for n in saved if is_adapter_name(n))
    out["base_untouched"] = all(torch.equal(now[n], p) for n, p in base_before.items())
    # an MoE expert that receives no tokens
    expert = model.decoder.layers[0].mlp.experts.local_experts[0]
    nothing = torch.zeros(0, expert.linear_fc1.weight.shape[1])
    out["empty_expert"] = tuple(expert(nothing, torch.zeros(0))[0].shape)
    out["adapter_numel"] = sum(p.numel() for p in adapter_parameters(model).values())
    out["model_numel"] = sum(p.numel() for p in model.parameters())
    return out


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    (result,) = run_distributed(single_rank_checks, 1, args=(str(tmp_path_factory.mktemp("adapters")),))
    return result


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", MODELS)
def test_fresh_adapters_leave_the_output_unchanged(single_rank, variant, method):
    assert single_rank["identity"][variant, method]  # bit for bit: B = 0 (MoLoRA), vectors = 1 (MoV)


def test_only_adapters_and_routers_are_trainable(single_rank):
    for (variant, method), names in single_rank["trainable"].items():
        expected = ["lora_a", "lora_b", "router"] if method == "molora" else ["ia3_input", "ia3_k", "ia3_v", "router"]
        assert names == expected, (variant, method)


@pytest.mark.parametrize("case", ["molora_formula", "mov_formula", "mov_qkv_formula"])
def test_adapted_modules_compute_the_soft_mixture(single_rank, case):
    actual, naive = single_rank[case]
    torch.testing.assert_close(actual, naive, rtol=1e-5, atol=1e-5)
    assert not torch.equal(actual, naive * 0)


def test_an_expert_without_tokens(single_rank):
    assert single_rank["empty_expert"] == (0, 64)


def test_adapter_checkpoint_restores_exactly(single_rank, tmp_path_factory):
    assert single_rank["restored"] and single_rank["base_untouched"]
    assert single_rank["adapter_numel"] < single_rank["model_numel"] / 4


# ---------------------------------------------------------------------------------------------
# tensor, sequence and expert parallelism against one rank

FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
CASES = [
    (v, m, o)
    for v, o in (
        ("dense", {}),
        ("dense", {"fuse_tp_reduction": False}),
        ("bam", {}),
        ("btx", {}),
        ("bam", FULL_RECOMPUTE),
        ("dense", BLOCKS["-sequential"]),
        ("btx", BLOCKS["-sequential"]),
    )
    for m in METHODS
]
# activation recompute of the parallel block's FFN branch (megatron-core's reentrant checkpoint)
CASES.append(("dense", "molora", {"recompute_granularity": "selective", "recompute_modules": ["mlp"]}))


def peft_gradients(sizes: ParallelSizes, cases: list, full_weights: list | None) -> list[dict]:
    """Rank body: loss and adapter gradients of one forward/backward per case, with the base
    frozen. Without ``full_weights`` (the one-rank reference) the adapters are randomised first."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from bam_megatron.model.builder import build_model
    from bam_megatron.platform.distributed import initialize
    from bam_megatron.testing.shards import load_full_weights, local_shards
    from tests.support.tiny_gpt import SEQ, VOCAB, bam_config, forward_backward

    results = []
    for i, (variant, method, overrides) in enumerate(cases):
        initialize(sizes, seed=1234)
        config = bam_config(sizes, variant, **overrides)
        model = build_model(config, VOCAB, SEQ)
        apply_peft(model, PeftConfig(method, **SMALL))
        if full_weights is None:
            _randomize_adapters(model)
        else:
            load_full_weights(model, full_weights[i])
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        config.finalize_model_grads_func = finalize_model_grads
        loss = forward_backward(ddp, 2)
        with_grad = sorted(n for n, p in model.named_parameters() if getattr(p, "main_grad", None) is not None)
        zero = sorted(n for n, p in adapter_parameters(model).items() if not bool(p.main_grad.abs().sum() > 0))
        results.append(
            {
                "loss": loss,
                "with_grad": with_grad,
                "zero_grad_adapters": zero,
                "grads": [s for s in local_shards(model, gradients=True) if is_adapter_name(s[0])],
                "weights": local_shards(model),
            }
        )
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def reference():
    (results,) = run_distributed(peft_gradients, 1, args=(ParallelSizes(), CASES, None))
    return results


def test_only_adapter_parameters_receive_gradients(reference):
    for case, result in zip(CASES, reference):
        assert result["with_grad"] and all(is_adapter_name(n) for n in result["with_grad"]), case
        assert result["zero_grad_adapters"] == [], case


LAYOUTS = {
    "tp2": (ParallelSizes(tensor=2), ("dense",)),  # parallel block's fused reduction and RowParallelLinear
    "tp2-sp": (ParallelSizes(tensor=2, sequence_parallel=True), ("dense", "bam", "btx")),  # experts split over TP
    "ep2": (ParallelSizes(expert=2), ("bam", "btx")),  # experts split over ranks, DP=2 for the rest
    "pp2": (ParallelSizes(pipeline=2), ("bam",)),  # adapters of each stage's layers
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_loss_and_adapter_gradients_match_one_rank(reference, layout):
    sizes, variants = LAYOUTS[layout]
    index = [i for i, case in enumerate(CASES) if case[0] in variants]
    weights = [assemble([reference[i]["weights"]]) for i in index]
    results = run_distributed(peft_gradients, 2, args=(sizes, [CASES[i] for i in index], weights))
    for j, i in enumerate(index):
        ref = reference[i]
        reported = [rank[j]["loss"] for rank in results if rank[j]["loss"] is not None]  # last pipeline stage
        assert reported and all(loss == pytest.approx(ref["loss"], rel=1e-6) for loss in reported), CASES[i]
        grads, expected = assemble([r[j]["grads"] for r in results]), assemble([ref["grads"]])
        assert grads.keys() == expected.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-7, msg=f"{CASES[i]} {key}")


# ---------------------------------------------------------------------------------------------
# pretrain_bam.py --peft


def _argv(corpus, data, *extra: str) -> list[str]:
    return [
        "--variant",
        "bam",
        "--preset",
        "tiny",
        "--num-experts",
        "2",
        "--seq-length",
        "48",
        "--micro-batch-size",
        "2",
        "--tokenizer-model",
        corpus["tokenizer"],
        "--lr",
        "1e-2",
        "--log-interval",
        "1",
        "--eval-iters",
        "1",
        "--eval-interval",
        "1000",
        *data,
        *extra,
    ]


def _instruct_files(tmp_path) -> list[str]:
    pairs = [
        {"prompt": f"court {w} statute", "response": f"theorem {w} proof"} for w in ("ring", "field", "group", "prime")
    ]
    for name in ("train", "valid"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return [
        "--instruct-data-path",
        str(tmp_path / "train.jsonl"),
        "--instruct-valid-path",
        str(tmp_path / "valid.jsonl"),
    ]


def train_in_process(argv: list[str]) -> dict:
    """Rank body: one pretrain_bam.py run in this process; which parameters changed."""
    from bam_megatron.cli.pretrain import make_trainer
    from bam_megatron.training.arguments import parse_args

    trainer = make_trainer(parse_args(argv))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert trainer.run() == 0
    changed = sorted(n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n]))
    return {"changed": changed, "adapters": sorted(adapter_parameters(trainer.model)), "trainable": trainer.trainable}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, corpus):
    """A tiny BAM model trained for 2 iterations (the base the adapters are trained on)."""
    root = tmp_path_factory.mktemp("base")
    run_distributed(
        train_in_process, 1, args=(_argv(corpus, ["--mock-data"], "--train-iters", "2", "--save", str(root / "base")),)
    )
    return str(root / "base")


def test_pretrain_peft_saves_adapters_and_resumes_exactly(tmp_path, corpus, base_checkpoint):
    from megatron.core import dist_checkpointing

    data = _instruct_files(tmp_path)
    peft = ["--peft", "molora", "--peft-num-experts", "3", "--lora-rank", "2", "--train-iters", "4"]
    straight = tmp_path / "straight.jsonl"
    (reference,) = run_distributed(
        train_in_process,
        1,
        args=(_argv(corpus, data, *peft, "--pretrained-checkpoint", base_checkpoint, "--metrics-file", str(straight)),),
    )
    assert reference["changed"] == reference["adapters"]  # every adapter tensor trained, nothing else

    adapters = tmp_path / "adapters"
    codes, out = run(
        tmp_path,
        "first",
        _argv(
            corpus,
            data,
            *peft,
            "--pretrained-checkpoint",
            base_checkpoint,
            "--save",
            str(adapters),
            "--exit-interval",
            "2",
        ),
        world=1,
    )
    assert codes == [0], out
    assert f"trainable params: {reference['trainable']:,} (" in out and "% of " in out
    saved = os.path.join(adapters, "iter_0000002")
    keys = [k for k in dist_checkpointing.load_tensors_metadata(saved) if not k.startswith("optimizer")]
    assert keys and all(is_adapter_name(k) for k in keys), keys
    base_bytes = sum(
        os.path.getsize(os.path.join(base_checkpoint, "iter_0000002", f))
        for f in os.listdir(os.path.join(base_checkpoint, "iter_0000002"))
    )
    assert sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved)) < base_bytes / 2

    # resume: no --pretrained-checkpoint needed, the adapters name their base (checked by hash)
    codes, out = run(
        tmp_path, "resume", _argv(corpus, data, *peft, "--load", str(adapters), "--save", str(adapters)), world=1
    )
    assert codes == [0], out
    assert "loaded the base model from" in out and "resumed adapters from" in out and "at iteration 2" in out
    resumed = losses(str(adapters / "metrics.jsonl"))
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == losses(str(straight))  # bit for bit: adapters and their optimizer state restored exactly


def test_adapters_on_another_base_or_with_other_sizes_are_refused(tmp_path, corpus, base_checkpoint):
    from bam_megatron.checkpoint import CheckpointError
    from bam_megatron.peft import checkpoint as peft_checkpoint

    data = _instruct_files(tmp_path)
    adapters = tmp_path / "adapters"
    run_distributed(
        train_in_process,
        1,
        args=(
            _argv(
                corpus,
                data,
                "--peft",
                "mov",
                "--peft-num-experts",
                "2",
                "--train-iters",
                "1",
                "--pretrained-checkpoint",
                base_checkpoint,
                "--save",
                str(adapters),
            ),
        ),
    )
    other = tmp_path / "other"
    shutil.copytree(base_checkpoint, other)
    latest = os.path.join(other, "iter_0000002", "metadata.json")
    with open(latest, "a") as f:
        f.write(" ")  # another checkpoint: another hash
    with pytest.raises(CheckpointError, match="were trained on base .* but .* has hash"):
        peft_checkpoint.find_checkpoints(str(adapters), str(other))
    found = peft_checkpoint.find_checkpoints(str(adapters), None)
    assert found.base == os.path.join(base_checkpoint, "iter_0000002")
    with pytest.raises(CheckpointError, match="--peft-num-experts 2, but this run has 4"):
        peft_checkpoint.check_same_adapters(
            found.adapters, found.adapters_meta.peft, PeftConfig("mov", num_experts=4).to_dict()
        )


def test_flag_and_model_errors():
    from bam_megatron.peft.parallel import describe_linear
    from bam_megatron.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(
            [
                "--mock-data",
                "--vocab-size",
                "64",
                "--preset",
                "tiny",
                "--train-iters",
                "1",
                "--peft",
                "mov",
                "--train-only-parameters",
                "router",
            ]
        )
    with pytest.raises(NotImplementedError, match="cannot adapt layer.fc: Linear is not"):
        describe_linear(torch.nn.Linear(2, 2), "layer.fc")
    with pytest.raises(ConfigError, match="--lora-rank must be >= 1"):
        PeftConfig("molora", rank=0)
    with pytest.raises(ConfigError, match="--peft must be one of"):
        PeftConfig("lora")


def _refusals() -> dict:
    """Rank body: what apply_peft says of modules it cannot adapt (each a clear error, nothing half-done)."""
    from megatron.core.transformer.attention import CrossAttention
    from megatron.core.transformer.moe.experts import GroupedMLP

    from bam_megatron.model.builder import build_model
    from bam_megatron.peft.parallel import describe_linear
    from bam_megatron.platform.distributed import initialize
    from tests.support.tiny_gpt import SEQ, VOCAB, bam_config

    initialize(ParallelSizes(), seed=1234)
    errors = {}

    def refusal(fn) -> str:
        try:
            fn()
        except NotImplementedError as error:
            return str(error)
        return "accepted"

    errors["plain linear"] = refusal(lambda: describe_linear(torch.nn.Linear(4, 4), "layers.0.custom"))
    for case, replace in (
        ("grouped experts", ("mlp", "experts", GroupedMLP)),
        ("cross attention", (None, "self_attention", CrossAttention)),
    ):
        model = build_model(bam_config(ParallelSizes(), "bam"), VOCAB, SEQ)
        parent_name, child, cls = replace
        parent = getattr(model.decoder.layers[1], parent_name) if parent_name else model.decoder.layers[1]
        stand_in = cls.__new__(cls)  # an instance of the unsupported class, without its CUDA-only set-up
        torch.nn.Module.__init__(stand_in)
        setattr(parent, child, stand_in)
        errors[case] = refusal(lambda model=model: apply_peft(model, PeftConfig("molora", **SMALL)))
    return errors


def test_modules_peft_cannot_adapt_are_refused_by_name():
    (errors,) = run_distributed(_refusals, 1)
    assert errors["plain linear"].startswith("PEFT cannot adapt layers.0.custom: Linear is not a megatron-core")
    assert errors["grouped experts"].startswith(
        "PEFT cannot adapt layers.1.mlp.experts: grouped-GEMM experts (GroupedMLP)"
    )
    assert (
        errors["cross attention"] == "PEFT cannot adapt layers.1.self_attention: CrossAttention is not self-attention"
    )
