"""SDPAttention (the local backend's kernel) agrees with megatron-core's DotProductAttention."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from bam_megatron.model.configs import variant_config
from bam_megatron.model.sdpa_attention import SDPAttention
from bam_megatron.platform.distributed import ParallelSizes, initialize
from bam_megatron.testing.distributed import run_distributed


def compare(groups: int, explicit_mask: bool):
    initialize(ParallelSizes(), seed=5)
    config = variant_config("dense", preset="tiny", num_query_groups=groups)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPAttention(**kwargs), DotProductAttention(**kwargs)
    sq, b, heads, d = 10, 2, config.num_attention_heads, config.kv_channels
    q = torch.randn(sq, b, heads, d, requires_grad=True)
    k = torch.randn(sq, b, groups, d, requires_grad=True)
    v = torch.randn(sq, b, groups, d, requires_grad=True)
    mask = torch.ones(sq, sq, dtype=torch.bool).triu(1).expand(b, 1, sq, sq) if explicit_mask else None
    upstream = torch.randn(sq, b, heads * d)
    results = []
    for module in (ours, theirs):
        for t in (q, k, v):
            t.grad = None
        out = module(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
    return max((a - b).abs().max().item() for a, b in zip(*results))


@pytest.mark.parametrize("groups,explicit_mask", [(4, False), (2, False), (1, False), (2, True)])
def test_sdpa_matches_megatron_dot_product_attention(groups, explicit_mask):
    (diff,) = run_distributed(compare, 1, args=(groups, explicit_mask))
    assert diff < 1e-5
