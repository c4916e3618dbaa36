"""bam-eval end to end on tiny checkpoints trained by pretrain_bam.py (a dense seed, a BAM model with
top-2 FFN routing, and a dense model with another tokenizer).

The perplexities are checked against exp(mean token loss) computed here independently (the model
called directly on all samples at once, torch's cross-entropy on its logits); the routing means
against the routers' outputs captured here; a 2-rank run (TP=2 + sequence parallelism) against the
1-rank run; and bad input against the one-line error contract.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bam_megatron.checkpoint import store
from bam_megatron.evaluation.cli import main
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.launch import launch
from tests.support import paths
from tests.support.megatron_lm import megatron_lm_args, save_as_megatron_lm
from tests.support.training import SCRIPT, base_args

ROOT = paths.REPO
EVAL = os.path.join(ROOT, "tools", "eval.py")
DOMAINS = ["code", "law", "math"]
SAMPLES = 5  # with --micro-batch-size 2 the last micro-batch is half padding
EXPERTS = ["seed", "code", "law", "math"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, corpus):
    """{'seed': dense, 'bam': bam (top-2 FFN), 'other': dense with another tokenizer}: --save dirs."""
    root = tmp_path_factory.mktemp("eval-checkpoints")
    jobs = {}
    for name, variant, tokenizer, extra in (
        ("seed", "dense", "tokenizer", []),
        ("bam", "bam", "tokenizer", ["--moe-router-topk", "2"]),
        ("other", "dense", "other_tokenizer", []),
    ):
        args = base_args(corpus, "--train-iters", "2", "--save", str(root / name), *extra)
        args[args.index("--variant") + 1] = variant
        args[args.index("--tokenizer-model") + 1] = corpus[tokenizer]
        jobs[name] = launch(SCRIPT, args, 1, str(root / f"logs-{name}"))
    for ranks in jobs.values():
        assert ranks.wait(240) == [0], ranks.output(0)
    return {name: str(root / name) for name in jobs}


def eval_args(corpus, checkpoints, output_dir, *models: str) -> list[str]:
    models = models or ("seed", "bam")
    return [
        *[f for m in models for f in ("--model", f"{m}={checkpoints[m]}")],
        "--data-path",
        *[corpus[d] for d in DOMAINS],
        "--eval-samples",
        str(SAMPLES),
        "--micro-batch-size",
        "2",
        "--expert-names",
        *EXPERTS,
        "--output-dir",
        str(output_dir),
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, corpus, checkpoints):
    """One plain `python tools/eval.py` run (no torchrun variables: a world of one); the seed given
    by its --save directory, bam by its iter_* directory."""
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    paths = dict(checkpoints, bam=store.checkpoint_path(checkpoints["bam"], 2))
    proc = subprocess.run(
        [sys.executable, EVAL, *eval_args(corpus, paths, output_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    read = lambda name: json.loads((output_dir / name).read_text())  # noqa: E731
    return {
        "stdout": proc.stdout,
        "dir": output_dir,
        "perplexity": read("perplexity.json"),
        "routing": read("routing.json"),
    }


def reference(paths: dict[str, str], prefixes: list[str], samples: int, cache: str) -> dict:
    """Rank body: per model and domain, exp(mean token loss) over the first ``samples`` validation
    samples, computed directly (no schedule, one batch, torch cross-entropy), and the routers' mean
    outputs captured by hooks."""
    import torch.nn.functional as F

    from bam_megatron.checkpoint.models import load_model
    from bam_megatron.data.datasets import TokenIds, build_datasets, parse_data_path
    from bam_megatron.data.tokenizer import load_tokenizer
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    first = store.read_meta(next(iter(paths.values())))
    tok = load_tokenizer(first.tokenizer_model)
    # the validation parts exactly as training builds them
    _, valid = build_datasets(
        parse_data_path(prefixes),
        first.training["split"],
        first.seq_length,
        first.training["seed"],
        1,
        1,
        TokenIds.of(tok),
        cache,
    )
    batches = {}
    for domain, dataset in valid.items():
        assert len(dataset) >= samples
        items = [dataset[i] for i in range(samples)]
        batches[domain] = {
            k: torch.stack([torch.as_tensor(s[k]) for s in items]) for k in ("tokens", "labels", "loss_mask")
        }
    out = {}
    for name, path in paths.items():
        model = load_model(path)
        captured = {"attention_gates": {}, "ffn_selection": {}}
        for i, layer in enumerate(model.decoder.layers):
            if hasattr(layer.self_attention, "router"):
                layer.self_attention.router.register_forward_hook(
                    lambda m, a, gates, i=i, captured=captured: captured["attention_gates"].__setitem__(i, gates)
                )
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.register_forward_hook(
                    lambda m, a, output, i=i, captured=captured: captured["ffn_selection"].__setitem__(i, output[1])
                )
        out[name] = {"perplexity": {}, "attention_gates": {}, "ffn_selection": {}}
        for domain, batch in batches.items():
            tokens = batch["tokens"]
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            with torch.no_grad():
                logits = model(tokens, positions, None)  # [b, s, padded vocab]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten().float()
            out[name]["perplexity"][domain] = math.exp(float((losses * mask).sum() / mask.sum()))
            token_mask = batch["loss_mask"].t().float()  # [s, b], as the routers see tokens
            for kind, per_layer in captured.items():
                if per_layer:
                    out[name][kind][domain] = [
                        (per_layer[i].double().reshape(-1, per_layer[i].shape[-1]) * token_mask.reshape(-1, 1)).sum(0)
                        / token_mask.sum()
                        for i in sorted(per_layer)
                    ]
    return out


def test_perplexity_table_rows_columns_and_average(evaluated):
    data = evaluated["perplexity"]
    assert data["domains"] == DOMAINS and list(data["models"]) == ["seed", "bam"]
    assert data["samples"] == {d: SAMPLES for d in DOMAINS}
    assert data["tokens"] == {d: SAMPLES * 32 for d in DOMAINS}  # --seq-length 32 from the checkpoint
    lines = (evaluated["dir"] / "perplexity.md").read_text().splitlines()
    header = lines.index("| model | code | law | math | average |")
    assert lines[header + 1] == "|---|---:|---:|---:|---:|"
    for offset, model in enumerate(["seed", "bam"], start=2):
        row = data["models"][model]["perplexity"]
        assert row["average"] == pytest.approx(sum(row[d] for d in DOMAINS) / 3)
        assert row["average"] != pytest.approx(math.exp(sum(math.log(row[d]) for d in DOMAINS) / 3))
        cells = [f"{row[d]:.2f}" for d in [*DOMAINS, "average"]]
        assert lines[header + offset] == f"| {model} | " + " | ".join(cells) + " |"
        assert lines[header + offset] in evaluated["stdout"]  # printed too
        for d in DOMAINS:
            assert row[d] == pytest.approx(math.exp(data["models"][model]["loss"][d]), rel=1e-12)
    assert data["models"]["bam"]["variant"] == "bam" and data["models"]["seed"]["iteration"] == 2
    assert [os.path.basename(data["models"][m]["checkpoint"]) for m in ("seed", "bam")] == ["iter_0000002"] * 2
    assert "seed | code: 5 samples, 160 tokens" in evaluated["stdout"] and "samples/s" in evaluated["stdout"]
    assert not [n for n in os.listdir(evaluated["dir"]) if ".tmp" in n]


def test_perplexity_is_exp_of_mean_token_loss(evaluated, checkpoints, corpus, tmp_path):
    paths = {m: store.checkpoint_path(checkpoints[m], 2) for m in ("seed", "bam")}
    (expected,) = run_distributed(reference, 1, args=(paths, [corpus[d] for d in DOMAINS], SAMPLES, str(tmp_path)))
    for model in paths:
        got = evaluated["perplexity"]["models"][model]["perplexity"]
        for d in DOMAINS:
            assert got[d] == pytest.approx(expected[model]["perplexity"][d], rel=1e-5), (model, d)
    # the models differ, so a table that mixed them up would fail
    assert expected["seed"]["perplexity"]["code"] != pytest.approx(expected["bam"]["perplexity"]["code"], rel=1e-5)
    routing = evaluated["routing"]["models"]["bam"]
    for kind in ("attention_gates", "ffn_selection"):
        for d in DOMAINS:
            torch.testing.assert_close(
                torch.tensor(routing[kind][d], dtype=torch.float64),
                torch.stack(expected["bam"][kind][d]),
                rtol=1e-6,
                atol=1e-6,
            )


def test_routing_json_and_heatmaps(evaluated):
    routing = evaluated["routing"]
    assert list(routing["models"]) == ["bam"]  # the dense seed has no routing section
    bam = routing["models"]["bam"]
    assert bam["expert_names"] == EXPERTS and bam["moe_router_topk"] == 2 and bam["num_layers"] == 2
    for d in DOMAINS:
        assert len(bam["attention_gates"][d]) == 2 and len(bam["ffn_selection"][d]) == 2
        for gates, shares in zip(bam["attention_gates"][d], bam["ffn_selection"][d]):
            assert len(gates) == len(shares) == 4
            assert sum(gates) == pytest.approx(1.0, abs=1e-6)  # mean gates (fp32 softmax): a distribution
            assert sum(shares) == pytest.approx(2.0, abs=1e-9)  # every token picks top-2 experts
            assert all(0.0 <= s <= 1.0 for s in shares)
    figure = evaluated["dir"] / bam["figure"]
    data = figure.read_bytes()
    assert figure.name == "routing_bam.png" and data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert str(figure) in evaluated["stdout"]


def test_tensor_and_sequence_parallel_run_matches_one_rank(evaluated, corpus, checkpoints, tmp_path):
    output_dir = tmp_path / "out"
    args = eval_args(corpus, checkpoints, output_dir) + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    ranks = launch(EVAL, args, 2, str(tmp_path / "logs"))
    assert ranks.wait(240) == [0, 0], ranks.output(0)
    assert "| seed |" in ranks.output(0) and "| seed |" not in ranks.output(1)  # only rank 0 reports
    got = json.loads((output_dir / "perplexity.json").read_text())
    for model, entry in evaluated["perplexity"]["models"].items():
        for d in [*DOMAINS, "average"]:
            assert got["models"][model]["perplexity"][d] == pytest.approx(entry["perplexity"][d], rel=1e-5)
    routing = json.loads((output_dir / "routing.json").read_text())["models"]["bam"]
    for kind in ("attention_gates", "ffn_selection"):
        for d in DOMAINS:
            torch.testing.assert_close(
                torch.tensor(routing[kind][d]), torch.tensor(evaluated["routing"]["models"]["bam"][kind][d])
            )


def _evaluate_megatron_lm_null_tokenizer(save: str, argv: list[str]) -> tuple[int, str]:
    """Rank body: a Megatron-LM checkpoint trained on pre-tokenized data (NullTokenizer, 320 padded
    rows), then bam-eval of it without --seed, --split or --micro-batch-size: (exit code, stdout)."""
    import contextlib
    import io

    from megatron.core import parallel_state

    args = megatron_lm_args(tokenizer_type="NullTokenizer", tokenizer_model=None, vocab_size=319, padded_vocab_size=320)
    save_as_megatron_lm(save, args, 3)
    parallel_state.destroy_model_parallel()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_megatron_lm_checkpoint_on_token_ids_evaluates_with_the_tokenizer_given(corpus, tmp_path):
    """NullTokenizer + --tokenizer-model that fits: accepted; no recorded seed: Megatron-LM's 1234, said once."""
    save, output_dir = str(tmp_path / "megatron-lm"), tmp_path / "out"
    argv = ["--model", f"mlm={save}", "--data-path", corpus["code"], "--tokenizer-model", corpus["tokenizer"]]
    argv += ["--eval-samples", "2", "--output-dir", str(output_dir)]
    ((code, out),) = run_distributed(_evaluate_megatron_lm_null_tokenizer, 1, args=(save, argv))
    assert code == 0, out
    note = (
        "model mlm records no --seed, --split, --micro-batch-size (it was not trained here): "
        "using --seed 1234, --split 969,30,1, --micro-batch-size 4"
    )
    assert out.count(note) == 1, out
    data = json.loads((output_dir / "perplexity.json").read_text())
    assert (data["seed"], data["split"], data["samples"]) == (1234, "969,30,1", {"code": 2})
    assert 1.0 < data["models"]["mlm"]["perplexity"]["code"] < 1000.0


