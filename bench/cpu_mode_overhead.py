"""What CPU mode's device handling costs per training step.

CPU mode remaps CUDA devices per megatron-core module (a view of ``torch`` with wrapped tensor
factories) and adds nothing to the per-op path. The reference is the prototype's approach: one
global ``TorchFunctionMode`` that inspects every torch call for a ``device=`` argument. Both time
the same forward/backward of a small megatron-core GPT, interleaved; the ratio is
global-mode / CPU-mode, i.e. what the per-op hook would have cost (1.00 = nothing).

    python bench/cpu_mode_overhead.py [--layers 4 --hidden 256 --rounds 20]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import bam_megatron  # noqa: E402,F401
from bench.common import init_single_rank, interleaved_medians, report  # noqa: E402


class _GlobalDeviceRemap(TorchFunctionMode):
    """The reference: a per-op hook that sends every CUDA-addressed tensor to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from megatron.core.transformer.transformer_config import TransformerConfig

    from bam_megatron.model.gpt import build_gpt, local_gpt_layer_spec
    from bam_megatron.platform import cpu_mode

    init_single_rank()
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.hidden // 64,
        ffn_hidden_size=4 * args.hidden,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        pipeline_dtype=torch.float32,
    )
    model = build_gpt(config, local_gpt_layer_spec(), 1024, args.seq)
    tokens = torch.randint(0, 1024, (args.batch, args.seq))
    positions = torch.arange(args.seq).unsqueeze(0).expand_as(tokens)

    def step():  # attention_mask=None: megatron-core builds the causal mask with device="cuda"
        model(tokens, positions, None, labels=tokens).mean().backward()

    def step_under_global_mode():
        with _GlobalDeviceRemap():
            step()

    assert cpu_mode.is_active()
    ours, reference = interleaved_medians(step, step_under_global_mode, args.rounds)
    ratio = reference / ours
    report(
        {
            "bench": "cpu_mode_overhead",
            "model": vars(args),
            "step_ms_cpu_mode": round(ours * 1e3, 2),
            "step_ms_global_torch_function_mode": round(reference * 1e3, 2),
            "ratio_global_mode_over_cpu_mode": round(ratio, 3),
            "torch_threads": torch.get_num_threads(),
        },
        f"cpu_mode_overhead: {ours * 1e3:.1f} ms/step with CPU mode's per-module remap vs "
        f"{reference * 1e3:.1f} ms/step under a global TorchFunctionMode: ratio {ratio:.3f}",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
