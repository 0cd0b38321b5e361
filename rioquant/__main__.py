"""`python -m rioquant` runs the same click entry point as the `rioquant` console script."""

from rioquant.cli import main

main()
