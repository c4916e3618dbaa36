"""UnitForward and what runs on it: a checkpoint run one unit at a time gives the whole model's logits,
the upcycler's streamed step-0 report equals the whole-model one, and domain-initialised routers send
each domain's tokens to its own experts at step 0."""

from __future__ import annotations

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from tests.support.corpus import DOMAINS, train_tokenizer, write_domain
from tests.support.tools import tool_main
from tests.support.training import base_args, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three domains that share no token: the tokenizer (400 pieces) keeps every word of the corpus whole."""
    directory = str(tmp_path_factory.mktemp("distinct-corpus"))
    files = {"tokenizer": train_tokenizer(directory, seed=2, vocab_size=400)}
    for name in DOMAINS:
        files[name] = write_domain(directory, name, files["tokenizer"])
    return files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus):
    """Dense code, law and math experts, each trained on its own domain (which it records), and bam and
    btx mixtures of the code and law experts."""
    root = tmp_path_factory.mktemp("unit-forward")
    made = {}
    for name, seed in (("code", 1), ("law", 2), ("math", 3)):
        made[name] = str(root / name)
        args = base_args(corpus, "--train-iters", "3", "--seed", str(seed), "--save", made[name])
        args[args.index("--variant") + 1] = "dense"
        start = args.index("--data-path") + 1
        args[start : start + 6] = [corpus[name]]
        codes, out = run(root, name, args, world=1)
        assert codes == [0], out
    for method in ("bam", "btx"):
        made[method] = str(root / method)
        argv = ["--expert", f"code={made['code']}", "--expert", f"law={made['law']}", "--method", method]
        argv += ["--save", made[method], "--report-batches", "0", "--router-init-std", "0.5"]
        assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    return made


def _both_ways(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank body: logits of fixed batches from the whole model and from UnitForward."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.conversion.unit_forward import streamed_logits
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    meta = store.read_meta(path)
    batches = torch.randint(0, 300, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    model = load_model(path, meta)
    positions = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        whole = torch.stack([model(b, positions, None).float() for b in batches])
    return whole, streamed_logits(path, meta, batches)


@pytest.mark.parametrize("name", ["code", "bam", "btx"])
def test_streamed_logits_equal_the_whole_models(checkpoints, name):
    ((whole, streamed),) = run_distributed(_both_ways, 1, args=(store.resolve_checkpoint(checkpoints[name]),))
    assert streamed.shape == whole.shape
    assert whole.abs().max() > 0.1  # a model that computes something
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()


def _whole_model_report(moe: str, sources: dict[str, str], batches: int, seed: int) -> dict:
    """Rank body: the step-0 report computed from whole models, as bam-upcycle did before streaming."""
    import torch.nn.functional as F

    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.conversion.function_report import REPORT_SEQ_LENGTH
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())

    def logits(path):
        meta = store.read_meta(path)
        model = load_model(path, meta)
        positions = torch.arange(tokens.shape[-1]).expand_as(tokens[0])
        with torch.no_grad():
            return torch.stack([model(b, positions, None).float() for b in tokens])[..., :vocab]

    metas = {name: store.read_meta(path) for name, path in sources.items()}
    vocab = min(m.architecture.padded_vocab_size for m in metas.values())
    seq = min(REPORT_SEQ_LENGTH, store.read_meta(moe).seq_length)
    tokens = torch.randint(0, vocab, (batches, 1, seq), generator=torch.Generator().manual_seed(seed))
    ours = logits(moe)
    report = {}
    for name, path in sources.items():
        theirs = logits(path)
        log_p = F.log_softmax(theirs, -1)
        report[name] = {
            "max_abs_logit_diff": float((ours - theirs).abs().max()),
            "kl": float((log_p.exp() * (log_p - F.log_softmax(ours, -1))).sum(-1).mean()),
            "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
        }
    return report


def test_the_upcycle_report_streamed_layer_by_layer_matches_the_whole_models(tmp_path, checkpoints):
    import json
    import os

    out = str(tmp_path / "bam-reported")
    argv = ["--expert", f"code={checkpoints['code']}", "--expert", f"law={checkpoints['law']}", "--method", "bam"]
    argv += ["--save", out, "--report-batches", "2", "--router-init-std", "0.5", "--seed", "7"]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    streamed = json.load(open(os.path.join(out, "upcycle_manifest.json")))["step0"]
    sources = {name: store.resolve_checkpoint(checkpoints[name]) for name in ("code", "law")}
    (whole,) = run_distributed(_whole_model_report, 1, args=(store.resolve_checkpoint(out), sources, 2, 7))
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert whole[name]["kl"] > 1e-4  # a mixture of different experts is not its sources
        assert streamed[name]["argmax_agreement"] == whole[name]["argmax_agreement"]
        for key in ("max_abs_logit_diff", "kl"):
            assert streamed[name][key] == pytest.approx(whole[name][key], rel=1e-4, abs=1e-6), (name, key)


def _routing_by_domain(path: str, tokens: dict[str, torch.Tensor]) -> dict[str, dict[str, list[float]]]:
    """Rank body: per domain, per layer, the share of its tokens whose top FFN expert is each expert
    and the mean attention gate of each expert (captured from the routers of the loaded model)."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import initialize

    initialize(ParallelSizes())
    model = load_model(path)
    captured: dict[str, list] = {"ffn": [], "attention": []}
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, out: captured["ffn"].append(out[1].float()))
        if hasattr(layer.self_attention, "router"):
            layer.self_attention.router.register_forward_hook(lambda m, i, out: captured["attention"].append(out))
    result = {}
    for domain, batch in tokens.items():
        captured["ffn"].clear(), captured["attention"].clear()
        with torch.no_grad():
            model(batch, torch.arange(batch.shape[1]).expand_as(batch), None)
        result[domain] = {
            "ffn": [m.mean(0).tolist() for m in captured["ffn"]],
            "attention": [g.reshape(-1, g.shape[-1]).mean(0).tolist() for g in captured["attention"]],
        }
    return result


