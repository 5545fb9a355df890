"""Labelled structures read from disk on demand.

A source is a ``Sequence`` of :class:`equijax.graph.Structure`: ``len``
and ``source[i]``. :class:`LazyFile` parses one frame when it is asked for
and keeps the last ``cache_size`` parsed frames (an LRU cache), so memory is
bounded by the cache, not by the file. Frames are checked when read, with
the same errors as :func:`equijax.io.read` (file and frame named).
"""

from __future__ import annotations

import atexit
import io as _io
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from equijax.graph import Structure, from_ase
from equijax.io import OPENERS, check_frame


class LazyFile(Sequence):
    """The frames of one extended XYZ file (also compressed) or ASE database, read on demand.

    Args:
        path: ``.xyz``/``.extxyz`` (plain, or ``.gz``/``.bz2``/``.xz``:
            decompressed once into a temporary file, deleted at exit), or
            ``.db``.
        species: allowed atomic numbers.
        require: labels every frame must carry.
        cache_size: parsed frames kept in memory.

    Opening indexes the file (byte offset of every frame; a truncated last
    frame is an error here). Reading is thread-safe.
    """

    def __init__(self, path, species: Sequence[int] | None = None, require=("energy", "forces"),
                 cache_size: int = 4096):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.species, self.require, self.cache_size = species, tuple(require), cache_size
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        suffix = self.path.suffix.lower()
        self._plain = self.path
        if suffix in OPENERS:
            self._plain = _decompressed(self.path, OPENERS[suffix])
            suffix = Path(self.path.stem).suffix.lower()
        if suffix in (".xyz", ".extxyz"):
            self._offsets = _index_xyz(self._plain, self.path)
            self._db = None
        elif suffix == ".db":
            import ase.db

            self._db = ase.db.connect(str(self.path))
            self._offsets = [row.id for row in self._db.select()]
        else:
            raise ValueError(f"{self.path}: cannot read {suffix!r} lazily; use .xyz/.extxyz (also .gz) or .db")
        if not self._offsets:
            raise ValueError(f"{self.path}: no frames")

    def __len__(self):
        return len(self._offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Subset(self, np.arange(len(self))[i])
        i = _checked(i, len(self))
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        s = self._parse(i)
        with self._lock:
            self._cache[i] = s
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return s

    def _parse(self, i: int) -> Structure:
        try:
            if self._db is not None:
                atoms = self._db.get_atoms(id=self._offsets[i], add_additional_information=True)
            else:
                from ase.io.extxyz import read_xyz

                start, stop = self._offsets[i]
                with open(self._plain, "rb") as f:
                    f.seek(start)
                    text = f.read(stop - start).decode()
                atoms = next(read_xyz(_io.StringIO(text), 0))  # the format's reader: cheaper than ase.io.read
            s = from_ase(atoms, with_labels=True)
        except Exception as err:
            raise ValueError(f"{self.path}: frame {i}: malformed ({type(err).__name__}: {err})") from err
        check_frame(s, self.path, i, self.species, self.require)
        return s


def _checked(i, n: int) -> int:
    """``i`` as an index into ``n`` items; ``IndexError`` past the end (which ends iteration)."""
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} frames")
    return i % n


def _decompressed(path: Path, opener) -> Path:
    fd, name = tempfile.mkstemp(suffix=Path(path.stem).suffix, prefix="equijax-")
    try:
        with os.fdopen(fd, "wb") as out, opener(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, EOFError) as err:
        os.unlink(name)
        raise ValueError(f"{path}: truncated or corrupt compressed file ({err})") from err
    atexit.register(lambda: os.path.exists(name) and os.unlink(name))
    return Path(name)


def _index_xyz(plain: Path, shown: Path) -> list[tuple[int, int]]:
    """Byte ranges of the frames of an XYZ file; errors name ``shown`` and the frame."""
    offsets = []
    with open(plain, "rb") as f:
        while True:
            start = f.tell()
            line = f.readline()
            if not line:
                return offsets
            if not line.strip():
                continue
            try:
                n = int(line)
            except ValueError:
                raise ValueError(f"{shown}: frame {len(offsets)}: expected an atom count, "
                                 f"found {line[:40].decode(errors='replace')!r}") from None
            for _ in range(n + 1):
                if not f.readline():
                    raise ValueError(f"{shown}: frame {len(offsets)}: truncated ({n} atoms announced)")
            offsets.append((start, f.tell()))


class Subset(Sequence):
    """``source[indices[k]]`` for ``k`` in ``range(len(indices))``, without reading anything."""

    def __init__(self, source: Sequence, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Subset(self.source, self.indices[k])
        return self.source[int(self.indices[_checked(k, len(self))])]


class _Concat(Sequence):
    def __init__(self, sources):
        self.sources = list(sources)
        self.ends = np.cumsum([len(s) for s in self.sources])

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Subset(self, np.arange(len(self))[i])
        i = _checked(i, len(self))
        f = int(np.searchsorted(self.ends, i, side="right"))
        return self.sources[f][i - (int(self.ends[f - 1]) if f else 0)]


def concat(sources: Sequence[Sequence]) -> Sequence:
    """One sequence of several sources."""
    return sources[0] if len(sources) == 1 else _Concat(sources)


def subset(source: Sequence, indices) -> Sequence:
    """A list of the chosen items for a list; a lazy :class:`Subset` otherwise."""
    if isinstance(source, list):
        return [source[int(i)] for i in indices]
    return Subset(source, indices)


def open_files(paths, species=None, require=("energy", "forces"), cache_size: int = 4096) -> Sequence:
    """:class:`LazyFile` of each path (the cache split between them), concatenated."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    per_file = max(1, cache_size // len(paths))
    return concat([LazyFile(p, species, require, per_file) for p in paths])
