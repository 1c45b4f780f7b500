"""Configurations of the adapter methods. Each checks itself; ``method`` names it in files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..ops import ADAPTER_ACTIVATIONS


@dataclass
class LoraConfig:
    """``W x + (alpha / r) · B A dropout(x)`` on the target linears (PEFT's LoRA)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the architecture's q/v projections
    method = "lora"

    def validate(self, hidden_size: int) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig: alpha must be a finite number, got {self.alpha!r}")


@dataclass
class BottleneckConfig:
    """A bottleneck adapter ``h + s · U(act(D h))``: shared fields of series and parallel."""

    bottleneck_size: int = 64
    activation: str = "relu"
    scaling: float | str = 1.0  # a float, or "learned" (a trained scalar starting at 1)
    init: str = "zero-up"  # "zero-up": U = 0, the model is unchanged at step 0; "normal"
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def validate(self, hidden_size: int) -> None:
        name = type(self).__name__
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise ValueError(f"{name}: bottleneck_size must be a positive integer")
        if self.bottleneck_size > hidden_size:
            raise ValueError(
                f"{name}: bottleneck_size {self.bottleneck_size} is larger than the model's "
                f"hidden size {hidden_size}; a bottleneck must be narrower than the stream"
            )
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"{name}: unknown activation {self.activation!r}; "
                f"choose from {sorted(ADAPTER_ACTIVATIONS)}"
            )
        if self.init not in ("zero-up", "normal"):
            raise ValueError(f"{name}: init must be 'zero-up' or 'normal', got {self.init!r}")
        if not (
            self.scaling == "learned"
            or isinstance(self.scaling, int | float)
            and math.isfinite(self.scaling)
        ):
            raise ValueError(
                f"{name}: scaling must be a finite number or 'learned', got {self.scaling!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SeriesConfig(BottleneckConfig):
    """Series adapter after sublayers: ``pfeiffer`` after the MLP, ``houlsby`` after attention
    and after the MLP. ``target_modules`` overrides the placement with module names."""

    placement: str = "pfeiffer"
    method = "series"

    def validate(self, hidden_size: int) -> None:
        super().validate(hidden_size)
        if self.placement not in ("pfeiffer", "houlsby"):
            raise ValueError(
                f"SeriesConfig: placement must be 'pfeiffer' or 'houlsby', got {self.placement!r}"
            )


@dataclass
class ParallelConfig(BottleneckConfig):
    """Parallel adapter beside the MLP block (default), or beside each target linear."""

    method = "parallel"


@dataclass
class PrefixConfig:
    """``num_virtual_tokens`` learned keys and values in front of every layer's attention,
    optionally produced by a reparameterisation MLP of width ``projection_size``."""

    num_virtual_tokens: int = 16
    projection_size: int | None = None
    method = "prefix"

    def validate(self, hidden_size: int) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError("PrefixConfig: num_virtual_tokens must be a positive integer")
        if self.projection_size is not None and self.projection_size <= 0:
            raise ValueError("PrefixConfig: projection_size must be positive or None")


@dataclass
class IA3Config:
    """(IA)³: learned vectors scaling the outputs of keys and values and the input of the
    MLP's down projection (the ``feedforward_modules``)."""

    target_modules: tuple[str, ...] | None = None
    feedforward_modules: tuple[str, ...] | None = None
    method = "ia3"

    def validate(self, hidden_size: int) -> None:
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ValueError(
                "IA3Config: give both target_modules and feedforward_modules, or neither"
            )
        if self.target_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(
                    f"IA3Config: feedforward_modules {sorted(extra)} are not in target_modules"
                )


CONFIGS = {c.method: c for c in (LoraConfig, SeriesConfig, ParallelConfig, PrefixConfig, IA3Config)}
AdapterConfig = LoraConfig | SeriesConfig | ParallelConfig | PrefixConfig | IA3Config


def config_to_dict(config: AdapterConfig) -> dict:
    return {"method": config.method, **asdict(config)}


def config_from_dict(data: dict) -> AdapterConfig:
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIGS:
        raise ValueError(f"eefast: unknown adapter method {method!r}; known: {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"eefast: {method} config has unknown fields {sorted(unknown)}")
    for key in ("target_modules", "feedforward_modules"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return cls(**data)
