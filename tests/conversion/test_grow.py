"""bam-upcycle --extend / --drop-expert: a trained mixture gains or loses experts, every tensor in its
slot, everything shared kept; extend then drop gives the mixture back exactly."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.model.architecture import Architecture
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed

DENSE = Architecture("dense", 2, 32, 64, 4, 2, 128)
SEQ = 32


def _make_dense(directory: str, seed: int, root: str | None, architecture: Architecture = DENSE) -> None:
    """Rank body: a random dense checkpoint; ``root``: the checkpoint it was "branched" from."""
    from bam_megatron.checkpoint import CheckpointMeta, lineage
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(), seed=seed)
    torch.manual_seed(seed)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), SEQ)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and all: every tensor differs between sources
    family = {}
    if root is not None:
        path = store.resolve_checkpoint(root)
        family = {"root": lineage.identity(path, store.read_meta(path))}
    store.save_checkpoint(directory, 0, model, None, None, CheckpointMeta(architecture, SEQ, lineage=family))


def _upcycle(argv: list[str]) -> tuple[int, str]:
    """Rank body: bam-upcycle's exit code and stderr."""
    from bam_megatron.conversion.upcycle import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def upcycle(*argv: str) -> tuple[int, str]:
    ((code, err),) = run_distributed(_upcycle, 1, args=(list(argv),))
    return code, err


def _weights(path: str, expert: int) -> dict[str, torch.Tensor]:
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(expert=expert))
    return {n: p.detach().clone() for n, p in load_model(path, expert=expert).named_parameters()}


def weights(path: str) -> dict[str, torch.Tensor]:
    (w,) = run_distributed(_weights, 1, args=(store.resolve_checkpoint(path), 1))
    return w


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """A seed, two experts branched from it, and a foreign dense model."""
    root = tmp_path_factory.mktemp("family")
    made = {name: str(root / name) for name in ("seed", "code", "law", "foreign")}
    run_distributed(_make_dense, 1, args=(made["seed"], 1, None))
    for name, seed in (("code", 2), ("law", 3)):
        run_distributed(_make_dense, 1, args=(made[name], seed, made["seed"]))
    run_distributed(_make_dense, 1, args=(made["foreign"], 4, None))
    return made


@pytest.fixture(scope="module")
def mixtures(family, tmp_path_factory) -> dict[str, str]:
    """seed + code upcycled by each method."""
    root = tmp_path_factory.mktemp("mixtures")
    made = {}
    for method in ("bam", "bam-shared-kv", "btx"):
        made[method] = str(root / method)
        code, err = upcycle(
            "--expert",
            f"seed={family['seed']}",
            "--expert",
            f"code={family['code']}",
            "--method",
            method,
            "--save",
            made[method],
            "--report-batches",
            "0",
        )
        assert code == 0, err
    return made


def _attention(w: dict, layer: int, architecture: Architecture):
    from bam_megatron.model.qkv_layout import split_soft_moa_attention

    p = f"decoder.layers.{layer}.self_attention"
    return split_soft_moa_attention(
        w[f"{p}.linear_qkv.weight"], w[f"{p}.linear_proj.weight"], architecture.one_rank_config()
    )


