"""A neighbour list that lives in JAX: fixed capacity, Verlet skin, overflow flag.

The host (vesin) list of :func:`equijax.graph.neighbours` is exact but needs
a round trip per step. This one is rebuilt inside a jitted MD loop whenever
an atom may have moved far enough to change the list, into arrays of fixed
size. When the list needs more room than it has, it never drops a pair
silently: it sets ``overflow``, which the driver (:mod:`equijax.md.run`)
checks every chunk, then reallocates and replays the chunk.

Search: all pairs against all periodic images that can be within
``cutoff + skin`` (O(N² · images) work and memory), so cells shorter than
twice the cutoff (an atom sees its own images, and several images of a
neighbour) are exact. That suits the molecules and the few-hundred-atom
boxes of the benchmarks; for many thousands of atoms a cell list would win.

Positions are never wrapped: the list stores integer cell shifts valid for
the positions it was built from, and a trajectory stays continuous.

Fields of :class:`NeighbourList` (``n``: atoms, ``c``: capacity)::

    receivers, senders  (c,)     int32  pair (i, j); padding pairs point at atom n
    shifts              (c, 3)   int32  cell shifts S: vector r_j - r_i + S @ cell
    reference           (n, 3)   float  positions at the last build, Å
    reference_cell      (3, 3)   float  cell at the last build, Å
    count               ()       int32  most pairs within cutoff + skin any build found
    overflow            ()       bool   sticky: some build needed more room
    builds              ()       int32  builds so far
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from equijax import graph as graph_lib


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static part of a neighbour list (hashable; closed over by jitted code).

    Attributes:
        cutoff: the model's cutoff, Å.
        skin: extra search radius, Å; rebuild when a pair may have moved by more.
        capacity: pairs the list can hold.
        images: largest cell shift searched along each lattice vector (0 when
            not periodic).
        periodic: whether positions are periodic in the cell (all three
            directions, or none).
    """

    cutoff: float
    skin: float
    capacity: int
    images: tuple = (0, 0, 0)
    periodic: bool = False

    @property
    def radius(self) -> float:
        return self.cutoff + self.skin

    def image_shifts(self) -> np.ndarray:
        """(n_image, 3) every searched cell shift, the zero shift first."""
        ranges = [range(-k, k + 1) for k in self.images]
        shifts = sorted(itertools.product(*ranges), key=lambda s: (s != (0, 0, 0), s))
        return np.asarray(shifts, np.int32)


class NeighbourList(NamedTuple):
    receivers: jax.Array
    senders: jax.Array
    shifts: jax.Array
    reference: jax.Array
    reference_cell: jax.Array
    count: jax.Array
    overflow: jax.Array
    builds: jax.Array


def images_needed(cell, radius: float) -> tuple:
    """Shifts along each lattice vector that can hold a pair within ``radius``.

    With fractional coordinates in [0, 1), a pair's separation across the
    planes of lattice vector k is below ``radius`` only for shifts up to
    ``ceil(radius / d_k)``, where ``d_k`` is the spacing of those planes.
    """
    cell = np.asarray(cell, float)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)  # plane spacings d_k
    return tuple(int(k) for k in np.ceil(radius / spacing))


def choose_skin(cutoff: float) -> float:
    """Default skin: 0.25 Å, at most a tenth of the cutoff.

    The model pays for every listed pair, in or out of the cutoff, and the
    listed volume grows as ``(cutoff + skin)³``; rebuilds, which a thinner
    skin makes more frequent, cost less than the extra pairs.
    """
    return float(min(0.25, 0.1 * cutoff))


