"""Grow a trained mixture: add domain experts to a BAM, BAM shared-KV or BTX model, or drop some,
without starting over (``bam-upcycle --extend MIXTURE``; docs/phases.md).

Per new dense source and layer, the mixture gains one FFN expert (the source's FFN) and, for soft
MoA, one attention expert (the source's Q, K, V and O; with shared K/V only its Q and O: the
mixture's shared K and V are kept, and the new expert's queries attend over them). Everything the
experts share is kept from the mixture, not re-averaged: embeddings, norms, the output layer and
(BTX) the attention. Each router gains a row per new expert, set to the mean of its old rows (see
`new_router_rows`). ``--drop-expert NAME`` removes an expert and its router rows. The result is
written layer by layer like an upcycle, and its lineage records which expert joined or left, from
which checkpoint, at which step.

Exact growth: a mixture that gains experts gets a per-expert router bias (``router_bias``; the old
experts keep theirs, 0 if they had none) and a ramp of logit offsets for the new experts
(`bam_megatron.model.router_ramp`): -1024 at step 0, which makes every new gate exactly 0 and the
grown mixture bit for bit the old one, then from -16 at step 1 to 0 at step ``iters``, while the
bias itself trains from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from bam_megatron.checkpoint import CheckpointError, CheckpointMeta, check_same_architecture, lineage
from bam_megatron.model.architecture import Architecture
from bam_megatron.model.router_ramp import (
    DEFAULT_RAMP_ITERS,
    DEFAULT_RAMP_START,
    LINEAGE_KEY,
    RouterRamp,
    folded_bias,
    ramp_of,
)

MIXTURES = ("bam", "bam-shared-kv", "btx")
# A soft-MoA layer's attention tensors, grown together (`GrowMixer._attention`).
SOFT_MOA_TENSORS = tuple(
    f"self_attention.{t}"
    for t in ("linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight", "q_layernorm.weight", "k_layernorm.weight")
)


@dataclass(frozen=True)
class Slot:
    """Where expert slot i of the grown mixture comes from: old expert ``index`` of the mixture, or
    new source ``index``."""

    new: bool
    index: int


def slots(names: Sequence[str], new: Sequence[str], drop: Sequence[str]) -> tuple[list[Slot], list[str]]:
    """The grown mixture's slots and names: the old experts but the dropped ones, then the new ones."""
    kept = [Slot(False, i) for i, name in enumerate(names) if name not in drop]
    out = [names[s.index] for s in kept] + list(new)
    return kept + [Slot(True, j) for j in range(len(new))], out


def new_router_rows(old: torch.Tensor, count: int) -> torch.Tensor:
    """Router rows for ``count`` new experts: the mean of the old rows.

    A token's logit for the new expert is then the mean of its old logits, never above the largest:
    top-1 FFN routing keeps choosing an old expert on every token where the old logits differ, and
    soft MoA gives the new attention expert a gate no larger than the average. Neither is exactly
    the old function (the softmax's denominator grows); bam-upcycle measures the change.
    """
    return old.mean(0, keepdim=True).expand(count, -1).clone()


def check_lineage(mixture: CheckpointMeta, mixture_path: str, new: Sequence, allow_foreign: bool) -> list[str]:
    """Refuse (or, with ``allow_foreign``, warn about) new sources not branched from the mixture's seed.

    A source belongs when its root (the checkpoint its weights were first initialised from) is the
    root of one of the mixture's sources, or one of those sources itself. Returns the warnings.
    """
    upcycled = mixture.lineage.get("upcycled") or {}
    known = set()
    for source in upcycled.get("sources", []):
        known.add(source["hash"])
        if source.get("root"):
            known.add(source["root"]["hash"])
    warnings = []
    for source in new:
        root = lineage.root_of(source.path, source.meta)
        if root["hash"] in known:
            continue
        message = (
            f"source {source.name} ({source.path}) was not branched from the seed of mixture {mixture_path} "
            f"(its root {root['path']} is none of the mixture's sources or their roots)"
        )
        if not allow_foreign:
            raise CheckpointError(message + "; pass --allow-foreign-lineage to add it anyway")
        warnings.append(message)
    return warnings


def grown_architecture(
    mixture: Architecture, new: Sequence, experts: int, path: str, router_bias: Optional[bool] = None
) -> Architecture:
    """The mixture's architecture with ``experts`` experts; new sources must be its dense form.

    ``router_bias`` (None: on when experts join, so that growth is exact; else the mixture's): the
    grown mixture's router bias. Turning it off is refused where the mixture has one (its trained
    biases would be lost)."""
    dense = mixture.replace(
        variant="dense",
        num_experts=None,
        moe_router_topk=1,
        attention_router_topk=None,
        moe_router_pre_softmax=True,
        moe_router_topk_scaling_factor=None,
        router_bias=False,
    )
    for source in new:
        check_same_architecture(
            source.meta.architecture, f"source {source.name} ({source.path})", dense, f"mixture {path}"
        )
    if experts < 2:
        raise CheckpointError(f"a mixture needs at least 2 experts; this one would have {experts}")
    topk = min(mixture.moe_router_topk, experts)
    attention_topk = mixture.attention_router_topk
    if attention_topk is not None:
        attention_topk = min(attention_topk, experts)
    if router_bias is None:
        router_bias = bool(new) or mixture.router_bias
    if mixture.router_bias and not router_bias:
        raise CheckpointError(f"--no-router-bias: mixture {path} has trained router biases, which growing keeps")
    return mixture.replace(
        num_experts=experts, moe_router_topk=topk, attention_router_topk=attention_topk, router_bias=router_bias
    )


