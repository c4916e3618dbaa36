"""The converters' checkpoint files are megatron-core's: what `direct_io` writes and reads is what
megatron-core's ``dist_checkpointing`` (with PyTorch's own reader and writer) reads and writes."""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save

from bam_megatron.checkpoint import direct_io, layerwise
from bam_megatron.testing.distributed import run_distributed

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2)


def _read(path: str, reader_class, wanted: dict[str, dict[tuple, torch.Tensor]], shapes: dict[str, tuple]) -> None:
    requests = {}
    for key, chunks in wanted.items():
        requests[key] = layerwise._Chunks(shapes[key])
        requests[key].chunks.update(chunks)
    dcp_load(requests, storage_reader=reader_class(path), planner=layerwise._PartialLoadPlanner(), no_dist=True)


def test_the_direct_reader_reads_what_pytorch_wrote_whole_in_part_and_in_any_layout(tmp_path):
    generator = torch.Generator().manual_seed(0)
    stored = {
        "a": torch.randn(10, 6, generator=generator),
        "b": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "t": torch.randn(6, 5, generator=generator).t(),  # saved with its strides
        "s": torch.tensor(2.5),
    }
    dcp_save(stored, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    shapes = {k: tuple(v.shape) for k, v in stored.items()}
    out: dict[str, dict[str, dict[tuple, torch.Tensor]]] = {}
    for name, reader in (("direct", direct_io.DirectReader), ("pytorch", FileSystemReader)):
        out[name] = {
            "a": {(2, 0): torch.zeros(4, 6), (0, 3): torch.zeros(2, 3)},  # parts of the stored chunk
            "b": {(0, 0): torch.zeros(3, 4, dtype=torch.bfloat16)},  # whole, straight into the destination
            "t": {(0, 0): torch.zeros(5, 6)},
            "s": {(): torch.zeros(())},
        }
        _read(str(tmp_path), reader, out[name], shapes)
    direct, pytorch = out["direct"], out["pytorch"]
    assert torch.equal(direct["a"][(2, 0)], stored["a"][2:6]) and torch.equal(direct["a"][(0, 3)], stored["a"][:2, 3:])
    assert torch.equal(direct["b"][(0, 0)], stored["b"]) and torch.equal(direct["t"][(0, 0)], stored["t"])
    assert float(direct["s"][()]) == 2.5
    for key in stored:
        for offset, tensor in direct[key].items():
            assert torch.equal(tensor, pytorch[key][offset])


def _tiny_dense(seed: int):
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.builder import build_from_architecture

    architecture = Architecture("dense", **TINY, padded_vocab_size=128)
    torch.manual_seed(seed)
    model = build_from_architecture(architecture, architecture.model_config(use_cpu_initialization=True), 32)
    with torch.no_grad():  # norms start at 1: move them, so a mix-up shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return architecture, model


def _plainly_loaded(path: str, architecture) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as plain megatron-core loads them: its own default load strategy
    (PyTorch's FileSystemReader) into the sharded state dict of a freshly built model."""
    from megatron.core import dist_checkpointing

    from bam_megatron.model.builder import build_from_architecture

    model = build_from_architecture(architecture, architecture.one_rank_config(), 32)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"])
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _write_upcycle_and_load_plainly(root: str):
    """Rank body: two random dense sources saved by megatron-core; one of them streamed again by
    the layer-by-layer writer; a BAM upcycle of both; everything loaded with plain megatron-core."""
    from bam_megatron.checkpoint import CheckpointMeta, store
    from bam_megatron.conversion.upcycle import main as upcycle_main
    from bam_megatron.model.builder import build_from_architecture
    from bam_megatron.platform.distributed import ParallelSizes, initialize

    initialize(ParallelSizes())
    sources, params = [], []
    for seed in (1, 2):
        architecture, model = _tiny_dense(seed)
        path = os.path.join(root, f"dense{seed}")
        store.save_checkpoint(path, 1, model, None, None, CheckpointMeta(architecture, seq_length=32))
        sources.append(path)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def fill(unit, unit_params):
        for name, param in unit_params.items():
            param.copy_(params[0][name])

    meta_model = layerwise.meta_model(lambda: build_from_architecture(architecture, architecture.one_rank_config(), 32))
    streamed = os.path.join(root, "streamed")
    strategy = layerwise.StreamingSaveStrategy(meta_model, fill)
    store.save_checkpoint(streamed, 1, meta_model, None, None, CheckpointMeta(architecture, seq_length=32), strategy)
    by_megatron, by_us = (FileSystemReader(store.checkpoint_path(p, 1)).read_metadata() for p in (sources[0], streamed))

    out = os.path.join(root, "bam")
    argv = ["--expert", f"a={sources[0]}", "--expert", f"b={sources[1]}", "--method", "bam", "--save", out]
    assert upcycle_main([*argv, "--report-batches", "0"]) == 0
    moe_path = store.resolve_checkpoint(out)
    moe_architecture = store.read_meta(moe_path).architecture
    return (
        params,
        _plainly_loaded(store.checkpoint_path(streamed, 1), architecture),
        _plainly_loaded(moe_path, moe_architecture),
        (by_megatron.state_dict_metadata, by_us.state_dict_metadata),
        moe_architecture,
    )


def test_streamed_and_upcycled_checkpoints_load_with_plain_megatron_core(tmp_path):
    ((params, streamed, moe, (by_megatron, by_us), moe_architecture),) = run_distributed(
        _write_upcycle_and_load_plainly, 1, args=(str(tmp_path),)
    )
    # the same tensors, chunks and dtypes as megatron-core's own writer records
    assert by_us.keys() == by_megatron.keys()
    for key, stored in by_megatron.items():
        ours = by_us[key]
        assert type(ours) is type(stored), key
        if hasattr(stored, "chunks"):
            assert (ours.size, ours.properties.dtype, ours.chunks) == (
                stored.size,
                stored.properties.dtype,
                stored.chunks,
            )
    assert streamed.keys() == params[0].keys()
    for name, value in params[0].items():
        assert torch.equal(streamed[name], value), name

    from bam_megatron.model.qkv_layout import soft_moa_attention_weights

    config = moe_architecture.one_rank_config()
    a, b = params
    for layer in range(TINY["num_layers"]):
        p = f"decoder.layers.{layer}"
        for e, source in enumerate((a, b)):
            for fc in ("linear_fc1", "linear_fc2"):
                assert torch.equal(
                    moe[f"{p}.mlp.experts.local_experts.{e}.{fc}.weight"], source[f"{p}.mlp.{fc}.weight"]
                )
        qkv, proj = soft_moa_attention_weights(
            [s[f"{p}.self_attention.linear_qkv.weight"] for s in (a, b)],
            [s[f"{p}.self_attention.linear_proj.weight"] for s in (a, b)],
            config,
        )
        assert torch.equal(moe[f"{p}.self_attention.linear_qkv.weight"], qkv)
        assert torch.equal(moe[f"{p}.self_attention.linear_proj.weight"], proj)
        norm = f"{p}.input_layernorm.weight"
        torch.testing.assert_close(moe[norm], (a[norm] + b[norm]) / 2)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        torch.testing.assert_close(moe[name], (a[name] + b[name]) / 2)
