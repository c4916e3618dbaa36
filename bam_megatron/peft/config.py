"""`PeftConfig`: which parameter-efficient mixture to add, and its sizes (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bam_megatron.errors import ConfigError

METHODS = ("mov", "molora")

# Which linear layers each method adapts (megatron-core's names). MoV scales K and V (outputs of
# linear_qkv) and the FFN intermediate activation (the input of linear_fc2); MoLoRA adds a low-rank
# update to all four projections.
TARGETS = {
    "mov": ("linear_qkv", "linear_fc2"),
    "molora": ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
}


@dataclass(frozen=True)
class PeftConfig:
    """A MoV or MoLoRA adapter set.

    Attributes:
        method: 'mov' ((IA)³ vectors) or 'molora' (LoRA adapters).
        num_experts: E adapters per adapted module, softly merged per token; 1 is plain (IA)³ / LoRA
            (no router).
        rank: LoRA rank r (MoLoRA only).
        alpha: LoRA scaling numerator: the update is scaled by alpha / rank (MoLoRA only).
        router_std: std of the routers' normal initialisation (no bias).
        lora_a_std: std of LoRA A's normal initialisation (B starts at zero).
        seed: base seed of the adapters' initialisation (each tensor has its own stream, derived
            from this seed and the tensor's name, so any parallel layout initialises alike).
    """

    method: str
    num_experts: int = 10
    rank: int = 4
    alpha: float = 16.0
    router_std: float = 0.02
    lora_a_std: float = 0.02
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--peft must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_experts < 1:
            raise ConfigError(f"--peft-num-experts must be >= 1, got {self.num_experts}")
        if self.method == "molora" and self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.router_std < 0 or self.lora_a_std < 0:
            raise ConfigError("initialisation std must be >= 0")

    @property
    def targets(self) -> tuple[str, ...]:
        """Names of the linear layers this method adapts."""
        return TARGETS[self.method]

    @property
    def scaling(self) -> float:
        """LoRA's alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """What an adapter checkpoint records (and a resume must match)."""
        return {"method": self.method, "num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha}

    @classmethod
    def from_args(cls, args: Any) -> PeftConfig:
        """From pretrain_bam.py's flags (--peft, --peft-num-experts, --lora-rank, --lora-alpha, --seed)."""
        return cls(
            method=args.peft,
            num_experts=args.peft_num_experts,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            seed=args.seed,
        )
