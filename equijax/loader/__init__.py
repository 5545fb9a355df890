"""Data at scale: lazy sources, budget batching, prefetching.

* :mod:`~equijax.loader.sources`: labelled structures read from disk on
  demand (extended XYZ, also compressed, and ASE databases), memory bounded
  by an LRU cache, not by the data set.
* :mod:`~equijax.loader.batching`: which structures go into which step:
  fixed counts, or packed up to a node/edge/graph budget so that one static
  padded size holds every batch with little padding.
* :mod:`~equijax.loader.prefetch`: builds the next batches on a worker
  thread while the device runs the current step, and times the waits.

* :mod:`~equijax.loader.dataset`: :class:`Dataset` puts the three together
  (also importable as ``equijax.data.Dataset``).
* :mod:`~equijax.loader.statistics`: what the model takes from the
  training data (energy shifts and scales, neighbour counts).
"""

from equijax.loader.batching import Budget, budget_for, fixed_plan, pack, budget_plan
from equijax.loader.prefetch import Prefetcher
from equijax.loader.sources import LazyFile, Subset, concat, open_files, subset
from equijax.loader.dataset import Dataset
from equijax.loader.statistics import Statistics, energy_shift, statistics

__all__ = ["Budget", "budget_for", "fixed_plan", "pack", "budget_plan", "Prefetcher", "LazyFile", "Subset",
           "concat", "open_files", "subset", "Dataset", "Statistics", "energy_shift", "statistics"]
