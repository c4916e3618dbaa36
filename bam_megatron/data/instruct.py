"""Instruction-tuning data: prompt/response JSONL as padded samples, loss on the response only.

Input: JSONL, one object per line, ``{"prompt": "...", "response": "..."}`` (other keys are
ignored; the key names are flags: ``--instruct-prompt-key``, ``--instruct-response-key``). Blank
lines are skipped; any other unusable line is an error naming the file and line number.

Each pair becomes one sample of ``seq_length`` tokens (padded batches; no packing)::

    sequence  = tokenize(prompt) + tokenize(response) + [eod]      (then right-padded with pad)
    tokens    = sequence[:-1]      labels = sequence[1:]
    loss_mask = 1 where the label is a response token or the final eod, 0 on the prompt and padding

The prompt and the response are tokenized separately, so their boundary is always a token
boundary (SentencePiece starts each with a word-initial piece). A sequence longer than
``seq_length + 1`` tokens is cut at the end (its response loses its tail and the eod; counted);
a pair whose prompt alone fills the window has no response token to learn from and is dropped
(counted). Padding only ever follows the real tokens, and attention is causal, so padding never
changes the loss of a real token.

Samples carry the keys megatron-core's GPTDataset returns (tokens, labels, loss_mask,
position_ids), so `bam_megatron.training.batches.MicroBatches` batches them unchanged. Training
visits the pairs in a fresh seeded order every epoch; validation keeps file order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy

from bam_megatron.data.errors import DataError
from bam_megatron.data.jsonl import InvalidLine, is_blank, open_input, parse_line

PROMPT_KEY, RESPONSE_KEY = "prompt", "response"


def read_pairs(path: str, prompt_key: str = PROMPT_KEY, response_key: str = RESPONSE_KEY) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file; ``DataError`` naming file and line on a bad line."""
    pairs = []
    with open_input(path) as f:
        for number, raw in enumerate(f, start=1):
            if is_blank(raw):
                continue
            try:
                prompt, response = parse_line(raw, (prompt_key, response_key))
            except InvalidLine as error:
                raise DataError(f"{path}:{number}: {error}") from None
            if not response.strip():
                raise DataError(f"{path}:{number}: empty {response_key!r}: nothing to learn from")
            pairs.append((prompt, response))
    if not pairs:
        raise DataError(f"{path}: no prompt/response pairs")
    return pairs


@dataclass
class Encoded:
    """Tokenized samples, stacked: tokens/labels int64 [n, s], loss_mask float32 [n, s]."""

    tokens: numpy.ndarray
    labels: numpy.ndarray
    loss_mask: numpy.ndarray
    truncated: int
    dropped: int


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any, seq_length: int) -> Encoded:
    """Tokenize, concatenate, cut and pad every pair (see the module docstring for the layout)."""
    eod = tokenizer.eod
    pad = tokenizer.pad if tokenizer.pad >= 0 else eod
    tokens, labels, masks = [], [], []
    truncated = dropped = 0
    for prompt, response in pairs:
        p, r = tokenizer.tokenize(prompt), tokenizer.tokenize(response)
        if len(p) >= seq_length:
            dropped += 1
            continue
        sequence = p + r + [eod]
        if len(sequence) > seq_length + 1:
            truncated += 1
            sequence = sequence[: seq_length + 1]
        n = len(sequence) - 1  # real (input, label) positions
        row = numpy.full(seq_length + 1, pad, dtype=numpy.int64)
        row[: len(sequence)] = sequence
        mask = numpy.zeros(seq_length, dtype=numpy.float32)
        # labels[i] = sequence[i + 1]: the response and eod from i = len(p) - 1 (without a prompt,
        # the response's first token has nothing before it to be predicted from)
        mask[max(len(p) - 1, 0) : n] = 1.0
        tokens.append(row[:-1])
        labels.append(row[1:])
        masks.append(mask)
    if not tokens:
        raise DataError(
            f"every prompt is at least --seq-length {seq_length} tokens long: no response token to train on"
        )
    return Encoded(numpy.stack(tokens), numpy.stack(labels), numpy.stack(masks), truncated, dropped)


class InstructDataset:
    """Map-style dataset of encoded pairs, ``num_samples`` long.

    With a ``seed``, index i reads pair ``perm_e[i mod n]`` where e = i // n and perm_e is a
    permutation drawn from (seed, e): every epoch sees every pair once, in its own order.
    """

    def __init__(self, encoded: Encoded, num_samples: Optional[int] = None, seed: Optional[int] = None) -> None:
        self.encoded = encoded
        self.size = len(encoded.tokens)
        self.num_samples = num_samples or self.size
        self.seed = seed
        self._orders: dict[int, numpy.ndarray] = {}
        self._positions = numpy.arange(encoded.tokens.shape[1], dtype=numpy.int64)

    def __len__(self) -> int:
        return self.num_samples

    def _pair(self, index: int) -> int:
        epoch, offset = divmod(index, self.size)
        if self.seed is None:
            return offset
        if epoch not in self._orders:
            self._orders = {epoch: numpy.random.default_rng([self.seed, epoch]).permutation(self.size)}
        return int(self._orders[epoch][offset])

    def __getitem__(self, index: int) -> dict[str, numpy.ndarray]:
        i = self._pair(int(index) % self.num_samples)
        e = self.encoded
        return {
            "tokens": e.tokens[i],
            "labels": e.labels[i],
            "loss_mask": e.loss_mask[i],
            "position_ids": self._positions,
        }


def fingerprint(paths: Sequence[Optional[str]], keys: Sequence[str], seq_length: int, seed: int) -> str:
    """Hash of what decides the samples and their order (file contents, keys, length, seed)."""
    h = hashlib.sha256(json.dumps(["instruct", list(keys), seq_length, seed]).encode())
    for path in paths:
        if path is not None:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def build_instruct_datasets(
    train_path: str,
    valid_path: Optional[str],
    tokenizer: Any,
    seq_length: int,
    seed: int,
    train_samples: int,
    prompt_key: str = PROMPT_KEY,
    response_key: str = RESPONSE_KEY,
):
    """(train dataset of ``train_samples`` shuffled samples, {'instruct': validation} or {},
    fingerprint, one-line summary)."""
    if tokenizer is None:
        raise DataError("--instruct-data-path needs --tokenizer-model")
    keys = (prompt_key, response_key)
    train = encode_pairs(read_pairs(train_path, *keys), tokenizer, seq_length)
    valid_sets = {}
    summary = f"instruction data: {len(train.tokens)} training pairs"
    if valid_path is not None:
        valid = encode_pairs(read_pairs(valid_path, *keys), tokenizer, seq_length)
        valid_sets["instruct"] = InstructDataset(valid)
        summary += f", {len(valid.tokens)} validation pairs"
    cut = train.truncated + sum(d.encoded.truncated for d in valid_sets.values())
    dropped = train.dropped + sum(d.encoded.dropped for d in valid_sets.values())
    summary += f" ({cut} cut to --seq-length {seq_length}, {dropped} dropped: prompt fills the window)"
    train_set = InstructDataset(train, train_samples, seed)
    return train_set, valid_sets, fingerprint([train_path, valid_path], keys, seq_length, seed), summary
