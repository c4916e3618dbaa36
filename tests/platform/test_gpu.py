"""GPU tier: what only a CUDA machine can show. Deselected where there is no GPU (see conftest)."""

import pytest
import torch

from bam_megatron.platform import cpu_mode
from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.gpu


def test_cpu_mode_is_never_active_on_a_gpu():
    assert cpu_mode.enable() is False
    assert not cpu_mode.is_active()


def _bf16_vs_fp32_loss():
    from bam_megatron.model.gpt import build_gpt, local_gpt_layer_spec
    from bam_megatron.platform.distributed import initialize
    from tests.support.tiny_gpt import SEQ, VOCAB, micro_batches, tiny_config

    initialize(ParallelSizes(), seed=1)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        config = tiny_config(ParallelSizes())
        config.params_dtype = dtype
        config.bf16 = dtype == torch.bfloat16
        config.use_cpu_initialization = True
        torch.manual_seed(0)
        model = build_gpt(config, local_gpt_layer_spec(), VOCAB, SEQ).cuda().to(dtype)
        tokens, labels = micro_batches(1)[0]
        positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
        loss = model(tokens.cuda(), positions.cuda(), None, labels=labels.cuda()).float().mean()
        loss.backward()
        losses[str(dtype)] = loss.item()
    return losses


def test_bf16_loss_is_close_to_fp32():
    (losses,) = run_distributed(_bf16_vs_fp32_loss, 1)
    assert losses["torch.bfloat16"] == pytest.approx(losses["torch.float32"], rel=2e-2)
