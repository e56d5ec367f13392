"""A non-editable install (the serving and training images) carries every package."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_pipelines_package_is_listed_in_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "pipelines").rglob("__init__.py")
    }
    assert found - listed == set(), f"add to setup.cfg [options] packages: {found - listed}"