@pytest.mark.parametrize("case", ["other-tokenizer", "missing-checkpoint", "missing-dataset", "expert-names"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, corpus, checkpoints, tmp_path, capsys):
    output_dir = tmp_path / "out"
    models = ("seed", "other") if case == "other-tokenizer" else ("seed",)
    args = eval_args(corpus, checkpoints, output_dir, *models)
    if case == "missing-checkpoint":
        args[args.index("--model") + 1] = f"seed={tmp_path / 'nowhere'}"
    elif case == "missing-dataset":
        args[args.index("--data-path") + 1] = str(tmp_path / "missing_text_document")
    elif case == "expert-names":
        args = eval_args(corpus, checkpoints, output_dir, "bam")
        args[args.index("--expert-names") + 1 : args.index("--expert-names") + 5] = ["a", "b", "c"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("bam-eval: error: "), err
    expected = {
        "other-tokenizer": "model other (",
        "missing-checkpoint": f"checkpoint not found: {tmp_path / 'nowhere'}",
        "missing-dataset": f"dataset file not found: {tmp_path / 'missing_text_document.idx'}",
        "expert-names": "--expert-names gives 3 names, but model bam has 4 experts",
    }[case]
    assert expected in err
    if case == "other-tokenizer":
        assert "another tokenizer than model seed" in err
    assert not output_dir.exists()
