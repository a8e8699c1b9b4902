"""`python -m qes_edge` is the `qes-edge` command."""

from qes_edge.cli import main

main()
