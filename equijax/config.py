"""Run configurations: YAML files with command-line overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent


def load(path=None, overrides=()) -> dict:
    """Read a YAML config (default: the shipped ``configs/default.yaml``) and apply overrides.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML
    (``train.max_steps=200``, ``model.radial_hidden=[16,16]``).

    Raises:
        ValueError: an override without ``=``.
    """
    path = Path(path) if path else PACKAGE / "configs" / "default.yaml"
    if not path.exists() and (PACKAGE / "configs" / path.name).exists():
        path = PACKAGE / "configs" / path.name
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


def data_paths(paths) -> list[Path]:
    """Resolve data paths: as given (cwd), else inside the installed package."""
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if not p.exists() and (PACKAGE / p).exists():
            p = PACKAGE / p
        out.append(p)
    return out
