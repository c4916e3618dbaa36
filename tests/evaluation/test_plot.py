"""`bam-eval plot`: loss curves of two runs' metrics files (written by the training loop's own
MetricsWriter), what each panel draws, and one-line errors for missing or garbled files."""

from __future__ import annotations

import os

import pytest
from matplotlib.image import imread

from bam_megatron.cli.eval import main as bam_eval
from bam_megatron.errors import UserError
from bam_megatron.evaluation.plot import loss_figure, read_metrics
from bam_megatron.training.metrics import MetricsWriter

DOMAINS = ("code", "law")


def _train_record(iteration: int, loss: float, router: bool) -> dict:
    record = {
        "iteration": iteration,
        "train_iters": 6,
        "consumed_samples": 2 * iteration,
        "ms_per_iteration": 50.0,
        "tokens_per_second": 1000.0,
        "tflops_per_device": 1e-4,
        "learning_rate": 1e-3,
        "global_batch_size": 2,
        "lm_loss": loss,
        "grad_norm": 1.0,
        "router_losses": {},
        "router_losses_per_layer": {},
        "skipped_iterations": 0,
        "nan_iterations": 0,
    }
    if router:  # as the loop logs them: the interval's layer mean, and the last step per layer
        per_layer = {"load_balancing_loss": [1.0 + 0.01 * iteration, 1.1], "z_loss": [2.0, 2.0 - 0.01 * iteration]}
        record["router_losses"] = {name: sum(v) / len(v) for name, v in per_layer.items()}
        record["router_losses_per_layer"] = per_layer
    return record


def write_run(directory, router: bool, iterations=range(1, 7), offset: float = 0.0) -> str:
    """A --save directory with a metrics.jsonl: a training record per iteration, validation every 2."""
    os.makedirs(directory, exist_ok=True)
    writer = MetricsWriter(None, str(directory / "metrics.jsonl"))
    for i in iterations:
        writer.training(_train_record(i, 6.0 - 0.1 * i + offset, router))
        if i % 2 == 0:
            writer.validation(i, {d: 5.5 - 0.1 * i + offset + 0.05 * k for k, d in enumerate(DOMAINS)})
    writer.close()
    return str(directory)


def _lines(figure) -> dict[str, list[str]]:
    """Panel title -> the labels of its lines."""
    return {ax.get_title().split("\n")[0]: [line.get_label() for line in ax.get_lines()] for ax in figure.axes}


def test_two_runs_make_one_png_with_a_line_per_run_in_each_panel(tmp_path, capsys):
    dense = write_run(tmp_path / "dense", router=False)
    btx = write_run(tmp_path / "btx", router=True, offset=0.2)
    output = tmp_path / "loss.png"
    assert bam_eval(["plot", dense, f"moe={btx}/metrics.jsonl", "--output", str(output), "--title", "t"]) == 0
    assert f"wrote {output} (2 runs: dense, moe)" in capsys.readouterr().out
    image = imread(str(output))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert open(output, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    figure = loss_figure([read_metrics(dense), read_metrics(btx, "moe")])
    assert _lines(figure) == {
        "training loss": ["dense", "moe"],
        "validation loss (mean over domains)": ["dense", "moe"],
        "load-balancing loss": ["moe"],  # the dense run has no router
        "router z-loss": ["moe"],
    }
    train, validation = figure.axes[0].get_lines()[1], figure.axes[1].get_lines()[1]
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(train.get_ydata()) == pytest.approx([6.1, 6.0, 5.9, 5.8, 5.7, 5.6])
    assert list(validation.get_xdata()) == [2, 4, 6]
    assert list(validation.get_ydata()) == pytest.approx([5.525 - 0.2 * k for k in range(3)])


def test_per_domain_and_per_layer_lines(tmp_path):
    run = read_metrics(write_run(tmp_path / "bam", router=True), "bam")
    lines = _lines(loss_figure([run], per_domain=True, per_layer=True))
    assert lines["validation loss, per domain"] == ["bam code", "bam law"]
    assert lines["load-balancing loss"] == ["bam layer 0", "bam layer 1"]
    assert lines["router z-loss"] == ["bam layer 0", "bam layer 1"]
    assert list(run.curve("z_loss/layer 1")[1]) == pytest.approx([2.0 - 0.01 * i for i in range(1, 7)])


def test_a_resumed_run_keeps_the_last_record_of_each_iteration(tmp_path):
    directory = write_run(tmp_path / "run", router=False, iterations=range(1, 5))
    write_run(tmp_path / "run", router=False, iterations=range(3, 7), offset=1.0)  # resumed at 2: appends
    iterations, losses = read_metrics(directory).curve("lm_loss")
    assert iterations == [1, 2, 3, 4, 5, 6]
    assert losses == pytest.approx([5.9, 5.8, 6.7, 6.6, 6.5, 6.4])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics file {path} does not exist"),
        ('{"kind": "train", "iteration": 1, "lm_loss": 5.0}\n{"kind": "tr', "metrics file {path} line 2: not JSON"),
        ('{"kind": "valid", "iteration": 2, "loss": 5.0}\n', "line 1: a 'valid' record needs 'loss'"),
        ('{"kind": "train", "lm_loss": 5.0}\n', "line 1: a 'train' record needs an integer 'iteration'"),
        ('{"kind": "train", "iteration": 1, "lm_loss": "low"}\n', "line 1: 'lm_loss' must be a number"),
        ("[1, 2]\n", "line 1: expected a JSON object, got list"),
        ("\n", "metrics file {path} has no 'train' or 'valid' records"),
        (b"\xff\xfe\x00", "metrics file {path} is not UTF-8 text"),
    ],
)
def test_a_missing_or_garbled_metrics_file_is_one_error_line(tmp_path, capsys, content, message):
    good = write_run(tmp_path / "good", router=False)
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "loss.png"
    assert bam_eval(["plot", good, str(path), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bam-eval plot: error: ") and err.count("\n") == 1
    assert message.format(path=path) in err
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["good"] + (["bad.jsonl"] if content is not None else []))


def test_bad_runs_and_outputs_are_refused(tmp_path, capsys):
    good = write_run(tmp_path / "a", router=False)
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty")], "holds no metrics.jsonl"),
        ([good, good], "run names must be unique (give NAME=RUN); repeated: a"),
        ([good, "--output", str(tmp_path)], "is a directory"),
        ([good, "--output", str(tmp_path / "missing" / "x.png")], "does not exist"),
    ]
    for argv, message in cases:
        assert bam_eval(["plot", *argv]) == 2, argv
        assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        read_metrics(str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path)) == ["a", "empty"]
