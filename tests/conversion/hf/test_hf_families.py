"""Every native Hugging Face family's table, both ways (bam_megatron/conversion/hf/bridge.py).

Each family (Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, Gemma 2, Gemma 3, Cohere, Qwen2-MoE, Qwen3-MoE,
Mixtral) has one table that drives its import and its export. Checked here for every family: importing what the
table exports gives back every parameter bit for bit (no files: the table alone, with its
settings that only an import sees, such as Cohere's logit scale); and through the command line,
a tiny random checkpoint made by our own code, exported with ``--format FAMILY``, imported and
exported again (``auto``, which must go back to the family it came from) is byte-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import MOE, SIZES, VOCAB, convert, directory_files, save_random_checkpoint

DENSE = dict(variant="dense", block_type="sequential")
# family (--format) -> (Architecture settings beyond SIZES, table options only an import sees)
FAMILIES: dict[str, tuple[dict, dict]] = {
    # Llama 3.1's RoPE scaling; q/k/v biases (Llama's attention_bias, its o_proj bias written as zeros)
    "llama": (dict(DENSE, rope_scaling_factor=8.0, rotary_base=500000.0, add_qkv_bias=True), {}),
    "mistral": (dict(DENSE, untie_embeddings_and_output_weights=False), {}),
    # no biases: Qwen2ForCausalLM always has them, written as zeros
    "qwen2": (DENSE, {}),
    "qwen3": (dict(DENSE, qk_layernorm=True, kv_channels=24), {}),
    "phi3": (dict(DENSE, kv_channels=24, untie_embeddings_and_output_weights=False), {}),
    # norms after attention and MLP; q/k norms over the whole projection (GQA: K's is smaller)
    "olmo2": (dict(DENSE, norm_placement="post", qk_layernorm=True, qk_layernorm_scope="projection"), {}),
    # (1 + w) norms before and after, GeGLU, scaled tied embeddings; layer 1 local (its RoPE base), layer 2 global
    # Gemma 3's layer without q/k norms, with attention and final-logit soft-capping, one RoPE base
    "gemma2": (
        dict(
            DENSE,
            norm_placement="both",
            apply_layernorm_1p=True,
            activation="geglu",
            scale_embeddings=True,
            query_pre_attn_scalar=24.0,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            untie_embeddings_and_output_weights=False,
        ),
        {},
    ),
    "gemma3_text": (
        dict(
            DENSE,
            norm_placement="both",
            apply_layernorm_1p=True,
            activation="geglu",
            scale_embeddings=True,
            qk_layernorm=True,
            query_pre_attn_scalar=24.0,
            local_rotary_base=1000.0,
            global_attention_every=2,
            untie_embeddings_and_output_weights=False,
        ),
        {},
    ),
    # Command R's logit scale, folded into the final norm on import
    "cohere": (dict(variant="dense", normalization="LayerNorm"), {"logit_scale": 0.0625}),
    "qwen2_moe": (dict(variant="btx", block_type="sequential", add_qkv_bias=True, **MOE), {}),
    "qwen3_moe": (dict(variant="btx", block_type="sequential", qk_layernorm=True, **MOE), {}),
    "mixtral": (dict(variant="btx", block_type="sequential", moe_router_pre_softmax=False, **MOE), {}),
}


def _architecture(family: str):
    from bam_megatron.model.architecture import Architecture

    return Architecture(**SIZES, padded_vocab_size=VOCAB, **FAMILIES[family][0])


class _Tensors(dict):
    """Hugging Face tensors held in memory, read as `hf_files.SafetensorsWeights` reads them."""

    def read(self, name: str) -> torch.Tensor:
        return self[name].clone()


def _table_round_trips(families: list[str]) -> dict:
    """Rank body: per family, export every unit of random parameters with the table, import them back."""
    from bam_megatron.conversion.hf import formats
    from bam_megatron.conversion.hf.bridge import export_unit, import_unit, meta_units
    from bam_megatron.conversion.hf.megatron_io import TrackedParams

    generator = torch.Generator().manual_seed(0)
    results = {}
    for family in families:
        a, options = _architecture(family), FAMILIES[family][1]
        target, experts = formats.TARGETS[family], a.num_experts or 0
        _, _, units = meta_units(a, 32)
        table = target.mappings(a, **options)
        mismatched, untouched, names = [], [], set()
        for unit, meta in units.items():
            ours = {name: torch.randn(p.shape, generator=generator) for name, p in meta.items()}
            exported = TrackedParams(ours)
            hf = _Tensors({name: t.clone() for name, t in export_unit(table, unit, exported, experts).items()})
            untouched += sorted(set(ours) - exported.touched)
            names |= set(hf)
            back = TrackedParams({name: torch.full_like(t, float("nan")) for name, t in ours.items()})
            import_unit(table, unit, back, hf, experts)
            untouched += sorted(set(ours) - back.touched)
            mismatched += [name for name, t in ours.items() if not torch.equal(back[name], t)]
        results[family] = {"mismatched": mismatched, "untouched": untouched, "names": names}
    return results


@pytest.fixture(scope="module")
def tables() -> dict:
    (results,) = run_distributed(_table_round_trips, 1, args=(list(FAMILIES),))
    return results


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_inverts_export_for_every_family(tables, family):
    result = tables[family]
    assert result["untouched"] == [], (family, result["untouched"])
    assert result["mismatched"] == [], (family, result["mismatched"])
    assert len(result["names"]) > 10, result["names"]


def test_the_tables_use_each_class_s_own_tensor_names(tables):
    names = {family: result["names"] for family, result in tables.items()}
    assert "model.layers.1.self_attn.qkv_proj.weight" in names["phi3"]
    assert "model.layers.1.mlp.gate_up_proj.weight" in names["phi3"]
    assert not any("q_proj" in n or "gate_proj" in n or "lm_head" in n for n in names["phi3"])
    assert "model.layers.0.self_attn.o_proj.bias" in names["llama"] and "lm_head.weight" in names["llama"]
    assert "model.layers.1.self_attn.v_proj.bias" in names["qwen2"]
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in names["mixtral"]
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names["qwen2_moe"]
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in names["qwen3_moe"]
    assert "model.layers.1.self_attn.k_norm.weight" in names["qwen3"]
    assert "model.layers.1.post_feedforward_layernorm.weight" in names["olmo2"]
    assert not any("input_layernorm" in n for n in names["olmo2"])


def _export_import_export(root: str, families: list[str]) -> dict:
    """Rank body: per family a random checkpoint -> --format family -> import -> export (auto)."""
    results = {}
    for i, family in enumerate(families):
        checkpoint = save_random_checkpoint(os.path.join(root, family), _architecture(family), seed=i)
        first, seed, again = (os.path.join(root, f"{family}-{x}") for x in ("hf", "seed", "again"))
        results[family] = [
            convert("export", "--load", checkpoint, "--save", first, "--format", family),
            convert("import", "--load", first, "--save", seed),
            convert("export", "--load", seed, "--save", again),
        ]
    return results


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("hf_families")
    (results,) = run_distributed(_export_import_export, 1, args=(str(root), list(FAMILIES)))
    return root, results


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_import_export_is_byte_identical_for_every_family(round_trips, family):
    root, results = round_trips
    for code, text in results[family]:
        assert code == 0, (family, text)
    first, again = directory_files(root / f"{family}-hf"), directory_files(root / f"{family}-again")
    assert sorted(first) == sorted(again), (sorted(first), sorted(again))
    for name in first:
        assert first[name] == again[name], (family, name)
    manifest = json.load(open(root / f"{family}-again" / "bam_export.json"))
    assert manifest["format"] == family and "trust_remote_code" not in results[family][2][1], manifest
    seed_manifest = json.load(open(root / f"{family}-seed" / "import_manifest.json"))
    assert seed_manifest["model_type"] == json.loads(first["config.json"])["model_type"]
