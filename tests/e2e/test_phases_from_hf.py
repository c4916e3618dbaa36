"""End to end: a Hugging Face Llama (with its tokenizer.json) through all three phases, with the same
commands as for our own seeds and no architecture flag after the import (docs/phases.md)."""

from __future__ import annotations

import json

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.cli.branch import main as branch_main
from bam_megatron.data.preprocess import main as preprocess_main
from bam_megatron.data.synthetic import synthetic_documents
from bam_megatron.testing.distributed import run_distributed
from tests.support.hf_models import build_hf_tokenizer
from tests.support.tools import tool_main
from tests.support.training import run

DOMAINS = {"general": 1, "code": 2, "law": 3}
TRAIN = ["--train-iters", "2", "--micro-batch-size", "2", "--eval-iters", "1", "--eval-interval", "2"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, str]:
    """A tiny random LlamaForCausalLM saved with its tokenizer, and each domain preprocessed with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    hf_dir = build_hf_tokenizer(root / "hf")
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    made = {"hf": hf_dir}
    for name, seed in DOMAINS.items():
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents(120, seed=seed)))
        prefix = str(root / name)
        argv = ["--input", str(jsonl), "--tokenizer-model", hf_dir, "--output-prefix", prefix, "--append-eod"]
        assert preprocess_main(argv) in (0, None)
        made[name] = prefix + "_text_document"
    return made


@pytest.mark.e2e
def test_a_hugging_face_llama_goes_through_the_three_phases(tmp_path, llama, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    runs = tmp_path / "runs"
    seed = str(runs / "seed")
    assert run_distributed(
        tool_main, 1, args=("bam-convert-hf", ["import", "--load", llama["hf"], "--save", seed])
    ) == [0]
    recorded = store.read_meta(store.resolve_checkpoint(seed))
    assert recorded.architecture.block_type == "sequential" and recorded.tokenizer_type == "HuggingFaceTokenizer"

    # phase 1: branch the imported seed
    domain_data = [f"{d}={llama[d]}" for d in ("code", "law")]
    argv = ["--seed-checkpoint", seed, "--output-dir", str(runs / "experts"), "--experts", "code", "law"]
    assert branch_main([*argv, "--domain-data", *domain_data, "--general-data", llama["general"]]) == 0

    # phase 2: each expert continues on its domain, from its phase2.args alone
    for name in ("code", "law"):
        codes, log = run(tmp_path, name, [f"@{runs / 'experts' / name / 'phase2.args'}", *TRAIN], world=1)
        assert codes == [0], log
        assert "loaded weights from" in log, log

    # phase 3: upcycle, then train the mixture with no architecture flag at all
    sources = ["--expert", f"seed={seed}"]
    for name in ("code", "law"):
        sources += ["--expert", f"{name}={runs / 'experts' / name / 'ckpt'}"]
    argv = [*sources, "--method", "bam", "--save", str(runs / "bam-init"), "--report-batches", "1"]
    assert run_distributed(tool_main, 1, args=("bam-upcycle", argv)) == [0]
    mix = str(runs / "bam")
    data = ["--data-path", "0.4", llama["code"], "0.4", llama["law"], "0.2", llama["general"]]
    argv = [*data, "--tokenizer-model", llama["hf"], *TRAIN, "--pretrained-checkpoint", str(runs / "bam-init")]
    codes, log = run(tmp_path, "mix", [*argv, "--load", mix, "--save", mix], world=1)
    assert codes == [0], log
    trained = store.read_meta(store.resolve_checkpoint(mix))
    assert trained.architecture == recorded.architecture.replace(variant="bam", num_experts=3)
    assert [s["name"] for s in trained.lineage["upcycled"]["sources"]] == ["seed", "code", "law"]

    # evaluation: the imported seed and the trained mixture on each domain, one table
    models = ["--model", f"bam={mix}", "--model", f"seed={seed}"]
    data = ["--data-path", llama["code"], llama["law"], "--eval-samples", "4", "--output-dir", str(tmp_path / "eval")]
    assert run_distributed(tool_main, 1, args=("bam-eval", [*models, *data])) == [0]
    table = json.load(open(tmp_path / "eval" / "perplexity.json"))
    assert set(table["models"]) == {"bam", "seed"} and table["models"]["bam"]["variant"] == "bam"
