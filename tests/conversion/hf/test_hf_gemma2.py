"""bam-convert-hf import and export of Gemma 2 (``Gemma2ForCausalLM``) against transformers itself.

A tiny random ``Gemma2ForCausalLM`` ((1 + w) RMSNorms before and after attention and MLP, GeGLU,
scaled tied embeddings, ``query_pre_attn_scalar``, attention and final-logit soft-capping, every
other layer sliding with a window as long as the sequence) is made by transformers. The import must
give transformers' fp32 logits within 1e-5 x max |logit|; the export (``--format auto``) goes back
to Gemma2ForCausalLM, whose logits are transformers' again; export -> import -> export is
byte-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import assert_round_trip, import_export_round_trips
from tests.support.hf_models import SEQ, TOKENS, hf_directory

RTOL = 1e-5
# soft caps small enough to bite on these large random weights
GEMMA2 = dict(
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0,
    max_position_embeddings=SEQ,
    sliding_window=SEQ,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    source, root = tmp_path_factory.mktemp("hf_gemma2"), str(tmp_path_factory.mktemp("hf_gemma2_out"))
    torch.save(hf_directory(str(source), "Gemma2", **GEMMA2), os.path.join(source, "logits.pt"))
    (results,) = run_distributed(import_export_round_trips, 1, args=({"gemma2": (str(source), root)}, TOKENS))
    return root, results["gemma2"]


def test_gemma2_imports_with_transformers_logits_and_exports_back_to_gemma2(imported):
    root, result = imported
    assert_round_trip(root, "gemma2", result, "Gemma2ForCausalLM", RTOL)
    config = json.load(open(os.path.join(root, "gemma2-hf", "config.json")))
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (2.0, 3.0)
    a = result["architecture"]
    assert (a.attn_logit_softcapping, a.final_logit_softcapping, a.local_rotary_base) == (2.0, 3.0, None)
    assert (a.norm_placement, a.apply_layernorm_1p, a.activation, a.qk_layernorm) == ("both", True, "geglu", False)
