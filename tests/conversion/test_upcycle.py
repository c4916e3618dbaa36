"""bam-upcycle: what each method copies, averages and initialises, checked on the built models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.conversion.upcycle import main as upcycle_main
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from tests.support import paths
from tests.support.tools import tool_main
from tests.support.training import base_args, logits_from_checkpoint, run

ROOT = paths.REPO


def dense_args(corpus, domain: str, seed: int, *extra: str) -> list[str]:
    args = base_args(corpus, "--train-iters", "2", "--seed", str(seed), *extra)
    args[args.index("--variant") + 1] = "dense"
    start = args.index("--data-path") + 1
    args[start : start + 6] = [corpus[domain]]
    return args


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus):
    """Two differently trained dense checkpoints, plus one saved at TP=2."""
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for name, domain, seed in (("seed", "law", 1), ("code", "code", 2)):
        made[name] = str(root / name)
        codes, out = run(root, name, dense_args(corpus, domain, seed, "--save", made[name]), world=1)
        assert codes == [0], out
    made["tp2"] = str(root / "tp2")
    codes, out = run(
        root, "tp2", dense_args(corpus, "math", 3, "--save", made["tp2"], "--tensor-model-parallel-size", "2")
    )
    assert codes == [0, 0], out
    return made


def weights(path: str) -> dict[str, torch.Tensor]:
    """Rank body: the checkpoint's parameters as full tensors (one rank)."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    model = load_model(path)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load(path: str) -> dict[str, torch.Tensor]:
    (w,) = run_distributed(weights, 1, args=(store.resolve_checkpoint(path),))
    return w


def upcycled(tmp_path, sources, method: str, *extra: str, names=("seed", "code")) -> str:
    out = str(tmp_path / method)
    argv = [f for n in names for f in ("--expert", f"{n}={sources[n]}")] + ["--method", method, "--save", out, *extra]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    return out


