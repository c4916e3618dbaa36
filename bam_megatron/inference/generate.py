"""Autoregressive generation with megatron-core's static KV cache, for every variant.

    result = generate(model, [[5, 8, 13]], max_new_tokens=16)            # greedy, KV-cached
    result = generate(model, prompts, 16, Sampling(temperature=0.8, top_p=0.9, seed=1))
    result = generate(model, prompts, 16, use_kv_cache=False)           # the uncached reference

The model is this rank's megatron-core `GPTModel` (`bam_megatron.checkpoint.models.load_model`, or
any model the builder makes) in eval mode. With the KV cache, one forward pass encodes the prompts
(up to the shortest prompt's length: the *prefill*), then each step feeds one position of every row
through megatron-core's `StaticInferenceContext`, which holds each attention layer's keys and
values (dense and BTX: megatron-core's `SelfAttention`; BAM: soft MoA's wide attention, whose
cache is its N·H_kv key/value groups, or H_kv with shared KV). Rows whose prompt is longer are fed
their own prompt tokens until it ends, as megatron-core's static engine does. Without the cache,
every step re-runs the whole sequence so far: the same tokens, at quadratic cost.

Tensor parallelism: every rank of the TP group runs the same loop; the output layer's logits are
gathered over the group (megatron-core's ``runtime_gather_output``) and the chosen tokens are
broadcast from the group's first rank, so all ranks feed the same tokens. Pipeline parallelism is
not supported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bam_megatron.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature == 0``, the default) or sampled from
    softmax(logits / temperature), restricted to the ``top_k`` most likely tokens (0: all) and to
    the smallest set whose probability reaches ``top_p`` (1: all). ``seed`` seeds the sampler."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0


def sample(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [b] from logits [b, vocab]: argmax, or a draw after temperature, top-k and top-p.

    Draws happen on the CPU with ``generator``, so a seed gives the same tokens on any device.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = logits.detach().float().cpu() / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    choice = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return choice.to(logits.device)


@dataclass
class Generation:
    """What `generate` returns (identical on every rank).

    ``tokens``: the new tokens of each prompt (at most ``max_new_tokens``; fewer after ``eos_id``,
    which is included). ``logits``: with ``keep_logits``, the logits [b, vocab] each step chose
    from, one per step in order (step i predicts position ``min(prompt lengths) + i``).
    ``prefill_seconds`` / ``step_seconds``: wall time of the first forward pass and of each later
    step (forward + choice). ``kv_cache_bytes``: bytes of the KV-cache tensors this rank allocated
    (0 without the cache).
    """

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    kv_cache_bytes: int = 0


def kv_cache_bytes(context: Any) -> int:
    """Bytes held by a `StaticInferenceContext`'s key and value tensors (all layers of this rank)."""
    return sum(t.numel() * t.element_size() for pair in context.key_value_memory_dict.values() for t in pair)


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the token tensors go there too)."""
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SameOnTensorParallelRanks:
    """Broadcast each step's tokens from the first rank of the tensor-parallel group."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.size = parallel_state.get_tensor_model_parallel_world_size()
        if self.size > 1:
            self.group = parallel_state.get_tensor_model_parallel_group()
            self.src = parallel_state.get_tensor_model_parallel_src_rank()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.broadcast(tokens, self.src, group=self.group)
        return tokens


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """A `ConfigError` for an empty prompt or a token id outside the model's vocabulary."""
    if not prompts:
        raise ConfigError("no prompt given")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ConfigError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")


