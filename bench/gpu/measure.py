"""The measurements of the prepared GPU run (bench/gpu/run.py runs them; docs/benchmarks.md, "GPU run").

Each part is one function that prints a JSON record and a one-line summary (`bench.common.report`)
and appends ``{"part", "record", "summary"}`` as one JSON line to ``--records``, so a part that
runs out of time keeps what it finished:

- ``env``: Python, torch, CUDA, the GPU, the packages used (and where they differ from setup.py's
  pins), whether Transformer Engine imports;
- ``matmul_peak``: the bf16 ``torch.matmul`` rate (median of timed repeats, CUDA events, random
  data), the denominator of every MFU here;
- ``train_mfu``: pretrain_bam.py's training step (megatron-core schedule, DDP, Adam, mock data) of
  dense, BTX and BAM at paper-590m shapes, sequence 2048, bf16: tokens/s and MFU, on the local spec
  (PyTorch SDPA, flash kernels forced) and, where Transformer Engine imports, the TE spec;
- ``soft_moa_vs_loop``: soft MoA as one wide attention vs the loop over N attentions, fwd+bwd;
- ``parallel_vs_sequential``: the parallel vs the sequential dense block, fwd+bwd of one layer.

MFU = tokens/s x training FLOPs per token / the measured bf16 matmul rate. FLOPs per token:
`bam_megatron.model.statistics.training_flops_per_token` (docs/design.md section 6: 3 x forward x
layers, output layer excluded), reported as is (``mfu_layers_only``) and with the output layer's
3 x 2·d·V added (`output_layer_training_flops`, from the same module; ``mfu_with_output_layer``:
every matrix multiply a token costs, Megatron-LM's count, the number to compare with other MFUs).

``--dry-run`` runs every part's code on the CPU at tiny shapes (preset tiny, sequence 64, fp32,
1 timed step): what tests/bench/test_gpu_bench.py checks.

    python bench/gpu/measure.py env matmul_peak train_mfu --records /tmp/records.jsonl [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bam_megatron.model.statistics import output_layer_training_flops  # noqa: E402  (no torch)
from bench.common import report  # noqa: E402

PARTS = ("env", "matmul_peak", "train_mfu", "soft_moa_vs_loop", "parallel_vs_sequential")
TRAIN_VARIANTS = ("dense", "btx", "bam")
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}
"""Dense bf16 tensor-core rate of the SXM parts by NVIDIA's datasheet: a lead, not the MFU denominator."""
GOALS = {"dense_mfu_with_output_layer": 0.45, "bam_over_dense_mfu": 0.9}
PROCESS_GROUP_ENV = "BAM_GPU_BENCH_PROCESS_GROUP"
PACKAGES = (
    "torch",
    "megatron-core",
    "transformer-engine",
    "numpy",
    "sentencepiece",
    "packaging",
    "psutil",
    "tensorboard",
    "matplotlib",
    "transformers",
    "safetensors",
    "pytest",
    "triton",
)


@dataclass(frozen=True)
class Settings:
    """Shapes, dtype and step counts of one run: the GPU run's, or the CPU dry run's."""

    dry_run: bool
    preset: str
    seq: int
    micro_batch: int
    global_batch: int
    warmup: int
    steps: int
    experts: int
    layer_batch: int
    layer_rounds: int
    layer_warmup: int
    matmul_sizes: tuple[int, ...]
    matmul_reps: int

    @classmethod
    def for_run(cls, dry_run: bool) -> Settings:
        """The GPU run's settings (paper-590m, seq 2048, bf16), or the dry run's (tiny, seq 64, fp32)."""
        if dry_run:
            return cls(True, "tiny", 64, 2, 2, 1, 1, 4, 2, 1, 1, (128,), 2)
        return cls(False, "paper-590m", 2048, 4, 32, 3, 8, 4, 4, 10, 3, (4096, 8192, 16384), 20)

    @property
    def dtype_name(self) -> str:
        """'bfloat16' on the GPU, 'float32' in the dry run."""
        return "float32" if self.dry_run else "bfloat16"


