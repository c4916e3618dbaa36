"""The checkpoint contract: CheckpointMeta's record, its migration from the layout this project
wrote before it (tests/fixtures/v1, made by tests/fixtures/make_v1_checkpoints.py at commit
07fa1c6), and the architecture a run takes from the checkpoint it starts from."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from bam_megatron.checkpoint import CheckpointError, CheckpointMeta, SavedLayout, check_same_architecture, store
from bam_megatron.errors import ConfigError
from bam_megatron.model.architecture import Architecture, resolve_architecture
from bam_megatron.testing.distributed import run_distributed
from tests.support import paths
from tests.support.training import run

FIXTURES = os.path.join(paths.FIXTURES, "v1")
DENSE = Architecture("dense", 2, 32, 64, 4, 2, 128)


def test_a_version_1_checkpoint_reads_as_today_s_meta():
    meta = store.read_meta(store.resolve_checkpoint(os.path.join(FIXTURES, "dense")))
    assert meta.version == 1 and meta.to_dict()["version"] == 2 and meta.architecture == DENSE
    assert (meta.iteration, meta.seq_length, meta.consumed_samples) == (2, 32, 4)
    assert meta.layout == SavedLayout(world_size=1, tensor=1, pipeline=1, expert=1, distributed_optimizer=False)
    assert meta.scheduler is not None and meta.tokenizer_fingerprint is None
    assert meta.training["micro_batch_size"] == 2 and "hidden_size" not in meta.training

    mixture = store.read_meta(store.resolve_checkpoint(os.path.join(FIXTURES, "bam")))
    assert mixture.architecture == DENSE.replace(variant="bam", num_experts=2)
    assert [s["name"] for s in mixture.lineage["upcycled"]["sources"]] == ["a", "b"]


def _logits_of_fixtures() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rank body: (today's logits, the logits recorded when the fixture was written) per model."""
    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    reference = torch.load(os.path.join(FIXTURES, "reference_logits.pt"))
    tokens = reference["tokens"]
    out = {}
    for name in ("dense", "bam", "dense-sequential"):
        model = load_model(store.resolve_checkpoint(os.path.join(FIXTURES, name)))
        with torch.no_grad():
            out[name] = (model(tokens, torch.arange(tokens.shape[1]).view(1, -1), None), reference["logits"][name])
    return out


def test_a_version_1_checkpoint_computes_what_it_computed():
    (logits,) = run_distributed(_logits_of_fixtures, 1)
    # Recorded on another CPU: its SIMD kernels sum in another order, so the last bit may differ (3e-8 of
    # logits about 0.4 in size, measured on an AMD EPYC against the recording); a changed function (a norm's
    # epsilon, RoPE's base, a head order) moves them by orders of magnitude more.
    for name, (today, recorded) in logits.items():
        torch.testing.assert_close(today, recorded, rtol=1e-6, atol=1e-6, msg=f"{name} changed its function")


def test_meta_round_trips_and_refuses_what_it_cannot_read():
    meta = CheckpointMeta(DENSE, seq_length=32, iteration=7, lineage={"imported": {"path": "x"}})
    assert CheckpointMeta.from_dict(meta.to_dict(), "here") == meta
    with pytest.raises(CheckpointError, match="here: checkpoint format version 99"):
        CheckpointMeta.from_dict(dict(meta.to_dict(), version=99), "here")
    with pytest.raises(CheckpointError, match="here: unknown checkpoint meta fields surprise"):
        CheckpointMeta.from_dict(dict(meta.to_dict(), surprise=1), "here")
    record = meta.to_dict()
    del record["architecture"]["hidden_size"]
    with pytest.raises(ConfigError, match="here: missing architecture fields hidden_size"):
        CheckpointMeta.from_dict(record, "here")