@pytest.mark.parametrize("method", ["bam", "bam-shared-kv", "btx"])
def test_extend_puts_every_tensor_in_its_slot_and_drop_gives_the_mixture_back(tmp_path, family, mixtures, method):
    from bam_megatron.model.qkv_layout import split_qkv

    grown, back = str(tmp_path / "grown"), str(tmp_path / "back")
    code, err = upcycle("--extend", mixtures[method], "--expert", f"law={family['law']}", "--save", grown)
    assert code == 0, err
    mix, big, law = weights(mixtures[method]), weights(grown), weights(family["law"])
    architecture = store.read_meta(store.resolve_checkpoint(grown)).architecture
    assert architecture.num_experts == 3 and architecture.variant == method and architecture.router_bias
    for name, tensor in big.items():
        if ".local_experts.2." in name:  # the new FFN expert: law's FFN
            layer_fc = name.replace(".mlp.experts.local_experts.2.", ".mlp.")
            assert torch.equal(tensor, law[layer_fc]), name
        elif name.endswith("router.weight"):  # old rows kept, the new row their mean
            assert torch.equal(tensor[:2], mix[name]) and torch.allclose(tensor[2], mix[name].mean(0)), name
        elif name.endswith("router.bias"):  # growth turns the bias on: 0 for all (the least old bias)
            assert name not in mix and torch.equal(tensor, torch.zeros(3)), name
        elif method != "btx" and ".self_attention.linear_" in name:
            continue  # checked expert by expert below
        else:  # old experts and everything shared: the mixture's own
            assert torch.equal(tensor, mix[name]), name
    if method != "btx":
        moe = Architecture("bam", 2, 32, 64, 4, 2, 128, num_experts=2).replace(variant=method)
        for layer in range(2):
            q_old, o_old, k_old, v_old = _attention(mix, layer, moe)
            q_new, o_new, k_new, v_new = _attention(big, layer, architecture)
            for e in range(2):
                assert torch.equal(q_new[e], q_old[e]) and torch.equal(o_new[e], o_old[e])
            p = f"decoder.layers.{layer}.self_attention"
            q_law, k_law, v_law = split_qkv(law[f"{p}.linear_qkv.weight"], 4, 2)
            assert torch.equal(q_new[2], q_law) and torch.equal(o_new[2], law[f"{p}.linear_proj.weight"])
            if method == "bam":  # expert KV: law's own K and V; the old experts' unchanged
                assert torch.equal(k_new[:4], k_old) and torch.equal(k_new[4:], k_law) and torch.equal(v_new[4:], v_law)
            else:  # shared KV: the mixture's K and V are kept
                assert torch.equal(k_new, k_old) and torch.equal(v_new, v_old)
    code, err = upcycle("--extend", grown, "--drop-expert", "law", "--save", back)
    assert code == 0, err
    again = weights(back)
    assert all(torch.equal(again[n], mix[n]) for n in mix)
    # the bias the growth added stays, zero: the same function (docs/phases.md)
    assert set(again) - set(mix) == {n for n in again if n.endswith("router.bias")}
    assert all(torch.equal(again[n], torch.zeros(2)) for n in set(again) - set(mix))
    history = store.read_meta(store.resolve_checkpoint(back)).lineage["grown"]
    assert [(g["expert_names"], [j["name"] for j in g["joined"]], g["left"]) for g in history] == [
        (["seed", "code", "law"], ["law"], []),
        (["seed", "code"], [], ["law"]),
    ]
    manifest = json.load(open(os.path.join(grown, "upcycle_manifest.json")))
    assert set(manifest["step0"]) == {"mixture", "law"}  # the step-0 change, measured
    step0 = manifest["step0"]
    # the report runs the grown mixture with its step-0 router offsets: exactly the mixture it grew from
    assert step0["mixture"] == {"max_abs_logit_diff": 0.0, "kl": 0.0, "argmax_agreement": 1.0}
    assert step0["law"]["kl"] > 0