def _upcycle_capturing_stderr(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = upcycle_main(argv)
    return code, err.getvalue()


def test_bam_copies_experts_averages_the_rest_and_initialises_routers(tmp_path, sources):
    out = upcycled(tmp_path, sources, "bam")
    moe, seed, code = load(out), load(sources["seed"]), load(sources["code"])
    for layer in range(2):
        p = f"decoder.layers.{layer}"
        for e, src in enumerate((seed, code)):  # FFN expert e is source e's FFN
            for fc in ("linear_fc1", "linear_fc2"):
                assert torch.equal(moe[f"{p}.mlp.experts.local_experts.{e}.{fc}.weight"], src[f"{p}.mlp.{fc}.weight"])
        # attention expert e is source e's attention (expert-major heads in the wide QKV / O)
        h = seed[f"{p}.self_attention.linear_proj.weight"].shape[1]
        proj = moe[f"{p}.self_attention.linear_proj.weight"]
        assert torch.equal(proj[:, :h], seed[f"{p}.self_attention.linear_proj.weight"])
        assert torch.equal(proj[:, h:], code[f"{p}.self_attention.linear_proj.weight"])
        norm = f"{p}.input_layernorm.weight"
        torch.testing.assert_close(moe[norm], (seed[norm] + code[norm]) / 2)
        for router in (f"{p}.self_attention.router.weight", f"{p}.mlp.router.weight"):
            assert moe[router].shape[0] == 2 and 0.005 < moe[router].std() < 0.05
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        torch.testing.assert_close(moe[name], (seed[name] + code[name]) / 2)
    manifest = json.load(open(os.path.join(out, "upcycle_manifest.json")))
    assert [s["name"] for s in manifest["sources"]] == ["seed", "code"] and manifest["method"] == "bam"
    assert all(s["iteration"] == 2 and len(s["hash"]) == 16 for s in manifest["sources"])


def test_btx_averages_attention_and_sparse_copies_one_source(tmp_path, sources):
    seed, code = load(sources["seed"]), load(sources["code"])
    btx = load(upcycled(tmp_path, sources, "btx"))
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    torch.testing.assert_close(btx[qkv], (seed[qkv] + code[qkv]) / 2)
    sparse = load(upcycled(tmp_path, sources, "sparse", "--num-experts", "3", names=("seed",)))
    for e in range(3):
        assert torch.equal(
            sparse[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"],
            seed["decoder.layers.1.mlp.linear_fc2.weight"],
        )
    assert torch.equal(sparse[qkv], seed[qkv])


@pytest.mark.parametrize("block", ["parallel", "sequential"])
@pytest.mark.parametrize("method", ["bam", "bam-shared-kv"])
def test_identical_copies_reproduce_the_dense_model(tmp_path, sources, sequential_sources, method, block):
    source = (sources if block == "parallel" else sequential_sources)["seed"]
    argv = [
        "--expert",
        f"a={source}",
        "--expert",
        f"b={source}",
        "--method",
        method,
        "--moe-router-topk",
        "2",
        "--no-moe-router-pre-softmax",  # softmax over the selected top-k: weights sum to 1
        "--save",
        str(tmp_path / "copies"),
    ]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    out = store.resolve_checkpoint(str(tmp_path / "copies"))
    dense = store.resolve_checkpoint(source)
    (moe_logits,) = run_distributed(logits_from_checkpoint, 1, args=(out, ParallelSizes()))
    (dense_logits,) = run_distributed(logits_from_checkpoint, 1, args=(dense, ParallelSizes()))
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sequential_sources(tmp_path_factory, corpus):
    """Two differently trained dense checkpoints on the sequential (Llama-style) block."""
    root = tmp_path_factory.mktemp("sequential-sources")
    made = {}
    for name, domain, seed in (("seed", "law", 1), ("code", "code", 2)):
        made[name] = str(root / name)
        argv = dense_args(corpus, domain, seed, "--save", made[name], "--block-type", "sequential")
        codes, out = run(root, name, argv, world=1)
        assert codes == [0], out
    return made


def test_bam_and_btx_from_sequential_sources_copy_each_expert_exactly(tmp_path, sequential_sources):
    seed, code = load(sequential_sources["seed"]), load(sequential_sources["code"])
    bam = load(upcycled(tmp_path, sequential_sources, "bam"))
    btx = load(upcycled(tmp_path, sequential_sources, "btx"))
    for layer in range(2):
        p = f"decoder.layers.{layer}"
        for e, src in enumerate((seed, code)):
            for moe in (bam, btx):  # FFN expert e is source e's FFN, in both
                for fc in ("linear_fc1", "linear_fc2"):
                    expert = moe[f"{p}.mlp.experts.local_experts.{e}.{fc}.weight"]
                    assert torch.equal(expert, src[f"{p}.mlp.{fc}.weight"])
        h = seed[f"{p}.self_attention.linear_proj.weight"].shape[1]  # BAM: attention expert e is source e's
        proj = bam[f"{p}.self_attention.linear_proj.weight"]
        assert torch.equal(proj[:, :h], seed[f"{p}.self_attention.linear_proj.weight"])
        assert torch.equal(proj[:, h:], code[f"{p}.self_attention.linear_proj.weight"])
        # both norms of the block are shared: averaged (the one wide attention has one input norm)
        for norm in (f"{p}.input_layernorm.weight", f"{p}.pre_mlp_layernorm.weight"):
            for moe in (bam, btx):
                torch.testing.assert_close(moe[norm], (seed[norm] + code[norm]) / 2)
        qkv = f"{p}.self_attention.linear_qkv.weight"  # BTX: one attention, the average
        torch.testing.assert_close(btx[qkv], (seed[qkv] + code[qkv]) / 2)


def _report(tmp_path, source: str, *extra: str) -> dict:
    out = str(tmp_path / "_".join(["sparse", *extra]).replace("-", ""))
    argv = ["--expert", f"seed={source}", "--method", "sparse", "--num-experts", "4", "--save", out, *extra]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    return json.load(open(os.path.join(out, "upcycle_manifest.json")))["step0"]["seed"]


def test_the_step0_report_and_function_preserving_sparse_upcycling(tmp_path, sequential_sources):
    source = sequential_sources["seed"]
    plain = _report(tmp_path, source)  # softmax, then top-1 unrenormalised: the expert's output is scaled by p
    assert plain["max_abs_logit_diff"] > 1e-3 and plain["kl"] > 0
    exact = _report(tmp_path, source, "--function-preserving")  # zero router, weights x 4
    assert exact == {"max_abs_logit_diff": 0.0, "kl": 0.0, "argmax_agreement": 1.0}
    top2 = _report(tmp_path, source, "--function-preserving", "--moe-router-topk", "2")  # renormalised top-2
    assert top2["max_abs_logit_diff"] < 1e-5 and top2["argmax_agreement"] == 1.0


def test_sources_saved_at_tp2_give_the_same_logits_at_any_target_layout(tmp_path, sources):
    argv = [
        "--expert",
        f"a={sources['tp2']}",
        "--expert",
        f"b={sources['seed']}",
        "--method",
        "bam",
        "--save",
        str(tmp_path / "mixed"),
        "--target-expert-parallel-size",
        "2",
        "--target-tensor-parallel-size",
        "2",
    ]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    path = store.resolve_checkpoint(str(tmp_path / "mixed"))
    (one,) = run_distributed(logits_from_checkpoint, 1, args=(path, ParallelSizes()))
    ep2 = [
        x for x in run_distributed(logits_from_checkpoint, 2, args=(path, ParallelSizes(expert=2))) if x is not None
    ][0]
    tp2 = [
        x
        for x in run_distributed(
            logits_from_checkpoint, 2, args=(path, ParallelSizes(tensor=2, sequence_parallel=True))
        )
        if x is not None
    ][0]
    torch.testing.assert_close(ep2, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp2, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "source ghost: checkpoint not found"),
        ("bad-spec", "--expert 'seedonly': expected NAME=DIR"),
        ("duplicate", "--expert names must be unique"),
        ("not-dense", "is a bam model; sources must be dense"),
        ("ep", "--num-experts 2 is not divisible by --target-expert-parallel-size 3"),
        ("tp", "4 heads are not divisible by --target-tensor-parallel-size 3"),
        ("topk", "--moe-router-topk must be in [1, --num-experts 2], got 3"),
        ("function-preserving", "--function-preserving: --method bam mixes different experts"),
        ("architecture", "hidden_size differs: 128 in source code"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, sources, corpus, case, expected):
    out = tmp_path / "out"
    experts = ["--expert", f"seed={sources['seed']}", "--expert", f"code={sources['code']}"]
    extra: list[str] = []
    if case == "missing":
        experts[3] = f"ghost={tmp_path / 'ghost'}"
    elif case == "bad-spec":
        experts[1] = "seedonly"
    elif case == "duplicate":
        experts[3] = f"seed={sources['code']}"
    elif case == "not-dense":
        experts[3] = f"code={upcycled(tmp_path, sources, 'bam')}"
    elif case == "ep":
        extra = ["--target-expert-parallel-size", "3"]
    elif case == "tp":
        extra = ["--target-tensor-parallel-size", "3"]
    elif case == "topk":
        extra = ["--moe-router-topk", "3"]
    elif case == "function-preserving":
        extra = ["--function-preserving"]
    elif case == "architecture":
        wide = str(tmp_path / "wide")
        codes, log = run(
            tmp_path, "wide", dense_args(corpus, "code", 4, "--save", wide, "--hidden-size", "128"), world=1
        )
        assert codes == [0], log
        experts[3] = f"code={wide}"
    argv = [*experts, "--method", "bam", "--save", str(out), *extra]
    if case == "missing":  # once through the command line
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "upcycle.py"), *argv], capture_output=True, text=True
        )
        code, stderr = result.returncode, result.stderr
    else:
        ((code, stderr),) = run_distributed(_upcycle_capturing_stderr, 1, args=(argv,))
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], stderr
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def _upcycle_watching_memory(argv, fail_at_layer):
    """Rank body: upcycle while recording which units of the MoE hold real storage at each fill."""
    from bam_megatron.checkpoint import layerwise
    from bam_megatron.conversion import upcycle

    seen, models, fill = [], [], upcycle._Mixer.__call__

    class Watching(layerwise.StreamingSaveStrategy):
        def __init__(self, model, fill):
            super().__init__(model, fill)
            models.append(model)

    def watched_fill(self, unit, params):
        live = {layerwise.unit_of_parameter(n) for n, p in models[0].named_parameters() if p.device.type != "meta"}
        seen.append((unit, sorted(live)))
        if unit == fail_at_layer:
            raise RuntimeError("disk full (simulated)")
        return fill(self, unit, params)

    layerwise.StreamingSaveStrategy, upcycle._Mixer.__call__ = Watching, watched_fill  # this rank's process only
    try:
        upcycle_main(argv)
    except BaseException as error:  # torch's checkpoint writer re-raises it in a CheckpointException (a BaseException)
        return seen, str(error)
    return seen, None


