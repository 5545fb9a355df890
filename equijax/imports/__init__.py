"""Models people already have, as equijax model files: SevenNet's pretrained checkpoints.

    from equijax import imports
    config, params, metadata = imports.load("7net-0")      # from the installed sevenn package
    imports.convert("7net-0", "7net0.npz")                 # an ordinary model file (equijax import ...)

``SOURCE`` is a name of :data:`sevennet.PRETRAINED`, found inside an installed
``sevenn`` package (``pip install sevenn --no-deps`` brings the files
without torch), or the path of a SevenNet checkpoint. Files are read by
:mod:`equijax.imports.torchzip`, which runs nothing in them; torch is not
needed. equijax ships none of these weights: the user converts their own copy,
under its licence (SevenNet's: GPL-3.0), which the model file records.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import NamedTuple

from equijax.imports import sevennet, torchzip

LICENCE = ("SevenNet's weights are distributed under GPL-3.0 with the sevenn package; equijax ships none "
           "of them. This file was converted from the copy installed here.")


class Card(NamedTuple):
    """What an importable model is: name, where its file is, and what it was trained on."""

    name: str
    path: Path
    data: str
    theory: str
    licence: str


# what SevenNet's own documentation says each model was trained on
_TRAINED_ON = {
    "7net-0": ("MPtrj (Materials Project relaxation trajectories)", "PBE/PBE+U"),
    "7net-0_22may2024": ("MPtrj (Materials Project relaxation trajectories)", "PBE/PBE+U"),
    "7net-l3i5": ("MPtrj (Materials Project relaxation trajectories)", "PBE/PBE+U"),
    "7net-mf-0": ("MPtrj and other sets, one head per data set (multi-fidelity)", "PBE/PBE+U and others"),
}


def _sevenn_folder() -> Path | None:
    spec = importlib.util.find_spec("sevenn")  # finds the package without importing it (and torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pretrained_potentials"


def available() -> list[Card]:
    """The pretrained models that the packages installed here hold."""
    folder = _sevenn_folder()
    cards = []
    for name, rel in sevennet.PRETRAINED.items():
        if folder is not None and (folder / rel).exists():
            cards.append(Card(name, folder / rel, *_TRAINED_ON[name], "GPL-3.0 (sevenn)"))
    return cards


def resolve(source) -> tuple[Path, str]:
    """``(path, name)`` of a pretrained name or a checkpoint path.

    Raises:
        FileNotFoundError: neither an installed pretrained model nor a file.
    """
    if str(source).lower() in sevennet.PRETRAINED:
        name = str(source).lower()
        for card in available():
            if card.name == name:
                return card.path, name
        raise FileNotFoundError(f"{source}: a SevenNet model, but no installed sevenn package holds it "
                                "(pip install sevenn --no-deps brings the files without torch)")
    path = Path(source)
    if not path.is_file():
        names = ", ".join(sevennet.PRETRAINED)
        raise FileNotFoundError(f"{source}: no such file, and not a pretrained name ({names})")
    return path, path.name


def load(source, dtype: str = "float64"):
    """``(NequIPConfig, params, metadata)`` of a SevenNet checkpoint or pretrained name.

    Raises:
        torchzip.UnsafeCheckpoint: the file names anything beyond tensors, containers and numbers.
        ValueError: a damaged file, or options this reader does not reproduce (named).
    """
    path, name = resolve(source)
    checkpoint = torchzip.load(path)
    if not (isinstance(checkpoint, dict) and {"config", "model_state_dict"} <= set(checkpoint)):
        raise ValueError(f"{path}: not a SevenNet checkpoint (no config and model_state_dict)")
    config, params = sevennet.convert(checkpoint, dtype)
    try:
        installed = importlib.metadata.version("sevenn")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    metadata = {"source": {"format": "sevennet", "name": name, "file": str(path),
                           "sevenn_version": checkpoint["config"].get("version"), "sevenn_installed": installed,
                           "licence": LICENCE}}
    return config, params, metadata


def convert(source, out, dtype: str = "float64"):
    """Write the model of ``source`` to the equijax model file ``out``; returns ``(path, config, metadata)``."""
    from equijax import checkpoint

    config, params, metadata = load(source, dtype)
    return checkpoint.save_model(out, config.to_dict(), params, **metadata), config, metadata


__all__ = ["Card", "LICENCE", "available", "convert", "load", "resolve", "sevennet", "torchzip"]
