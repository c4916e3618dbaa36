"""How far an upcycled MoE is from each of its sources at step 0, before any training.

Upcycling copies weights, but the new routers and the averaged parts change the function: a
top-1 sparse upcycle with softmax-then-top-k routing scales every expert's output by its router
probability, and a BAM or BTX mixture of different experts cannot equal all of its sources at
once. `bam-upcycle` measures it on a few batches of random token ids and reports, per source:

- ``max_abs_logit_diff``: max |logit_moe - logit_source| over every position and vocabulary entry;
- ``kl``: mean over positions of KL(p_source || p_moe), in nats;
- ``argmax_agreement``: the share of positions where both predict the same next token.

Each model is run one unit at a time (`unit_forward.streamed_logits`: the embedding, then each
layer read and applied in turn, the hidden states of the report's tokens carried from layer to
layer), one model after another (the MoE's logits are kept, a source's are compared and dropped),
so the report needs the memory of one unit, not of a model, whatever the depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bam_megatron.checkpoint.meta import CheckpointMeta
from bam_megatron.conversion.unit_forward import streamed_logits

REPORT_SEQ_LENGTH = 64
"""Positions per batch: enough for attention to mix, short enough to be cheap."""


def function_distance(
    moe_path: str, moe_meta: CheckpointMeta, sources: Sequence[tuple[str, str, CheckpointMeta]], batches: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per source NAME (given as (name, path, meta)): the MoE's step-0 distance to it (see above).

    Runs in this process under a TP = PP = EP = 1 parallel state (bam-upcycle's).
    """
    vocab = min(meta.architecture.padded_vocab_size for _, _, meta in sources)
    seq = min(REPORT_SEQ_LENGTH, moe_meta.seq_length)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batches, 1, seq), generator=generator)
    moe = streamed_logits(moe_path, moe_meta, tokens)[..., :vocab]
    moe_log_probs = F.log_softmax(moe, dim=-1)
    report = {}
    for name, path, meta in sources:
        theirs = streamed_logits(path, meta, tokens)[..., :vocab]
        log_probs = F.log_softmax(theirs, dim=-1)
        kl = (log_probs.exp() * (log_probs - moe_log_probs)).sum(-1).mean()
        report[name] = {
            "max_abs_logit_diff": float((moe - theirs).abs().max()),
            "kl": float(kl),
            "argmax_agreement": float((moe.argmax(-1) == theirs.argmax(-1)).float().mean()),
        }
    return report


def format_report(report: dict[str, dict[str, float]]) -> str:
    """The report as a few aligned lines for the terminal."""
    width = max(len(name) for name in report)
    lines = ["step-0 distance of the MoE to each source (random tokens):"]
    for name, r in report.items():
        lines.append(
            f"  {name:<{width}}  max |dlogit| {r['max_abs_logit_diff']:.3g}  KL {r['kl']:.3g}  "
            f"argmax agreement {100 * r['argmax_agreement']:.1f}%"
        )
    return "\n".join(lines)
