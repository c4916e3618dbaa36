"""megatron-core DDP + distributed optimizer at DP=2 reproduce DP=1 over two AdamW steps."""

import pytest
import torch

from bam_megatron.platform.distributed import ParallelSizes
from bam_megatron.testing.distributed import run_distributed
from bam_megatron.testing.shards import assemble
from tests.support.tiny_gpt import adam_steps

pytestmark = pytest.mark.megatron_core  # stock megatron-core on CPU (tests/conftest.py)

STEPS = 2
MICRO_BATCHES = 2


@pytest.mark.parametrize("model", ["gpt", "gpt-moe"])
def test_dp2_distributed_optimizer_matches_dp1(model):
    args = (ParallelSizes(), model, None, STEPS, MICRO_BATCHES)
    (dp1,) = run_distributed(adam_steps, 1, args=args + (False,))
    dp2 = run_distributed(adam_steps, 2, args=args + (True,))

    for rank in dp2:
        assert rank["losses"] == pytest.approx(dp1["losses"], rel=1e-6)
        assert rank["grad_norms"] == pytest.approx(dp1["grad_norms"], rel=1e-5)
    initial = assemble([dp1["initial"]])
    after_dp1 = assemble([dp1["weights"]])
    moved = max((after_dp1[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 5e-3, "the optimizer did not update the weights"  # lr is 1e-2
    for rank in dp2:  # every data-parallel replica holds the same, gathered, weights
        after_dp2 = assemble([rank["weights"]])
        for key, value in after_dp1.items():
            # Adam's eps is 1e-4 (tiny_gpt.adam_steps): with the usual 1e-8, gradients that
            # are ~0 up to summation order turn into +-lr updates and no two runs agree.
            torch.testing.assert_close(after_dp2[key], value, rtol=0, atol=1e-6, msg=key)
