"""nndiag.slices (see docs/ARCHITECTURE.md)."""