def test_the_moe_is_built_one_layer_at_a_time_and_a_failure_leaves_nothing(tmp_path, sources):
    argv = ["--expert", f"seed={sources['seed']}", "--expert", f"code={sources['code']}", "--method", "bam"]
    out = tmp_path / "streamed"
    ((seen, error),) = run_distributed(_upcycle_watching_memory, 1, args=(argv + ["--save", str(out)], None))
    assert error is None and out.is_dir()
    # embeddings first, then each layer; while a unit is filled only it and the one being written
    # (the one before) have storage
    assert [unit for unit, _ in seen] == [-1, 0, 1]
    assert seen[0][1] == [-1] and all(set(live) <= {unit - 1, unit} and unit in live for unit, live in seen[1:])
    broken = tmp_path / "broken"
    ((seen, error),) = run_distributed(_upcycle_watching_memory, 1, args=(argv + ["--save", str(broken)], 1))
    assert "disk full (simulated)" in error and [unit for unit, _ in seen] == [-1, 0, 1]
    assert not broken.exists() and not (tmp_path / "broken.tmp").exists()


# Qwen2's QKV biases and Qwen3's per-head Q/K norms (head size other than hidden / heads)
QWEN_ATTENTION = {"qkv-bias": dict(add_qkv_bias=True), "qk-norm": dict(qk_layernorm=True, kv_channels=24)}