def _resave(path: str, out: str) -> None:
    """Rank body (EP=2, 2 ranks): load the mixture and save it under this layout."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(expert=2))
    model = load_model(path, expert=2)
    store.save_checkpoint(out, 0, model, None, None, store.read_meta(path))


def test_a_mixture_saved_at_ep2_grows_into_the_same_tensors(tmp_path, family, mixtures):
    ep2 = str(tmp_path / "btx-ep2")
    run_distributed(_resave, 2, args=(store.resolve_checkpoint(mixtures["btx"]), ep2))
    assert store.read_meta(store.resolve_checkpoint(ep2)).layout.expert == 2
    outs = {}
    for name, mixture in (("ep1", mixtures["btx"]), ("ep2", ep2)):
        outs[name] = str(tmp_path / name)
        code, err = upcycle("--extend", mixture, "--expert", f"law={family['law']}", "--save", outs[name])
        assert code == 0, err
    one, two = weights(outs["ep1"]), weights(outs["ep2"])
    assert all(torch.equal(one[n], two[n]) for n in one)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unknown", "--drop-expert math: the mixture's experts are seed, code"),
        ("foreign", "was not branched from the seed of mixture"),
        ("architecture", "hidden_size differs"),
        ("ep", "--num-experts 3 is not divisible by --target-expert-parallel-size 2"),
        ("taken", "--expert code: the mixture already has an expert of that name"),
        ("nothing", "--extend needs --expert NAME=DIR to add or --drop-expert NAME to remove"),
        ("ramp", "--new-expert-ramp-iters must be >= 0, got -1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, family, mixtures, case, expected):
    out = str(tmp_path / "out")
    argv = ["--extend", mixtures["bam"], "--save", out]
    extra = {
        "unknown": ["--drop-expert", "math"],
        "foreign": ["--expert", f"other={family['foreign']}"],
        "ep": ["--expert", f"law={family['law']}", "--target-expert-parallel-size", "2"],
        "taken": ["--expert", f"code={family['law']}"],
        "nothing": [],
        "ramp": ["--expert", f"law={family['law']}", "--new-expert-ramp-iters", "-1"],
    }.get(case)
    if case == "architecture":
        wide = str(tmp_path / "wide")
        extra = ["--expert", f"wide={wide}", "--allow-foreign-lineage"]
        run_distributed(_make_wider, 1, args=(wide,))
    code, err = upcycle(*argv, *extra)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def _make_wider(directory: str) -> None:
    """Rank body: a dense checkpoint of another width."""
    from bam_megatron.checkpoint import CheckpointMeta
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    wide = DENSE.replace(hidden_size=64)
    model = build_from_architecture(wide, wide.model_config(use_cpu_initialization=True), SEQ)
    store.save_checkpoint(directory, 0, model, None, None, CheckpointMeta(wide, SEQ))


def test_foreign_lineage_is_allowed_with_a_warning(tmp_path, family, mixtures):
    out = str(tmp_path / "out")
    code, err = upcycle(
        "--extend",
        mixtures["btx"],
        "--expert",
        f"other={family['foreign']}",
        "--allow-foreign-lineage",
        "--save",
        out,
        "--report-batches",
        "0",
    )
    assert code == 0 and "warning: source other" in err, err
    assert store.read_meta(store.resolve_checkpoint(out)).architecture.num_experts == 3


def _pretrain(argv: list[str]) -> tuple[int, str]:
    """Rank body: pretrain_bam's exit code and stderr."""
    from bam_megatron.cli.pretrain import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "method,new,layout",
    [
        ("bam", ["law"], []),
        ("bam-shared-kv", ["law"], []),
        ("btx", ["law"], []),
        ("bam", ["law"], ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("bam", ["law", "other"], ["--expert-model-parallel-size", "2"]),
    ],
    ids=["bam", "bam-shared-kv", "btx", "bam-tp2", "bam-ep2"],
)
def test_freeze_old_experts_trains_only_the_newcomers_and_what_is_shared(
    tmp_path, family, mixtures, method, new, layout
):
    grown, trained = str(tmp_path / "grown"), str(tmp_path / "trained")
    sources = {"law": family["law"], "other": family["foreign"]}
    extra = [arg for name in new for arg in ("--expert", f"{name}={sources[name]}")]
    code, err = upcycle("--extend", mixtures[method], *extra, "--allow-foreign-lineage", "--save", grown)
    assert code == 0, err
    argv = [
        "--pretrained-checkpoint",
        grown,
        "--freeze-old-experts",
        "--mock-data",
        "--vocab-size",
        "128",
        "--seq-length",
        str(SEQ),
        "--micro-batch-size",
        "2",
        "--train-iters",
        "3",
        "--lr",
        "1e-2",
        "--lr-warmup-iters",
        "0",
        "--save",
        trained,
        *layout,
    ]
    world = 2 if layout else 1
    results = run_distributed(_pretrain, world, args=(argv,))
    assert [code for code, _ in results] == [0] * world, results[0][1]
    before, after = weights(grown), weights(trained)
    old, experts = (0, 1), 2 + len(new)
    for name, tensor in after.items():
        if ".local_experts." in name:
            e = int(name.split(".local_experts.")[1].split(".")[0])
            assert torch.equal(tensor, before[name]) == (e in old), name
        elif "router" in name or "embedding" in name or (method == "btx" and "self_attention" in name):
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
    if method == "btx":
        return
    architecture = store.read_meta(store.resolve_checkpoint(grown)).architecture
    for layer in range(2):
        q0, o0, k0, v0 = _attention(before, layer, architecture)
        q1, o1, k1, v1 = _attention(after, layer, architecture)
        for e in range(experts):
            assert torch.equal(q1[e], q0[e]) == (e in old) and torch.equal(o1[e], o0[e]) == (e in old), (layer, e)
        if method == "bam":  # expert KV: rows e*G to (e+1)*G are expert e's K and V
            assert torch.equal(k1[:4], k0[:4]) and torch.equal(v1[:4], v0[:4])
            assert not torch.equal(k1[4:], k0[4:]) and not torch.equal(v1[4:], v0[4:])
        else:  # one K and V for all experts: shared, so it trains
            assert not torch.equal(k1, k0) and not torch.equal(v1, v0)


