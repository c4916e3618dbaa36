"""The prepared GPU run (bench/gpu/): its CPU dry run produces every record, and its arithmetic is right.

The dry run (`bash bench/gpu/run.sh --dry-run`) runs every step's code on the CPU at tiny shapes
(preset tiny, sequence 64, fp32, one timed step), installs nothing and lists the wheels it would.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import run as gpu_run
from bench.gpu.measure import goals, mfu_numbers, output_layer_training_flops
from tests.support import paths

ROOT = Path(paths.REPO)

EXPECTED_KEYS = {
    "env": {
        "python",
        "torch",
        "cuda_available",
        "device",
        "packages",
        "differ_from_setup_py_pins",
        "transformer_engine",
    },
    "matmul_peak": {"peak_tflops", "peak_definition", "sizes", "dtype"},
    "gpu_train_mfu": {
        "backend",
        "variant",
        "tokens_per_s",
        "step_ms_median",
        "attention_kernels",
        "training_flops_per_token_layers",
        "training_flops_per_token_output_layer",
        "mfu_layers_only",
        "mfu_with_output_layer",
        "peak_tflops_used",
    },
    "gpu_train_mfu_goals": {"goals", "dense_mfu_with_output_layer", "bam_over_dense_mfu_with_output_layer"},
    "soft_moa_vs_loop": {"wide_ms", "loop_ms", "ratio_loop_over_wide", "attention_kernels"},
    "parallel_vs_sequential": {"parallel_ms", "sequential_ms", "ratio_sequential_over_parallel"},
    "gpu_tests": {"counts", "tests", "pytest_line"},
}


def test_mfu_arithmetic_by_hand():
    from bam_megatron.model.configs import variant_config
    from bam_megatron.model.statistics import training_flops_per_token

    # paper-590m dense, n_ctx 2048: attention 2(2·1024·1024 + 2·1024·1024) + 2·2048·1024 = 12,582,912;
    # SwiGLU 2(2·2048·1024 + 2048·1024) = 12,582,912; x 6 layers x 3 = 452,984,832
    dense = variant_config("dense", "paper-590m")
    assert training_flops_per_token(dense, 2048) == 452_984_832
    # bam (N=4, expert KV): attention 2(4·2·1024² + 4·2·1024²) + 4·2·2048·1024 = 50,331,648, FFN top-1
    # 12,582,912, routers 2(4 + 4)·1024 = 16,384: 62,930,944 per layer, x 18 = 1,132,756,992
    assert training_flops_per_token(variant_config("bam", "paper-590m"), 2048) == 1_132_756_992
    # the output layer: 3 x 2 x 1024 x 256,000
    assert output_layer_training_flops(1024, 256_000) == 1_572_864_000
    numbers = mfu_numbers(100_000, 452_984_832, 1_572_864_000, 800e12)
    assert numbers["mfu_layers_only"] == pytest.approx(0.056623104)  # 4.5298e13 / 8e14
    assert numbers["mfu_with_output_layer"] == pytest.approx(0.253231104)  # 2.0258e14 / 8e14
    assert numbers["achieved_tflops_with_output_layer"] == pytest.approx(202.5848832)
    assert numbers["training_flops_per_token_with_output_layer"] == 2_025_848_832

    records = [
        {"status": "ok", "variant": "dense", "mfu_with_output_layer": 0.5, "mfu_layers_only": 0.2, "tokens_per_s": 10},
        {"status": "ok", "variant": "bam", "mfu_with_output_layer": 0.46, "mfu_layers_only": 0.3, "tokens_per_s": 4},
    ]
    checked = goals(records)
    assert checked["dense_mfu_goal_met"] and checked["bam_over_dense_goal_met"]
    assert checked["bam_over_dense_mfu_with_output_layer"] == pytest.approx(0.92)
    assert checked["bam_over_dense_mfu_layers_only"] == pytest.approx(1.5)
    assert checked["bam_over_dense_tokens_per_s"] == pytest.approx(0.4)
    records[0]["mfu_with_output_layer"] = 0.44
    assert not goals(records)["dense_mfu_goal_met"]


def test_wheels_are_picked_by_pin_and_python_tag(tmp_path):
    pins = gpu_run.read_pins()
    assert pins == [("megatron-core", "0.16.1")]
    cp312 = "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
    for name in (cp312, "megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl", "numpy-2.4.6-x.whl"):
        (tmp_path / name).touch()
    found, problems = gpu_run.find_wheels(str(tmp_path), pins)
    assert [os.path.basename(f) for f in found] == [cp312] and problems == []
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_17_x86_64.whl").touch()  # two: refused
    found, problems = gpu_run.find_wheels(str(tmp_path), pins)
    assert found == [] and "2 cp312 wheels" in problems[0]


def test_a_bench_scripts_report_is_parsed():
    text = 'noise\n{\n  "a": 1\n}\nfirst: summary\n{\n  "b": {\n    "c": 2\n  }\n}\nlast: summary\n'
    assert gpu_run.parse_report(text) == ({"b": {"c": 2}}, "last: summary")
    assert gpu_run.parse_report("no record") == (None, None)


def test_without_cuda_the_real_run_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    done = subprocess.run(
        [sys.executable, "bench/gpu/run.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "pass --dry-run" in done.stderr


def test_dry_run_produces_every_record(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["log.txt", "records.jsonl", "results.json", "summary.md"]  # the device returns at most 8
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] is True

    steps = results["steps"]
    assert set(steps) == set(gpu_run.STEPS)
    install = steps["install"]
    assert install["status"] == "skipped" and install["pins"] == ["megatron-core==0.16.1"]
    assert install["expected_wheels"] == ["megatron_core-0.16.1-*-cp312-*.whl"]
    for flag in ("--no-index", "--no-deps", "--target"):
        assert flag in install["would_run"]
    for step, outcome in steps.items():
        assert outcome["status"] in (("skipped",) if step == "install" else ("ok", "skipped")), (step, outcome)

    records = results["records"]
    for part in ("env", "matmul_peak", "soft_moa_vs_loop", "parallel_vs_sequential", "gpu_tests"):
        ok = [r for r in records[part] if r["status"] == "ok"]
        assert ok and EXPECTED_KEYS[part] <= set(ok[0]), (part, records[part])
    assert records["gpu_tests"][0]["counts"]["deselected"] == 2  # the gpu tier, on a CPU

    train = {(r["backend"], r.get("variant")): r for r in records["train_mfu"] if r["bench"] == "gpu_train_mfu"}
    for variant in ("dense", "btx", "bam"):
        r = train[("local", variant)]
        assert r["status"] == "ok" and EXPECTED_KEYS["gpu_train_mfu"] <= set(r)
        flops = r["training_flops_per_token_layers"] + r["training_flops_per_token_output_layer"]
        assert r["mfu_with_output_layer"] == pytest.approx(r["tokens_per_s"] * flops / (r["peak_tflops_used"] * 1e12))
        assert r["peak_tflops_used"] == pytest.approx(records["matmul_peak"][0]["peak_tflops"])
    # tiny dense, n_ctx 64: attention 2(2·64·64 + 2·64·32) + 2·64·64 = 32,768, FFN 2(2·128·64 + 128·64)
    # = 49,152; x 2 layers x 3 = 491,520; output layer 3 x 2 x 64 x 512 = 196,608
    assert train[("local", "dense")]["training_flops_per_token_layers"] == 491_520
    assert train[("local", "dense")]["training_flops_per_token_output_layer"] == 196_608
    if ("te", None) in train:  # Transformer Engine absent: the TE spec is skipped with the reason
        assert train[("te", None)]["status"] == "skipped" and "Transformer Engine" in train[("te", None)]["reason"]
    (goal,) = [r for r in records["train_mfu"] if r["bench"] == "gpu_train_mfu_goals"]
    assert EXPECTED_KEYS["gpu_train_mfu_goals"] <= set(goal)

    (decode,) = records["decode_latency"]
    if (ROOT / "bench" / "decode_latency.py").exists():
        assert decode["status"] == "ok" and decode["arguments"] == ["--help"]
    else:
        assert decode["status"] == "skipped" and "not in this checkout" in decode["reason"]

    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary and "| local | bam |" in summary
    assert summary.strip().splitlines()[-1] in done.stdout  # the table is printed last


def test_out_of_memory_halves_the_micro_batch(monkeypatch):
    import torch

    from bench.gpu import measure

    seen = []

    def fake_train_one(settings, backend, variant, peak):
        seen.append(settings.micro_batch)
        if settings.micro_batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"status": "ok", "micro_batch": settings.micro_batch}

    monkeypatch.setattr(measure, "_train_one", fake_train_one)
    settings = measure.Settings.for_run(dry_run=False)
    record = measure._train_with_retry(settings, "local", "bam", 1e15)
    assert seen == [4, 2, 1] and record["status"] == "ok" and "micro-batch 4, 2 ran out" in record["note"]
    monkeypatch.setattr(measure, "_train_one", lambda *a: 1 / 0)  # any other error: one record, no retry
    record = measure._train_with_retry(settings, "local", "bam", 1e15)
    assert record["status"] == "failed" and record["error"].startswith("ZeroDivisionError")