def _save_qwen_sources(root: str, kind: str) -> list[str]:
    """Rank body: two dense Qwen-style checkpoints with different random weights (biases, norms)."""
    from bam_megatron.model.architecture import Architecture
    from tests.support.hf import save_random_checkpoint

    a = Architecture("dense", 2, 64, 96, 4, 2, 384, block_type="sequential", **QWEN_ATTENTION[kind])
    return [save_random_checkpoint(os.path.join(root, f"{kind}-{i}"), a, seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def qwen_sources(tmp_path_factory) -> dict[str, list[str]]:
    root = str(tmp_path_factory.mktemp("qwen_sources"))
    return {kind: run_distributed(_save_qwen_sources, 1, args=(root, kind))[0] for kind in QWEN_ATTENTION}


def _one_hot_attention(moe_path: str, source_paths: list[str]) -> dict:
    """Rank body: per layer and expert j, max |soft MoA with gates one-hot on j - source j's attention|
    (shared KV: source j's attention with the sources' average K/V weights and biases and K norm), and
    the same against the other source (which must differ)."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.model.qkv_layout import merge_qkv, split_qkv
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    moe = load_model(store.resolve_checkpoint(moe_path))
    sources = [load_model(store.resolve_checkpoint(p)) for p in source_paths]
    config = moe.config
    rope = moe.rotary_pos_emb(12)
    x = torch.randn(12, 2, config.hidden_size, generator=torch.Generator().manual_seed(0))
    errors, others = [], []
    for layer in range(config.num_layers):
        moa = moe.decoder.layers[layer].self_attention
        dense = [s.decoder.layers[layer].self_attention for s in sources]
        if config.attention_kv_mode == "shared":  # the sources' K/V (weights, biases) and K norm: their average
            with torch.no_grad():
                for name in ["linear_qkv.weight"] + (["linear_qkv.bias"] if config.add_qkv_bias else []):
                    params = [d.get_parameter(name) for d in dense]
                    splits = [split_qkv(p.view(p.shape[0], -1), 4, 2) for p in params]
                    k, v = (torch.stack([s[i] for s in splits]).mean(0) for i in (1, 2))
                    for p, (q, _, _) in zip(params, splits):
                        p.copy_(merge_qkv(q, k, v).view_as(p))
                if config.qk_layernorm:
                    mean = torch.stack([d.k_layernorm.weight for d in dense]).mean(0)
                    for d in dense:
                        d.k_layernorm.weight.copy_(mean)
        for j in range(2):
            one_hot = torch.zeros(12, 2, 2)
            one_hot[..., j] = 1.0
            moa.router.forward = lambda hidden, gates=one_hot: gates  # the attention gates, set one-hot on j
            with torch.no_grad():
                ours = moa(x, None, rotary_pos_emb=rope)[0]
                errors.append((ours - dense[j](x, None, rotary_pos_emb=rope)[0]).abs().max().item())
                others.append((ours - dense[1 - j](x, None, rotary_pos_emb=rope)[0]).abs().max().item())
    return {"errors": errors, "others": others}


@pytest.mark.parametrize("kind", list(QWEN_ATTENTION))
@pytest.mark.parametrize("method", ["bam", "bam-shared-kv"])
def test_soft_moa_of_qwen_sources_with_one_hot_gates_is_each_source_s_attention(tmp_path, qwen_sources, method, kind):
    """Each attention expert keeps its own QKV biases (Qwen2) or Q/K norms (Qwen3): at step 0, with the
    gates one-hot on expert j, the soft MoA is source j's attention (shared KV: with the average K/V)."""
    dense = qwen_sources[kind]
    out = str(tmp_path / method)
    argv = ["--expert", f"a={dense[0]}", "--expert", f"b={dense[1]}", "--method", method, "--save", out]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", [*argv, "--report-batches", "0"])) == [0]
    (result,) = run_distributed(_one_hot_attention, 1, args=(out, dense))
    assert max(result["errors"]) < 1e-5, result
    assert min(result["others"]) > 1e-2, result  # the sources' attentions differ


@pytest.mark.parametrize("method", ["btx", "sparse"])
def test_btx_and_sparse_average_qkv_biases_and_qk_norms(tmp_path, qwen_sources, method):
    """Without soft MoA the one attention is the sources' average, its biases and norms included."""
    names = ("a", "b") if method == "btx" else ("a",)
    out = str(tmp_path / method)
    for kind, dense in qwen_sources.items():
        argv = [f for n, p in zip(names, dense) for f in ("--expert", f"{n}={p}")]
        argv += ["--method", method, "--save", f"{out}-{kind}", "--report-batches", "0"]
        assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
        moe, sources = load(f"{out}-{kind}"), [load(p) for p in dense[: len(names)]]
        keys = ["linear_qkv.bias"] if kind == "qkv-bias" else ["q_layernorm.weight", "k_layernorm.weight"]
        for key in (f"decoder.layers.{i}.self_attention.{k}" for i in range(2) for k in keys):
            torch.testing.assert_close(moe[key], torch.stack([s[key] for s in sources]).mean(0), msg=key)
            assert not torch.equal(sources[0][key], sources[-1][key]) or method == "sparse", key
