"""TF Serving's ``model_config_list`` file: read, render and write it atomically.

The file is the serving state: which versions are loaded and where ``stable``/``canary`` point.
It is parsed and rendered with TF Serving's own protos (``ModelServerConfig`` text format).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelEntry:
    name: str
    base_path: str
    versions: list[int] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def render(entries: list[ModelEntry]) -> str:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as msc

    cfg = msc.ModelServerConfig()
    for e in entries:
        mc = cfg.model_config_list.config.add()
        mc.name, mc.base_path, mc.model_platform = e.name, e.base_path, "tensorflow"
        mc.model_version_policy.specific.versions.extend(sorted(set(e.versions)))
        for label, version in sorted(e.labels.items()):
            mc.version_labels[label] = int(version)
    return str(text_format.MessageToString(cfg))


def parse(text: str) -> list[ModelEntry]:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as msc

    cfg = text_format.Parse(text, msc.ModelServerConfig())
    out = []
    for mc in cfg.model_config_list.config:
        policy = mc.model_version_policy
        versions = list(policy.specific.versions) if policy.HasField("specific") else []
        out.append(ModelEntry(mc.name, mc.base_path, versions, dict(mc.version_labels)))
    return out


def read(path: str | Path) -> list[ModelEntry]:
    p = Path(path)
    return parse(p.read_text()) if p.exists() else []


def write(path: str | Path, entries: list[ModelEntry]) -> None:
    """Write atomically (temp file + rename) so a polling server never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}")
    tmp.write_text(render(entries))
    os.replace(tmp, p)


def entry(path: str | Path, model: str) -> ModelEntry | None:
    return next((e for e in read(path) if e.name == model), None)


def upsert(path: str | Path, new: ModelEntry) -> None:
    entries = [e for e in read(path) if e.name != new.name] + [new]
    write(path, entries)
