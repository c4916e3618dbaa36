"""SIGKILL at the worst moments of a save, an upcycle, a preprocessing run and an export, then the same
command again: the rerun completes, and nothing the kill left behind survives it.

The process kills itself at a named point (``BAM_FAULT_KILL_AT``, `bam_megatron.platform.faults`):
no ``finally`` runs, as under the OOM killer or a node failure. Each run is a fresh process.
"""

from __future__ import annotations

import os

import pytest

from bam_megatron.testing.distributed import DistributedTestError, run_distributed
from tests.support.tools import dense_train_flags, run_main


def _tool(tool: str, argv: list[str], kill_at: str = "") -> tuple[int, str]:
    """Rank body: ``tool``'s main(argv), SIGKILLed at ``kill_at`` if given."""
    if kill_at:
        os.environ["BAM_FAULT_KILL_AT"] = kill_at
    return run_main(tool, argv)


def killed(tool: str, argv: list[str], point: str) -> None:
    """Run ``tool`` and check that it died of SIGKILL at ``point`` (not of anything else)."""
    with pytest.raises(DistributedTestError, match="exited with code -9"):
        run_distributed(_tool, 1, args=(tool, argv, point))


def completes(tool: str, argv: list[str]) -> str:
    """Run ``tool`` to its end; returns its stderr."""
    ((code, stderr),) = run_distributed(_tool, 1, args=(tool, argv))
    assert code == 0, stderr
    return stderr


def _training(corpus, run: str, iters: int) -> list[str]:
    world = {"tok": corpus["tokenizer"]}
    return [*dense_train_flags(world), corpus["code"], "--train-iters", str(iters), "--save-interval", "1"] + [
        "--load",
        run,
        "--save",
        run,
    ]


@pytest.mark.parametrize("point", ["checkpoint-written@2", "checkpoint-renamed@2"])
def test_a_save_killed_midway_and_rerun(tmp_path, corpus, point):
    from bam_megatron.checkpoint import store

    run = str(tmp_path / "run")
    killed("pretrain_bam.py", _training(corpus, run, 2), point)
    assert store.latest_iteration(run) == 1  # iteration 1 is published, and what latest names
    store.verify_checkpoint(store.checkpoint_path(run, 1))
    completes("pretrain_bam.py", _training(corpus, run, 2))
    assert store.latest_iteration(run) == 2
    store.verify_checkpoint(store.checkpoint_path(run, 2))
    assert sorted(n for n in os.listdir(run) if n.startswith("iter_")) == ["iter_0000001", "iter_0000002"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory, corpus):
    run = str(tmp_path_factory.mktemp("seed") / "run")
    completes("pretrain_bam.py", _training(corpus, run, 1))
    return run


def test_an_upcycle_killed_midway_and_rerun(tmp_path, seed):
    from bam_megatron.checkpoint import store

    save = str(tmp_path / "btx")
    argv = ["--method", "btx", "--expert", f"a={seed}", "--expert", f"b={seed}", "--save", save]
    for point in ("checkpoint-writing", "checkpoint-written"):
        killed("bam-upcycle", argv, point)
        assert not os.path.exists(save)
    completes("bam-upcycle", argv)
    assert sorted(os.listdir(tmp_path)) == ["btx"]
    store.verify_checkpoint(store.resolve_checkpoint(save))


def test_preprocessing_killed_midway_and_rerun(tmp_path, text_corpus):
    prefix = str(tmp_path / "out" / "c")
    argv = ["--input", text_corpus.jsonl, "--tokenizer-model", text_corpus.model, "--output-prefix", prefix]
    killed("bam-preprocess-data", argv, "dataset-writing")
    assert not any(n.endswith((".bin", ".idx")) for n in os.listdir(tmp_path / "out"))
    killed("bam-preprocess-data", argv, "dataset-publishing")
    assert not os.path.exists(prefix + "_text_document.idx")  # the .bin alone is not a dataset
    completes("bam-preprocess-data", argv)
    assert sorted(os.listdir(tmp_path / "out")) == ["c_text_document.bin", "c_text_document.idx"]
    from bam_megatron.data.datasets import check_indexed_dataset

    assert len(check_indexed_dataset(prefix + "_text_document").lengths) == len(text_corpus.texts)


def test_an_export_killed_midway_and_rerun(tmp_path, seed):
    save = str(tmp_path / "hf")
    argv = ["export", "--load", seed, "--save", save]
    killed("bam-convert-hf", argv, "export-writing")
    assert not os.path.exists(save) and len(os.listdir(tmp_path)) == 1  # its temporary directory
    completes("bam-convert-hf", argv)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert os.path.isfile(os.path.join(save, "config.json"))
