"""BaselineConfig: every option of the baseline methods (LoRA, sparse upcycling, SMEAR), saved as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from simoe.config_base import JSONConfig

UPCYCLING_TRAINABLE = ("all", "moe")
# The methods each option applies to (field metadata "methods"); `simoe train` rejects the others.
_LORA, _UPCYCLING, _SMEAR = ("lora",), ("sparse-upcycling",), ("smear",)


@dataclass
class BaselineConfig(JSONConfig):
    """Options of the baselines. Full fine-tuning has none; SIMoE's own live in ``SIMoEConfig``."""

    lora_rank: int = field(default=16, metadata={"help": "LoRA: rank r of every adapter.", "methods": _LORA})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA: scaling α (the update is α/r · BA).",
                                                      "methods": _LORA})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA: dropout on the adapter input.",
                                                        "methods": _LORA})
    num_ffn_experts: int = field(
        default=4,
        metadata={"help": "Sparse upcycling and SMEAR: E, the number of FFN copies (experts) per layer.",
                  "methods": (*_UPCYCLING, *_SMEAR)},
    )
    top_k: int = field(default=2, metadata={"help": "Sparse upcycling: experts each token is routed to.",
                                           "methods": _UPCYCLING})
    router_aux_loss_coef: float = field(
        default=0.01,
        metadata={"help": "Sparse upcycling: weight of the load-balancing loss added to the LM loss.",
                  "methods": _UPCYCLING},
    )
    router_jitter_noise: float = field(
        default=0.0,
        metadata={"help": "Sparse upcycling (Llama/Mistral → Mixtral only): multiplicative uniform "
                  "noise on the router input while training, as Mixtral's class applies it.",
                  "methods": _UPCYCLING},
    )
    upcycling_trainable: str = field(
        default="all",
        metadata={"help": "Sparse upcycling: 'all' (the whole MoE is fine-tuned, as Komatsuzaki et al.) "
                  "or 'moe' (only the experts and routers; attention, norms, embeddings frozen).",
                  "choices": list(UPCYCLING_TRAINABLE), "methods": _UPCYCLING},
    )
    smear_router_hidden_size: int = field(default=256, metadata={"help": "SMEAR: router MLP width.",
                                                                  "methods": _SMEAR})
    smear_init_noise: float = field(
        default=0.0,
        metadata={"help": "SMEAR: Gaussian noise added to each expert copy at build time, relative to "
                  "the dense weight's std. 0 keeps exact copies (the model starts as the dense one); "
                  "the per-example routing then breaks the symmetry.", "methods": _SMEAR},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model the baseline was built on (recorded)."}
    )

    def __post_init__(self) -> None:
        for name in ("lora_rank", "num_ffn_experts", "top_k", "smear_router_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_ffn_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_ffn_experts={self.num_ffn_experts}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        for name in ("lora_dropout", "router_jitter_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("router_aux_loss_coef", "smear_init_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.upcycling_trainable not in UPCYCLING_TRAINABLE:
            raise ValueError(f"upcycling_trainable must be one of {UPCYCLING_TRAINABLE}, "
                             f"got {self.upcycling_trainable!r}")