def test_the_compatibility_check_names_the_field_both_values_and_both_origins():
    with pytest.raises(CheckpointError, match=r"^hidden_size differs: 32 in ckpt/a, 64 in ckpt/b$"):
        check_same_architecture(DENSE, "ckpt/a", DENSE.replace(hidden_size=64), "ckpt/b")
    check_same_architecture(DENSE, "a", DENSE.replace(padded_vocab_size=256), "b", ignore=("padded_vocab_size",))


def test_the_architecture_comes_from_the_checkpoint_and_a_contradicting_flag_is_named():
    given = {"variant": None, "hidden_size": None, "num_experts": None}
    assert resolve_architecture(given, saved=DENSE, saved_path="ckpt") == DENSE
    assert resolve_architecture(dict(given, hidden_size=32), saved=DENSE, saved_path="ckpt") == DENSE
    with pytest.raises(
        ConfigError, match="--hidden-size gives hidden_size=48, but checkpoint ckpt was saved with hidden_size=32"
    ):
        resolve_architecture(dict(given, hidden_size=48), saved=DENSE, saved_path="ckpt")
    with pytest.raises(ConfigError, match="--preset tiny gives hidden_size=64, but checkpoint ckpt"):
        resolve_architecture(given, preset="tiny", saved=DENSE, saved_path="ckpt")
    # no checkpoint: flags, then the preset, then the defaults
    built = resolve_architecture(dict(given, variant="bam", hidden_size=96), preset="tiny", padded_vocab=512)
    assert (built.hidden_size, built.num_layers, built.num_experts, built.block_type) == (96, 2, 4, "parallel")
    with pytest.raises(ConfigError, match="without --preset or a checkpoint to start from, give --num-layers"):
        resolve_architecture({"hidden_size": 8}, padded_vocab=512)
    assert dataclasses.asdict(built) == built.to_dict()


@pytest.mark.parametrize("fixture", ["dense", "dense-sequential"])
def test_pretrain_resumes_a_version_1_checkpoint_and_refuses_a_contradicting_flag(tmp_path, fixture):
    run_dir = tmp_path / fixture
    shutil.copytree(os.path.join(FIXTURES, fixture), run_dir)
    common = ["--mock-data", "--vocab-size", "100", "--micro-batch-size", "2", "--eval-iters", "0"]
    common += ["--load", str(run_dir), "--save", str(run_dir)]
    codes, log = run(tmp_path, "contradicting", [*common, "--train-iters", "3", "--num-layers", "4"], world=1)
    assert codes == [2], log
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--num-layers gives num_layers=4" in errors[0] and "iter_0000002" in errors[0], log
    assert store.latest_iteration(str(run_dir)) == 2  # nothing written

    codes, log = run(tmp_path, "resume", [*common, "--train-iters", "3"], world=1)  # no architecture flags
    assert codes == [0], log
    assert "resumed from" in log and "at iteration 2" in log, log
    meta = store.read_meta(store.checkpoint_path(str(run_dir), 3))
    expected = DENSE.replace(block_type="sequential") if fixture == "dense-sequential" else DENSE
    assert (meta.version, meta.architecture, meta.seq_length, meta.consumed_samples) == (2, expected, 32, 6)


def _sharded_keys(block_type: str) -> dict[str, dict[str, tuple]]:
    """Rank body: sharded-state-dict keys and shapes of our dense model and megatron-core's stock GPT."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    architecture = DENSE.replace(block_type=block_type)
    config = architecture.model_config(use_cpu_initialization=True)
    ours = build_from_architecture(architecture, config, 32, backend="local")
    stock = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), 128, 32, position_embedding_type="rope")
    out = {}
    for name, model in (("ours", ours), ("stock", stock)):
        stored = [v for v in model.sharded_state_dict().values() if hasattr(v, "global_shape")]
        out[name] = {v.key: tuple(v.global_shape) for v in stored}  # the keys on disk, layers stacked
    return out


def test_the_sequential_block_stores_its_tensors_under_megatron_core_s_keys():
    (keys,) = run_distributed(_sharded_keys, 1, args=("sequential",))
    assert keys["ours"] == keys["stock"]
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys["ours"]
