"""The data files that ship with equijax, and the data-set API under its familiar name.

The folder holds GFN2-xTB and EMT reference data made by
``experiments/make_data.py`` (see the documentation's data page).
``equijax.data.Dataset`` and the statistics live in :mod:`equijax.loader`;
they are re-exported here.
"""

from pathlib import Path

from equijax.loader.dataset import Dataset
from equijax.loader.statistics import Statistics, energy_shift, statistics

#: the folder of the shipped data files
FOLDER = Path(__file__).resolve().parent

__all__ = ["FOLDER", "Dataset", "Statistics", "energy_shift", "statistics"]
