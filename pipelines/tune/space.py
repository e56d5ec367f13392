"""The search space: ``tuning.space`` (validated in config) turned into one trial's train settings.

Optuna's categorical values must be scalars, so a layer list such as ``[64, 32]`` travels as the
string ``"64-32"`` in the study and is turned back into a tuple here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pipelines.config import SearchParam


class TrialLike(Protocol):
    """What sampling needs of an ``optuna.Trial`` (a fake in unit tests)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def encode_choice(value: Any) -> Any:
    """A configured choice as Optuna stores it (lists become ``"64-32"``)."""
    if isinstance(value, list | tuple):
        return "-".join(str(int(v)) for v in value)
    return value


def decode(name: str, value: Any) -> Any:
    """A value from the study as the train setting ``name`` takes it."""
    if name == "hidden":
        if isinstance(value, str):
            return tuple(int(w) for w in value.split("-") if w)
        return tuple(int(w) for w in value)
    return value


def suggest(trial: TrialLike, space: Mapping[str, SearchParam]) -> dict[str, Any]:
    """Sample every dimension; returns train-setting overrides (``{"lr": 0.003, ...}``)."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "categorical":
            assert p.choices is not None  # config refuses an empty one
            raw = trial.suggest_categorical(name, [encode_choice(c) for c in p.choices])
        elif p.kind == "int":
            assert p.low is not None and p.high is not None
            raw = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            raw = trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
        out[name] = decode(name, raw)
    return out


def train_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's stored params (``trial.params``) as train-setting overrides."""
    return {name: decode(name, value) for name, value in params.items()}
