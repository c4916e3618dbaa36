"""bam-convert-hf: bam-megatron checkpoints <-> Hugging Face transformers.

    # a dense LayerNorm model -> CohereForCausalLM (plain transformers, no remote code)
    bam-convert-hf export --load runs/seed --save hf/seed
    # any model (dense, btx, bam, bam-shared-kv) -> self-contained remote-code directory
    bam-convert-hf export --load runs/bam --save hf/bam --format bam
    # a Hugging Face model directory (Cohere, Llama, Mistral, Qwen2, Qwen3) -> a dense seed checkpoint
    bam-convert-hf import --load path/to/Llama-3.1-8B --save runs/llama-seed --seq-length 8192

Formats (export):

- ``cohere``: config.json + model.safetensors that transformers loads as ``CohereForCausalLM``.
  Exact for dense, parallel-block, ``--normalization LayerNorm`` models (Cohere's norm).
- ``bam``: config.json + model.safetensors + configuration_bam.py + modeling_bam.py; load with
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. Every variant.
- ``auto`` (default): ``cohere`` where it is exact, else ``bam`` (the reason is printed).

Checkpoints saved under any TP/PP/EP layout are read on one process. The SentencePiece tokenizer
the checkpoint was trained with is copied as tokenizer.model (checked against the checkpoint's
fingerprint). Import reads safetensors (single or sharded) one tensor at a time and writes the
checkpoint layer by layer (memory: about two layers, not the model); the model's tokenizer
(tokenizer.json, or a SentencePiece tokenizer.model) is copied into the checkpoint directory and
recorded. Outputs are written atomically: on any error nothing is left at --save.
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
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype in model.safetensors")
    e.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece model to ship (default: the one the checkpoint records, if unchanged)",
    )
    i = sub.add_parser("import", help="Hugging Face model directory -> dense seed checkpoint")
    i.add_argument(
        "--load",
        required=True,
        help="directory with config.json (model_type cohere, llama, mistral, qwen2 or qwen3) and safetensors",
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
    import bam_megatron  # noqa: F401  (warning filters)
    from bam_megatron.conversion.hf import convert
    from bam_megatron.errors import run_tool

    args = parse_args(argv)

    def body() -> None:
        if args.command == "export":
            report = convert.export_checkpoint(args.load, args.save, args.format, args.dtype, args.tokenizer_model)
        else:
            report = convert.import_hf(args.load, args.save, args.seq_length, args.tokenizer_model)
        for note in report.notes:
            print(f"note: {note}", flush=True)
        print(f"wrote {report.output} ({report.format})", flush=True)

    return run_tool("bam-convert-hf", body)
