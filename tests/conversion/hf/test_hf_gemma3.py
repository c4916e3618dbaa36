"""bam-convert-hf import and export of Gemma 3 text (``Gemma3ForCausalLM``) against transformers itself.

A tiny random ``Gemma3ForCausalLM`` ((1 + w) RMSNorms before and after attention and MLP, per-head
q/k norms, GeGLU, scaled and tied embeddings, ``query_pre_attn_scalar``, a local layer with its own
RoPE base and a global one; large weights, norms perturbed) is made by transformers. Its sliding
window is as long as the sequence (exact: ours is full causal). The import must give transformers'
fp32 logits within 1e-5 x max |logit|; the export (``--format auto``) goes back to
Gemma3ForCausalLM, whose logits are transformers' again; export -> import -> export is
byte-identical. A window shorter than the sequence is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import assert_round_trip, convert, import_export_round_trips
from tests.support.hf_models import SEQ, TOKENS, hf_directory

RTOL = 1e-5
GEMMA3 = dict(
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    max_position_embeddings=SEQ,
    sliding_window=SEQ,
    sliding_window_pattern=2,  # layer 1 local, layer 2 global
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    source, root = tmp_path_factory.mktemp("hf_gemma3"), str(tmp_path_factory.mktemp("hf_gemma3_out"))
    settings = dict(GEMMA3, model_class="Gemma3ForCausalLM")
    torch.save(hf_directory(str(source), "Gemma3Text", **settings), os.path.join(source, "logits.pt"))
    (results,) = run_distributed(import_export_round_trips, 1, args=({"gemma3": (str(source), root)}, TOKENS))
    return str(source), root, results["gemma3"]


def test_gemma3_imports_with_transformers_logits_and_exports_back_to_gemma3(imported):
    _, root, result = imported
    assert_round_trip(root, "gemma3", result, "Gemma3ForCausalLM", RTOL)
    config = json.load(open(os.path.join(root, "gemma3-hf", "config.json")))
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == SEQ
    a = result["architecture"]
    assert (a.norm_placement, a.apply_layernorm_1p, a.activation, a.scale_embeddings) == ("both", True, "geglu", True)
    assert (a.query_pre_attn_scalar, a.local_rotary_base, a.global_attention_every) == (24.0, 1000.0, 2)
    assert a.rotary_base == 100000.0 and not a.untie_embeddings_and_output_weights


def test_a_gemma3_window_shorter_than_the_sequence_is_refused_in_one_line(imported, tmp_path):
    source, _, _ = imported
    bad = tmp_path / "window"
    shutil.copytree(source, bad)
    config = json.load(open(bad / "config.json"))
    json.dump({**config, "sliding_window": 16}, open(bad / "config.json", "w"))
    out = str(tmp_path / "out")
    code, text = convert("import", "--load", str(bad), "--save", out)
    assert code == 2 and "sliding_window=16" in text and len(text.strip().splitlines()) == 1, text
    assert not os.path.exists(out)


def test_gemma3_defaults_are_transformers_defaults():
    """A config.json that leaves fields out is read with Gemma3TextConfig's values for them."""
    import transformers

    from bam_megatron.conversion.hf import families

    sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8, vocab_size=1000)
    theirs = transformers.Gemma3TextConfig(**sizes)
    ours = families.IMPORTERS["gemma3_text"]({"model_type": "gemma3_text", **sizes}, seq_length=16)
    a = ours.architecture
    assert (ours.head_dim, ours.kv_heads) == (theirs.head_dim, theirs.num_key_value_heads)
    assert a.norm_epsilon == theirs.rms_norm_eps and a.query_pre_attn_scalar == theirs.query_pre_attn_scalar
    rope = theirs.rope_parameters
    assert (a.rotary_base, a.local_rotary_base) == (
        rope["full_attention"]["rope_theta"],
        rope["sliding_attention"]["rope_theta"],
    )
    every = a.global_attention_every
    assert [("full" if (i + 1) % every == 0 else "sliding") + "_attention" for i in range(6)] == theirs.layer_types
    assert a.untie_embeddings_and_output_weights != theirs.tie_word_embeddings
    assert ours.default_seq_length() == theirs.max_position_embeddings
    assert ours.get("sliding_window") == theirs.sliding_window
