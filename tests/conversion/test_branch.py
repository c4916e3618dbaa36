"""tools/branch.py: expert runs linked from the seed, with lineage and phase-2 flags that work."""

from __future__ import annotations

import json
import os

import pytest

from bam_megatron.checkpoint import store
from bam_megatron.cli.branch import main as branch_main
from bam_megatron.training.arguments import parse_args
from tests.support.training import base_args, run


@pytest.fixture(scope="module")
def seed(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("seed")
    args = base_args(corpus, "--train-iters", "2", "--save", str(root / "seed"), "--lr", "4e-3")
    args[args.index("--variant") + 1] = "dense"
    codes, out = run(root, "seed", args, world=1)
    assert codes == [0], out
    return str(root / "seed")


def branch_argv(corpus, seed: str, out: str) -> list[str]:
    return [
        "--seed-checkpoint",
        seed,
        "--output-dir",
        out,
        "--experts",
        "code",
        "math",
        "--domain-data",
        f"code={corpus['code']}",
        f"math={corpus['math']}",
        "--general-data",
        corpus["law"],
    ]


def test_branch_links_the_seed_and_writes_working_phase2_flags(tmp_path, corpus, seed):
    out = tmp_path / "experts"
    assert branch_main(branch_argv(corpus, seed, str(out))) == 0
    seed_dir = store.resolve_checkpoint(seed)
    for name, domain in (("code", "code"), ("math", "math")):
        run_dir = out / name
        init = store.resolve_checkpoint(str(run_dir / "init"))
        for file in os.listdir(seed_dir):  # the same bytes on disk: hard links, nothing copied
            assert os.path.samefile(os.path.join(seed_dir, file), os.path.join(init, file))
        lineage = json.loads((run_dir / "lineage.json").read_text())
        assert lineage["seed"]["iteration"] == 2 and lineage["seed"]["hash"] == store.checkpoint_hash(seed_dir)
        flags = parse_args([f"@{run_dir / 'phase2.args'}", "--train-iters", "3"])
        assert flags.data_path == ["0.9", corpus[domain], "0.1", corpus["law"]]
        assert flags.lr == pytest.approx(2e-3) and flags.min_lr == pytest.approx(2e-4)
        assert flags.pretrained_checkpoint == str(run_dir / "init")
        assert flags.load == flags.save == str(run_dir / "ckpt")
        # the architecture is the seed checkpoint's, not the flags'; training settings are inherited
        assert (flags.variant, flags.hidden_size, flags.seq_length, flags.preset) == (None, None, None, None)
        assert flags.tokenizer_model == corpus["tokenizer"] and flags.micro_batch_size == 2
    codes, log = run(tmp_path, "phase2", [f"@{out / 'code' / 'phase2.args'}", "--train-iters", "1"], world=1)
    assert codes == [0], log
    assert f"loaded weights from {store.resolve_checkpoint(str(out / 'code' / 'init'))}" in log
    assert store.latest_iteration(str(out / "code" / "ckpt")) == 1
    expert = store.read_meta(store.resolve_checkpoint(str(out / "code" / "ckpt")))
    seed_meta = store.read_meta(seed_dir)
    assert (expert.architecture, expert.seq_length) == (seed_meta.architecture, 32)


@pytest.mark.parametrize("case", ["missing-domain", "bad-general-data", "exists", "not-a-checkpoint"])
def test_bad_input_writes_nothing(tmp_path, corpus, seed, capsys, case):
    out = tmp_path / "experts"
    argv = branch_argv(corpus, seed, str(out))
    expected = {
        "missing-domain": "missing math",
        "bad-general-data": "dataset file not found",
        "exists": "already exists",
        "not-a-checkpoint": "--seed-checkpoint: no checkpoint at",
    }[case]
    if case == "missing-domain":
        argv.remove(f"math={corpus['math']}")
    elif case == "bad-general-data":
        argv[argv.index("--general-data") + 1] = str(tmp_path / "nothing")
    elif case == "exists":
        (out / "math").mkdir(parents=True)
    elif case == "not-a-checkpoint":
        argv[1] = str(tmp_path)
    assert branch_main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and expected in error[0]
    assert not (out / "code").exists()
