"""pretrain_bam.py's --load never loses a run: an iter_* directory is loaded, not ignored; a file or a
run without its latest file is refused; a finished run resumed is a no-op; data tokenized with
another vocabulary is refused before the first step."""

from __future__ import annotations

import os
import shutil

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from bam_megatron.checkpoint import store
from tests.support import paths
from tests.support.training import base_args, run

FIXTURE = os.path.join(paths.FIXTURES, "v1", "dense")
MOCK = ["--mock-data", "--vocab-size", "100", "--micro-batch-size", "2", "--eval-iters", "0", "--log-interval", "1"]


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "error:" in line]


def _run_copy(tmp_path) -> str:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)  # a finished 2-iteration run
    return str(run_dir)


def test_an_iter_directory_as_load_resumes_from_it(tmp_path):
    run_dir = _run_copy(tmp_path)
    argv = [*MOCK, "--train-iters", "3", "--load", store.checkpoint_path(run_dir, 2), "--save", run_dir]
    codes, log = run(tmp_path, "iter", argv, world=1)
    assert codes == [0], log
    assert "resumed from" in log and "at iteration 2" in log and "starting from scratch" not in log, log
    assert (
        store.latest_iteration(run_dir) == 3
        and store.read_meta(store.checkpoint_path(run_dir, 3)).consumed_samples == 6
    )


def test_a_finished_run_resumed_is_a_no_op(tmp_path):
    run_dir = _run_copy(tmp_path)
    before = os.stat(store.checkpoint_path(run_dir, 2)).st_ino
    codes, log = run(tmp_path, "finished", [*MOCK, "--train-iters", "2", "--load", run_dir, "--save", run_dir], world=1)
    assert codes == [0] and "the run is finished, nothing to do" in log, log
    assert store.latest_iteration(run_dir) == 2
    assert os.stat(store.checkpoint_path(run_dir, 2)).st_ino == before  # not saved again
    assert sorted(os.listdir(run_dir)) == ["iter_0000002", store.LATEST]


def test_load_of_a_file_or_of_a_run_without_its_latest_file_is_refused(tmp_path):
    run_dir = _run_copy(tmp_path)
    save = str(tmp_path / "new")
    a_file = os.path.join(run_dir, store.LATEST)
    codes, log = run(tmp_path, "file", [*MOCK, "--train-iters", "3", "--load", a_file, "--save", save], world=1)
    errors = _error_lines(log)
    assert codes == [2] and len(errors) == 1 and f"--load {a_file} is a file" in errors[0], log
    os.remove(a_file)  # the latest file lost: the run must not restart from scratch over it
    codes, log = run(tmp_path, "latest", [*MOCK, "--train-iters", "3", "--load", run_dir, "--save", run_dir], world=1)
    errors = _error_lines(log)
    assert codes == [2] and len(errors) == 1 and "holds iter_0000002 but no latest_checkpointed" in errors[0], log
    assert not os.path.exists(save) and sorted(os.listdir(run_dir)) == ["iter_0000002"]


def test_data_tokenized_with_a_larger_vocabulary_is_refused(tmp_path, corpus):
    prefix = str(tmp_path / "big_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for start in range(0, 4000, 40):  # token ids up to 3999; the tokenizer has far fewer
        builder.add_document(numpy.arange(start, start + 40), [40])
    builder.finalize(prefix + ".idx")
    argv = base_args(corpus, "--train-iters", "1", "--save", str(tmp_path / "out"))
    start = argv.index("--data-path") + 1
    argv[start : start + 6] = [prefix]
    codes, log = run(tmp_path, "vocab", argv, world=1)
    errors = _error_lines(log)
    assert codes == [2] and len(errors) == 1, log
    assert f"dataset {prefix} holds token id 3999, but the tokenizer has" in errors[0], log
    assert not os.path.exists(tmp_path / "out")


def _resave_interrupted(root: str) -> dict:
    """Rank body: save iteration 1, then save it again and fail between the two renames."""
    from bam_megatron.checkpoint import CheckpointError, CheckpointMeta
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    architecture = Architecture("dense", 1, 16, 32, 2, 2, 64)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), 8)
    store.save_checkpoint(root, 1, model, None, None, CheckpointMeta(architecture, 8))
    first = os.stat(os.path.join(store.checkpoint_path(root, 1), "metadata.json")).st_ino
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new copy's rename into place
            raise OSError("simulated crash")
        return real_replace(src, dst)

    os.replace = failing_replace
    try:
        store.save_checkpoint(root, 1, model, None, None, CheckpointMeta(architecture, 8))
    except OSError:
        pass
    finally:
        os.replace = real_replace
    try:
        store.latest_iteration(root)
        message = None
    except CheckpointError as error:
        message = str(error)
    kept = os.path.join(store.checkpoint_path(root, 1) + store.REPLACED, "metadata.json")
    return {"message": message, "kept_first": os.path.exists(kept) and os.stat(kept).st_ino == first}


def test_saving_an_iteration_again_never_removes_the_old_copy_first(tmp_path):
    from bam_megatron.testing.distributed import run_distributed

    (result,) = run_distributed(_resave_interrupted, 1, args=(str(tmp_path / "run"),))
    assert result["kept_first"]  # the published copy survived the interrupted replacement
    assert "a save that replaced it was interrupted" in result["message"] and store.REPLACED in result["message"]