def _held_out_tokens(corpus, domains) -> dict[str, torch.Tensor]:
    from bam_megatron.conversion.router_init import ExpertData, calibration_tokens

    # 5 sequences start at other documents than the 16 the upcycler fitted on
    return {d: calibration_tokens(ExpertData(d, (corpus[d],), (1.0,), "test"), 5, 32, 400) for d in domains}


@pytest.mark.parametrize("method", ["bam", "btx"])
def test_domain_routers_send_each_domains_tokens_to_its_own_experts_at_step_0(tmp_path, checkpoints, corpus, method):
    import json
    import os

    names = ("code", "law", "math")
    out = str(tmp_path / method)
    argv = [f for n in names for f in ("--expert", f"{n}={checkpoints[n]}")]
    argv += ["--method", method, "--save", out, "--router-init", "domain", "--report-batches", "0"]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    manifest = json.load(open(os.path.join(out, "upcycle_manifest.json")))
    recorded = manifest["domain_routers"]["data"]
    assert [recorded[n]["prefixes"] for n in names] == [[corpus[n]] for n in names]  # each run's own data
    assert {recorded[n]["origin"] for n in names} == {"recorded by its training run"}
    (routing,) = run_distributed(
        _routing_by_domain, 1, args=(store.resolve_checkpoint(out), _held_out_tokens(corpus, names))
    )
    for own, domain in enumerate(names):
        ffn, attention = routing[domain]["ffn"], routing[domain]["attention"]
        assert len(ffn) == 2 and len(attention) == (2 if method == "bam" else 0)
        for layer in range(2):
            assert ffn[layer][own] >= 0.6, (domain, layer, ffn[layer])
            if method == "bam":
                gates = attention[layer]
                assert gates[own] == max(gates) and gates[own] >= 0.5, (domain, layer, gates)


def test_random_routers_do_not_know_the_domains(tmp_path, checkpoints, corpus):
    """The control: the same mixture with the paper's random routers misses the bar above."""
    names = ("code", "law", "math")
    out = str(tmp_path / "random")
    argv = [f for n in names for f in ("--expert", f"{n}={checkpoints[n]}")]
    argv += ["--method", "bam", "--save", out, "--report-batches", "0"]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    (routing,) = run_distributed(
        _routing_by_domain, 1, args=(store.resolve_checkpoint(out), _held_out_tokens(corpus, names))
    )
    own_gates = [routing[d]["attention"][layer][e] for e, d in enumerate(names) for layer in range(2)]
    assert max(own_gates) < 0.5
