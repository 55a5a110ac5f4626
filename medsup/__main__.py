"""``python -m medsup`` (also what ``torchrun -m medsup`` runs)."""

from medsup.cli import main

main()
