"""Plans of an epoch: the structures of every step, shard by shard.

A plan is a list of steps; a step is a list of ``n_shards`` integer arrays
(one per device; an array may be empty), indices into the data set. Plans
depend only on sizes, the seed and the epoch, never on timing, so a resumed
run replays the same batches.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Budget(NamedTuple):
    """Most real nodes, edges and graphs one shard holds (padding excluded)."""

    nodes: int
    edges: int
    graphs: int


def budget_for(n_atoms: np.ndarray, n_edges: np.ndarray, batch_size: int) -> Budget:
    """A budget that holds ``batch_size`` structures of mean size, and the largest one.

    Args:
        n_atoms: (n_structures,) atoms of each structure.
        n_edges: (n_structures,) edges of each structure.
        batch_size: mean structures per shard wanted.

    The graph count may reach twice ``batch_size`` (small molecules fill the
    node budget in greater numbers); graph slots cost next to nothing.
    """
    nodes = max(int(np.ceil(batch_size * n_atoms.mean())), int(n_atoms.max()))
    edges = max(int(np.ceil(batch_size * n_edges.mean())), int(n_edges.max()))
    return Budget(nodes, edges, 2 * batch_size)


def pack(order: np.ndarray, n_atoms: np.ndarray, n_edges: np.ndarray, budget: Budget) -> list[np.ndarray]:
    """Cut ``order`` into consecutive shards that stay within ``budget`` (next fit).

    The order is kept (a shuffled order stays random); a shard closes when
    the next structure would overflow any of the three budgets.

    Raises:
        ValueError: a single structure larger than the budget.
    """
    too_big = np.flatnonzero((n_atoms > budget.nodes) | (n_edges > budget.edges))
    if len(too_big):
        i = int(too_big[0])
        raise ValueError(f"structure {i} ({n_atoms[i]} atoms, {n_edges[i]} edges) exceeds the batch budget "
                         f"{budget.nodes} nodes / {budget.edges} edges: raise train.budget_nodes/budget_edges")
    shards, start, nodes, edges = [], 0, 0, 0
    a, e = n_atoms[order], n_edges[order]
    for k in range(len(order)):
        if nodes + a[k] > budget.nodes or edges + e[k] > budget.edges or k - start == budget.graphs:
            shards.append(order[start:k])
            start, nodes, edges = k, 0, 0
        nodes += a[k]
        edges += e[k]
    if start < len(order):
        shards.append(order[start:])
    return shards


def _order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def budget_plan(n_atoms, n_edges, budget: Budget, n_shards: int, shuffle: bool = False,
                seed: int = 0) -> list[list[np.ndarray]]:
    """Every structure exactly once: packed shards, ``n_shards`` per step (the last step may hold empty ones)."""
    shards = pack(_order(len(n_atoms), shuffle, seed), np.asarray(n_atoms), np.asarray(n_edges), budget)
    empty = np.zeros(0, np.int64)
    shards += [empty] * (-len(shards) % n_shards)
    return [shards[s : s + n_shards] for s in range(0, len(shards), n_shards)]


def fixed_plan(n: int, batch_size: int, n_shards: int, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> list[list[np.ndarray]]:
    """``batch_size`` structures per step, split evenly over ``n_shards``."""
    order = _order(n, shuffle, seed)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    return [np.array_split(order[b * batch_size : (b + 1) * batch_size], n_shards) for b in range(steps)]