class Decoder:
    """`generate`'s loop, one step per call: the prefill first, then one position per `step`.

    For benchmarks that interleave several models step by step; `restart_decoding` rewinds to
    just after the prefill (the KV cache keeps the prompt; later positions are overwritten).
    Arguments as `generate`'s.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        use_kv_cache: bool = True,
        eos_id: Optional[int] = None,
        keep_logits: bool = False,
    ) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        if model.training:
            raise ValueError("generate needs the model in eval mode (model.eval())")
        if max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        check_prompts(prompts, model.vocab_size)
        self.model, self.sampling, self.eos_id, self.keep_logits = model, sampling, eos_id, keep_logits
        self.max_new_tokens = max_new_tokens
        self.lengths = [len(p) for p in prompts]
        batch, self.start, self.total = len(prompts), min(self.lengths), max(self.lengths) + max_new_tokens
        self.device = device = _device(model)
        self.tokens = torch.zeros(batch, self.total, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            self.tokens[i, : len(prompt)] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
        lengths = torch.tensor(self.lengths, device=device)
        self.in_prompt = torch.arange(self.total, device=device)[None, :] < lengths[:, None]
        self.positions = torch.arange(self.total, device=device)[None, :].expand(batch, -1)
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self.same_tokens = _SameOnTensorParallelRanks()
        self.context = StaticInferenceContext(batch, self.total) if use_kv_cache else None
        self.result = Generation(tokens=[[] for _ in prompts])
        self.done = [max_new_tokens == 0] * batch
        self.t = self.start  # the position whose token is chosen next

    @property
    def finished(self) -> bool:
        """Every row has its tokens (or stopped at eos)."""
        return self.t >= self.total or all(self.done)

    def _logits(self) -> torch.Tensor:
        """The logits [b, vocab] that predict position ``t``."""
        t = self.t
        if self.context is None:  # the whole sequence so far, every step
            return self.model(self.tokens[:, :t], self.positions[:, :t], None, runtime_gather_output=True)[:, -1]
        first = 0 if t == self.start else t - 1  # prefill (positions 0 .. start-1), then one position
        logits = self.model(
            self.tokens[:, first:t],
            self.positions[:, first:t],
            None,
            inference_context=self.context,
            runtime_gather_output=True,
        )[:, -1]
        self.context.increment_sequence_len_offset(t - first)
        self.context.enable_decode_mode()
        return logits

    def step(self) -> None:
        """One forward pass and the choice of position ``t``'s token (prompt rows keep theirs)."""
        if self.finished:
            raise RuntimeError("decoding has finished")
        clock = time.perf_counter()
        t, result = self.t, self.result
        with torch.no_grad():
            logits = self._logits()
            chosen = self.same_tokens(sample(logits, self.sampling, self.generator))
            self.tokens[:, t] = torch.where(self.in_prompt[:, t], self.tokens[:, t], chosen)
        _synchronize(self.device)
        elapsed = time.perf_counter() - clock
        if t == self.start:
            result.prefill_seconds = elapsed
        else:
            result.step_seconds.append(elapsed)
        if self.keep_logits:
            result.logits.append(logits.float().cpu())
        for i, length in enumerate(self.lengths):
            if not self.done[i] and t >= length:
                token = int(self.tokens[i, t])
                result.tokens[i].append(token)
                self.done[i] = len(result.tokens[i]) == self.max_new_tokens or token == self.eos_id
        self.t += 1
        if self.context is not None:
            result.kv_cache_bytes = kv_cache_bytes(self.context)

    def restart_decoding(self) -> None:
        """Back to just after the prefill, for prompts of one length (benchmarks: decode again)."""
        if len(set(self.lengths)) != 1 or self.t <= self.start:
            raise RuntimeError("restart_decoding needs prompts of one length, after the prefill")
        self.t = self.start + 1
        if self.context is not None:
            self.context.sequence_len_offset = self.start
        self.result.tokens = [row[:1] for row in self.result.tokens]
        self.result.logits = self.result.logits[:1]
        self.result.step_seconds = []
        self.done = [self.max_new_tokens <= 1 or row[0] == self.eos_id for row in self.result.tokens]


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    use_kv_cache: bool = True,
    eos_id: Optional[int] = None,
    keep_logits: bool = False,
) -> Generation:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens; every TP rank calls it.

    A row stops after ``eos_id`` (when given); the loop stops when every row has stopped.
    ``keep_logits``: return the logits of every step (`Generation.logits`).
    """
    decoder = Decoder(model, prompts, max_new_tokens, sampling, use_kv_cache, eos_id, keep_logits)
    while not decoder.finished:
        decoder.step()
    return decoder.result
