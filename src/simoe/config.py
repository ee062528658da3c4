"""SIMoEConfig: the single source of the method's options (what gets upcycled, how, and why)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from simoe import hard_concrete
from simoe.config_base import JSONConfig

CONFIG_NAME = "simoe_config.json"
WEIGHTS_NAME = "simoe_model.safetensors"

ROUTER_INPUTS = ("embedding-mean", "hidden-mean")
ROUTER_SPANS = ("user", "prompt")
SPARSITY_SCOPES = ("union", "expert")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")  # a module name or name suffix, not a regex
# Fields simoe records (from the base model and its tokenizer); never set by hand or on the CLI.
RECORDED_FIELDS = ("base_model_name_or_path", "template_prefix_ids", "template_suffix_ids")


@dataclass
class SIMoEConfig(JSONConfig):
    """Options of a SIMoE upcycling. Defaults follow the paper (M = 8, 75 % sparsity)."""

    num_experts: int = field(default=8, metadata={"help": "M, the number of sparse experts."})
    target_sparsity: float = field(
        default=0.75,
        metadata={"help": "Fraction of upcycled parameters whose Δ is gated off; in [0, 1)."},
    )
    sparsity_scope: str = field(
        default="union",
        metadata={
            "help": "What the sparsity constraint bounds: 'union' (entries used by any expert, "
            "which sets the inference size) or 'expert' (each expert separately, as SMAT)."
        },
    )
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "'all-linear' (every Linear/Conv1D but the output layer), a list of module "
            "names or name suffixes, or a regex matched against full module names (as PEFT)."
        },
    )
    upcycle_norms: bool = field(
        default=True,
        metadata={"help": "Also upcycle the normalisation weights of the decoder layers that "
                  "target_modules reaches, and the norms after them (the final norm)."},
    )
    gate_regime: str = field(
        default="noise-free",
        metadata={
            "help": "Which gates training and evaluation use: 'noise-free' (the same gate in both, "
            "SMAT-style: the evaluated model is the trained one) or 'stochastic' (sampled "
            "hard-concrete gates in training, deterministic ones in evaluation).",
            "choices": list(hard_concrete.REGIMES),
        },
    )
    router_input: str = field(
        default="embedding-mean",
        metadata={
            "help": "Prompt representation the router reads: 'embedding-mean' (mean of frozen "
            "input embeddings) or 'hidden-mean' (mean of a frozen hidden layer of the base)."
        },
    )
    router_span: str = field(
        default="user",
        metadata={
            "help": "Which prompt tokens the router reads: 'user' (the prompt without the chat "
            "template's fixed text around the first user turn, e.g. a default system prompt shared "
            "by every example) or 'prompt' (every prompt token).",
            "choices": list(ROUTER_SPANS),
        },
    )
    router_hidden_layer: int | None = field(
        default=None,
        metadata={"help": "Decoder layer whose output 'hidden-mean' reads; default the middle."},
    )
    router_hidden_size: int = field(default=256, metadata={"help": "Router MLP width."})
    router_temperature: float = field(
        default=1.0, metadata={"help": "Initial softmax temperature τ0 of the router."}
    )
    router_min_temperature: float = field(
        default=0.5, metadata={"help": "Temperature τ_min reached at the end of annealing."}
    )
    router_information_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of -I(prompt; expert) = -(H(mean r) - mean H(r)) over each batch: "
            "spreads the load over the experts and makes each prompt's routing decisive."
        },
    )
    router_balance_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of KL(uniform || mean r) over each batch: a log barrier on every "
            "expert's share of the load, whose gradient does not vanish when an expert is starved."
        },
    )
    mask_init_gate: float | None = field(
        default=None,
        metadata={
            "help": "gate_regime noise-free: the gate value every expert starts from (default 0.5, "
            "log α = 0 as in SMAT); every column starts on."
        },
    )
    mask_init_density: float | None = field(
        default=None,
        metadata={
            "help": "gate_regime stochastic: expected constrained density (union or per expert) at "
            "initialisation (default 0.9); log α starts where P(z≠0) gives it. A union of M "
            "nearly-always-on experts stalls that constraint: its gradient on expert m carries "
            "Π_{j≠m}(1 - p_j), which vanishes as every p_j → 1."
        },
    )
    mask_init_std: float = field(
        default=0.1,
        metadata={"help": "Std of the noise added to the initial log α, to break expert symmetry."},
    )
    mask_logit_min: float = field(
        default=-10.0,
        metadata={
            "help": "Lower bound of log α. SMAT's ln 0.01 leaves P(z≠0) = 0.047 per expert, so a "
            "union of 8 experts could never go below 32 % density; -10 leaves 0.02 %."
        },
    )
    mask_logit_max: float = field(
        default=math.log(100.0), metadata={"help": "Upper bound of log α (SMAT: ln 100)."}
    )
    orthogonality_weight: float = field(
        default=1.0, metadata={"help": "μ, the weight of the expert orthogonality penalty."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model the experts were trained on (recorded)."}
    )
    template_prefix_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Token ids the chat template puts before the first user turn's text "
                  "(recorded from the tokenizer; router_span 'user' skips them)."},
    )
    template_suffix_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Token ids the chat template puts after the user turn's text, up to the "
                  "response (recorded; router_span 'user' skips them)."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not 0.0 <= float(self.target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity!r}")
        if self.sparsity_scope not in SPARSITY_SCOPES:
            raise ValueError(
                f"sparsity_scope must be one of {SPARSITY_SCOPES}, got {self.sparsity_scope!r}"
            )
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(n, str) for n in self.target_modules):
                raise ValueError("target_modules must be a non-empty list of module names")
            self.target_modules = list(self.target_modules)
            # One entry that is 'all-linear' or a regex (as `--target_modules X` gives) is that string.
            only = self.target_modules[0]
            if len(self.target_modules) == 1 and (only == "all-linear" or not _PLAIN_NAME.match(only)):
                self.target_modules = only
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be a string or a list, got {self.target_modules!r}")
        if self.router_hidden_size < 1:
            raise ValueError(f"router_hidden_size must be >= 1, got {self.router_hidden_size}")
        if not 0.0 < self.router_min_temperature <= self.router_temperature:
            raise ValueError("router temperatures must satisfy 0 < router_min_temperature <= "
                             f"router_temperature, got {self.router_min_temperature}, "
                             f"{self.router_temperature}")
        if self.gate_regime not in hard_concrete.REGIMES:
            raise ValueError(f"gate_regime must be one of {hard_concrete.REGIMES}, got {self.gate_regime!r}")
        if self.router_span not in ROUTER_SPANS:
            raise ValueError(f"router_span must be one of {ROUTER_SPANS}, got {self.router_span!r}")
        for name in ("router_information_weight", "router_balance_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("template_prefix_ids", "template_suffix_ids"):
            ids = getattr(self, name)
            if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
                raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
        own, other = "mask_init_gate", "mask_init_density"
        if self.gate_regime == "stochastic":
            own, other = other, own
        if getattr(self, other) is not None:
            raise ValueError(f"{other} does not apply to gate_regime {self.gate_regime!r}; use {own}")
        for name in ("mask_init_gate", "mask_init_density"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if not self.mask_logit_min < self.mask_logit_max:
            raise ValueError("mask_logit_min must be below mask_logit_max")
        floor = self.density_floor
        if self.target_sparsity > 0 and floor >= self.target_density:
            raise ValueError(
                f"target density {self.target_density:.3f} is unreachable: with log α clamped at "
                f"mask_logit_min={self.mask_logit_min} the {self.sparsity_scope} density of "
                f"{self.num_experts} experts cannot fall below {floor:.3f}; lower mask_logit_min"
            )

    @property
    def target_density(self) -> float:
        return 1.0 - self.target_sparsity

    @property
    def mask_init_logit(self) -> float:
        """The initial log α: where the noise-free gate is ``mask_init_gate`` (noise-free), or where
        the constrained density P(z≠0) equals ``mask_init_density`` (stochastic)."""
        hc = hard_concrete
        if self.gate_regime == "noise-free":  # z = stretch(sigmoid(log α / β)), inverted
            z = 0.5 if self.mask_init_gate is None else self.mask_init_gate
            s = (z - hc.GAMMA) / (hc.ZETA - hc.GAMMA)
            return hc.BETA * math.log(s / (1.0 - s))
        d = 0.9 if self.mask_init_density is None else self.mask_init_density
        p = 1.0 - (1.0 - d) ** (1.0 / self.num_experts) if self.sparsity_scope == "union" else d
        # P(z≠0) = sigmoid(log α − β log(−γ/ζ)), inverted
        return math.log(p / (1.0 - p)) + hc.NOISE_FREE_ZERO

    @property
    def density_floor(self) -> float:
        """The least density the constraint can reach with log α at its lower bound."""
        if self.gate_regime == "noise-free":  # gates are exactly 0 below NOISE_FREE_ZERO
            return 0.0 if self.mask_logit_min < hard_concrete.NOISE_FREE_ZERO else 1.0
        p = float(hard_concrete.prob_nonzero(torch.tensor(float(self.mask_logit_min))))
        return 1.0 - (1.0 - p) ** self.num_experts if self.sparsity_scope == "union" else p

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.save(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SIMoEConfig:
        return cls.load_from(directory, CONFIG_NAME)
