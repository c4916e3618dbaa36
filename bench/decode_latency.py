"""Decode latency of dense, BTX, BAM and BAM shared-KV: bam-generate's KV cache vs the HF export's.

Random weights at the paper-590m shapes (d=1024, 8 heads of 128, 8 KV heads, SwiGLU 2048, vocab
256,000, untied; 4 experts, FFN top-1; ``--layers`` may be fewer than the preset's 6, the same for
every variant). A prompt of 256 random tokens and 16 greedy new tokens, batch 1 and 8, through
`bam_megatron.inference.generate.Decoder` (bam-generate's loop over megatron-core's
StaticInferenceContext) and through the remote-code Hugging Face export (`modeling_bam`'s
BamForCausalLM with the weights and config.json `bam_format.to_bam` makes, as
`bam-convert-hf export` does; stepped as ``generate(cache_implementation="static")`` steps it: a
transformers StaticCache of prompt + new tokens positions, ``--hf-attn`` attention (default sdpa);
``--hf-cache dynamic`` for the DynamicCache; at batch 1 its own ``generate`` is also run and must
give the same tokens), side by side in one process.
Every model is resident; after one prefill each, the decode steps alternate between all of them,
step by step (``--rounds`` times over, rewinding to the prefill). All models share one embedding
and output layer (same shapes; saves memory, not work).

Latency: the median decode step (seconds per step; per generated token = / batch). The **limit**
of a variant's latency ratio to BTX is the ratio of the bytes a decode step must read, per
generated token: every weight it touches (all attention weights and routers, the final norm and
output layer, the embedding rows of the batch, and of the FFN experts the expected share a batch
of B tokens touches under uniform top-k routing, 1 - (1 - k/E)^B) plus the whole KV cache at the
step's context. Goal: every ratio within 5% of its limit. Also reported: the ratio of forward
FLOPs per token, the bound where a step is compute-bound rather than bandwidth-bound (as CPU
GEMMs of a few rows are).

    python bench/decode_latency.py [--layers 6 --batch 1 8 --prompt 256 --new-tokens 16 --rounds 2 --threads 1]
    python bench/decode_latency.py --device cuda             # on a GPU (the default where there is one)
    python bench/decode_latency.py --profile bam --batch 8   # where each implementation's decode step goes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import bam_megatron  # noqa: E402,F401
from bench.common import init_single_rank, report  # noqa: E402

VARIANTS = ("dense", "btx", "bam", "bam-shared-kv")
BYTES = 4  # fp32
IMPLEMENTATIONS = ("bam_generate", "hf_export")


def architecture(variant: str, layers: int, experts: int):
    """The paper-590m architecture of ``variant`` with ``layers`` layers."""
    from bam_megatron.model.architecture import Architecture
    from bam_megatron.model.variants import PRESETS

    p = PRESETS["paper-590m"]
    return Architecture(
        variant,
        num_layers=layers,
        hidden_size=p.hidden_size,
        ffn_hidden_size=p.ffn_hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_query_groups=p.num_query_groups,
        padded_vocab_size=p.vocab_size,
        num_experts=None if variant == "dense" else experts,
        untie_embeddings_and_output_weights=p.untie_embeddings,
    )


def build_pair(variant: str, layers: int, experts: int, shared: dict, seq_length: int, device: str, attn: str):
    """(our GPTModel, the HF remote-code model holding the same tensors, the architecture, our config)."""
    from bam_megatron.checkpoint import CheckpointMeta
    from bam_megatron.conversion.hf import bam_format
    from bam_megatron.conversion.hf.remote.configuration_bam import BamConfig
    from bam_megatron.conversion.hf.remote.modeling_bam import BamForCausalLM
    from bam_megatron.model.builder import build_from_architecture

    arch = architecture(variant, layers, experts)
    config = arch.model_config(use_cpu_initialization=device == "cpu", perform_initialization=False)
    model = build_from_architecture(arch, config, seq_length, backend="local").eval().to(device)
    generator = torch.Generator(device=device).manual_seed(VARIANTS.index(variant))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in shared:
                param.data = shared[name]
            elif param.dim() == 1:  # norms
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    weights = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    tensors, hf_config = bam_format.to_bam(weights, config, CheckpointMeta(arch, seq_length=seq_length), {})
    hf_config = {k: v for k, v in hf_config.items() if k not in ("architectures", "auto_map", "model_type")}
    with torch.device("meta"):
        hf = BamForCausalLM(BamConfig(**hf_config, attn_implementation=attn))
    hf.load_state_dict({k: v.contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    return model, hf.eval().to(device), arch, config


def bytes_per_token(model, config, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step of ``batch`` rows at ``context`` cached positions reads, per generated token."""
    experts, topk = config.num_moe_experts, config.moe_router_topk
    touched = 1 - (1 - topk / experts) ** batch if experts else 1.0
    weights = 0.0
    for name, param in model.named_parameters():
        if name.startswith("embedding."):
            weights += batch * param.shape[-1]
        elif ".mlp.experts." in name:
            weights += touched * param.numel()
        else:
            weights += param.numel()
    kv = config.num_layers * 2 * context * batch * config.attention_kv_groups * config.kv_channels
    return {"weights": weights * BYTES / batch, "kv_cache": kv * BYTES / batch, "total": (weights + kv) * BYTES / batch}