def test_freeze_old_experts_needs_a_grown_mixture(tmp_path, mixtures):
    argv = [
        "--pretrained-checkpoint",
        mixtures["bam"],
        "--freeze-old-experts",
        "--mock-data",
        "--vocab-size",
        "128",
        "--train-iters",
        "1",
        "--save",
        str(tmp_path / "out"),
    ]
    ((code, err),) = run_distributed(_pretrain, 1, args=(argv,))
    assert code == 2 and "--freeze-old-experts: checkpoint" in err and "is not a mixture grown" in err, err
    assert not os.path.exists(tmp_path / "out")


def _logits_with_router_row_copied(
    mixture: str, grown: str, copy_from: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank body: logits of the mixture, and of the grown mixture whose new FFN router row is set to
    ``scale`` x row ``copy_from`` (scale 1: the new expert ties with that one on every token), both
    with top-1 routing renormalised over the chosen expert (weight 1) and the new-expert ramp cleared."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.model.router_ramp import biased_routers, set_offsets
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    tokens = torch.arange(2 * SEQ).view(2, -1) % 128
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    out = []
    for path in (mixture, grown):
        model = load_model(store.resolve_checkpoint(path))
        # Renormalised top-1 (bam-upcycle refuses it for training: the router would learn nothing);
        # megatron-core's router reads the setting at every forward.
        model.config.moe_router_pre_softmax = False
        if path == grown:
            for router in biased_routers(model):  # no ramp: this test is about the row alone
                set_offsets(router, [0.0] * router.weight.shape[0], router.expert_groups or ())
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("mlp.router.weight"):
                        param[-1] = scale * param[copy_from]
        with torch.no_grad():
            out.append(model(tokens, positions, None))
    return out[0], out[1]


def test_a_copy_of_an_expert_with_its_router_row_leaves_the_function_unchanged(tmp_path, family, mixtures):
    """BTX, top-1 routing renormalised in the test: growing by a copy of source ``code`` whose router
    row duplicates code's gives bit-identical logits, which fails if any tensor lands in another slot.
    (Soft MoA cannot pass this: a duplicated gate of a bias-free softmax takes weight from the others;
    nor can the paper's pre-softmax top-1, whose weight is the softmax probability.)"""
    grown = str(tmp_path / "grown")
    code, err = upcycle("--extend", mixtures["btx"], "--expert", f"code2={family['code']}", "--save", grown)
    assert code == 0, err
    ((before, after),) = run_distributed(_logits_with_router_row_copied, 1, args=(mixtures["btx"], grown, 1))
    assert torch.equal(before, after)
    # the control: the copy of code takes the tokens where twice the seed's logit wins, another function
    ((_, moved),) = run_distributed(_logits_with_router_row_copied, 1, args=(mixtures["btx"], grown, 0, 2.0))
    assert not torch.equal(before, moved)


def _grown_logits(mixture: str, grown: str, expert: int) -> dict[str, torch.Tensor]:
    """Rank body: logits of the mixture and of the grown mixture (as load_model gives it: the ramp's
    offset of its iteration applied), and of the grown one with its offsets cleared (the control)."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.model.router_ramp import biased_routers, set_offsets
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes(expert=expert))
    tokens = torch.arange(2 * SEQ).view(2, -1) * 7 % 128
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    out = {}
    for name, path in (("mixture", mixture), ("grown", grown)):
        model = load_model(store.resolve_checkpoint(path), expert=expert)
        with torch.no_grad():
            out[name] = model(tokens, positions, None)
    routers = biased_routers(model)
    for router in routers:
        set_offsets(router, [0.0] * router.weight.shape[0], router.expert_groups or ())
    with torch.no_grad():
        out["no offset"] = model(tokens, positions, None)
    out["routers"] = len(routers)
    return out


@pytest.mark.parametrize("method", ["bam", "bam-shared-kv", "btx"])
def test_extend_is_exact_at_step_0(tmp_path, family, mixtures, method):
    """Two experts join (2 -> 4, so EP=2 splits them): the grown mixture's logits are the mixture's,
    bit for bit, at EP=1 and EP=2 (pre-softmax top-1 FFN routing, soft MoA), with the router bias
    growth turns on and the new experts' -1024 offset at step 0; without the offset they are not."""
    grown = str(tmp_path / "grown")
    new = ["--expert", f"law={family['law']}", "--expert", f"other={family['foreign']}", "--allow-foreign-lineage"]
    code, err = upcycle("--extend", mixtures[method], *new, "--save", grown, "--report-batches", "0")
    assert code == 0, err
    meta = store.read_meta(store.resolve_checkpoint(grown))
    assert meta.architecture.router_bias and meta.architecture.moe_router_pre_softmax
    ramp = meta.lineage["grown"][-1]["router_ramp"]
    assert ramp["experts"] == [2, 3] and ramp["groups"] == [2, 2] and ramp["exact_offset"] == 1024.0
    for expert in (1, 2):
        out = run_distributed(_grown_logits, expert, args=(mixtures[method], grown, expert))[0]
        assert out["routers"] == (2 if method != "btx" else 1) * 2
        assert torch.equal(out["grown"], out["mixture"]), (expert, (out["grown"] - out["mixture"]).abs().max())
        assert not torch.equal(out["no offset"], out["mixture"])  # the control: the offset does it


@pytest.mark.parametrize("method", ["bam", "btx"])
def test_training_a_grown_mixture_moves_the_new_bias_and_ramps_it_in(tmp_path, family, mixtures, method):
    """The new experts' gates are exactly 0 at step 0 only: from step 1 their offset rises from -16
    to 0 at K = 3, while the bias parameters train from the first step; the new attention expert
    (soft MoA) learns through its gate."""
    grown, trained = str(tmp_path / "grown"), str(tmp_path / "trained")
    argv = ["--extend", mixtures[method], "--expert", f"law={family['law']}", "--save", grown, "--report-batches", "0"]
    ((code, err),) = run_distributed(_upcycle, 1, args=([*argv, "--new-expert-ramp-iters", "3"],))
    assert code == 0, err
    train = ["--pretrained-checkpoint", grown, "--mock-data", "--vocab-size", "128", "--seq-length", str(SEQ)]
    train += ["--micro-batch-size", "2", "--train-iters", "5", "--lr", "1e-2", "--lr-warmup-iters", "0"]
    ((code, out),) = run_distributed(_pretrain_output, 1, args=([*train, "--save", trained],))
    assert code == 0, out
    said = [
        line.split(": ", 1)[0] + ": " + line.rsplit(" ", 1)[1] for line in out.splitlines() if "router offset" in line
    ]
    assert said == ["iteration 0: -1024", "iteration 1: -10.6667", "iteration 3: 0"], said
    before, after = weights(grown), weights(trained)
    for name in (n for n in after if n.endswith("router.bias")):
        assert before[name][2] == 0 and after[name][2] != before[name][2], name
    if method == "bam":
        architecture = store.read_meta(store.resolve_checkpoint(grown)).architecture
        q0, o0, _, _ = _attention(before, 0, architecture)
        q1, o1, _, _ = _attention(after, 0, architecture)
        assert not torch.equal(q1[2], q0[2]) and not torch.equal(o1[2], o0[2])


def _pretrain_output(argv: list[str]) -> tuple[int, str]:
    """Rank body: pretrain_bam's exit code and its output (stdout and stderr)."""
    from bam_megatron.cli.pretrain import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


# Qwen2's QKV biases and Qwen3's per-head Q/K norms, in one attention (head size 8, as DENSE: with
# Qwen3's other head sizes the grown output GEMM's longer reduction may reorder its sums, ~1e-6)
QWEN_DENSE = DENSE.replace(block_type="sequential", add_qkv_bias=True, qk_layernorm=True)


@pytest.mark.parametrize("method", ["bam", "bam-shared-kv"])
def test_a_qwen_style_mixture_grows_each_expert_s_biases_and_norms_exactly(tmp_path, method):
    """A soft MoA with per-expert QKV biases and Q/K norms: the new expert brings its own (shared KV: the
    mixture's K/V biases and K norm are kept), the grown mixture is the old one at step 0, and dropping
    the new expert gives the mixture back."""
    from bam_megatron.model.qkv_layout import split_qkv, split_soft_moa_qkv

    made = {name: str(tmp_path / name) for name in ("seed", "code", "law", "mixture", "grown", "back")}
    run_distributed(_make_dense, 1, args=(made["seed"], 1, None, QWEN_DENSE))
    for name, seed in (("code", 2), ("law", 3)):
        run_distributed(_make_dense, 1, args=(made[name], seed, made["seed"], QWEN_DENSE))
    experts = ["--expert", f"seed={made['seed']}", "--expert", f"code={made['code']}"]
    code, err = upcycle(*experts, "--method", method, "--save", made["mixture"], "--report-batches", "0")
    assert code == 0, err
    code, err = upcycle("--extend", made["mixture"], "--expert", f"law={made['law']}", "--save", made["grown"])
    assert code == 0, err
    mix, big, law = weights(made["mixture"]), weights(made["grown"]), weights(made["law"])
    architecture = store.read_meta(store.resolve_checkpoint(made["grown"])).architecture
    config, shared = architecture.one_rank_config(), method == "bam-shared-kv"
    for layer in range(2):
        p = f"decoder.layers.{layer}.self_attention."
        q_norm, k_norm = big[p + "q_layernorm.weight"], big[p + "k_layernorm.weight"]
        assert torch.equal(q_norm[:2], mix[p + "q_layernorm.weight"]) and torch.equal(
            q_norm[2], law[p + "q_layernorm.weight"]
        )
        assert (
            torch.equal(k_norm, mix[p + "k_layernorm.weight"])
            if shared
            else torch.equal(k_norm[2], law[p + "k_layernorm.weight"])
        )
        qs, k, v = split_soft_moa_qkv(big[p + "linear_qkv.bias"].unsqueeze(-1), config)
        q_law, k_law, _ = split_qkv(law[p + "linear_qkv.bias"].unsqueeze(-1), 4, 2)
        assert torch.equal(qs[2], q_law)
        if not shared:  # expert KV: law's own K biases, its groups the last
            assert torch.equal(k[4:], k_law)
    ((out,),) = [run_distributed(_grown_logits, 1, args=(made["mixture"], made["grown"], 1))]
    assert torch.equal(out["grown"], out["mixture"]) and not torch.equal(out["no offset"], out["mixture"])
    code, err = upcycle("--extend", made["grown"], "--drop-expert", "law", "--save", made["back"])
    assert code == 0, err
    again = weights(made["back"])
    assert all(torch.equal(again[n], mix[n]) for n in mix)


# OLMo 2's norms after attention and FFN (kept from the mixture) and each expert's Q/K norms over its
# whole projection (laid into the wide attention's head order)
OLMO2_DENSE = DENSE.replace(
    block_type="sequential", norm_placement="post", qk_layernorm=True, qk_layernorm_scope="projection"
)


def test_an_olmo2_style_mixture_grows_each_expert_s_projection_norms_exactly(tmp_path):
    """Expert KV: the new expert brings its Q and K norms; the grown mixture is the old one at step 0,
    and dropping the new expert gives the mixture back."""
    made = {name: str(tmp_path / name) for name in ("seed", "code", "law", "mixture", "grown", "back")}
    run_distributed(_make_dense, 1, args=(made["seed"], 1, None, OLMO2_DENSE))
    for name, seed in (("code", 2), ("law", 3)):
        run_distributed(_make_dense, 1, args=(made[name], seed, made["seed"], OLMO2_DENSE))
    experts = ["--expert", f"seed={made['seed']}", "--expert", f"code={made['code']}"]
    code, err = upcycle(*experts, "--method", "bam", "--save", made["mixture"], "--report-batches", "0")
    assert code == 0, err
    code, err = upcycle("--extend", made["mixture"], "--expert", f"law={made['law']}", "--save", made["grown"])
    assert code == 0, err
    big, law = weights(made["grown"]), weights(made["law"])
    p = "decoder.layers.1.self_attention."
    assert torch.equal(big[p + "q_layernorm.weight"][-32:], law[p + "q_layernorm.weight"])  # 4 heads of 8
    assert torch.equal(big[p + "k_layernorm.weight"][-16:], law[p + "k_layernorm.weight"])
    ((out,),) = [run_distributed(_grown_logits, 1, args=(made["mixture"], made["grown"], 1))]
    assert torch.equal(out["grown"], out["mixture"])
    code, err = upcycle("--extend", made["grown"], "--drop-expert", "law", "--save", made["back"])
    assert code == 0, err
    mix, again = weights(made["mixture"]), weights(made["back"])
    assert all(torch.equal(again[n], mix[n]) for n in mix)
