"""``python -m nndiag`` runs the CLI."""

from nndiag.cli.app import main

main()