def _pairs(spec: Spec, positions, cell, mask):
    """Every pair within ``spec.radius``: (n, n, n_image) bool, shifts (n, n, n_image, 3)."""
    n = positions.shape[0]
    image = jnp.asarray(spec.image_shifts())  # (m, 3)
    if spec.periodic:
        frac = positions @ jnp.linalg.inv(cell)
        offset = jnp.floor(frac)  # positions = wrapped + offset @ cell
        wrapped = (frac - offset) @ cell
        d = wrapped[None, :, None, :] - wrapped[:, None, None, :] + (image.astype(cell.dtype) @ cell)[None, None]
        # the shift that applies to the unwrapped positions: S = S_wrapped - offset_j + offset_i
        shifts = image[None, None] + (offset[:, None, None, :] - offset[None, :, None, :]).astype(jnp.int32)
    else:
        d = (positions[None, :, :] - positions[:, None, :])[:, :, None, :]
        shifts = jnp.zeros((n, n, 1, 3), jnp.int32)
    within = jnp.sum(d * d, axis=-1) < spec.radius ** 2
    itself = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :])[:, :, None] & (jnp.arange(image.shape[0]) == 0)
    real = mask[:, None, None] & mask[None, :, None]
    return within & real & ~itself, jnp.broadcast_to(shifts, d.shape)


def build(spec: Spec, positions, cell=None, mask=None, previous: NeighbourList | None = None) -> NeighbourList:
    """Build the list from scratch (jittable; ``spec`` static).

    Args:
        spec: sizes and radii.
        positions: (n, 3) Å.
        cell: (3, 3) lattice vectors as rows, Å (ignored when not periodic).
        mask: (n,) bool, real atoms (default all).
        previous: the list being replaced (its ``overflow`` and ``builds`` carry on).
    """
    n = positions.shape[0]
    cell = jnp.zeros((3, 3), positions.dtype) if cell is None else jnp.asarray(cell, positions.dtype)
    mask = jnp.ones(n, bool) if mask is None else mask
    pairs, shifts = _pairs(spec, positions, cell, mask)
    flat = pairs.reshape(-1)
    count = jnp.sum(flat, dtype=jnp.int32)
    (index,) = jnp.nonzero(flat, size=spec.capacity, fill_value=flat.shape[0])
    found = index < flat.shape[0]
    m = pairs.shape[2]
    i, j = index // (n * m), (index // m) % n
    receivers = jnp.where(found, i, n).astype(jnp.int32)
    senders = jnp.where(found, j, n).astype(jnp.int32)
    shifts = jnp.where(found[:, None], shifts.reshape(-1, 3)[jnp.minimum(index, flat.shape[0] - 1)], 0)
    overflow = count > spec.capacity
    if spec.periodic:  # the cell shrank (NPT) past the images searched
        overflow |= jnp.any(_images_needed_jax(cell, spec.radius) > jnp.asarray(spec.images))
    if previous is not None:
        overflow |= previous.overflow
        count = jnp.maximum(count, previous.count)
    builds = jnp.int32(1) if previous is None else previous.builds + 1
    return NeighbourList(receivers, senders, shifts, positions, cell, count, overflow, builds)


def _images_needed_jax(cell, radius):
    spacing = 1.0 / jnp.linalg.norm(jnp.linalg.inv(cell), axis=0)
    return jnp.ceil(radius / spacing).astype(jnp.int32)


def needs_rebuild(spec: Spec, nbrs: NeighbourList, positions, cell=None) -> jax.Array:
    """Whether any pair could have crossed ``cutoff`` since the last build.

    A pair's separation changes by at most twice the largest displacement
    plus the change of its image vector, ``|S| · ‖Δcell‖``; once that may
    exceed the skin, a pair within the cutoff may be missing.
    """
    moved = jnp.max(jnp.linalg.norm(positions - nbrs.reference, axis=-1))
    bound = 2.0 * moved
    if spec.periodic and cell is not None:
        longest_shift = float(np.linalg.norm(spec.images))
        bound = bound + longest_shift * jnp.linalg.norm(cell - nbrs.reference_cell)
    return bound > spec.skin


def update(spec: Spec, nbrs: NeighbourList, positions, cell=None, mask=None) -> NeighbourList:
    """Rebuild if needed (:func:`needs_rebuild`), else return ``nbrs`` (jittable)."""
    return jax.lax.cond(
        needs_rebuild(spec, nbrs, positions, cell),
        lambda: build(spec, positions, cell, mask, previous=nbrs),
        lambda: nbrs,
    )


