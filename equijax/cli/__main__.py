"""``python -m equijax.cli``: the console script (the huge-page restart execs this)."""

from equijax.cli import main

main()