# ------------------------------------------------------------------------------------------------
# FLOPs and MFU arithmetic (no torch: tests check it by hand). The FLOPs per token are
# bam_megatron.model.statistics' (training_flops_per_token, output_layer_training_flops): one formula.


def mfu_numbers(tokens_per_s: float, layer_flops: int, output_flops: int, peak_flops: float) -> dict[str, float]:
    """Achieved TFLOP/s and MFU of a training run, without and with the output layer's FLOPs."""
    with_output = layer_flops + output_flops
    return {
        "training_flops_per_token_layers": layer_flops,
        "training_flops_per_token_output_layer": output_flops,
        "training_flops_per_token_with_output_layer": with_output,
        "achieved_tflops_layers_only": tokens_per_s * layer_flops / 1e12,
        "achieved_tflops_with_output_layer": tokens_per_s * with_output / 1e12,
        "mfu_layers_only": tokens_per_s * layer_flops / peak_flops,
        "mfu_with_output_layer": tokens_per_s * with_output / peak_flops,
    }


def goals(records: list[dict]) -> dict[str, Any]:
    """The goals (dense MFU >= 45%, BAM MFU >= 0.9 x dense) checked on one backend's train records."""
    by_variant = {r["variant"]: r for r in records if r.get("status") == "ok"}
    out: dict[str, Any] = {"goals": dict(GOALS)}
    dense, bam = by_variant.get("dense"), by_variant.get("bam")
    if dense:
        out["dense_mfu_with_output_layer"] = dense["mfu_with_output_layer"]
        out["dense_mfu_goal_met"] = dense["mfu_with_output_layer"] >= GOALS["dense_mfu_with_output_layer"]
    if dense and bam:
        for kind in ("with_output_layer", "layers_only"):
            out[f"bam_over_dense_mfu_{kind}"] = bam[f"mfu_{kind}"] / dense[f"mfu_{kind}"]
        out["bam_over_dense_goal_met"] = out["bam_over_dense_mfu_with_output_layer"] >= GOALS["bam_over_dense_mfu"]
        out["bam_over_dense_tokens_per_s"] = bam["tokens_per_s"] / dense["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------------------
# plumbing


class Emitter:
    """Prints each record with its summary and appends it to the records file as one JSON line."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path

    def __call__(self, part: str, record: dict, summary: str) -> None:
        """Report ``record`` of ``part`` (stdout and the records file)."""
        report(record, summary)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"part": part, "record": record, "summary": summary}, sort_keys=True) + "\n")
        sys.stdout.flush()

    def done(self, part: str, seconds: float) -> None:
        """Note in the records file that ``part`` ended, after ``seconds``."""
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"part": part, "done_s": round(seconds, 1)}) + "\n")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def interleaved_times(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, alternating A, B, A, B...; synchronized around each call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return times


def _init_one_rank() -> None:
    """One rank of megatron-core's parallel state: NCCL on a GPU, gloo and CPU mode on a CPU."""
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes(), seed=1234)


def start_gloo_if_asked() -> Optional[str]:
    """With BAM_GPU_BENCH_PROCESS_GROUP=gloo (run.py's retry after an NCCL failure), start the one-rank
    default process group over gloo before `initialize` would start NCCL; returns the backend asked."""
    import tempfile

    import torch.distributed as dist

    backend = os.environ.get(PROCESS_GROUP_ENV)
    if backend == "gloo" and not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="bam-gpu-bench-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return backend


def _process_group() -> Optional[str]:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else None


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _backends() -> tuple[list[str], dict[str, str]]:
    """Specs to measure: local always; TE where it imports and a GPU is there (else why not)."""
    from bam_megatron.model.specs import transformer_engine_usable

    if transformer_engine_usable():
        return ["local", "te"], {}
    return ["local"], {"te": transformer_engine_status()["reason"]}


def transformer_engine_status() -> dict[str, Any]:
    """Whether ``import transformer_engine`` works, with the reason when not."""
    import torch

    try:
        import transformer_engine  # noqa: F401
    except Exception as error:  # ImportError, or a broken install's OSError
        return {"importable": False, "reason": f"Transformer Engine does not import: {type(error).__name__}: {error}"}
    if not torch.cuda.is_available():
        return {"importable": True, "reason": "Transformer Engine imports, but there is no CUDA GPU"}
    return {"importable": True, "reason": None, "version": getattr(transformer_engine, "__version__", None)}