def count_pairs(positions, cutoff: float, cell=None, periodic: bool = False, mask=None) -> int:
    """Ordered pairs within ``cutoff`` now, counted on the host by vesin (no compilation)."""
    positions = np.asarray(positions, float)
    if mask is not None:
        positions = positions[np.asarray(mask, bool)]
    s = graph_lib.Structure(positions, np.ones(len(positions), np.int32),
                            np.asarray(cell, float) if periodic else None, np.full(3, bool(periodic)))
    return len(graph_lib.neighbours(s, cutoff)[0])


def make_spec(positions, cutoff: float, cells=None, periodic: bool = False, skin: float | None = None,
              capacity: int | None = None, masks=None, headroom: float = 1.15) -> Spec:
    """A spec with room for every one of several systems (host side).

    Args:
        positions: (n_system, n, 3) Å (replicas; padding atoms masked out).
        cells: (n_system, 3, 3) Å (periodic only).
        masks: (n_system, n) bool, real atoms (default all).
        skin: default :func:`choose_skin`.
        capacity: default ``headroom`` × the most pairs any system has
            within cutoff + skin now.

    The image range is what the cells need with 10% room for a shrinking
    (NPT) cell.
    """
    positions = np.asarray(positions, float)
    masks = np.ones(positions.shape[:2], bool) if masks is None else np.asarray(masks, bool)
    cells = np.zeros((len(positions), 3, 3)) if cells is None else np.asarray(cells, float)
    skin = choose_skin(cutoff) if skin is None else float(skin)
    if capacity is None:
        most = max(count_pairs(r, cutoff + skin, c, periodic, m) for r, c, m in zip(positions, cells, masks))
        capacity = max(int(np.ceil(most * headroom)), 16)
    images = (0, 0, 0)
    if periodic:
        for cell in cells:
            images = tuple(max(a, b) for a, b in zip(images, images_needed(cell * 0.9, cutoff + skin)))
    return Spec(float(cutoff), skin, int(capacity), images, bool(periodic))


def allocate(positions, cutoff: float, cell=None, periodic: bool = False, skin: float | None = None,
             capacity: int | None = None, mask=None) -> tuple[Spec, NeighbourList]:
    """A spec sized for these positions (:func:`make_spec`), and the first list."""
    spec = make_spec(np.asarray(positions)[None], cutoff, None if cell is None else np.asarray(cell)[None],
                     periodic, skin, capacity, None if mask is None else np.asarray(mask)[None])
    positions = jnp.asarray(positions)
    cell = None if cell is None else jnp.asarray(cell, positions.dtype)
    return spec, jax.jit(build, static_argnums=0)(spec, positions, cell, mask)


def grown(spec: Spec, nbrs: NeighbourList, cells=None, headroom: float = 1.15) -> Spec:
    """A larger spec after an overflow (host side).

    Args:
        nbrs: the overflowed list (or a stack of them, one per replica).
        cells: (..., 3, 3) the cells now (periodic only), for the image range.
    """
    most = int(np.max(np.asarray(nbrs.count)))
    capacity = spec.capacity if most <= spec.capacity else max(int(np.ceil(most * headroom)), 2 * spec.capacity)
    images = spec.images
    if spec.periodic and cells is not None:
        for cell in np.asarray(cells, float).reshape(-1, 3, 3):
            images = tuple(max(a, b) for a, b in zip(images, images_needed(cell * 0.9, spec.radius)))
    return dataclasses.replace(spec, capacity=capacity, images=images)


def as_pairs(nbrs: NeighbourList, positions, cell=None, cutoff=None):
    """(receivers, senders, vectors, mask) for the current positions (jittable).

    ``mask`` is true on real pairs closer than ``cutoff`` (when given).
    """
    n = positions.shape[0]
    real = nbrs.receivers < n
    i, j = jnp.minimum(nbrs.receivers, n - 1), jnp.minimum(nbrs.senders, n - 1)
    vectors = positions[j] - positions[i]
    if cell is not None:
        vectors = vectors + nbrs.shifts.astype(positions.dtype) @ cell
    if cutoff is not None:
        real &= jnp.sum(vectors * vectors, axis=-1) < cutoff ** 2
    return nbrs.receivers, nbrs.senders, vectors, real
