"""bam-convert-hf import and export of OLMo 2 (``Olmo2ForCausalLM``) against transformers itself.

A tiny random ``Olmo2ForCausalLM`` (norms after attention and MLP, q/k RMSNorms over the whole
projection, GQA; large weights, norms perturbed) is made by transformers. Its import must give
transformers' fp32 logits within 1e-5 x max |logit|; the export (``--format auto``) goes back to
Olmo2ForCausalLM, whose logits are transformers' again, and export -> import -> export is
byte-identical. A model with Llama's norms forced to ``--format olmo2`` is refused in one line.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support.hf import assert_round_trip, convert, import_export_round_trips
from tests.support.hf_models import SEQ, TOKENS, hf_directory

RTOL = 1e-5
OLMO2 = dict(num_key_value_heads=2, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    source, root = tmp_path_factory.mktemp("hf_olmo2"), str(tmp_path_factory.mktemp("hf_olmo2_out"))
    torch.save(hf_directory(str(source), "Olmo2", **OLMO2), os.path.join(source, "logits.pt"))
    (results,) = run_distributed(import_export_round_trips, 1, args=({"olmo2": (str(source), root)}, TOKENS))
    return root, results["olmo2"]


def test_olmo2_imports_with_transformers_logits_and_exports_back_to_olmo2(imported):
    root, result = imported
    assert_round_trip(root, "olmo2", result, "Olmo2ForCausalLM", RTOL)
    assert json.load(open(os.path.join(root, "olmo2-hf", "config.json")))["architectures"] == ["Olmo2ForCausalLM"]
    a = result["architecture"]
    assert (a.block_type, a.norm_placement, a.qk_layernorm, a.qk_layernorm_scope) == (
        "sequential",
        "post",
        True,
        "projection",
    )
    assert a.num_query_groups == 2 and a.norm_epsilon == 1e-5


def _forced(root: str) -> tuple[int, str, bool]:
    """Rank body: a Llama-like checkpoint exported with --format olmo2."""
    from bam_megatron.model.architecture import Architecture
    from tests.support.hf import SIZES, VOCAB, save_random_checkpoint

    a = Architecture(**SIZES, padded_vocab_size=VOCAB, variant="dense", block_type="sequential")
    checkpoint = save_random_checkpoint(os.path.join(root, "llama"), a)
    out = os.path.join(root, "refused")
    code, text = convert("export", "--load", checkpoint, "--save", out, "--format", "olmo2")
    return code, text, os.path.exists(out)


def test_forcing_olmo2_on_a_pre_norm_model_is_one_line(tmp_path):
    (result,) = run_distributed(_forced, 1, args=(str(tmp_path),))
    code, text, left = result
    assert code == 2 and "--format olmo2: norm_placement=pre: Olmo2ForCausalLM's norms come after" in text, text
    assert len(text.strip().splitlines()) == 1 and not left, text