# ------------------------------------------------------------------------------------------------
# parts


def part_env(settings: Settings, context: dict, emit: Emitter) -> None:
    """Versions, the GPU and its clocks (read only), and where packages differ from setup.py's pins."""
    import importlib.metadata
    import subprocess

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    with open(os.path.join(ROOT, "setup.py")) as f:
        pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"', f.read()))
    differ = {
        name: {"pinned": pin, "here": versions[name]}
        for name, pin in pins.items()
        if name in versions and (versions[name] or "").split("+")[0] != pin  # 2.13.0+cpu is 2.13.0
    }
    try:
        import megatron.core

        megatron_path = os.path.dirname(megatron.core.__file__)
    except Exception as error:
        megatron_path = f"not importable: {type(error).__name__}: {error}"
    smi = None
    if torch.cuda.is_available():
        query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
        try:
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            smi = f"nvidia-smi failed: {error}"
    cuda = torch.cuda.is_available()
    record = {
        "bench": "gpu_env",
        "status": "ok",
        "dry_run": settings.dry_run,
        "settings": asdict(settings),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": _device_name(),
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "packages": versions,
        "differ_from_setup_py_pins": differ,
        "megatron_core_path": megatron_path,
        "transformer_engine": transformer_engine_status(),
        "sdpa_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        },
        "nvidia_smi": smi,
    }
    te = "TE imports" if record["transformer_engine"]["importable"] else "no TE"
    emit(
        "env",
        record,
        f"env: {record['device']}, Python {record['python']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"megatron-core {versions['megatron-core']}, {te}; differ from pins: {', '.join(differ) or 'none'}",
    )