def record_growth(
    meta: CheckpointMeta,
    joined: Sequence,
    left: Sequence[str],
    names: list[str],
    path: str,
    ramp_iters: int = DEFAULT_RAMP_ITERS,
    ramp_start: float = DEFAULT_RAMP_START,
    router_bias: bool = True,
) -> dict:
    """The ``grown`` entry appended to the lineage: who joined (from which checkpoint, at which step)
    and who left, the expert names after it, and (when experts join into a mixture with
    ``router_bias``) the ramp of the new experts' router offsets (`bam_megatron.model.router_ramp`:
    ``ramp_start`` from step 1 to 0 at ``ramp_iters``) with the routers' expert groups."""
    entry = {
        "mixture": lineage.identity(path, meta),
        "joined": [{"name": s.name, **lineage.identity(s.path, s.meta)} for s in joined],
        "left": list(left),
        "expert_names": names,
    }
    old_names = lineage.expert_names(meta)
    carried = [old_names[e] for e in _unstarted_ramp(meta)]
    ramped = [i for i, name in enumerate(names) if name in carried] + [
        len(names) - len(joined) + i
        for i in range(len(joined))  # the new experts come last (`slots`)
    ]
    if ramped and router_bias:
        previous = ramp_of(meta.lineage)
        groups, start = [], 0
        for size in previous.groups if previous and previous.groups else (len(old_names),):
            kept = sum(name not in left for name in old_names[start : start + size])
            groups += [kept] if kept else []
            start += size
        groups += [len(joined)] if joined else []
        entry[LINEAGE_KEY] = RouterRamp(
            tuple(ramped), tuple(groups), start_offset=float(ramp_start), iters=int(ramp_iters)
        ).to_dict()
    return entry


def _unstarted_ramp(meta: CheckpointMeta) -> tuple[int, ...]:
    """The experts of a ramp the mixture recorded but never trained (its step 0): growing it again
    carries them into the new ramp, which starts them at step 0 again, instead of folding -1024 into
    their bias for good."""
    ramp = ramp_of(meta.lineage)
    return ramp.experts if ramp is not None and meta.iteration - ramp.origin <= 0 else ()


def grown_router_bias(old_bias: Optional[torch.Tensor], mixture: CheckpointMeta, plan: Sequence[Slot]) -> torch.Tensor:
    """One router's bias in the grown mixture (fp32): the old experts' effective biases (their bias,
    0 without one, plus any offset of a ramp still running at the mixture's iteration, folded in as
    the router adds it, unless that ramp never started: `record_growth` carries it on), then for each
    new expert the least of them.

    With the new router row at the mean of the old rows, a new expert's logit before its offset is
    then never above the largest old logit, so the -1024 offset of step 0 makes its gate exactly 0.
    """
    n = mixture.architecture.num_experts
    if old_bias is None:
        current = torch.zeros(n)
    elif _unstarted_ramp(mixture):  # carried into the new ramp as they are (`record_growth`)
        current = old_bias.float()
    else:
        current = folded_bias(old_bias.float(), mixture.lineage, mixture.iteration)
    kept = current[[s.index for s in plan if not s.new]]
    count = sum(s.new for s in plan)
    floor = kept.min() if len(kept) else torch.zeros(())
    return torch.cat([kept, floor.expand(count)])


