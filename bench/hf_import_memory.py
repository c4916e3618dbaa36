"""Memory of `bam-convert-hf import` on a Llama-2-7B-shaped model: flat in depth (streamed layer by layer).

A random ``LlamaForCausalLM`` directory of the 7B shape (hidden 4096, intermediate 11008, 32 heads,
vocabulary 32000, untied; bf16 safetensors, one shard per layer as real checkpoints are sharded) is
written layer by layer, with 1 and with 3 layers, and each is imported in a fresh process whose
peak RSS (``resource.getrusage``, after the import) is reported. The importer reads one tensor at a
time and writes the checkpoint one unit at a time (embeddings + output layer, then each layer;
two units while writing), so the peak is set by the largest two units, not by the depth: it
should not grow from 1 to 3 layers, where a whole-model import would grow by two fp32 layers
(2 x 0.81 GB) plus their bf16 sources.

Speed: each import, and an export of the imported checkpoint back to a Hugging Face directory
(``--dtype float32``, the default), alternates with a copy of its input (then synced), ``--repeats``
times; the ratio is copy seconds / conversion seconds (in the process; ``whole command``: with
interpreter start). An import reads bf16 and writes fp32, twice the bytes a copy writes.

    python bench/hf_import_memory.py [--hidden 4096 --ffn 11008 --heads 32 --vocab 32000 --layers 1 3 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import report  # noqa: E402


def write_llama(directory: str, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, layers: int) -> int:
    """A random bf16 LlamaForCausalLM directory (config.json, one safetensors shard per layer, an
    index), written one layer at a time; returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory)
    generator = torch.Generator().manual_seed(0)
    d = hidden // heads

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    def shard(index: int) -> dict[str, torch.Tensor]:
        if index == 0:
            return {
                "model.embed_tokens.weight": randn(vocab, hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": randn(vocab, hidden),
            }
        p = f"model.layers.{index - 1}."
        return {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": randn(heads * d, hidden),
            p + "self_attn.k_proj.weight": randn(kv_heads * d, hidden),
            p + "self_attn.v_proj.weight": randn(kv_heads * d, hidden),
            p + "self_attn.o_proj.weight": randn(hidden, heads * d),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "mlp.gate_proj.weight": randn(ffn, hidden),
            p + "mlp.up_proj.weight": randn(ffn, hidden),
            p + "mlp.down_proj.weight": randn(hidden, ffn),
        }

    weight_map, total, count = {}, 0, layers + 1
    for index in range(count):  # one shard in memory at a time
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        tensors = shard(index)
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total


# Run in a fresh interpreter: the conversion, then its peak RSS (the whole process: imports included).
_MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
from bam_megatron.conversion.hf.cli import main
code = main([sys.argv[1], "--load", sys.argv[2], "--save", sys.argv[3]])
print("RESULT " + json.dumps({"code": code, "seconds": round(time.perf_counter() - start, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def measure(command: str, source: str, out: str) -> dict:
    """``bam-convert-hf COMMAND --load source --save out`` in a fresh process, synced; its exit code,
    seconds (in the process; ``wall_s``: the whole command with interpreter start) and peak RSS (MB)."""
    os.sync()
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, command, source, out], cwd=ROOT, capture_output=True, text=True, check=False
    )
    os.sync()
    wall = time.perf_counter() - start
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{command} failed ({run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "wall_s": round(wall, 2)}


def copy_seconds(source: str, target: str) -> float:
    """Seconds to copy ``source`` to ``target`` and sync (the I/O reference)."""
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    shutil.copytree(source, target)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def size_of(path: str) -> int:
    """Bytes of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def depth_runs(workdir: str, shape: dict, depths: list[int], repeats: int = 0) -> list[dict]:
    """Write the model at each depth and import it: sizes, seconds and peak RSS of the import.

    ``repeats`` > 0: also the speed, import and then export of the import, each run ``repeats`` times
    alternated with a copy of its input (medians): GB/s, ratios to the copy, peak RSS (``import``
    and ``export`` entries)."""
    runs = []
    for layers in depths:
        source, out = os.path.join(workdir, f"hf-{layers}"), os.path.join(workdir, f"seed-{layers}")
        back, copy = os.path.join(workdir, f"hf-back-{layers}"), os.path.join(workdir, "copy")
        start = time.perf_counter()
        source_bytes = write_llama(source, layers=layers, **shape)
        written = time.perf_counter() - start
        run = {"layers": layers, "source_mb": round(source_bytes / 1e6, 1), "write_source_s": round(written, 2)}
        for command, given, made in (("import", source, out), ("export", out, back))[: 2 if repeats else 1]:
            copies, results = [], []
            for _ in range(max(repeats, 1)):
                if repeats:
                    copies.append(copy_seconds(given, copy))
                shutil.rmtree(made, ignore_errors=True)
                results.append(measure(command, given, made))
                if results[-1]["code"] != 0:
                    raise RuntimeError(f"{command} of {given} exited {results[-1]['code']}")
            if command == "import":  # the memory check's numbers
                run.update(
                    output_mb=round(size_of(made) / 1e6, 1), **{k: results[-1][k] for k in ("seconds", "peak_rss_mb")}
                )
            if not repeats:
                break
            gb, copy_s = size_of(given) / 1e9, statistics.median(copies)
            work_s, wall_s = (statistics.median(r[k] for r in results) for k in ("seconds", "wall_s"))
            run[command] = {
                "input_mb": round(gb * 1e3, 1),
                "output_mb": round(size_of(made) / 1e6, 1),
                "copy_seconds": [round(c, 2) for c in copies],
                "seconds": [r["seconds"] for r in results],
                "wall_seconds": [r["wall_s"] for r in results],
                "copy_gb_per_s": round(gb / copy_s, 3),
                "gb_per_s": round(gb / work_s, 3),
                "ratio_over_copy": round(copy_s / work_s, 3),
                "ratio_command_over_copy": round(copy_s / wall_s, 3),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            }
        for path in (source, out, back):
            shutil.rmtree(path, ignore_errors=True)
        runs.append(run)
    return runs


def unit_mb(shape: dict) -> dict:
    """fp32 MB of one layer and of the top unit (embedding + output layer) of this shape."""
    h, f, v = shape["hidden"], shape["ffn"], shape["vocab"]
    d = h // shape["heads"]
    layer = 2 * h * shape["heads"] * d + 2 * h * shape["kv_heads"] * d + 3 * h * f + 2 * h
    return {"layer_mb": round(layer * 4 / 1e6, 1), "top_mb": round((2 * v * h + h) * 4 / 1e6, 1)}


def main() -> None:
    """Run the benchmark and print JSON plus a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=2, help="speed runs of each conversion (>= 1)")
    parser.add_argument("--workdir", default="/tmp/bam-hf-import-bench")
    settings = parser.parse_args()
    if settings.repeats < 1:
        parser.error("--repeats must be >= 1")
    shape = {k: getattr(settings, k) for k in ("hidden", "ffn", "heads", "kv_heads", "vocab")}
    shutil.rmtree(settings.workdir, ignore_errors=True)
    os.makedirs(settings.workdir)
    try:
        runs = depth_runs(settings.workdir, shape, settings.layers, settings.repeats)
    finally:
        shutil.rmtree(settings.workdir, ignore_errors=True)
    units = unit_mb(shape)
    first, last = runs[0], runs[-1]
    imp, exp = last["import"], last["export"]
    report(
        {"bench": "hf_import_memory", "config": vars(settings), "units": units, "runs": runs},
        f"hf_import_memory: import peak RSS {first['import']['peak_rss_mb']:.0f} MB at {first['layers']} layer(s), "
        f"{imp['peak_rss_mb']:.0f} MB at {last['layers']} "
        f"({imp['peak_rss_mb'] - first['import']['peak_rss_mb']:+.0f} MB; one fp32 layer is "
        f"{units['layer_mb']:.0f} MB, embeddings + output layer {units['top_mb']:.0f} MB); at {last['layers']} "
        f"layers: import {imp['input_mb']:.0f} MB bf16 -> {imp['output_mb']:.0f} MB at {imp['gb_per_s']:.3f} GB/s "
        f"vs copy {imp['copy_gb_per_s']:.3f}: ratio {imp['ratio_over_copy']:.2f} "
        f"({imp['ratio_command_over_copy']:.2f} whole command); export {exp['input_mb']:.0f} -> "
        f"{exp['output_mb']:.0f} MB at {exp['gb_per_s']:.3f} GB/s vs copy {exp['copy_gb_per_s']:.3f}: ratio "
        f"{exp['ratio_over_copy']:.2f} ({exp['ratio_command_over_copy']:.2f}), peak RSS {exp['peak_rss_mb']:.0f} MB "
        f"at {last['layers']} layers, {first['export']['peak_rss_mb']:.0f} MB at {first['layers']}",
    )


if __name__ == "__main__":
    main()
