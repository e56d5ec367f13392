"""Dataset specs: the YAML contract of a dataset (columns, types, ranges, keys, slices, drift)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SPEC_DIR = Path(__file__).parent / "specs"
ColumnType = Literal["string", "category", "float", "int", "timestamp"]
_TYPES = ("string", "category", "float", "int", "timestamp")


class SpecError(ValueError):
    """A dataset spec is missing or malformed."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: ColumnType
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] | None = None
    feature: bool = False
    pii: bool = False
    unseen: Literal["block", "warn"] = "block"
    """What an unseen category does to the batch."""
    transform: Literal["none", "log1p"] = "none"
    """Applied inside the model before normalisation (log1p for heavy-tailed amounts)."""

    @property
    def is_numeric(self) -> bool:
        return self.type in ("float", "int")


@dataclass(frozen=True)
class DriftSpec:
    psi_warn: float = 0.1
    psi_block: float = 0.5
    ks_alpha: float = 0.001
    block: bool = True
    """Whether drift beyond psi_block (and significant by KS) blocks the batch."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    key: str
    entity: str
    label: str
    columns: tuple[ColumnSpec, ...]
    event_time: str | None = None
    min_rows: int = 1
    description: str = ""
    slices: tuple[str, ...] = ()
    drift: DriftSpec = field(default_factory=DriftSpec)

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise SpecError(f"Dataset {self.name!r} has no column {name!r}.")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def numeric_features(self) -> list[str]:
        return [c.name for c in self.columns if c.feature and c.is_numeric]

    @property
    def categorical_features(self) -> list[str]:
        return [c.name for c in self.columns if c.feature and c.type == "category"]

    @property
    def features(self) -> list[str]:
        return self.numeric_features + self.categorical_features

    @property
    def pii_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.pii]

    @property
    def log_features(self) -> list[str]:
        return [c.name for c in self.columns if c.feature and c.transform == "log1p"]

    def vocab(self, name: str) -> list[str]:
        values = self.column(name).values
        if not values:
            raise SpecError(f"Categorical column {name!r} of {self.name!r} lists no values.")
        return [str(v) for v in values]

    def fingerprint(self) -> str:
        """Hash of the spec's content; part of every data version built with it."""
        payload = json.dumps(_spec_dict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _spec_dict(spec: DatasetSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> DatasetSpec:
    """Validate a spec mapping and build a :class:`DatasetSpec`."""
    try:
        cols_raw = raw["columns"]
        columns = []
        for name, col in cols_raw.items():
            col = dict(col or {})
            if col.get("type") not in _TYPES:
                raise SpecError(
                    f"{source}: column {name!r} has type {col.get('type')!r}; "
                    f"expected one of {_TYPES}."
                )
            if "values" in col and col["values"] is not None:
                col["values"] = tuple(col["values"])
            columns.append(ColumnSpec(name=name, **col))
        spec = DatasetSpec(
            name=raw["name"],
            key=raw["key"],
            entity=raw.get("entity", raw["key"]),
            label=raw["label"],
            columns=tuple(columns),
            event_time=raw.get("event_time"),
            min_rows=int(raw.get("min_rows", 1)),
            description=raw.get("description", ""),
            slices=tuple(raw.get("slices", ())),
            drift=DriftSpec(**(raw.get("drift") or {})),
        )
    except KeyError as exc:
        raise SpecError(f"{source}: required field {exc.args[0]!r} is missing.") from exc
    except TypeError as exc:
        raise SpecError(f"{source}: {exc}") from exc
    names = set(spec.column_names)
    for ref in [spec.key, spec.entity, spec.label, *spec.slices] + (
        [spec.event_time] if spec.event_time else []
    ):
        if ref not in names:
            raise SpecError(f"{source}: {ref!r} is referenced but not declared under columns.")
    for name in spec.categorical_features:
        spec.vocab(name)
    if not spec.features:
        raise SpecError(f"{source}: no column is marked 'feature: true'.")
    return spec


def load_spec(name: str, extra_dir: str | None = None) -> DatasetSpec:
    """Load ``<name>.yaml`` from ``extra_dir`` (if given) or the packaged specs."""
    candidates = ([Path(extra_dir) / f"{name}.yaml"] if extra_dir else []) + [
        SPEC_DIR / f"{name}.yaml"
    ]
    for path in candidates:
        if path.exists():
            return parse_spec(yaml.safe_load(path.read_text()), source=str(path))
    known = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
    raise SpecError(f"No dataset spec named {name!r}; packaged specs: {known}.")
