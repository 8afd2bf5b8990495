"""nndiag.landscape (see docs/ARCHITECTURE.md)."""
