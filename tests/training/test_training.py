"""pretrain_bam.py end to end on 2 gloo ranks: exact resume, crash-safe saves, preemption,
NaN/Inf handling, resharding and the refusal of a different data mixture.

Ranks are started like srun does (one process each, `bam_megatron.testing.launch`), so their
exit codes and PIDs are visible to the test.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.launch import launch
from tests.support.training import SCRIPT, base_args, last_record, logits_from_checkpoint, losses, run

TP2_DROPOUT = [
    "--tensor-model-parallel-size",
    "2",
    "--sequence-parallel",
    "--use-distributed-optimizer",
    "--hidden-dropout",
    "0.1",
    "--attention-dropout",
    "0.1",
]


def test_resume_is_bit_for_bit(tmp_path, corpus):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    codes, out = run(
        tmp_path, "straight", base_args(corpus, "--train-iters", "6", "--save", str(straight), *TP2_DROPOUT)
    )
    assert codes == [0, 0], out
    codes, out = run(
        tmp_path,
        "first",
        base_args(corpus, "--train-iters", "6", "--exit-interval", "3", "--save", str(halves), *TP2_DROPOUT),
    )
    assert codes == [0, 0], out
    codes, out = run(
        tmp_path,
        "second",
        base_args(corpus, "--train-iters", "6", "--load", str(halves), "--save", str(halves), *TP2_DROPOUT),
    )
    assert codes == [0, 0], out
    assert "resumed from" in out and "at iteration 3" in out
    reference = losses(str(straight / "metrics.jsonl"))
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert losses(str(halves / "metrics.jsonl")) == reference  # bit for bit (floats compared exactly)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, corpus):
    ckpt = tmp_path / "ckpt"
    args = base_args(corpus, "--train-iters", "6", "--save", str(ckpt), "--load", str(ckpt))
    codes, out = run(tmp_path, "first", args + ["--exit-interval", "2"])
    assert codes == [0, 0], out
    ranks = launch(
        SCRIPT, args + ["--save-interval", "4"], 2, str(tmp_path / "logs-killed"), env={"BAM_FAULT_SAVE_DELAY_S": "120"}
    )
    in_progress = ckpt / "iter_0000004.tmp"
    deadline = time.monotonic() + 180
    while not (in_progress / "metadata.json").exists():
        assert time.monotonic() < deadline, ranks.output(0)
        assert all(p.poll() is None for p in ranks.procs), ranks.output(0)
        time.sleep(0.2)
    ranks.signal(signal.SIGKILL)
    ranks.wait(30)
    assert store.latest_iteration(str(ckpt)) == 2
    assert not (ckpt / "iter_0000004").exists()
    codes, out = run(tmp_path, "resumed", args)
    assert codes == [0, 0], out
    assert "at iteration 2" in out
    assert store.latest_iteration(str(ckpt)) == 6 and not in_progress.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_with_code_3(tmp_path, corpus, signum):
    ckpt = tmp_path / "ckpt"
    ranks = launch(SCRIPT, base_args(corpus, "--train-iters", "100000", "--save", str(ckpt)), 2, str(tmp_path / "logs"))
    metrics = ckpt / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in ranks.procs), ranks.output(0)
        time.sleep(0.2)
    ranks.signal(signum)
    assert ranks.wait(120) == [3, 3], ranks.output(0)
    saved = store.latest_iteration(str(ckpt))
    assert saved is not None and saved >= 2
    assert "preemption signal received" in ranks.output(0)


def test_nan_iterations_are_skipped_and_counted(tmp_path, corpus):
    run_dir = tmp_path / "run"
    codes, out = run(
        tmp_path,
        "one-nan",
        base_args(corpus, "--train-samples", "16", "--save", str(run_dir)),
        env={"BAM_FAULT_NAN_ITERATIONS": "2"},
    )
    assert codes == [0, 0], out
    assert "iteration 2: NaN/Inf loss or gradient, update skipped" in out
    record = last_record(str(run_dir / "metrics.jsonl"))
    assert record["iteration"] == 4 and record["nan_iterations"] == 1 and record["skipped_iterations"] == 1


def test_too_many_nan_iterations_in_a_row_stop_the_run(tmp_path, corpus):
    codes, out = run(
        tmp_path,
        "nans",
        base_args(corpus, "--train-iters", "8", "--max-skipped-iterations", "3"),
        env={"BAM_FAULT_NAN_ITERATIONS": "2,3,4"},
    )
    assert codes == [4, 4], out
    assert "stopping: 3 consecutive iterations with NaN/Inf" in out


def test_resuming_with_another_mixture_is_refused_unless_overridden(tmp_path, corpus):
    ckpt = tmp_path / "ckpt"
    codes, out = run(
        tmp_path, "first", base_args(corpus, "--train-iters", "4", "--exit-interval", "2", "--save", str(ckpt)), world=1
    )
    assert codes == [0], out
    other = base_args(corpus, "--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt))
    other[other.index("0.5")] = "0.6"  # another weight for the code domain
    codes, out = run(tmp_path, "refused", other, world=1)
    assert codes == [2]
    assert "another data configuration" in out and "--override-data-fingerprint" in out
    codes, out = run(tmp_path, "overridden", other + ["--override-data-fingerprint"], world=1)
    assert codes == [0], out


def test_split_without_validation_trains_and_skips_validation(tmp_path, corpus):
    """--split 1,0,0: trained as with --eval-iters 0, said once; metrics and checkpoint meta intact."""
    ckpt = tmp_path / "ckpt"
    argv = base_args(corpus, "--train-iters", "2", "--split", "1,0,0", "--save", str(ckpt))
    argv[argv.index("--eval-interval") + 1] = "1"  # validation would be due at every iteration
    codes, out = run(tmp_path, "no-valid", argv, world=1)
    assert codes == [0], out
    assert out.count("--split 1,0,0 leaves no validation data: validation is skipped") == 1, out
    assert "validation at iteration" not in out
    kinds = [json.loads(line)["kind"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "train"]
    meta = store.read_meta(store.resolve_checkpoint(str(ckpt)))
    assert meta.iteration == 2 and meta.training["split"] == "1,0,0"


@pytest.mark.parametrize(
    "saved_with",
    [
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"],
        ["--expert-model-parallel-size", "2"],
        ["--pipeline-model-parallel-size", "2"],
    ],
    ids=["tp2", "ep2", "pp2"],
)
def test_checkpoint_reshards_to_one_rank(tmp_path, corpus, saved_with):
    ckpt = tmp_path / "ckpt"
    codes, out = run(tmp_path, "save", base_args(corpus, "--train-iters", "2", "--save", str(ckpt), *saved_with))
    assert codes == [0, 0], out
    path = store.checkpoint_path(str(ckpt), 2)
    sizes = ParallelSizes(
        tensor=2 if "--tensor-model-parallel-size" in saved_with else 1,
        pipeline=2 if "--pipeline-model-parallel-size" in saved_with else 1,
        expert=2 if "--expert-model-parallel-size" in saved_with else 1,
        sequence_parallel="--sequence-parallel" in saved_with,
    )
    as_saved = [x for x in run_distributed(logits_from_checkpoint, 2, args=(path, sizes)) if x is not None][0]
    (one_rank,) = run_distributed(logits_from_checkpoint, 1, args=(path, ParallelSizes()))
    torch.testing.assert_close(one_rank, as_saved, rtol=1e-5, atol=1e-5)
    # and training resumes from it on one rank: with the optimizer state across TP and PP; across
    # EP megatron-core cannot map optimizer state, which is refused clearly, and --finetune loads weights
    resume = base_args(
        corpus,
        "--train-iters",
        "3",
        "--load",
        str(ckpt),
        *[f for f in saved_with if f == "--use-distributed-optimizer"],
    )
    codes, out = run(tmp_path, "resume", resume, world=1)
    if sizes.expert > 1:
        assert codes == [2] and "reshards across TP, PP and DP but not EP" in out, out
        codes, out = run(tmp_path, "finetune", resume + ["--finetune"], world=1)
        assert codes == [0] and "loaded weights from" in out, out
    else:
        assert codes == [0], out
        assert "resumed from" in out


def train_and_report_changes(argv: list[str]) -> dict:
    """Rank body: which parameters a short run changed, and how many it could train."""
    from bam_megatron.training.arguments import parse_args
    from bam_megatron.training.loop import Trainer

    trainer = Trainer(parse_args(argv))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert trainer.run() == 0
    changed = sorted(name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name]))
    return {"changed": changed, "trainable": trainer.trainable, "total": trainer.total}


def test_train_only_routers(tmp_path, corpus):
    tensorboard = tmp_path / "tb"
    argv = base_args(
        corpus,
        "--train-iters",
        "2",
        "--train-only-parameters",
        r"router\.weight",
        "--tensorboard-dir",
        str(tensorboard),
    )
    (result,) = run_distributed(train_and_report_changes, 1, args=(argv,))
    assert result["changed"], "nothing trained"
    assert all(name.endswith("router.weight") for name in result["changed"]), result["changed"]
    assert {n.split(".")[-2] for n in result["changed"]} == {"router"}
    assert any("self_attention.router" in n for n in result["changed"])  # attention router
    assert any("mlp.router" in n for n in result["changed"])  # FFN router
    assert 0 < result["trainable"] < result["total"] / 100
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tensorboard))
