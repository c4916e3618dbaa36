"""End to end: a dense checkpoint written by Megatron-LM (at TP=2) is the seed of all three phases,
with the same commands as one of ours and no conversion step (docs/phases.md)."""

from __future__ import annotations

import os

import pytest

from bam_megatron.checkpoint import store
from bam_megatron.cli.branch import main as branch_main
from bam_megatron.testing.distributed import run_distributed
from tests.support.megatron_lm import megatron_lm_args, save_as_megatron_lm
from tests.support.tools import tool_main
from tests.support.training import run

TRAIN = ["--train-iters", "2", "--micro-batch-size", "2", "--eval-iters", "1", "--eval-interval", "2"]


@pytest.mark.e2e
def test_a_megatron_lm_checkpoint_seeds_the_three_phases(tmp_path, corpus):
    seed = str(tmp_path / "megatron-seed")
    args = megatron_lm_args(
        tensor_model_parallel_size=2,
        world_size=2,
        tokenizer_type="GPTSentencePieceTokenizer",
        tokenizer_model=corpus["tokenizer"],  # ours: its fingerprint is then known
        padded_vocab_size=384,  # the tokenizer's 320 pieces, padded to 64 x TP
    )
    run_distributed(save_as_megatron_lm, 2, args=(seed, args, 7))
    assert store.read_meta(store.resolve_checkpoint(seed)).source == "megatron-lm"

    experts = str(tmp_path / "experts")
    argv = ["--seed-checkpoint", seed, "--output-dir", experts, "--experts", "code", "law"]
    domains = ["--domain-data", f"code={corpus['code']}", f"law={corpus['law']}", "--general-data", corpus["math"]]
    assert branch_main([*argv, *domains]) == 0
    for name in ("code", "law"):  # phase 2 from phase2.args alone: architecture and tokenizer from the seed
        codes, log = run(tmp_path, name, [f"@{os.path.join(experts, name, 'phase2.args')}", *TRAIN], world=1)
        assert codes == [0], log
        assert "loaded weights from" in log, log

    sources = ["--expert", f"seed={seed}"]
    for name in ("code", "law"):
        sources += ["--expert", f"{name}={os.path.join(experts, name, 'ckpt')}"]
    init = str(tmp_path / "btx-init")
    assert run_distributed(tool_main, 1, args=("bam-upcycle", [*sources, "--method", "btx", "--save", init])) == [0]
    mix = str(tmp_path / "btx")
    data = ["--data-path", corpus["code"], corpus["law"], corpus["math"], "--tokenizer-model", corpus["tokenizer"]]
    codes, log = run(tmp_path, "mix", [*data, *TRAIN, "--pretrained-checkpoint", init, "--load", mix, "--save", mix])
    assert codes == [0, 0], log
    seed_architecture = store.read_meta(store.resolve_checkpoint(seed)).architecture
    trained = store.read_meta(store.resolve_checkpoint(mix))
    assert trained.architecture == seed_architecture.replace(variant="btx", num_experts=3)
    expert = store.read_meta(store.resolve_checkpoint(os.path.join(experts, "code", "ckpt")))
    assert expert.lineage["root"]["hash"] == store.checkpoint_hash(store.resolve_checkpoint(seed))

    # growth: the trained mixture gains a fourth expert read straight from the Megatron-LM files (the seed
    # itself, its own root), then trains with the three old experts frozen
    grown, regrown = str(tmp_path / "btx-grown-init"), str(tmp_path / "btx-grown")
    argv = ["--extend", mix, "--expert", f"general={seed}", "--save", grown, "--report-batches", "0"]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    assert store.read_meta(store.resolve_checkpoint(grown)).architecture.num_experts == 4
    flags = [
        *data,
        *TRAIN,
        "--pretrained-checkpoint",
        grown,
        "--freeze-old-experts",
        "--load",
        regrown,
        "--save",
        regrown,
    ]
    codes, log = run(tmp_path, "grown", flags)
    assert codes == [0, 0] and "froze experts seed, code, law" in log, log

    # evaluation of the Megatron-LM seed itself beside the mixture (the first model gives the defaults)
    out = str(tmp_path / "eval")
    models = ["--model", f"btx={mix}", "--model", f"megatron-seed={seed}"]
    argv = [*models, "--data-path", corpus["code"], corpus["law"], "--eval-samples", "4", "--output-dir", out]
    assert run_distributed(tool_main, 1, args=("bam-eval", argv)) == [0]
    assert os.path.isfile(os.path.join(out, "perplexity.md"))
