"""Run parameters (the DAG's trigger form, the CLI's flags) as settings overrides, in one place.

An empty value (``None``, ``""``, ``[]``, ``False``) means "the configured default": the param is
not applied, so a run without params uses the deployment's settings unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipelines.config import Settings, with_overrides

# param -> (settings section, field, conversion of the form's value)
RUN_PARAMS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "dataset": ("data", "dataset", str),
    "nodes": ("train", "nodes", int),
    "procs_per_node": ("train", "procs_per_node", int),
    "epochs": ("train", "epochs", int),
    "canary_steps": ("canary", "steps", lambda steps: tuple(int(s) for s in steps)),
    "skip_shadow": ("shadow", "enabled", lambda skip: not skip),
}
# The tuning DAG's form and `mlops tune`; `params_from` also in a training run's conf and
# `mlops train --params-from` (the training DAG's form does not offer these).
TUNING_PARAMS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "params_from": ("train", "params_from", str),
    "trials": ("tuning", "trials", int),
    "workers": ("tuning", "workers", int),
    "study": ("tuning", "study", str),
}


# The batch-scoring DAG's form and `mlops score` (date and version are passed as they are).
SCORING_PARAMS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "runtime": ("batch", "runtime", str),
    "chunk_rows": ("batch", "chunk_rows", int),
}


def run_overrides(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"epochs": 3, "skip_shadow": True}`` -> ``{"train": {"epochs": 3}, "shadow":
    {"enabled": False}}``; params this module does not map (``date``, ``force``) are ignored."""
    out: dict[str, dict[str, Any]] = {}
    mapped = {**RUN_PARAMS, **TUNING_PARAMS, **SCORING_PARAMS}
    for name, (section, field, convert) in mapped.items():
        value = params.get(name)
        if value is None or value == "" or value == [] or value is False:
            continue
        out.setdefault(section, {})[field] = convert(value)
    return out


def apply_params(base: Settings, params: Mapping[str, Any]) -> Settings:
    """The settings of one run: ``base`` with its params applied (validated like any setting,
    so an out-of-range value fails with the field's name)."""
    overrides = run_overrides(params)
    return with_overrides(base, **overrides) if overrides else base
