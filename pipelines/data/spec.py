"""Dataset specs: the YAML contract of a dataset (columns, types, ranges, keys, slices, drift).

The optional ``behaviour:`` section declares what a model trained on it must do (behavioural
tests run at evaluation); it is not part of the data version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
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


Severity = Literal["block", "warn"]
PerturbOp = Literal["set", "choice", "shuffle", "scale", "add"]
_OPS = ("set", "choice", "shuffle", "scale", "add")


@dataclass(frozen=True)
class Perturbation:
    """One column change: ``set`` a value, ``choice`` of values per row (seeded), ``shuffle``
    the column across rows, ``scale`` or ``add`` a number (clipped to the column's range)."""

    column: str
    op: PerturbOp
    value: Any = None


@dataclass(frozen=True)
class InvarianceTest:
    """Perturbing columns the model must ignore moves no score by more than ``tolerance``."""

    name: str
    perturb: tuple[Perturbation, ...]
    tolerance: float = 1e-6
    severity: Severity | None = None
    why: str = ""


@dataclass(frozen=True)
class DirectionalTest:
    """After the perturbation, at least ``min_share`` of the rows (those matching ``where``)
    have a score that is ``not_lower`` (or ``not_higher``) than before, within ``tolerance``."""

    name: str
    perturb: tuple[Perturbation, ...]
    expect: Literal["not_lower", "not_higher"]
    min_share: float = 1.0
    where: tuple[tuple[str, Any], ...] = ()
    tolerance: float = 1e-6
    severity: Severity | None = None
    why: str = ""


@dataclass(frozen=True)
class FunctionalityTest:
    """A hand-written case scores ``higher`` than another case, or lands ``above``/``below``
    the threshold (the evaluation's unless given)."""

    name: str
    case: str
    expect: Literal["higher", "above", "below"]
    than: str | None = None
    threshold: float | None = None
    severity: Severity | None = None
    why: str = ""


@dataclass(frozen=True)
class BehaviourSpec:
    """Made-With-ML style behavioural tests: invariance, direction, minimum functionality."""

    invariance: tuple[InvarianceTest, ...] = ()
    directional: tuple[DirectionalTest, ...] = ()
    minimum_functionality: tuple[FunctionalityTest, ...] = ()
    cases: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    """Named rows (feature values) the minimum-functionality tests score."""

    def case(self, name: str) -> dict[str, Any]:
        for case_name, values in self.cases:
            if case_name == name:
                return dict(values)
        raise SpecError(f"No behaviour case named {name!r}.")

    @property
    def tests(self) -> list[InvarianceTest | DirectionalTest | FunctionalityTest]:
        return [*self.invariance, *self.directional, *self.minimum_functionality]


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
    behaviour: BehaviourSpec | None = None
    """Behavioural tests for models trained on this dataset (not part of the fingerprint)."""

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

    # Behavioural tests judge models, not data: editing them must not change data versions.
    out = asdict(spec)
    out.pop("behaviour", None)
    return out


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
                repeated = sorted({str(v) for v in col["values"] if col["values"].count(v) > 1})
                if repeated:
                    raise SpecError(f"{source}: column {name!r} lists {repeated} more than once.")
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
        if raw.get("behaviour") is not None:
            spec = replace(spec, behaviour=_parse_behaviour(raw["behaviour"], spec, source))
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


def _perturbations(raw: Any, spec: DatasetSpec, where: str) -> tuple[Perturbation, ...]:
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"{where}: 'perturb' must map columns to one change each.")
    out = []
    for column, change in raw.items():
        col = spec.column(column)  # raises naming the column
        if not isinstance(change, dict) or len(change) != 1 or next(iter(change)) not in _OPS:
            raise SpecError(
                f"{where}: the change of column {column!r} must be one of {_OPS}, e.g. "
                "{scale: 10}."
            )
        op, value = next(iter(change.items()))
        if op in ("scale", "add") and (
            not col.is_numeric or isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise SpecError(f"{where}: {op!r} needs a numeric column and a number ({column!r}).")
        if op == "choice":
            if not isinstance(value, list) or not value:
                raise SpecError(f"{where}: 'choice' of column {column!r} needs a list of values.")
            value = tuple(value)
        for v in value if op == "choice" else (value,) if op == "set" else ():
            if col.type == "category" and col.values and v not in col.values:
                raise SpecError(
                    f"{where}: {v!r} is not a declared value of category column {column!r}."
                )
        out.append(Perturbation(column, op, value))
    return tuple(out)


def _common(entry: dict[str, Any], where: str) -> dict[str, Any]:
    severity = entry.get("severity")
    if severity not in (None, "block", "warn"):
        raise SpecError(f"{where}: severity must be 'block' or 'warn', got {severity!r}.")
    return {"severity": severity, "why": str(entry.get("why", ""))}


def _parse_behaviour(raw: dict[str, Any], spec: DatasetSpec, source: str) -> BehaviourSpec:
    """Validate the ``behaviour:`` section; every error names the test and the field."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: 'behaviour' must be a mapping.")
    unknown = set(raw) - {"cases", "invariance", "directional", "minimum_functionality"}
    if unknown:
        raise SpecError(f"{source}: unknown behaviour section(s) {sorted(unknown)}.")
    names: set[str] = set()

    def named(entry: Any, kind: str) -> tuple[dict[str, Any], str]:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise SpecError(f"{source}: every behaviour.{kind} entry needs a 'name'.")
        where = f"{source}: behaviour.{kind} {entry['name']!r}"
        if entry["name"] in names:
            raise SpecError(f"{where} is declared twice.")
        names.add(entry["name"])
        return entry, where

    cases = []
    for case_name, row in (raw.get("cases") or {}).items():
        row = dict(row or {})
        missing = [f for f in spec.features if f not in row]
        if missing:
            raise SpecError(f"{source}: behaviour case {case_name!r} lacks features {missing}.")
        for column in row:
            spec.column(column)
        cases.append((str(case_name), tuple(row.items())))
    case_names = {c for c, _ in cases}
    try:
        invariance = []
        for entry in raw.get("invariance") or ():
            e, where = named(entry, "invariance")
            invariance.append(
                InvarianceTest(
                    e["name"],
                    _perturbations(e.get("perturb"), spec, where),
                    float(e.get("tolerance", 1e-6)),
                    **_common(e, where),
                )
            )
        directional = []
        for entry in raw.get("directional") or ():
            e, where = named(entry, "directional")
            if e.get("expect") not in ("not_lower", "not_higher"):
                raise SpecError(f"{where}: expect must be 'not_lower' or 'not_higher'.")
            share = float(e.get("min_share", 1.0))
            if not 0 < share <= 1:
                raise SpecError(f"{where}: min_share must lie in (0, 1], got {share}.")
            cond = dict(e.get("where") or {})
            for column in cond:
                spec.column(column)
            directional.append(
                DirectionalTest(
                    e["name"],
                    _perturbations(e.get("perturb"), spec, where),
                    e["expect"],
                    share,
                    tuple(cond.items()),
                    float(e.get("tolerance", 1e-6)),
                    **_common(e, where),
                )
            )
        functionality = []
        for entry in raw.get("minimum_functionality") or ():
            e, where = named(entry, "minimum_functionality")
            if e.get("expect") not in ("higher", "above", "below"):
                raise SpecError(f"{where}: expect must be 'higher', 'above' or 'below'.")
            refs = [e.get("case")] + ([e.get("than")] if e["expect"] == "higher" else [])
            for ref in refs:
                if ref not in case_names:
                    raise SpecError(f"{where}: {ref!r} is not a case under behaviour.cases.")
            functionality.append(
                FunctionalityTest(
                    e["name"],
                    e["case"],
                    e["expect"],
                    e.get("than"),
                    None if e.get("threshold") is None else float(e["threshold"]),
                    **_common(e, where),
                )
            )
    except SpecError as exc:
        if str(exc).startswith(source):
            raise
        raise SpecError(f"{source}: behaviour: {exc}") from exc
    return BehaviourSpec(tuple(invariance), tuple(directional), tuple(functionality), tuple(cases))


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