def part_matmul_peak(settings: Settings, context: dict, emit: Emitter) -> None:
    """The bf16 matmul rate (fp32 in the dry run): the MFU denominator, measured like METHOD.md says."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, settings.dtype_name)
    device = "cuda" if cuda else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = []
    for n in settings.matmul_sizes:
        pairs = [
            (
                torch.randn(n, n, device=device, dtype=dtype, generator=generator),
                torch.randn(n, n, device=device, dtype=dtype, generator=generator),
            )
            for _ in range(2)  # two input sets, alternated
        ]
        a, b = pairs[0]
        reference = a[:64].double() @ b.double()
        error = ((a[:64] @ b).double() - reference).norm() / reference.norm()
        seconds = []
        for i in range(settings.matmul_reps + 3):
            x, y = pairs[i % 2]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(x, y)
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                clock = time.perf_counter()
                torch.matmul(x, y)
                elapsed = time.perf_counter() - clock
            if i >= 3:  # warm-up: handles, heuristics, clocks
                seconds.append(elapsed)
        median = statistics.median(seconds)
        sizes.append(
            {
                "n": n,
                "median_ms": round(median * 1e3, 4),
                "min_ms": round(min(seconds) * 1e3, 4),
                "tflops_median": 2 * n**3 / median / 1e12,
                "tflops_best": 2 * n**3 / min(seconds) / 1e12,
                "rel_error_vs_float64": float(error),
            }
        )
        del pairs, a, b, reference
        _free_gpu()
    best = max(sizes, key=lambda s: s["tflops_median"])
    name = _device_name()
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None) if cuda else None
    context["peak_tflops"] = best["tflops_median"]
    record = {
        "bench": "gpu_matmul_peak",
        "status": "ok",
        "device": name,
        "dtype": settings.dtype_name,
        "reps": settings.matmul_reps,
        "sizes": sizes,
        "peak_tflops": best["tflops_median"],
        "peak_definition": (
            f"median rate of torch.matmul({best['n']}x{best['n']}, {best['n']}x{best['n']}) {settings.dtype_name}, "
            f"random data, two input sets alternated, {'CUDA events' if cuda else 'perf_counter'}; "
            "the best size's median"
        ),
        "datasheet_dense_bf16_tflops": datasheet,
    }
    emit(
        "matmul_peak",
        record,
        f"matmul_peak: {settings.dtype_name} torch.matmul {best['tflops_median']:.1f} TFLOP/s (median, n={best['n']}) "
        f"on {name}" + (f"; datasheet {datasheet} TFLOP/s" if datasheet else ""),
    )


def _trainer_argv(settings: Settings, variant: str) -> list[str]:
    from bam_megatron.model.variants import PRESETS

    argv = [
        "--variant",
        variant,
        "--preset",
        settings.preset,
        "--vocab-size",
        str(PRESETS[settings.preset].vocab_size),
        "--mock-data",
        "--seq-length",
        str(settings.seq),
        "--micro-batch-size",
        str(settings.micro_batch),
        "--global-batch-size",
        str(settings.global_batch),
        "--train-iters",
        str(settings.warmup + settings.steps + 2),
        "--eval-iters",
        "0",
        "--log-interval",
        "1000000",
    ]
    if variant != "dense":
        argv += ["--num-experts", str(settings.experts)]
    if not settings.dry_run:
        argv.append("--bf16")
    return argv


def _sdpa_context(force_flash: bool):
    """Flash attention only (the local spec's kernel), or whatever SDPA picks."""
    import contextlib

    if not force_flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def pick_sdpa(first_call: Callable[[], None], backend: str) -> tuple[bool, str]:
    """Make the first (warm-up) call under flash-only SDPA on the local spec; where flash refuses the
    shapes, again under SDPA's own choice. Returns (flash forced, what attention kernels ran)."""
    if backend != "local":
        first_call()
        return False, "Transformer Engine's DotProductAttention"
    try:
        with _sdpa_context(True):
            first_call()
        return True, "flash only (torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION]))"
    except RuntimeError as error:
        if "kernel" not in str(error).lower():
            raise
        first_call()
        return False, f"SDPA default choice (flash only refused: {str(error).splitlines()[0][:200]})"


def _train_one(settings: Settings, backend: str, variant: str, peak_flops: float) -> dict[str, Any]:
    """Build pretrain_bam.py's Trainer for one variant and backend, warm up, time its steps."""
    import torch

    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.model.statistics import training_flops_per_token
    from bam_megatron.training.arguments import parse_args
    from bam_megatron.training.loop import Trainer

    class BackendTrainer(Trainer):
        def _build_model(self):
            return build_from_architecture(self.architecture, self.config, self.args.seq_length, backend=backend)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter()
    trainer = BackendTrainer(parse_args(_trainer_argv(settings, variant)))
    build_s = time.perf_counter() - clock
    clock = time.perf_counter()
    force_flash, sdpa = pick_sdpa(trainer._train_step, backend)
    first_step_s = time.perf_counter() - clock
    seconds, losses = [], []
    with _sdpa_context(force_flash):
        for _ in range(settings.warmup - 1):
            trainer._train_step()
        for _ in range(settings.steps):
            _sync()
            start = time.perf_counter()
            loss, _, _ = trainer._train_step()
            _sync()
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
    step_s = statistics.median(seconds)
    tokens = settings.global_batch * settings.seq
    config, architecture = trainer.config, trainer.architecture
    numbers = mfu_numbers(
        tokens / step_s,
        training_flops_per_token(config, settings.seq),
        output_layer_training_flops(config.hidden_size, architecture.padded_vocab_size),
        peak_flops,
    )
    record = {
        "bench": "gpu_train_mfu",
        "status": "ok",
        "backend": backend,
        "variant": variant,
        "attention_kernels": sdpa,
        "tokens_per_s": tokens / step_s,
        "step_ms_median": step_s * 1e3,
        "step_ms": [round(s * 1e3, 2) for s in seconds],
        "first_step_s": round(first_step_s, 2),
        "build_s": round(build_s, 2),
        "tokens_per_step": tokens,
        "seq_length": settings.seq,
        "micro_batch": settings.micro_batch,
        "global_batch": settings.global_batch,
        "dtype": settings.dtype_name,
        "preset": settings.preset,
        "losses": losses,
        "total_params": trainer.total,
        "padded_vocab_size": architecture.padded_vocab_size,
        "peak_tflops_used": peak_flops / 1e12,
        "process_group": _process_group(),
        **numbers,
    }
    if cuda:
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del trainer
    _free_gpu()
    if cuda:
        record["memory_left_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return record


def _train_with_retry(settings: Settings, backend: str, variant: str, peak: float) -> dict[str, Any]:
    """`_train_one`, again at half the micro-batch (same global batch) when the GPU runs out of memory;
    a failure is a record with the error."""
    import torch

    tried = []
    while True:
        failure = None
        try:
            record = _train_one(settings, backend, variant, peak)
        except Exception as error:
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
            failure = {
                "bench": "gpu_train_mfu",
                "status": "failed",
                "backend": backend,
                "variant": variant,
                "micro_batch": settings.micro_batch,
                "error": f"{type(error).__name__}: {str(error)[:2000]}",
                "traceback": traceback.format_exc()[-4000:],
            }
        if failure is None:
            if tried:
                record["note"] = f"micro-batch {', '.join(map(str, tried))} ran out of GPU memory"
            return record
        _free_gpu()  # outside the except block: the traceback no longer holds the trainer
        if not out_of_memory or settings.micro_batch == 1:
            return failure
        tried.append(settings.micro_batch)
        print(f"train_mfu: {backend} {variant}: out of memory at micro-batch {settings.micro_batch}; halving it")
        settings = replace(settings, micro_batch=settings.micro_batch // 2)


def part_train_mfu(settings: Settings, context: dict, emit: Emitter) -> None:
    """Training tokens/s and MFU of dense, BTX and BAM on each spec, then the goals per spec."""
    if context.get("peak_tflops") is None:
        part_matmul_peak(settings, context, emit)
    peak = context["peak_tflops"] * 1e12
    backends, skipped = _backends()
    for backend, reason in skipped.items():
        emit(
            "train_mfu",
            {"bench": "gpu_train_mfu", "status": "skipped", "backend": backend, "reason": reason},
            f"train_mfu: {backend} spec skipped: {reason}",
        )
    for backend in backends:
        records = []
        for variant in TRAIN_VARIANTS:
            record = _train_with_retry(settings, backend, variant, peak)
            records.append(record)
            if record["status"] != "ok":
                emit("train_mfu", record, f"train_mfu: {backend} {variant} FAILED: {record['error'][:300]}")
                continue
            emit(
                "train_mfu",
                record,
                f"train_mfu: {backend} {variant}: {record['tokens_per_s']:.0f} tokens/s "
                f"({record['step_ms_median']:.1f} ms/step of {record['tokens_per_step']} tokens), "
                f"MFU {100 * record['mfu_with_output_layer']:.1f}% with the output layer, "
                f"{100 * record['mfu_layers_only']:.1f}% layers only (peak {peak / 1e12:.1f} TFLOP/s measured)",
            )
        checked = goals(records)
        parts = []
        if "dense_mfu_goal_met" in checked:
            parts.append(
                f"dense MFU {100 * checked['dense_mfu_with_output_layer']:.1f}% "
                f"(goal >= 45%: {'met' if checked['dense_mfu_goal_met'] else 'missed'})"
            )
        if "bam_over_dense_goal_met" in checked:
            parts.append(
                f"BAM/dense MFU {checked['bam_over_dense_mfu_with_output_layer']:.3f} with the output layer, "
                f"{checked['bam_over_dense_mfu_layers_only']:.3f} layers only "
                f"(goal >= 0.9: {'met' if checked['bam_over_dense_goal_met'] else 'missed'})"
            )
        emit(
            "train_mfu",
            {"bench": "gpu_train_mfu_goals", "status": "ok", "backend": backend, **checked},
            f"train_mfu goals ({backend} spec): " + ("; ".join(parts) or "no complete measurement"),
        )


def _layer_config(settings: Settings, variant: str, **overrides: Any):
    import torch

    from bam_megatron.model.configs import variant_config
    from bam_megatron.model.variants import PRESETS

    p = PRESETS[settings.preset]
    fields: dict[str, Any] = dict(
        hidden_size=p.hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_query_groups=p.num_query_groups,
        ffn_hidden_size=p.ffn_hidden_size,
        num_layers=1,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if not settings.dry_run:
        fields.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    fields.update(overrides)
    return variant_config(variant, num_experts=settings.experts, **fields)


def _layer_input(settings: Settings, config):
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0)(settings.seq)
    x = torch.randn(settings.layer_batch, settings.seq, config.hidden_size, device=device).transpose(0, 1)
    return x.to(config.params_dtype).contiguous().requires_grad_(True), rope


def _fwd_bwd(module, *inputs, **kwargs) -> None:
    output = module(*inputs, **kwargs)
    output = output[0] if isinstance(output, tuple) else output
    output.float().sum().backward()


def _soft_moa_one(settings: Settings, backend: str) -> dict[str, Any]:
    """Median fwd+bwd of the wide attention and of the per-expert loop on one spec."""
    from megatron.core.transformer.spec_utils import build_module

    from bam_megatron.model.specs import get_bam_layer_spec

    dense_cfg = _layer_config(settings, "dense", fuse_tp_reduction=False)
    moa_cfg = _layer_config(settings, "bam")

    def build(cfg):
        spec = get_bam_layer_spec(cfg, backend).submodules.self_attention
        return build_module(spec, config=cfg, layer_number=1)

    wide = build(moa_cfg)
    experts = [build(dense_cfg) for _ in range(settings.experts)]
    x, rope = _layer_input(settings, moa_cfg)

    def soft_moa():
        _fwd_bwd(wide, x, None, rotary_pos_emb=rope)

    def loop():
        gates = wide.router(x)
        out = sum(gates[..., j : j + 1] * e(x, None, rotary_pos_emb=rope)[0] for j, e in enumerate(experts))
        out.float().sum().backward()

    force_flash, kernels = pick_sdpa(lambda: (soft_moa(), loop()), backend)
    with _sdpa_context(force_flash):
        times = interleaved_times({"wide": soft_moa, "loop": loop}, settings.layer_rounds, settings.layer_warmup)
    wide_s, loop_s = statistics.median(times["wide"]), statistics.median(times["loop"])
    return {
        "bench": "gpu_soft_moa_vs_loop",
        "status": "ok",
        "backend": backend,
        "device": _device_name(),
        "dtype": settings.dtype_name,
        "attention_kernels": kernels,
        "config": {
            "experts": settings.experts,
            "hidden": moa_cfg.hidden_size,
            "heads_per_expert": moa_cfg.num_attention_heads,
            "seq": settings.seq,
            "batch": settings.layer_batch,
            "rounds": settings.layer_rounds,
        },
        "wide_ms": wide_s * 1e3,
        "loop_ms": loop_s * 1e3,
        "ratio_loop_over_wide": loop_s / wide_s,
        "process_group": _process_group(),
    }


def part_soft_moa_vs_loop(settings: Settings, context: dict, emit: Emitter) -> None:
    """Soft MoA as one N·H-head attention vs the loop over N H-head attentions (bench/soft_moa_vs_loop.py)."""
    _init_one_rank()
    backends, skipped = _backends()
    for backend in backends:
        r = _soft_moa_one(settings, backend)
        _free_gpu()
        emit(
            "soft_moa_vs_loop",
            r,
            f"soft_moa_vs_loop ({backend}, {settings.dtype_name}): one wide attention {r['wide_ms']:.2f} ms vs "
            f"per-expert loop {r['loop_ms']:.2f} ms (fwd+bwd, N={settings.experts}): "
            f"ratio {r['ratio_loop_over_wide']:.2f}",
        )
    for backend, reason in skipped.items():
        emit(
            "soft_moa_vs_loop",
            {"bench": "gpu_soft_moa_vs_loop", "status": "skipped", "backend": backend, "reason": reason},
            f"soft_moa_vs_loop: {backend} spec skipped: {reason}",
        )


def _blocks_one(settings: Settings, backend: str) -> dict[str, Any]:
    """Median fwd+bwd of one parallel and one sequential dense layer (same weights) on one spec."""
    from megatron.core.transformer.spec_utils import build_module

    from bam_megatron.model.specs import get_bam_layer_spec

    layers = {}
    for block in ("parallel", "sequential"):
        cfg = _layer_config(settings, "dense", block_type=block)
        layers[block] = build_module(get_bam_layer_spec(cfg, backend), config=cfg, layer_number=1)
    layers["sequential"].load_state_dict(layers["parallel"].state_dict(), strict=False)
    x, rope = _layer_input(settings, cfg)
    fns = {
        block: (lambda layer=layer: _fwd_bwd(layer, x, attention_mask=None, rotary_pos_emb=rope))
        for block, layer in layers.items()
    }
    force_flash, kernels = pick_sdpa(lambda: [fn() for fn in fns.values()], backend)
    with _sdpa_context(force_flash):
        times = interleaved_times(fns, settings.layer_rounds, settings.layer_warmup)
    par, seq = statistics.median(times["parallel"]), statistics.median(times["sequential"])
    return {
        "bench": "gpu_parallel_vs_sequential",
        "status": "ok",
        "backend": backend,
        "device": _device_name(),
        "dtype": settings.dtype_name,
        "attention_kernels": kernels,
        "config": {
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "ffn": cfg.ffn_hidden_size,
            "seq": settings.seq,
            "batch": settings.layer_batch,
            "tensor_model_parallel_size": 1,
            "rounds": settings.layer_rounds,
        },
        "parallel_ms": par * 1e3,
        "sequential_ms": seq * 1e3,
        "ratio_sequential_over_parallel": seq / par,
        "process_group": _process_group(),
    }


def part_parallel_vs_sequential(settings: Settings, context: dict, emit: Emitter) -> None:
    """The parallel dense block vs the sequential one, same weights, one layer fwd+bwd (TP=1: one GPU)."""
    _init_one_rank()
    backends, skipped = _backends()
    for backend in backends:
        r = _blocks_one(settings, backend)
        _free_gpu()
        emit(
            "parallel_vs_sequential",
            r,
            f"parallel_vs_sequential ({backend}, {settings.dtype_name}, TP=1): parallel block "
            f"{r['parallel_ms']:.2f} ms vs sequential {r['sequential_ms']:.2f} ms (fwd+bwd of one layer): "
            f"ratio {r['ratio_sequential_over_parallel']:.3f}",
        )
    for backend, reason in skipped.items():
        emit(
            "parallel_vs_sequential",
            {"bench": "gpu_parallel_vs_sequential", "status": "skipped", "backend": backend, "reason": reason},
            f"parallel_vs_sequential: {backend} spec skipped: {reason}",
        )


PART_FUNCTIONS = {
    "env": part_env,
    "matmul_peak": part_matmul_peak,
    "train_mfu": part_train_mfu,
    "soft_moa_vs_loop": part_soft_moa_vs_loop,
    "parallel_vs_sequential": part_parallel_vs_sequential,
}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the named parts in order; exit 1 if any failed (each failure is a record too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=PARTS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32, 1 timed step")
    parser.add_argument("--records", default=None, help="append each record here as a JSON line")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (else matmul_peak's)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None)
    args = parser.parse_args(argv)
    settings = Settings.for_run(args.dry_run)
    given = {"steps": args.steps, "micro_batch": args.micro_batch, "global_batch": args.global_batch}
    overrides = {name: value for name, value in given.items() if value is not None}
    settings = replace(settings, **overrides)
    emit, context, failed = Emitter(args.records), {"peak_tflops": args.peak_tflops}, []
    start_gloo_if_asked()
    for part in args.parts:
        clock = time.perf_counter()
        try:
            PART_FUNCTIONS[part](settings, context, emit)
        except Exception as error:
            failed.append(part)
            record = {
                "bench": f"gpu_{part}",
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-4000:],
            }
            emit(part, record, f"{part}: FAILED after {time.perf_counter() - clock:.1f} s: {record['error'][:300]}")
        emit.done(part, time.perf_counter() - clock)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
