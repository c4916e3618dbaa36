"""Greedy generation from a directory written by ``bam-convert-hf export``, with transformers alone.

    python examples/hf_generate.py hf/bam --prompt "def add(a, b):" --max-new-tokens 32
    python examples/hf_generate.py hf/seed --token-ids 17,42,99

Works for both export formats: ``cohere`` loads as transformers' own CohereForCausalLM, ``bam``
through the directory's own model code (``trust_remote_code=True``; it imports only torch and
transformers). Text goes through the SentencePiece ``tokenizer.model`` the export copied (the
tokenizer the model was trained with; documents were encoded without a BOS token, so none is
added here); without one, pass token ids. The exported vocabulary keeps Megatron's padding rows
(ids the tokenizer never produces); with a tokenizer they are suppressed, so every generated id
decodes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags of the example."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a directory written by bam-convert-hf export")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text, encoded with the directory's tokenizer.model")
    source.add_argument("--token-ids", help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Load, generate greedily, print the new token ids (and their text when there is a tokenizer)."""
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer_path = os.path.join(args.model_dir, "tokenizer.model")
    sp = None
    if os.path.isfile(tokenizer_path):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    if args.prompt is not None:
        if sp is None:
            print(f"error: no tokenizer.model in {args.model_dir}; pass --token-ids", file=sys.stderr)
            return 2
        prompt = sp.encode(args.prompt)
    else:
        prompt = [int(t) for t in args.token_ids.split(",") if t.strip()]

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    padding = list(range(sp.get_piece_size(), model.config.vocab_size)) if sp is not None else []
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=args.max_new_tokens,
            suppress_tokens=padding or None,
        )
    new = out[0, len(prompt) :].tolist()
    print(f"{type(model).__name__}: {len(new)} new tokens: {new}")
    if sp is not None:
        print(repr(sp.decode(prompt + new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