def flops_per_token(model, config, context: float) -> float:
    """Forward FLOPs one generated token costs: 2 per weight it passes through (its top-k experts'
    share of the FFN experts, every other matrix but the embedding) + attention over the context."""
    experts, topk = config.num_moe_experts, config.moe_router_topk
    weights = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or name.startswith("embedding."):
            continue
        weights += param.numel() * (topk / experts if ".mlp.experts." in name else 1.0)
    heads = config.num_attention_experts * config.num_attention_heads
    return 2 * weights + config.num_layers * 2 * 2 * context * heads * config.kv_channels


class HuggingFaceDecoder:
    """The HF export's KV-cached greedy decoding, one step per call, as its ``generate`` runs the
    model: the prompt once (``logits_to_keep=1``), then the last token with the cache
    (``static``: a StaticCache of prompt + new tokens positions, as ``generate(cache_implementation=
    "static")`` allocates it; ``dynamic``: the DynamicCache the model makes)."""

    def __init__(self, hf, prompts: torch.Tensor, new_tokens: int, cache: str = "static") -> None:
        self.hf, self.prompts, self.new_tokens, self.kind = hf, prompts, new_tokens, cache
        self.cache, self.tokens, self.step_seconds, self.prefill_seconds = None, [], [], 0.0

    @property
    def finished(self) -> bool:
        """All new tokens are there."""
        return len(self.tokens) == self.new_tokens

    def step(self) -> None:
        """The prefill, or one decode step."""
        clock = time.perf_counter()
        with torch.no_grad():
            if self.cache is None:
                cache = None
                if self.kind == "static":
                    from transformers import StaticCache

                    length = self.prompts.shape[1] + self.new_tokens
                    cache = StaticCache(config=self.hf.config, max_cache_len=length)
                out = self.hf(self.prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                out = self.hf(self.tokens[-1][:, None], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.cache = out.past_key_values
            self.tokens.append(out.logits[:, -1].argmax(-1))
        if self.prompts.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - clock
        if len(self.tokens) == 1:
            self.prefill_seconds = elapsed
        else:
            self.step_seconds.append(elapsed)

    def restart_decoding(self) -> None:
        """Back to just after the prefill (the cache keeps the prompt's positions)."""
        if self.kind == "static":  # rewind the write position; later slots are rewritten before a query sees them
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.prompts.shape[1])
        else:
            self.cache.crop(self.prompts.shape[1] - self.cache.get_seq_length())
        self.tokens, self.step_seconds = self.tokens[:1], []

    def new(self) -> list[list[int]]:
        """The new tokens of each row."""
        return torch.stack(self.tokens, dim=1).tolist()


def hf_generate_tokens(hf, prompts: torch.Tensor, new_tokens: int, cache: str) -> list[list[int]]:
    """Greedy tokens of the export's own ``generate`` (a check that the step loop is what it does)."""
    with torch.no_grad():
        out = hf.generate(
            prompts,
            cache_implementation="static" if cache == "static" else None,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].tolist()


def profile(decoder, rows: int = 25) -> str:
    """torch.profiler table of a decoder's decode steps (after the prefill and one warm-up step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    decoder.step()  # prefill
    decoder.step()  # warm-up
    with torch_profile(activities=activities) as prof:
        while not decoder.finished:
            decoder.step()
    steps = getattr(decoder, "result", decoder).step_seconds[1:]
    header = f"{len(steps)} decode steps, median {statistics.median(steps) * 1e3:.1f} ms (under the profiler)\n"
    return header + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="times the 15 decode steps are run after one prefill")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a shared machine, OpenMP threads stall)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models run (default: cuda when there is a GPU)",
    )
    parser.add_argument(
        "--hf-cache", choices=("static", "dynamic"), default="static", help="the HF export's KV cache (transformers')"
    )
    parser.add_argument(
        "--hf-attn",
        default="sdpa",
        help="the HF export's attn_implementation (eager, sdpa, flex_attention, ...: transformers' interface)",
    )
    parser.add_argument(
        "--profile",
        choices=VARIANTS,
        default=None,
        help="profile one variant's decode steps, both implementations (at the first --batch)",
    )
    args = parser.parse_args()
    if "btx" not in args.variants:
        parser.error("--variants must include btx (the reference)")
    init_single_rank()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()

    from bam_megatron.model.variants import PRESETS

    p = PRESETS["paper-590m"]
    seq_length = args.prompt + args.new_tokens
    generator = torch.Generator().manual_seed(0)
    shared = {
        name: (torch.randn(p.vocab_size, p.hidden_size, generator=generator) * 0.02).to(args.device)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight")
    }
    variants = [args.profile] if args.profile else args.variants
    models = {
        v: build_pair(v, args.layers, args.experts, shared, seq_length, args.device, args.hf_attn) for v in variants
    }
    built_s = time.perf_counter() - clock
    if args.profile:
        from bam_megatron.inference.generate import Decoder

        prompts = torch.randint(4, p.vocab_size, (args.batch[0], args.prompt), generator=generator).to(args.device)
        model, hf, _, _ = models[args.profile]
        print(f"bam-generate, {args.profile}, batch {args.batch[0]}:")
        print(profile(Decoder(model, prompts.tolist(), args.new_tokens)))
        print(f"HF export, {args.profile}, batch {args.batch[0]}:")
        print(profile(HuggingFaceDecoder(hf, prompts, args.new_tokens, args.hf_cache)))
        return

    from bam_megatron.inference.generate import Decoder

    runs: dict = {}
    for batch in args.batch:
        prompts = torch.randint(4, p.vocab_size, (batch, args.prompt), generator=generator).to(args.device)
        decoders = {}
        for variant in variants:
            model, hf, _, _ = models[variant]
            decoders[(variant, "bam_generate")] = Decoder(model, prompts.tolist(), args.new_tokens)
            decoders[(variant, "hf_export")] = HuggingFaceDecoder(hf, prompts, args.new_tokens, args.hf_cache)
        order = list(decoders)
        for decoder in decoders.values():
            decoder.step()  # prefill
        for round_ in range(args.rounds):
            if round_:
                for decoder in decoders.values():
                    decoder.restart_decoding()
            for step in range(args.new_tokens - 1):  # step by step, every model in turn: noise hits all alike
                for key in order[step % len(order) :] + order[: step % len(order)]:
                    decoders[key].step()
            for key, decoder in decoders.items():
                run = runs.setdefault((batch,) + key, {"steps": []})
                result = decoder.result if key[1] == "bam_generate" else decoder
                run["steps"] += result.step_seconds
                run["prefill"] = result.prefill_seconds
                run["tokens"] = result.tokens if key[1] == "bam_generate" else decoder.new()
                run["kv_cache_bytes"] = getattr(result, "kv_cache_bytes", None)
        if batch == 1:  # the export's own generate: the same tokens as its step loop
            for variant in variants:
                runs[(batch, variant, "hf_export")]["generate_tokens"] = hf_generate_tokens(
                    models[variant][1], prompts, args.new_tokens, args.hf_cache
                )
        del decoders

    context = args.prompt + args.new_tokens / 2  # positions a decode step reads, averaged (its own included)
    results, lines = {}, []
    for batch in args.batch:
        limits = {v: bytes_per_token(models[v][0], models[v][3], batch, context) for v in variants}
        flops = {v: flops_per_token(models[v][0], models[v][3], context) for v in variants}
        rows = {}
        for variant in variants:
            row = {
                "limit_bytes_per_token": {k: round(v) for k, v in limits[variant].items()},
                "limit_ratio_to_btx": round(limits[variant]["total"] / limits["btx"]["total"], 4),
                "flops_per_token": round(flops[variant]),
                "flops_ratio_to_btx": round(flops[variant] / flops["btx"], 4),
            }
            for impl in IMPLEMENTATIONS:
                run, ref = runs[(batch, variant, impl)], runs[(batch, "btx", impl)]
                median, ref_median = statistics.median(run["steps"]), statistics.median(ref["steps"])
                ratio = median / ref_median
                row[impl] = {
                    "ms_per_step_median": round(median * 1e3, 2),
                    "ms_per_step_min": round(min(run["steps"]) * 1e3, 2),
                    "ms_per_token": round(median * 1e3 / batch, 2),
                    "steps_timed": len(run["steps"]),
                    "prefill_s": round(run["prefill"], 3),
                    "ratio_to_btx": round(ratio, 4),
                    "ratio_to_btx_of_minima": round(min(run["steps"]) / min(ref["steps"]), 4),
                    "ratio_over_limit": round(ratio / row["limit_ratio_to_btx"], 4),
                    "within_5_percent": abs(ratio / row["limit_ratio_to_btx"] - 1) <= 0.05,
                }
            row["bam_generate"]["kv_cache_bytes"] = runs[(batch, variant, "bam_generate")]["kv_cache_bytes"]
            ours_tokens, hf = runs[(batch, variant, "bam_generate")]["tokens"], runs[(batch, variant, "hf_export")]
            row["same_tokens_as_hf"] = (
                ours_tokens == hf["tokens"] and hf.get("generate_tokens", hf["tokens"]) == hf["tokens"]
            )
            rows[variant] = row
        results[f"batch_{batch}"] = rows
        parts = [
            f"{v} {rows[v]['bam_generate']['ratio_to_btx']:.3f}/{rows[v]['hf_export']['ratio_to_btx']:.3f} "
            f"(limit {rows[v]['limit_ratio_to_btx']:.3f}, FLOPs {rows[v]['flops_ratio_to_btx']:.3f})"
            for v in variants
            if v != "btx"
        ]
        btx = rows["btx"]
        lines.append(
            f"b={batch}: BTX {btx['bam_generate']['ms_per_step_median']:.0f}/"
            f"{btx['hf_export']['ms_per_step_median']:.0f} ms/step; " + ", ".join(parts)
        )
    ok = all(
        r[impl]["within_5_percent"] for rows in results.values() for r in rows.values() for impl in IMPLEMENTATIONS
    )
    same = all(r["same_tokens_as_hf"] for rows in results.values() for r in rows.values())
    report(
        {
            "bench": "decode_latency",
            "config": vars(args),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "results": results,
            "build_seconds": round(built_s, 1),
            "total_seconds": round(time.perf_counter() - clock, 1),
            "goal": "every latency ratio to BTX within 5% of its bytes-read limit",
            "goal_met": ok,
            "same_greedy_tokens_as_hf": same,
        },
        "decode_latency, ratio to BTX (bam-generate/HF export): "
        + "; ".join(lines)
        + f"; goal {'met' if ok else 'missed'}; tokens {'equal' if same else 'DIFFER'}",
    )


if __name__ == "__main__":
    main()
