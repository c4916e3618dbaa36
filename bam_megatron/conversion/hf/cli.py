"""bam-convert-hf: bam-megatron checkpoints <-> Hugging Face transformers.

    # any checkpoint -> the transformers class that computes it exactly, else remote code (auto)
    bam-convert-hf export --load runs/seed --save hf/seed
    # a BTX model -> Qwen2MoeForCausalLM (softmax-then-top-k routing), no remote code
    bam-convert-hf export --load runs/btx --save hf/btx --format qwen2_moe --max-shard-size 2GB
    # any model (dense, btx, bam, bam-shared-kv; either block) -> self-contained remote code
    bam-convert-hf export --load runs/bam --save hf/bam --format bam
    # a Hugging Face model directory -> a seed checkpoint (dense, or btx from Qwen2-MoE / Qwen3-MoE / Mixtral)
    bam-convert-hf import --load path/to/Llama-3.1-8B --save runs/llama-seed --seq-length 8192

Export formats (docs/hf.md has the table of which variant and block goes where, and why):

- ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3``: dense sequential-block models (Llama's
  decoder; Qwen2 with q/k/v biases, Qwen3 with q/k norms, Phi-3/Phi-4 with fused projections);
- ``cohere``: dense parallel-block models with bias-free LayerNorm;
- ``qwen2_moe`` (softmax over all experts, top-k as they are, or renormalised), ``qwen3_moe``
  (with q/k norms), ``mixtral`` (renormalised): BTX, sequential block;
- ``bam``: remote code (``trust_remote_code=True``), every variant and block;
- ``auto`` (default): the family the seed was imported from, else the first class above that
  computes the model exactly (``qwen2`` and ``phi3`` only for seeds imported from them), else
  ``bam`` (the reason is printed). Forcing a class that cannot
  compute the model is refused naming the setting.

Export reads the checkpoint (any TP/PP/EP layout) one layer at a time and writes safetensors
tensor by tensor, sharded past --max-shard-size (model.safetensors.index.json), with config.json,
generation_config.json and the tokenizer (AutoTokenizer loads it: a Hugging Face tokenizer is
copied; a SentencePiece model is shipped with a tokenizer.json that encodes as it does). A native
export is loaded back by transformers before it is published: a missing, unexpected or mis-shaped
weight refuses it. Import reads safetensors one tensor at a time and writes the checkpoint layer
by layer; the model's tokenizer is copied and recorded. Outputs are written atomically: on any
error nothing is left at --save.
Exit status: 0 done, 2 bad input (one line on stderr naming the file, tensor or setting).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags of bam-convert-hf."""
    from bam_megatron.conversion.hf.convert import DTYPES, FORMATS

    p = argparse.ArgumentParser(
        prog="bam-convert-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="bam-megatron checkpoint -> Hugging Face directory")
    e.add_argument("--load", required=True, help="checkpoint: a --save directory (its latest) or an iter_* directory")
    e.add_argument("--save", required=True, help="output Hugging Face directory (must not exist)")
    e.add_argument("--format", choices=FORMATS, default="auto", help="see above (default: auto)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype in the safetensors")
    e.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard (transformers' units: 5GB = 5e9 bytes, 2GiB = 2^31; default: 5GB)",
    )
    e.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer to ship: a SentencePiece .model file or a Hugging Face tokenizer directory "
        "(default: the one the checkpoint records, if unchanged)",
    )
    i = sub.add_parser("import", help="Hugging Face model directory -> seed checkpoint")
    i.add_argument(
        "--load",
        required=True,
        help="directory with config.json (model_type cohere, llama, mistral, qwen2, qwen3, phi3, qwen2_moe, "
        "qwen3_moe, mixtral, or bam_megatron: our remote-code exports) and safetensors",
    )
    i.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    i.add_argument(
        "--seq-length", type=int, default=None, help="recorded --seq-length (default: max_position_embeddings)"
    )
    i.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer to copy and record: a SentencePiece .model file or a Hugging Face tokenizer directory "
        "(default: the model directory's tokenizer.json, else its tokenizer.model, if any)",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of bam-convert-hf / tools/convert_hf.py; exit code 2 for bad input."""
    from bam_megatron.conversion.hf import convert
    from bam_megatron.errors import run_tool

    args = parse_args(argv)

    def body() -> None:
        if args.command == "export":
            report = convert.export_checkpoint(
                args.load, args.save, args.format, args.dtype, args.tokenizer_model, args.max_shard_size
            )
        else:
            report = convert.import_hf(args.load, args.save, args.seq_length, args.tokenizer_model)
        for note in report.notes:
            print(f"note: {note}", flush=True)
        print(f"wrote {report.output} ({report.format})", flush=True)

    return run_tool("bam-convert-hf", body)