class GrowMixer:
    """Fills one unit (TOP or a layer) of the grown mixture from the mixture and the new sources."""

    def __init__(self, mixture, mixture_model, new, new_models, plan: list[Slot], config) -> None:
        self.mixture, self.mixture_model = mixture, mixture_model
        self.new, self.new_models, self.plan, self.config = new, new_models, plan, config

    def __call__(self, unit: int, params: dict) -> None:
        from bam_megatron.checkpoint.layerwise import TOP, read_unit
        from bam_megatron.checkpoint.store import stored_key_names

        label = "embeddings and output layer" if unit == TOP else f"layer {unit + 1}/{self.config.num_layers}"
        print(f"growing {label}", flush=True)
        old = read_unit(self.mixture_model, unit, self.mixture.path, stored_key_names(self.mixture.meta))
        new = [read_unit(m, unit, s.path, stored_key_names(s.meta)) for s, m in zip(self.new, self.new_models)]
        written: set[str] = set()
        for name, param in params.items():
            if ".mlp.experts.local_experts." in name:
                head, rest = name.split(".mlp.experts.local_experts.")
                slot = self.plan[int(rest.split(".", 1)[0])]
                tail = rest.split(".", 1)[1]
                source = new[slot.index][f"{head}.mlp.{tail}"] if slot.new else old[self._old_expert(name, slot)]
                param.copy_(source)
            elif name.endswith("router.weight"):
                param.copy_(self._router(old[name]))
            elif name.endswith("router.bias"):
                param.copy_(grown_router_bias(old.get(name), self.mixture.meta, self.plan))
            elif self.config.uses_soft_moa and name.endswith(SOFT_MOA_TENSORS):
                if name in written:
                    continue
                written.update(self._attention(name, params, old, new))
                continue
            else:  # shared by every expert: kept from the mixture
                param.copy_(old[name])
            written.add(name)
        missing = sorted(set(params) - written)
        if missing:  # uninitialised memory must never reach the checkpoint
            raise RuntimeError(f"growing left {', '.join(missing)} unset")

    @staticmethod
    def _old_expert(name: str, slot: Slot) -> str:
        head, rest = name.split(".mlp.experts.local_experts.")
        return f"{head}.mlp.experts.local_experts.{slot.index}.{rest.split('.', 1)[1]}"

    def _router(self, old: torch.Tensor) -> torch.Tensor:
        kept = old[[s.index for s in self.plan if not s.new]]
        count = sum(s.new for s in self.plan)
        return torch.cat([kept, new_router_rows(old, count)]) if count else kept

    def _attention(self, name: str, params: dict, old: dict, new: list[dict]) -> set[str]:
        """The grown soft-MoA attention of one layer: each slot's Q, K, V, O (QKV biases, Q/K norms),
        then one wide attention; shared KV keeps the mixture's K and V (K/V biases, K norm)."""
        from bam_megatron.model.qkv_layout import (
            merge_qkv,
            soft_moa_attention_weights,
            soft_moa_qk_norms,
            soft_moa_qkv,
            split_qkv,
            split_soft_moa_attention,
            split_soft_moa_qk_norms,
            split_soft_moa_qkv,
        )

        prefix = name.rsplit(".self_attention.", 1)[0] + ".self_attention."
        old_config = self.mixture_model.config
        heads, groups = self.config.num_attention_heads, self.config.num_query_groups
        shared = self.config.attention_kv_mode == "shared"

        def slot_qkv(key: str, column: bool = False):
            """Each slot's dense QKV (a bias as a weight of one column) and the shared K, V (or None)."""
            as_weight = (lambda t: t.unsqueeze(-1)) if column else (lambda t: t)
            qs, k, v = split_soft_moa_qkv(as_weight(old[key]), old_config)
            per_slot = []
            for slot in self.plan:
                if slot.new:
                    q_new, k_new, v_new = split_qkv(as_weight(new[slot.index][key]), heads, groups)
                    per_slot.append(merge_qkv(q_new, *((k, v) if shared else (k_new, v_new))))
                else:
                    e = slot.index
                    kv = (k, v) if shared else (k[e * groups : (e + 1) * groups], v[e * groups : (e + 1) * groups])
                    per_slot.append(merge_qkv(qs[e], *kv))
            return per_slot, (k, v) if shared else None

        qkv_name, proj_name = prefix + "linear_qkv.weight", prefix + "linear_proj.weight"
        _, projs, _, _ = split_soft_moa_attention(old[qkv_name], old[proj_name], old_config)
        expert_proj = [new[s.index][proj_name] if s.new else projs[s.index] for s in self.plan]
        expert_qkv, shared_kv = slot_qkv(qkv_name)
        grown = dict(
            zip((qkv_name, proj_name), soft_moa_attention_weights(expert_qkv, expert_proj, self.config, shared_kv))
        )
        if prefix + "linear_qkv.bias" in params:
            bias_qkv, bias_kv = slot_qkv(prefix + "linear_qkv.bias", column=True)
            grown[prefix + "linear_qkv.bias"] = soft_moa_qkv(bias_qkv, self.config, bias_kv).squeeze(-1)
        q_key, k_key = prefix + "q_layernorm.weight", prefix + "k_layernorm.weight"
        if q_key in params:  # each slot's Q/K norms (the shared K norm: the mixture's)
            old_q, old_k = split_soft_moa_qk_norms(old[q_key], old[k_key], old_config)
            q_norms = [new[s.index][q_key] if s.new else old_q[s.index] for s in self.plan]
            k_norms = [old[k_key]] if shared else [new[s.index][k_key] if s.new else old_k[s.index] for s in self.plan]
            grown[q_key], grown[k_key] = soft_moa_qk_norms(
                q_norms, k_norms, self.config, old[k_key] if shared else None
            )
        for key, tensor in grown.items():
            params[key].copy_(tensor)
        return set(grown)
