"""Run every notebook of ``notebooks/`` and store its outputs in place, for the documentation site.

    python docs/execute_notebooks.py            # all of them (a few CPU minutes)
    python docs/execute_notebooks.py quickstart # those whose name contains the word

The site shows the stored outputs (mkdocs-jupyter with ``execute: false``); the test suite runs the same
notebooks from scratch (``tests/test_notebooks.py``). Each runs in a temporary folder, so the files it
writes do not land in the repository.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def main(words) -> None:
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if words and not any(w in path.stem for w in words):
            continue
        nb = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": folder}}).execute()
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
